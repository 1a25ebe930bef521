"""Defaults shared by every config in configs/: each field documented where it is set.

Config files call `base_config()` and override what their recipe changes; every
hyperparameter lives in a config, none in code.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

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


def distill_config(method: str) -> ml_collections.ConfigDict:
    """Knobs of every distiller (bkd_jax.distillers); unused ones are ignored."""
    return ml_collections.ConfigDict(
        {
            "method": method,  # ce | kd | dkd | blockkd | blockkd_lite
            "temperature": 4.0,  # tau of KD, DKD and Block-KD's distance
            "ce_weight": 0.1,  # KD and DKD: weight of the label cross-entropy
            "kd_weight": 0.9,  # KD: weight of the KD term
            "dkd_alpha": 1.0,  # DKD (and Block-KD with distance=dkd): TCKD weight
            "dkd_beta": 8.0,  # DKD: NCKD weight (per-pair values in the configs)
            "warmup_epochs": 20,  # r(t) of DKD and Block-KD; 0 disables
            "alpha": 1.0,  # Block-KD: weight of L_task
            "beta": 1.0,  # Block-KD: weight of L_distill
            "gamma": 1.0,  # Block-KD: weight of L_cross; 0 drops it (lite option)
            "distance": "kd",  # Block-KD's logit distance: kd | dkd
            "stones": (),  # stepping-stones used; () = all (blockkd), {n-1, n} (lite)
            "grouping": config_dict.placeholder(tuple),  # ((student cuts), (teacher cuts))
            "upsampling": "nearest",  # connectors' upsampling: nearest | bilinear
        }
    )


def optim_config(learning_rate: float, decay_epochs, weight_decay: float):
    return ml_collections.ConfigDict(
        {
            "learning_rate": learning_rate,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": weight_decay,
            "decay_epochs": tuple(decay_epochs),  # learning rate x decay_factor at each
            "decay_factor": 0.1,
            "warmup_epochs": 0.0,  # linear learning-rate warm-up
        }
    )


def base_config(dataset: str, *, teacher: str, student: str, method: str):
    """A complete config with the documented defaults; recipes override fields."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dataset = datasets.default_dataset_config(dataset)
    config.teacher = teacher
    config.student = student
    # A checkpoint written by this trainer (a workdir of a `method=ce` run) or by
    # `python -m bkd_jax.convert`; required by every method but ce.
    config.teacher_checkpoint = config_dict.placeholder(str)
    # Optional initial student weights (same formats); with eval_only, the model evaluated.
    config.student_checkpoint = config_dict.placeholder(str)
    config.eval_only = False  # one pass over the eval split, no training
    config.distill = distill_config(method)
    config.optim = optim_config(0.05, (150, 180, 210), 5e-4)
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
    return config
