"""ResNet v1 building blocks shared by the CIFAR and ImageNet ResNets.

`BasicBlock` (two 3x3 convolutions) and `Bottleneck` (1x1 reduce, 3x3 carrying the
stride, 1x1 expand by 4; ResNet v1.5) add a projection (1x1 convolution and BatchNorm) on
the residual path when the shape changes and end in a ReLU, so block outputs are
post-activation. `Stage` is one `layerK` of units, with the stem folded in for block 1.
PyTorch names the projection `downsample` (torchvision, mdistiller's CIFAR ResNets) or
`shortcut` (mdistiller's CIFAR ResNet50); `shortcut_name` follows, as weight conversion
requires.

Taps, as mdistiller's ResNets (`cifar/resnet.py`, `cifar/resnetv2.py`,
`imagenet/resnet.py`) return them: `stem` is the stem's ReLU output (before the ImageNet
stem's max-pool), a stage's `preact` is its last unit's residual sum before the ReLU.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blocknet import PREACT, STEM, tap
from bkd_jax.models.layers import batch_norm, conv, max_pool


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; `planes` output channels."""

    expansion = 1

    planes: int
    stride: int = 1
    downsample: bool = False
    shortcut_name: str = "downsample"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The output and its pre-activation (the residual sum before the ReLU)."""
        out = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = conv(self.planes, 3, dtype=self.dtype, name="conv2")(out)
        out = batch_norm(train, dtype=self.dtype, name="bn2")(out)
        preact = out + _shortcut(self, x, train)
        return nn.relu(preact), preact


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 convolutions with a residual; `4 * planes` channels."""

    expansion = 4

    planes: int
    stride: int = 1
    downsample: bool = False
    shortcut_name: str = "downsample"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The output and its pre-activation (the residual sum before the ReLU)."""
        out = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(out))
        out = conv(self.expansion * self.planes, 1, dtype=self.dtype, name="conv3")(out)
        out = batch_norm(train, dtype=self.dtype, name="bn3")(out)
        preact = out + _shortcut(self, x, train)
        return nn.relu(preact), preact


def _shortcut(unit: BasicBlock | Bottleneck, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """The residual path of `unit`: identity, or its 1x1 projection and BatchNorm."""
    if not unit.downsample:
        return x
    name, dtype = unit.shortcut_name, unit.dtype
    x = conv(unit.expansion * unit.planes, 1, unit.stride, dtype=dtype, name=f"{name}_0")(x)
    return batch_norm(train, dtype=dtype, name=f"{name}_1")(x)


class Stage(nn.Module):
    """`layerK`: `num_units` units, the first strided; block 1 runs the stem first.

    Stems: "cifar" is a 3x3 convolution, BatchNorm and ReLU; "imagenet" a 7x7/2
    convolution, BatchNorm, ReLU and a 3x3/2 max-pool.
    """

    index: int  # K in layerK
    unit: type[BasicBlock] | type[Bottleneck]
    planes: int
    num_units: int
    stride: int
    stem: str | None = None
    stem_channels: int = 64
    shortcut_name: str = "downsample"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.stem == "cifar":
            x = conv(self.stem_channels, 3, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
            tap(self, STEM, x)
        elif self.stem == "imagenet":
            x = conv(self.stem_channels, 7, 2, padding=3, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
            tap(self, STEM, x)
            x = max_pool(x, 3, 2, padding=1)
        for u in range(self.num_units):
            stride = self.stride if u == 0 else 1
            downsample = u == 0 and (
                stride != 1 or x.shape[-1] != self.unit.expansion * self.planes
            )
            x, preact = self.unit(
                self.planes, stride, downsample, self.shortcut_name, self.dtype,
                name=f"layer{self.index}_{u}",
            )(x, train)  # fmt: skip
        tap(self, PREACT, preact)
        return x
