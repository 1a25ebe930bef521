"""mdistiller's pre-activation Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Three blocks, one per group (`block1`..`block3`, at 32, 16 and 8 pixels); the stem
convolution is folded into block 1. The units are pre-activation, so block outputs are
sums of a residual and a convolution, not ReLU outputs (`post_activation=False`): the
final BatchNorm and ReLU belong to the head, before pooling and the classifier. No
dropout (mdistiller's dropRate is 0). Submodules carry the names of the PyTorch
state-dict paths (`block2.layer.0.convShortcut` -> `block2/layer_0/convShortcut`).

Taps, as mdistiller's `cifar/wrn.py` returns them: `stem` is the stem convolution's
output. A block ends without a ReLU, and mdistiller's pre-activation of block K is its
output normalised by the BatchNorm that opens what follows (block K+1's first `bn1`, or
the final `bn1`), without the ReLU; that BatchNorm belongs to the next part, which
records it as `input_preact`. `pooled` is the average of the final BN-ReLU output.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blocknet import INPUT_PREACT, POOLED, STEM, BlockNet, tap
from bkd_jax.models.layers import batch_norm, conv

STEM_CHANNELS = 16


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the input.

    When the width changes, a 1x1 `convShortcut` projects the *activated* input, as in the
    reference implementation; otherwise the raw input is added. Returns the output and
    the normalised input `bn1(x)` (before the ReLU).
    """

    planes: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        normalised = batch_norm(train, dtype=self.dtype, name="bn1")(x)
        act = nn.relu(normalised)
        out = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv1")(act)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(out))
        out = conv(self.planes, 3, dtype=self.dtype, name="conv2")(out)
        if x.shape[-1] != self.planes:
            x = conv(self.planes, 1, self.stride, dtype=self.dtype, name="convShortcut")(act)
        return out + x, normalised


class NetworkBlock(nn.Module):
    """mdistiller's `NetworkBlock`: units named `layer_u`, the first one strided.

    Returns the output and the first unit's normalised input.
    """

    planes: int
    num_units: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        units = [
            WideBasicBlock(self.planes, self.stride if u == 0 else 1, self.dtype, name=f"layer_{u}")
            for u in range(self.num_units)
        ]
        x, normalised_input = units[0](x, train)
        for unit in units[1:]:
            x, _ = unit(x, train)
        return x, normalised_input


class Group(nn.Module):
    """Block-KD block K: PyTorch's `blockK`, optionally preceded by the stem `conv1`."""

    index: int  # K in blockK
    planes: int
    num_units: int
    stride: int
    with_stem: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.with_stem:
            x = conv(STEM_CHANNELS, 3, dtype=self.dtype, name="conv1")(x)
            tap(self, STEM, x)
        group = NetworkBlock(
            self.planes, self.num_units, self.stride, self.dtype, name=f"block{self.index}"
        )
        x, normalised_input = group(x, train)
        if not self.with_stem:
            tap(self, INPUT_PREACT, normalised_input)
        return x


class PreActHead(nn.Module):
    """The final BatchNorm and ReLU, global average pooling and the classifier `fc`."""

    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = batch_norm(train, dtype=self.dtype, name="bn1")(x)
        tap(self, INPUT_PREACT, x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        tap(self, POOLED, x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def wide_resnet(
    depth: int, widen: int, num_classes: int, dtype: jnp.dtype = jnp.float32, *, name: str
) -> BlockNet:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6k+4, got {depth}")
    units = (depth - 4) // 6
    blocks = tuple(
        Group(
            k + 1,
            STEM_CHANNELS * widen * 2**k,
            units,
            1 if k == 0 else 2,
            with_stem=k == 0,
            dtype=dtype,
        )
        for k in range(3)
    )
    return BlockNet(name, blocks, PreActHead(num_classes, dtype), post_activation=False)


_SPECS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}

MODELS = {
    name: functools.partial(wide_resnet, depth, widen, name=name)
    for name, (depth, widen) in _SPECS.items()
}
