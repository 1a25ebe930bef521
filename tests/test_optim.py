"""Learning-rate schedules against values worked out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bkd_jax import optim
from bkd_jax.config_defaults import base_config, optim_config
from bkd_jax.training.validation import validate_config


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


def test_cosine_schedule_ends_at_the_minimum_rate():
    cfg = _cfg("cosine")
    cfg.min_learning_rate = 0.02
    schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=10, total_steps=100)
    # min + (lr - min) * (1 + cos(pi t / T)) / 2 at t = 0, T/4, T/2 and T.
    quarter = 0.02 + 0.08 * (1 + 0.7071067811865476) / 2
    got = _values(schedule, [0, 25, 50, 100])
    np.testing.assert_allclose(got, [0.1, quarter, 0.06, 0.02], atol=1e-7)
    cfg.min_learning_rate = 0.2
    with pytest.raises(ValueError, match="min_learning_rate"):
        optim.learning_rate_schedule(cfg, steps_per_epoch=10, total_steps=100)


def test_adamw_two_updates_by_hand_with_decay_masked_off_biases_and_tokens():
    cfg = _cfg("cosine", warmup_epochs=1)
    cfg.name, cfg.weight_decay, cfg.min_learning_rate = "adamw", 0.5, 0.0
    # Two steps an epoch: the rate is 0 at step 0, 0.05 at step 1 (half-way up the ramp).
    tx = optim.make_optimizer(cfg, steps_per_epoch=2, total_steps=12)
    params = {
        "dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
        "norm": {"scale": jnp.full((2,), 2.0)},
        "pos_embed": jnp.full((1, 2, 2), 2.0),
        "cls_token": jnp.full((1, 1, 2), 2.0),
    }
    decays = {"kernel"}
    grads = [0.5, -1.5]  # every entry's gradient at step 0 and step 1
    state = tx.init(params)
    w = {name: 2.0 for name in ("kernel", "bias", "scale", "pos_embed", "cls_token")}
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.5
    m = v = 0.0
    for t, (g, lr) in enumerate(zip(grads, [0.0, 0.05]), 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        adam = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        w = {n: x - lr * (adam + (wd * x if n in decays else 0.0)) for n, x in w.items()}
        grad_tree = jax.tree.map(lambda p, g=g: jnp.full_like(p, g), params)
        updates, state = tx.update(grad_tree, state, params)
        params = optax.apply_updates(params, updates)
    got = {
        "kernel": params["dense"]["kernel"], "bias": params["dense"]["bias"],
        "scale": params["norm"]["scale"], "pos_embed": params["pos_embed"],
        "cls_token": params["cls_token"],
    }  # fmt: skip
    for name, value in got.items():
        np.testing.assert_allclose(np.asarray(value), w[name], rtol=1e-6, err_msg=name)
    assert w["kernel"] != w["bias"]  # the decay made a difference


def _optim_of(method: str):
    return base_config("cifar100", teacher="resnet32x4", student="resnet8x4", method=method).optim


def test_a_method_that_is_its_own_optimiser_is_named_in_the_config():
    assert (_optim_of("dot").name, _optim_of("kd").name) == ("dot", "sgd")
    tx = optim.make_optimizer(_optim_of("dot"), 10, "dot")
    assert isinstance(tx, optim.SplitGradientTransformation)


def test_another_optimiser_for_such_a_method_is_refused_in_one_line():
    config = base_config("cifar100", teacher="resnet32x4", student="resnet8x4", method="dot")
    config.optim.name = "sgd"
    message = r"requires config.optim.name='dot', got 'sgd'$"
    with pytest.raises(ValueError, match=rf"^method 'dot' {message}"):
        validate_config(config)
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(config.optim, 10, "dot")
