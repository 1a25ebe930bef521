"""Layers shared by the model zoo, configured to match PyTorch layer for layer.

Convolutions take explicit symmetric padding (PyTorch's `padding=k//2`), not 'SAME',
which pads strided convolutions asymmetrically and would break weight conversion.
BatchNorm uses PyTorch's momentum 0.1 (Flax's 0.9) and epsilon 1e-5.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.blocknet import POOLED, tap
from bkd_jax.models import cpu_conv

# He initialisation with fan-out, as torchvision and mdistiller initialise convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    padding: int | None = None,
    groups: int = 1,
    bias: bool = False,
    dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A square convolution with PyTorch's padding (default `kernel // 2`), its weight
    gradient batch-chunked on a CPU backend (`cpu_conv`)."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=bias,
        dtype=dtype,
        kernel_init=conv_init,
        conv_general_dilated=cpu_conv.conv_general_dilated,
        name=name,
    )


def batch_norm(train: bool, *, dtype: jnp.dtype = jnp.float32, name: str | None = None):
    """BatchNorm with PyTorch's defaults; batch statistics only when `train`."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), (stride, stride), padding=pad)


def avg_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
    """PyTorch AvgPool2d semantics (zero padding counted in the average)."""
    pad = ((padding, padding), (padding, padding))
    return nn.avg_pool(x, (window, window), (stride, stride), padding=pad, count_include_pad=True)


class ClassifierHead(nn.Module):
    """Global average pooling (the `pooled` tap) and a linear classifier (PyTorch's `fc`)."""

    num_classes: int
    dtype: jnp.dtype = jnp.float32
    fc_name: str = "fc"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train
        x = jnp.mean(x, axis=(1, 2))
        tap(self, POOLED, x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name=self.fc_name)(x)
