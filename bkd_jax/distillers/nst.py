"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer" (2017).

    L = ce_weight * CE(z_s, y) + feat_weight * sum_stages MMD^2(F_s, F_t)

with the polynomial kernel on L2-normalised channel maps of every native block's output
(mdistiller's `feats[1:]`; mdistiller/distillers/NST.py), the larger map of a stage
average-pooled to the smaller (`bkd_jax.losses.nst_loss`). With unequal stage counts the
first stages are paired, as mdistiller's `zip`. No modules.
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
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.NST.LOSS.CE_WEIGHT
        "feat_weight": 50.0,  # mdistiller engine/cfg.py CFG.NST.LOSS.FEAT_WEIGHT
    }


def build(k, pair) -> Recipe:
    check_knobs("nst", k)

    def feature(out):
        return losses.nst_loss(*first_stages(out.student_taps.blocks, out.teacher_taps.blocks))

    return Recipe(feature_objective("nst", k, feature), taps=True)


METHOD = feature_method(
    "nst", "Neuron selectivity transfer: MMD of channel activation maps per stage", knobs, build
)
