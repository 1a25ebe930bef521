"""KD-SVD: Lee et al., "Self-supervised Knowledge Distillation Using Singular Value
Decomposition" (ECCV 2018).

    L = ce_weight * CE(z_s, y) + feat_weight * kdsvd_loss(F_s, F_t, k)

over every native block's output (mdistiller's `feats[1:]`; mdistiller/distillers/KDSVD.py;
`bkd_jax.losses.kdsvd_loss`, which says what is decomposed). With unequal stage counts the
first stages are paired, as mdistiller's `zip`. The loss compares singular vectors over
a stage's width, so student and teacher maps of a stage must have the same width;
mdistiller fails where they do not (cross-architecture pairs). Here the larger map of
such a stage is average-pooled to the smaller one's size first, as mdistiller's AT and
NST do, so that every pair trains. No modules.
"""

from __future__ import annotations

from bkd_jax import losses
from bkd_jax.distillers.base import Recipe
from bkd_jax.distillers.feature_modules import (
    check_int,
    check_knobs,
    feature_method,
    feature_objective,
    first_stages,
)
from bkd_jax.losses.feature import pool_to_smaller


def knobs() -> dict:
    return {
        "k": 1,  # mdistiller engine/cfg.py CFG.KDSVD.K
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.KDSVD.LOSS.CE_WEIGHT
        "feat_weight": 1.0,  # mdistiller engine/cfg.py CFG.KDSVD.LOSS.FEAT_WEIGHT
    }


def build(k, pair) -> Recipe:
    check_knobs("kdsvd", k)
    top = check_int("kdsvd", "k", k["k"], 1)

    def feature(out):
        stages = zip(*first_stages(out.student_taps.blocks, out.teacher_taps.blocks))
        student, teacher = zip(*(pool_to_smaller(fs, ft) for fs, ft in stages))
        return losses.kdsvd_loss(student, teacher, k=top)

    return Recipe(feature_objective("kdsvd", k, feature), taps=True)


METHOD = feature_method(
    "kdsvd", "KD-SVD: relations of the stages' top singular vectors", knobs, build
)
