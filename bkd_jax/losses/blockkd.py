"""The Block-KD objective over the stepping-stones' logits (docs/method.md, section 1).

The ensemble of the stepping-stones is a target, not a prediction: it carries no gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from bkd_jax.losses.distances import DISTANCES
from bkd_jax.losses.distances import distance as logit_distance
from bkd_jax.losses.logit import check_labels, check_pair, cross_entropy


def _check_blockkd_inputs(
    student_logits: jax.Array,
    stone_logits: Mapping[int, jax.Array],
    teacher_logits: jax.Array,
    labels: jax.Array,
    num_blocks: int,
    distance: str,
) -> None:
    what = "blockkd_loss"
    if distance not in DISTANCES:
        raise ValueError(
            f"{what}: unknown distance {distance!r}; expected one of {tuple(DISTANCES)}."
        )
    if not stone_logits:
        raise ValueError(f"{what}: stone_logits is empty; at least one stepping-stone is needed.")
    outside = sorted(i for i in stone_logits if not 1 <= i <= num_blocks)
    if outside:
        raise ValueError(
            f"{what}: stepping-stone indices {outside} are outside 1..{num_blocks} (num_blocks)."
        )
    check_pair(student_logits, teacher_logits, f"{what} (student vs teacher)")
    for i, logits in stone_logits.items():
        check_pair(logits, teacher_logits, f"{what} (stone {i} vs teacher)")
    check_labels(student_logits, labels, what)


def _stone_weight(i: int, num_blocks: int) -> float:
    """Weight w_i = 1 / 2^(n - i) of stepping-stone i: 1 for N_n, 1/2 for N_{n-1}, ..."""
    return 2.0 ** (i - num_blocks)


def _ensemble_target(stone_logits: Mapping[int, jax.Array]) -> jax.Array:
    """Y^ens: the float32 mean of the stepping-stones' logits, a target without gradient."""
    stacked = jnp.stack([jnp.asarray(logits, jnp.float32) for logits in stone_logits.values()])
    return jax.lax.stop_gradient(jnp.mean(stacked, axis=0))


def blockkd_loss(
    student_logits: jax.Array,
    stone_logits: Mapping[int, jax.Array],
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    num_blocks: int,
    temperature: float,
    alpha: float,
    beta: float,
    gamma: float,
    warmup: float | jax.Array = 1.0,
    distance: str = "kd",
    distance_knobs: Mapping[str, Any] | None = None,
    standardize: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Block-KD objective (docs/method.md, section 1).

        L_task    = CE(Y^S, y) + sum_i w_i CE(Y^{N_i}, y)
        L_distill = D(Y^S, Y^T) + sum_i w_i D(Y^{N_i}, Y^T)
        Y^ens     = stop_gradient(mean_i Y^{N_i})
        L_cross   = D(Y^S, Y^ens) + sum_i D(Y^{N_i}, Y^ens)
        L         = alpha L_task + beta warmup L_distill + gamma warmup L_cross

    with w_i = 1 / 2^(num_blocks - i), sums and mean over the stepping-stones present in
    `stone_logits`, and D the logit distance registered as `distance`
    (`bkd_jax.losses.distances`) at `temperature` with `distance_knobs`, on standardised
    logits when `standardize`.

    Args:
      student_logits: (batch..., classes) logits Y^S of the student.
      stone_logits: {i: logits of stepping-stone N_i}, 1-based, any subset of 1..num_blocks
        (the lightweight variant passes {n-1, n}).
      teacher_logits: logits Y^T of the frozen teacher.
      labels: integer (batch...,) class labels.
      num_blocks: n, the number of blocks the networks are cut into.
      temperature: tau of the distance.
      alpha, beta, gamma: weights of L_task, L_distill, L_cross. A Python `gamma == 0`
        skips L_cross entirely (it is never computed).
      warmup: r(t) in [0, 1], the linear warm-up factor of the distillation terms; may be
        a traced scalar.
      distance: a name in `bkd_jax.losses.DISTANCES` ("kd", "dkd", ...).
      distance_knobs: the distance's own knobs (DKD's alpha and beta, ...).
      standardize: z-score every logit vector per sample before the distance.

    Returns:
      `(loss, metrics)`. `metrics` holds float32 scalars: "loss", "task", "distill" and
      "cross" (the unweighted L_task, L_distill, L_cross; "cross" is 0 when skipped), and
      the unweighted per-model terms "ce_student", "kd_student", "ce_stone{i}",
      "kd_stone{i}" (D to the teacher, whichever distance) and, unless gamma is 0,
      "cross_student" and "cross_stone{i}" (D to the ensemble).
    """
    _check_blockkd_inputs(
        student_logits, stone_logits, teacher_logits, labels, num_blocks, distance
    )
    dist = functools.partial(
        logit_distance, distance, labels=labels, temperature=temperature,
        standardize=standardize, knobs=distance_knobs,
    )  # fmt: skip
    stones = sorted(stone_logits)
    metrics = {
        "ce_student": cross_entropy(student_logits, labels),
        "kd_student": dist(student_logits, teacher_logits),
    }
    for i in stones:
        metrics[f"ce_stone{i}"] = cross_entropy(stone_logits[i], labels)
        metrics[f"kd_stone{i}"] = dist(stone_logits[i], teacher_logits)

    def weighted(prefix: str) -> jax.Array:
        return metrics[f"{prefix}_student"] + sum(
            _stone_weight(i, num_blocks) * metrics[f"{prefix}_stone{i}"] for i in stones
        )

    task, distill = weighted("ce"), weighted("kd")
    cross = jnp.zeros((), jnp.float32)
    if gamma != 0:
        ensemble = _ensemble_target(stone_logits)
        metrics["cross_student"] = dist(student_logits, ensemble)
        for i in stones:
            metrics[f"cross_stone{i}"] = dist(stone_logits[i], ensemble)
        cross = metrics["cross_student"] + sum(metrics[f"cross_stone{i}"] for i in stones)
    loss = alpha * task + warmup * (beta * distill + gamma * cross)
    metrics.update(loss=loss, task=task, distill=distill, cross=cross)
    return loss, metrics
