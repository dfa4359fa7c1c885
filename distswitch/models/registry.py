"""The model registry: builders take (in_channels, num_classes, image_size) and return an nn.Module."""

from __future__ import annotations

from typing import Callable

from torch import nn

from distswitch.registry import Registry

ModelBuilder = Callable[[int, int, int], nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model", "model.name")


def create_tnn(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a fresh task network for inputs of shape [in_channels, image_size, image_size]."""
    return MODELS.get(name)(in_channels, num_classes, image_size)


def list_models() -> list[str]:
    return MODELS.names()
