"""MLKD's loss against float64 NumPy transcriptions of the released code and of the paper.

`ref_released` follows KD_ours.py's `forward_train` (github
Jin-Ying/Multi-Level-Logit-Distillation) line by line: losses averaged over the batch,
then multiplied by a mask and averaged again; the "strong" KD terms at 2 and 6 on the weak
view; the strong class and batch terms dropped. Each quirk also has a test of its own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax import losses

TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)


def softmax(z, tau=1.0):
    e = np.exp(z / tau - (z / tau).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kd(s, t, tau, standardize=False):
    if standardize:
        s = (s - s.mean(1, keepdims=True)) / (1e-7 + s.std(1, ddof=1, keepdims=True))
        t = (t - t.mean(1, keepdims=True)) / (1e-7 + t.std(1, ddof=1, keepdims=True))
    p_s, p_t = softmax(s, tau), softmax(t, tau)
    return tau**2 * np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)


def cc(s, t, tau):
    p_s, p_t = softmax(s, tau), softmax(t, tau)
    return (p_t.T @ p_t - p_s.T @ p_s) ** 2 / s.shape[1]


def bc(s, t, tau):
    p_s, p_t = softmax(s, tau), softmax(t, tau)
    return (p_t @ p_t.T - p_s @ p_s.T) ** 2 / s.shape[0]


def masks(wt):
    p = softmax(wt)
    conf, class_conf = p.max(axis=1), p.sum(axis=0)
    return conf <= np.percentile(conf, 50), class_conf <= np.percentile(class_conf, 50)


def ref_one_view(s, t, released, standardize=False):
    """The weak view's instance, class and batch terms, weight 1: as released (losses
    averaged, then times a mask and averaged) or as the paper reads them (masks select)."""
    s, t = np.float64(s), np.float64(t)
    mask, class_mask = masks(t)
    total = 0.0
    for tau in TEMPS:
        if released:
            total += np.mean(kd(s, t, tau, standardize).mean() * mask)
            total += np.mean(cc(s, t, tau).sum() * class_mask)
            total += np.mean(bc(s, t, tau).sum() * mask)
        else:
            total += np.mean(kd(s, t, tau) * mask)
            total += np.sum(cc(s, t, tau) * class_mask) + np.sum(bc(s, t, tau) * mask)
    return total


def ref_released(ws, wt, ss, st, w, standardize=False):
    ws, wt, ss, st = map(np.float64, (ws, wt, ss, st))
    kd_strong = sum(kd(ss, st, t, standardize).mean() for t in TEMPS[:3])
    kd_strong += sum(kd(ws, wt, t, standardize).mean() for t in TEMPS[3:])
    return w * (ref_one_view(ws, wt, True, standardize) + kd_strong)


def ref_paper(ws, wt, ss, st, w):
    ws, wt, ss, st = map(np.float64, (ws, wt, ss, st))
    mask, _ = masks(wt)
    strong = sum(
        kd(ss, st, t).mean() + np.sum(cc(ss, st, t)) + np.sum(bc(ss, st, t) * mask) for t in TEMPS
    )
    return w * (ref_one_view(ws, wt, False) + strong)


def _views(seed, batch=8, classes=10, scale=3.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=scale, size=(batch, classes)).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_released_loss_matches_the_released_code(scale, standardize):
    ws, wt, ss, st = _views(int(scale), scale=scale)
    out = losses.mlkd_loss(ws, wt, ss, st, temperature=4.0, kd_weight=0.9, standardize=standardize)
    np.testing.assert_allclose(out, ref_released(ws, wt, ss, st, 0.9, standardize), rtol=2e-5)


def test_paper_reading_matches_its_transcription():
    ws, wt, ss, st = _views(11)
    out = losses.mlkd_loss(ws, wt, ss, st, temperature=4.0, kd_weight=0.9, released=False)
    np.testing.assert_allclose(out, ref_paper(ws, wt, ss, st, 0.9), rtol=2e-5)


def test_released_masks_scale_by_the_masked_fraction_instead_of_selecting():
    """With the batch's median, half the examples (and classes) pass: each masked term is
    its batch mean halved, which differs from the mean over the selected examples."""
    ws, wt, _, _ = _views(12)
    f64 = np.float64
    mask, class_mask = masks(f64(wt))
    assert mask.mean() == class_mask.mean() == 0.5
    full = sum(kd(f64(ws), f64(wt), t).mean() for t in TEMPS)
    selected = sum(np.mean(kd(f64(ws), f64(wt), t) * mask) for t in TEMPS)
    assert abs(full / 2 - selected) > 1e-3 * full
    # Same views: the loss is the halved weak terms plus the five unmasked KD terms.
    halved = (
        full / 2
        + sum(cc(f64(ws), f64(wt), t).sum() + bc(f64(ws), f64(wt), t).sum() for t in TEMPS) / 2
    )
    out = losses.mlkd_loss(ws, wt, ws, wt, temperature=4.0, kd_weight=1.0)
    np.testing.assert_allclose(out, halved + full, rtol=2e-5)


def test_released_strong_view_enters_only_through_three_kd_terms():
    """KD at 2 and 6 uses the weak view, and the strong class and batch terms are dropped:
    changing the strong view moves the loss by exactly its KD at tau, 3 and 5."""
    ws, wt, ss, st = _views(13)
    ss2, st2 = _views(14)[:2]
    a = losses.mlkd_loss(ws, wt, ss, st, temperature=4.0, kd_weight=1.0)
    b = losses.mlkd_loss(ws, wt, ss2, st2, temperature=4.0, kd_weight=1.0)
    f64 = np.float64
    expected = sum(
        kd(f64(ss), f64(st), t).mean() - kd(f64(ss2), f64(st2), t).mean() for t in TEMPS[:3]
    )
    np.testing.assert_allclose(a - b, expected, rtol=1e-4)


@pytest.mark.parametrize("released", [True, False])
def test_gradients_match_central_differences(released):
    ws, wt, ss, st = _views(15, batch=4, classes=5)
    ref = ref_released if released else ref_paper

    def loss(a, b):
        return losses.mlkd_loss(a, wt, b, st, temperature=4.0, kd_weight=1.0, released=released)

    g_w, g_s = jax.grad(loss, argnums=(0, 1))(ws, ss)
    for grad, which in ((g_w, 0), (g_s, 2)):
        args = [np.float64(x) for x in (ws, wt, ss, st)]
        expected = np.zeros_like(args[which])
        for idx in np.ndindex(expected.shape):
            up, down = [a.copy() for a in args], [a.copy() for a in args]
            up[which][idx] += 1e-6
            down[which][idx] -= 1e-6
            expected[idx] = (ref(*up, 1.0) - ref(*down, 1.0)) / 2e-6
        np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("released", [True, False])
def test_one_view_loss_is_the_weak_views_terms(released):
    """Block-KD's distance "mlkd": the weak-view terms of `mlkd_loss`, unweighted, the
    masks from the target's softmax."""
    ws, wt, ss, st = _views(17)
    out = losses.mlkd_weak_view_loss(ws, wt, temperature=4.0, released=released)
    np.testing.assert_allclose(out, ref_one_view(ws, wt, released), rtol=2e-5)
    both = losses.mlkd_loss(ws, wt, ss, st, temperature=4.0, kd_weight=1.0, released=released)
    strong = both - out  # what the strong view adds is not part of it
    assert float(strong) > 1e-3 * float(out)
    via_name = losses.distance(
        "mlkd", ws, wt, jnp.zeros(8, jnp.int32), temperature=4.0, knobs={"released": released}
    )
    np.testing.assert_allclose(via_name, out, rtol=1e-6)


def test_views_of_different_shapes_are_rejected():
    ws, wt, ss, st = _views(16)
    with pytest.raises(ValueError, match="both views"):
        losses.mlkd_loss(ws, wt, ss[:4], st[:4], temperature=4.0, kd_weight=1.0)
    assert losses.mlkd_loss(ws, wt, ss, st, temperature=4.0, kd_weight=1.0).dtype == jnp.float32
