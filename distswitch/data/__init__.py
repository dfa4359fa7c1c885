"""Data: dataset readers and the validation split, .beton preparation, and the two loaders
(FFCV, the default, and torch's DataLoader) behind `make_loaders`."""

from distswitch.data.datasets import DATASETS, ArrayDataset, DataError, DatasetInfo, Splits, load_splits
from distswitch.data.loaders import Loaders, check_data, make_loaders
from distswitch.data.torch_loader import BatchLoader

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataError",
    "DatasetInfo",
    "Splits",
    "load_splits",
    "BatchLoader",
    "Loaders",
    "check_data",
    "make_loaders",
]
