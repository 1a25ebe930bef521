"""CE: the label cross-entropy alone; how teachers and baseline students are trained."""

from __future__ import annotations

import jax.numpy as jnp

from bkd_jax import losses
from bkd_jax.distillers.base import Loss, Method, Recipe


def _objective(out, batch, warmup) -> Loss:
    del warmup
    ce = losses.cross_entropy(out.student_logits, batch["label"])
    return Loss(ce, jnp.zeros((), jnp.float32), {"ce": ce})


METHOD = Method(
    name="ce",
    summary="cross-entropy on the labels only (teachers, baselines)",
    knobs=dict,
    build=lambda knobs, pair: Recipe(_objective),
    needs_teacher=False,
)
