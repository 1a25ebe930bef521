"""Logit distances by name: the D that Block-KD's objective applies to every model it trains.

A distance is `(student_logits, target_logits, labels, *, temperature, **knobs) -> scalar`,
float32, summed over classes and averaged over the batch like every loss here; the target
is the teacher's logits or the stepping-stones' ensemble. `register_distance` adds one;
`distance` applies one by name, optionally on standardised logits.

Besides the distances of KD, DKD, DIST and WTTM, two methods serve as distances in this
project's extension of Block-KD (its paper has neither): "wkd_l", WKD-L as released (target
term plus the weighted Sinkhorn distance of the non-target predictions), whose ground cost
the caller derives from the teacher and passes as the knob `cost`; and "mlkd", MLKD's
instance, class and batch terms of one view (`mlkd_weak_view_loss`), the only view a
stepping-stone sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from bkd_jax.losses.logit import dist_loss, dkd_loss, kd_loss, standardize_logits, wttm_loss
from bkd_jax.losses.mlkd import mlkd_weak_view_loss
from bkd_jax.losses.wkd import wkd_logit_loss

Distance = Callable[..., jax.Array]


def _kd(student_logits, target_logits, labels, *, temperature):
    del labels
    return kd_loss(student_logits, target_logits, temperature)


def _dkd(student_logits, target_logits, labels, *, temperature, alpha, beta):
    return dkd_loss(
        student_logits, target_logits, labels, alpha=alpha, beta=beta, temperature=temperature
    )


def _dist(student_logits, target_logits, labels, *, temperature, beta, gamma):
    del labels
    return dist_loss(student_logits, target_logits, beta=beta, gamma=gamma, temperature=temperature)


def _wttm(student_logits, target_logits, labels, *, temperature, gamma):
    del labels, temperature  # WTTM's exponent gamma plays the temperature's part
    return wttm_loss(student_logits, target_logits, gamma=gamma)


def _wkd_l(
    student_logits, target_logits, labels, *, temperature, logit_weight, cost, sinkhorn_lambda,
    sinkhorn_iters,
):  # fmt: skip
    """WKD-L as released, its (classes, classes) `cost` derived from the teacher."""
    return wkd_logit_loss(
        student_logits, target_logits, labels, cost, temperature=temperature,
        weight=logit_weight, sinkhorn_lambda=sinkhorn_lambda, sinkhorn_iters=sinkhorn_iters,
    )  # fmt: skip


def _mlkd(student_logits, target_logits, labels, *, temperature, released):
    del labels
    return mlkd_weak_view_loss(
        student_logits, target_logits, temperature=temperature, released=released
    )


DISTANCES: dict[str, Distance] = {
    "kd": _kd,
    "dkd": _dkd,
    "dist": _dist,
    "wttm": _wttm,
    "wkd_l": _wkd_l,
    "mlkd": _mlkd,
}


def register_distance(name: str, fn: Distance) -> None:
    """Makes `fn` available as Block-KD's distance `name`."""
    if name in DISTANCES:
        raise ValueError(f"a logit distance named {name!r} is already registered")
    DISTANCES[name] = fn


def distance(
    name: str,
    student_logits: jax.Array,
    target_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float,
    standardize: bool = False,
    knobs: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Distance `name` between the student's and the target's logits.

    With `standardize`, both are z-scored per sample first (`standardize_logits`).
    """
    if name not in DISTANCES:
        raise ValueError(f"unknown logit distance {name!r}; known: {', '.join(DISTANCES)}")
    if standardize:
        student_logits = standardize_logits(student_logits)
        target_logits = standardize_logits(target_logits)
    return DISTANCES[name](
        student_logits, target_logits, labels, temperature=temperature, **(knobs or {})
    )
