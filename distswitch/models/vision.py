"""The field's convolutional networks, as the pruning literature uses them.

- `resnet20`, `resnet56`, `resnet110`: He et al. (2016)'s CIFAR ResNets (3 stages of 16/32/64
  channels, 6n+2 layers) with option-B shortcuts: a 1x1 projection + BatchNorm where the shape
  changes, identity elsewhere. (Option A's zero-padded identity adds channels no layer writes, so no
  structured pruner could remove a stream channel through it.)
- `resnet18`, `resnet34`, `resnet50`: torchvision's, with a CIFAR stem (3x3 stride 1, no max-pooling)
  for inputs under 128 pixels and torchvision's ImageNet stem from 128 on.
- `vgg16` (three FC layers) and `vgg19` (one, as CIFAR VGG-19 is pruned in network slimming), both
  with BatchNorm; `mobilenet_v2` with a stride-1 stem for small inputs.

Small inputs (28x28, 32x32) lose too much to ImageNet stems. The blocks are torchvision's own.
torchvision is imported by the factories, not here: importing it (its ops import torch._dynamo) took
1.5 s of every worker's start, for models that never use it.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from distswitch.models.registry import MODELS

IMAGENET_STEM_FROM = 128  # pixels: below this, the CIFAR stem


def _stem(model: nn.Module, in_channels: int, image_size: int) -> nn.Module:
    if image_size < IMAGENET_STEM_FROM:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    return model


@MODELS.register("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18

    return _stem(resnet18(num_classes=num_classes), in_channels, image_size)


@MODELS.register("resnet34")
def resnet34(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet34

    return _stem(resnet34(num_classes=num_classes), in_channels, image_size)


@MODELS.register("resnet50")
def resnet50(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet50

    return _stem(resnet50(num_classes=num_classes), in_channels, image_size)


class CifarResNet(nn.Module):
    """He et al. (2016)'s CIFAR ResNet: conv 16, three stages of n basic blocks, global pool, FC."""

    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        planes_in = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if stage > 1 and b == 0 else 1
                shortcut = None
                if stride != 1 or planes_in != planes:
                    shortcut = nn.Sequential(
                        nn.Conv2d(planes_in, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                    )
                blocks.append(BasicBlock(planes_in, planes, stride, shortcut))
                planes_in = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _register_cifar_resnet(depth: int) -> None:
    @MODELS.register(f"resnet{depth}")
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        return CifarResNet((depth - 2) // 6, in_channels, num_classes)


for _depth in (20, 56, 110):
    _register_cifar_resnet(_depth)


@MODELS.register("mobilenet_v2")
def mobilenet_v2(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(num_classes=num_classes)
    stem = model.features[0][0]
    stride = 1 if image_size < IMAGENET_STEM_FROM else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=stride, padding=1, bias=False)
    return model


def _vgg_features(config: str, in_channels: int, image_size: int) -> tuple[nn.Sequential, int]:
    from torchvision.models.vgg import cfgs as vgg_cfgs

    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for item in vgg_cfgs[config]:
        if item == "M":
            if side >= 2:  # 28x28 inputs allow four of VGG's five poolings
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
        channels = item
    return nn.Sequential(*layers), channels


def _vgg(config: str, in_channels: int, image_size: int, classifier) -> nn.Module:
    """VGG's BN features, global pooling, and `classifier(feature channels)`."""
    features, channels = _vgg_features(config, in_channels, image_size)
    return nn.Sequential(
        OrderedDict(
            features=features, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), classifier=classifier(channels)
        )
    )


@MODELS.register("vgg16")
def vgg16(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return _vgg(
        "D",
        in_channels,
        image_size,
        lambda c: nn.Sequential(
            nn.Linear(c, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        ),
    )


@MODELS.register("vgg19")
def vgg19(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return _vgg("E", in_channels, image_size, lambda c: nn.Linear(c, num_classes))
