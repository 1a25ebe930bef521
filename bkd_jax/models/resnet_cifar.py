"""mdistiller's CIFAR ResNets (resnet8..110, resnet8x4, resnet32x4) as BlockNets.

Three stages at 32, 16 and 8 pixels; the stem (conv1, bn1) is folded into block 1.
Submodules carry the names of PyTorch's state-dict paths (`layer1.0.downsample.0` ->
`layer1_0/downsample_0`), which is what lets `bkd_jax.convert` map weights generically.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blockwise import BlockNet
from bkd_jax.models.layers import ClassifierHead, batch_norm, conv


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; output after the final ReLU."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        out = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = conv(self.planes, 3, dtype=self.dtype, name="conv2")(out)
        out = batch_norm(train, dtype=self.dtype, name="bn2")(out)
        if self.downsample:
            x = conv(self.planes, 1, self.stride, dtype=self.dtype, name="downsample_0")(x)
            x = batch_norm(train, dtype=self.dtype, name="downsample_1")(x)
        return nn.relu(out + x)


class Stage(nn.Module):
    """One `layerK` of the ResNet, optionally preceded by the stem."""

    index: int  # K in layerK
    in_planes: int
    planes: int
    num_units: int
    stride: int
    with_stem: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.with_stem:
            x = conv(self.in_planes, 3, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        for u in range(self.num_units):
            stride = self.stride if u == 0 else 1
            downsample = u == 0 and (stride != 1 or self.in_planes != self.planes)
            x = BasicBlock(
                self.planes, stride, downsample, self.dtype, name=f"layer{self.index}_{u}"
            )(x, train)
        return x


def cifar_resnet(
    depth: int,
    filters: tuple[int, int, int, int],
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    name: str,
) -> BlockNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6k+2, got {depth}")
    units = (depth - 2) // 6
    in_planes = (filters[0], filters[1], filters[2])
    blocks = tuple(
        Stage(
            k + 1,
            in_planes[k],
            filters[k + 1],
            units,
            1 if k == 0 else 2,
            with_stem=k == 0,
            dtype=dtype,
        )
        for k in range(3)
    )
    return BlockNet(name, blocks, ClassifierHead(num_classes, dtype))


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
    name: functools.partial(cifar_resnet, depth, filters, name=name)
    for name, (depth, filters) in _SPECS.items()
}
