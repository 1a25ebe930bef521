"""RKD: Park et al., "Relational Knowledge Distillation" (CVPR 2019).

    L = ce_weight * CE(z_s, y) + feat_weight * (w_d L_distance + w_a L_angle)

on the pooled embeddings (mdistiller's `pooled_feat`; mdistiller/distillers/RKD.py;
`bkd_jax.losses.rkd_loss`, unsquared distances with eps 1e-12 as CFG.RKD.PDIST). The
embeddings may have different widths. No modules.
"""

from __future__ import annotations

from bkd_jax import losses
from bkd_jax.distillers.base import Recipe
from bkd_jax.distillers.feature_modules import check_knobs, feature_method, feature_objective


def knobs() -> dict:
    return {
        "distance_weight": 25.0,  # mdistiller engine/cfg.py CFG.RKD.DISTANCE_WEIGHT
        "angle_weight": 50.0,  # mdistiller engine/cfg.py CFG.RKD.ANGLE_WEIGHT
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.RKD.LOSS.CE_WEIGHT
        "feat_weight": 1.0,  # mdistiller engine/cfg.py CFG.RKD.LOSS.FEAT_WEIGHT
    }


def build(k, pair) -> Recipe:
    check_knobs(
        "rkd", k, nonnegative=("ce_weight", "feat_weight", "distance_weight", "angle_weight")
    )

    def feature(out):
        return losses.rkd_loss(
            out.student_taps.pooled, out.teacher_taps.pooled,
            distance_weight=k["distance_weight"], angle_weight=k["angle_weight"],
        )  # fmt: skip

    return Recipe(feature_objective("rkd", k, feature), taps=True)


METHOD = feature_method(
    "rkd", "Relational KD: distances and angles between the batch's embeddings", knobs, build
)
