"""mdistiller's CIFAR ResNet50 (`resnetv2.ResNet50`) as a BlockNet.

The ImageNet ResNet50's bottleneck stages on a CIFAR stem: one 3x3 stride-1 convolution,
BatchNorm and ReLU, no max-pool, so the four blocks (one per `layerK`, stem folded into
block 1) run at 32, 16, 8 and 4 pixels with 256, 512, 1024 and 2048 channels. Block
outputs are post-ReLU. mdistiller names the projection `shortcut` and the classifier
`linear`; the Flax names follow, as weight conversion requires.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blockwise import BlockNet
from bkd_jax.models.bottleneck import EXPANSION, Bottleneck
from bkd_jax.models.layers import ClassifierHead, batch_norm, conv

STEM_CHANNELS = 64
UNITS = (3, 4, 6, 3)


class Stage(nn.Module):
    """One `layerK` of bottlenecks, optionally preceded by the stem."""

    index: int  # K in layerK
    planes: int
    num_units: int
    stride: int
    with_stem: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.with_stem:
            x = conv(STEM_CHANNELS, 3, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        for u in range(self.num_units):
            stride = self.stride if u == 0 else 1
            downsample = stride != 1 or x.shape[-1] != EXPANSION * self.planes
            x = Bottleneck(
                self.planes,
                stride,
                downsample,
                self.dtype,
                shortcut_name="shortcut",
                name=f"layer{self.index}_{u}",
            )(x, train)
        return x


def cifar_resnet50(num_classes: int, dtype: jnp.dtype = jnp.float32, *, name: str) -> BlockNet:
    blocks = tuple(
        Stage(k + 1, STEM_CHANNELS * 2**k, n, 1 if k == 0 else 2, with_stem=k == 0, dtype=dtype)
        for k, n in enumerate(UNITS)
    )
    return BlockNet(name, blocks, ClassifierHead(num_classes, dtype, fc_name="linear"))


MODELS = {"resnet50": functools.partial(cifar_resnet50, name="resnet50")}
