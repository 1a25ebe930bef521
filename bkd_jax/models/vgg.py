"""mdistiller's CIFAR VGGs with BatchNorm (vgg8, vgg13) as BlockNets.

Five blocks, one per convolution group (mdistiller's `block0`..`block4`). mdistiller
applies a ReLU after every group and max-pools between groups (`pool0`..`pool2`; `pool3`
only for 64-pixel input, which this zoo does not serve). Each Block-KD block therefore
*starts* with the pool that precedes its group and ends with the group's ReLU:

    block 1 = block0 + ReLU                      32 px,  64 ch
    block 2 = pool0 + block1 + ReLU              16 px, 128 ch
    block 3 = pool1 + block2 + ReLU               8 px, 256 ch
    block 4 = pool2 + block3 + ReLU               4 px, 512 ch
    block 5 = block4 + ReLU                       4 px, 512 ch
    head    = pool4 (global average) + classifier

so block outputs are exactly mdistiller's feature taps f0..f4, post-activation.

Taps, as mdistiller's `cifar/vgg.py` returns them: `block0` is the stem, so block 1's
output is the `stem` tap and the native blocks are blocks 2..5 (f1..f4), whose `preact`
is the group's last BatchNorm output before the ReLU. `pooled` is pool4's output. Within a
group, PyTorch's `Sequential` holds (conv, BN, ReLU) triples: layer j of group K is
`blockK_{3j}` (convolution, with bias) and `blockK_{3j+1}` (BatchNorm).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blocknet import PREACT, STEM, BlockNet, tap
from bkd_jax.models.layers import ClassifierHead, batch_norm, conv, max_pool


class ConvGroup(nn.Module):
    """mdistiller's `block{index}`, after a 2x2 max-pool when `pool_first`; `block0` is the stem."""

    index: int
    widths: tuple[int, ...]
    pool_first: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.pool_first:
            x = max_pool(x, 2, 2)
        for j, width in enumerate(self.widths):
            name = f"block{self.index}_{3 * j}"
            x = conv(width, 3, bias=True, dtype=self.dtype, name=name)(x)
            x = batch_norm(train, dtype=self.dtype, name=f"block{self.index}_{3 * j + 1}")(x)
            preact, x = x, nn.relu(x)
        if self.index == 0:
            tap(self, STEM, x)
        else:
            tap(self, PREACT, preact)
        return x


def vgg(
    widths: tuple[tuple[int, ...], ...],
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    name: str,
) -> BlockNet:
    blocks = tuple(
        ConvGroup(k, group, pool_first=k in (1, 2, 3), dtype=dtype)
        for k, group in enumerate(widths)
    )
    return BlockNet(name, blocks, ClassifierHead(num_classes, dtype, fc_name="classifier"))


_SPECS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),  # mdistiller's cfg "S"
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # cfg "B"
}

MODELS = {name: functools.partial(vgg, widths, name=name) for name, widths in _SPECS.items()}
