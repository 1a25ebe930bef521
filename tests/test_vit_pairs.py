"""Block-KD and the other distillers on pairs with ViTs: connectors, stones, methods, errors.

The token connectors' outputs are recomputed here in float64 numpy from their definitions
(space-to-depth as explicit patch slices, average pooling as means over windows, Dense as
a matrix product, LayerNorm with eps 1e-6).
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_recipes
from conftest import images, jit_for_one_run
from test_blockwise import connect, grad_norm, manual_stone

from bkd_jax import config_defaults, distillers, models, optim, steps
from bkd_jax.blockwise import stepping_stones
from bkd_jax.connectors import ConvConnector, TokenConnector, _connector, make_connectors
from bkd_jax.models.vit import vision_transformer
from bkd_jax.training.validation import validate_config


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _layer_norm(x: np.ndarray, params) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * _np(params["scale"]) + _np(params["bias"])


def _random_params(variables, seed: int):
    """`variables` with every parameter redrawn, so that zero offsets and unit scales count."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _windows(x: np.ndarray, f: int) -> list[np.ndarray]:
    """The f x f windows of NHWC `x` in row-major order: (r, c) is rows f r..f r + f - 1."""
    n = x.shape[1] // f
    return [x[:, f * r : f * r + f, f * c : f * c + f] for r in range(n) for c in range(n)]


def _tokens_by_hand(patches: np.ndarray, prefix: np.ndarray | None, params) -> np.ndarray:
    """Dense per token, the prefix carried or made from the patch mean, LayerNorm."""
    kernel, bias = _np(params["proj"]["kernel"]), _np(params["proj"]["bias"])
    if prefix is not None:
        tokens = np.concatenate([prefix, patches], axis=1) @ kernel + bias
    else:
        projected = patches @ kernel + bias
        made = projected.mean(axis=1, keepdims=True) + _np(params["prefix_offset"])
        tokens = np.concatenate([made, projected], axis=1)
    return _layer_norm(tokens, params["norm"])


def test_patchify_is_space_to_depth_then_a_dense_layer_and_the_class_token_the_mean():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    module = TokenConnector(out_tokens=(5, 6), out_prefix=1)  # a 2x2 grid and a class token
    params = _random_params(module.init(jax.random.key(1), x)["params"], 2)
    y = module.apply({"params": params}, x)
    assert y.shape == (2, 5, 6)
    xs = _np(x)
    # Patch (r, c) holds the 2x2 window's pixels row by row, each pixel's 3 channels.
    patches = np.stack([w.reshape(2, 12) for w in _windows(xs, 2)], axis=1)
    np.testing.assert_allclose(_np(y), _tokens_by_hand(patches, None, params), atol=1e-5)


def test_pool_averages_windows_and_a_smaller_map_is_upsampled():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    module = TokenConnector(out_tokens=(5, 6), out_prefix=1, patchify=False)
    params = _random_params(module.init(jax.random.key(1), x)["params"], 2)
    xs = _np(x)
    patches = np.stack([w.mean((1, 2)) for w in _windows(xs, 2)], axis=1)
    want = _tokens_by_hand(patches, None, params)
    np.testing.assert_allclose(_np(module.apply({"params": params}, x)), want, atol=1e-5)
    # A 2x2 map into a 4x4 grid: each pixel repeated over a 2x2 block of patches.
    up = TokenConnector(out_tokens=(17, 6), out_prefix=1)
    small = x[:, :2, :2]
    up_params = _random_params(up.init(jax.random.key(1), small)["params"], 3)
    grid = np.repeat(np.repeat(_np(small), 2, axis=1), 2, axis=2).reshape(2, 16, 3)
    np.testing.assert_allclose(
        _np(up.apply({"params": up_params}, small)), _tokens_by_hand(grid, None, up_params),
        atol=1e-5,
    )  # fmt: skip


def test_tokens_to_tokens_pools_the_grid_and_carries_the_class_token():
    x = jax.random.normal(jax.random.key(0), (2, 1 + 16, 3))  # class token, 4x4 grid
    module = TokenConnector(out_tokens=(5, 6), out_prefix=1, in_prefix=1)
    params = _random_params(module.init(jax.random.key(1), x)["params"], 2)
    assert "prefix_offset" not in params  # the class token is carried, not made
    xs = _np(x)
    grid = xs[:, 1:].reshape(2, 4, 4, 3)
    patches = np.stack([w.mean((1, 2)) for w in _windows(grid, 2)], axis=1)
    want = _tokens_by_hand(patches, xs[:, :1], params)
    np.testing.assert_allclose(_np(module.apply({"params": params}, x)), want, atol=1e-5)


def test_tokens_to_map_drops_the_prefix_and_reads_the_grid():
    x = jax.random.normal(jax.random.key(0), (2, 1 + 4, 3))
    grid = x[:, 1:].reshape(2, 2, 2, 3)
    tokens = ConvConnector((4, 4, 5), relu=True, in_prefix=1)
    maps = ConvConnector((4, 4, 5), relu=True)
    variables = tokens.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, maps.init(jax.random.key(1), grid)
    )
    variables = {**variables, "params": _random_params(variables["params"], 2)}
    y = tokens.apply(variables, x)
    assert y.shape == (2, 4, 4, 5) and float(y.min()) >= 0
    # By hand: nearest upsampling by 2, the 1x1 convolution, BatchNorm's running
    # statistics (0 mean, unit variance at initialisation, eps 1e-5), ReLU.
    up = np.repeat(np.repeat(_np(grid), 2, axis=1), 2, axis=2)
    conv = np.einsum("nhwc,cd->nhwd", up, _np(variables["params"]["conv"]["kernel"])[0, 0])
    bn = variables["params"]["bn"]
    want = np.maximum(conv / np.sqrt(1 + 1e-5) * _np(bn["scale"]) + _np(bn["bias"]), 0)
    np.testing.assert_allclose(_np(y), want, atol=1e-5)


SIZE = 16  # image side of the pairs below: resnet8's blocks output 16, 8 and 4 pixels


def tiny_vit(patch: int = 4, dim: int = 16, name: str = "vit_test"):
    """A 3-layer ViT in 3 blocks (resnet8's count) on 16-pixel images."""
    return vision_transformer(
        10, image_size=SIZE, patch_size=patch, dim=dim, depth=3, heads=2, mlp_ratio=2,
        groups=3, name=name,
    )  # fmt: skip


PAIRS = {  # (teacher, student) and the kind of each connector
    "vit->vit": (lambda: tiny_vit(), lambda: tiny_vit(2, 8, "vit_p2"), ("tokens",) * 3),
    "resnet8->vit": (lambda: models.get_model("resnet8", 10), tiny_vit, ("grid",) * 3),
    "vit->resnet8": (tiny_vit, lambda: models.get_model("resnet8", 10), ("patchify",) * 3),
}


@functools.cache
def build_pair(name: str):
    make_teacher, make_student, _ = PAIRS[name]
    return connect(make_teacher(), make_student(), images(2, SIZE))


@pytest.mark.parametrize("name", PAIRS)
def test_stones_of_vit_pairs_compose_and_take_gradients_exactly_below_each_cut(name):
    teacher, student, conns, (tv, sv, cv), x = build_pair(name)
    assert conns.kinds == PAIRS[name][2]
    n = conns.num_stones
    t_feats = jax.eval_shape(lambda: teacher.features(tv, x)[1])
    s_feats = jax.eval_shape(lambda: student.features(sv, x)[1])
    for i in range(1, n + 1):  # each connector makes what the teacher's next block reads
        h = s_feats[conns.student_cuts[i - 1] - 1]
        y = jax.eval_shape(lambda h, i=i: conns.apply(cv, i, h)[0], h)
        assert y.shape == t_feats[conns.teacher_cuts[i - 1] - 1].shape
    stones = range(1, n + 1)

    @jit_for_one_run
    def both(variables):
        out = stepping_stones(student, variables[1], teacher, variables[0], conns, variables[2],
                              x, stones=stones, train=False)  # fmt: skip
        by_hand = [manual_stone(teacher, student, conns, variables, x, i) for i in stones]
        return out.stone_logits, by_hand

    logits, by_hand = both((tv, sv, cv))
    for i in stones:
        np.testing.assert_allclose(logits[i], by_hand[i - 1], rtol=1e-4, atol=1e-4)
    probe = jax.random.normal(jax.random.key(4), logits[1].shape)
    teacher_before = jax.tree.map(np.asarray, tv)

    def weighted(trainable, w):
        s_params, c_params = trainable
        out = stepping_stones(
            student, {**sv, "params": s_params}, teacher, tv, conns, {**cv, "params": c_params},
            x, stones=stones, train=True,
        )  # fmt: skip
        return sum(w[i - 1] * jnp.sum(out.stone_logits[i] * probe) for i in range(1, n + 1))

    jacobian_row = jit_for_one_run(jax.grad(weighted))
    for i, unit in enumerate(jnp.eye(n), 1):
        s_grads, c_grads = jacobian_row((sv["params"], cv["params"]), unit)
        for k in range(1, student.num_blocks + 1):
            norm = grad_norm(s_grads[f"block{k}"])
            assert (norm > 0) == (k <= conns.student_cuts[i - 1]), (i, k, norm)
        assert grad_norm(s_grads["head"]) == 0
        for j in range(1, n + 1):
            assert (grad_norm(c_grads[f"connector{j}"]) > 0) == (j == i), (i, j)
    jax.tree.map(np.testing.assert_array_equal, tv, teacher_before)


def _one_step(name: str, method: str, **knobs):
    """One jitted train step of `method` on pair `name`: (state before, after, metrics)."""
    teacher, student, _, (tv, _, _), x = build_pair(name)
    batch = {
        "image": x,
        "label": jnp.array([0, 9], jnp.int32),
        "index": jnp.arange(2),
        "image_strong": x[:, ::-1],  # MLKD's second view
    }
    cfg = config_defaults.distill_config(method)
    cfg[method].update(knobs)
    distiller = distillers.make_distiller(cfg, student, teacher, x.shape, num_examples=4)
    optimizer = optax.adam(1e-3)
    state = steps.create_train_state(distiller, optimizer, jax.random.key(5), x)
    step = jit_for_one_run(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    new_state, metrics = step(state, tv, batch)
    return state, new_state, metrics


def _assert_trains(state, new_state, metrics) -> None:
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
    before, after = state.params["student"], new_state.params["student"]
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
    assert all(jax.tree.leaves(changed["block1"])), "student block 1 did not move"


@pytest.mark.parametrize("method", distillers.available())
def test_every_method_trains_a_vit_student_from_a_cnn_teacher(method):
    _assert_trains(*_one_step("resnet8->vit", method))


@pytest.mark.parametrize("name", ["vit->vit", "vit->resnet8"])
@pytest.mark.parametrize("method", ["kd", "dkd", "blockkd"])
def test_logit_methods_and_block_kd_train_from_a_vit_teacher(name, method):
    _assert_trains(*_one_step(name, method))


def test_methods_that_cannot_take_a_vit_pair_say_so_when_built():
    teacher, student, *_ = build_pair("vit->resnet8")
    shape = (2, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="ofd: no margins for a vit_test teacher"):
        distillers.make_distiller({"method": "ofd"}, student, teacher, shape)
    four = vision_transformer(10, image_size=SIZE, dim=16, depth=4, heads=2, patch_size=4)
    with pytest.raises(ValueError, match="reviewkd pairs each student stage"):
        distillers.make_distiller({"method": "reviewkd"}, student, four, shape)


def test_connector_knob_pools_instead_of_patchifying_and_needs_a_map_to_tokens_cut():
    teacher, student, *_ = build_pair("vit->resnet8")
    shape = (2, SIZE, SIZE, 3)
    cfg = config_defaults.distill_config("blockkd")
    cfg.blockkd.connector = "pool"
    pooled = distillers.make_distiller(cfg, student, teacher, shape).modules.connectors
    assert pooled.kinds == ("pool",) * 3
    kernels = [pooled.init(jax.random.key(0))["params"][f"connector{i}"] for i in (1, 2, 3)]
    # resnet8's 16, 32 and 64 channels, not times 16 and 4 as patchify would make them.
    assert [k["proj"]["kernel"].shape for k in kernels] == [(16, 16), (32, 16), (64, 16)]
    with pytest.raises(ValueError, match=r"connector='pool' .* no cut of resnet8 to resnet8"):
        make_connectors(student, student, shape, connector="pool")
    with pytest.raises(ValueError, match="connector must be one of"):
        make_connectors(student, teacher, shape, connector="resize")


def test_unconnectable_vit_pairs_are_rejected_naming_the_stone_and_blocks():
    resnet8 = models.get_model("resnet8", 10)
    # At 24 pixels resnet8's blocks output 24, 12 and 6 pixels; 6 is no multiple of 4.
    vit24 = vision_transformer(10, image_size=24, patch_size=6, dim=16, depth=3, heads=2,
                               groups=3, name="vit24")  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"stone 3: resnet8 block 3 output \(6, 6, 64\) -> vit24 block 3 output \(17, 16\): "
        r"6x6 does not patchify or pool to 4x4",
    ):
        make_connectors(resnet8, vit24, (2, 24, 24, 3))
    wrong = dataclasses.replace(tiny_vit(), prefix_tokens=2)  # 17 tokens: 2 + 15 patches
    with pytest.raises(ValueError, match=r"stone 1: vit_test block 1 output .*not a square grid"):
        make_connectors(wrong, resnet8, (2, SIZE, SIZE, 3))
    two = types.SimpleNamespace(prefix_tokens=2, post_activation=False)
    one = types.SimpleNamespace(prefix_tokens=1, post_activation=False)
    kind, _, why = _connector((17, 8), (18, 8), one, two, "auto", "nearest", jnp.float32)
    assert kind == "tokens" and why == "the student's 1 prefix tokens cannot make the teacher's 2"


def test_the_cifar100_vit_recipe_validates_builds_and_decays_only_weight_matrices():
    (pair,) = test_recipes.config_module("cifar100_vit").PAIRS
    for method in distillers.available():
        if method == "dot":  # its own SGD optimiser against DeiT's AdamW
            with pytest.raises(ValueError, match="method=dot is an SGD optimiser of its own"):
                test_recipes.recipe("cifar100_vit", pair, method)
            continue
        config = test_recipes.recipe("cifar100_vit", pair, method)
        validate_config(config)
        if method == "reviewkd":  # 4 ViT blocks against resnet32x4's 3 stages
            with pytest.raises(ValueError, match="reviewkd pairs each student stage"):
                test_recipes.build(config)
        elif "stones" not in distillers.get(method).consumes:  # Block-KD: traced below
            test_recipes.build(config)
    config = test_recipes.recipe("cifar100_vit", pair, "blockkd")
    o = config.optim
    assert (o.name, o.schedule, o.weight_decay, o.warmup_epochs, o.min_learning_rate) == (
        "adamw", "cosine", 0.05, 5.0, 1e-5,
    )  # fmt: skip
    assert o.learning_rate == 5e-4 * config.global_batch_size / 512 and config.num_epochs == 300
    distiller, *_ = test_recipes.build(config)
    connectors = distiller.modules.connectors
    assert connectors.kinds == ("grid",) * 3 and connectors.student_cuts == (2, 3, 4)
    _, metrics = test_recipes.train_step_shapes(config)
    assert metrics["loss"].shape == ()
    params = jax.eval_shape(distiller.student.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    mask = optim.decay_mask(params["params"])
    block1 = mask["block1"]
    assert not block1["cls_token"] and not block1["pos_embed"]
    assert block1["patch_embed"]["proj"]["kernel"] and not block1["patch_embed"]["proj"]["bias"]
    layer = block1["blocks_0"]
    assert layer["attn"]["qkv"]["kernel"] and not layer["norm1"]["scale"]
