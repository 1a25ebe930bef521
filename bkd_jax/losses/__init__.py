"""Pure losses in float32: logit losses (`logit`), logit distances by name (`distances`) and
the Block-KD objective (`blockkd`)."""

from bkd_jax.losses.blockkd import blockkd_loss
from bkd_jax.losses.distances import DISTANCES, distance, register_distance
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
    "distance",
    "dkd_loss",
    "kd_loss",
    "register_distance",
    "standardize_logits",
    "wttm_loss",
]
