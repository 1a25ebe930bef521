"""The distillation methods: what each trains besides the student, and its loss.

A `Distiller` bundles a student, an optional frozen teacher, optional Block-KD connectors
and an objective. Its forward pass runs the teacher once (inference mode, no gradient),
the student once, and, for Block-KD, the stepping-stones from the student's features.

Registry (`METHODS`), with the knobs each reads from the `distill` config:

- ``ce``: cross-entropy only; how teachers are trained.
- ``kd``: Hinton et al. ``ce_weight * CE + kd_weight * KD(tau)``.
- ``dkd``: Zhao et al. ``ce_weight * CE + r(t) * DKD(dkd_alpha, dkd_beta, tau)``.
- ``blockkd``: the Block-KD objective of docs/method.md (alpha, beta, gamma, tau, distance) over
  the stepping-stones in ``stones`` (default: all 1..n).
- ``blockkd_lite``: Block-KD over the deepest stones only (default {n-1, n}); set
  ``gamma = 0`` to also drop the cross term.

r(t) is `warmup_factor`: linear over ``warmup_epochs`` with epochs counted from 1, as in
mdistiller (the first epoch already gets 1 / warmup_epochs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bkd_jax import losses
from bkd_jax.blockwise import BlockNet, Variables, stepping_stones
from bkd_jax.connectors import Connectors, make_connectors

METHODS = ("ce", "kd", "dkd", "blockkd", "blockkd_lite")


class Forward(NamedTuple):
    """One forward pass of a distiller; variables are the updated ones when training."""

    student_logits: jax.Array
    teacher_logits: jax.Array | None
    stone_logits: dict[int, jax.Array]
    student_vars: Any
    connector_vars: Any


Objective = Callable[[Forward, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def warmup_factor(step: jax.Array, steps_per_epoch: int, warmup_epochs: float) -> jax.Array:
    """r(t) = min(1, epoch / warmup_epochs), epochs counted from 1; 1 when disabled."""
    if warmup_epochs <= 0:
        return jnp.ones((), jnp.float32)
    epoch = jnp.floor_divide(step, steps_per_epoch) + 1
    return jnp.minimum(1.0, epoch.astype(jnp.float32) / warmup_epochs)


@dataclasses.dataclass(frozen=True)
class Distiller:
    """A student, its frozen teacher (if any), Block-KD connectors (if any), an objective."""

    method: str
    student: BlockNet
    objective: Objective
    teacher: BlockNet | None = None
    connectors: Connectors | None = None
    stones: tuple[int, ...] = ()
    batch_stones: bool = True
    remat_teacher: bool = False

    def init_connectors(self, key: jax.Array) -> dict[str, Any]:
        """Variables of the extra trainable modules: the stones' connectors, or nothing."""
        return self.connectors.init(key, self.stones) if self.connectors else {}

    def forward(
        self,
        student_vars: Variables,
        connector_vars: Variables,
        teacher_vars: Variables | None,
        images: jax.Array,
        *,
        train: bool,
    ) -> Forward:
        teacher_logits = None
        if self.teacher is not None:
            teacher_vars = jax.lax.stop_gradient(teacher_vars)
            teacher_logits = jax.lax.stop_gradient(self.teacher.apply(teacher_vars, images))
        if self.connectors is None:
            out = self.student.apply(student_vars, images, train=train)
            logits, student_vars = out if train else (out, student_vars)
            return Forward(logits, teacher_logits, {}, student_vars, connector_vars)
        out = stepping_stones(
            self.student, student_vars, self.teacher, teacher_vars, self.connectors,
            connector_vars, images, stones=self.stones, train=train,
            batch_stones=self.batch_stones, remat_teacher=self.remat_teacher,
        )  # fmt: skip
        return Forward(
            out.student_logits, teacher_logits, out.stone_logits, out.student_vars,
            out.connector_vars,
        )  # fmt: skip

    def loss(
        self,
        student_vars: Variables,
        connector_vars: Variables,
        teacher_vars: Variables | None,
        batch: Mapping[str, jax.Array],
        warmup: jax.Array,
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any, Any]]:
        """Training loss; aux is (metrics, new student variables, new connector variables)."""
        out = self.forward(student_vars, connector_vars, teacher_vars, batch["image"], train=True)
        loss, metrics = self.objective(out, batch["label"], warmup)
        return loss, (metrics, out.student_vars, out.connector_vars)

    def eval_logits(
        self,
        student_vars: Variables,
        connector_vars: Variables,
        teacher_vars: Variables | None,
        images: jax.Array,
    ) -> dict[str, jax.Array]:
        """Inference-mode logits of the student, the teacher and each stepping-stone."""
        out = self.forward(student_vars, connector_vars, teacher_vars, images, train=False)
        logits = {"student": out.student_logits}
        if out.teacher_logits is not None:
            logits["teacher"] = out.teacher_logits
        logits.update({f"stone{i}": v for i, v in out.stone_logits.items()})
        return logits


def _ce_objective(out: Forward, labels: jax.Array, warmup: jax.Array):
    del warmup
    ce = losses.cross_entropy(out.student_logits, labels)
    return ce, {"loss": ce, "ce": ce}


def _kd_objective(cfg) -> Objective:
    def objective(out: Forward, labels: jax.Array, warmup: jax.Array):
        del warmup  # Hinton's KD has no warm-up in mdistiller's recipe.
        ce = losses.cross_entropy(out.student_logits, labels)
        kd = losses.kd_loss(out.student_logits, out.teacher_logits, cfg.temperature)
        loss = cfg.ce_weight * ce + cfg.kd_weight * kd
        return loss, {"loss": loss, "ce": ce, "kd": kd}

    return objective


def _dkd_objective(cfg) -> Objective:
    def objective(out: Forward, labels: jax.Array, warmup: jax.Array):
        ce = losses.cross_entropy(out.student_logits, labels)
        dkd = losses.dkd_loss(
            out.student_logits, out.teacher_logits, labels,
            alpha=cfg.dkd_alpha, beta=cfg.dkd_beta, temperature=cfg.temperature,
        )  # fmt: skip
        loss = cfg.ce_weight * ce + warmup * dkd
        return loss, {"loss": loss, "ce": ce, "dkd": dkd, "warmup": warmup}

    return objective


def _blockkd_objective(cfg, num_blocks: int) -> Objective:
    def objective(out: Forward, labels: jax.Array, warmup: jax.Array):
        loss, metrics = losses.blockkd_loss(
            out.student_logits, out.stone_logits, out.teacher_logits, labels,
            num_blocks=num_blocks, temperature=cfg.temperature, alpha=cfg.alpha,
            beta=cfg.beta, gamma=cfg.gamma, warmup=warmup, distance=cfg.distance,
            dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta,
        )  # fmt: skip
        return loss, {**metrics, "warmup": warmup}

    return objective


def _stones(cfg, method: str, n: int) -> tuple[int, ...]:
    if cfg.get("stones"):
        stones = tuple(sorted(int(i) for i in cfg.stones))
    elif method == "blockkd_lite":
        stones = tuple(range(max(1, n - 1), n + 1))
    else:
        stones = tuple(range(1, n + 1))
    if not all(1 <= i <= n for i in stones) or len(set(stones)) != len(stones):
        raise ValueError(f"distill.stones={stones} must be distinct indices in 1..{n}")
    return stones


def make_distiller(
    cfg,
    student: BlockNet,
    teacher: BlockNet | None,
    input_shape: Sequence[int],
    *,
    dtype: jnp.dtype = jnp.float32,
    batch_stones: bool = True,
    remat_teacher: bool = False,
) -> Distiller:
    """Builds the distiller `cfg.method` (see the module docstring for its fields).

    `input_shape` (NHWC) sizes the connectors; `dtype` is their compute dtype.
    `batch_stones` and `remat_teacher` are the cost options of `stepping_stones`.
    """
    method = cfg.method
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; known: {', '.join(METHODS)}")
    if method == "ce":
        return Distiller(method, student, _ce_objective)
    if teacher is None:
        raise ValueError(f"method {method!r} distils from a teacher, but none was given")
    if method == "kd":
        return Distiller(method, student, _kd_objective(cfg), teacher)
    if method == "dkd":
        return Distiller(method, student, _dkd_objective(cfg), teacher)
    if cfg.distance not in losses.DISTANCES:
        raise ValueError(
            f"distill.distance must be one of {losses.DISTANCES}, got {cfg.distance!r}"
        )
    grouping = cfg.get("grouping")
    connectors = make_connectors(
        student, teacher, input_shape,
        grouping=tuple(map(tuple, grouping)) if grouping else None,
        upsampling=cfg.upsampling, dtype=dtype,
    )  # fmt: skip
    n = connectors.num_stones
    return Distiller(
        method, student, _blockkd_objective(cfg, n), teacher, connectors,
        _stones(cfg, method, n), batch_stones, remat_teacher,
    )  # fmt: skip
