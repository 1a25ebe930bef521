"""Pure losses in float32: logit distances (`logit`) and the Block-KD objective (`blockkd`)."""

from bkd_jax.losses.blockkd import DISTANCES, blockkd_loss
from bkd_jax.losses.logit import (
    cross_entropy,
    dist_loss,
    dkd_loss,
    kd_loss,
    standardize_logits,
    wttm_loss,
)

__all__ = [
    "DISTANCES",
    "blockkd_loss",
    "cross_entropy",
    "dist_loss",
    "dkd_loss",
    "kd_loss",
    "standardize_logits",
    "wttm_loss",
]
