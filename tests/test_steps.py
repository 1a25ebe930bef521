"""Distillers and the train/eval steps on tiny models and real digits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import sklearn.datasets
from conftest import jit_for_one_run

from bkd_jax import config_defaults, distillers, losses, models, steps

NUM_CLASSES = 10
SHAPE = (16, 8, 8, 3)  # 16 of scikit-learn's 8x8 digits, grey repeated to 3 channels
# FitNet's regressor (and WKD-F's, the same ConvReg) ends in BatchNorm and ReLU, so only
# that BatchNorm's scale and shift can reach the teacher's (unnormalised) channel
# statistics, 3e-3 a step with Adam.
LEARNING_RATE = {"fitnet": 1e-2, "wkd_f": 1e-2, "wkd": 1e-2}
NEEDS_TRAINED_TEACHER = ("crd",)


def distill_config(method: str, **overrides) -> ml_collections.ConfigDict:
    """The project's default `distill` config with `overrides` of the method's knobs."""
    cfg = config_defaults.distill_config(method)
    cfg[method].update(overrides)
    return cfg


@functools.cache
def teacher_and_batch():
    teacher = models.get_model("resnet20", NUM_CLASSES)
    digits = sklearn.datasets.load_digits()
    x = np.repeat(digits.images[: SHAPE[0], :, :, None] / 16.0, 3, axis=-1).astype(np.float32)
    batch = {
        "image": jnp.asarray(x),
        "label": jnp.asarray(digits.target[: SHAPE[0]], jnp.int32),
        "index": jnp.arange(SHAPE[0], dtype=jnp.int32),
        "image_strong": jnp.asarray(x[:, :, ::-1] ** 2),  # MLKD's second view
    }
    return teacher, teacher.init(jax.random.key(2), batch["image"]), batch


@functools.cache
def trained_teacher_vars():
    """The teacher after 30 CE steps on the batch: pooled features that tell examples apart.

    A random teacher's pooled features are nearly parallel, and CRD contrasts examples by
    the teacher's embeddings.
    """
    teacher, _, batch = teacher_and_batch()
    ce = distillers.make_distiller(distill_config("ce"), teacher, None, SHAPE)
    optimizer = optax.adam(3e-3)
    state = steps.create_train_state(ce, optimizer, jax.random.key(2), batch["image"])
    step = jax.jit(steps.make_train_step(ce, optimizer, lambda s: jnp.float32(1.0)))
    for _ in range(30):
        state, _ = step(state, None, batch)
    return state.variables("student")


def build(method: str, **overrides):
    teacher, teacher_vars, batch = teacher_and_batch()
    student = models.get_model("resnet8", NUM_CLASSES)
    distiller = distillers.make_distiller(
        distill_config(method, **overrides), student, teacher, SHAPE, num_examples=SHAPE[0]
    )
    if method in NEEDS_TRAINED_TEACHER:
        teacher_vars = trained_teacher_vars()
    optimizer = optax.adam(LEARNING_RATE.get(method, 3e-3))
    state = steps.create_train_state(distiller, optimizer, jax.random.key(3), batch["image"])
    return distiller, optimizer, state, teacher_vars, batch


@pytest.mark.parametrize("method", distillers.available())
def test_thirty_steps_halve_the_loss_and_leave_the_teacher_untouched(method):
    distiller, optimizer, state, teacher_vars, batch = build(method)
    connectors = {f"connector{i}" for i in getattr(distiller.modules, "stones", ())}
    own = {name for name in state.params["modules"] if name.startswith("connector")}
    assert own == connectors  # only Block-KD has connectors
    teacher_before = jax.tree.map(np.array, teacher_vars)
    step = jax.jit(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    first_stats = state.batch_stats
    losses = []
    for _ in range(30):
        state, metrics = step(state, teacher_vars, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] <= 0.5 * losses[0], losses
    assert int(state.step) == 30
    jax.tree.map(np.testing.assert_array_equal, teacher_vars, teacher_before)
    for old, new in zip(jax.tree.leaves(first_stats), jax.tree.leaves(state.batch_stats)):
        assert not np.array_equal(old, new)


def test_blockkd_lite_uses_the_deepest_stones_and_may_drop_the_cross_term():
    lite, optimizer, state, teacher_vars, batch = build("blockkd_lite", gamma=0.0)
    full, *_ = build("blockkd")
    assert full.modules.stones == (1, 2, 3) and lite.modules.stones == (2, 3)
    step = jit_for_one_run(steps.make_train_step(lite, optimizer, lambda s: jnp.float32(1.0)))
    _, metrics = step(state, teacher_vars, batch)
    assert {"kd_stone2", "kd_stone3"} <= set(metrics) and "kd_stone1" not in metrics
    assert float(metrics["cross"]) == 0.0 and "cross_student" not in metrics
    custom, *_ = build("blockkd", stones=(1, 3))
    assert custom.modules.stones == (1, 3)


def test_dkd_warmup_scales_the_distillation_term():
    distiller, optimizer, state, teacher_vars, batch = build("dkd")
    step = jit_for_one_run(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(0.25)))
    _, m = step(state, teacher_vars, batch)
    # mdistiller's DKD weighs the label CE 1.0 (CFG.DKD.CE_WEIGHT), not KD's 0.1.
    np.testing.assert_allclose(m["loss"], 1.0 * m["ce"] + 0.25 * m["dkd"], rtol=1e-6)


def test_warmup_factor_counts_epochs_from_one():
    r = [float(distillers.warmup_factor(jnp.int32(s), 10, 4)) for s in (0, 9, 10, 35, 1000)]
    assert r == [0.25, 0.25, 0.5, 1.0, 1.0]
    assert float(distillers.warmup_factor(jnp.int32(0), 10, 0)) == 1.0


def test_eval_step_counts_masked_topk_exactly():
    distiller, _, state, teacher_vars, batch = build("blockkd")
    mask = np.array([1.0] * 12 + [0.0] * 4, np.float32)
    sums = steps.make_eval_step(distiller)(state, teacher_vars, {**batch, "mask": mask})
    logits = distiller.eval_logits(
        state.variables("student"), state.variables("modules"), teacher_vars, batch["image"]
    )
    assert set(logits) == {"student", "teacher", "stone1", "stone2", "stone3"}
    labels = np.asarray(batch["label"])
    for name, value in logits.items():
        ranked = np.argsort(-np.asarray(value), axis=-1)
        for k in (1, 5):
            hits = (ranked[:, :k] == labels[:, None]).any(axis=1)
            assert float(sums[f"{name}/top{k}"]) == float((hits * mask).sum()), (name, k)
    assert float(sums["count"]) == 12


def test_bad_method_or_missing_teacher_is_rejected():
    student = models.get_model("resnet8", NUM_CLASSES)
    with pytest.raises(ValueError, match="unknown distillation method 'no_such'"):
        distillers.make_distiller(distill_config("no_such"), student, None, SHAPE)
    with pytest.raises(ValueError, match="distils from a teacher"):
        distillers.make_distiller(distill_config("kd"), student, None, SHAPE)
    teacher, _, _ = teacher_and_batch()
    with pytest.raises(ValueError, match=r"distill.blockkd.stones=\(0, 2\)"):
        distillers.make_distiller(distill_config("blockkd", stones=(0, 2)), student, teacher, SHAPE)


def test_knobs_of_another_method_an_unknown_knob_or_distance_are_rejected():
    student = models.get_model("resnet8", NUM_CLASSES)
    teacher, _, _ = teacher_and_batch()
    cfg = distill_config("kd")
    cfg.dkd = distillers.get("dkd").knobs()
    with pytest.raises(ValueError, match=r"knobs of dkd, but the method is 'kd'"):
        distillers.make_distiller(cfg, student, teacher, SHAPE)
    cfg = distill_config("dkd")
    cfg.dkd.temprature = 2.0
    with pytest.raises(ValueError, match=r"config.distill.dkd has no knob temprature"):
        distillers.make_distiller(cfg, student, teacher, SHAPE)
    with pytest.raises(ValueError, match=r"distance='ce' is not a logit distance"):
        distillers.make_distiller(distill_config("blockkd", distance="ce"), student, teacher, SHAPE)


def test_a_missing_section_means_the_defaults():
    teacher, _, _ = teacher_and_batch()
    student = models.get_model("resnet8", NUM_CLASSES)
    distiller = distillers.make_distiller({"method": "dkd"}, student, teacher, SHAPE)
    assert distiller.warmup_epochs == 20


@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "wttm"])
def test_logit_methods_standardise_both_logits_before_their_distance(method):
    rng = np.random.default_rng(0)
    student, teacher = (jnp.asarray(rng.normal(size=(8, 10)) * 5, jnp.float32) for _ in "st")
    labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
    knobs = {**distillers.get(method).knobs(), "standardize": True}
    objective = distillers.get(method).build(knobs, None).objective
    out = distillers.Forward(student, teacher, (), {}, None, None)
    loss = objective(out, {"label": labels}, jnp.float32(0.5))
    z_s, z_t = losses.standardize_logits(student), losses.standardize_logits(teacher)
    expected = {
        "kd": lambda: 0.9 * losses.kd_loss(z_s, z_t, 4.0),
        "dkd": lambda: (
            0.5 * losses.dkd_loss(z_s, z_t, labels, alpha=1.0, beta=8.0, temperature=4.0)
        ),
        "dist": lambda: losses.dist_loss(z_s, z_t, beta=2.0, gamma=2.0, temperature=4.0),
        "wttm": lambda: 4.0 * losses.wttm_loss(z_s, z_t, gamma=0.2),
    }[method]()
    np.testing.assert_allclose(loss.distill, expected, rtol=1e-6)
    ce_weight = knobs["ce_weight"]
    np.testing.assert_allclose(
        loss.task, ce_weight * losses.cross_entropy(student, labels), rtol=1e-6
    )
