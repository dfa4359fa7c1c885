"""The papers' small networks: MLP 784-300-100-10 and LeNet5 (conv 20, conv 50, FC 500)."""

from __future__ import annotations

from torch import nn

from distswitch.models.registry import MODELS


@MODELS.register("mlp")
def mlp(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@MODELS.register("lenet5")
def lenet5(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    # Caffe's LeNet as used by the papers: 5x5 valid convs, each followed by 2x2 max-pooling.
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"lenet5 needs images of at least 16x16, got {image_size}x{image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * side * side, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
