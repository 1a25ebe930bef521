"""The optimizer of mdistiller's recipes: SGD with momentum, L2 decay, step schedule.

PyTorch's `SGD(weight_decay=wd)` adds `wd * w` to the gradient before momentum; optax's
`add_decayed_weights` placed before `sgd` does the same.

Learning-rate schedules (`optim.schedule`), each after an optional linear warm-up from 0
over `warmup_epochs`:

- ``step`` (mdistiller's): the rate drops by `decay_factor` at each epoch in
  `decay_epochs`, counted from the start of training (warm-up included).
- ``cosine``: from `learning_rate` at the end of the warm-up to 0 at the last step,
  ``lr * (1 + cos(pi * t / T)) / 2`` with t the steps since the warm-up and T the steps
  left after it (Loshchilov & Hutter, SGDR); `decay_epochs` is ignored.
"""

from __future__ import annotations

import optax

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
        schedule = optax.cosine_decay_schedule(cfg.learning_rate, total_steps - warmup_steps)
    else:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    if not warmup_steps:
        return schedule
    ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup_steps)
    return optax.join_schedules([ramp, schedule], [warmup_steps])


def make_optimizer(
    cfg, steps_per_epoch: int, total_steps: int | None = None
) -> optax.GradientTransformation:
    """SGD (momentum, nesterov off by default) with weight decay on every parameter."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(
            learning_rate_schedule(cfg, steps_per_epoch, total_steps),
            momentum=cfg.momentum,
            nesterov=cfg.get("nesterov", False),
        ),
    )
