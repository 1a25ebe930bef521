"""WKD as distillers (wkd_l, wkd_f, wkd): the tensors each objective reads, the cosine
decay of the weights, the cost sources and the knob errors. (The losses themselves:
test_wkd_losses.py; training on digits: test_steps.py.)"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_feature_distillers import _batch_norm, _conv1x1
from test_steps import build

from bkd_jax import distillers, losses
from bkd_jax.distillers import wkd
from bkd_jax.distillers.feature_modules import feats


def _fc_cost(teacher_vars, sharpen=1.0):
    rows = np.asarray(teacher_vars["params"]["head"]["fc"]["kernel"], np.float64).T
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return 1 - np.exp(-sharpen * (1 - rows @ rows.T))


@pytest.mark.parametrize("method", ["wkd_l", "wkd_f", "wkd"])
def test_objective_is_ce_and_the_wkd_terms_of_the_right_tensors(method):
    distiller, _, state, teacher_vars, batch = build(method)
    out = distiller.forward(
        state.variables("student"), state.variables("modules"), teacher_vars, batch, train=True
    )
    decay = jnp.float32(0.5)
    loss = distiller.objective(out, batch, decay)
    k = distillers.get(method).knobs()
    labels = batch["label"]
    np.testing.assert_allclose(loss.task, losses.cross_entropy(out.student_logits, labels))
    expected = 0.0
    if k["logit_weight"]:
        np.testing.assert_allclose(out.extras["wkd_cost"], _fc_cost(teacher_vars), atol=1e-6)
        expected += losses.wkd_logit_loss(
            out.student_logits, out.teacher_logits, labels, _fc_cost(teacher_vars),
            temperature=8.0, weight=0.5 * k["logit_weight"],
        )  # fmt: skip
    if k["feat_weight"]:  # feats[-1] through the 1x1 ConvReg (equal map sizes here)
        reg = state.params["modules"]["wkd0"]
        hint = _conv1x1(feats(out.student_taps)[-1], reg["conv"]["kernel"])
        hint = np.maximum(_batch_norm(hint + np.asarray(reg["conv"]["bias"]), reg["bn"]), 0.0)
        np.testing.assert_allclose(out.extras["wkd"][0], hint, rtol=1e-4, atol=1e-5)
        expected += 0.5 * k["feat_weight"] * losses.wkd_feature_loss(
            jnp.asarray(hint, jnp.float32), feats(out.teacher_taps)[-1],
            mean_cov_ratio=k["mean_cov_ratio"],
        )  # fmt: skip
    np.testing.assert_allclose(loss.distill, expected, rtol=1e-4)
    assert float(loss.distill) > 0


def test_weights_decay_by_a_cosine_after_the_start_epoch():
    def factor(epoch, start=150, end=240):
        return float(wkd.decay_factor(jnp.int32((epoch - 1) * 10 + 3), 10, start, end))

    assert factor(1) == factor(150) == 1.0
    assert math.isclose(factor(151), 0.5 * (1 + math.cos(math.pi / 90)), rel_tol=1e-6)
    assert math.isclose(factor(195), 0.5, rel_tol=1e-6)
    assert abs(factor(240)) < 1e-6
    assert math.isclose(factor(26, 0, 100), 0.5 * (1 + math.cos(0.26 * math.pi)), rel_tol=1e-6)
    distiller = build("wkd")[0]  # the trainer's r(t) is this decay, not a warm-up
    assert math.isclose(float(distiller.weight_factor(jnp.int32(194 * 10), 10)), 0.5, rel_tol=1e-6)


def test_a_cost_matrix_file_is_sharpened_and_used(tmp_path):
    cost = np.random.default_rng(0).uniform(0, 2, (10, 10))
    path = tmp_path / "cost.npy"
    np.save(path, cost)
    distiller, _, state, teacher_vars, batch = build("wkd_l", cost_matrix=str(path))
    out = distiller.forward(
        state.variables("student"), state.variables("modules"), teacher_vars, batch, train=False
    )
    np.testing.assert_allclose(out.extras["wkd_cost"], 1 - np.exp(-cost), rtol=1e-6)


def test_maps_the_projector_cannot_take_are_pooled_to_the_smaller_size():
    conv, bottleneck = {"projector": "conv1x1"}, {"projector": "bottleneck"}
    assert wkd._map_sizes(conv, (8, 8, 4), (4, 4, 6)) == ((8, 8), (4, 4))  # ConvReg's stride 2
    assert wkd._map_sizes(conv, (2, 2, 4), (8, 8, 6)) == ((2, 2), (2, 2))
    assert wkd._map_sizes(bottleneck, (8, 8, 4), (4, 4, 6)) == ((4, 4), (4, 4))
    assert wkd._map_sizes(bottleneck, (7, 7, 4), (7, 7, 6)) == ((7, 7), (7, 7))


def test_bottleneck_projector_has_the_authors_layers():
    module = wkd.BottleneckProjector(8, 12)
    params = module.init(jax.random.key(0), jnp.zeros((1, 5, 5, 8)))["params"]
    shapes = {name: p["kernel"].shape for name, p in params.items() if "kernel" in p}
    assert shapes == {"conv1": (1, 1, 8, 256), "conv2": (3, 3, 256, 256), "conv3": (1, 1, 256, 12)}
    out = module.apply(
        {"params": params, "batch_stats": {"bn": {"mean": 0, "var": 1}}}, jnp.ones((2, 5, 5, 8))
    )
    assert out.shape == (2, 5, 5, 12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"projector": "mlp"}, "projector must be one of"),
        ({"decay_epochs": (10, 10)}, "decay_epochs"),
        ({"temperature": 0.0}, "temperature"),
        ({"spatial_grid": 0}, "spatial_grid"),
        ({"cost_matrix": "/no/such/file.npy"}, "cannot read"),
    ],
)
def test_bad_knobs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        build("wkd", **overrides)
