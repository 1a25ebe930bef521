"""MLKD as a distiller: two views through the student and the teacher, the objective's
terms, the batch key of the strong view. (The loss: test_mlkd_loss.py; training on
digits: test_steps.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_recipes import config_module
from test_steps import build

from bkd_jax import losses


def _forward(distiller, state, teacher_vars, batch, train=True):
    return distiller.forward(
        state.variables("student"), state.variables("modules"), teacher_vars, batch, train=train
    )


def test_objective_reads_both_views_and_the_student_normalises_twice():
    distiller, _, state, teacher_vars, batch = build("mlkd")
    out = _forward(distiller, state, teacher_vars, batch)
    student, teacher = distiller.student, distiller.teacher
    weak, after_weak = student.apply(state.variables("student"), batch["image"], train=True)
    strong, after_both = student.apply(after_weak, batch["image_strong"], train=True)
    np.testing.assert_allclose(out.extras["strong_student_logits"], strong, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out.extras["strong_teacher_logits"],
        teacher.apply(teacher_vars, batch["image_strong"])[0],
        rtol=1e-5,
        atol=1e-6,
    )
    for a, b in zip(jax.tree.leaves(out.student_vars), jax.tree.leaves(after_both), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    loss = distiller.objective(out, batch, 1.0)
    labels = batch["label"]
    ce = losses.cross_entropy(weak, labels) + losses.cross_entropy(strong, labels)
    np.testing.assert_allclose(loss.task, 0.1 * ce, rtol=1e-5)
    expected = losses.mlkd_loss(
        weak, out.teacher_logits, strong, out.extras["strong_teacher_logits"],
        temperature=4.0, kd_weight=0.9,
    )  # fmt: skip
    np.testing.assert_allclose(loss.distill, expected, rtol=1e-5)


def test_a_batch_without_the_strong_view_is_a_one_line_error():
    distiller, _, state, teacher_vars, batch = build("mlkd")
    weak_only = {k: v for k, v in batch.items() if k != "image_strong"}
    with pytest.raises(ValueError, match="needs 'image_strong'") as error:
        _forward(distiller, state, teacher_vars, weak_only)
    assert "\n" not in str(error.value)
    wrong = {**batch, "image_strong": batch["image"][:, :4]}
    with pytest.raises(ValueError, match="must match 'image'"):
        _forward(distiller, state, teacher_vars, wrong)
    logits = distiller.eval_logits(
        state.variables("student"), state.variables("modules"), teacher_vars, batch["image"]
    )  # evaluation needs the weak view only
    assert logits["student"].shape == (batch["image"].shape[0], 10)


@pytest.mark.parametrize("method", ["kd", "mlkd"])
def test_cifar100_standardised_recipe_is_the_logit_standardisation_authors(method):
    """github sunshangquan/logit-standardization-KD: tools/train.py --logit-stand sets the
    temperature (2) and the KD weight (9) of KD and MLKD; CE keeps its cfg.py weight 0.1."""
    module = config_module("cifar100")
    plain = module.get_config(f"method={method}").distill[method]
    knobs = module.get_config(f"method={method},standardize=1").distill[method]
    assert (knobs.standardize, knobs.temperature, knobs.kd_weight) == (True, 2.0, 9.0)
    assert knobs.ce_weight == 0.1 == plain.ce_weight
