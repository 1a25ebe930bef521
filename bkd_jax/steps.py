"""Pure train and eval steps: no I/O, no sharding; the trainer jits them with shardings.

The trainable state holds the student and the method's extra modules (Block-KD's
connectors, ...) side by side: ``params = {"student": ..., "modules": ...}``, and likewise
``batch_stats``; other state of the modules that is updated but not trained (CRD's memory
bank) is ``module_state``, and ``rng`` the key each step's randomness (CRD's negatives) is
folded from with the step number, so a resumed run draws what an uninterrupted one does.
The teacher's variables are an argument of every step, never part of the state: they are
not differentiated, not updated and not donated. An optimizer that treats
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


_TRAINED = ("params", "batch_stats")  # module collections kept apart in the state


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: optax.OptState
    module_state: dict[str, Any]  # the modules' other collections, e.g. {"memory": ...}
    rng: jax.Array  # raw key data (uint32), so that checkpoints hold a plain array

    def variables(self, name: str, params: Any = None) -> dict[str, Any]:
        """Flax variables of "student" or "modules" (with `params` instead, if given)."""
        out = {"params": self.params[name] if params is None else params}
        if self.batch_stats.get(name):
            out["batch_stats"] = self.batch_stats[name]
        if name == "modules":
            out.update(self.module_state)
        return out

    def step_key(self) -> jax.Array:
        """The key of this step: the run's key folded with the step number."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def create_train_state(
    distiller: Distiller, optimizer: optax.GradientTransformation, key: jax.Array, images
) -> TrainState:
    """Fresh student and module variables (sized by `images`) and optimizer state."""
    student_key, module_key, step_key = jax.random.split(key, 3)
    student = distiller.student.init(student_key, images)
    modules = distiller.init_modules(module_key)
    params = {"student": student["params"], "modules": modules.get("params", {})}
    batch_stats = {
        "student": student.get("batch_stats", {}),
        "modules": modules.get("batch_stats", {}),
    }
    module_state = {k: v for k, v in modules.items() if k not in _TRAINED}
    return TrainState(
        jnp.zeros((), jnp.int32), params, batch_stats, optimizer.init(params), module_state,
        jax.random.key_data(step_key),
    )  # fmt: skip


def make_train_step(
    distiller: Distiller,
    optimizer: optax.GradientTransformation | SplitGradientTransformation,
    warmup: Callable[[jax.Array], jax.Array],
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, teacher_vars, batch) -> (state, metrics)`; `warmup(step)` is r(t)."""
    split = isinstance(optimizer, SplitGradientTransformation)

    def loss_fn(params, state: TrainState, teacher_vars, batch: Batch):
        loss, new_vars = distiller.loss(
            state.variables("student", params["student"]),
            state.variables("modules", params["modules"]),
            teacher_vars, {**batch, "rng": state.step_key()}, warmup(state.step),
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
            module_state={k: v for k, v in module_vars.items() if k not in _TRAINED},
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
