"""mdistiller's ImageNet MobileNetV1 as a BlockNet.

PyTorch holds the network as one `nn.Sequential` called `model`: `model.0` is a full 3x3
convolution (conv, bn, relu), `model.1`..`model.13` are depthwise-separable units (3x3
depthwise conv, bn, relu at indices 0-2; 1x1 pointwise conv, bn, relu at 3-5). The four
blocks are the four resolutions of a 224-pixel input and end after `model.3` (56 px),
`model.5` (28 px), `model.11` (14 px) and `model.13` (7 px), the cuts at which mdistiller
takes its features. mdistiller pools with `AvgPool2d(7)`; the head here pools globally,
which is the same at 224 pixels and also runs on small test images.
Submodules are named after the state-dict paths (`model.1.3` -> `model_1_3`).

Taps, as mdistiller's `imagenet/mobilenetv1.py` returns them: a block's `preact` is its
last pointwise BatchNorm output before the ReLU. mdistiller's `feats` hold only the four
blocks, no stem; the `stem` tap here is `model.0`'s ReLU output (112 px at 224), where
the ImageNet ResNets tap theirs.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blocknet import PREACT, STEM, BlockNet, tap
from bkd_jax.models.layers import ClassifierHead, batch_norm, conv

# Output channels and stride of model.0 .. model.13.
CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
STRIDES = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
# One past the last `model` index of each block.
CUTS = (4, 6, 12, 14)


def _conv_bn(
    x: jnp.ndarray,
    features: int,
    kernel: int,
    stride: int,
    *,
    groups: int = 1,
    train: bool,
    dtype: jnp.dtype,
    names: tuple[str, str],
) -> jnp.ndarray:
    x = conv(features, kernel, stride, groups=groups, dtype=dtype, name=names[0])(x)
    return batch_norm(train, dtype=dtype, name=names[1])(x)


class Stage(nn.Module):
    """`model.start` .. `model.stop-1`; `model.0` is the full convolution, the rest separable."""

    start: int
    stop: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        layer = functools.partial(_conv_bn, train=train, dtype=self.dtype)
        for i in range(self.start, self.stop):
            features, stride = CHANNELS[i], STRIDES[i]
            if i == 0:
                x = nn.relu(layer(x, features, 3, stride, names=("model_0_0", "model_0_1")))
                tap(self, STEM, x)
            else:
                channels = x.shape[-1]
                names = (f"model_{i}_0", f"model_{i}_1")
                x = nn.relu(layer(x, channels, 3, stride, groups=channels, names=names))
                preact = layer(x, features, 1, 1, names=(f"model_{i}_3", f"model_{i}_4"))
                x = nn.relu(preact)
        tap(self, PREACT, preact)
        return x


def mobilenetv1(num_classes: int, dtype: jnp.dtype = jnp.float32) -> BlockNet:
    """MobileNetV1 with a `num_classes`-way classifier, as four blocks and a head."""
    starts = (0, *CUTS[:-1])
    blocks = tuple(Stage(a, b, dtype) for a, b in zip(starts, CUTS, strict=True))
    return BlockNet("imagenet_mobilenetv1", blocks, ClassifierHead(num_classes, dtype))


MODELS = {"imagenet_mobilenetv1": mobilenetv1}
