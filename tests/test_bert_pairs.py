"""Distillation between BERT encoders: text connectors, stepping-stones, every logit method.

Tiny widths stand for the GLUE pairs: a 12-layer teacher cut into n groups against a
6-layer student (a narrower one, so connectors are Dense + LayerNorm) or a 4-layer one
of the teacher's width (identity connectors).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_bert import random_text
from test_blockwise import manual_stone

from bkd_jax import config_defaults, distillers, optim, steps
from bkd_jax.blocknet import MaskedTokens
from bkd_jax.blockwise import stepping_stones
from bkd_jax.connectors import TextConnector, make_connectors
from bkd_jax.models import bert, vit

LENGTH = 8
tiny = functools.partial(bert.bert, vocab_size=100, max_positions=16, heads=2)
TEACHER = functools.partial(tiny, dim=32, depth=12, hidden=64, name="teacher12")
STUDENTS = {
    "12x32->6x16": functools.partial(tiny, dim=16, depth=6, hidden=32, name="student6"),
    "12x32->4x32": functools.partial(tiny, dim=32, depth=4, hidden=64, name="student4"),
}
GROUPS = {"12x32->6x16": 3, "12x32->4x32": 4}


def build(name: str, num_classes: int = 3):
    n = GROUPS[name]
    teacher, student = TEACHER(num_classes, groups=n), STUDENTS[name](num_classes, groups=n)
    x = random_text(jax.random.key(0), [8, 5, 2, 6], LENGTH)
    conns = make_connectors(student, teacher, x.shape[1:])
    keys = jax.random.split(jax.random.key(1), 3)
    variables = (teacher.init(keys[0], x), student.init(keys[1], x), conns.init(keys[2]))
    return teacher, student, conns, variables, x


@pytest.mark.parametrize("name", list(STUDENTS))
def test_every_stone_is_the_written_out_composition(name):
    teacher, student, conns, variables, x = build(name)
    tv, sv, cv = variables
    n = GROUPS[name]
    assert conns.num_stones == n and conns.student_cuts == conns.teacher_cuts == tuple(
        range(1, n + 1)
    )
    # Eager: compiling twelve unrolled layers per stone costs more than running them.
    written_out = [manual_stone(teacher, student, conns, variables, x, i) for i in range(1, n + 1)]
    for batch_stones in (True, False) if n == 3 else (True,):
        out = stepping_stones(
            student, sv, teacher, tv, conns, cv, x, stones=range(1, n + 1), train=False,
            batch_stones=batch_stones,
        )  # fmt: skip
        for i in range(1, n + 1):
            np.testing.assert_allclose(out.stone_logits[i], written_out[i - 1], atol=1e-5)
    np.testing.assert_allclose(out.student_logits, student.apply(sv, x)[0], atol=1e-6)


def test_connectors_are_dense_and_layer_norm_per_token_or_the_identity():
    _, _, narrow, (_, _, cv), _ = build("12x32->6x16")
    assert narrow.kinds == ("tokens",) * 3
    _, _, equal, (_, _, ev), _ = build("12x32->4x32")
    assert equal.kinds == ("identity",) * 4 and not jax.tree.leaves(ev)
    rng = np.random.default_rng(0)
    h = MaskedTokens(jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32),
                     jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))  # fmt: skip
    params = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), cv["params"]["connector2"]
    )
    y, _ = narrow.apply({"params": {"connector2": params}}, 2, h)
    z = np.asarray(h.tokens, np.float64) @ params["proj"]["kernel"] + params["proj"]["bias"]
    z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-12)
    z = z * params["norm"]["scale"] + params["norm"]["bias"]
    np.testing.assert_allclose(y.tokens, z, atol=1e-5)
    np.testing.assert_array_equal(y.mask, h.mask)
    same = TextConnector(None).apply({}, h)
    assert same is h


LOGIT_METHODS = [
    m
    for m in distillers.available()
    if not {"taps", "strong_view"} & set(distillers.get(m).consumes)
]


@pytest.fixture(scope="module")
def text_pair():
    # Two blocks of 2 and 1 layers: the same code paths as the 12 -> 6 pair, compiled fast.
    teacher, student = tiny(2, dim=32, depth=4, hidden=64), tiny(2, dim=16, depth=2, hidden=32)
    x = random_text(jax.random.key(0), [8, 5, 2, 6], LENGTH)
    tv = teacher.init(jax.random.key(1), x)
    # A confident teacher: its classifier scaled up, so that no distillation term starts
    # near its minimum (a random BERT's logits are almost uniform).
    head = tv["params"]["head"]
    kernel = head["classifier"]["kernel"] * 100.0
    tv = {
        "params": {
            **tv["params"],
            "head": {**head, "classifier": {**head["classifier"], "kernel": kernel}},
        }
    }
    labels = jnp.array([0, 1, 1, 0], jnp.int32)
    return teacher, student, tv, {"image": x, "label": labels, "index": jnp.arange(4)}


@pytest.mark.parametrize("method", LOGIT_METHODS)
def test_every_logit_method_trains_a_text_student_and_lowers_its_loss(method, text_pair):
    teacher, student, tv, batch = text_pair
    x = batch["image"]
    cfg = config_defaults.distill_config(method)
    distiller = distillers.make_distiller(cfg, student, teacher, x.shape[1:])
    # DOT is its own optimizer (SGD momentum with separate buffers); the rest take Adam.
    optimizer = optim.dot(0.05, 0.9, 0.075, 0.0) if method == "dot" else optax.adam(3e-3)
    state = steps.create_train_state(distiller, optimizer, jax.random.key(5), x)
    step = jax.jit(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    losses = []
    for _ in range(30):
        state, metrics = step(state, tv, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.9 * losses[0], (method, losses[0], losses[-5:])


def test_methods_that_read_feature_maps_refuse_text_pairs(text_pair):
    teacher, student, _, batch = text_pair
    shape = batch["image"].shape[1:]
    for method in ("fitnet", "at", "crd", "reviewkd"):
        with pytest.raises(ValueError, match=f"method '{method}' reads feature maps"):
            distillers.make_distiller({"method": method}, student, teacher, shape)
    with pytest.raises(ValueError, match="'mlkd' trains on a RandAugment view of every image"):
        distillers.make_distiller({"method": "mlkd"}, student, teacher, shape)
    cfg = config_defaults.distill_config("blockkd")
    cfg.blockkd.feature_method = "at"
    with pytest.raises(ValueError, match="text networks \\(bert, bert\\)"):
        distillers.make_distiller(cfg, student, teacher, shape)
    image_net = vit.vision_transformer(2, image_size=8, patch_size=4, dim=16, depth=2, heads=2,
                                       groups=1)  # fmt: skip
    with pytest.raises(ValueError, match="text networks connect only to text networks"):
        make_connectors(student, image_net, shape)
    with pytest.raises(ValueError, match="connect token by token"):
        make_connectors(student, teacher, shape, connector="pool")
