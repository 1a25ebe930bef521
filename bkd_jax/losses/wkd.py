"""WKD's losses: Wasserstein distances for distillation (Lv et al., NeurIPS 2024).

WKD-L compares the student's and the teacher's predictions over the non-target classes
by a discrete Wasserstein distance, whose ground cost between two categories comes from
the teacher (1 - similarity of the categories), solved by Sinkhorn iterations with
entropic regularisation. WKD-F compares the Gaussian distributions (mean and diagonal
standard deviation per channel) of the student's projected and the teacher's feature maps
by the Wasserstein-2 distance between Gaussians, which for diagonal covariances is the
squared difference of the means plus that of the standard deviations.

Everything follows the authors' code (github JiamingLv/WKD,
mdistiller/distillers/WKD.py), including what the paper leaves out:
- WKD-L adds a target-class term -mean_n(p_t[y] log p_s[y]) at untempered softmaxes, at
  weight 1 whatever the WKD-L weight (which, and whose cosine decay, scales only the
  distance); the distance uses tempered softmaxes of the non-target logits and no tau^2.
- The cost is relu(cost) + 1e-8, the Sinkhorn kernel exp(-cost / lambda); u starts at
  1 / (classes - 1) and 10 iterations update v, then u, each with 1e-8 added to the
  denominators; the loss is the transport cost of the last plan, with gradients through
  the iterations.
- WKD-F's standard deviation is sqrt(unbiased variance + eps), per channel over each cell
  of a grid x grid adaptive pooling (cells as `adaptive_avg_pool2d` cuts them); the mean
  and standard-deviation terms are squared differences summed and divided by
  batch * grid^2, combined as mean_cov_ratio * mean term + std term.

The target class is masked instead of removed (the authors gather the (C-1) x (C-1) cost
of every example): a zero weight and a zero initial u give the same iterations, without
a (batch, C, C) array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bkd_jax.losses.logit import check_labels, check_pair

# Sinkhorn: cfg.py WKD.SINKHORN.LAMBDA, WKD.SINKHORN.ITER (every released config agrees).
WKD_SINKHORN_LAMBDA = 0.05
WKD_SINKHORN_ITERS = 10
# Added to the cost and to the Sinkhorn denominators in WKD.py.
_WKD_TINY = 1e-8
# Logit of a masked class: its softmax weight underflows to exactly 0 in float32.
_MASKED_LOGIT = -1e30


def wkd_cost_from_prototypes(prototypes: jax.Array, sharpen: float = 1.0) -> jax.Array:
    """The inter-category cost of WKD's `COST_MATRIX: "fc"`: 1 - cosine of class prototypes.

    `prototypes` are (classes, dim), the teacher's classifier rows. With `sharpen` s != 0
    the cost becomes 1 - exp(-s cost) (cfg.py WKD.COST_MATRIX_SHARPEN, 1.0 in every
    released config). The released configs use a CKA cost computed offline from the
    teacher's features instead; any (classes, classes) cost can be given to the loss.
    """
    p = jnp.asarray(prototypes, jnp.float32)
    p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)  # F.normalize
    cost = 1.0 - p @ p.T
    return 1.0 - jnp.exp(-sharpen * cost) if sharpen != 0 else cost


def sinkhorn_transport_cost(
    p: jax.Array, q: jax.Array, cost: jax.Array, *, reg: float, iters: int, support: jax.Array
) -> jax.Array:
    """sum_ij T_ij cost_ij per example, T the Sinkhorn plan between rows of p and q.

    `support` (batch, classes) is True where the classes take part; p and q are 0 off it.
    """
    cost = jax.nn.relu(cost) + _WKD_TINY
    kernel = jnp.exp(-cost / reg)
    u = jnp.where(support, 1.0 / jnp.sum(support, axis=-1, keepdims=True), 0.0)
    v = jnp.zeros_like(q)
    for _ in range(iters):
        v = q / (u @ kernel + _WKD_TINY)  # K^T u
        u = p / (v @ kernel.T + _WKD_TINY)  # K v
    # sum_ij u_i K_ij cost_ij v_j, without the (batch, C, C) plan.
    return jnp.sum(u * (v @ (kernel * cost).T), axis=-1)


def wkd_logit_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    cost: jax.Array,
    *,
    temperature: float,
    weight: float,
    sinkhorn_lambda: float = WKD_SINKHORN_LAMBDA,
    sinkhorn_iters: int = WKD_SINKHORN_ITERS,
) -> jax.Array:
    """WKD-L as released: target term + weight * Wasserstein distance of non-targets.

    `wkd_logit_loss_with_speration` of WKD.py (see the module docstring). Logits are
    (batch, classes), labels integer (batch,), cost (classes, classes).
    """
    check_pair(student_logits, teacher_logits, "wkd_logit_loss")
    check_labels(student_logits, labels, "wkd_logit_loss")
    num_classes = student_logits.shape[-1]
    if student_logits.ndim != 2 or cost.shape != (num_classes, num_classes):
        raise ValueError(
            f"wkd_logit_loss: logits must be (batch, classes) and the cost (classes, classes), "
            f"got {student_logits.shape} and {cost.shape}."
        )
    z_s = jnp.asarray(student_logits, jnp.float32)
    z_t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    target = labels[:, None] == jnp.arange(num_classes)
    log_p_s = jax.nn.log_softmax(z_s, axis=-1)
    p_t = jax.nn.softmax(z_t, axis=-1)
    target_term = -jnp.mean(jnp.sum(jnp.where(target, p_t * log_p_s, 0.0), axis=-1))

    def non_target(z):
        return jax.nn.softmax(jnp.where(target, _MASKED_LOGIT, z / temperature), axis=-1)

    distance = sinkhorn_transport_cost(
        non_target(z_s), non_target(z_t), jax.lax.stop_gradient(jnp.asarray(cost, jnp.float32)),
        reg=sinkhorn_lambda, iters=sinkhorn_iters, support=~target,
    )  # fmt: skip
    return target_term + weight * jnp.mean(distance)


def _cell_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    """adaptive_avg_pool2d's cells: [floor(i size / grid), ceil((i + 1) size / grid))."""
    return [(math.floor(i * size / grid), math.ceil((i + 1) * size / grid)) for i in range(grid)]


def _gaussian_cells(f: jax.Array, grid: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Mean and sqrt(unbiased variance + eps) per channel of each grid cell: (N, g, g, C)."""
    n, h, w, c = f.shape
    means, stds = [], []
    for h0, h1 in _cell_bounds(h, grid):
        for w0, w1 in _cell_bounds(w, grid):
            cell = f[:, h0:h1, w0:w1, :].reshape(n, -1, c)
            mean = jnp.mean(cell, axis=1)
            var = jnp.sum((cell - mean[:, None]) ** 2, axis=1) / (cell.shape[1] - 1)
            means.append(mean)
            stds.append(jnp.sqrt(var + eps))
    return jnp.stack(means, axis=1), jnp.stack(stds, axis=1)


def wkd_feature_loss(
    student_map: jax.Array,
    teacher_map: jax.Array,
    *,
    mean_cov_ratio: float,
    grid: int = 1,
    eps: float = 1e-5,
) -> jax.Array:
    """WKD-F as released: mean_cov_ratio * mean term + standard-deviation term.

    `wkd_feature_loss` of WKD.py on NHWC maps of equal shape (the student's after its
    projector); eps = 1e-5 is cfg.py WKD.EPS.
    """
    what = "wkd_feature_loss"
    if student_map.ndim != 4 or student_map.shape != teacher_map.shape:
        raise ValueError(
            f"{what}: maps must be NHWC of equal shape, got {student_map.shape} and "
            f"{teacher_map.shape}."
        )
    _, h, w, _ = student_map.shape
    if not 1 <= grid <= min(h, w):
        raise ValueError(f"{what}: grid must be in 1..{min(h, w)} for {h}x{w} maps, got {grid}.")
    sizes = [(b - a) * (d - c) for a, b in _cell_bounds(h, grid) for c, d in _cell_bounds(w, grid)]
    if min(sizes) < 2:
        raise ValueError(
            f"{what}: every grid cell needs 2 or more positions for a variance, got "
            f"{h}x{w} maps and grid {grid}."
        )
    mean_s, std_s = _gaussian_cells(jnp.asarray(student_map, jnp.float32), grid, eps)
    mean_t, std_t = _gaussian_cells(
        jax.lax.stop_gradient(jnp.asarray(teacher_map, jnp.float32)), grid, eps
    )
    scale = student_map.shape[0] * grid**2
    mean_term = jnp.sum((mean_s - mean_t) ** 2) / scale
    std_term = jnp.sum((std_s - std_t) ** 2) / scale
    return mean_cov_ratio * mean_term + std_term
