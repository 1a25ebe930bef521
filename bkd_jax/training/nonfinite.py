"""NaN and Inf caught at the step where they appear, without a host round trip per step.

`guard_step` wraps a train step inside its jit: it adds ``metrics["finite"]``, 1.0 when
the loss, every loss term, the gradient norm and the updated parameters are all finite.
With ``on_nonfinite="skip"`` it also keeps the previous parameters, batch statistics and
optimizer state when they are not (the step counter still advances, so the data stream
stays a function of the step).

The loop keeps each step's metrics on the device and reads them (`find`) at the steps that
log, evaluate or save: every step up to a checkpoint has been checked before it is written,
so a checkpoint never holds a non-finite state, and the step named is the first bad one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

MODES = ("stop", "skip")
FINITE = "finite"


def guard_step(train_step: Callable, mode: str) -> Callable:
    """`train_step(state, teacher_vars, batch) -> (state, metrics)` with the finite flag.

    Args:
      train_step: a step of `bkd_jax.steps.make_train_step`, whose metrics are scalars.
      mode: "stop" (the update is applied; the loop stops) or "skip" (it is not applied).
    """
    if mode not in MODES:
        raise ValueError(f"on_nonfinite must be one of {MODES}, got {mode!r}")

    def guarded(state, teacher_vars, batch):
        new_state, metrics = train_step(state, teacher_vars, batch)
        checks = [jnp.isfinite(v) for v in jax.tree.leaves(metrics)]
        checks.append(jnp.isfinite(optax.global_norm(new_state.params)))
        finite = jnp.all(jnp.stack(checks))
        if mode == "skip":
            kept = state.replace(step=new_state.step)
            new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, kept)
        return new_state, {**metrics, FINITE: finite.astype(jnp.float32)}

    return guarded


def terms(metrics: Mapping[str, float]) -> list[str]:
    """The names of the non-finite values among one step's (fetched) metrics."""
    names = [k for k, v in metrics.items() if k != FINITE and not math.isfinite(float(v))]
    return names or ["updated parameters"]


def find(checked: Sequence[tuple[int, Mapping[str, Any]]]) -> list[tuple[int, list[str]]]:
    """`(step, non-finite names)` of every step whose fetched metrics are not all finite."""
    return [(step, terms(m)) for step, m in checked if not float(m[FINITE])]
