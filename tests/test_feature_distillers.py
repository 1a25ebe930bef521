"""The feature-based baselines as distillers: what each objective reads, the modules'
arithmetic, cross-architecture pairs and knob errors. (Training on digits: test_steps.py.)

The modules' outputs are recomputed here in float64 numpy from their definitions
(1x1 convolutions as matrix products, BatchNorm with the batch's biased variance and
eps 1e-5), and the losses are those of `bkd_jax.losses`, which test_feature_losses.py
checks against the papers' formulas.
"""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_steps import build, distill_config, teacher_and_batch

from bkd_jax import console, distillers, losses, models
from bkd_jax.distillers import ofd
from bkd_jax.distillers.feature_modules import first_stages, tap_shapes
from bkd_jax.losses.feature import pool_to_smaller

METHODS = ("fitnet", "at", "nst", "pkt", "kdsvd", "rkd", "sp", "vid", "ofd")
CROSS_PAIRS = (
    ("resnet32x4", "shufflenetv1"),
    ("resnet32x4", "shufflenetv2"),
    ("vgg13", "mobilenetv2"),
    ("resnet50", "mobilenetv2"),
    ("wrn_40_2", "shufflenetv1"),
)


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _conv1x1(x, kernel) -> np.ndarray:
    return np.einsum("nhwc,cd->nhwd", _np(x), _np(kernel)[0, 0])


def _batch_norm(x: np.ndarray, bn) -> np.ndarray:
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + 1e-5) * _np(bn["scale"]) + _np(bn["bias"])


def _randomize_batch_norms(variables, seed: int):
    """Teacher variables whose BatchNorm scales and shifts all differ (margins differ)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for k, (path, x) in zip(keys, leaves):
        name = path[-1].key
        low = {"scale": 0.5, "bias": -1.0}.get(name)
        new.append(x if low is None else jax.random.uniform(k, x.shape, x.dtype, low, low + 1))
    return {**variables, "params": jax.tree.unflatten(tree, new)}


def _forward(method: str, teacher_seed: int | None = None):
    distiller, _, state, teacher_vars, batch = build(method)
    if teacher_seed is not None:
        teacher_vars = _randomize_batch_norms(teacher_vars, teacher_seed)
    module_vars = state.variables("modules")
    out = distiller.forward(
        state.variables("student"), module_vars, teacher_vars, batch, train=True
    )
    return distiller, out, module_vars, teacher_vars, batch


def _expected_distill(method, out, module_vars, teacher_vars):
    """feat_weight * the pure loss, on the tensors mdistiller's method reads."""
    s, t = out.student_taps, out.teacher_taps
    if method == "at":
        return 1000.0 * losses.at_loss(s.blocks, t.blocks, p=2)
    if method == "nst":
        return 50.0 * losses.nst_loss(s.blocks, t.blocks)
    if method == "pkt":
        return 30000.0 * losses.pkt_loss(s.pooled, t.pooled)
    if method == "rkd":
        return losses.rkd_loss(s.pooled, t.pooled, distance_weight=25, angle_weight=50)
    if method == "sp":
        return 3000.0 * losses.sp_loss([s.blocks[-1]], [t.blocks[-1]])
    if method == "kdsvd":
        return losses.kdsvd_loss(s.blocks, t.blocks, k=1)
    params = module_vars["params"]
    if method == "fitnet":  # feats[2] is the second native block; same sizes: a 1x1 conv
        reg = params["hint0"]
        hint = _conv1x1(s.blocks[1], reg["conv"]["kernel"]) + _np(reg["conv"]["bias"])
        hint = np.maximum(_batch_norm(hint, reg["bn"]), 0.0)
        np.testing.assert_allclose(out.extras["hint"][0], hint, rtol=1e-4, atol=1e-5)
        return 100.0 * losses.fitnet_loss(jnp.asarray(hint, jnp.float32), t.blocks[1])
    if method == "vid":
        total = 0.0
        alpha0 = math.log(math.expm1(5.0 - 1e-5))  # softplus(alpha) + 1e-5 = 5
        for i, (fs, ft) in enumerate(zip(s.blocks, t.blocks)):
            reg = params[f"vid{i}"]
            np.testing.assert_allclose(reg["log_scale"], np.full(ft.shape[-1], alpha0), 1e-6)
            mu = _conv1x1(fs, reg["conv0"]["kernel"])
            mu = _conv1x1(np.maximum(mu, 0), reg["conv1"]["kernel"])
            mu = _conv1x1(np.maximum(mu, 0), reg["conv2"]["kernel"])
            np.testing.assert_allclose(out.extras["vid"][i][0], mu, rtol=1e-4, atol=1e-5)
            total += losses.vid_loss(jnp.asarray(mu, jnp.float32), ft, reg["log_scale"])
        return total
    assert method == "ofd"
    total = 0.0
    for i, (fs, ft) in enumerate(zip(s.preact, t.preact)):
        # mdistiller's resnet20 get_bn_before_relu: layer{i}[-1].bn2, the third unit's.
        bn = teacher_vars["params"][f"block{i + 1}"][f"layer{i + 1}_2"]["bn2"]
        margin = losses.ofd_margin(bn["scale"], bn["bias"])
        np.testing.assert_array_equal(out.extras["ofd_margins"][i], margin)
        conn = params[f"ofd{i}"]
        connected = _batch_norm(_conv1x1(fs, conn["conv"]["kernel"]), conn["bn"])
        np.testing.assert_allclose(out.extras["ofd"][i], connected, rtol=1e-4, atol=1e-5)
        connected = jnp.asarray(connected, jnp.float32)
        total += 0.001 * losses.ofd_loss(connected, ft, margin) / 2 ** (2 - i)
    return total


@pytest.mark.parametrize("method", METHODS)
def test_objective_is_the_weighted_ce_and_the_pure_loss_of_the_right_tensors(method):
    # OFD's margins come from the teacher's BatchNorms: make each one different.
    seed = 5 if method == "ofd" else None
    distiller, out, module_vars, teacher_vars, batch = _forward(method, teacher_seed=seed)
    loss = distiller.objective(out, batch, jnp.float32(0.5))  # no warm-up: 0.5 is ignored
    np.testing.assert_allclose(
        loss.task, losses.cross_entropy(out.student_logits, batch["label"]), rtol=1e-6
    )
    expected = _expected_distill(method, out, module_vars, teacher_vars)
    np.testing.assert_allclose(loss.distill, expected, rtol=2e-4)
    assert float(loss.distill) > 0 or method == "vid"


def test_ofd_margins_are_mdistillers_batch_norms_before_the_relus():
    """Which BatchNorm per architecture, from mdistiller's `get_bn_before_relu`."""
    expected = {
        "resnet8": ["block1/layer1_0/bn2", "block2/layer2_0/bn2", "block3/layer3_0/bn2"],
        "resnet50": [f"block{k}/layer{k}_{u}/bn3" for k, u in ((1, 2), (2, 3), (3, 5), (4, 2))],
        "imagenet_resnet18": [f"block{k}/layer{k}_1/bn2" for k in (1, 2, 3, 4)],
        "wrn_16_2": ["block2/block2/layer_0/bn1", "block3/block3/layer_0/bn1", "head/bn1"],
        "vgg13": [f"block{k + 1}/block{k}_4" for k in (1, 2, 3, 4)],
        "mobilenetv2": [
            f"block{k}/blocks_{g}_{u}/conv_7"
            for k, (g, u) in enumerate(((1, 1), (2, 2), (4, 2), (6, 0)), 1)
        ],
        "imagenet_mobilenetv1": [
            f"block{k}/model_{i}_4" for k, i in zip((1, 2, 3, 4), (3, 5, 11, 13))
        ],
    }
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    for name, paths in expected.items():
        net = models.get_model(name, 10)
        params = jax.eval_shape(lambda x, net=net: net.init(jax.random.key(0), x), x)["params"]
        named = jax.tree_util.tree_map_with_path(
            lambda p, _: "/".join(k.key for k in p[:-1]), params
        )
        chosen = ofd._margin_bn(net, len(paths))(named)
        assert [bn["scale"] for bn in chosen] == paths, name


def _distillers(methods, teacher_name: str, student_name: str, size: int = 32):
    teacher = models.get_model(teacher_name, 100)
    student = models.get_model(student_name, 100)
    shape = (2, size, size, 3)
    return {
        m: distillers.make_distiller(distill_config(m), student, teacher, shape) for m in methods
    }


def _loss_shapes(built):
    """The loss of every distiller, from one traced forward pass of the shared networks.

    The feature methods' forward passes differ only in their modules, so the taps are
    traced once and each method's modules and objective run on them, as
    `Distiller.forward` would (test_recipes.py traces each method's own train step).
    """
    first = next(iter(built.values()))
    student, teacher = first.student, first.teacher
    batch = {"image": jnp.zeros((2, 32, 32, 3)), "label": jnp.zeros((2,), jnp.int32)}
    plain = distillers.make_distiller(distill_config("at"), student, teacher, (2, 32, 32, 3))

    def totals(key):
        keys = jax.random.split(key, 3)
        student_vars = student.init(keys[0], batch["image"])
        teacher_vars = teacher.init(keys[1], batch["image"])
        shared = plain.forward(student_vars, {}, teacher_vars, batch, train=True)
        result = {}
        for method, distiller in built.items():
            out = shared
            if distiller.modules is not None:
                module_vars = distiller.init_modules(keys[2])
                out, _ = distiller.modules.apply(
                    module_vars, shared, batch, teacher_vars, train=True
                )
            result[method] = distiller.objective(out, batch, 1.0).total
        return result

    return jax.eval_shape(totals, jax.random.key(0))


@pytest.mark.parametrize("pair", CROSS_PAIRS, ids="->".join)
def test_every_method_builds_for_the_cross_architecture_pairs(pair):
    for method, loss in _loss_shapes(_distillers(METHODS, *pair)).items():
        assert loss.shape == () and loss.dtype == jnp.float32, method


def test_models_that_do_not_pair_are_a_build_error_naming_the_tensors():
    # resnet8's feats[2] is 16 px at 32 px input, imagenet_resnet18's 4 px: no regressor.
    with pytest.raises(ValueError, match=r"feats\[2\] \(4, 4, 128\).*feats\[2\] \(16, 16, 32\)"):
        _distillers(["fitnet"], "resnet8", "imagenet_resnet18")
    with pytest.raises(ValueError, match="no margins for a shufflenetv1 teacher"):
        _distillers(["ofd"], "shufflenetv1", "resnet8")


def _zoo_stage_pairs():
    """(student, teacher) per-example shapes of every stage AT, NST and KD-SVD pair, for
    every pair of configs/cifar100.py (32 px) and configs/imagenet.py (224 px)."""
    configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
    for name, side in (("cifar100", 32), ("imagenet", 224)):
        for teacher, student in console.load_config_file(configs / f"{name}.py").PAIRS:
            nets = (models.get_model(model, 10) for model in (student, teacher))
            s, t = (tap_shapes(net, (side, side, 3)) for net in nets)
            yield from zip(*first_stages(s.blocks, t.blocks))


def test_pooling_the_taller_map_is_pooling_the_larger_area_for_every_zoo_pair():
    """mdistiller's height rule and an area rule pool the same map to the same size."""
    pooled = 0
    for s_shape, t_shape in _zoo_stage_pairs():
        s_hw, t_hw = s_shape[:2], t_shape[:2]
        by_area = min(s_hw, t_hw, key=lambda hw: hw[0] * hw[1])
        fs, ft = (jax.ShapeDtypeStruct((1, *shape), jnp.float32) for shape in (s_shape, t_shape))
        out_s, out_t = jax.eval_shape(pool_to_smaller, fs, ft)
        assert out_s.shape[1:3] == out_t.shape[1:3] == by_area, (s_shape, t_shape)
        pooled += s_hw != t_hw
    assert pooled > 0  # some zoo pairs do pool: the check is not vacuous


def test_unequal_stage_counts_pair_the_first_or_the_last_stages_as_mdistiller():
    teacher, student = models.get_model("resnet50", 10), models.get_model("resnet8", 10)
    shape = (2, 32, 32, 3)
    widths = {}
    for method in ("vid", "ofd"):
        distiller = distillers.make_distiller(distill_config(method), student, teacher, shape)
        params = jax.eval_shape(distiller.init_modules, jax.random.key(0))["params"]
        kernels = [params[f"{method}{i}"]["conv" if method == "ofd" else "conv0"] for i in range(3)]
        widths[method] = [k["kernel"].shape[2:] for k in kernels]
    # resnet8's stages have 16, 32, 64 channels; resnet50's 256, 512, 1024, 2048.
    assert widths["vid"] == [(16, 256), (32, 512), (64, 1024)]  # zip: the first three
    assert widths["ofd"] == [(16, 512), (32, 1024), (64, 2048)]  # _align_list: the last three


@pytest.mark.parametrize(
    ("method", "knob", "value", "message"),
    [
        ("fitnet", "hint_layer", 4, r"fitnet.hint_layer=4 must be an integer in 0..3"),
        ("at", "p", 0.0, r"at.p=0.0 must be a finite number > 0"),
        ("kdsvd", "k", 0, r"kdsvd.k=0 must be an integer >= 1"),
        ("vid", "init_pred_var", 1e-6, r"vid.init_pred_var=1e-06 must exceed eps"),
        ("ofd", "connector_kernel_size", 2, r"ofd.connector_kernel_size=2 must be odd"),
        ("pkt", "feat_weight", -1.0, r"pkt.feat_weight=-1.0 must be a finite number >= 0"),
        ("rkd", "angle_weight", math.inf, r"rkd.angle_weight=inf must be a finite number"),
    ],
)
def test_bad_knobs_are_rejected(method, knob, value, message):
    teacher, _, _ = teacher_and_batch()
    student = models.get_model("resnet8", 10)
    cfg = distill_config(method, **{knob: value})
    with pytest.raises(ValueError, match=message):
        distillers.make_distiller(cfg, student, teacher, (16, 8, 8, 3))


def test_blockkd_with_a_feature_loss_adds_its_term_and_trains_its_modules():
    """Block-KD plus AT (no modules) and plus FitNet (its hint regressor beside the stones)."""
    _, _, state, teacher_vars, batch = build("blockkd")
    for feature, weight in (("at", 0.5), ("fitnet", 1.0)):
        combined, _, c_state, _, _ = build("blockkd", feature_method=feature, feature_weight=weight)
        assert set(c_state.params["modules"]) == (
            {"stones", "feature"} if feature == "fitnet" else set(state.params["modules"])
        )
        loss, _ = combined.loss(
            c_state.variables("student"), c_state.variables("modules"), teacher_vars,
            batch, jnp.float32(1.0),
        )  # fmt: skip
        term = loss.metrics[f"feature/{feature}"]
        knobs = distillers.get(feature).knobs()
        blockkd_only = loss.metrics["task"] + loss.metrics["distill"] + loss.metrics["cross"]
        np.testing.assert_allclose(
            loss.total, blockkd_only + weight * knobs["feat_weight"] * term, rtol=1e-5
        )
    with pytest.raises(ValueError, match="feature_method='kd' is not a feature method"):
        build("blockkd", feature_method="kd")
