"""Regression (STS-B): MSE objectives against float64, training, refusals, a full run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_bert import random_text, tiny
from test_text_train import VOCAB_SIZE, random_encoded

from bkd_jax import config_defaults, distillers, report, steps, text_demo, text_train
from bkd_jax.distillers import regression
from bkd_jax.distillers.base import Forward


def _mse64(a, b) -> float:
    return float(np.mean((np.asarray(a, np.float64).ravel() - np.asarray(b, np.float64)) ** 2))


def test_blockkd_terms_equal_a_float64_reference():
    rng = np.random.default_rng(0)
    scores = lambda: jnp.asarray(rng.standard_normal((6, 1)), jnp.float32)  # noqa: E731
    student, teacher, stones = scores(), scores(), {1: scores(), 2: scores(), 3: scores()}
    labels = jnp.asarray(rng.uniform(0, 5, 6), jnp.float32)
    terms = regression.blockkd_terms(student, stones, teacher, labels, num_blocks=3)
    w = {1: 0.25, 2: 0.5, 3: 1.0}
    ensemble = np.mean([np.asarray(s, np.float64) for s in stones.values()], axis=0).ravel()
    task = _mse64(student, labels) + sum(w[i] * _mse64(s, labels) for i, s in stones.items())
    distill = _mse64(student, teacher.ravel()) + sum(
        w[i] * _mse64(s, teacher.ravel()) for i, s in stones.items()
    )
    cross = _mse64(student, ensemble) + sum(_mse64(s, ensemble) for s in stones.values())
    assert float(terms["task"]) == pytest.approx(task, rel=1e-6)
    assert float(terms["distill"]) == pytest.approx(distill, rel=1e-6)
    assert float(terms["cross"]) == pytest.approx(cross, rel=1e-6)
    assert terms["task"].dtype == jnp.float32
    without = regression.blockkd_terms(student, stones, teacher, labels, num_blocks=3,
                                       with_cross=False)  # fmt: skip
    assert float(without["cross"]) == 0 and "cross_student" not in without
    # The ensemble is a target: no gradient flows into the stones through L_cross.
    grad = jax.grad(
        lambda s: regression.blockkd_terms(student, {1: s}, teacher, labels, num_blocks=1)["cross"]
    )(stones[1])
    # Without the stop, MSE(student, s) would pull s towards the student: -2 (student - s) / 6.
    np.testing.assert_allclose(grad, np.zeros((6, 1)), atol=1e-7)


def test_kd_and_ce_objectives_equal_a_float64_reference():
    rng = np.random.default_rng(1)
    s, t = (jnp.asarray(rng.standard_normal((5, 1)), jnp.float32) for _ in range(2))
    y = jnp.asarray(rng.uniform(0, 5, 5), jnp.float32)
    out = Forward(s, t, (), {}, None, None)
    knobs = {"ce_weight": 0.1, "kd_weight": 0.9, "standardize": False, "temperature": 4.0}
    kd = regression._kd(knobs)(out, {"label": y}, jnp.float32(1.0))
    assert float(kd.task) == pytest.approx(0.1 * _mse64(s, y), rel=1e-6)
    assert float(kd.distill) == pytest.approx(0.9 * _mse64(s, t.ravel()), rel=1e-6)
    ce = regression._ce(out, {"label": y}, jnp.float32(1.0))
    assert float(ce.total) == pytest.approx(_mse64(s, y), rel=1e-6)


@pytest.fixture(scope="module")
def pair():
    teacher, student = tiny(1, groups=2), tiny(1, groups=2)
    x = random_text(jax.random.key(0), [8, 5, 2, 6, 7, 3], 8)
    tv = teacher.init(jax.random.key(1), x)
    labels = jnp.asarray(np.random.default_rng(2).uniform(0, 5, 6), jnp.float32)
    return teacher, student, tv, {"image": x, "label": labels}


@pytest.mark.parametrize("method", ["ce", "kd", "blockkd"])
def test_a_few_steps_lower_the_regression_loss_of_a_2x128_pair(method, pair):
    teacher, student, tv, batch = pair
    cfg = config_defaults.distill_config(method)
    x = batch["image"]
    distiller = distillers.make_distiller(cfg, student, teacher, x.shape[1:])
    distiller = regression.regression_distiller(distiller, distillers.method_knobs(cfg))
    optimizer = optax.adam(3e-3)
    state = steps.create_train_state(distiller, optimizer, jax.random.key(5), x)
    step = jax.jit(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    losses = []
    for _ in range(15):
        state, metrics = step(state, tv, batch)
        losses.append(float(metrics["loss"]))
    # KD's two targets disagree: its minimum, 0.1 * 0.9 * mean((y - t)^2), is not 0.
    # (Block-KD's stones end in frozen teacher blocks: it falls less far in as many steps.)
    t = np.asarray(teacher.apply(tv, x)[0], np.float64).ravel()
    floor = (
        0.09 * np.mean((np.asarray(batch["label"], np.float64) - t) ** 2) if method == "kd" else 0
    )
    assert np.all(np.isfinite(losses)), losses
    assert np.mean(losses[-5:]) - floor < 0.8 * (losses[0] - floor), (floor, losses)


def test_class_distribution_methods_are_refused_before_any_work(tmp_path):
    data = random_encoded(32, 0, regression=True)
    for method in ("dkd", "dist", "wttm", "dot", "mlkd", "wkd_l"):
        config = text_demo.run_config("student", method, VOCAB_SIZE, epochs=1)
        with pytest.raises(ValueError, match=f"method '{method}' has no regression form"):
            text_train.train(config, tmp_path / method, data, data, num_classes=1)
        assert not (tmp_path / method).exists()
    for change, match in (
        ({"standardize": True}, "standardize z-scores class logits"),
        ({"distance": "dkd"}, "leave distance at 'kd'"),
    ):
        knobs = {**distillers.method_knobs(config_defaults.distill_config("blockkd")), **change}
        with pytest.raises(ValueError, match=match):
            regression.check_method("blockkd", knobs)


def test_teacher_and_blockkd_student_train_on_scores_and_report_correlations(tmp_path):
    train_data = random_encoded(64, 0, regression=True)
    eval_data = random_encoded(40, 1, regression=True)
    teacher = text_demo.run_config("teacher", "ce", VOCAB_SIZE, epochs=1)
    text_train.train(teacher, tmp_path / "teacher", train_data, eval_data, num_classes=1,
                     metrics=("pearson", "spearman"))  # fmt: skip
    config = text_demo.run_config("student", "blockkd", VOCAB_SIZE, epochs=1)
    config.teacher_checkpoint = str(tmp_path / "teacher" / "student")
    results = text_train.train(config, tmp_path / "blockkd", train_data, eval_data,
                               num_classes=1, metrics=("pearson", "spearman"))  # fmt: skip
    last = results["last"]
    assert {"eval/student/pearson", "eval/teacher/spearman", "eval/stone2/pearson"} <= set(last)
    assert not any(k.endswith("top1") for k in last)
    logged = json.loads((tmp_path / "blockkd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/task_student", "train/distill_stone1", "train/cross"} <= set(logged)
    runs, skipped = report.find_runs([tmp_path])
    table = report.markdown_table(report.summarize(runs))
    assert not skipped and "pearson last" in table and "top-1" not in table
