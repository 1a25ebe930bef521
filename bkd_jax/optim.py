"""The optimizers of mdistiller's recipes: SGD with momentum and L2 decay, and DOT.

PyTorch's `SGD(weight_decay=wd)` adds `wd * w` to the gradient before momentum; optax's
`add_decayed_weights` placed before `sgd` does the same. The learning rate drops by
`decay_factor` at each epoch in `decay_epochs`, an optional linear warm-up first.

DOT, the Distillation-Oriented Trainer (Zhao et al., ICCV 2023; mdistiller
engine/dot.py), keeps two momentum buffers: one for the gradient of the task loss (with
the weight decay), with momentum `momentum - delta`, and one for the gradient of the
distillation loss, with `momentum + delta`; a step moves the weights by the learning rate
times their sum. It needs the two gradients apart, so it is a `SplitGradientTransformation`,
which the train step (`bkd_jax.steps`) feeds both. mdistiller's DOT recipes
(configs/cifar100/dot/*.yaml) use SGD's momentum 0.9 and delta 0.075 (engine/cfg.py
CFG.SOLVER.DOT.DELTA).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "dot")


def learning_rate_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant learning rate over steps from `cfg` (an `optim` config)."""
    boundaries = {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs}
    schedule = optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
    warmup_steps = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    if not warmup_steps:
        return schedule
    ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup_steps)
    return optax.join_schedules([ramp, schedule], [warmup_steps])


class SplitGradientTransformation(NamedTuple):
    """An optimizer of two gradients: `update(task_grads, distill_grads, state, params)`."""

    init: Any
    update: Any


class DotState(NamedTuple):
    count: jax.Array
    task_momentum: Any
    distill_momentum: Any


def dot(
    learning_rate: optax.ScalarOrSchedule, momentum: float, delta: float, weight_decay: float
) -> SplitGradientTransformation:
    """DOT: `v_t = (m - delta) v_t + g_task + wd w`, `v_d = (m + delta) v_d + g_distill`,
    `w -= lr (v_t + v_d)`, both buffers starting at zero (PyTorch's first step, which copies
    the gradient into the buffer, is the same)."""
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return DotState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(task_grads, distill_grads, state: DotState, params):
        task = jax.tree.map(
            lambda v, g, w: (momentum - delta) * v + g + weight_decay * w,
            state.task_momentum, task_grads, params,
        )  # fmt: skip
        distill = jax.tree.map(
            lambda v, g: (momentum + delta) * v + g, state.distill_momentum, distill_grads
        )
        lr = schedule(state.count)
        updates = jax.tree.map(lambda a, b: -lr * (a + b), task, distill)
        return updates, DotState(state.count + 1, task, distill)

    return SplitGradientTransformation(init, update)


def make_optimizer(
    cfg, steps_per_epoch: int, name: str | None = None
) -> optax.GradientTransformation | SplitGradientTransformation:
    """The optimizer `name` (default `cfg.name`) of an `optim` config.

    "sgd": SGD (momentum, nesterov off by default) with weight decay on every parameter.
    "dot": DOT with the same learning rate, momentum and weight decay, and `cfg.dot_delta`.
    """
    name = name or cfg.get("name", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optim.name must be one of {OPTIMIZERS}, got {name!r}")
    schedule = learning_rate_schedule(cfg, steps_per_epoch)
    if name == "dot":
        return dot(schedule, cfg.momentum, cfg.dot_delta, cfg.weight_decay)
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(
            schedule,
            momentum=cfg.momentum,
            nesterov=cfg.get("nesterov", False),
        ),
    )
