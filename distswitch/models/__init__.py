"""Task networks (TNN): one registry, `create_tnn(name, in_channels, num_classes, image_size)`.

Importing this package registers every model family; each lives in its own module.
"""

from distswitch.models import small, vision, vit  # noqa: F401  (registers the families)
from distswitch.models.registry import MODELS, create_tnn, list_models

__all__ = ["MODELS", "create_tnn", "list_models"]
