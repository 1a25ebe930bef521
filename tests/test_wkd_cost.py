"""WKD's CKA cost tool (`bkd_jax.wkd_cost`): linear CKA against a float64 reference written
from Kornblith et al. (2019), its invariances, the class sampling, and the command on the
digits with a randomly initialised resnet8 teacher, whose file wkd_l accepts."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_steps import build

from bkd_jax import models, wkd_cost
from bkd_jax.training import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]


def _reference_cost(features: np.ndarray) -> np.ndarray:
    """1 - linear CKA in float64, from the n x n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K)
    HSIC(L, L)) with K = X X^T, L = Y Y^T and HSIC = tr(K H L H) (Kornblith et al. eq. 3-4)."""
    f = np.asarray(features, np.float64)
    n = f.shape[1]
    h = np.eye(n) - np.ones((n, n)) / n
    grams = [h @ x @ x.T @ h for x in f]
    hsic = np.array([[np.sum(a * b) for b in grams] for a in grams])
    return 1 - hsic / np.sqrt(np.outer(np.diag(hsic), np.diag(hsic)))


def _features(classes=5, rows=12, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(rows, dim))  # classes share structure: costs well below 1
    return shared + 0.7 * rng.normal(size=(classes, rows, dim))


def test_linear_cka_cost_matches_the_float64_gram_definition():
    f = _features()
    cost = np.asarray(wkd_cost.linear_cka_cost(jnp.asarray(f, jnp.float32)))
    assert cost.dtype == np.float32
    np.testing.assert_allclose(cost, _reference_cost(f), atol=2e-6)
    assert cost[~np.eye(5, dtype=bool)].min() > 0.05 and cost.max() < 1


def test_cost_is_symmetric_with_zero_diagonal():
    cost = np.asarray(wkd_cost.linear_cka_cost(jnp.asarray(_features(seed=1), jnp.float32)))
    np.testing.assert_array_equal(cost, cost.T)
    np.testing.assert_allclose(np.diag(cost), 0.0, atol=1e-6)


def test_cost_is_invariant_to_orthogonal_maps_isotropic_scaling_and_shifts():
    f = _features(seed=2)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(4, 4)))
    changed = f.copy()
    changed[1] = 7.5 * f[1] @ q + 3.0  # class 1 rotated, scaled, shifted
    base = np.asarray(wkd_cost.linear_cka_cost(jnp.asarray(f, jnp.float32)))
    moved = np.asarray(wkd_cost.linear_cka_cost(jnp.asarray(changed, jnp.float32)))
    np.testing.assert_allclose(moved, base, atol=2e-6)
    anisotropic = f.copy()
    anisotropic[1] = f[1] * np.array([1.0, 5.0, 1.0, 0.2])  # not a CKA invariance
    other = np.asarray(wkd_cost.linear_cka_cost(jnp.asarray(anisotropic, jnp.float32)))
    assert np.abs(other[1] - base[1]).max() > 1e-2


def test_class_indices_take_each_class_first_images_in_split_order():
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 2, 1])
    np.testing.assert_array_equal(wkd_cost.class_indices(labels, 3, 2), [[1, 3], [2, 5], [0, 4]])
    assert wkd_cost.class_indices(np.array([0, 1, 1, 0, 0]), 2, 0).shape == (2, 2)


@pytest.mark.parametrize(
    "labels, classes, n, message",
    [
        ([0, 1, 0], 2, 2, "exceeds the smallest class's 1 images"),
        ([0, 0], 2, 0, "every class needs an image"),
        ([0, 1], 2, -1, "images_per_class must be >= 0"),
    ],
)
def test_class_indices_refuse_bad_requests(labels, classes, n, message):
    with pytest.raises(ValueError, match=message):
        wkd_cost.class_indices(np.array(labels), classes, n)


def test_features_must_have_rows():
    with pytest.raises(ValueError, match="features must be"):
        wkd_cost.linear_cka_cost(jnp.zeros((3, 1, 4)))


def _command(*flags):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "bkd_jax.wkd_cost", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_command_writes_a_cost_that_wkd_l_accepts(tmp_path):
    net = models.get_model("resnet8", 10)
    variables = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    teacher = tmp_path / "teacher"
    checkpointing.save_variables(teacher, variables, {"model": "resnet8"})
    output = tmp_path / "cost.npy"
    config = f"--config={REPO / 'configs/demo.py'}:role=teacher"
    result = _command(f"--teacher={teacher}", config, f"--output={output}",
                      "--images_per_class=20")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "features: 200/200 images" in result.stdout
    cost = np.load(output)
    assert cost.shape == (10, 10) and cost.dtype == np.float32
    np.testing.assert_array_equal(cost, cost.T)
    assert np.abs(np.diag(cost)).max() < 1e-5 and cost.max() < 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    distiller, _, state, teacher_vars, batch = build("wkd_l", cost_matrix=str(output))
    out = distiller.forward(
        state.variables("student"), state.variables("modules"), teacher_vars, batch, train=False
    )
    np.testing.assert_allclose(out.extras["wkd_cost"], 1 - np.exp(-cost), rtol=1e-6)
    refused = _command(f"--teacher={teacher}", config, f"--output={output}",
                       "--images_per_class=1000")  # fmt: skip
    assert refused.returncode != 0
    assert "error: images_per_class 1000 exceeds the smallest class's" in refused.stderr
