"""torchvision's ImageNet ResNets (resnet18, resnet34, resnet50) as BlockNets.

Four blocks, one per stage (`layer1`..`layer4`, at 56, 28, 14 and 7 pixels for 224-pixel
input); the stem (7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max-pool) is folded into
block 1. The head pools globally, so the networks also run on small test images.
Submodules carry the names of torchvision's state-dict paths (`layer1.0.downsample.0` ->
`layer1_0/downsample_0`), which is what lets `bkd_jax.convert` map weights generically.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blockwise import BlockNet
from bkd_jax.models import bottleneck
from bkd_jax.models.layers import ClassifierHead, batch_norm, conv, max_pool
from bkd_jax.models.resnet_cifar import BasicBlock

STEM_CHANNELS = 64


class Stage(nn.Module):
    """One `layerK` of the ResNet, optionally preceded by the stem."""

    index: int  # K in layerK
    unit: type[nn.Module]  # BasicBlock or Bottleneck
    expansion: int  # output channels of a unit per `planes`
    planes: int
    num_units: int
    stride: int
    with_stem: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.with_stem:
            x = conv(STEM_CHANNELS, 7, 2, padding=3, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
            x = max_pool(x, 3, 2, padding=1)
        out_channels = self.expansion * self.planes
        for u in range(self.num_units):
            stride = self.stride if u == 0 else 1
            downsample = u == 0 and (stride != 1 or x.shape[-1] != out_channels)
            x = self.unit(
                self.planes, stride, downsample, self.dtype, name=f"layer{self.index}_{u}"
            )(x, train)
        return x


def imagenet_resnet(
    unit: type[nn.Module],
    expansion: int,
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
            expansion,
            STEM_CHANNELS * 2**k,
            n,
            stride=1 if k == 0 else 2,
            with_stem=k == 0,
            dtype=dtype,
        )
        for k, n in enumerate(units)
    )
    return BlockNet(name, blocks, ClassifierHead(num_classes, dtype))


_SPECS = {
    "imagenet_resnet18": (BasicBlock, 1, (2, 2, 2, 2)),
    "imagenet_resnet34": (BasicBlock, 1, (3, 4, 6, 3)),
    "imagenet_resnet50": (bottleneck.Bottleneck, bottleneck.EXPANSION, (3, 4, 6, 3)),
}

MODELS = {
    name: functools.partial(imagenet_resnet, unit, expansion, units, name=name)
    for name, (unit, expansion, units) in _SPECS.items()
}
