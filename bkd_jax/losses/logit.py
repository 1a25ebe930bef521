"""Classification and distillation losses: cross-entropy, KD, DKD and the Block-KD objective.

Every loss casts its logits to float32 and works from `jax.nn.log_softmax`, whatever dtype
the model computed in: bfloat16 log-probabilities of a 100- or 1000-way softmax lose the
small teacher probabilities that distillation is about, and log-softmax avoids the
overflow and `log(0)` of taking the log of a softmax. Per-example terms are summed over
classes and averaged over the batch (every leading axis), the convention of mdistiller,
whose recipes the paper follows; KL-based terms are scaled by tau^2 so that their gradient
scale does not depend on the temperature (Hinton et al., 2015).

DKD (Zhao et al., CVPR 2022) splits KD into TCKD, a KL between the binary
(target, non-target) distributions, and NCKD, a KL between the distributions over the
non-target classes. mdistiller builds the latter by subtracting 1000 from the target logit
before the softmax; here the target logit is pushed to -1e30 instead, which gives the
exactly renormalised non-target distributions in float32 (its probability underflows to
0) while keeping every log-probability finite, so no gradient is NaN.

`blockkd_loss` is the Block-KD objective of DESIGN.md section 1. The ensemble of the
stepping-stones is a target, not a prediction: it carries no gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Logit given to masked classes: exp() of it underflows to exactly 0 in float32, while
# log-probabilities stay finite (an -inf would turn 0 * inf into NaN in the gradients).
_MASKED_LOGIT = -1e30

DISTANCES = ("kd", "dkd")


def _log_probs(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Float32 log-softmax of `logits / temperature` over the last axis."""
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) summed over the last axis, averaged over all leading axes."""
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def _target_mask(labels: jax.Array, num_classes: int) -> jax.Array:
    """Boolean (..., num_classes) mask, True at each example's label."""
    return labels[..., None] == jnp.arange(num_classes)


def _check_pair(student_logits: jax.Array, teacher_logits: jax.Array, what: str) -> None:
    if student_logits.ndim < 2:
        raise ValueError(
            f"{what}: logits must have shape (batch..., classes), got {student_logits.shape}."
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{what}: logit shapes differ: {student_logits.shape} vs {teacher_logits.shape}."
        )


def _check_labels(logits: jax.Array, labels: jax.Array, what: str) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{what}: labels must have shape {logits.shape[:-1]} for logits of shape "
            f"{logits.shape}, got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{what}: labels must be integer class indices, got {labels.dtype}.")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer `labels`, averaged over the batch."""
    _check_labels(logits, labels, "cross_entropy")
    log_p = _log_probs(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[..., None], axis=-1))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Hinton's KD: tau^2 * KL(p_teacher || p_student) at temperature tau."""
    _check_pair(student_logits, teacher_logits, "kd_loss")
    kl = _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))
    return temperature**2 * kl


def _binary_log_probs(log_p: jax.Array, mask: jax.Array) -> jax.Array:
    """Log-probabilities (..., 2) of (target, non-target) from full log-probabilities."""
    log_target = jnp.sum(jnp.where(mask, log_p, 0.0), axis=-1)
    log_rest = jax.nn.logsumexp(jnp.where(mask, _MASKED_LOGIT, log_p), axis=-1)
    return jnp.stack([log_target, log_rest], axis=-1)


def _non_target_log_probs(logits: jax.Array, mask: jax.Array, temperature: float) -> jax.Array:
    """Log-probabilities over the non-target classes, renormalised (target ~ prob 0)."""
    masked = jnp.where(mask, _MASKED_LOGIT, jnp.asarray(logits, jnp.float32) / temperature)
    return jax.nn.log_softmax(masked, axis=-1)


def dkd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float,
    beta: float,
    temperature: float,
) -> jax.Array:
    """Decoupled KD: alpha * TCKD + beta * NCKD, each scaled by tau^2 (mdistiller's dkd.py).

    Args:
      student_logits: (batch..., classes).
      teacher_logits: same shape.
      labels: integer (batch...,) targets, which split the classes.
      alpha: weight of TCKD, the KL between the binary (target, non-target) distributions.
      beta: weight of NCKD, the KL between the distributions over the non-target classes.
      temperature: softmax temperature tau.

    Returns:
      The float32 scalar loss, summed over classes and averaged over the batch.
    """
    _check_pair(student_logits, teacher_logits, "dkd_loss")
    _check_labels(student_logits, labels, "dkd_loss")
    mask = _target_mask(labels, student_logits.shape[-1])
    tckd = _kl(
        _binary_log_probs(_log_probs(teacher_logits, temperature), mask),
        _binary_log_probs(_log_probs(student_logits, temperature), mask),
    )
    nckd = _kl(
        _non_target_log_probs(teacher_logits, mask, temperature),
        _non_target_log_probs(student_logits, mask, temperature),
    )
    return temperature**2 * (alpha * tckd + beta * nckd)


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
        raise ValueError(f"{what}: unknown distance {distance!r}; expected one of {DISTANCES}.")
    if not stone_logits:
        raise ValueError(f"{what}: stone_logits is empty; at least one stepping-stone is needed.")
    outside = sorted(i for i in stone_logits if not 1 <= i <= num_blocks)
    if outside:
        raise ValueError(
            f"{what}: stepping-stone indices {outside} are outside 1..{num_blocks} (num_blocks)."
        )
    _check_pair(student_logits, teacher_logits, f"{what} (student vs teacher)")
    for i, logits in stone_logits.items():
        _check_pair(logits, teacher_logits, f"{what} (stone {i} vs teacher)")
    _check_labels(student_logits, labels, what)


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
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Block-KD objective (DESIGN.md section 1).

        L_task    = CE(Y^S, y) + sum_i w_i CE(Y^{N_i}, y)
        L_distill = D(Y^S, Y^T) + sum_i w_i D(Y^{N_i}, Y^T)
        Y^ens     = stop_gradient(mean_i Y^{N_i})
        L_cross   = D(Y^S, Y^ens) + sum_i D(Y^{N_i}, Y^ens)
        L         = alpha L_task + beta warmup L_distill + gamma warmup L_cross

    with w_i = 1 / 2^(num_blocks - i), sums and mean over the stepping-stones present in
    `stone_logits`, and D the distance: `kd_loss` at `temperature` ("kd") or `dkd_loss`
    with `dkd_alpha`, `dkd_beta` at `temperature` ("dkd").

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
      distance: "kd" or "dkd".
      dkd_alpha, dkd_beta: DKD's TCKD and NCKD weights when distance is "dkd".

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
    if distance == "kd":
        dist = functools.partial(kd_loss, temperature=temperature)
    else:
        dist = functools.partial(
            dkd_loss, labels=labels, alpha=dkd_alpha, beta=dkd_beta, temperature=temperature
        )
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
