"""Logit standardisation, DIST and WTTM against float64 NumPy transcriptions of the papers.

The references follow the formulas as the papers state them, probability by probability
(softmax, Pearson correlation, p^gamma / sum p^gamma) with no log-space tricks; the losses
under test must agree to float32 precision, also for logits of magnitude ~50, and their
gradients must agree with central finite differences of the references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax import losses

BATCH, CLASSES = 8, 10
# "normal" logits (std 3) and large ones (std 50/3, so the largest are around 50).
SCALES = {"normal": 3.0, "large": 50.0 / 3.0}


def _logits(seed, scale="normal", batch=BATCH, classes=CLASSES):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=SCALES[scale], size=(batch, classes))
    if scale == "large":
        assert np.abs(z).max() > 30
    return z.astype(np.float32)


# --- float64 references ---------------------------------------------------------------


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_standardize(z, eps=1e-7, ddof=1):
    """(z - mean) / (eps + std) per row, std with divisor K - ddof."""
    out = []
    for row in np.float64(z):
        k = len(row)
        mean = sum(row) / k
        std = np.sqrt(sum((x - mean) ** 2 for x in row) / (k - ddof))
        out.append([(x - mean) / (eps + std) for x in row])
    return np.array(out)


def np_pearson(a, b, axis, eps):
    """The DIST authors' Pearson correlation along `axis`: (a.b) / (|a||b| + eps), centred.

    eps = 0 gives the paper's cov(a, b) / (std(a) std(b)).
    """
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    return np.sum(a * b, axis) / (np.sqrt(np.sum(a * a, axis) * np.sum(b * b, axis)) + eps)


def ref_dist(student, teacher, beta, gamma, tau, eps=1e-8):
    """tau^2 (beta (1 - mean_i rho(Y_i., Z_i.)) + gamma (1 - mean_j rho(Y_.j, Z_.j))).

    rho with the eps 1e-8 of the authors' `cosine_similarity` (hunto/DIST_KD,
    classification/lib/models/losses/dist_kd.py), on the raw probabilities.
    """
    y_s, y_t = np_softmax(np.float64(student) / tau), np_softmax(np.float64(teacher) / tau)
    inter = 1 - np.mean(np_pearson(y_s, y_t, 1, eps))  # each example's row
    intra = 1 - np.mean(np_pearson(y_s, y_t, 0, eps))  # each class's column
    return tau**2 * (beta * inter + gamma * intra)


def ref_wttm(student, teacher, gamma):
    """mean_i U_gamma(p_i) KL(p_i^gamma / U_gamma(p_i) || q_i), U_gamma(p) = sum_k p_k^gamma."""
    p, q = np_softmax(np.float64(teacher)), np_softmax(np.float64(student))
    total = 0.0
    for p_i, q_i in zip(p, q, strict=True):
        u = np.sum(p_i**gamma)
        target = p_i**gamma / u
        total += u * np.sum(target * np.log(target / q_i))
    return total / len(p)


def finite_difference_grad(f, x, h=1e-6):
    """Central differences of the float64 scalar function f at x, entry by entry."""
    x = np.float64(x)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = h
        grad[idx] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def assert_grad_close(actual, expected):
    """Gradients agree to 1e-4 of the largest entry (float32 against float64 differences)."""
    expected = np.asarray(expected)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# --- logit standardisation ------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("ddof", [0, 1])
def test_standardize_matches_numpy(scale, ddof):
    # An offset per row: standardisation removes it.
    z = _logits(0, scale) + np.float32(7.0) * np.arange(BATCH, dtype=np.float32)[:, None]
    out = losses.standardize_logits(z, ddof=ddof)
    ref = ref_standardize(z, ddof=ddof)
    assert out.dtype == jnp.float32 and out.shape == z.shape
    assert np.linalg.norm(out - ref) <= 1e-6 * np.linalg.norm(ref)


def test_standardize_defaults_are_unbiased_std_and_eps_1e7():
    z = _logits(1)
    ref = ref_standardize(z, eps=1e-7, ddof=1)
    np.testing.assert_allclose(losses.standardize_logits(z), ref, rtol=1e-5, atol=1e-6)
    # Unbiased and population standard deviations differ by sqrt(K / (K - 1)).
    biased = ref_standardize(z, eps=1e-7, ddof=0)
    assert not np.allclose(ref, biased, rtol=1e-3)
    # With a standard deviation near 1e-6 the eps of 1e-7 shrinks z-scores by about 10%.
    tiny = z * np.float32(3e-7)
    with_eps, without_eps = ref_standardize(tiny, eps=1e-7), ref_standardize(tiny, eps=0.0)
    assert not np.allclose(with_eps, without_eps, rtol=1e-2)
    np.testing.assert_allclose(losses.standardize_logits(tiny), with_eps, rtol=1e-5, atol=1e-5)


def test_standardize_gradient_matches_finite_differences():
    z = _logits(2)
    weights = np.random.default_rng(3).normal(size=z.shape)

    def ref(x):
        return np.sum(weights * ref_standardize(x))

    grad = jax.grad(lambda x: jnp.sum(weights * losses.standardize_logits(x)))(z)
    assert_grad_close(grad, finite_difference_grad(ref, z))


def test_standardize_constant_rows_are_zero_with_finite_gradients():
    z = np.full((2, CLASSES), 3.5, np.float32)
    out, grad = jax.value_and_grad(lambda x: jnp.sum(losses.standardize_logits(x) ** 2))(z)
    assert float(out) == 0.0
    assert np.all(np.isfinite(grad))


# --- DIST -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 0.0), (0.0, 1.0), (2.0, 2.0)])
def test_dist_matches_numpy(scale, tau, beta, gamma):
    student, teacher = _logits(4, scale), _logits(5, scale)
    ref = ref_dist(student, teacher, beta, gamma, tau)
    assert ref > 0.1
    out = losses.dist_loss(student, teacher, beta=beta, gamma=gamma, temperature=tau)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, ref, rtol=1e-6)


@pytest.mark.parametrize("scale", [8.0, 50.0])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_keeps_the_authors_eps_where_classes_are_nearly_zero(scale, tau):
    """ImageNet-like batches: most class columns hold tiny probabilities at tau 1, where
    the authors' eps on the raw probabilities changes the correlation."""
    rng = np.random.default_rng(int(scale + tau))
    student, teacher = (rng.normal(scale=scale, size=(32, 1000)).astype(np.float32) for _ in "st")
    ref = ref_dist(student, teacher, 2.0, 2.0, tau)
    out = losses.dist_loss(student, teacher, beta=2.0, gamma=2.0, temperature=tau)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    if tau == 1.0:  # the eps matters here: the paper's eps-free correlation differs
        eps_free = ref_dist(student, teacher, 2.0, 2.0, tau, eps=0.0)
        assert abs(eps_free - ref) > 1e-4 * ref


def test_dist_of_equal_logits_is_only_the_eps_term():
    """Equal logits correlate perfectly but for the eps: |a|^2 / (|a|^2 + eps) < 1."""
    logits = _logits(6)
    out = losses.dist_loss(logits, logits, beta=1, gamma=1, temperature=4.0)
    ref = ref_dist(logits, logits, 1, 1, 4.0)
    assert 0 < ref < 1e-4 and ref_dist(logits, logits, 1, 1, 4.0, eps=0.0) < 1e-12
    np.testing.assert_allclose(out, ref, atol=1e-7)


def test_dist_flattens_leading_axes():
    student, teacher = _logits(7), _logits(8)
    kwargs = dict(beta=1.0, gamma=2.0, temperature=4.0)
    flat = losses.dist_loss(student, teacher, **kwargs)
    folded = losses.dist_loss(student.reshape(2, 4, -1), teacher.reshape(2, 4, -1), **kwargs)
    np.testing.assert_allclose(folded, flat, rtol=1e-6)


@pytest.mark.parametrize("scale", SCALES)
def test_dist_gradient_matches_finite_differences(scale):
    student, teacher = _logits(9, scale), _logits(10, scale)
    tau, beta, gamma = (4.0, 1.0, 2.0) if scale == "normal" else (8.0, 2.0, 1.0)

    def loss(s, t):
        return losses.dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau)

    g_s, g_t = jax.grad(loss, argnums=(0, 1))(student, teacher)
    t64, s64 = np.float64(teacher), np.float64(student)
    assert_grad_close(
        g_s, finite_difference_grad(lambda s: ref_dist(s, t64, beta, gamma, tau), student)
    )
    assert_grad_close(
        g_t, finite_difference_grad(lambda t: ref_dist(s64, t, beta, gamma, tau), teacher)
    )


# --- WTTM -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5, 1.0])
def test_wttm_matches_numpy(scale, gamma):
    student, teacher = _logits(11, scale), _logits(12, scale)
    ref = ref_wttm(student, teacher, gamma)
    assert ref > 0.1
    out = losses.wttm_loss(student, teacher, gamma=gamma)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_wttm_with_gamma_one_is_kl_at_temperature_one():
    """U_1(p) = 1 and p^1 = p: WTTM reduces to KL(p_teacher || p_student)."""
    student, teacher = _logits(13), _logits(14)
    np.testing.assert_allclose(
        losses.wttm_loss(student, teacher, gamma=1.0),
        losses.kd_loss(student, teacher, 1.0),
        rtol=1e-6,
    )


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_wttm_weight_of_a_uniform_teacher_is_classes_to_one_minus_gamma(gamma):
    """p = 1/K: the transformed target stays uniform and U = K * K^-gamma = K^(1 - gamma)."""
    student, teacher = _logits(15), np.zeros((BATCH, CLASSES), np.float32)
    kl_uniform = losses.kd_loss(student, teacher, 1.0)
    np.testing.assert_allclose(
        losses.wttm_loss(student, teacher, gamma=gamma),
        CLASSES ** (1 - gamma) * kl_uniform,
        rtol=1e-6,
    )


@pytest.mark.parametrize("scale", SCALES)
def test_wttm_gradient_matches_finite_differences(scale):
    student, teacher = _logits(16, scale), _logits(17, scale)
    gamma = 0.25

    def loss(s, t):
        return losses.wttm_loss(s, t, gamma=gamma)

    g_s, g_t = jax.grad(loss, argnums=(0, 1))(student, teacher)
    t64, s64 = np.float64(teacher), np.float64(student)
    assert_grad_close(g_s, finite_difference_grad(lambda s: ref_wttm(s, t64, gamma), student))
    assert_grad_close(g_t, finite_difference_grad(lambda t: ref_wttm(s64, t, gamma), teacher))


# --- dtypes, jit and shapes -----------------------------------------------------------


def test_bfloat16_inputs_are_computed_in_float32():
    """bfloat16 logits give exactly the float32 result for the same (rounded) values."""
    s16 = jnp.asarray(_logits(18), jnp.bfloat16)
    t16 = jnp.asarray(_logits(19), jnp.bfloat16)
    s32, t32 = s16.astype(jnp.float32), t16.astype(jnp.float32)
    out = losses.standardize_logits(s16)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, losses.standardize_logits(s32), rtol=1e-6, atol=1e-7)
    for fn, kwargs in [
        (losses.dist_loss, dict(beta=2.0, gamma=2.0, temperature=4.0)),
        (losses.wttm_loss, dict(gamma=0.25)),
    ]:
        out = fn(s16, t16, **kwargs)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, fn(s32, t32, **kwargs), rtol=1e-6)


def test_losses_jit():
    student, teacher = _logits(20), _logits(21)

    @jax.jit
    def run(s, t):
        z_s, z_t = losses.standardize_logits(s), losses.standardize_logits(t)
        return (
            losses.dist_loss(z_s, z_t, beta=1.0, gamma=1.0, temperature=1.0),
            losses.wttm_loss(z_s, z_t, gamma=0.5),
        )

    dist, wttm = run(student, teacher)
    z_s, z_t = ref_standardize(student), ref_standardize(teacher)
    np.testing.assert_allclose(dist, ref_dist(z_s, z_t, 1.0, 1.0, 1.0), rtol=1e-5)
    np.testing.assert_allclose(wttm, ref_wttm(z_s, z_t, 0.5), rtol=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: losses.standardize_logits(np.zeros(CLASSES)), "shape"),
        (lambda: losses.standardize_logits(np.zeros((BATCH, 1))), "more than ddof=1"),
        (
            lambda: losses.dist_loss(
                _logits(0), _logits(1, classes=CLASSES + 1), beta=1, gamma=1, temperature=4.0
            ),
            "shapes differ",
        ),
        (
            lambda: losses.dist_loss(
                _logits(0, batch=1), _logits(1, batch=1), beta=1, gamma=1, temperature=4.0
            ),
            "at least 2 examples",
        ),
        (
            lambda: losses.dist_loss(
                np.zeros(CLASSES), np.zeros(CLASSES), beta=1, gamma=1, temperature=4.0
            ),
            r"\(batch\.\.\., classes\)",
        ),
        (
            lambda: losses.wttm_loss(_logits(0), _logits(1, batch=BATCH + 1), gamma=0.5),
            "shapes differ",
        ),
        (
            lambda: losses.wttm_loss(np.zeros(CLASSES), np.zeros(CLASSES), gamma=0.5),
            r"\(batch\.\.\., classes\)",
        ),
    ],
)
def test_bad_shapes_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
