"""Defaults shared by every config in configs/: each field documented where it is set.

Config files call `base_config()` and override what their recipe changes; every
hyperparameter lives in a config, none in code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from bkd_jax import distillers
from bkd_jax.data import datasets


def parse_arguments(arg: str | None, defaults: dict[str, str]) -> dict[str, str]:
    """big_vision-style `key=value,...` config arguments over `defaults`; unknown keys fail."""
    args = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in args:
            raise ValueError(f"unknown config argument {key!r}; known: {', '.join(args)}")
        args[key] = value
    return args


def override(config: ml_collections.ConfigDict, updates: Mapping[str, Any]) -> None:
    """Sets the fields of nested `updates` in `config`; a field it lacks is a KeyError."""
    for key, value in updates.items():
        if isinstance(value, Mapping):
            override(config[key], value)
        else:
            config[key] = value


def distill_config(method: str) -> ml_collections.ConfigDict:
    """`config.distill`: the method and its knobs (`bkd_jax.distillers`, one module each)."""
    return distillers.default_config(method)


def optim_config(learning_rate: float, decay_epochs, weight_decay: float, name: str = "sgd"):
    return ml_collections.ConfigDict(
        {
            "name": name,  # sgd | dot | adamw (a method may require one: dot requires dot)
            "learning_rate": learning_rate,
            "schedule": "step",  # step (mdistiller's) | cosine; see bkd_jax/optim.py
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": weight_decay,
            "decay_epochs": tuple(decay_epochs),  # learning rate x decay_factor at each
            "decay_factor": 0.1,
            "warmup_epochs": 0.0,  # linear learning-rate warm-up
            "min_learning_rate": 0.0,  # where the cosine schedule ends
            # AdamW's (PyTorch's and optax's defaults, which DeiT keeps: facebookresearch/deit
            # main.py --opt-betas None, --opt-eps 1e-8).
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "dot_delta": 0.075,  # DOT's momentum split (mdistiller engine/cfg.py CFG.SOLVER.DOT)
        }
    )


def base_config(dataset: str, *, teacher: str, student: str, method: str):
    """A complete config with the documented defaults; recipes override fields."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dataset = datasets.default_dataset_config(dataset)
    if "strong_view" in distillers.get(method).consumes:  # MLKD's weak and strong views
        config.dataset.strong_view = "randaugment"
    config.teacher = teacher
    config.student = student
    # A checkpoint written by this trainer (a workdir of a `method=ce` run) or by
    # `python -m bkd_jax.convert`; required by every method but ce.
    config.teacher_checkpoint = config_dict.placeholder(str)
    # Optional initial student weights (same formats); with eval_only, the model evaluated.
    config.student_checkpoint = config_dict.placeholder(str)
    config.eval_only = False  # one pass over the eval split, no training
    config.distill = distill_config(method)
    # A method that is its own optimiser (DOT) names it; validation refuses another.
    optimizer = distillers.get(method).optimizer or "sgd"
    config.optim = optim_config(0.05, (150, 180, 210), 5e-4, optimizer)
    config.num_epochs = 240
    config.num_train_steps = config_dict.placeholder(int)  # overrides num_epochs when set
    config.global_batch_size = 64
    config.eval_batch_size = 256
    config.dtype = "float32"  # compute dtype of the models: float32 | bfloat16
    config.remat_teacher = False  # rematerialise teacher blocks on stone paths
    config.log_every_steps = 100
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.on_nonfinite = "stop"  # NaN/Inf in a loss term, gradient or weight: stop | skip
    config.tensorboard = True
    config.profile_steps = 0  # trace this many steps (after the first two) into workdir/profile
    return config


def dkd_beta_knobs(betas: Mapping[tuple[str, str], float]) -> dict[str, dict]:
    """Per-pair overrides `{method: {pair: updates}}` that set DKD's beta for `dkd` and for
    the DKD term of `blockkd` and `blockkd_lite` (their `.dkd` knobs), so that a config's
    per-pair betas of the authors reach every method that computes DKD."""

    def updates(method: str, beta: float) -> dict:
        knob = {"beta": beta} if method == "dkd" else {"dkd": {"beta": beta}}
        return {"distill": {method: knob}}

    methods = ("dkd", "blockkd", "blockkd_lite")
    return {m: {pair: updates(m, b) for pair, b in betas.items()} for m in methods}
