"""Objectives of regression tasks (GLUE's STS-B): a network's output is one score.

A 1-wide head is a regressor, as in Hugging Face transformers' BertForSequenceClassification
with num_labels=1 (modeling_bert.py: problem_type "regression", MSELoss): the task term is
the mean squared error between the score and the label instead of a cross-entropy.

Logit distillation matches the teacher's score with the same squared error, the logit
regression of Tang et al. ("Distilling Task-Specific Knowledge from BERT into Simple
Neural Networks", 2019, Sec. 3.2: L_distill = ||z_teacher - z_student||^2):

    kd:      ce_weight MSE(s, y) + kd_weight MSE(s, t)
    blockkd: alpha L_task + r(t) (beta L_distill + gamma L_cross), the terms of
             `bkd_jax.losses.blockkd_loss` with MSE in place of both CE and the distance D

(TinyBERT's task distillation, huawei-noah/Pretrained-Language-Model
TinyBERT/task_distill.py, fits STS-B's prediction layer to the labels with MSE; with
`ce_weight=1, kd_weight=0` kd is that.) A softmax temperature has no meaning for one score and
is not used. Methods whose losses are defined on class distributions have no
regression form and are refused (`check_method`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bkd_jax.distillers.base import Distiller, Forward, Loss, Objective

METHODS = ("ce", "kd", "blockkd", "blockkd_lite")


def check_method(method: str, knobs: Mapping[str, Any]) -> None:
    """Raises ValueError in one line unless `method` with `knobs` has a regression form."""
    if method not in METHODS:
        raise ValueError(
            f"method {method!r} has no regression form (its loss is defined on class "
            f"distributions); a regression task (STS-B) takes one of {', '.join(METHODS)}"
        )
    if knobs.get("standardize"):
        raise ValueError(f"method {method!r}: standardize z-scores class logits, not one score")
    if method.startswith("blockkd") and (knobs["distance"] != "kd" or knobs["feature_method"]):
        raise ValueError(
            f"method {method!r} on a regression task distils with MSE: leave distance "
            "at 'kd' and feature_method empty"
        )


def mse(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error, in float32, between (batch, 1) scores and (batch[, 1]) targets."""
    scores = jnp.asarray(scores, jnp.float32).reshape(scores.shape[0])
    targets = jnp.asarray(targets, jnp.float32).reshape(targets.shape[0])
    return jnp.mean(jnp.square(scores - targets))


def _ce(out: Forward, batch: Mapping[str, jax.Array], r: jax.Array) -> Loss:
    del r
    task = mse(out.student_logits, batch["label"])
    return Loss(task, jnp.zeros((), jnp.float32), {"mse": task})


def _kd(knobs: Mapping[str, Any]) -> Objective:
    def objective(out: Forward, batch: Mapping[str, jax.Array], r: jax.Array) -> Loss:
        del r
        task = mse(out.student_logits, batch["label"])
        distill = mse(out.student_logits, out.teacher_logits)
        metrics = {"mse": task, "kd": distill}
        return Loss(knobs["ce_weight"] * task, knobs["kd_weight"] * distill, metrics)

    return objective


def blockkd_terms(
    student: jax.Array,
    stones: Mapping[int, jax.Array],
    teacher: jax.Array,
    labels: jax.Array,
    *,
    num_blocks: int,
    with_cross: bool = True,
) -> dict[str, jax.Array]:
    """Block-KD's unweighted terms on scores: "task", "distill", "cross" and per model.

        L_task    = MSE(s, y) + sum_i w_i MSE(s_i, y)
        L_distill = MSE(s, t) + sum_i w_i MSE(s_i, t)
        L_cross   = MSE(s, e) + sum_i MSE(s_i, e),  e = stop_gradient(mean_i s_i)

    with w_i = 2^(i - num_blocks), the stone weights of `bkd_jax.losses.blockkd_loss`.
    """
    terms = {"task_student": mse(student, labels), "distill_student": mse(student, teacher)}
    for i, score in stones.items():
        terms[f"task_stone{i}"] = mse(score, labels)
        terms[f"distill_stone{i}"] = mse(score, teacher)
    for name in ("task", "distill"):
        terms[name] = terms[f"{name}_student"] + sum(
            2.0 ** (i - num_blocks) * terms[f"{name}_stone{i}"] for i in stones
        )
    terms["cross"] = jnp.zeros((), jnp.float32)
    if with_cross:
        ensemble = jax.lax.stop_gradient(
            jnp.mean(jnp.stack([jnp.asarray(s, jnp.float32) for s in stones.values()]), axis=0)
        )
        terms["cross_student"] = mse(student, ensemble)
        terms.update({f"cross_stone{i}": mse(s, ensemble) for i, s in stones.items()})
        terms["cross"] = terms["cross_student"] + sum(terms[f"cross_stone{i}"] for i in stones)
    return terms


def _blockkd(knobs: Mapping[str, Any], num_blocks: int) -> Objective:
    def objective(out: Forward, batch: Mapping[str, jax.Array], r: jax.Array) -> Loss:
        terms = blockkd_terms(
            out.student_logits, out.stone_logits, out.teacher_logits, batch["label"],
            num_blocks=num_blocks, with_cross=knobs["gamma"] != 0,
        )  # fmt: skip
        distill = r * (knobs["beta"] * terms["distill"] + knobs["gamma"] * terms["cross"])
        return Loss(knobs["alpha"] * terms["task"], distill, {**terms, "warmup": r})

    return objective


def regression_distiller(distiller: Distiller, knobs: Mapping[str, Any]) -> Distiller:
    """`distiller` (built for a 1-wide head) with its method's regression objective."""
    check_method(distiller.method, knobs)
    if distiller.method == "ce":
        objective = _ce
    elif distiller.method == "kd":
        objective = _kd(knobs)
    else:
        objective = _blockkd(knobs, distiller.modules.connectors.num_stones)
    return dataclasses.replace(distiller, objective=objective)
