"""Tests of the non-finite guard: the flag and the skip in the jitted step, and the loop
stopping at (or skipping) the step where a NaN appears, never checkpointing a NaN state."""

from __future__ import annotations

import json
import math
import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax.config_defaults import base_config
from bkd_jax.training import checkpointing, inputs, loop, nonfinite

NAN_STEP = 4
# The gradient is always non-finite; the loss terms too where NaN propagates through ReLU
# (XLA's CPU max may drop NaN, so the forward pass can stay finite there).
TERMS = r"[a-z_, ]*grad_norm[a-z_, ]*"


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: dict


def _sgd_step(state: _State, teacher_vars, batch):
    """Plain SGD on the mean of w * x: the gradient is mean(x), so a NaN x poisons it."""
    del teacher_vars
    w = state.params["w"]
    loss, grad = jax.value_and_grad(lambda w: jnp.mean(w * batch["x"]))(w)
    new = _State(state.step + 1, {"w": w - 0.5 * grad}, {"m": jnp.mean(batch["x"])}, {"n": 1})
    return new, {"loss": loss, "grad_norm": jnp.abs(grad)}


def _state() -> _State:
    return _State(jnp.array(0), {"w": jnp.array(2.0)}, {"m": jnp.array(0.0)}, {"n": 0})


@pytest.mark.parametrize("mode", nonfinite.MODES)
def test_guard_flags_and_in_skip_mode_keeps_the_state(mode):
    step = jax.jit(nonfinite.guard_step(_sgd_step, mode))
    good, metrics = step(_state(), None, {"x": jnp.array([1.0, 3.0])})
    assert float(metrics["finite"]) == 1.0
    assert float(good.params["w"]) == 2.0 - 0.5 * 2.0 and float(good.batch_stats["m"]) == 2.0

    bad, metrics = step(good, None, {"x": jnp.array([1.0, jnp.inf])})
    assert float(metrics["finite"]) == 0.0
    assert int(bad.step) == 2  # the step count advances either way
    fetched = jax.device_get(metrics)
    assert nonfinite.find([(2, fetched)]) == [(2, ["grad_norm", "loss"])]
    if mode == "skip":
        assert float(bad.params["w"]) == 1.0 and float(bad.batch_stats["m"]) == 2.0
        assert int(bad.opt_state["n"]) == 1
    else:
        assert not math.isfinite(float(bad.params["w"]))


def test_parameters_that_overflow_are_caught_though_the_loss_is_finite():
    def explode(state, teacher_vars, batch):
        new, metrics = _sgd_step(state, teacher_vars, batch)
        return new.replace(params={"w": new.params["w"] * jnp.inf}), metrics

    _, metrics = jax.jit(nonfinite.guard_step(explode, "stop"))(_state(), None, {"x": jnp.ones(2)})
    assert nonfinite.find([(1, jax.device_get(metrics))]) == [(1, ["updated parameters"])]


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        nonfinite.guard_step(_sgd_step, "ignore")


# ---------------------------------------------------------------------------------------
# The loop, on digits, with a NaN image in the batch of step NAN_STEP.


@pytest.fixture
def nan_batch_at_step(monkeypatch):
    real = inputs.DeviceLoader.train_batches

    def poisoned(self, global_batch_size: int, seed: int, start_step: int):
        batches = real(self, global_batch_size, seed, start_step)
        for step, batch in enumerate(batches, start_step + 1):
            if step == NAN_STEP:
                batch = {**batch, "image": batch["image"] * np.nan}  # keeps its sharding
            yield batch

    monkeypatch.setattr(inputs.DeviceLoader, "train_batches", poisoned)


def _config(on_nonfinite: str):
    config = base_config("digits", teacher="resnet8", student="resnet8", method="ce")
    config.num_train_steps = 6
    config.global_batch_size = 16
    config.log_every_steps = 1
    config.eval_every_epochs = 100  # one evaluation, at the end
    config.checkpoint_every_steps = 1
    config.keep_checkpoints = 10
    config.tensorboard = False
    config.on_nonfinite = on_nonfinite
    return config


def _rows(workdir) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def _student(workdir, step: int) -> list[np.ndarray]:
    variables, _ = checkpointing.read_student(workdir / checkpointing.LATEST_DIR / str(step))
    return jax.tree.leaves(variables)


def test_stop_names_the_step_and_terms_and_keeps_only_finite_checkpoints(
    tmp_path, nan_batch_at_step
):
    message = rf"step {NAN_STEP}: non-finite {TERMS}; stopped\. The last finite"
    with pytest.raises(FloatingPointError, match=message + r" state is checkpoint step 3\."):
        loop.train_and_evaluate(_config("stop"), str(tmp_path))
    assert checkpointing.saved_steps(tmp_path / checkpointing.LATEST_DIR) == [1, 2, 3]
    assert all(np.isfinite(leaf).all() for leaf in _student(tmp_path, 3))
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / loop.RESULTS_FILE).exists()


def test_skip_drops_the_update_counts_and_logs_it(tmp_path, nan_batch_at_step, caplog):
    with caplog.at_level("WARNING"):
        results = loop.train_and_evaluate(_config("skip"), str(tmp_path))
    assert results["steps"] == 6
    assert re.search(rf"Step {NAN_STEP}: non-finite {TERMS}; its update was skipped\.", caplog.text)
    rows = _rows(tmp_path)
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert not math.isfinite(rows[NAN_STEP - 1]["train/grad_norm"])
    before, after = _student(tmp_path, NAN_STEP - 1), _student(tmp_path, NAN_STEP)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)  # step 4's update (and BN statistics) dropped
    final = _student(tmp_path, 6)
    assert all(np.isfinite(leaf).all() for leaf in final)
    assert any(not np.array_equal(a, b) for a, b in zip(after, final, strict=True))
