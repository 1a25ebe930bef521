"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019).

    L = ce_weight * CE(z_s, y) + feat_weight * sum_stages vid_loss(mu_i, F_t_i, alpha_i)

on every native block's output (mdistiller's `feats[1:]`; mdistiller/distillers/VID.py).
Stage i has a trainable regressor mu_i = conv1x1-ReLU-conv1x1-ReLU-conv1x1 (no biases,
PyTorch's default initialisation, as there) from the student's channels to the
teacher's, and a per-channel variance parameter alpha_i, the variance
softplus(alpha_i) + eps starting at `init_pred_var` (`bkd_jax.losses.vid_init_log_scale`).
A student map larger than the teacher's is average-pooled to its size before the
regressor, a smaller one is compared with the teacher's map pooled to its size
(`bkd_jax.losses.vid_loss`). With unequal stage counts the first stages are paired, as
mdistiller's `zip` when it builds the regressors (its loss indexes the teacher by the
student's stages, which fails when the student has more). The variances alpha_i train
with the regressors, as in RepDistiller's VIDLoss (github HobbitLong/RepDistiller,
distiller_zoo/VID.py, an nn.Parameter of a trained criterion, "code from author");
mdistiller keeps them in a plain list that its optimizer never sees, so they stay at
`init_pred_var` there.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax import losses
from bkd_jax.distillers.base import Recipe
from bkd_jax.distillers.feature_modules import (
    Heads,
    check_knobs,
    feature_method,
    feature_objective,
    first_stages,
    pool_to,
    tap_shapes,
    torch_default_kernel_init,
)


def knobs() -> dict:
    return {
        "eps": losses.VID_EPS,  # mdistiller engine/cfg.py CFG.VID.EPS = 1e-5
        "init_pred_var": losses.VID_INIT_PRED_VAR,  # mdistiller CFG.VID.INIT_PRED_VAR = 5.0
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.VID.LOSS.CE_WEIGHT
        "feat_weight": 1.0,  # mdistiller engine/cfg.py CFG.VID.LOSS.FEAT_WEIGHT
    }


class VIDRegressor(nn.Module):
    """The mean mu (three 1x1 convolutions) and the variance parameter alpha of one stage.

    Returns `(mu, alpha)`; a student map larger than `teacher_hw` is pooled to it first.
    """

    teacher_hw: tuple[int, int]
    channels: int  # the teacher's
    init_pred_var: float
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        del train
        if x.shape[1] > self.teacher_hw[0]:
            x = pool_to(x, self.teacher_hw)
        for i in range(3):
            if i:
                x = nn.relu(x)
            x = nn.Conv(
                self.channels, (1, 1), use_bias=False, dtype=self.dtype,
                kernel_init=torch_default_kernel_init, name=f"conv{i}",
            )(x)  # fmt: skip
        alpha = self.param(
            "log_scale",
            lambda _, shape: losses.vid_init_log_scale(shape[0], self.init_pred_var, self.eps),
            (self.channels,),
        )
        return x, alpha


def build(k, pair) -> Recipe:
    check_knobs("vid", k, positive=("eps", "init_pred_var"))
    if k["init_pred_var"] <= k["eps"]:
        raise ValueError(
            f"config.distill.vid.init_pred_var={k['init_pred_var']} must exceed "
            f"eps={k['eps']} (the variance softplus(alpha) + eps starts there)"
        )
    s_blocks, t_blocks = first_stages(
        tap_shapes(pair.student, pair.input_shape).blocks,
        tap_shapes(pair.teacher, pair.input_shape).blocks,
    )
    regressors = tuple(
        VIDRegressor(t[:2], t[2], k["init_pred_var"], k["eps"], pair.dtype) for t in t_blocks
    )
    n = len(regressors)
    heads = Heads("vid", regressors, lambda taps: taps.blocks[:n], s_blocks)

    def feature(out):
        teacher = out.teacher_taps.blocks[:n]
        return sum(
            losses.vid_loss(mu, ft, alpha, k["eps"])
            for (mu, alpha), ft in zip(out.extras["vid"], teacher)
        )

    return Recipe(feature_objective("vid", k, feature), heads, taps=True)


METHOD = feature_method(
    "vid", "VID: maximise a Gaussian lower bound on student-teacher mutual information",
    knobs, build,
)  # fmt: skip
