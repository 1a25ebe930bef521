"""Stepping-stones: composition, gradient flow, frozen teacher, jit, and pairing errors;
WKD-L and MLKD as the distance of the stones' objective."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_steps
from conftest import images, random_variables
from test_losses import ref_ce
from test_mlkd_loss import ref_one_view
from test_wkd_distiller import _fc_cost
from test_wkd_losses import ref_wkd_logit

from bkd_jax import models, shapes, steps
from bkd_jax.blockwise import stepping_stones
from bkd_jax.connectors import default_grouping, make_connectors

PAIRS = [  # (teacher, student, input side)
    ("resnet32x4", "resnet8x4", 32),
    ("wrn_40_2", "wrn_40_1", 32),
    ("resnet32x4", "shufflenetv1", 32),  # spatial mismatch
    ("vgg13", "mobilenetv2", 32),  # 5 teacher blocks against 4 student blocks
    ("imagenet_resnet34", "imagenet_resnet18", 32),  # blocks end at 8, 4, 2 and 1 pixels
]


@functools.cache
def build(teacher_name: str, student_name: str, size: int):
    classes = 1000 if teacher_name.startswith("imagenet_") else 100
    teacher = models.get_model(teacher_name, classes)
    student = models.get_model(student_name, classes)
    x = images(2, size)  # two images: batch statistics still differ from running ones
    return connect(teacher, student, x)


def connect(teacher, student, x):
    """`(teacher, student, connectors, (teacher, student, connector variables), x)`."""
    conns = make_connectors(student, teacher, x.shape)
    variables = (
        random_variables(shapes.variable_shapes(teacher, x.shape), seed=1),
        random_variables(shapes.variable_shapes(student, x.shape), seed=2),
        random_variables(jax.eval_shape(conns.init, jax.random.key(0)), seed=3),
    )
    return teacher, student, conns, variables, x


def manual_stone(teacher, student, conns, variables, x, i, *, train=False):
    """N_i written out block by block, the teacher always in inference mode."""
    tv, sv, cv = variables
    h, _ = student.apply_range(sv, x, 1, conns.student_cuts[i - 1], train=train)
    h, _ = conns.apply(cv, i, h, train=train)
    h, _ = teacher.apply_range(tv, h, conns.teacher_cuts[i - 1] + 1, teacher.num_blocks)
    return teacher.apply_head(tv, h)[0]


def _close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_every_stone_is_the_written_out_composition(pair):
    teacher, student, conns, variables, x = build(*pair)
    tv, sv, cv = variables
    n = conns.num_stones
    assert n == min(teacher.num_blocks, student.num_blocks)
    assert conns.student_cuts[-1] == student.num_blocks  # N_n: the whole student backbone
    for train in (False, True):
        out = stepping_stones(
            student, sv, teacher, tv, conns, cv, x, stones=range(1, n + 1), train=train
        )
        assert sorted(out.stone_logits) == list(range(1, n + 1))
        for i in range(1, n + 1):
            expected = manual_stone(teacher, student, conns, variables, x, i, train=train)
            _close(out.stone_logits[i], expected)
        student_logits, _ = student.apply(sv, x, train=train)
        _close(out.student_logits, student_logits)
        assert len(out.features) == n
        if train:  # student and connector statistics move; the teacher is never returned
            moved = [out.student_vars["batch_stats"], out.connector_vars["batch_stats"]]
            before = [sv["batch_stats"], cv["batch_stats"]]
            for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(moved), strict=True):
                assert not np.array_equal(old, new)


def grad_norm(grads) -> float:
    """L1 norm of a gradient tree (in NumPy: eager JAX would compile a sum per shape)."""
    return sum(float(np.abs(np.asarray(g)).sum()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_gradients_reach_exactly_the_blocks_below_each_stone(pair):
    teacher, student, conns, (tv, sv, cv), x = build(*pair)
    n = conns.num_stones
    logits_shape = teacher.apply(tv, x)[0].shape
    probe = jax.random.normal(jax.random.key(4), logits_shape)  # a random linear read-out
    teacher_before = jax.tree.map(np.asarray, tv)

    def stone_losses(trainable):
        s_params, c_params = trainable
        out = stepping_stones(
            student,
            {**sv, "params": s_params},
            teacher,
            tv,
            conns,
            {**cv, "params": c_params},
            x,
            stones=range(1, n + 1),
            train=True,
        )
        return jnp.stack([jnp.sum(out.stone_logits[i] * probe) for i in range(1, n + 1)])

    # Row i of the Jacobian is the gradient of the losses weighted by the i-th unit vector:
    # one compiled gradient, called once per stone. (`jax.jacrev` vmaps the pullback, which
    # XLA:CPU compiles and runs much more slowly, grouped convolutions above all.)
    jacobian_row = jax.jit(jax.grad(lambda trainable, w: stone_losses(trainable) @ w))
    for i, unit in enumerate(jnp.eye(n), 1):
        s_grads, c_grads = jacobian_row((sv["params"], cv["params"]), unit)
        for k in range(1, student.num_blocks + 1):
            norm = grad_norm(s_grads[f"block{k}"])
            if k <= conns.student_cuts[i - 1]:
                assert norm > 0, f"N_{i}: no gradient reached student block {k}"
            else:
                assert norm == 0, f"N_{i}: gradient leaked into student block {k}"
        assert grad_norm(s_grads["head"]) == 0
        for j in range(1, n + 1):
            norm = grad_norm(c_grads[f"connector{j}"])
            assert (norm > 0) == (j == i), f"N_{i}: connector {j} gradient {norm}"
    jax.tree.map(np.testing.assert_array_equal, tv, teacher_before)


def test_jit_equals_eager():
    teacher, student, conns, (tv, sv, cv), x = build(*PAIRS[2])

    def run(sv, cv, x):
        out = stepping_stones(student, sv, teacher, tv, conns, cv, x, stones=(2, 3), train=True)
        return out.student_logits, out.stone_logits, out.student_vars, out.connector_vars

    jax.tree.map(_close, jax.jit(run)(sv, cv, x), run(sv, cv, x))


def test_default_grouping_merges_leading_blocks_of_the_deeper_network():
    assert default_grouping(4, 5) == ((1, 2, 3, 4), (2, 3, 4, 5))
    assert default_grouping(3, 3) == ((1, 2, 3), (1, 2, 3))
    assert default_grouping(5, 3) == ((3, 4, 5), (1, 2, 3))
    *_, conns, _, _ = build(*PAIRS[3])
    assert (conns.student_cuts, conns.teacher_cuts) == ((1, 2, 3, 4), (2, 3, 4, 5))


def test_connector_adapts_space_and_channels_and_mirrors_activation():
    teacher, student, conns, (tv, sv, cv), x = build(*PAIRS[2])
    feats = stepping_stones(student, sv, teacher, tv, conns, cv, x, stones=(), train=False).features
    t_feats = teacher.features(tv, x)[1]
    for i in range(1, conns.num_stones + 1):
        y, _ = conns.apply(cv, i, feats[i - 1])
        assert y.shape == t_feats[conns.teacher_cuts[i - 1] - 1].shape
        assert float(y.min()) >= 0  # resnet32x4 blocks end in ReLU, so C_i does too
    _, wrn_s, wrn_c, (_, wsv, wcv), wx = build(*PAIRS[1])
    h, _ = wrn_s.apply_range(wsv, wx, 1, 1)
    assert float(wrn_c.apply(wcv, 1, h)[0].min()) < 0  # pre-activation WRN: no ReLU


def test_bad_stone_index_and_unconnectable_pairs_are_rejected():
    teacher, student, conns, (tv, sv, cv), x = build(*PAIRS[0])
    with pytest.raises(ValueError, match=r"stepping-stone index 4 outside 1\.\.3"):
        stepping_stones(student, sv, teacher, tv, conns, cv, x, stones=(4,), train=False)
    with pytest.raises(ValueError, match="2 student cuts but 3 teacher cuts"):
        make_connectors(student, teacher, x.shape, grouping=((2, 3), (1, 2, 3)))
    with pytest.raises(ValueError, match="strictly increasing"):
        make_connectors(student, teacher, x.shape, grouping=((2, 1, 3), (1, 2, 3)))
    r18 = models.get_model("imagenet_resnet18", 100)
    # At 40 px ResNet18's blocks output 10, 5, 3 and 2 px; 3 px cannot reach 16 px by nearest
    # upsampling, while bilinear upsampling can.
    with pytest.raises(
        ValueError, match=r"stone 2: imagenet_resnet18 block 3 output \(3, 3, 256\)"
    ):
        make_connectors(r18, teacher, (2, 40, 40, 3), grouping=((2, 3, 4), (1, 2, 3)))
    make_connectors(
        r18, teacher, (2, 40, 40, 3), grouping=((2, 3, 4), (1, 2, 3)), upsampling="bilinear"
    )


# --- WKD-L and MLKD as the stones' distance (this project's extension of Block-KD) -------


def _ref_stone_objective(dist, student, stones, teacher, labels, warmup):
    """Block-KD's objective written out, alpha = beta = gamma = 1, with distance `dist`:
    CE and `dist` to the teacher of the student and every stone (stone i weighted
    1 / 2^(n - i)), plus `dist` of each to the stones' mean."""
    n = max(stones)
    ensemble = np.mean([np.float64(z) for z in stones.values()], axis=0)
    task = ref_ce(student, labels) + sum(
        2.0 ** (i - n) * ref_ce(z, labels) for i, z in stones.items()
    )
    distill = dist(student, teacher) + sum(
        2.0 ** (i - n) * dist(z, teacher) for i, z in stones.items()
    )
    cross = dist(student, ensemble) + sum(dist(z, ensemble) for z in stones.values())
    return task + warmup * (distill + cross)


def _wkd_l_reference(teacher_vars, labels):
    cost = _fc_cost(teacher_vars)
    return lambda s, t: ref_wkd_logit(s, t, labels, cost, 8.0, 600.0)


def _mlkd_reference(teacher_vars, labels):
    del teacher_vars, labels
    return lambda s, t: ref_one_view(s, t, released=True)


STONE_DISTANCES = {  # distance: (Block-KD knobs, float64 reference of D)
    "wkd_l": ({"temperature": 8.0}, _wkd_l_reference),
    "mlkd": ({}, _mlkd_reference),
}


@pytest.mark.parametrize("distance", list(STONE_DISTANCES))
def test_stone_distance_is_the_methods_loss_over_the_stones_and_training_lowers_it(distance):
    knobs, reference = STONE_DISTANCES[distance]
    distiller, optimizer, state, _, batch = test_steps.build("blockkd", distance=distance, **knobs)
    teacher_vars = test_steps.trained_teacher_vars()  # confident: the terms have room to fall
    out = jax.jit(functools.partial(distiller.forward, train=True))(
        state.variables("student"), state.variables("modules"), teacher_vars, batch
    )
    warmup = 0.5
    loss = distiller.objective(out, batch, jnp.float32(warmup))
    assert sorted(out.stone_logits) == [1, 2, 3]
    labels = np.asarray(batch["label"])
    dist = reference(teacher_vars, labels)
    want = _ref_stone_objective(
        dist, out.student_logits, out.stone_logits, out.teacher_logits, labels, warmup
    )
    np.testing.assert_allclose(loss.total, want, rtol=2e-4)
    np.testing.assert_allclose(
        loss.metrics["kd_stone2"], dist(out.stone_logits[2], out.teacher_logits), rtol=2e-4
    )

    step = jax.jit(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    stone_terms = []
    for _ in range(10):
        state, metrics = step(state, teacher_vars, batch)
        stone_terms.append(sum(float(metrics[f"kd_stone{i}"]) for i in (1, 2, 3)))
    assert np.isfinite(stone_terms).all()
    assert stone_terms[-1] < 0.6 * stone_terms[0], stone_terms
