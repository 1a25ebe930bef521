"""Pure losses, float32 from log-softmax: the logit distances and the Block-KD objective."""

from bkd_jax.losses.logit import DISTANCES, blockkd_loss, cross_entropy, dkd_loss, kd_loss

__all__ = ["DISTANCES", "blockkd_loss", "cross_entropy", "dkd_loss", "kd_loss"]
