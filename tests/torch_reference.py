"""PyTorch originals of a few zoo models, for the weight-conversion parity tests.

Re-implementations of mdistiller's CIFAR `resnet8x4`, `wrn_40_1` and `ShuffleV1` and of
torchvision's `resnet18`, written from the published code with the same module names, so
their state dicts have exactly the keys and shapes of the layout file. Inference only:
mdistiller's extra feature outputs are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """The ResNet v1 basic block; mdistiller's CIFAR one and torchvision's are the same."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


def resnet_layer(inplanes: int, planes: int, units: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        BasicBlock(inplanes, planes, stride), *(BasicBlock(planes, planes) for _ in range(1, units))
    )


class CifarResNet(nn.Module):
    """mdistiller's `ResNet(depth, num_filters)` with basic blocks."""

    def __init__(self, depth: int, filters: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        units = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.layer1 = resnet_layer(filters[0], filters[1], units, 1)
        self.layer2 = resnet_layer(filters[1], filters[2], units, 2)
        self.layer3 = resnet_layer(filters[2], filters[3], units, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(filters[3], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ImageNetResNet(nn.Module):
    """torchvision's `ResNet(BasicBlock, layers)` (resnet18 / resnet34)."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 64, 128, 256, 512)
        for k in range(4):
            stride = 1 if k == 0 else 2
            layer = resnet_layer(widths[k], widths[k + 1], layers[k], stride)
            self.add_module(f"layer{k + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBasicBlock(nn.Module):
    """mdistiller's pre-activation WRN block (BN-ReLU-conv, twice, plus the input).

    When the widths differ, the shortcut convolution reads the *activated* input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.equal_in_out else self.convShortcut(activated))


class NetworkBlock(nn.Module):
    def __init__(self, units: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1
                )
                for i in range(units)
            )
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """mdistiller's `WideResNet(depth, num_classes, widen_factor)`."""

    def __init__(self, depth: int, widen: int, num_classes: int):
        super().__init__()
        channels = (16, 16 * widen, 32 * widen, 64 * widen)
        units = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(units, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(units, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(units, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.avg_pool2d(F.relu(self.bn1(x)), 8)
        return self.fc(torch.flatten(x, 1))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleBottleneck(nn.Module):
    """mdistiller's ShuffleNetV1 `Bottleneck`; stride 2 concatenates an average-pooled input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    """mdistiller's `ShuffleV1`: out_planes (240, 480, 960), units (4, 8, 4), 3 groups."""

    def __init__(self, num_classes: int, out_planes=(240, 480, 960), units=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for k, (planes, n) in enumerate(zip(out_planes, units)):
            layer = []
            for i in range(n):
                cat_planes = in_planes if i == 0 else 0
                layer.append(
                    ShuffleBottleneck(in_planes, planes - cat_planes, 2 if i == 0 else 1, groups)
                )
                in_planes = planes
            self.add_module(f"layer{k + 1}", nn.Sequential(*layer))
        self.linear = nn.Linear(out_planes[2], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.avg_pool2d(x, 4), 1))


MODELS = {
    "resnet8x4": lambda: CifarResNet(8, (32, 64, 128, 256), 100),
    "wrn_40_1": lambda: WideResNet(40, 1, 100),
    "shufflenetv1": lambda: ShuffleNetV1(100),
    "imagenet_resnet18": lambda: ImageNetResNet((2, 2, 2, 2), 1000),
}


def build(name: str, seed: int) -> nn.Module:
    """Model `name` in eval mode, default-initialised from `seed`, with random BatchNorms.

    Fresh BatchNorms are the identity (unit scale, zero statistics) and would hide a
    scale/bias or mean/variance mix-up, so every BatchNorm gets distinct random values.
    """
    torch.manual_seed(seed)
    model = MODELS[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()
