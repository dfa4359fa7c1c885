"""CIFAR-style variants of torchvision's VGG16-BN, ResNet18/34 and MobileNetV2.

Small inputs (28x28, 32x32) lose too much to ImageNet stems, so the stems use stride 1 and no
max-pooling, as in the CIFAR literature the papers follow; the blocks are torchvision's own. torchvision is imported by the factories, not here: importing
it (its ops import torch._dynamo) took 1.5 s of every worker's start, for models that never use it.
"""

from __future__ import annotations

from torch import nn

from distswitch.models.registry import MODELS


def _cifar_resnet(factory, in_channels: int, num_classes: int) -> nn.Module:
    model = factory(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@MODELS.register("resnet18")
def cifar_resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18

    return _cifar_resnet(resnet18, in_channels, num_classes)


@MODELS.register("resnet34")
def cifar_resnet34(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet34

    return _cifar_resnet(resnet34, in_channels, num_classes)


@MODELS.register("mobilenet")
def cifar_mobilenet_v2(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(num_classes=num_classes)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return model


@MODELS.register("vgg16")
def cifar_vgg16_bn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models.vgg import cfgs as vgg_cfgs

    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for item in vgg_cfgs["D"]:
        if item == "M":
            if side >= 2:  # 28x28 inputs allow four of VGG's five poolings
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
        channels = item
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )
