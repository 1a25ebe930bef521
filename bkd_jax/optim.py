"""The optimizer of mdistiller's recipes: SGD with momentum, L2 decay, step schedule.

PyTorch's `SGD(weight_decay=wd)` adds `wd * w` to the gradient before momentum; optax's
`add_decayed_weights` placed before `sgd` does the same. The learning rate drops by
`decay_factor` at each epoch in `decay_epochs`, an optional linear warm-up first.
"""

from __future__ import annotations

import optax


def learning_rate_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant learning rate over steps from `cfg` (an `optim` config)."""
    boundaries = {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs}
    schedule = optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
    warmup_steps = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    if not warmup_steps:
        return schedule
    ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup_steps)
    return optax.join_schedules([ramp, schedule], [warmup_steps])


def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum, nesterov off by default) with weight decay on every parameter."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(
            learning_rate_schedule(cfg, steps_per_epoch),
            momentum=cfg.momentum,
            nesterov=cfg.get("nesterov", False),
        ),
    )
