"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

    L = ce_weight * CE(z_s, y) + feat_weight * sum_stages at_loss(F_s, F_t, p)

on every native block's output (mdistiller's `feats[1:]`; mdistiller/distillers/AT.py),
the larger map of a stage average-pooled to the smaller (`bkd_jax.losses.at_loss`). With
unequal stage counts the first stages are paired, as mdistiller's `zip`. No modules.
"""

from __future__ import annotations

from bkd_jax import losses
from bkd_jax.distillers.base import Recipe
from bkd_jax.distillers.feature_modules import (
    check_knobs,
    feature_method,
    feature_objective,
    first_stages,
)


def knobs() -> dict:
    return {
        "p": 2.0,  # mdistiller engine/cfg.py CFG.AT.P
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.AT.LOSS.CE_WEIGHT
        "feat_weight": 1000.0,  # mdistiller engine/cfg.py CFG.AT.LOSS.FEAT_WEIGHT
    }


def build(k, pair) -> Recipe:
    check_knobs("at", k, positive=("p",))

    def feature(out):
        return losses.at_loss(
            *first_stages(out.student_taps.blocks, out.teacher_taps.blocks), p=k["p"]
        )

    return Recipe(feature_objective("at", k, feature), taps=True)


METHOD = feature_method(
    "at", "Attention transfer: match normalised spatial attention maps per stage", knobs, build
)
