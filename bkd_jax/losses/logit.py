"""Logit losses: cross-entropy and the logit distances KD and DKD.

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

"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit given to masked classes: exp() of it underflows to exactly 0 in float32, while
# log-probabilities stay finite (an -inf would turn 0 * inf into NaN in the gradients).
_MASKED_LOGIT = -1e30


def _log_probs(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Float32 log-softmax of `logits / temperature` over the last axis."""
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) summed over the last axis, averaged over all leading axes."""
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def _target_mask(labels: jax.Array, num_classes: int) -> jax.Array:
    """Boolean (..., num_classes) mask, True at each example's label."""
    return labels[..., None] == jnp.arange(num_classes)


def check_pair(student_logits: jax.Array, teacher_logits: jax.Array, what: str) -> None:
    if student_logits.ndim < 2:
        raise ValueError(
            f"{what}: logits must have shape (batch..., classes), got {student_logits.shape}."
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{what}: logit shapes differ: {student_logits.shape} vs {teacher_logits.shape}."
        )


def check_labels(logits: jax.Array, labels: jax.Array, what: str) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{what}: labels must have shape {logits.shape[:-1]} for logits of shape "
            f"{logits.shape}, got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{what}: labels must be integer class indices, got {labels.dtype}.")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer `labels`, averaged over the batch."""
    check_labels(logits, labels, "cross_entropy")
    log_p = _log_probs(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[..., None], axis=-1))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Hinton's KD: tau^2 * KL(p_teacher || p_student) at temperature tau."""
    check_pair(student_logits, teacher_logits, "kd_loss")
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
    check_pair(student_logits, teacher_logits, "dkd_loss")
    check_labels(student_logits, labels, "dkd_loss")
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


def standardize_logits(logits: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Each sample's logits z-scored over the classes, in float32."""
    z = jnp.asarray(logits, jnp.float32)
    mean = jnp.mean(z, axis=-1, keepdims=True)
    return (z - mean) / (eps + jnp.std(z, axis=-1, keepdims=True))
