"""Layers shared by the model zoo, configured to match PyTorch layer for layer.

Convolutions take explicit symmetric padding (PyTorch's `padding=k//2`), not 'SAME',
which pads strided convolutions asymmetrically and would break weight conversion.
BatchNorm is PyTorch's BatchNorm2d: momentum 0.1 (Flax's 0.9), epsilon 1e-5, and running
variance updated with the unbiased batch variance (Flax uses the biased one).
"""

from __future__ import annotations

import flax.linen as nn
import jax
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


class BatchNorm(nn.Module):
    """BatchNorm over the last axis that trains as PyTorch's BatchNorm2d.

    Normalises with the biased batch variance and updates the running variance with the
    unbiased one (times n / (n - 1), n the values per channel), as `torch.nn.BatchNorm2d`
    does; Flax's `nn.BatchNorm` uses the biased variance for both, so running statistics of
    converted teachers and recipes written for PyTorch would drift by n / (n - 1). Variables
    and their names are Flax's (`scale`, `bias`; `batch_stats` `mean`, `var`), and the
    statistics are Flax's float32 one-pass E[x^2] - E[x]^2.
    """

    use_running_average: bool
    momentum: float = 0.1  # PyTorch's weight of the new batch statistic
    epsilon: float = 1e-5  # PyTorch's
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
        )
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            values = jnp.asarray(x, jnp.promote_types(jnp.float32, x.dtype))
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(values, axes)
            var = jnp.maximum(0.0, jnp.mean(values * values, axes) - mean * mean)
            if not self.is_initializing():
                count = x.size // features
                if count < 2:
                    raise ValueError(
                        f"BatchNorm: training needs more than 1 value per channel, got input "
                        f"of shape {x.shape} (PyTorch refuses it too)."
                    )
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                unbiased = var * (count / (count - 1))
                running_var.value = (1 - m) * running_var.value + m * unbiased
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return jnp.asarray(y, self.dtype)


def batch_norm(train: bool, *, dtype: jnp.dtype = jnp.float32, name: str | None = None):
    """PyTorch's BatchNorm2d (see `BatchNorm`); batch statistics only when `train`."""
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


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
