"""Double buffering changes when batches reach the devices, never what a run computes."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bkd_jax import config_defaults, distillers, models, steps
from bkd_jax.training import prefetch, sharding

BATCH, SIZE, CLASSES, STEPS = 8, 8, 10, 3


def host_batches(seed: int = 0):
    """An endless stream of random numpy batches, like the pipeline's."""
    rng = np.random.default_rng(seed)
    while True:
        yield {
            "image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
            "label": rng.integers(0, CLASSES, BATCH).astype(np.int32),
        }


@functools.cache
def setup():
    """A resnet8 state, its jitted train step over all devices, and the mesh."""
    mesh = sharding.make_mesh()
    repl = sharding.replicated(mesh)
    shape = (BATCH, SIZE, SIZE, 3)
    distiller = distillers.make_distiller(
        config_defaults.distill_config("ce"), models.get_model("resnet8", CLASSES), None, shape
    )
    optimizer = optax.sgd(0.1, momentum=0.9)
    init = functools.partial(steps.create_train_state, distiller, optimizer)
    state = jax.jit(init, out_shardings=repl)(jax.random.key(1), jnp.zeros(shape))
    step = jax.jit(
        steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)),
        in_shardings=(repl, repl, sharding.batch_sharded(mesh)),
        out_shardings=(repl, repl),
    )
    return mesh, state, step


def train(use_prefetch: bool) -> tuple[list, list]:
    """STEPS steps from the same start; the final state's leaves and every step's metrics."""
    mesh, state, step = setup()
    if use_prefetch:
        batches = prefetch.prefetch_to_mesh(host_batches(), mesh)
    else:
        batches = (sharding.global_batch(b, mesh) for b in host_batches())
    history = []
    for _ in range(STEPS):
        state, metrics = step(state, None, next(batches))
        history.append(jax.device_get(metrics))
    return jax.tree.leaves(jax.device_get(state)), history


def assert_bit_identical() -> None:
    plain, buffered = train(False), train(True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(buffered), strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefetch_reads_one_batch_ahead_and_keeps_order():
    taken = []

    def source():
        for k in range(4):
            taken.append(k)
            yield {"x": np.full((jax.device_count(),), k, np.float32)}

    stream = prefetch.prefetch_to_mesh(source(), sharding.make_mesh())
    first = next(stream)
    assert taken == [0, 1]  # batch 1 is on its devices while batch 0 is used
    assert isinstance(first["x"], jax.Array) and float(first["x"][0]) == 0
    assert [float(b["x"][0]) for b in stream] == [1, 2, 3]  # the tail is drained


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        next(prefetch.prefetch_to_mesh(host_batches(), sharding.make_mesh(), depth=0))


def test_run_with_prefetch_is_bit_identical_on_four_devices():
    # Optimisation level 0 compiles several times faster on a CPU; both runs use it.
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags}
    code = (
        "import jax; assert jax.device_count() == 4; "
        "from tests.test_prefetch import assert_bit_identical; assert_bit_identical()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
