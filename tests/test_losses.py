"""Losses against float64 NumPy transcriptions of their formulas, written here from scratch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax import losses
from tests.test_logit_losses import ref_dist, ref_standardize, ref_wttm

BATCH, CLASSES, NUM_BLOCKS = 8, 10, 4
# w_i = 1 / 2^(n - i) for n = 4, written out.
WEIGHTS = {1: 0.125, 2: 0.25, 3: 0.5, 4: 1.0}


def _logits(seed, batch=BATCH, classes=CLASSES):
    return np.random.default_rng(seed).normal(scale=3.0, size=(batch, classes)).astype(np.float32)


def _labels(seed, batch=BATCH, classes=CLASSES):
    return np.random.default_rng(seed).integers(0, classes, size=batch).astype(np.int32)


# --- float64 references ---------------------------------------------------------------


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
    """Per-example KL(p || q) of probability vectors (0 log 0 = 0)."""
    support = p > 0
    log_ratio = np.log(np.where(support, p, 1)) - np.log(np.where(support, q, 1))
    return np.sum(np.where(support, p * log_ratio, 0), axis=-1)


def ref_ce(logits, labels):
    p = np_softmax(np.float64(logits))
    return -np.mean(np.log(p[np.arange(len(labels)), labels]))


def ref_kd(student, teacher, tau):
    p_s, p_t = np_softmax(np.float64(student) / tau), np_softmax(np.float64(teacher) / tau)
    return tau**2 * np.mean(np_kl(p_t, p_s))


def ref_tckd_nckd(student, teacher, labels, tau):
    """(TCKD, NCKD), each tau^2 * mean KL, built example by example with np.delete."""
    tckd, nckd = [], []
    for s, t, y in zip(np.float64(student), np.float64(teacher), labels, strict=True):
        p_s, p_t = np_softmax(s / tau), np_softmax(t / tau)
        b_s, b_t = np.array([p_s[y], 1 - p_s[y]]), np.array([p_t[y], 1 - p_t[y]])
        tckd.append(np_kl(b_t, b_s))
        r_s, r_t = np.delete(p_s, y), np.delete(p_t, y)
        nckd.append(np_kl(r_t / r_t.sum(), r_s / r_s.sum()))
    return tau**2 * np.mean(tckd), tau**2 * np.mean(nckd)


def ref_dkd(student, teacher, labels, tau, alpha, beta):
    tckd, nckd = ref_tckd_nckd(student, teacher, labels, tau)
    return alpha * tckd + beta * nckd


def ref_dkd_mdistiller(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (mdistiller/distillers/DKD.py), transcribed to NumPy."""
    logits_student, logits_teacher = np.float64(logits_student), np.float64(logits_teacher)
    gt_mask = np.eye(logits_student.shape[1])[target]
    other_mask = 1 - gt_mask
    pred_student = np_softmax(logits_student / temperature)
    pred_teacher = np_softmax(logits_teacher / temperature)

    def cat_mask(t):
        return np.stack([(t * gt_mask).sum(1), (t * other_mask).sum(1)], axis=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    batch = target.shape[0]
    tckd = np_kl(pred_teacher, pred_student).sum() * temperature**2 / batch
    pred_teacher_part2 = np_softmax(logits_teacher / temperature - 1000.0 * gt_mask)
    pred_student_part2 = np_softmax(logits_student / temperature - 1000.0 * gt_mask)
    nckd = np_kl(pred_teacher_part2, pred_student_part2).sum() * temperature**2 / batch
    return alpha * tckd + beta * nckd


# Knobs of each distance in the Block-KD tests (the methods' defaults).
DISTANCE_KNOBS = {"kd": {}, "dkd": {"alpha": 1.0, "beta": 8.0}, "dist": {"beta": 2.0, "gamma": 2.0},
                  "wttm": {"gamma": 0.2}}  # fmt: skip


def ref_distance(distance, student, teacher, labels, tau, standardize=False):
    """D of Block-KD with the knobs of `DISTANCE_KNOBS`, on z-scored logits if asked."""
    if standardize:
        student, teacher = ref_standardize(student), ref_standardize(teacher)
    knobs = DISTANCE_KNOBS[distance]
    if distance == "kd":
        return ref_kd(student, teacher, tau)
    if distance == "dkd":
        return ref_dkd(student, teacher, labels, tau, **knobs)
    if distance == "dist":
        return ref_dist(student, teacher, tau=tau, **knobs)
    return ref_wttm(student, teacher, **knobs)


def ref_blockkd(
    student, stones, teacher, labels, *, tau, alpha, beta, gamma, warmup, distance,
    standardize=False,
):  # fmt: skip
    def dist(s, t):
        return ref_distance(distance, s, t, labels, tau, standardize)

    task = ref_ce(student, labels) + sum(WEIGHTS[i] * ref_ce(z, labels) for i, z in stones.items())
    distill = dist(student, teacher) + sum(WEIGHTS[i] * dist(z, teacher) for i, z in stones.items())
    ensemble = np.mean([np.float64(z) for z in stones.values()], axis=0)
    cross = dist(student, ensemble) + sum(dist(z, ensemble) for z in stones.values())
    return alpha * task + beta * warmup * distill + gamma * warmup * cross, task, distill, cross


# --- cross-entropy, KD, DKD -----------------------------------------------------------


def test_cross_entropy_matches_numpy():
    logits, labels = _logits(0), _labels(1)
    np.testing.assert_allclose(
        losses.cross_entropy(logits, labels), ref_ce(logits, labels), rtol=1e-5
    )


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_kd_matches_numpy(tau):
    student, teacher = _logits(0), _logits(1)
    np.testing.assert_allclose(
        losses.kd_loss(student, teacher, tau), ref_kd(student, teacher, tau), rtol=1e-5
    )


def test_kd_is_zero_for_equal_logits():
    logits = _logits(0)
    assert abs(float(losses.kd_loss(logits, logits, 4.0))) < 1e-6


@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_kd_is_tau_squared_times_kl(tau):
    student, teacher = _logits(2), _logits(3)
    kl = 0.0
    for s, t in zip(np.float64(student), np.float64(teacher), strict=True):
        p_t = np.exp(t / tau) / np.exp(t / tau).sum()
        p_s = np.exp(s / tau) / np.exp(s / tau).sum()
        kl += sum(p_t[c] * np.log(p_t[c] / p_s[c]) for c in range(CLASSES)) / BATCH
    assert kl > 0.01
    np.testing.assert_allclose(losses.kd_loss(student, teacher, tau), tau**2 * kl, rtol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_dkd_is_weighted_tckd_plus_nckd(tau):
    student, teacher, labels = _logits(0), _logits(1), _labels(2)
    tckd, nckd = ref_tckd_nckd(student, teacher, labels, tau)
    assert tckd > 1e-3 and nckd > 1e-3
    for alpha, beta in [(1.0, 0.0), (0.0, 1.0), (1.0, 8.0)]:
        np.testing.assert_allclose(
            losses.dkd_loss(student, teacher, labels, alpha=alpha, beta=beta, temperature=tau),
            alpha * tckd + beta * nckd,
            rtol=1e-4,
        )


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dkd_matches_mdistiller(tau):
    student, teacher, labels = _logits(3), _logits(4), _labels(5)
    np.testing.assert_allclose(
        losses.dkd_loss(student, teacher, labels, alpha=1.0, beta=8.0, temperature=tau),
        ref_dkd_mdistiller(student, teacher, labels, 1.0, 8.0, tau),
        rtol=1e-4,
    )


def test_dkd_gradients_are_finite_for_extreme_logits():
    labels = _labels(0)
    student = jnp.asarray(_logits(1)) * 1e3
    teacher = jnp.asarray(_logits(2)).at[jnp.arange(BATCH), labels].set(1e4)

    def loss(s, t):
        return losses.dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=1.0)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(student, teacher)
    assert np.isfinite(value)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.any(grads[0] != 0)


def test_losses_are_float32_from_bfloat16():
    student, teacher, labels = _logits(0), _logits(1), _labels(2)
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    cases = [
        (losses.cross_entropy, (labels,), {}),
        (losses.kd_loss, (4.0,), {}),
        (losses.dkd_loss, (labels,), dict(alpha=1.0, beta=8.0, temperature=4.0)),
    ]
    for fn, extra, kwargs in cases:
        first = (s16,) if fn is losses.cross_entropy else (s16, t16)
        ref = (student,) if fn is losses.cross_entropy else (student, teacher)
        out = fn(*first, *extra, **kwargs)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, fn(*ref, *extra, **kwargs), rtol=3e-2, atol=1e-3)


# --- Block-KD -------------------------------------------------------------------------


def _blockkd_inputs(stone_ids):
    stones = {i: _logits(10 + i) for i in stone_ids}
    return _logits(0), stones, _logits(1), _labels(2)


@pytest.mark.parametrize("distance", ["kd", "dkd"])
@pytest.mark.parametrize(
    ("stone_ids", "gamma", "warmup"),
    [((1, 2, 3, 4), 1.0, 1.0), ((3, 4), 0.7, 0.25), ((3, 4), 0.0, 0.5), ((2,), 1.0, 0.0)],
)
def test_blockkd_matches_formula(distance, stone_ids, gamma, warmup):
    student, stones, teacher, labels = _blockkd_inputs(stone_ids)
    tau, alpha, beta = 4.0, 1.3, 0.9
    loss, metrics = losses.blockkd_loss(
        student,
        stones,
        teacher,
        labels,
        num_blocks=NUM_BLOCKS,
        temperature=tau,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        warmup=warmup,
        distance=distance,
        distance_knobs=DISTANCE_KNOBS[distance],
    )
    ref_loss, task, distill, cross = ref_blockkd(
        student,
        stones,
        teacher,
        labels,
        tau=tau,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        warmup=warmup,
        distance=distance,
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-4)
    np.testing.assert_allclose(metrics["task"], task, rtol=1e-4)
    np.testing.assert_allclose(metrics["distill"], distill, rtol=1e-4)
    for i, z in stones.items():
        np.testing.assert_allclose(metrics[f"ce_stone{i}"], ref_ce(z, labels), rtol=1e-4)
        np.testing.assert_allclose(
            metrics[f"kd_stone{i}"], ref_distance(distance, z, teacher, labels, tau), rtol=1e-4
        )
    if gamma == 0:
        assert float(metrics["cross"]) == 0.0
        assert not any(k.startswith("cross_") for k in metrics)
    else:
        np.testing.assert_allclose(metrics["cross"], cross, rtol=1e-4)
        assert {f"cross_stone{i}" for i in stones} | {"cross_student"} <= metrics.keys()
    assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())


def test_blockkd_weights_halve_per_block():
    """With only CE active, the loss is CE(S) + sum_i CE(N_i) / 2^(n-i)."""
    student, stones, teacher, labels = _blockkd_inputs((1, 2, 3, 4))
    kwargs = dict(num_blocks=NUM_BLOCKS, temperature=4.0, alpha=1.0, beta=0.0, gamma=0.0)
    loss, _ = losses.blockkd_loss(student, stones, teacher, labels, **kwargs)
    ces = [ref_ce(stones[i], labels) for i in (1, 2, 3, 4)]
    expected = ref_ce(student, labels) + ces[0] / 8 + ces[1] / 4 + ces[2] / 2 + ces[3]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_blockkd_ensemble_target_has_no_gradient():
    """grad of L_cross wrt the stones equals the gradient with Y^ens held constant."""
    tau, warmup, stone_ids = 2.0, 0.5, (3, 4)
    student, stones, teacher, labels = _blockkd_inputs(stone_ids)
    kwargs = dict(num_blocks=NUM_BLOCKS, temperature=tau, alpha=0.0, beta=0.0, gamma=1.0)

    def cross_only(student, stones):
        return losses.blockkd_loss(student, stones, teacher, labels, warmup=warmup, **kwargs)[0]

    g_student, g_stones = jax.grad(cross_only, argnums=(0, 1))(student, stones)
    # d/dz tau^2 KL(q || softmax(z / tau)), averaged over the batch, is tau (p - q) / B.
    q = np_softmax(np.mean([np.float64(stones[i]) for i in stone_ids], axis=0) / tau)

    def const_target_grad(z):
        return warmup * tau * (np_softmax(np.float64(z) / tau) - q) / BATCH

    np.testing.assert_allclose(g_student, const_target_grad(student), atol=1e-6)
    for i in stone_ids:
        np.testing.assert_allclose(g_stones[i], const_target_grad(stones[i]), atol=1e-6)

    # The check can fail: a gradient through the ensemble changes the stones' gradients (via
    # the student's term; for KD those of the stones' own terms cancel at the mean).
    def cross_through_ensemble(stones):
        ens = jnp.mean(jnp.stack(list(stones.values())), axis=0)
        terms = [losses.kd_loss(z, ens, tau) for z in (student, *stones.values())]
        return warmup * sum(terms)

    g_through = jax.grad(cross_through_ensemble)(stones)
    assert not np.allclose(g_through[4], const_target_grad(stones[4]), atol=1e-4)


def test_blockkd_bfloat16_inputs_give_float32():
    student, stones, teacher, labels = _blockkd_inputs((3, 4))
    kwargs = dict(num_blocks=NUM_BLOCKS, temperature=4.0, alpha=1.0, beta=1.0, gamma=1.0)
    loss32, metrics32 = losses.blockkd_loss(student, stones, teacher, labels, **kwargs)

    def bf16(x):
        return jnp.asarray(x, jnp.bfloat16)

    loss16, metrics16 = losses.blockkd_loss(
        bf16(student), jax.tree.map(bf16, stones), bf16(teacher), labels, **kwargs
    )
    assert loss16.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in metrics16.values())
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    for k in metrics32:
        np.testing.assert_allclose(metrics16[k], metrics32[k], rtol=5e-2, atol=1e-3)


def test_blockkd_jits_with_traced_warmup():
    student, stones, teacher, labels = _blockkd_inputs((3, 4))
    kwargs = dict(num_blocks=NUM_BLOCKS, temperature=4.0, alpha=1.0, beta=1.0, gamma=1.0)

    @jax.jit
    def loss_at(warmup):
        return losses.blockkd_loss(student, stones, teacher, labels, warmup=warmup, **kwargs)[0]

    ref = ref_blockkd(
        student,
        stones,
        teacher,
        labels,
        tau=4.0,
        alpha=1.0,
        beta=1.0,
        gamma=1.0,
        warmup=0.3,
        distance="kd",
    )[0]
    np.testing.assert_allclose(loss_at(jnp.float32(0.3)), ref, rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(teacher=_logits(1, classes=CLASSES + 1)), "shapes differ"),
        (dict(stones={4: _logits(3, batch=BATCH - 1)}), "stone 4"),
        (dict(labels=_labels(2, batch=BATCH + 1)), "labels must have shape"),
        (dict(labels=np.zeros(BATCH, np.float32)), "integer"),
        (dict(stones={}), "empty"),
        (dict(stones={0: _logits(3)}), "outside 1..4"),
        (dict(stones={5: _logits(3)}), "outside 1..4"),
        (dict(distance="mse"), "unknown distance"),
    ],
)
def test_blockkd_rejects_bad_inputs(change, message):
    student, stones, teacher, labels = _blockkd_inputs((3, 4))
    args = dict(teacher=teacher, stones=stones, labels=labels, distance="kd") | change

    @jax.jit
    def run(teacher, stones, labels):
        return losses.blockkd_loss(
            student,
            stones,
            teacher,
            labels,
            num_blocks=NUM_BLOCKS,
            temperature=4.0,
            alpha=1.0,
            beta=1.0,
            gamma=1.0,
            distance=args["distance"],
        )

    with pytest.raises(ValueError, match=message):
        run(args["teacher"], args["stones"], args["labels"])


def test_kd_and_dkd_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        losses.kd_loss(_logits(0), _logits(1, batch=BATCH + 1), 4.0)
    with pytest.raises(ValueError, match="labels must have shape"):
        losses.dkd_loss(
            _logits(0), _logits(1), _labels(2, batch=3), alpha=1, beta=8, temperature=4.0
        )


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("distance", ["kd", "dkd", "dist", "wttm"])
def test_blockkd_with_any_distance_and_standardisation_matches_formula(distance, standardize):
    student, stones, teacher, labels = _blockkd_inputs((2, 3, 4))
    kwargs = dict(tau=4.0, alpha=1.0, beta=0.5, gamma=1.0, warmup=0.5, distance=distance)
    loss, _ = losses.blockkd_loss(
        student, stones, teacher, labels, num_blocks=NUM_BLOCKS, temperature=kwargs["tau"],
        **{k: v for k, v in kwargs.items() if k != "tau"}, standardize=standardize,
        distance_knobs=DISTANCE_KNOBS[distance],
    )  # fmt: skip
    ref, *_ = ref_blockkd(student, stones, teacher, labels, standardize=standardize, **kwargs)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
