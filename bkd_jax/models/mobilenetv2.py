"""mdistiller's CIFAR MobileNetV2 (`mobile_half`: expansion 6, width 0.5) as a BlockNet.

The stem convolution has stride 2, so on 32-pixel input the network runs at 16, 8, 4
and 2 pixels. Its seven inverted-residual groups (`blocks[0..6]`) are cut where
mdistiller taps features (after groups 1, 2, 4 and 6), giving four blocks, one per
resolution; the stem is folded into block 1:

    block 1 = conv1 + blocks[0..1]     16 px, 12 ch
    block 2 = blocks[2]                 8 px, 16 ch
    block 3 = blocks[3..4]              4 px, 48 ch
    block 4 = blocks[5..6]              2 px, 160 ch
    head    = conv2 (1x1, BN, ReLU) + global average pool + classifier

mdistiller pools with `AvgPool2d(2, ceil_mode=True)`, which on the 2x2 map of 32-pixel
input is the global average used here. Submodules carry the PyTorch state-dict paths
(`blocks.3.0.conv.6` -> `blocks_3_0/conv_6`).

Taps, as mdistiller's `cifar/mobilenetv2.py` returns them: `stem` is conv1's ReLU
output, `pooled` the pooled conv2 output. mdistiller returns no `preact_feats` for this
network: its blocks end in the linear projection (plus the residual), with no ReLU to
come before, so a block's `preact` is its output itself.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blocknet import POOLED, PREACT, STEM, BlockNet, tap
from bkd_jax.models.layers import batch_norm, conv

# (expand, channels, units, stride) of each group, before width scaling; None = the
# network's expansion ratio.
GROUPS = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
STAGES = ((0, 1), (2,), (3, 4), (5, 6))  # groups per Block-KD block
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def _conv_bn(
    x: jnp.ndarray,
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    groups: int = 1,
    train: bool,
    dtype: jnp.dtype,
    prefix: str,
    index: int,
) -> jnp.ndarray:
    """PyTorch's `prefix.index` convolution and `prefix.(index+1)` BatchNorm."""
    x = conv(features, kernel, stride, groups=groups, dtype=dtype, name=f"{prefix}_{index}")(x)
    return batch_norm(train, dtype=dtype, name=f"{prefix}_{index + 1}")(x)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (strided), linear 1x1 projection; residual if shapes match."""

    features: int
    stride: int
    expansion: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        layer = functools.partial(_conv_bn, train=train, dtype=self.dtype, prefix="conv")
        hidden = x.shape[-1] * self.expansion
        h = nn.relu(layer(x, hidden, 1, index=0))
        h = nn.relu(layer(h, hidden, 3, self.stride, groups=hidden, index=3))
        h = layer(h, self.features, 1, index=6)
        return x + h if self.stride == 1 and x.shape[-1] == self.features else h


class Stage(nn.Module):
    """The groups `blocks[g]` for g in `groups`, optionally preceded by the stem `conv1`."""

    groups: tuple[int, ...]
    expansion: int
    width: float
    with_stem: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.with_stem:
            stem = int(STEM_CHANNELS * self.width)
            x = nn.relu(
                _conv_bn(x, stem, 3, 2, train=train, dtype=self.dtype, prefix="conv1", index=0)
            )
            tap(self, STEM, x)
        for g in self.groups:
            expand, channels, units, stride = GROUPS[g]
            for u in range(units):
                x = InvertedResidual(
                    int(channels * self.width),
                    stride if u == 0 else 1,
                    expand or self.expansion,
                    self.dtype,
                    name=f"blocks_{g}_{u}",
                )(x, train)
        tap(self, PREACT, x)
        return x


class Head(nn.Module):
    """`conv2` (1x1 convolution, BN, ReLU), global average pooling, `classifier.0`."""

    num_classes: int
    features: int = LAST_CHANNELS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = _conv_bn(x, self.features, 1, train=train, dtype=self.dtype, prefix="conv2", index=0)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        tap(self, POOLED, x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier_0")(x)


def mobilenetv2(
    expansion: int,
    width: float,
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    name: str,
) -> BlockNet:
    blocks = tuple(
        Stage(groups, expansion, width, with_stem=k == 0, dtype=dtype)
        for k, groups in enumerate(STAGES)
    )
    head = Head(num_classes, int(LAST_CHANNELS * max(width, 1.0)), dtype)  # as mdistiller
    # Inverted residuals end in a linear projection (no ReLU), so block outputs take
    # negative values: a connector feeding the next block must not end in a ReLU.
    return BlockNet(name, blocks, head, post_activation=False)


MODELS = {"mobilenetv2": functools.partial(mobilenetv2, 6, 0.5, name="mobilenetv2")}
