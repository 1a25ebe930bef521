"""The zoo's CPU convolution path computes what `lax.conv_general_dilated` computes.

Every convolution configuration the zoo builds that takes the path (kernel size, stride,
padding, groups, collected by tracing one model of each family: a family's models share
their layer code) is checked pass by pass against XLA's convolution and its autodiff
gradients, in float32 and bfloat16, on odd and even input sides; whole train steps with
and without the path must agree; and the path exists only on CPU backends.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import in_float64, random_variables

from bkd_jax import config_defaults, distillers, models, shapes, steps
from bkd_jax.models import cpu_conv

FAMILIES = (
    "resnet8", "resnet50", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2",
    "imagenet_resnet18", "imagenet_resnet50", "imagenet_mobilenetv1",
)  # fmt: skip
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative to the largest value


@functools.cache
def zoo_convolutions(names: tuple[str, ...] = FAMILIES) -> list[tuple[int, ...]]:
    """(kernel, stride, padding, groups, in channels, out channels) of every distinct
    convolution kind of the zoo models `names`, the one with fewest channels of each, from
    tracing them."""
    seen = {}

    def record(lhs, rhs, window_strides, padding, **kwargs):
        groups = kwargs.get("feature_group_count", 1)
        kind = "depthwise" if rhs.shape[2] == 1 and rhs.shape[3] == groups else groups > 1
        key = (rhs.shape[0], window_strides[0], padding[0][0], kind)
        size = (rhs.shape[0], window_strides[0], padding[0][0], groups, lhs.shape[3], rhs.shape[3])
        if key not in seen or size[4] < seen[key][4]:
            seen[key] = size
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)

    original, cpu_conv.conv_general_dilated = cpu_conv.conv_general_dilated, record
    try:
        for name in names:
            net = models.get_model(name, 10)
            side = models.smallest_input_size(net)
            jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
    finally:
        cpu_conv.conv_general_dilated = original
    return sorted(seen.values())


def takes_the_path(config) -> bool:
    kernel, _, _, groups, channels_in, channels_out = config
    return cpu_conv.has_tap_weight_gradient(
        (kernel, kernel, channels_in // groups, channels_out), groups
    )


def test_the_zoo_has_kernels_of_both_paths():
    taps = [c for c in zoo_convolutions() if takes_the_path(c)]
    assert {(c[0], c[1]) for c in taps} >= {(1, 1), (1, 2), (3, 1), (3, 2)}  # 1x1, depthwise
    assert any(c[3] > 1 and c[0] == 1 for c in taps)  # ShuffleNetV1's grouped 1x1
    assert len(taps) < len(zoo_convolutions())  # 3x3 and 7x7 dense kernels stay XLA's


def conv_passes(conv, config, side: int, dtype):
    """Forward, input gradient and weight gradient of `conv` on random data."""
    kernel, stride, pad, groups, channels_in, channels_out = config
    keys = jax.random.split(jax.random.key(side), 3)
    x = jax.random.normal(keys[0], (3, side, side, channels_in), dtype)
    w = jax.random.normal(keys[1], (kernel, kernel, channels_in // groups, channels_out), dtype)

    def apply(x, w):
        return conv(
            x, w, (stride, stride), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        )  # fmt: skip

    y, backward = jax.vjp(apply, x, w)
    return (y, *backward(jax.random.normal(keys[2], y.shape, dtype)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_each_pass_equals_xla_for_every_zoo_convolution_on_the_path(dtype):
    for config in filter(takes_the_path, zoo_convolutions()):

        def both(side, config=config):
            return [
                conv_passes(conv, config, side, dtype)
                for conv in (cpu_conv.conv_general_dilated, jax.lax.conv_general_dilated)
            ]

        # Odd and even sides in one compiled function: strided windows end differently.
        for got, want in jax.jit(lambda: [both(7), both(8)])():
            for name, g, w in zip(("forward", "input gradient", "weight gradient"), got, want):
                assert g.dtype == w.dtype and g.shape == w.shape, (config, name)
                scale = float(jnp.abs(w.astype(jnp.float32)).max())
                np.testing.assert_allclose(
                    np.asarray(g, np.float32), np.asarray(w, np.float32),
                    rtol=0, atol=TOLERANCE[dtype] * scale, err_msg=f"{config} {name}",
                )  # fmt: skip


def tap_products() -> int:
    """Matrix products in the jaxpr of a 1x1 convolution's weight gradient, traced afresh:
    the tap weight gradient's, as XLA's weight gradient is itself a convolution."""
    x, w = jnp.ones((2, 4, 4, 3)), jnp.ones((1, 1, 3, 5))

    def loss(w):
        dims = ("NHWC", "HWIO", "NHWC")
        conv = cpu_conv.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims)
        return conv.sum()

    return str(jax.make_jaxpr(jax.grad(loss))(w)).count("dot_general")


def test_the_path_is_a_function_of_the_platform(monkeypatch):
    assert cpu_conv.uses_cpu_passes("cpu")
    assert not cpu_conv.uses_cpu_passes("gpu")
    assert not cpu_conv.uses_cpu_passes("tpu")
    assert tap_products() == 1
    with cpu_conv.xla_convolutions():
        assert tap_products() == 0
    assert tap_products() == 1
    for platform in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
        assert tap_products() == 0  # XLA's convolutions only


# Post- and pre-activation networks, and ShuffleNetV1, whose grouped 1x1 and depthwise
# kernels make the step models cover every kind of kernel on the path (tested below).
STEP_MODELS = ("resnet8", "wrn_16_2", "shufflenetv1")


def kinds(convolutions) -> set[tuple[int, int, int, str]]:
    """(kernel, stride, padding, grouping) of the convolutions that take the path."""
    grouping = {True: "depthwise", False: "grouped"}
    return {
        (c[0], c[1], c[2], grouping[c[3] == c[4]] if c[3] > 1 else "dense")
        for c in convolutions
        if takes_the_path(c)
    }


def test_the_step_models_have_every_kind_of_kernel_on_the_path():
    assert kinds(zoo_convolutions(STEP_MODELS)) == kinds(zoo_convolutions())


def compiled_steps(name: str):
    """CE train steps of `name` in float64, compiled with and without the CPU path, a first
    state, the teacher variables, a batch of 8 images, and the matrix products of each step.

    float64 because the mobile nets' small-batch BatchNorm turns float32 rounding
    differences (1e-7 after one step) into percent after three chained steps, whichever
    path computes them; in float64 the paths' differences stay at its rounding."""
    net = models.get_model(name, 10, jnp.float64)
    side = models.smallest_input_size(net)
    key = jax.random.key(0)
    images = jax.random.normal(key, (8, side, side, 3), jnp.float64)
    batch = {"image": images, "label": jnp.arange(8) % 10}
    distiller = distillers.make_distiller(
        config_defaults.distill_config("ce"), net, net, images.shape
    )
    optimizer = optax.sgd(0.1, momentum=0.9)
    init_state = functools.partial(steps.create_train_state, distiller, optimizer)
    state = in_float64(random_variables(jax.eval_shape(init_state, key, images), seed=1))
    teacher_vars = in_float64(random_variables(shapes.variable_shapes(net, images.shape), seed=2))
    compiled, products = [], []
    for xla_only in (False, True):
        # A step function of its own: JAX caches the trace of each function.
        step = steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0))
        with cpu_conv.xla_convolutions() if xla_only else contextlib.nullcontext():
            lowered = jax.jit(step).lower(state, teacher_vars, batch)
        compiled.append(lowered.compile())
        products.append(lowered.as_text().count("dot_general"))
    return compiled, state, teacher_vars, batch, products


@pytest.mark.parametrize("name", STEP_MODELS)
def test_three_chained_train_steps_equal_with_and_without_the_cpu_path(name):
    with jax.enable_x64(True):
        (with_path, xla_only), state, teacher_vars, batch, products = compiled_steps(name)
        assert products[0] > products[1]  # the path replaced some weight gradients
        got = want = (state,)
        for _ in range(3):
            got = with_path(got[0], teacher_vars, batch)
            want = xla_only(want[0], teacher_vars, batch)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.leaves(got[0].params)[0].dtype == np.float64
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(got[1]))  # the metrics
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        # The floor is for leaves that are zero up to float64 rounding (a bias that a
        # BatchNorm follows has no gradient).
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max() + 1e-12)
