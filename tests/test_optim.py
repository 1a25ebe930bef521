"""Learning-rate schedules against values worked out by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bkd_jax import optim
from bkd_jax.config_defaults import optim_config


def _cfg(schedule, warmup_epochs=0.0, decay_epochs=(2, 3)):
    cfg = optim_config(0.1, decay_epochs, 0.0)
    cfg.schedule, cfg.warmup_epochs = schedule, warmup_epochs
    return cfg


def _values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_default_is_the_step_schedule():
    assert optim_config(0.1, (1,), 0.0).schedule == "step"


def test_step_schedule_drops_tenfold_at_each_decay_epoch():
    schedule = optim.learning_rate_schedule(_cfg("step"), steps_per_epoch=10)
    # 10 steps an epoch, decays at epochs 2 and 3: steps 20 and 30.
    got = _values(schedule, [0, 19, 20, 29, 30, 500])
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_step_schedule_after_warmup_decays_at_the_same_epochs():
    schedule = optim.learning_rate_schedule(_cfg("step", warmup_epochs=1), steps_per_epoch=10)
    # Ramp 0 -> 0.1 over the first 10 steps; the decays still come at steps 20 and 30.
    got = _values(schedule, [0, 5, 10, 19, 20, 29, 30])
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)


# 0.1 * (1 + cos(pi / 4)) / 2 and 0.1 * (1 + cos(3 pi / 4)) / 2, by hand.
QUARTER, THREE_QUARTERS = 0.1 * (1 + 0.7071067811865476) / 2, 0.1 * (1 - 0.7071067811865476) / 2


def test_cosine_schedule_from_the_rate_to_zero_over_the_run():
    schedule = optim.learning_rate_schedule(_cfg("cosine"), steps_per_epoch=10, total_steps=100)
    got = _values(schedule, [0, 25, 50, 75, 100, 120])
    np.testing.assert_allclose(got, [0.1, QUARTER, 0.05, THREE_QUARTERS, 0, 0], atol=1e-7)


def test_cosine_schedule_starts_after_the_warmup():
    cfg = _cfg("cosine", warmup_epochs=1)
    schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=10, total_steps=110)
    # Ramp over steps 0..10, then the cosine over the 100 steps left.
    got = _values(schedule, [0, 4, 10, 35, 60, 85, 110])
    want = [0.0, 0.04, 0.1, QUARTER, 0.05, THREE_QUARTERS, 0.0]
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_optimizer_steps_with_the_cosine_rate():
    cfg = _cfg("cosine")
    cfg.momentum = 0.0
    tx = optim.make_optimizer(cfg, steps_per_epoch=10, total_steps=100)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    updates = []
    for _ in range(26):
        update, state = tx.update({"w": jnp.ones(())}, state, params)
        updates.append(float(update["w"]))
    # Plain SGD: the update is -lr(step) * grad; step 25 is a quarter of the way.
    np.testing.assert_allclose([updates[0], updates[25]], [-0.1, -QUARTER], rtol=1e-6)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="total_steps"):
        optim.learning_rate_schedule(_cfg("cosine"), steps_per_epoch=10)
    with pytest.raises(ValueError, match="total_steps"):
        optim.learning_rate_schedule(
            _cfg("cosine", warmup_epochs=2), steps_per_epoch=10, total_steps=20
        )
    with pytest.raises(ValueError, match="linear"):
        optim.learning_rate_schedule(_cfg("linear"), steps_per_epoch=10)
    assert isinstance(optim.make_optimizer(_cfg("step"), 10), optax.GradientTransformation)
