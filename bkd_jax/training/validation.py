"""Checks of a config's names and numbers that need no data, no devices and no TensorFlow.

`validate_config` runs first, so a misspelt model or method, a knob of another method, or
a missing teacher checkpoint is reported in the time it takes to import JAX.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from bkd_jax import distillers, models, optim
from bkd_jax.data import datasets
from bkd_jax.training import nonfinite

# The compute dtypes a config (and the bench's --dtype) may name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for the first problem found in `config`'s names and numbers."""
    method = distillers.get(config.distill.method)
    distillers.method_knobs(config.distill)
    names = [config.student] + ([config.teacher] if method.needs_teacher else [])
    for name in names:
        if name not in models.available():
            raise ValueError(f"unknown model {name!r}; known: {', '.join(models.available())}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
    optim.check_optimizer(config.optim.name, method.optimizer, f"method {method.name!r}")
    if method.needs_teacher and not config.teacher_checkpoint:
        raise ValueError(
            f"method {method.name!r} distils from a teacher: set "
            "config.teacher_checkpoint to the workdir of a method=ce run or to a directory "
            "written by `python -m bkd_jax.convert`"
        )
    _check_dataset_fields(config.dataset)
    if "strong_view" in method.consumes and config.dataset.strong_view == "none":
        raise ValueError(
            f"method {method.name!r} trains on two views of every image: set "
            "config.dataset.strong_view='randaugment'"
        )
    for field in ("global_batch_size", "eval_batch_size", "log_every_steps"):
        if config[field] < 1:
            raise ValueError(f"config.{field} must be positive, got {config[field]}")
    if config.on_nonfinite not in nonfinite.MODES:
        raise ValueError(
            f"config.on_nonfinite must be one of {nonfinite.MODES}, got {config.on_nonfinite!r}"
        )


def _check_dataset_fields(ds_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless `ds_config` has the fields of the data set it names: a
    name changed in code (not on the command line, where `bkd_jax.console` brings the new
    data set's fields) leaves the old data set's."""
    missing = sorted(set(datasets.default_dataset_config(ds_config.name)) - set(ds_config))
    if missing:
        raise ValueError(
            f"config.dataset names {ds_config.name!r} without its fields {', '.join(missing)}: "
            f"build it with base_config({ds_config.name!r}, ...), or pass it through "
            "bkd_jax.data.datasets.switch_dataset(config.dataset, <the name it was built for>)"
        )
