"""MLKD's loss: Jin et al., "Multi-Level Logit Distillation" (CVPR 2023).

Predictions of a weak and a strong view of every image, each softened at five
temperatures (the knob tau and the fixed 3, 5, 2, 6), are aligned at three levels:
instance (KD, tau^2 KL per example), batch (the B x B Gram matrices P P^T, squared
difference summed over the entries / B) and class (the C x C matrices P^T P, / C). Two
confidence masks come from the teacher's weak-view softmax: examples whose top
probability is at most the batch median, and classes whose summed probability is at most
the median over classes (numpy's `percentile(., 50)`, linear interpolation).

The released code (github Jin-Ying/Multi-Level-Logit-Distillation,
mdistiller/distillers/KD_ours.py, `forward_train`) is the default, with its quirks, all
part of the published numbers:
- the masks multiply losses already averaged over the batch (kd_loss, cc_loss and bc_loss
  with reduce=True), so `(loss * mask).mean()` scales each term by the masked fraction
  (about 1/2) instead of selecting examples or classes;
- of the five "strong" KD terms, those at temperatures 2 and 6 are computed on the weak
  view (and unmasked);
- the strong-view class and batch terms are computed but left out of the loss.
So the loss is kd_weight * (KD_weak + KD_strong + CC_weak + BC_weak), and the task term
ce_weight * (CE(weak) + CE(strong)).

`released=False` is the paper's reading: the masks select (per-example KD and the
matrices' masked columns, the `reduce=False` lines left commented there), every strong
term is on the strong view, and the strong class (unmasked) and batch (example mask)
terms are added.

The logit-standardisation variant (github sunshangquan/logit-standardization-KD,
mdistiller/distillers/MLKD.py) z-scores the logits of the KD terms only (`standardize`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bkd_jax.losses.logit import check_pair, standardize_logits

# The fixed temperatures of KD_ours.py beside cfg.KD.TEMPERATURE, in its order.
MLKD_FIXED_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def _softmax(z: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.softmax(z / temperature, axis=-1)


def _kd_per_example(z_s: jax.Array, z_t: jax.Array, temperature: float) -> jax.Array:
    log_s = jax.nn.log_softmax(z_s / temperature, axis=-1)
    log_t = jax.nn.log_softmax(z_t / temperature, axis=-1)
    return temperature**2 * jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)


def _class_gap(z_s: jax.Array, z_t: jax.Array, temperature: float) -> jax.Array:
    """(P_t^T P_t - P_s^T P_s)^2 / C, a (C, C) matrix."""
    p_s, p_t = _softmax(z_s, temperature), _softmax(z_t, temperature)
    return (p_t.T @ p_t - p_s.T @ p_s) ** 2 / z_s.shape[-1]


def _batch_gap(z_s: jax.Array, z_t: jax.Array, temperature: float) -> jax.Array:
    """(P_t P_t^T - P_s P_s^T)^2 / B, a (B, B) matrix."""
    p_s, p_t = _softmax(z_s, temperature), _softmax(z_t, temperature)
    return (p_t @ p_t.T - p_s @ p_s.T) ** 2 / z_s.shape[0]


def _at_most_median(x: jax.Array) -> jax.Array:
    """1.0 where x <= its median (numpy's percentile 50, linear interpolation), else 0."""
    return (x <= jnp.percentile(x, 50.0)).astype(jnp.float32)


def _confidence_masks(teacher_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(example mask (B,), class mask (C,)) from the teacher's untempered softmax."""
    p_teacher = jax.nn.softmax(teacher_logits, axis=-1)
    return _at_most_median(jnp.max(p_teacher, axis=-1)), _at_most_median(jnp.sum(p_teacher, axis=0))


def _one_view_terms(z_s, z_t, temperatures, masks, kd, released: bool) -> jax.Array:
    """The masked instance, class and batch terms of one (weak) view, summed over taus."""
    example_mask, class_mask = masks
    if released:  # masks scale losses already averaged over the batch
        kd_terms = sum(jnp.mean(kd(z_s, z_t, tau)) for tau in temperatures)
        cc = sum(jnp.sum(_class_gap(z_s, z_t, tau)) for tau in temperatures)
        bc = sum(jnp.sum(_batch_gap(z_s, z_t, tau)) for tau in temperatures)
        return (kd_terms + bc) * jnp.mean(example_mask) + cc * jnp.mean(class_mask)
    return sum(
        jnp.mean(kd(z_s, z_t, tau) * example_mask)
        + jnp.sum(_class_gap(z_s, z_t, tau) * class_mask)
        + jnp.sum(_batch_gap(z_s, z_t, tau) * example_mask)
        for tau in temperatures
    )


def _kd_term(standardize: bool):
    def kd(z_s, z_t, tau):
        if standardize:
            z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
        return _kd_per_example(z_s, z_t, tau)

    return kd


def _as_pair(student_logits, target_logits) -> tuple[jax.Array, jax.Array]:
    """float32 logits, the target's without gradient."""
    return jnp.asarray(student_logits, jnp.float32), jax.lax.stop_gradient(
        jnp.asarray(target_logits, jnp.float32)
    )


def mlkd_loss(
    weak_student: jax.Array,
    weak_teacher: jax.Array,
    strong_student: jax.Array,
    strong_teacher: jax.Array,
    *,
    temperature: float,
    kd_weight: float,
    released: bool = True,
    standardize: bool = False,
) -> jax.Array:
    """MLKD's distillation term (module docstring) from the logits of both views.

    Logits are (batch, classes), float32 is used throughout, the teacher's are constants.
    """
    for s, t in ((weak_student, weak_teacher), (strong_student, strong_teacher)):
        check_pair(s, t, "mlkd_loss")
    if weak_student.ndim != 2 or weak_student.shape != strong_student.shape:
        raise ValueError(
            f"mlkd_loss: both views' logits must be (batch, classes) of one shape, got "
            f"{weak_student.shape} and {strong_student.shape}."
        )
    ws, wt = _as_pair(weak_student, weak_teacher)
    ss, st = _as_pair(strong_student, strong_teacher)
    temperatures = (temperature, *MLKD_FIXED_TEMPERATURES)
    masks = _confidence_masks(wt)
    kd = _kd_term(standardize)
    weak = _one_view_terms(ws, wt, temperatures, masks, kd, released)
    if released:
        strong = sum(jnp.mean(kd(ss, st, tau)) for tau in temperatures[:3]) + sum(
            jnp.mean(kd(ws, wt, tau)) for tau in temperatures[3:]
        )
    else:
        strong = sum(
            jnp.mean(kd(ss, st, tau))
            + jnp.sum(_class_gap(ss, st, tau))
            + jnp.sum(_batch_gap(ss, st, tau) * masks[0])
            for tau in temperatures
        )
    return kd_weight * (weak + strong)


def mlkd_weak_view_loss(
    student_logits: jax.Array,
    target_logits: jax.Array,
    *,
    temperature: float,
    released: bool = True,
) -> jax.Array:
    """MLKD's multi-level terms of a single view: instance, class and batch, unweighted.

    The weak-view part of `mlkd_loss` (its terms with kd_weight 1), the masks from the
    target's own softmax: what a model that sees one view, as Block-KD's stepping-stones
    do, can be distilled with (this project's extension; the MLKD paper has no such use).
    Logits are (batch, classes); the target's are constants.
    """
    check_pair(student_logits, target_logits, "mlkd_weak_view_loss")
    if jnp.ndim(student_logits) != 2:
        raise ValueError(
            f"mlkd_weak_view_loss: logits must be (batch, classes), got {student_logits.shape}."
        )
    z_s, z_t = _as_pair(student_logits, target_logits)
    temperatures = (temperature, *MLKD_FIXED_TEMPERATURES)
    return _one_view_terms(
        z_s, z_t, temperatures, _confidence_masks(z_t), _kd_term(False), released
    )
