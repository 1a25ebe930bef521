"""The zoo's convolution on XLA:CPU: XLA's forward and input gradient, and a faster
weight gradient where XLA:CPU's is slow.

XLA:CPU's weight-gradient convolution, which contracts over batch and pixels, is its slow
pass, and slowest on 1x1 and depthwise kernels: there it runs at a few GFLOP/s
(BENCHMARKS.md, "Convolution passes on XLA:CPU"). On a CPU backend the zoo's convolution
with such a kernel is a `jax.custom_vjp` whose forward and input gradient are XLA's own
and whose weight gradient is computed tap by tap: for each kernel position, the input
window it sees contracted with the output gradient, a matrix product for 1x1 kernels
(grouped or not) and a per-channel product for depthwise ones. The parameters and the
numbers are those of `lax.conv_general_dilated` to float32 rounding.

Other kernels (3x3 and 7x7 with full or grouped channels) keep XLA's passes on every
backend: im2col matrix products, per-tap products and weight gradients summed over batch
chunks were measured for them and did not beat XLA's kernels in a whole sharded train
step (`benchmarks/conv_kernels.py`, BENCHMARKS.md). GPUs and TPUs keep XLA's convolution
untouched.

The path is chosen when a function is traced, from the default backend's platform name;
`xla_convolutions()` forces XLA's own passes while tracing (tests, comparisons).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_CHANNELS_LAST = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

Conv = Callable[[jax.Array, jax.Array], jax.Array]
WeightGrad = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

_state = threading.local()


def uses_cpu_passes(platform: str) -> bool:
    """Whether convolutions traced for backend `platform` ("cpu", "gpu", "tpu", ...) take
    this module's weight gradients: only XLA:CPU's weight-gradient kernels gain."""
    return platform == "cpu"


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within this context, convolutions traced are `lax.conv_general_dilated` as is."""
    previous = getattr(_state, "xla_only", False)
    _state.xla_only = True
    try:
        yield
    finally:
        _state.xla_only = previous


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: lax.ConvDimensionNumbers | None = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """`lax.conv_general_dilated`, with this module's weight gradient on a CPU backend.

    Takes the arguments of `lax.conv_general_dilated` (Flax's `nn.Conv` passes them
    through its `conv_general_dilated` attribute). The CPU path covers 2-D channels-last
    convolutions (NHWC input, HWIO kernel) without dilation; anything else, and every
    convolution on other backends, is XLA's.
    """
    conv = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if (
        getattr(_state, "xla_only", False)
        or not uses_cpu_passes(jax.default_backend())
        or not has_tap_weight_gradient(rhs.shape, feature_group_count)
        or lhs.ndim != 4
        or isinstance(padding, str)
        or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        or batch_group_count != 1
        or preferred_element_type is not None
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _CHANNELS_LAST
    ):
        return conv(lhs, rhs)
    weight_grad = functools.partial(
        _weight_grad_by_taps,
        strides=tuple(window_strides),
        padding=tuple(map(tuple, padding)),
        groups=feature_group_count,
        precision=precision,
    )
    return _with_weight_gradient(conv, weight_grad)(lhs, rhs)


def has_tap_weight_gradient(kernel_shape: Sequence[int], groups: int) -> bool:
    """Whether a kernel (HWIO shape, `groups` feature groups) takes the tap-by-tap weight
    gradient on CPU: 1x1 kernels, grouped or not, and depthwise kernels of any size."""
    height, width, group_in, out = kernel_shape
    return (height, width) == (1, 1) or (group_in == 1 and out == groups)


def _with_weight_gradient(conv: Conv, weight_grad: WeightGrad) -> Conv:
    """`conv` with XLA's forward and input gradient and `weight_grad` as weight gradient."""

    @jax.custom_vjp
    def convolution(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return conv(lhs, rhs)

    def forward(lhs: jax.Array, rhs: jax.Array):
        return conv(lhs, rhs), (lhs, rhs)

    def backward(residuals, out_grad: jax.Array):
        lhs, rhs = residuals
        lhs_grad = jax.vjp(lambda x: conv(x, rhs), lhs)[1](out_grad)[0]
        return lhs_grad, weight_grad(lhs, rhs, out_grad)

    convolution.defvjp(forward, backward)
    return convolution


def _weight_grad_by_taps(
    lhs: jax.Array,
    rhs: jax.Array,
    out_grad: jax.Array,
    *,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], ...],
    groups: int,
    precision: lax.PrecisionLike,
) -> jax.Array:
    """The weight gradient tap by tap: for each kernel position, the input window it sees
    (shifted, strided) contracted with the output gradient over batch and pixels."""
    height, width, group_in, out = rhs.shape
    batch, out_h, out_w, _ = out_grad.shape
    padded = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    grads = out_grad.reshape(batch, out_h, out_w, groups, out // groups)
    depthwise = group_in == 1 and out == groups
    accumulate = jnp.promote_types(lhs.dtype, jnp.float32)  # bfloat16 sums in float32
    taps = []
    for i in range(height):
        for j in range(width):
            window = lax.slice(
                padded,
                (0, i, j, 0),
                (
                    batch,
                    i + strides[0] * (out_h - 1) + 1,
                    j + strides[1] * (out_w - 1) + 1,
                    lhs.shape[3],
                ),
                (1, *strides, 1),
            )
            if depthwise:  # one product per channel
                taps.append(
                    jnp.einsum(
                        "nhwc,nhwc->c",
                        window,
                        out_grad,
                        precision=precision,
                        preferred_element_type=accumulate,
                    )
                )
                continue
            window = window.reshape(batch, out_h, out_w, groups, group_in)
            taps.append(
                jnp.einsum(
                    "nhwgc,nhwgo->cgo",
                    window,
                    grads,
                    precision=precision,
                    preferred_element_type=accumulate,
                )
            )
    return jnp.stack(taps).reshape(rhs.shape).astype(rhs.dtype)
