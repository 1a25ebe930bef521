"""DOT: the optimiser against a hand-computed two-momentum update, and its train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import jit_for_one_run

from bkd_jax import config_defaults, distillers, models, optim, steps
from tests.test_steps import SHAPE, teacher_and_batch


def test_dot_update_equals_two_momentum_buffers_by_hand():
    # lr 0.1, momentum 0.9, delta 0.075, weight decay 0.01: the task buffer has momentum
    # 0.825 and takes the decay, the distillation buffer 0.975; w -= lr (v_t + v_d).
    dot = optim.dot(0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    w = {"a": jnp.float32(1.0)}
    state = dot.init(w)
    # Step 1, g_t = 0.5, g_d = 0.25: v_t = 0.5 + 0.01 = 0.51, v_d = 0.25, w = 1 - 0.076.
    updates, state = dot.update({"a": jnp.float32(0.5)}, {"a": jnp.float32(0.25)}, state, w)
    w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(float(w["a"]), 0.924, rtol=1e-6)
    # Step 2, g_t = -1, g_d = 0.5: v_t = 0.825 * 0.51 - 1 + 0.00924 = -0.57001,
    # v_d = 0.975 * 0.25 + 0.5 = 0.74375, w = 0.924 - 0.1 * 0.17374 = 0.906626.
    updates, state = dot.update({"a": jnp.float32(-1.0)}, {"a": jnp.float32(0.5)}, state, w)
    w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(float(state.task_momentum["a"]), -0.57001, rtol=1e-6)
    np.testing.assert_allclose(float(state.distill_momentum["a"]), 0.74375, rtol=1e-6)
    np.testing.assert_allclose(float(w["a"]), 0.906626, rtol=1e-6)


def test_dot_method_feeds_the_task_and_distillation_gradients_apart():
    teacher, teacher_vars, batch = teacher_and_batch()
    student = models.get_model("resnet8", 10)
    distiller = distillers.make_distiller(
        config_defaults.distill_config("dot"), student, teacher, SHAPE
    )
    cfg = config_defaults.optim_config(0.05, (), weight_decay=0.0, name="dot")
    optimizer = optim.make_optimizer(cfg, 10, distillers.get("dot").optimizer)
    assert isinstance(optimizer, optim.SplitGradientTransformation)
    state = steps.create_train_state(distiller, optimizer, jax.random.key(0), batch["image"])
    step = jit_for_one_run(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    new_state, _ = step(state, teacher_vars, batch)

    def term(params, name):
        loss, _ = distiller.loss(
            state.variables("student", params["student"]),
            state.variables("modules", params["modules"]),
            teacher_vars, batch, jnp.float32(1.0),
        )  # fmt: skip
        return getattr(loss, name)

    # From zero buffers, one step leaves each loss's own gradient in its buffer.
    gradient = jit_for_one_run(jax.grad(term), static_argnums=1)
    for buffer, name in ((new_state.opt_state.task_momentum, "task"),
                         (new_state.opt_state.distill_momentum, "distill")):  # fmt: skip
        want = gradient(state.params, name)
        for got, ref in zip(jax.tree.leaves(buffer), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert any(
        float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(new_state.opt_state.distill_momentum)
    )
