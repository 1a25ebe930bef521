"""The distillation methods."""

from bkd_jax.distillers.base import METHODS, Distiller, Forward, make_distiller, warmup_factor

__all__ = ["METHODS", "Distiller", "Forward", "make_distiller", "warmup_factor"]
