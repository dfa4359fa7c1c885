"""Data: datasets as in-memory uint8 arrays, the deterministic validation split, batch loaders."""

from distswitch.data.datasets import DATASETS, ArrayDataset, DatasetInfo, Splits, load_splits
from distswitch.data.torch_loader import BatchLoader

__all__ = ["DATASETS", "ArrayDataset", "DatasetInfo", "Splits", "load_splits", "BatchLoader"]
