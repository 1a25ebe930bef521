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

Three further members of the logit family: logit standardisation (Sun et al., CVPR 2024),
a z-score pre-process applied to both models' logits before any of the distances above;
DIST (Huang et al., NeurIPS 2022), which matches Pearson correlations of the softened
predictions instead of the predictions themselves; and WTTM (Zheng and Yang, ICLR 2024),
which matches a power-transformed teacher with an untempered student. The power transform
and the correlations are computed from log-probabilities too, so logits of magnitude ~50
(probabilities far below float32's smallest normal number) stay exact.

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


def _kl_per_example(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) summed over the last axis, one value per example."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) summed over the last axis, averaged over all leading axes."""
    return jnp.mean(_kl_per_example(log_p, log_q))


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


# Floor under a sum of squares before its square root: sqrt has an infinite derivative at
# 0, so a constant row or column (variance 0) would otherwise give NaN gradients.
_TINY = float(jnp.finfo(jnp.float32).tiny)

# Added to the product of norms in a correlation, DIST's `cosine_similarity` eps
# (hunto/image_classification_sota, lib/models/losses/dist_kd.py: 1e-8).
_CORRELATION_EPS = 1e-8


def _safe_sqrt(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(x, _TINY))


def standardize_logits(logits: jax.Array, *, eps: float = 1e-7, ddof: int = 1) -> jax.Array:
    """Logit standardisation: each example's logits as z-scores over the classes.

    Returns `(z - mean(z)) / (eps + std(z))` in float32, mean and standard deviation over
    the last axis. Applied to the student's and the teacher's logits before the softmax at
    a base temperature tau, it gives each example and each model the temperature
    tau * std(z), so the student matches the teacher's logit relations, not their range
    (Sun et al., CVPR 2024). Gradients flow through the mean and the standard deviation,
    as in the authors' code.

    Defaults are those of the authors' code (github sunshangquan/logit-standardization-KD,
    `normalize` in mdistiller/distillers/KD.py, DKD.py, MLKD.py): torch's `Tensor.std`,
    the unbiased estimator (ddof=1), and eps=1e-7 added to the standard deviation
    (KD_ours.py and CTKD/distiller_zoo/KD.py divide without eps). ddof=0 gives the
    population standard deviation.

    Settings the authors pair it with (same repository):
      tools/train.py, `--logit-stand` with `--base-temp 2 --kd-weight 9` (the defaults):
        KD: temperature 2, KD weight 9 (CE weight 1, mdistiller/engine/cfg.py there;
        upstream mdistiller has CE 0.1, KD 0.9). DKD: alpha and beta each times 9 and
        DKD.T = 2 (commit 6b58661; commit 2ece47f instead set beta = 9 * (9 * alpha) = 81
        and left DKD.T at 4). MLKD: KD weight 9, base temperature 2 (its extra fixed
        temperatures 2, 3, 5, 6 are unchanged; only its KD terms are standardised, not
        its class- and batch-correlation terms).
      README.md, CIFAR-100 log names (loss, teacher, student, base temperature, KD weight):
        KD logs use base temperature 3 for vgg13-vgg8, resnet32x4-wrn_16_2,
        resnet32x4-wrn_40_2, wrn_40_2-MobileNetV2, vgg13-MobileNetV2 and
        ResNet50-MobileNetV2 (KD weight 1), 2 (KD weight 9) for the other pairs; the
        CTKD, DKD and MLKD logs linked there use 2 and 9.
      CTKD/scripts/run_cifar_distill.sh: CE 0.1, KD 9, kd_T 2; run_imagenet_distill.sh:
        CE 1, KD 2, kd_T 9 (CTKD's learned temperature range 1..20).
      configs/imagenet/r34_r18/kd_ours.yaml (ResNet-34 to ResNet-18): temperature 1,
        CE 0.5, KD 0.5, with the multi-temperature KD_ours distiller.

    Args:
      logits: (batch..., classes).
      eps: added to the standard deviation; constant logits map to 0.
      ddof: delta degrees of freedom of the standard deviation (divisor classes - ddof).

    Returns:
      Float32 array of the shape of `logits`.
    """
    if logits.ndim < 2 or logits.shape[-1] <= ddof:
        raise ValueError(
            f"standardize_logits: logits must have shape (batch..., classes) with more than "
            f"ddof={ddof} classes, got {logits.shape}."
        )
    z = jnp.asarray(logits, jnp.float32)
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    variance = jnp.sum(centred**2, axis=-1, keepdims=True) / (z.shape[-1] - ddof)
    return centred / (eps + _safe_sqrt(variance))


def _rescaled_probs(log_p: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """exp(log_p) divided by its maximum along `axis`, and the log of that maximum.

    With the largest entry at 1 a class whose probabilities are all tiny (large logits)
    keeps its relative values instead of underflowing to 0 in float32. The maximum is a
    constant to autodiff: exp(log_p) = exp(log_max) * rescaled holds exactly, so a
    function of (rescaled, log_max) has the gradient of the same function of exp(log_p).
    """
    log_max = jax.lax.stop_gradient(jnp.max(log_p, axis=axis, keepdims=True))
    return jnp.exp(log_p - log_max), jnp.squeeze(log_max, axis)


# exp(80) ~ 5.5e34: the largest rescaled eps kept finite (float32 overflows past ~88); a
# correlation whose eps term reaches it is below 1e-30 and counts as 0 either way.
_MAX_LOG_EPS_SCALE = 80.0


def _mean_correlation(log_p: jax.Array, log_q: jax.Array, axis: int) -> jax.Array:
    """The authors' Pearson correlation of exp(log_p) and exp(log_q) along `axis`, averaged.

    DIST's `cosine_similarity` of the centred probabilities a and b: (a.b) / (|a||b| + eps),
    eps = 1e-8 on the raw probabilities. Computed on rescaled vectors a = s_a a', b = s_b b'
    (`_rescaled_probs`, s the maximum probability) it reads (a'.b') / (|a'||b'| + eps /
    (s_a s_b)): the same value, eps carried through the rescaling, so it is exactly the
    authors' correlation also where a column's probabilities are all tiny (there the eps
    dominates and pulls the correlation towards 0, as in their code).
    """
    x, log_sx = _rescaled_probs(log_p, axis)
    y, log_sy = _rescaled_probs(log_q, axis)
    xc = x - jnp.mean(x, axis=axis, keepdims=True)
    yc = y - jnp.mean(y, axis=axis, keepdims=True)
    norms = _safe_sqrt(jnp.sum(xc**2, axis=axis)) * _safe_sqrt(jnp.sum(yc**2, axis=axis))
    log_eps = jnp.log(_CORRELATION_EPS) - log_sx - log_sy
    eps = jnp.exp(jnp.minimum(log_eps, _MAX_LOG_EPS_SCALE))
    return jnp.mean(jnp.sum(xc * yc, axis=axis) / (norms + eps))


def dist_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    beta: float,
    gamma: float,
    temperature: float,
) -> jax.Array:
    """DIST: tau^2 * (beta * inter-class + gamma * intra-class relation loss).

    With P = softmax(z / tau) of shape (examples, classes) for each model, the inter-class
    loss is 1 - the mean over examples of the Pearson correlation between the student's and
    the teacher's rows, the intra-class loss 1 - the mean over classes of the correlation
    between their columns (Huang et al., NeurIPS 2022). Leading axes are flattened into
    one example axis, which the intra-class term correlates across, so the value depends
    on the whole batch. The correlation is the authors' `(a.b) / (|a||b| + eps)`, eps = 1e-8
    on the raw centred probabilities: where a class column is nearly zero across the batch
    (most of ImageNet's 1,000 classes at tau 1) the eps pulls its correlation towards 0,
    and the published numbers include that. Computed on rescaled probabilities with the
    eps rescaled alike (see `_mean_correlation`), so nothing underflows in float32.

    First author's code, his classification framework as vendored in github
    hunto/LocalMamba, classification/lib/models/losses/: dist_kd.py takes
    `1 - pearson(...).mean()` over rows (inter), then over columns (intra), each times
    tau^2 (hunto/image_classification_sota's older copy has no temperature); kd_loss.py
    builds `dist` as beta = gamma = 1, tau = 1 and `dist_t<tau>` as beta = gamma = 1 at
    that tau, the total being ori_loss_weight * CE + kd_loss_weight * DIST. Its configs,
    classification/configs/strategies/distill/: dist_cifar.yaml `kd: dist_t4`, CE 1,
    kd_loss_weight 2 (so beta = gamma = 2, tau = 4 on CIFAR-100); resnet_dist.yaml
    (ImageNet, ResNet-34 teacher) `kd: dist`, CE 1, kd_loss_weight 2 (beta = gamma = 2,
    tau = 1).

    Args:
      student_logits: (batch..., classes), at least two examples.
      teacher_logits: same shape.
      beta: weight of the inter-class relation loss.
      gamma: weight of the intra-class relation loss.
      temperature: softmax temperature tau.

    Returns:
      The float32 scalar loss.
    """
    check_pair(student_logits, teacher_logits, "dist_loss")
    num_classes = student_logits.shape[-1]
    log_s = _log_probs(student_logits, temperature).reshape(-1, num_classes)
    log_t = _log_probs(teacher_logits, temperature).reshape(-1, num_classes)
    if log_s.shape[0] < 2:
        raise ValueError(
            "dist_loss: the intra-class relation needs at least 2 examples, got logits of "
            f"shape {student_logits.shape}."
        )
    inter = 1.0 - _mean_correlation(log_s, log_t, -1)
    intra = 1.0 - _mean_correlation(log_s, log_t, 0)
    return temperature**2 * (beta * inter + gamma * intra)


def wttm_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, gamma: float) -> jax.Array:
    """Weighted transformed teacher matching (WTTM; Zheng and Yang, ICLR 2024).

    The teacher's distribution p = softmax(z_t) is power-transformed and renormalised,
    p_gamma = p^gamma / U with U = sum_k p_k^gamma (equal to softmax(z_t / T) for
    gamma = 1 / T), and matched by the student at temperature 1: the per-example loss is
    U * KL(p_gamma || softmax(z_s)), averaged over the batch, with no tau^2 factor (as in
    the authors' code). U, the weight, is larger for smoother teacher predictions.
    p^gamma is formed as exp(gamma * log p) and renormalised with logsumexp.

    The knob is the paper's exponent gamma, which github zkxufo/TTM calls `--ttm_l` (its
    README.md identifies the two; distiller_zoo/wttm.py computes this loss). Its total is
    `-r` * CE + `-b` * WTTM (+ `-a` * an added loss) in helper/loops.py, defaults `-r` 1,
    `--ttm_l` 1 (train_student.py). Per-pair CIFAR-100 values of gamma and the weight
    beta are in the paper's appendix A.4, not in that repository; its README examples
    use gamma 0.1 with weight 45 (TTM, vgg13 to vgg8) and WTTM with gamma 0.2 at weight 4
    added to CRD at weight 0.8.

    Args:
      student_logits: (batch..., classes).
      teacher_logits: same shape.
      gamma: the power-transform exponent, 1 / temperature.

    Returns:
      The float32 scalar loss.
    """
    check_pair(student_logits, teacher_logits, "wttm_loss")
    powered = gamma * _log_probs(teacher_logits)
    log_weight = jax.nn.logsumexp(powered, axis=-1)
    log_target = powered - log_weight[..., None]
    kl = _kl_per_example(log_target, _log_probs(student_logits))
    return jnp.mean(jnp.exp(log_weight) * kl)
