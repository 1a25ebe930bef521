"""Pure train and eval steps: no I/O, no sharding; the trainer jits them with shardings.

The trainable state holds the student and the method's extra modules (Block-KD's
connectors, ...) side by side: ``params = {"student": ..., "modules": ...}``, and likewise
``batch_stats``. The teacher's variables are an argument of every step, never part of the
state: they are not differentiated, not updated and not donated. An optimizer that treats
the task and distillation gradients apart (`bkd_jax.optim.SplitGradientTransformation`,
DOT) gets both, from one forward pass and two backward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bkd_jax.distillers import Distiller
from bkd_jax.optim import SplitGradientTransformation

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: optax.OptState

    def variables(self, name: str) -> dict[str, Any]:
        """Flax variables of "student" or "modules"."""
        out = {"params": self.params[name]}
        if self.batch_stats.get(name):
            out["batch_stats"] = self.batch_stats[name]
        return out


def create_train_state(
    distiller: Distiller, optimizer: optax.GradientTransformation, key: jax.Array, images
) -> TrainState:
    """Fresh student and module variables (sized by `images`) and optimizer state."""
    student_key, module_key = jax.random.split(key)
    student = distiller.student.init(student_key, images)
    modules = distiller.init_modules(module_key)
    params = {"student": student["params"], "modules": modules.get("params", {})}
    batch_stats = {
        "student": student.get("batch_stats", {}),
        "modules": modules.get("batch_stats", {}),
    }
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optimizer.init(params))


def make_train_step(
    distiller: Distiller,
    optimizer: optax.GradientTransformation | SplitGradientTransformation,
    warmup: Callable[[jax.Array], jax.Array],
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, teacher_vars, batch) -> (state, metrics)`; `warmup(step)` is r(t)."""
    split = isinstance(optimizer, SplitGradientTransformation)

    def loss_fn(params, state: TrainState, teacher_vars, batch: Batch):
        loss, new_vars = distiller.loss(
            {"params": params["student"], "batch_stats": state.batch_stats["student"]},
            {"params": params["modules"], "batch_stats": state.batch_stats["modules"]},
            teacher_vars, batch, warmup(state.step),
        )  # fmt: skip
        return (loss.task, loss.distill), (loss.metrics, *new_vars)

    def train_step(state: TrainState, teacher_vars, batch: Batch):
        terms, backward, (metrics, student_vars, module_vars) = jax.vjp(
            lambda p: loss_fn(p, state, teacher_vars, batch), state.params, has_aux=True
        )
        one, zero = jnp.ones_like(terms[0]), jnp.zeros_like(terms[0])
        if split:
            (task_grads,) = backward((one, zero))
            (distill_grads,) = backward((zero, one))
            updates, opt_state = optimizer.update(
                task_grads, distill_grads, state.opt_state, state.params
            )
            grads = jax.tree.map(jnp.add, task_grads, distill_grads)
        else:
            (grads,) = backward((one, one))
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats={
                "student": student_vars.get("batch_stats", {}),
                "modules": module_vars.get("batch_stats", {}),
            },
            opt_state=opt_state,
        )
        return new_state, {**metrics, "grad_norm": optax.global_norm(grads)}

    return train_step


def correct_topk(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where `labels` is among the k largest logits, per example."""
    topk = jax.lax.top_k(logits.astype(jnp.float32), k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def make_eval_step(
    distiller: Distiller,
) -> Callable[[TrainState, Any, Batch], dict[str, jax.Array]]:
    """`step(state, teacher_vars, batch) -> sums`: masked correct counts and the count.

    Returns "count" and, for every evaluated model M (student, teacher, stone{i}),
    "M/top1" and "M/top5" summed over the batch's real examples (`batch["mask"]`), so
    that sums over batches divided by the total count are exact accuracies.
    """

    def eval_step(state: TrainState, teacher_vars, batch: Batch) -> dict[str, jax.Array]:
        logits = distiller.eval_logits(
            state.variables("student"), state.variables("modules"), teacher_vars,
            batch["image"],
        )  # fmt: skip
        mask = batch["mask"].astype(jnp.float32)
        sums = {"count": jnp.sum(mask)}
        for name, value in logits.items():
            k5 = min(5, value.shape[-1])
            sums[f"{name}/top1"] = jnp.sum(correct_topk(value, batch["label"], 1) * mask)
            sums[f"{name}/top5"] = jnp.sum(correct_topk(value, batch["label"], k5) * mask)
        return sums

    return eval_step
