"""The fast Block-KD step: same numbers as the straightforward one, and no work done twice.

Batched stepping-stones and rematerialised teacher blocks change how the step runs, never
what it computes: the loss, metrics, gradients and new BatchNorm statistics must match the
path that runs each stone on its own and stores its activations. The cost checks count the
convolutions JAX emits and the FLOPs XLA compiles: the teacher's own forward once, the
student once, each teacher block once per step however many stones pass through it, and
no weight gradient of the frozen teacher.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import in_float64, random_variables

from bkd_jax import bench, config_defaults, distillers, models, shapes, steps
from bkd_jax.models import cpu_conv

NUM_CLASSES = 10
SHAPE = (4, 16, 16, 3)
# Small enough to compile fast; 3 blocks each: stones 1, 2, 3 enter teacher block 2, 3, head.
PAIR = ("resnet8", "resnet8")
GROUPED = (("grouping", ((1, 3), (2, 3))), ("distance", "dkd"))  # stones enter block 3, head


@functools.cache
def setup():
    """Teacher variables, a batch and an optimizer."""
    teacher = models.get_model(PAIR[0], NUM_CLASSES)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    batch = {"image": x, "label": jax.random.randint(jax.random.key(1), (SHAPE[0],), 0, 10)}
    teacher_vars = random_variables(shapes.variable_shapes(teacher, SHAPE), seed=2)
    return teacher_vars, batch, optax.sgd(0.1, momentum=0.9)


def build(method: str, cfg=(), dtype=jnp.float32, **options) -> distillers.Distiller:
    config = config_defaults.distill_config(method)
    config[method].update(dict(cfg))
    teacher, student = (models.get_model(name, NUM_CLASSES, dtype) for name in PAIR)
    return distillers.make_distiller(config, student, teacher, SHAPE, dtype=dtype, **options)


@functools.cache
def initial_state(method: str, cfg=()) -> steps.TrainState:
    """A random train state for the student and the modules of `method`."""
    _, batch, optimizer = setup()
    init = functools.partial(steps.create_train_state, build(method, cfg), optimizer)
    return random_variables(jax.eval_shape(init, jax.random.key(4), batch["image"]), seed=4)


@functools.cache
def loss_and_grads(method: str, cfg=(), dtype=jnp.float32, **options):
    """((loss, metrics, student vars, module vars), gradients) of the training loss.

    A float64 run (inside `jax.enable_x64`) also holds its variables and inputs in float64."""
    distiller, state = build(method, cfg, dtype, **options), initial_state(method, cfg)
    teacher_vars, batch, _ = setup()
    if dtype == jnp.float64:
        state, teacher_vars, batch = in_float64((state, teacher_vars, batch))

    def loss(params):
        student_vars = state.variables("student", params["student"])
        module_vars = state.variables("modules", params["modules"])
        out, new_vars = distiller.loss(student_vars, module_vars, teacher_vars, batch, 1.0)
        return out.total, (out.metrics, *new_vars)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)


@pytest.mark.parametrize("method,cfg", [("blockkd", ()), ("blockkd", GROUPED)], ids=str)
def test_fast_step_computes_the_same_loss_gradients_and_statistics(method, cfg):
    """In float64: the two paths round differently, and a float32 cross term of 1e-2 from
    logits of 1e1 differs by 1e-6 between them (more or less by XLA's optimisation level);
    in float64 the networks' differences stay at its rounding."""
    with jax.enable_x64(True):
        straightforward = loss_and_grads(
            method, cfg, jnp.float64, batch_stones=False, remat_teacher=False
        )
        fast = loss_and_grads(method, cfg, jnp.float64, batch_stones=True, remat_teacher=True)
    (loss, (metrics, *new_vars)), grads = jax.tree.map(np.asarray, fast)
    (ref_loss, (ref_metrics, *ref_new_vars)), ref_grads = jax.tree.map(np.asarray, straightforward)
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {np.dtype(np.float64)}
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    # Every connector learns: the stones' gradients pass through the teacher.
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["modules"]))
    pairs = zip(jax.tree.leaves((grads, new_vars)), jax.tree.leaves((ref_grads, ref_new_vars)))
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def num_convs(tree) -> int:
    """Convolution kernels (4-D parameters) in a variable tree."""
    return sum(leaf.ndim == 4 for leaf in jax.tree.leaves(tree))


def lowered_step(method: str, donate: bool = True, dtype=jnp.float32, **options):
    teacher_vars, batch, optimizer = setup()
    step = steps.make_train_step(
        build(method, dtype=dtype, **options), optimizer, lambda s: jnp.float32(1.0)
    )
    jitted = jax.jit(step, donate_argnums=0 if donate else ())
    return jitted.lower(initial_state(method), teacher_vars, batch)


@functools.cache
def compiled_step(method: str, donate: bool = True):
    return lowered_step(method, donate).compile()


@pytest.mark.parametrize("batch_stones", [True, False])
@pytest.mark.parametrize("remat", [False, True])
def test_step_emits_each_convolution_once_and_no_teacher_weight_gradient(batch_stones, remat):
    teacher_params = setup()[0]["params"]
    teacher = {j: num_convs(teacher_params[f"block{j}"]) for j in (1, 2, 3)}
    params = initial_state("blockkd").params
    student, connectors = num_convs(params["student"]), num_convs(params["modules"])
    # Student: forward, weight gradient, input gradient except of the stem (images need
    # none). Connectors: all three. Teacher: its own forward, then, on the stone paths,
    # forward and input gradient (plus a recomputed forward with remat) of block 2 (stone
    # 1) and block 3 (stones 1 and 2: one call when batched, two when not).
    expected = sum(teacher.values()) + 3 * student - 1 + 3 * connectors
    passes = 3 if remat else 2
    expected += passes * (teacher[2] + teacher[3] * (1 if batch_stones else 2))
    # XLA's own passes, whose weight gradients are convolutions too (on CPU, `cpu_conv`
    # computes those of 1x1 kernels as matrix products).
    with cpu_conv.xla_convolutions():
        lowered = lowered_step("blockkd", batch_stones=batch_stones, remat_teacher=remat)
    text = lowered.as_text()
    assert text.count("stablehlo.convolution") == expected
    assert ("optimization_barrier" in text) == remat


def test_compiled_flops_are_one_teacher_forward_and_one_input_gradient_per_stone():
    """Block-KD minus KD is two forwards of the stones' teacher suffixes, not three."""
    teacher_vars, batch, _ = setup()
    teacher = models.get_model(PAIR[0], NUM_CLASSES)
    feats = teacher.features(teacher_vars, batch["image"])[1]

    def suffix(h, start):
        h, _ = teacher.apply_range(teacher_vars, h, start, 3)
        return teacher.apply_head(teacher_vars, h)[0]

    suffixes = sum(
        bench.cost_flops(jax.jit(suffix, static_argnums=1).lower(feats[start - 2], start).compile())
        for start in (2, 3)
    )
    extra = bench.cost_flops(compiled_step("blockkd")) - bench.cost_flops(compiled_step("kd"))
    # The rest (connectors, the stones' heads and losses) is a third of a suffix here; a
    # weight gradient of the teacher would add a whole one.
    assert 2.0 * suffixes < extra < 2.5 * suffixes, extra / suffixes


def test_donation_aliases_the_whole_state():
    donated, kept = compiled_step("blockkd"), compiled_step("blockkd", donate=False)
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(initial_state("blockkd")))
    assert donated.memory_analysis().alias_size_in_bytes == state_bytes
    assert kept.memory_analysis().alias_size_in_bytes == 0
    assert bench.memory_bytes(kept) > bench.memory_bytes(donated)


def test_bfloat16_computes_in_bfloat16_with_float32_weights_and_losses():
    fast = dict(batch_stones=True, remat_teacher=True)
    (loss, (metrics, *_)), grads = loss_and_grads("blockkd", (), jnp.bfloat16, **fast)
    (ref_loss, _), _ = loss_and_grads("blockkd", (), **fast)
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert loss.dtype == jnp.float32 and all(m.dtype == jnp.float32 for m in metrics.values())
    np.testing.assert_allclose(loss, ref_loss, rtol=3e-2)
    text = lowered_step("blockkd", dtype=jnp.bfloat16).as_text()
    convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    assert convs and all(line.endswith("xbf16>") for line in convs)
