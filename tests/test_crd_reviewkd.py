"""CRD and ReviewKD: objectives on the right tensors, the memory bank as run state, the
ReviewKD fusion against a float64 reference, the levels of the authors' pairs, the
cross-architecture pairs and the recipes' knobs.

(Thirty steps of each on digits are in test_steps.py, with every method.)
"""

from __future__ import annotations

import functools
import json
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sklearn.datasets
from conftest import jit_for_one_run

from bkd_jax import distillers, losses, models, optim, steps
from bkd_jax.config_defaults import base_config
from bkd_jax.data import pipeline
from bkd_jax.distillers import crd, reviewkd
from bkd_jax.training import checkpointing, loop
from tests.test_recipes import config_module, recipe, train_step_shapes

SHAPE = (8, 8, 8, 3)  # 8 digits, grey repeated to 3 channels
NUM_EXAMPLES = 20
CROSS_PAIRS = (
    ("resnet32x4", "shufflenetv1"),
    ("resnet32x4", "shufflenetv2"),
    ("vgg13", "mobilenetv2"),
    ("resnet50", "mobilenetv2"),
    ("wrn_40_2", "shufflenetv1"),
)


@functools.cache
def digits_batch() -> dict[str, jax.Array]:
    digits = sklearn.datasets.load_digits()
    x = np.repeat(digits.images[: SHAPE[0], :, :, None] / 16.0, 3, axis=-1).astype(np.float32)
    return {
        "image": jnp.asarray(x),
        "label": jnp.asarray(digits.target[: SHAPE[0]], jnp.int32),
        "index": jnp.array([3, 0, 17, 5, 11, 19, 8, 2], jnp.int32),  # rows of the bank
        "rng": jax.random.key(7),
    }


def jit_init(net: models.BlockNet, seed: int, x: jax.Array):
    """`net.init`, jitted: eager initialisers compile op by op, which is slow on CPU."""
    return jit_for_one_run(net.init)(jax.random.key(seed), x)


@functools.cache
def pair_vars():
    student, teacher = models.get_model("resnet8", 10), models.get_model("resnet8", 10)
    x = digits_batch()["image"]
    return student, teacher, jit_init(student, 0, x), jit_init(teacher, 1, x)


def taps_of(student, teacher, student_vars, teacher_vars):
    """The student's logits and training-mode taps, and the teacher's taps, on the batch."""
    images = digits_batch()["image"]
    logits, s_taps, _ = student.taps(student_vars, images, train=True)
    return logits, s_taps, teacher.taps(teacher_vars, images)[1]


def make(method: str, **knobs) -> distillers.Distiller:
    student, teacher, _, _ = pair_vars()
    cfg = distillers.default_config(method)
    cfg[method].update(knobs)
    return distillers.make_distiller(cfg, student, teacher, SHAPE, num_examples=NUM_EXAMPLES)


# ---------------------------------------------------------------------------------------
# CRD


def test_crd_objective_is_the_nce_loss_of_the_embedded_pooled_features():
    distiller = make("crd", negatives=50)
    student, teacher, student_vars, teacher_vars = pair_vars()
    module_vars = jit_for_one_run(distiller.init_modules)(jax.random.key(4))
    batch = digits_batch()
    forward = jit_for_one_run(functools.partial(distiller.forward, train=True))
    out = forward(student_vars, module_vars, teacher_vars, batch)
    loss = distiller.objective(out, batch, jnp.float32(1.0))

    # The right tensors, computed here: the pooled features, the heads as affine maps, the
    # banks as initialised, the first batch's partition constants.
    @jit_for_one_run
    def reference(module_vars, idx):
        s_logits, s_taps, t_taps = taps_of(student, teacher, student_vars, teacher_vars)
        heads = module_vars["params"]
        e_s = s_taps.pooled @ heads["embed_student"]["kernel"] + heads["embed_student"]["bias"]
        e_t = t_taps.pooled @ heads["embed_teacher"]["kernel"] + heads["embed_teacher"]["bias"]
        banks = module_vars["memory"]["student"], module_vars["memory"]["teacher"]
        z = losses.crd_normalizers(e_s, e_t, *banks, idx)
        updated = [
            losses.crd_update_memory(bank, e, batch["index"]) for bank, e in zip(banks, (e_s, e_t))
        ]
        ce = losses.cross_entropy(s_logits, batch["label"])
        return losses.crd_loss(e_s, e_t, *banks, idx, z), ce, z, updated

    want, ce, z, updated = reference(module_vars, out.extras["contrast_idx"])
    np.testing.assert_allclose(loss.distill, 0.8 * want, rtol=1e-5)
    np.testing.assert_allclose(loss.task, 1.0 * ce, rtol=1e-6)
    np.testing.assert_allclose(loss.metrics["crd"], want, rtol=1e-5)

    memory = out.module_vars["memory"]
    np.testing.assert_allclose(memory["normalizers"], z, rtol=1e-5)
    for side, bank in zip(("student", "teacher"), updated):
        np.testing.assert_allclose(memory[side], bank, atol=1e-6)
    untouched = np.setdiff1d(np.arange(NUM_EXAMPLES), batch["index"])
    np.testing.assert_array_equal(
        memory["student"][untouched], module_vars["memory"]["student"][untouched]
    )

    # Once set, the constants stay: the next batch is normalised by the first one's.
    again = forward(student_vars, out.module_vars, teacher_vars, batch)
    np.testing.assert_array_equal(again.module_vars["memory"]["normalizers"], memory["normalizers"])


def test_crd_negatives_are_other_examples_drawn_from_the_key():
    index = jnp.array([0, 4, 9, 2], jnp.int32)
    key = jax.random.key(3)
    idx = np.asarray(crd.contrast_indices(key, index, 10, 2000))
    assert idx.shape == (4, 2001) and idx.dtype == np.int32
    np.testing.assert_array_equal(idx[:, 0], index)
    negatives = idx[:, 1:]
    assert (negatives != np.asarray(index)[:, None]).all()
    assert negatives.min() >= 0 and negatives.max() <= 9
    for row, own in zip(negatives, np.asarray(index)):  # all 9 others, about equally often
        counts = np.bincount(row, minlength=10)
        assert counts[own] == 0 and (counts[np.arange(10) != own] > 2000 / 9 * 0.7).all()
    np.testing.assert_array_equal(idx, crd.contrast_indices(key, index, 10, 2000))
    other = crd.contrast_indices(jax.random.fold_in(key, 1), index, 10, 2000)
    assert not np.array_equal(idx, other)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def test_crd_step_is_a_function_of_the_state_its_seed_and_step():
    distiller = make("crd", negatives=64)
    optimizer = optax.adam(3e-3)
    batch = {k: v for k, v in digits_batch().items() if k != "rng"}
    _, _, _, teacher_vars = pair_vars()
    step = jit_for_one_run(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    state = steps.create_train_state(distiller, optimizer, jax.random.key(5), batch["image"])
    first, m1 = step(state, teacher_vars, batch)
    again, m2 = step(state, teacher_vars, batch)
    for key, value in _flat((first, m1)).items():
        np.testing.assert_array_equal(_flat((again, m2))[key], value, err_msg=key)
    banks = first.module_state["memory"], state.module_state["memory"]
    assert not np.array_equal(banks[0]["student"], banks[1]["student"])
    # Another step number or another run key draws other negatives: another loss.
    _, later = step(state.replace(step=state.step + 1), teacher_vars, batch)
    other_rng = jax.random.key_data(jax.random.key(99))
    _, reseeded = step(state.replace(rng=other_rng), teacher_vars, batch)
    assert float(later["crd"]) != float(m1["crd"]) != float(reseeded["crd"])


def test_crd_needs_example_indices_and_the_training_set_size():
    distiller = make("crd", negatives=8)
    _, _, student_vars, teacher_vars = pair_vars()
    module_vars = jit_for_one_run(distiller.init_modules)(jax.random.key(0))
    batch = {k: v for k, v in digits_batch().items() if k != "index"}
    with pytest.raises(ValueError, match=r"crd: the training batch has no 'index'"):
        distiller.forward(student_vars, module_vars, teacher_vars, batch, train=True)
    # Evaluation reads no bank, so it needs no index.
    distiller.eval_logits(student_vars, module_vars, teacher_vars, batch["image"])
    student, teacher, _, _ = pair_vars()
    with pytest.raises(ValueError, match="make_distiller needs num_examples"):
        distillers.make_distiller({"method": "crd"}, student, teacher, SHAPE)


# ---------------------------------------------------------------------------------------
# ReviewKD


def test_nearest_resize_picks_pytorch_source_pixels():
    x = jnp.arange(4 * 6, dtype=jnp.float32).reshape(1, 4, 6, 1)
    # floor(i * in / out): rows 0, 2 of 4; columns 0, 1, 3, 4 of 6 (1.5 apart).
    want = np.array([[0, 1, 3, 4], [12, 13, 15, 16]], np.float32)
    np.testing.assert_array_equal(reviewkd.nearest_resize(x, (2, 4))[0, :, :, 0], want)
    up = reviewkd.nearest_resize(jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1), (4, 4))
    np.testing.assert_array_equal(up[0, :, :, 0], np.kron([[1, 2], [3, 4]], np.ones((2, 2))))


def _np_bn(x, p):
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_conv(x, kernel, bias=None):
    """Stride-1 convolution with PyTorch's padding k // 2, NHWC, float64."""
    k = kernel.shape[0]
    pad = k // 2
    h, w = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = sum(
        np.einsum("nhwc,cd->nhwd", xp[:, i : i + h, j : j + w], kernel[i, j])
        for i in range(k)
        for j in range(k)
    )
    return out if bias is None else out + bias


def _np_nearest(x, size):
    rows = [np.floor(np.arange(o) * n / o).astype(int) for n, o in zip(x.shape[1:3], size)]
    return x[:, rows[0]][:, :, rows[1]]


def _np_review(params, feats, levels):
    """ReviewKD's fusion from the paper's description (and ABF.forward), deepest first."""
    outputs, residual = [None] * len(levels), None
    for i in reversed(range(len(levels))):
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), params[f"abf{i + 1}"])
        x = _np_bn(_np_conv(feats[i], p["conv1"]["kernel"]), p["bn1"])
        if residual is not None:
            y = _np_nearest(residual, x.shape[1:3])
            logits = _np_conv(
                np.concatenate([x, y], -1), p["att_conv"]["kernel"], p["att_conv"]["bias"]
            )
            z = 1 / (1 + np.exp(-logits))
            x = x * z[..., :1] + y * z[..., 1:]
        x = _np_nearest(x, levels[i].teacher[:2])
        outputs[i] = _np_bn(_np_conv(x, p["conv2"]["kernel"]), p["bn2"])
        residual = x
    return outputs


def test_review_fusion_matches_a_float64_reference_with_resizing_both_ways():
    Level = reviewkd.Level
    levels = (  # stage 1 grows 3x3 -> 6x6, stage 2 shrinks 4x4 -> 2x2, then the pooled level
        Level((3, 3, 5), (6, 6, 4)),
        Level((4, 4, 6), (2, 2, 3)),
        Level((1, 1, 7), (1, 1, 9)),
    )
    review = reviewkd.Review(levels, mid_channels=4)
    rng = np.random.default_rng(0)
    feats = [jnp.asarray(rng.normal(size=(5, *lv.student)), jnp.float32) for lv in levels]
    variables = jit_for_one_run(review.init)(jax.random.key(1), feats)
    got, _ = jit_for_one_run(functools.partial(review.apply, train=True, mutable=["batch_stats"]))(
        variables, feats
    )
    want = _np_review(variables["params"], [np.asarray(f, np.float64) for f in feats], levels)
    for g, w, lv in zip(got, want, levels):
        assert g.shape[1:] == lv.teacher
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_reviewkd_objective_is_hcl_of_the_fused_features_against_the_teachers():
    distiller = make("reviewkd")
    student, teacher, student_vars, teacher_vars = pair_vars()
    module_vars = jit_for_one_run(distiller.init_modules)(jax.random.key(4))
    batch = digits_batch()
    out = jit_for_one_run(functools.partial(distiller.forward, train=True))(
        student_vars, module_vars, teacher_vars, batch
    )
    loss = distiller.objective(out, batch, jnp.float32(0.25))

    _, s_taps, t_taps = jit_for_one_run(functools.partial(taps_of, student, teacher))(
        student_vars, teacher_vars
    )
    pooled = lambda taps: taps.pooled[:, None, None, :]  # noqa: E731
    review = jit_for_one_run(
        lambda feats: distiller.modules.review.apply(
            module_vars, feats, train=True, mutable=["batch_stats"]
        )[0]
    )
    fused = review([*s_taps.blocks, pooled(s_taps)])
    targets = [*t_taps.preact, pooled(t_taps)]
    want = losses.hcl_loss(fused, targets)
    np.testing.assert_allclose(loss.distill, 0.25 * 1.0 * want, rtol=1e-5)
    np.testing.assert_allclose(loss.metrics["hcl"], want, rtol=1e-5)
    assert loss.metrics["hcl"] > 0
    np.testing.assert_allclose(
        loss.task, losses.cross_entropy(out.student_logits, batch["label"]), rtol=1e-6
    )
    # stu_preact reviews the student's pre-activations instead of its block outputs.
    preact = make("reviewkd", stu_preact=True)
    out = jit_for_one_run(functools.partial(preact.forward, train=True))(
        student_vars, module_vars, teacher_vars, batch
    )
    fused = review([*s_taps.preact, pooled(s_taps)])
    for g, w in zip(out.extras["fused"], fused):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert distiller.warmup_epochs == 20


# dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py build_review_kd: in_channels, shapes,
# out_channels, out_shapes, all here shallowest stage first and the pooled level last (the
# authors write the two size lists deepest first); mdistiller's engine/cfg.py REVIEWKD
# defaults are the first pair's.
AUTHORS_LEVELS = {
    ("resnet32x4", "resnet8x4"): (
        [64, 128, 256, 256],
        [32, 16, 8, 1],
        [64, 128, 256, 256],
        [32, 16, 8, 1],
    ),
    ("resnet32x4", "shufflenetv1"): (
        [240, 480, 960, 960],
        [16, 8, 4, 1],
        [64, 128, 256, 256],
        [32, 16, 8, 1],
    ),
    ("resnet32x4", "shufflenetv2"): (
        [116, 232, 464, 1024],
        [16, 8, 4, 1],
        [64, 128, 256, 256],
        [32, 16, 8, 1],
    ),
    ("vgg13", "mobilenetv2"): (
        [12, 16, 48, 160, 1280],
        [16, 8, 4, 2, 1],
        [128, 256, 512, 512, 512],
        [16, 8, 4, 4, 1],
    ),
    ("resnet50", "mobilenetv2"): (
        [12, 16, 48, 160, 1280],
        [16, 8, 4, 2, 1],
        [256, 512, 1024, 2048, 2048],
        [32, 16, 8, 4, 1],
    ),
    ("wrn_40_2", "shufflenetv1"): (
        [240, 480, 960, 960],
        [16, 8, 4, 1],
        [32, 64, 128, 128],
        [32, 16, 8, 1],
    ),
}


@pytest.mark.parametrize("pair", list(AUTHORS_LEVELS))
def test_reviewkd_levels_read_from_the_taps_are_the_authors(pair):
    teacher, student = (models.get_model(name, 100) for name in pair)
    levels = reviewkd.review_levels(student, teacher, (1, 32, 32, 3))
    got = (
        [lv.student[2] for lv in levels], [lv.student[0] for lv in levels],
        [lv.teacher[2] for lv in levels], [lv.teacher[0] for lv in levels],
    )  # fmt: skip
    assert tuple(map(list, AUTHORS_LEVELS[pair])) == got


def test_reviewkd_rejects_networks_of_unequal_depth_naming_the_stages():
    student, teacher = models.get_model("resnet8", 100), models.get_model("vgg13", 100)
    with pytest.raises(ValueError, match=r"resnet8 has 3 stages .*\(8, 8, 64\).* vgg13 has 4"):
        distillers.make_distiller({"method": "reviewkd"}, student, teacher, (1, 32, 32, 3))


@pytest.mark.parametrize("method", ["crd", "reviewkd"])
def test_both_trace_for_the_cross_architecture_pairs(method):
    for pair in CROSS_PAIRS:
        _, metrics = train_step_shapes(recipe("cifar100", pair, method))
        assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32, pair


def test_recipes_set_the_authors_knobs():
    knobs = lambda name, pair: recipe(name, pair, "reviewkd").distill.reviewkd  # noqa: E731
    assert knobs("cifar100", ("resnet32x4", "resnet8x4")).feat_weight == 5.0
    assert knobs("cifar100", ("resnet32x4", "shufflenetv2")).feat_weight == 8.0
    assert knobs("cifar100", ("resnet56", "resnet20")).feat_weight == 0.6
    assert knobs("cifar100", ("vgg13", "vgg8")).feat_weight == 1.0  # no published weight
    cifar = knobs("cifar100", ("resnet32x4", "resnet8x4"))
    assert (cifar.warmup_epochs, cifar.stu_preact, cifar.max_mid_channel) == (20, False, 512)
    r34, r50 = (knobs("imagenet", pair) for pair in config_module("imagenet").PAIRS)
    assert (r34.feat_weight, r34.warmup_epochs, r34.stu_preact, r34.max_mid_channel) == (
        1.0, 1, True, 512,
    )  # fmt: skip
    assert (r50.feat_weight, r50.warmup_epochs, r50.stu_preact, r50.max_mid_channel) == (
        8.0, 1, True, 256,
    )  # fmt: skip
    crd_knobs = recipe("imagenet", config_module("imagenet").PAIRS[1], "crd").distill.crd
    assert dict(crd_knobs) == crd.knobs()
    r50_mv1 = recipe("imagenet", config_module("imagenet").PAIRS[1], "reviewkd")
    student, teacher = (models.get_model(n, 1000) for n in (r50_mv1.student, r50_mv1.teacher))
    built = distillers.make_distiller(r50_mv1.distill, student, teacher, (1, 224, 224, 3))
    assert built.modules.review.mid_channels == 256
    assert math.isclose(built.warmup_epochs, 1.0)


# ---------------------------------------------------------------------------------------
# A CRD run preempted by SIGTERM and resumed equals an uninterrupted one.

RESUME_STEPS, STOP_AFTER = 6, 3


def _pipeline_yields_indices() -> bool:
    config = base_config("digits", teacher="resnet8", student="resnet8", method="crd")
    batches = pipeline.train_batches(config.dataset, global_batch_size=16, seed=0)
    return "index" in next(batches)


def _crd_config(teacher_dir: str):
    config = base_config("digits", teacher="resnet8", student="resnet8", method="crd")
    config.teacher_checkpoint = teacher_dir
    config.distill.crd.negatives = 256
    config.num_train_steps = RESUME_STEPS
    config.global_batch_size = 16  # 89 steps per epoch: the resume is mid-epoch
    config.log_every_steps = 1
    config.eval_every_epochs = 100
    config.tensorboard = False
    return config


class _StopAfter(loop.MetricWriter):
    """A metric writer that sends this process SIGTERM once it has logged step STOP_AFTER."""

    def write_scalars(self, step, scalars):
        super().write_scalars(step, scalars)
        if step == STOP_AFTER and "train/loss" in scalars:
            signal.raise_signal(signal.SIGTERM)


def _final_state(config, workdir):
    student = models.get_model(config.student, 10)
    teacher = models.get_model(config.teacher, 10)
    distiller = distillers.make_distiller(
        config.distill, student, teacher, (1, 8, 8, 3), num_examples=1437
    )
    optimizer = optim.make_optimizer(config.optim, steps_per_epoch=89)
    abstract = jax.eval_shape(
        functools.partial(steps.create_train_state, distiller, optimizer),
        jax.random.key(0),
        jnp.zeros((1, 8, 8, 3)),
    )
    on_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_host), abstract
    )
    checkpointer = checkpointing.Checkpointer(
        workdir, save_interval_steps=1, best_metric=loop.BEST_METRIC
    )
    state, _ = checkpointer.restore(target)
    checkpointer.close()
    return jax.device_get(state)


def _train_losses(workdir) -> list[tuple[int, float]]:
    records = (json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def test_crd_resumes_bit_exactly_after_sigterm(tmp_path, monkeypatch):
    if not _pipeline_yields_indices():
        pytest.skip("the input pipeline does not yield example indices ('index') yet")
    teacher = models.get_model("resnet8", 10)
    variables = jit_init(teacher, 0, jnp.zeros((1, 8, 8, 3)))
    checkpointing.save_variables(tmp_path / "teacher", variables, {"model": "resnet8"})
    config = _crd_config(str(tmp_path / "teacher"))
    loop.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
    monkeypatch.setattr(loop, "MetricWriter", _StopAfter)
    stopped = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    # The stop is agreed on at the step after the signal (the preemption sync point).
    assert STOP_AFTER <= stopped["steps"] < RESUME_STEPS
    monkeypatch.undo()
    loop.train_and_evaluate(config, str(tmp_path / "resumed"))

    want = _train_losses(tmp_path / "uninterrupted")
    assert [s for s, _ in want] == list(range(1, RESUME_STEPS + 1))
    assert _train_losses(tmp_path / "resumed") == want
    got = _flat(_final_state(config, tmp_path / "resumed"))
    expected = _flat(_final_state(config, tmp_path / "uninterrupted"))
    assert got.keys() == expected.keys()
    assert any("memory" in k for k in got) and any("embed_student" in k for k in got)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
