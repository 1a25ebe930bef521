"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer" (ECCV 2018).

    L = ce_weight * CE(z_s, y) + feat_weight * KL(q_t || p_s)

of the batch's cosine-similarity distributions of the pooled embeddings (mdistiller's
`pooled_feat`; mdistiller/distillers/PKT.py; `bkd_jax.losses.pkt_loss`). The embeddings
may have different widths. No modules.
"""

from __future__ import annotations

from bkd_jax import losses
from bkd_jax.distillers.base import Recipe
from bkd_jax.distillers.feature_modules import check_knobs, feature_method, feature_objective


def knobs() -> dict:
    return {
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.PKT.LOSS.CE_WEIGHT
        "feat_weight": 30000.0,  # mdistiller engine/cfg.py CFG.PKT.LOSS.FEAT_WEIGHT
    }


def build(k, pair) -> Recipe:
    check_knobs("pkt", k)

    def feature(out):
        return losses.pkt_loss(out.student_taps.pooled, out.teacher_taps.pooled)

    return Recipe(feature_objective("pkt", k, feature), taps=True)


METHOD = feature_method(
    "pkt", "Probabilistic KT: match the batch's similarity distributions", knobs, build
)
