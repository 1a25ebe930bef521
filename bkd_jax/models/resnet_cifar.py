"""mdistiller's CIFAR ResNets (resnet8..110, resnet8x4, resnet32x4, resnet50) as BlockNets.

The basic-block ResNets have three stages at 32, 16 and 8 pixels; ResNet50 (mdistiller's
`resnetv2.ResNet50`) has four bottleneck stages at 32, 16, 8 and 4 pixels. Both use a
3x3 stride-1 stem, folded into block 1. Submodules carry the names of PyTorch's state-dict
paths (`layer1.0.downsample.0` -> `layer1_0/downsample_0`), which is what lets
`bkd_jax.convert` map weights generically; ResNet50 names its projection `shortcut` and
its classifier `linear`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from bkd_jax.blocknet import BlockNet
from bkd_jax.models.layers import ClassifierHead
from bkd_jax.models.resnet_units import BasicBlock, Bottleneck, Stage


def cifar_resnet(
    depth: int,
    filters: tuple[int, int, int, int],
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    name: str,
) -> BlockNet:
    """Basic-block ResNet of `depth` = 6k + 2: stem of `filters[0]`, then 3 stages."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6k+2, got {depth}")
    blocks = tuple(
        Stage(
            k + 1,
            BasicBlock,
            filters[k + 1],
            (depth - 2) // 6,
            1 if k == 0 else 2,
            stem="cifar" if k == 0 else None,
            stem_channels=filters[0],
            dtype=dtype,
        )
        for k in range(3)
    )
    return BlockNet(name, blocks, ClassifierHead(num_classes, dtype))


def cifar_resnet50(num_classes: int, dtype: jnp.dtype = jnp.float32, *, name: str) -> BlockNet:
    blocks = tuple(
        Stage(
            k + 1,
            Bottleneck,
            64 * 2**k,
            units,
            1 if k == 0 else 2,
            stem="cifar" if k == 0 else None,
            shortcut_name="shortcut",
            dtype=dtype,
        )
        for k, units in enumerate((3, 4, 6, 3))
    )
    return BlockNet(name, blocks, ClassifierHead(num_classes, dtype, fc_name="linear"))


_SPECS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}

MODELS = {
    **{
        name: functools.partial(cifar_resnet, depth, filters, name=name)
        for name, (depth, filters) in _SPECS.items()
    },
    "resnet50": functools.partial(cifar_resnet50, name="resnet50"),
}
