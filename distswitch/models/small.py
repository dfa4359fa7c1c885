"""The papers' small networks: MLP 784-300-100-10 and LeNet5 (conv 20, conv 50, FC 500).

Their layers are named (conv1, fc1, ...): the names are what a user reads in summaries, metrics and
figures. Checkpoints and compact models written before that used nn.Sequential's indices; the
`renamed` trait maps those, and loading translates them."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from distswitch.models.registry import MODELS


@MODELS.register("mlp")
def mlp(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(in_channels * image_size * image_size, 300),
            relu1=nn.ReLU(),
            fc2=nn.Linear(300, 100),
            relu2=nn.ReLU(),
            fc3=nn.Linear(100, num_classes),
        )
    )


@MODELS.register("lenet5")
def lenet5(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    # Caffe's LeNet as used by the papers: 5x5 valid convs, each followed by 2x2 max-pooling.
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"lenet5 needs images of at least 16x16, got {image_size}x{image_size}")
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 20, 5),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(20, 50, 5),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(50 * side * side, 500),
            relu3=nn.ReLU(),
            fc2=nn.Linear(500, num_classes),
        )
    )
