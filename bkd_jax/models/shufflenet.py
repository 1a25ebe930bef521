"""mdistiller's CIFAR ShuffleNetV1 (groups 3) and ShuffleNetV2 (1.0x) as BlockNets.

Both start with a 1x1 stem (conv1, bn1) at full resolution, folded into block 1, then three
stages whose first unit halves the resolution (32 -> 16 -> 8 -> 4 pixels); each stage is one
block. Every unit ends in a ReLU (V1: ReLU of the residual sum or concatenation; V2: the
concatenation of the previous unit's output with a ReLU branch, then a channel shuffle), so
block outputs are post-activation. ShuffleNetV2's final 1x1 convolution (conv2, bn2) comes
after the last stage and belongs to the head.

Submodules carry the names of PyTorch's state-dict paths (`layer2.0.conv1` ->
`layer2_0/conv1`), which is what lets `bkd_jax.convert` map weights generically.

Taps, as mdistiller's `cifar/ShuffleNetv1.py` and `ShuffleNetv2.py` return them: `stem`
is the stem's ReLU output and a stage's `preact` is its last unit's before the ReLU: V1's
residual sum (or concatenation); V2's concatenation of the untouched half with the
branch's last BatchNorm output, taken *before* the channel shuffle, so its channels are
in a different order from the block output's. `pooled` is the pooled last feature map
(after conv2 for V2).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blocknet import PREACT, STEM, BlockNet, tap
from bkd_jax.models.layers import ClassifierHead, avg_pool, batch_norm, conv

STEM_CHANNELS = 24


def channel_shuffle(x: jnp.ndarray, groups: int) -> jnp.ndarray:
    """PyTorch's `view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)` on NHWC: channel
    `i * C/g + j` moves to `j * g + i`."""
    *lead, channels = x.shape
    x = x.reshape(*lead, groups, channels // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


def conv_bn(
    x: jnp.ndarray,
    features: int,
    kernel: int,
    train: bool,
    *,
    index: int,
    stride: int = 1,
    groups: int = 1,
    dtype: jnp.dtype = jnp.float32,
) -> jnp.ndarray:
    """`bn{index}(conv{index}(x))`, created in the calling module's scope."""
    x = conv(features, kernel, stride, groups=groups, dtype=dtype, name=f"conv{index}")(x)
    return batch_norm(train, dtype=dtype, name=f"bn{index}")(x)


def depthwise_bn(
    x: jnp.ndarray, train: bool, *, index: int, stride: int = 1, dtype: jnp.dtype = jnp.float32
) -> jnp.ndarray:
    """A 3x3 depthwise `conv{index}` and `bn{index}`."""
    channels = x.shape[-1]
    return conv_bn(x, channels, 3, train, index=index, stride=stride, groups=channels, dtype=dtype)


def stem(x: jnp.ndarray, train: bool, dtype: jnp.dtype) -> jnp.ndarray:
    """The 1x1 stem both networks share: ReLU(bn1(conv1(x)))."""
    return nn.relu(conv_bn(x, STEM_CHANNELS, 1, train, index=1, dtype=dtype))


class Bottleneck(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1, shuffle, depthwise 3x3, grouped 1x1.

    With stride 2 the shortcut is a 3x3 average pool concatenated after the branch
    (`features` then counts only the branch's channels), otherwise it is added. Returns
    the output and its pre-activation (before the final ReLU).
    """

    features: int
    stride: int
    groups: int
    input_groups: int  # groups of conv1; 1 on the narrow stem output
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        mid = self.features // 4
        out = conv_bn(x, mid, 1, train, index=1, groups=self.input_groups, dtype=self.dtype)
        out = channel_shuffle(nn.relu(out), self.input_groups)
        out = nn.relu(depthwise_bn(out, train, index=2, stride=self.stride, dtype=self.dtype))
        out = conv_bn(out, self.features, 1, train, index=3, groups=self.groups, dtype=self.dtype)
        if self.stride == 2:
            preact = jnp.concatenate([out, avg_pool(x, 3, 2, padding=1)], axis=-1)
        else:
            preact = out + x
        return nn.relu(preact), preact


class ShuffleV1Stage(nn.Module):
    """One `layerK` of ShuffleNetV1, optionally preceded by the stem."""

    index: int  # K in layerK
    in_planes: int
    out_planes: int
    num_units: int
    groups: int
    with_stem: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.with_stem:
            x = stem(x, train, self.dtype)
            tap(self, STEM, x)
        for u in range(self.num_units):
            first = u == 0
            x, preact = Bottleneck(
                self.out_planes - self.in_planes if first else self.out_planes,
                stride=2 if first else 1,
                groups=self.groups,
                input_groups=1 if first and self.with_stem else self.groups,
                dtype=self.dtype,
                name=f"layer{self.index}_{u}",
            )(x, train)
        tap(self, PREACT, preact)
        return x


class DownBlock(nn.Module):
    """ShuffleNetV2 stride-2 unit: two strided branches, concatenated and shuffled."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        mid = self.features // 2
        left = depthwise_bn(x, train, index=1, stride=2, dtype=self.dtype)
        left = nn.relu(conv_bn(left, mid, 1, train, index=2, dtype=self.dtype))
        right = nn.relu(conv_bn(x, mid, 1, train, index=3, dtype=self.dtype))
        right = depthwise_bn(right, train, index=4, stride=2, dtype=self.dtype)
        right = nn.relu(conv_bn(right, mid, 1, train, index=5, dtype=self.dtype))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class BasicBlock(nn.Module):
    """ShuffleNetV2 unit: split channels, transform the second half, concat, shuffle.

    Returns the output and the two halves of its pre-activation: the untouched half and
    the branch's last BatchNorm output (before its ReLU).
    """

    split_ratio: float = 0.5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False
    ) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
        c = int(x.shape[-1] * self.split_ratio)
        x1, x2 = x[..., :c], x[..., c:]
        out = nn.relu(conv_bn(x2, c, 1, train, index=1, dtype=self.dtype))
        out = depthwise_bn(out, train, index=2, dtype=self.dtype)
        out = conv_bn(out, c, 1, train, index=3, dtype=self.dtype)
        return channel_shuffle(jnp.concatenate([x1, nn.relu(out)], axis=-1), 2), (x1, out)


class ShuffleV2Stage(nn.Module):
    """One `layerK` of ShuffleNetV2: a DownBlock and `num_units` BasicBlocks."""

    index: int  # K in layerK
    out_channels: int
    num_units: int
    with_stem: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.with_stem:
            x = stem(x, train, self.dtype)
            tap(self, STEM, x)
        x = DownBlock(self.out_channels, self.dtype, name=f"layer{self.index}_0")(x, train)
        for u in range(1, self.num_units + 1):
            x, halves = BasicBlock(dtype=self.dtype, name=f"layer{self.index}_{u}")(x, train)
        # The last unit's pre-activation, unshuffled (mdistiller's `preact`).
        tap(self, PREACT, lambda: jnp.concatenate(halves, axis=-1))
        return x


class ConvClassifierHead(ClassifierHead):
    """ShuffleNetV2's head: ReLU(bn2(conv2(x))), then pooling and the classifier."""

    features: int = 1024

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.relu(conv_bn(x, self.features, 1, train, index=2, dtype=self.dtype))
        return super().__call__(x, train)


def shufflenet_v1(
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    out_planes: tuple[int, int, int] = (240, 480, 960),
    num_units: tuple[int, int, int] = (4, 8, 4),
    groups: int = 3,
    name: str = "shufflenetv1",
) -> BlockNet:
    in_planes = (STEM_CHANNELS, *out_planes[:2])
    blocks = tuple(
        ShuffleV1Stage(
            k + 1, in_planes[k], out_planes[k], num_units[k], groups, with_stem=k == 0, dtype=dtype
        )
        for k in range(3)
    )
    return BlockNet(name, blocks, ClassifierHead(num_classes, dtype, fc_name="linear"))


def shufflenet_v2(
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
    num_units: tuple[int, int, int] = (3, 7, 3),
    name: str = "shufflenetv2",
) -> BlockNet:
    blocks = tuple(
        ShuffleV2Stage(k + 1, out_channels[k], num_units[k], with_stem=k == 0, dtype=dtype)
        for k in range(3)
    )
    head = ConvClassifierHead(num_classes, dtype, fc_name="linear", features=out_channels[3])
    return BlockNet(name, blocks, head)


MODELS = {"shufflenetv1": shufflenet_v1, "shufflenetv2": shufflenet_v2}
