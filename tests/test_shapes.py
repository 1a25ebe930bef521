"""bkd_jax.shapes: memoised shapes equal a fresh trace, are traced once, and are the caller's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from bkd_jax import models, shapes

SIDE = 8  # resnet8's smallest input side


def fresh(net, fn):
    x = jnp.zeros((1, SIDE, SIDE, 3))
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    return variables if fn is None else jax.eval_shape(fn, variables, x)


@pytest.mark.parametrize(
    "memoised, forward",
    [
        (shapes.variable_shapes, None),
        (shapes.tap_structs, lambda net: lambda v, x: net.taps(v, x)[1]),
        (shapes.block_output_structs, lambda net: lambda v, x: net.features(v, x)[1]),
    ],
    ids=["variables", "taps", "block outputs"],
)
def test_memoised_shapes_equal_a_fresh_trace_and_are_traced_once(memoised, forward, monkeypatch):
    net = models.get_model("resnet8", 10)
    want = fresh(net, forward and forward(net))
    memoised.cache_clear()
    traces = []
    eval_shape = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: traces.append(1) or eval_shape(*a, **k))
    first = memoised(net, (7, SIDE, SIDE, 3))  # only the per-example shape counts
    traced = len(traces)
    second = memoised(models.get_model("resnet8", 10), (SIDE, SIDE, 3))  # an equal network
    assert traced >= 1 and len(traces) == traced
    assert jax.tree.structure(first) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(first), jax.tree.leaves(want), strict=True):
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype)
    # Each caller gets its own containers: changing one leaves the memo as it was.
    assert first is not second and jax.tree.structure(first) == jax.tree.structure(second)
    if isinstance(first, dict):
        first.pop("params")
        assert "params" in memoised(net, (SIDE, SIDE, 3))
    elif isinstance(first, list):
        first.clear()
        assert len(memoised(net, (SIDE, SIDE, 3))) == net.num_blocks
