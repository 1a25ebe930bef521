"""PyTorch originals of every zoo model, for the weight-conversion parity tests.

Re-implementations of mdistiller's CIFAR models (`resnet8`..`resnet110`, `resnet8x4`,
`resnet32x4`, `ResNet50`, `wrn_*`, `vgg8`/`vgg13` with BatchNorm, `mobile_half`,
`ShuffleV1`, `ShuffleV2`), of torchvision's ImageNet ResNets and of mdistiller's ImageNet
MobileNetV1, written from the published architectures with the same module names, so
their state dicts have exactly the keys and shapes of the layout file. Like mdistiller's
models, `forward` returns `(logits, feats)` with `feats["feats"]` (stem, then every
stage), `feats["preact_feats"]` (the same before the final ReLU) and
`feats["pooled_feat"]`, NCHW. The final pooling is a global average wherever
mdistiller's fixed window (`AvgPool2d(8)`, `(4)`, `(7)`) equals one at the model's full
resolution, so the ImageNet models also run on 64-pixel test images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from conftest import input_size
from torch import nn


def _feats(feats, preact, pooled) -> dict:
    return {"feats": list(feats), "preact_feats": list(preact), "pooled_feat": pooled}


def _run_stage(stage: nn.Sequential, x):
    """Runs units returning `(out, preact)`; returns the last unit's pair."""
    for unit in stage:
        x, preact = unit(x)
    return x, preact


class BasicBlock(nn.Module):
    """ResNet v1 basic block (mdistiller's CIFAR and torchvision's): `(out, preact)`."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, shortcut: str = "downsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        _add_projection(self, shortcut, inplanes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + _residual(self, x)
        return F.relu(preact), preact


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3), `4 * planes` wide: `(out, preact)`."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, shortcut: str = "downsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        _add_projection(self, shortcut, inplanes, 4 * planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + _residual(self, x)
        return F.relu(preact), preact


def _add_projection(unit: nn.Module, name: str, cin: int, cout: int, stride: int) -> None:
    """Registers the 1x1 conv + BN residual projection as `unit.<name>` when shapes change."""
    projection = None
    if stride != 1 or cin != cout:
        projection = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )
    unit.add_module(name, projection)
    unit.shortcut_name = name


def _residual(unit: nn.Module, x):
    projection = getattr(unit, unit.shortcut_name)
    return x if projection is None else projection(x)


def resnet_layer(unit, inplanes: int, planes: int, units: int, stride: int, shortcut: str):
    first = unit(inplanes, planes, stride, shortcut)
    rest = (unit(unit.expansion * planes, planes, 1, shortcut) for _ in range(1, units))
    return nn.Sequential(first, *rest)


class ResNet(nn.Module):
    """ResNet v1 with the CIFAR stem (mdistiller's `ResNet`, `resnetv2.ResNet50`) or the
    ImageNet one (torchvision's; the stem tap is taken before the max-pool, as
    mdistiller's ImageNet ResNet does)."""

    def __init__(
        self,
        unit,
        units: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
        *,
        imagenet: bool = False,
        shortcut: str = "downsample",
        fc: str = "fc",
    ):
        super().__init__()
        self.imagenet = imagenet
        stem, inplanes = widths[0], widths[0]
        if imagenet:
            self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        for k, (n, planes) in enumerate(zip(units, widths[1:])):
            stride = 1 if k == 0 else 2
            layer = resnet_layer(unit, inplanes, planes, n, stride, shortcut)
            self.add_module(f"layer{k + 1}", layer)
            inplanes = unit.expansion * planes
        self.num_layers, self.fc_name = len(units), fc
        self.add_module(fc, nn.Linear(inplanes, num_classes))

    def forward(self, x):
        preact = self.bn1(self.conv1(x))
        x = F.relu(preact)
        feats, preacts = [x], [preact if self.imagenet else x]
        if self.imagenet:
            x = F.max_pool2d(x, 3, 2, 1)
        for k in range(self.num_layers):
            x, preact = _run_stage(getattr(self, f"layer{k + 1}"), x)
            feats.append(x)
            preacts.append(preact)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return getattr(self, self.fc_name)(pooled), _feats(feats, preacts, pooled)


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
    """mdistiller's `WideResNet(depth, num_classes, widen_factor)`.

    Block K's pre-activation is its output through the BatchNorm that opens what follows
    (block K+1's first `bn1`, or the final `bn1`), without the ReLU.
    """

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
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        preacts = [f0, self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3)]
        pooled = torch.flatten(F.avg_pool2d(F.relu(preacts[-1]), 8), 1)
        return self.fc(pooled), _feats([f0, f1, f2, f3], preacts, pooled)


class VGG(nn.Module):
    """mdistiller's CIFAR `VGG(cfg, batch_norm=True)`: groups `block0`..`block4` of
    (conv, BN, ReLU) triples, the group's last ReLU applied outside it; 2x2 max-pools
    `pool0`..`pool2` between groups (`pool3` only at 64 pixels), then a global average."""

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int):
        super().__init__()
        cin = 3
        for k, group in enumerate(cfg):
            layers = []
            for width in group:
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            self.add_module(f"block{k}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        size = x.shape[2]
        x = F.relu(self.block0(x))
        feats, preacts = [x], [x]
        for k in range(1, 5):
            if k < 4 or size == 64:
                x = F.max_pool2d(x, 2, 2)
            preact = getattr(self, f"block{k}")(x)
            x = F.relu(preact)
            feats.append(x)
            preacts.append(preact)
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(pooled), _feats(feats, preacts, pooled)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class InvertedResidual(nn.Module):
    """MobileNetV2 unit: `conv` = 1x1 expand, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, hidden, 1),
            nn.ReLU(),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU(),
            *_conv_bn(hidden, cout, 1),
        )

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """mdistiller's CIFAR `MobileNetV2(T, width_mult)`; its feats have no pre-activations."""

    # (expansion (None: T), channels, units, stride) of each group `blocks[g]`.
    GROUPS = (
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )
    TAPPED = (1, 2, 4, 6)  # feats after these groups

    def __init__(self, expansion: int, width: float, num_classes: int):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn(3, cin, 3, 2), nn.ReLU())
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.GROUPS:
            cout = int(c * width)
            units = []
            for u in range(n):
                units.append(InvertedResidual(cin, cout, s if u == 0 else 1, t or expansion))
                cin = cout
            self.blocks.append(nn.Sequential(*units))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn(cin, last, 1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.conv1(x)
        feats = [x]
        for g, group in enumerate(self.blocks):
            x = group(x)
            if g in self.TAPPED:
                feats.append(x)
        x = self.conv2(x)
        # mdistiller: AvgPool2d(input_size // 16, ceil_mode=True), the whole 2x2 map at 32 px.
        pooled = torch.flatten(F.avg_pool2d(x, x.shape[2], ceil_mode=True), 1)
        return self.classifier(pooled), {"feats": feats, "pooled_feat": pooled}


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
        preact = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x
        return F.relu(preact), preact


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
        return _shufflenet_forward(self, x, head=lambda x: x)


def _shufflenet_forward(net: nn.Module, x, head):
    x = F.relu(net.bn1(net.conv1(x)))
    feats, preacts = [x], [x]
    for layer in (net.layer1, net.layer2, net.layer3):
        x, preact = _run_stage(layer, x)
        feats.append(x)
        preacts.append(preact)
    pooled = torch.flatten(F.avg_pool2d(head(x), 4), 1)
    return net.linear(pooled), _feats(feats, preacts, pooled)


class ShuffleDownBlock(nn.Module):
    """mdistiller's ShuffleNetV2 `DownBlock`: two stride-2 branches, concatenated, shuffled."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2), None


class ShuffleBasicBlock(nn.Module):
    """mdistiller's ShuffleNetV2 `BasicBlock`; preact is the concatenation before the
    branch's last ReLU, unshuffled."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        out = self.bn3(self.conv3(out))
        preact = torch.cat([x1, out], 1)
        return channel_shuffle(torch.cat([x1, F.relu(out)], 1), 2), preact


class ShuffleNetV2(nn.Module):
    """mdistiller's `ShuffleV2` (net_size 1): channels (116, 232, 464, 1024), units (3, 7, 3)."""

    def __init__(self, num_classes: int, channels=(116, 232, 464, 1024), units=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for k, (cout, n) in enumerate(zip(channels, units)):
            layer = [ShuffleDownBlock(cin, cout), *(ShuffleBasicBlock(cout) for _ in range(n))]
            self.add_module(f"layer{k + 1}", nn.Sequential(*layer))
            cin = cout
        self.conv2 = nn.Conv2d(channels[2], channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.linear = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        return _shufflenet_forward(self, x, head=lambda x: F.relu(self.bn2(self.conv2(x))))


class MobileNetV1(nn.Module):
    """mdistiller's ImageNet `MobileNetV1`: `model.0` full 3x3 conv, `model.1`..`model.13`
    depthwise-separable units; feats after `model.3`, `.5`, `.11`, `.13` (no stem)."""

    CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
    STRIDES = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
    CUTS = (3, 5, 11, 13)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers = [nn.Sequential(*_conv_bn(3, 32, 3, 2), nn.ReLU())]
        for cin, cout, s in zip(self.CHANNELS, self.CHANNELS[1:], self.STRIDES[1:]):
            layers.append(
                nn.Sequential(
                    *_conv_bn(cin, cin, 3, s, groups=cin),
                    nn.ReLU(),
                    *_conv_bn(cin, cout, 1),
                    nn.ReLU(),
                )
            )
        # mdistiller's `model.14` is AvgPool2d(7), global at 224 px; no parameters.
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        preacts = []
        for i in range(14):
            unit = self.model[i]
            if i in self.CUTS:
                preacts.append(unit[:-1](x))
                x = F.relu(preacts[-1])
            else:
                x = unit(x)
        pooled = torch.flatten(self.model[14](x), 1)
        feats = [F.relu(p) for p in preacts]
        return self.fc(pooled), _feats(feats, preacts, pooled)


def _cifar_resnet(depth: int, widths: tuple[int, int, int, int]):
    return lambda: ResNet(BasicBlock, ((depth - 2) // 6,) * 3, widths, 100)


MODELS = {
    **{
        name: _cifar_resnet(depth, (16, 16, 32, 64))
        for name, depth in (
            ("resnet8", 8),
            ("resnet20", 20),
            ("resnet32", 32),
            ("resnet56", 56),
            ("resnet110", 110),
        )
    },
    "resnet8x4": _cifar_resnet(8, (32, 64, 128, 256)),
    "resnet32x4": _cifar_resnet(32, (32, 64, 128, 256)),
    "resnet50": lambda: ResNet(
        Bottleneck, (3, 4, 6, 3), (64, 64, 128, 256, 512), 100, shortcut="shortcut", fc="linear"
    ),
    "wrn_16_1": lambda: WideResNet(16, 1, 100),
    "wrn_16_2": lambda: WideResNet(16, 2, 100),
    "wrn_40_1": lambda: WideResNet(40, 1, 100),
    "wrn_40_2": lambda: WideResNet(40, 2, 100),
    "vgg8": lambda: VGG(((64,), (128,), (256,), (512,), (512,)), 100),
    "vgg13": lambda: VGG(((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)), 100),
    "mobilenetv2": lambda: MobileNetV2(6, 0.5, 100),
    "shufflenetv1": lambda: ShuffleNetV1(100),
    "shufflenetv2": lambda: ShuffleNetV2(100),
    "imagenet_resnet18": lambda: ResNet(
        BasicBlock, (2, 2, 2, 2), (64, 64, 128, 256, 512), 1000, imagenet=True
    ),
    "imagenet_resnet34": lambda: ResNet(
        BasicBlock, (3, 4, 6, 3), (64, 64, 128, 256, 512), 1000, imagenet=True
    ),
    "imagenet_resnet50": lambda: ResNet(
        Bottleneck, (3, 4, 6, 3), (64, 64, 128, 256, 512), 1000, imagenet=True
    ),
    "imagenet_mobilenetv1": lambda: MobileNetV1(1000),
}


def build(name: str, seed: int) -> nn.Module:
    """Model `name` in eval mode, randomly initialised from `seed`, with random BatchNorms.

    Fresh BatchNorms are the identity (unit scale, zero statistics) and would hide a
    scale/bias or mean/variance mix-up, so every BatchNorm gets a random scale and shift,
    and running statistics measured on a batch of random images (cumulative average over
    one training-mode pass): distinct per channel, and they keep activations near unit
    scale through the deep networks, so the comparison means something at every tap.
    """
    torch.manual_seed(seed)
    model = MODELS[name]()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
            m.reset_running_stats()
            m.momentum = None
        size = input_size(name)
        model.train()(torch.randn(8, 3, size, size))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


# --- mdistiller's distiller modules and losses (mdistiller/distillers/) ----------------
# Written from FitNet.py with _common.py's ConvReg, VID.py and OFD.py; every module
# trains with its student, as `get_learnable_parameters` lists it, except VID's
# per-channel variances: mdistiller keeps them in a plain list, so its optimizer never
# updates them.


class HintRegressor(nn.Module):
    """mdistiller's ConvReg for maps of equal or larger student size: a valid convolution
    of kernel 1 + (student size - teacher size), BatchNorm, ReLU."""

    def __init__(self, s_channels: int, t_channels: int, s_size: int, t_size: int):
        super().__init__()
        self.conv = nn.Conv2d(s_channels, t_channels, 1 + s_size - t_size)
        self.bn = nn.BatchNorm2d(t_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def fitnet_feat_loss(regressor: HintRegressor, f_s, f_t):
    return F.mse_loss(regressor(f_s), f_t)


def vid_regressor(s_channels: int, t_channels: int) -> nn.Sequential:
    """Three bias-free 1x1 convolutions with ReLUs between them."""
    return nn.Sequential(
        nn.Conv2d(s_channels, t_channels, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(t_channels, t_channels, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(t_channels, t_channels, 1, bias=False),
    )


def vid_init_log_scale(channels: int, init_pred_var: float = 5.0, eps: float = 1e-5):
    """alpha with softplus(alpha) + eps = init_pred_var, per channel."""
    return torch.full((channels,), math.log(math.expm1(init_pred_var - eps)))


def vid_feat_loss(regressor, log_scale, f_s, f_t, eps: float = 1e-5):
    """Gaussian negative log-likelihood of f_t under N(regressor(f_s), softplus(alpha) + eps),
    the larger map average-pooled to the smaller one's height first."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    mean = regressor(f_s)
    var = (F.softplus(log_scale) + eps).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((mean - f_t) ** 2 / var + torch.log(var)))


def ofd_connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """1x1 convolution (He normal with fan-out, no bias) and BatchNorm (1, 0)."""
    conv = nn.Conv2d(s_channels, t_channels, 1, bias=False)
    conv.weight.data.normal_(0.0, math.sqrt(2.0 / t_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels))


def ofd_margins(bn: nn.BatchNorm2d) -> torch.Tensor:
    """E[x | x < 0] of N(beta, gamma^2) per channel, -3|gamma| where P(x < 0) <= 0.001."""
    out = []
    for gamma, beta in zip(bn.weight.tolist(), bn.bias.tolist()):
        s = abs(gamma)
        below = 0.5 * math.erfc(beta / s / math.sqrt(2.0))
        if below > 0.001:
            out.append(
                -s * math.exp(-((beta / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below + beta
            )
        else:
            out.append(-3 * s)
    return torch.tensor(out).view(1, -1, 1, 1)


def ofd_feat_loss(connected, f_t, margin):
    """Partial L2 to the teacher's pre-ReLU map, summed over C, H, W, averaged over N."""
    f_t = F.adaptive_avg_pool2d(f_t, connected.shape[-2:])
    loss = (
        (connected - margin) ** 2 * ((connected > margin) & (f_t <= margin)).float()
        + (connected - f_t) ** 2 * ((connected > f_t) & (f_t > margin) & (f_t <= 0)).float()
        + (connected - f_t) ** 2 * (f_t > 0).float()
    )
    return loss.abs().mean(dim=0).sum()


# --- CRD.py and ReviewKD.py -------------------------------------------------------------
# CRD: the two Embed heads, ContrastMemory's scores, partition constants and bank update,
# and ContrastLoss. ReviewKD: the ABF fusion modules, their deepest-first review and
# hcl_loss.


class CRDEmbed(nn.Module):
    """Linear layer, then division by the row's L2 norm (CRD's Embed and Normalize)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


def crd_init_bank(num_data: int, dim: int) -> torch.Tensor:
    """A bank uniform in +-1 / sqrt(dim / 3), as ContrastMemory registers it."""
    bound = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_data, dim) * (2 * bound) - bound


class CRDMemory:
    """ContrastMemory with the contrast indices given (the data loader's contrastive_index).

    `params` is ContrastMemory's float32 buffer (K, T, Z_student, Z_teacher, momentum),
    the constants unset (-1) until the first call.
    """

    def __init__(self, num_data: int, dim: int, k: int, temperature: float, momentum: float):
        self.student = crd_init_bank(num_data, dim)
        self.teacher = crd_init_bank(num_data, dim)
        self.params = torch.tensor([k, temperature, -1.0, -1.0, momentum])

    def scores(self, v_s, v_t, index, contrast_idx):
        """exp(row . v / T) of each embedding against the other side's bank rows; then the
        constants are set if unset, and the banks' rows `index` moved towards the batch."""
        temperature, momentum = self.params[1].item(), self.params[4].item()
        rows_t = self.teacher[contrast_idx.reshape(-1)].reshape(*contrast_idx.shape, -1)
        rows_s = self.student[contrast_idx.reshape(-1)].reshape(*contrast_idx.shape, -1)
        out_s = torch.exp(torch.bmm(rows_t, v_s.unsqueeze(2)).squeeze(2) / temperature)
        out_t = torch.exp(torch.bmm(rows_s, v_t.unsqueeze(2)).squeeze(2) / temperature)
        num_data = self.student.shape[0]
        for slot, out in ((2, out_s), (3, out_t)):
            if self.params[slot].item() < 0:
                self.params[slot] = out.mean().detach() * num_data
        out_s, out_t = out_s / self.params[2].item(), out_t / self.params[3].item()
        with torch.no_grad():
            for bank, v in ((self.student, v_s), (self.teacher, v_t)):
                rows = bank[index] * momentum + v * (1 - momentum)
                bank[index] = rows / rows.pow(2).sum(1, keepdim=True).sqrt()
        return out_s, out_t


def crd_contrast_loss(x, num_data: int, eps: float = 1e-7):
    """ContrastLoss on (batch, 1 + K) normalised scores, the positive first."""
    m_pn = (x.shape[1] - 1) / float(num_data)
    log_pos = torch.log(x[:, 0] / (x[:, 0] + m_pn + eps))
    log_neg = torch.log(m_pn / (x[:, 1:] + m_pn + eps))
    return -(log_pos.sum() + log_neg.sum()) / x.shape[0]


class ABF(nn.Module):
    """ReviewKD's attention-based fusion: 1x1 conv + BN, fusion with the (resized) residual
    through two sigmoid maps, nearest resize to `out_shape`, 3x3 conv + BN."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, 1, bias=False), nn.BatchNorm2d(mid_channel)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channel)
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channel, 2, 1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], 1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def review(abfs, feats: dict, shapes, out_shapes) -> list:
    """ReviewKD.forward_train's fusion: `abfs` deepest first (as ReviewKD keeps them), on
    the student's feats and pooled feature, the stem left out by the zip's shortest list;
    `shapes`/`out_shapes` are the student's and teacher's sizes, deepest first."""
    x = [*feats["feats"], feats["pooled_feat"][:, :, None, None]][::-1]
    out, residual = abfs[0](x[0], out_shape=out_shapes[0])
    results = [out]
    for f, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out, residual = abf(f, residual, shape, out_shape)
        results.insert(0, out)
    return results


def hcl_loss(f_students, f_teachers):
    """MSE per level plus the 4/2/1 pooled MSEs weighted 1/2, 1/4, 1/8 (those smaller than
    the map), normalised by the weights' sum; summed over levels."""
    total = 0.0
    for fs, ft in zip(f_students, f_teachers):
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= fs.shape[2]:
                continue
            weight /= 2.0
            pooled_s = F.adaptive_avg_pool2d(fs, (level, level))
            pooled_t = F.adaptive_avg_pool2d(ft, (level, level))
            loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
            weights += weight
        total = total + loss / weights
    return total
