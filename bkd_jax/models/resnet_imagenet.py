"""torchvision's ImageNet ResNets (resnet18, resnet34, resnet50) as BlockNets.

Four blocks, one per stage (`layer1`..`layer4`, at 56, 28, 14 and 7 pixels for 224-pixel
input); the stem (7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max-pool) is folded into
block 1. The head pools globally, so the networks also run on small test images.
Submodules carry the names of torchvision's state-dict paths (`layer1.0.downsample.0` ->
`layer1_0/downsample_0`), which is what lets `bkd_jax.convert` map weights generically.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from bkd_jax.blocknet import BlockNet
from bkd_jax.models.layers import ClassifierHead
from bkd_jax.models.resnet_units import BasicBlock, Bottleneck, Stage


def imagenet_resnet(
    unit: type[BasicBlock] | type[Bottleneck],
    units: tuple[int, int, int, int],
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    name: str,
) -> BlockNet:
    """A ResNet of `unit`s with `units[k]` of them in `layer{k+1}`, as four blocks and a head."""
    blocks = tuple(
        Stage(
            k + 1,
            unit,
            64 * 2**k,
            n,
            1 if k == 0 else 2,
            stem="imagenet" if k == 0 else None,
            dtype=dtype,
        )
        for k, n in enumerate(units)
    )
    return BlockNet(name, blocks, ClassifierHead(num_classes, dtype))


_SPECS = {
    "imagenet_resnet18": (BasicBlock, (2, 2, 2, 2)),
    "imagenet_resnet34": (BasicBlock, (3, 4, 6, 3)),
    "imagenet_resnet50": (Bottleneck, (3, 4, 6, 3)),
}

MODELS = {
    name: functools.partial(imagenet_resnet, unit, units, name=name)
    for name, (unit, units) in _SPECS.items()
}
