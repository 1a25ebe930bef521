"""The optimizers of mdistiller's recipes (SGD with momentum and L2 decay, DOT) and AdamW.

PyTorch's `SGD(weight_decay=wd)` adds `wd * w` to the gradient before momentum; optax's
`add_decayed_weights` placed before `sgd` does the same.

AdamW (Loshchilov & Hutter, ICLR 2019), for DeiT-style ViT students: Adam with decoupled
weight decay, `w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)`, which is PyTorch's
`AdamW` (it scales w by 1 - lr * wd before the Adam step). The decay is masked off, as
timm's optimizer factory does for DeiT (pytorch-image-models timm/optim/optim_factory.py:
parameters of one dimension or named ".bias", and the model's `no_weight_decay()`, which
for a ViT is {"pos_embed", "cls_token"}, timm/models/vision_transformer.py): biases and
norm scales (every parameter of fewer than two dimensions) and the parameters named in
`NO_DECAY_NAMES` (position embeddings, class tokens, the class-token offsets of Block-KD's
token connectors).

Learning-rate schedules (`optim.schedule`), each after an optional linear warm-up from 0
over `warmup_epochs`:

- ``step`` (mdistiller's): the rate drops by `decay_factor` at each epoch in
  `decay_epochs`, counted from the start of training (warm-up included).
- ``cosine``: from `learning_rate` at the end of the warm-up to `min_learning_rate`
  (default 0) at the last step, ``min + (lr - min) * (1 + cos(pi * t / T)) / 2`` with t the
  steps since the warm-up and T the steps left after it (Loshchilov & Hutter, SGDR);
  `decay_epochs` is ignored.

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

OPTIMIZERS = ("sgd", "dot", "adamw")
SCHEDULES = ("step", "cosine")


def learning_rate_schedule(
    cfg, steps_per_epoch: int, total_steps: int | None = None
) -> optax.Schedule:
    """The learning rate over steps from `cfg` (an `optim` config).

    `total_steps` (the run's length) is needed by the cosine schedule only.
    """
    kind = cfg.get("schedule", "step")
    warmup_steps = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    if kind == "step":
        # After the warm-up, join_schedules counts steps from its end: shift the boundaries.
        boundaries = {
            int(e * steps_per_epoch) - warmup_steps: cfg.decay_factor for e in cfg.decay_epochs
        }
        schedule = optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
    elif kind == "cosine":
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(
                f"the cosine schedule needs total_steps beyond the {warmup_steps} warm-up "
                f"steps, got {total_steps}"
            )
        floor = cfg.get("min_learning_rate", 0.0)
        if not 0 <= floor <= cfg.learning_rate:
            raise ValueError(
                f"optim.min_learning_rate={floor} must lie in [0, learning_rate="
                f"{cfg.learning_rate}]"
            )
        alpha = floor / cfg.learning_rate if floor else 0.0  # the end as a fraction of lr
        schedule = optax.cosine_decay_schedule(cfg.learning_rate, total_steps - warmup_steps, alpha)
    else:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    if not warmup_steps:
        return schedule
    ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup_steps)
    return optax.join_schedules([ramp, schedule], [warmup_steps])


# Parameters AdamW never decays whatever their shape (module docstring).
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "prefix_offset"})


def decay_mask(params: Any) -> Any:
    """True for the parameters AdamW decays: two or more dimensions, not in NO_DECAY_NAMES."""

    def decays(path, leaf) -> bool:
        names = {getattr(key, "key", None) for key in path}
        return jnp.ndim(leaf) >= 2 and not names & NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


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


def check_optimizer(name: str, required: str | None = None, method: str = "the method") -> None:
    """Raises ValueError unless `name` is an optimiser and, when a method requires one
    (`Method.optimizer`: DOT is its own optimiser), that one; a config naming another is
    refused rather than silently replaced."""
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optim.name must be one of {OPTIMIZERS}, got {name!r}")
    if required is not None and name != required:
        raise ValueError(f"{method} requires config.optim.name={required!r}, got {name!r}")


def make_optimizer(
    cfg, steps_per_epoch: int, required: str | None = None, total_steps: int | None = None
) -> optax.GradientTransformation | SplitGradientTransformation:
    """The optimizer `cfg.name` of an `optim` config.

    "sgd": SGD (momentum, nesterov off by default) with weight decay on every parameter.
    "dot": DOT with the same learning rate, momentum and weight decay, and `cfg.dot_delta`.
    "adamw": AdamW with `cfg.b1`, `cfg.b2`, `cfg.eps`, decay `cfg.weight_decay` masked by
    `decay_mask`.
    `required` is the optimiser the method requires (`check_optimizer`), `total_steps` the
    length of the run (the cosine schedule needs it).
    """
    name = cfg.get("name", "sgd")
    check_optimizer(name, required)
    schedule = learning_rate_schedule(cfg, steps_per_epoch, total_steps)
    if name == "dot":
        return dot(schedule, cfg.momentum, cfg.dot_delta, cfg.weight_decay)
    if name == "adamw":
        return optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )  # fmt: skip
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(
            schedule,
            momentum=cfg.momentum,
            nesterov=cfg.get("nesterov", False),
        ),
    )
