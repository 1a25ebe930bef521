"""WKD's losses against float64 NumPy transcriptions of the authors' procedure.

The references follow WKD.py of github JiamingLv/WKD step by step: per example the target
class is deleted, the (C-1) x (C-1) cost gathered and the Sinkhorn iterations run on the
remaining classes; WKD-F pools each adaptive-pooling cell in a loop. Gradients are checked
against central differences of the references.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax import losses


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_wkd_logit(z_s, z_t, labels, cost, tau, weight, reg=0.05, iters=10):
    z_s, z_t, cost = np.float64(z_s), np.float64(z_t), np.float64(cost)
    target, distance = 0.0, 0.0
    for s, t, y in zip(z_s, z_t, labels):
        target -= _softmax(t)[y] * np.log(_softmax(s)[y])
        keep = [c for c in range(len(s)) if c != y]
        w1, w2 = _softmax(s[keep] / tau), _softmax(t[keep] / tau)
        c = np.maximum(cost[np.ix_(keep, keep)], 0.0) + 1e-8
        k = np.exp(-c / reg)
        u = np.full(len(keep), 1.0 / len(keep))
        for _ in range(iters):
            v = w2 / (k.T @ u + 1e-8)
            u = w1 / (k @ v + 1e-8)
        distance += np.sum(u[:, None] * k * v[None, :] * c)
    n = len(labels)
    return target / n + weight * distance / n


def ref_cells(f, grid, eps):
    """Per cell of adaptive pooling: mean and sqrt(unbiased variance + eps), NHWC."""
    _, h, w, _ = f.shape
    out = []
    for i in range(grid):
        h0, h1 = math.floor(i * h / grid), math.ceil((i + 1) * h / grid)
        for j in range(grid):
            w0, w1 = math.floor(j * w / grid), math.ceil((j + 1) * w / grid)
            cell = f[:, h0:h1, w0:w1, :]
            out.append((cell.mean(axis=(1, 2)), np.sqrt(cell.var(axis=(1, 2), ddof=1) + eps)))
    return out


def ref_wkd_feature(fs, ft, ratio, grid, eps=1e-5):
    cells = zip(ref_cells(np.float64(fs), grid, eps), ref_cells(np.float64(ft), grid, eps))
    mean = sum(np.sum((ms - mt) ** 2) for (ms, _), (mt, _) in cells)
    cells = zip(ref_cells(np.float64(fs), grid, eps), ref_cells(np.float64(ft), grid, eps))
    std = sum(np.sum((ss - st) ** 2) for (_, ss), (_, st) in cells)
    scale = fs.shape[0] * grid**2
    return ratio * mean / scale + std / scale


def central_difference(f, x, h=1e-6):
    x = np.float64(x)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = h
        grad[idx] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def _case(seed, batch=4, classes=7, scale=3.0):
    rng = np.random.default_rng(seed)
    z_s = rng.normal(scale=scale, size=(batch, classes)).astype(np.float32)
    z_t = rng.normal(scale=scale, size=(batch, classes)).astype(np.float32)
    labels = rng.integers(0, classes, batch)
    prototypes = rng.normal(size=(classes, 5)).astype(np.float32)
    return z_s, z_t, labels, np.asarray(losses.wkd_cost_from_prototypes(prototypes))


def test_cost_from_prototypes_is_one_minus_sharpened_similarity():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(6, 4))
    cos = (p @ p.T) / np.outer(np.linalg.norm(p, axis=1), np.linalg.norm(p, axis=1))
    for sharpen, expected in [(1.0, 1 - np.exp(-(1 - cos))), (0.0, 1 - cos)]:
        out = losses.wkd_cost_from_prototypes(p.astype(np.float32), sharpen)
        np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(("tau", "scale"), [(8.0, 3.0), (2.0, 3.0), (4.0, 15.0)])
def test_wkd_logit_loss_matches_the_authors_procedure(tau, scale):
    z_s, z_t, labels, cost = _case(1, scale=scale)
    out = losses.wkd_logit_loss(z_s, z_t, labels, cost, temperature=tau, weight=30.0)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, ref_wkd_logit(z_s, z_t, labels, cost, tau, 30.0), rtol=1e-5)


def test_wkd_logit_target_term_is_not_scaled_by_the_weight():
    """The released quirk: weight (and its cosine decay) scales only the distance."""
    z_s, z_t, labels, cost = _case(2)
    kwargs = dict(temperature=4.0)
    at = [
        float(losses.wkd_logit_loss(z_s, z_t, labels, cost, weight=w, **kwargs)) for w in (0, 1, 2)
    ]
    p_s = np.array([_softmax(np.float64(s)) for s in z_s])
    p_t = np.array([_softmax(np.float64(t)) for t in z_t])
    rows = np.arange(len(labels))
    target = -np.mean(p_t[rows, labels] * np.log(p_s[rows, labels]))
    np.testing.assert_allclose(at[0], target, rtol=1e-5)
    np.testing.assert_allclose(at[2] - at[1], at[1] - at[0], rtol=1e-4)
    assert at[1] - at[0] > 1e-3


def test_wkd_logit_gradients_match_central_differences_and_spare_the_teacher():
    z_s, z_t, labels, cost = _case(3, batch=3, classes=5)
    fn = jax.grad(
        lambda s, t: losses.wkd_logit_loss(s, t, labels, cost, temperature=2.0, weight=10.0),
        argnums=(0, 1),
    )
    g_s, g_t = fn(z_s, z_t)
    expected = central_difference(lambda s: ref_wkd_logit(s, z_t, labels, cost, 2.0, 10.0), z_s)
    np.testing.assert_allclose(g_s, expected, rtol=2e-3, atol=2e-5)
    assert not np.any(np.asarray(g_t))


def test_sinkhorn_distance_is_small_for_equal_predictions_and_grows_apart():
    z_s, _, labels, cost = _case(4)
    same = losses.wkd_logit_loss(z_s, z_s, labels, cost, temperature=4.0, weight=1.0)
    apart = losses.wkd_logit_loss(z_s, -z_s, labels, cost, temperature=4.0, weight=1.0)
    zero = losses.wkd_logit_loss(z_s, z_s, labels, cost, temperature=4.0, weight=0.0)
    assert float(apart - zero) > 5 * float(same - zero) > 0


@pytest.mark.parametrize(("grid", "ratio"), [(1, 4.0), (2, 8.0), (4, 3.0)])
def test_wkd_feature_loss_matches_the_authors_procedure(grid, ratio):
    rng = np.random.default_rng(grid)
    fs = rng.normal(size=(3, 6, 6, 5)).astype(np.float32)
    ft = (rng.normal(size=(3, 6, 6, 5)) * 2 + 1).astype(np.float32)
    out = losses.wkd_feature_loss(fs, ft, mean_cov_ratio=ratio, grid=grid)
    np.testing.assert_allclose(out, ref_wkd_feature(fs, ft, ratio, grid), rtol=1e-5)


def test_wkd_feature_gradients_match_central_differences():
    rng = np.random.default_rng(5)
    fs = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    ft = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    fn = jax.grad(lambda s, t: losses.wkd_feature_loss(s, t, mean_cov_ratio=2.0, grid=2), (0, 1))
    g_s, g_t = fn(fs, ft)
    expected = central_difference(lambda s: ref_wkd_feature(s, ft, 2.0, 2), fs)
    np.testing.assert_allclose(g_s, expected, rtol=1e-3, atol=1e-6)
    assert not np.any(np.asarray(g_t))


def _feature(student_shape, grid=1):
    return lambda: losses.wkd_feature_loss(
        np.ones(student_shape), np.ones((2, 4, 4, 3)), mean_cov_ratio=1.0, grid=grid
    )


def _logit_with_cost(cost_shape):
    return lambda: losses.wkd_logit_loss(
        np.ones((2, 5)), np.ones((2, 5)), np.zeros(2, int), np.ones(cost_shape),
        temperature=1.0, weight=1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (_feature((2, 4, 4, 2)), "equal shape"),
        (_feature((2, 4, 4, 3), grid=4), "2 or more positions"),
        (_feature((2, 4, 4, 3), grid=5), "grid must be in"),
        (_logit_with_cost((4, 4)), "cost"),
    ],
)
def test_bad_input_is_rejected_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()
