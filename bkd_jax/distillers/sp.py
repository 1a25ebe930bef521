"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

    L = ce_weight * CE(z_s, y) + feat_weight * ||G_t - G_s||_F^2 / N^2

of the row-normalised batch Gram matrices of the last native block's output only
(mdistiller's `feats[-1]`; mdistiller/distillers/SP.py; `bkd_jax.losses.sp_loss`). The
maps may have any shapes. No modules.
"""

from __future__ import annotations

from bkd_jax import losses
from bkd_jax.distillers.base import Recipe
from bkd_jax.distillers.feature_modules import check_knobs, feature_method, feature_objective


def knobs() -> dict:
    return {
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.SP.LOSS.CE_WEIGHT
        "feat_weight": 3000.0,  # mdistiller engine/cfg.py CFG.SP.LOSS.FEAT_WEIGHT
    }


def build(k, pair) -> Recipe:
    check_knobs("sp", k)

    def feature(out):
        return losses.sp_loss([out.student_taps.blocks[-1]], [out.teacher_taps.blocks[-1]])

    return Recipe(feature_objective("sp", k, feature), taps=True)


METHOD = feature_method(
    "sp", "Similarity preserving: match the batch's Gram matrix of the last stage", knobs, build
)
