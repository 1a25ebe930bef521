"""Feature losses against float64 NumPy transcriptions of their papers' formulas.

The references are written here from the formulas (with mdistiller's reductions and
constants, see bkd_jax/losses/feature.py), mostly as explicit loops, and never call the
JAX code. Gradients are checked against central differences of the float64 references.
"""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax import losses
from bkd_jax.losses import feature as feature_losses

BATCH = 4


def _normal(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _maps(seed, shapes):
    return [_normal(seed + i, shape) for i, shape in enumerate(shapes)]


# --- float64 references ---------------------------------------------------------------


def ref_pool(x, out_h, out_w):
    """Adaptive average pooling of an NHWC map: cell i of n spans floor(i H/n)..ceil((i+1) H/n)."""
    _, h, w, _ = x.shape
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
    for i in range(out_h):
        h0, h1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
        for j in range(out_w):
            w0, w1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


def ref_match(s, t):
    """Pools the map with the larger height to the other's size."""
    if s.shape[1] > t.shape[1]:
        return ref_pool(s, *t.shape[1:3]), t
    if t.shape[1] > s.shape[1]:
        return s, ref_pool(t, *s.shape[1:3])
    return s, t


def unit_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ref_fitnet(s, t):
    return np.mean((s - t) ** 2)


def ref_at(ss, ts, p=2):
    total = 0.0
    for s, t in zip(ss, ts, strict=True):
        s, t = ref_match(s, t)
        a_s = unit_rows((s**p).mean(axis=3).reshape(BATCH, -1))
        a_t = unit_rows((t**p).mean(axis=3).reshape(BATCH, -1))
        total += np.mean((a_s - a_t) ** 2)
    return total


def ref_nst(ss, ts):
    """Squared MMD with k(x, y) = (x.y)^2 between the channels' unit spatial maps."""
    total = 0.0
    for s, t in zip(ss, ts, strict=True):
        s, t = ref_match(s, t)
        stage = 0.0
        for n in range(BATCH):
            S = unit_rows(s[n].reshape(-1, s.shape[3]).T)  # (C_s, HW)
            T = unit_rows(t[n].reshape(-1, t.shape[3]).T)

            def k_mean(a, b):
                return np.mean([(x @ y) ** 2 for x in a for y in b])

            stage += k_mean(T, T) + k_mean(S, S) - 2 * k_mean(S, T)
        total += stage / BATCH
    return total


def ref_pkt(s, t, eps=1e-7):
    def probs(e):
        e = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
        k = (e @ e.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    p, q = probs(s), probs(t)
    return np.mean(q * np.log((q + eps) / (p + eps)))


def _kdsvd_matrix(f):
    """The (C H) x W matrix of one example: row c H + h, column w holds f[h, w, c]."""
    h, w, c = f.shape
    x = np.empty((c * h, w))
    for ci in range(c):
        for hi in range(h):
            x[ci * h + hi] = f[hi, :, ci]
    return x


def ref_kdsvd(ss, ts, k=1):
    """KD-SVD with the teacher's vectors signed by their largest entry; the student's signs
    are flipped at random, which alignment must undo."""
    signs = np.random.default_rng(0)
    total, previous = 0.0, None
    for s, t in zip(ss, ts, strict=True):
        v_s_all, v_t_all = [], []
        for n in range(BATCH):
            _, sv_t, vh_t = np.linalg.svd(_kdsvd_matrix(t[n]), full_matrices=False)
            sigma = sv_t[:k] / np.linalg.norm(sv_t[:k])
            v_t = vh_t[:k].T.copy()
            for j in range(k):
                v_t[:, j] *= np.sign(v_t[np.argmax(np.abs(v_t[:, j])), j])
            _, _, vh_s = np.linalg.svd(_kdsvd_matrix(s[n]), full_matrices=False)
            cand = vh_s[: k + 3].T * signs.choice([-1.0, 1.0], size=min(k + 3, len(vh_s)))
            aligned = np.empty_like(v_t)
            for j in range(k):
                cos = cand.T @ v_t[:, j]
                best = np.argmax(np.abs(cos))
                aligned[:, j] = np.sign(cos[best]) * cand[:, best]
            v_s_all.append(aligned * sigma)
            v_t_all.append(v_t * sigma)
        if previous is not None:
            for n in range(BATCH):
                (vs, vt), (vsb, vtb) = (v_s_all[n], v_t_all[n]), (previous[0][n], previous[1][n])
                for a in range(vs.shape[0]):
                    for b in range(vsb.shape[0]):
                        g_s = np.exp(-((vs[a] - vsb[b]) ** 2) / 8)
                        g_t = np.exp(-((vt[a] - vtb[b]) ** 2) / 8)
                        total += np.sum((g_s - g_t) ** 2)
        previous = v_s_all, v_t_all
    return total / BATCH


def smooth_l1(x, y):
    d = np.abs(x - y)
    return np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))


def rkd_distances(e):
    """psi_D = ||e_i - e_j|| / mu, mu the mean over the pairs i != j."""
    d = np.array([[np.linalg.norm(a - b) for b in e] for a in e])
    return d / d[~np.eye(len(e), dtype=bool)].mean()


def rkd_angles(e):
    """psi_A = cos of the angle e_i e_j e_k (0 where a side has length 0)."""

    def unit(x):
        n = np.linalg.norm(x)
        return x / n if n > 0 else x

    n = len(e)
    return np.array(
        [
            [[unit(e[i] - e[j]) @ unit(e[k] - e[j]) for k in range(n)] for i in range(n)]
            for j in range(n)
        ]
    )


def ref_rkd(s, t, distance_weight=25, angle_weight=50):
    return distance_weight * smooth_l1(rkd_distances(s), rkd_distances(t)) + (
        angle_weight * smooth_l1(rkd_angles(s), rkd_angles(t))
    )


def ref_sp(ss, ts):
    total = 0.0
    for s, t in zip(ss, ts, strict=True):
        fs, ft = s.reshape(BATCH, -1), t.reshape(BATCH, -1)
        g_s, g_t = unit_rows(fs @ fs.T), unit_rows(ft @ ft.T)
        total += np.sum((g_t - g_s) ** 2) / BATCH**2
    return total


def ref_ofd_margin(scale, bias):
    out = []
    for gamma, beta in zip(scale, bias, strict=True):
        std = abs(gamma)
        mass = 0.5 * (1 + math.erf((-beta / std) / math.sqrt(2)))
        if mass > 0.001:
            pdf = math.exp(-0.5 * (beta / std) ** 2) / math.sqrt(2 * math.pi)
            out.append(beta - std * pdf / mass)
        else:
            out.append(-3 * std)
    return np.array(out)


def ref_ofd(s, t, m):
    t = ref_pool(t, *s.shape[1:3])
    total = 0.0
    for sv, tv, mv in zip(
        s.reshape(-1), t.reshape(-1), np.broadcast_to(m, s.shape).reshape(-1), strict=True
    ):
        if tv > 0:
            total += (sv - tv) ** 2
        elif tv > mv:
            total += (sv - tv) ** 2 if sv > tv else 0.0
        else:
            total += (sv - mv) ** 2 if sv > mv else 0.0
    return total / s.shape[0]


def ref_hcl(ss, ts):
    total = 0.0
    for s, t in zip(ss, ts, strict=True):
        terms = [(1.0, np.mean((s - t) ** 2))]
        for level in (4, 2, 1):
            if level < s.shape[1]:
                pooled = np.mean((ref_pool(s, level, level) - ref_pool(t, level, level)) ** 2)
                terms.append((terms[-1][0] / 2, pooled))
        total += sum(w * x for w, x in terms) / sum(w for w, _ in terms)
    return total


def ref_vid(mu, t, alpha, eps=1e-5):
    t = ref_pool(t, *mu.shape[1:3])
    var = np.log1p(np.exp(alpha)) + eps
    return np.mean(0.5 * ((mu - t) ** 2 / var + np.log(var)))


def _crd_probs(v, bank, idx, temperature):
    """exp(v_i . bank[idx_ij] / T) for every example i and sampled row j."""
    v = unit_rows(v)
    return np.array(
        [[math.exp(v[i] @ bank[j] / temperature) for j in idx[i]] for i in range(len(v))]
    )


def ref_crd_normalizers(es, et, mem_s, mem_t, idx, temperature=0.07):
    num = len(mem_s)
    return np.array(
        [
            _crd_probs(es, mem_t, idx, temperature).mean() * num,
            _crd_probs(et, mem_s, idx, temperature).mean() * num,
        ]
    )


def ref_crd(es, et, mem_s, mem_t, idx, z, temperature=0.07):
    """NCE: -log h(positive) - sum log(1 - h(negative)), h(P) = P / (P + K/M + 1e-7)."""
    num, k = len(mem_s), idx.shape[1] - 1
    noise = k / num
    total = 0.0
    for probs in (
        _crd_probs(es, mem_t, idx, temperature) / z[0],
        _crd_probs(et, mem_s, idx, temperature) / z[1],
    ):
        for row in probs:
            total -= math.log(row[0] / (row[0] + noise + 1e-7))
            total -= sum(math.log(noise / (p + noise + 1e-7)) for p in row[1:])
    return total / len(es)


# --- cases: (loss on the arrays, reference, arrays, student argnums, teacher argnums) --

# Student pooled (8 -> 4 and 6 -> 4 with overlapping windows), then the teacher (8 -> 4).
AT_S = [(BATCH, 8, 8, 3), (BATCH, 6, 6, 2), (BATCH, 4, 4, 3)]
AT_T = [(BATCH, 4, 4, 2), (BATCH, 4, 4, 4), (BATCH, 8, 8, 2)]
# Per stage the widths agree; the channels (hence the matrices' rows) differ.
SVD_S = [(BATCH, 8, 8, 2), (BATCH, 4, 4, 3), (BATCH, 4, 4, 5)]
SVD_T = [(BATCH, 8, 8, 3), (BATCH, 4, 4, 4), (BATCH, 4, 4, 6)]
# All of 4, 2, 1 (overlapping windows from 6), 4 skipped, and a 1x1 map with none.
HCL = [(BATCH, 6, 6, 3), (BATCH, 4, 4, 2), (BATCH, 1, 1, 5)]
OFD_SCALE = np.array([1.0, -0.5, 0.2], np.float32)
OFD_BIAS = np.array([0.3, -0.2, 1.0], np.float32)  # channel 2: Phi(-5) < 0.001, margin -3|g|


def _crd_arrays():
    rng = np.random.default_rng(5)
    bound = 1 / math.sqrt(6 / 3)  # banks as crd_init_memory draws them
    mem_s, mem_t = rng.uniform(-bound, bound, (2, 20, 6)).astype(np.float32)
    index = rng.choice(20, BATCH, replace=False)
    idx = np.concatenate([index[:, None], rng.integers(0, 20, (BATCH, 5))], axis=1)
    es, et = _normal(6, (BATCH, 6)), _normal(7, (BATCH, 6))
    z = ref_crd_normalizers(es, et, mem_s, mem_t, idx).astype(np.float32)
    return es, et, mem_s, mem_t, idx.astype(np.int32), z


def _rkd_arrays():
    """Student and teacher embeddings whose distances and angles differ by more than 1
    somewhere (an outlying student example), so that both pieces of smooth L1 count."""
    student = _normal(16, (BATCH, 6))
    student[0] *= 6
    return student, _normal(17, (BATCH, 5))


CASES = {
    "fitnet": (
        losses.fitnet_loss,
        ref_fitnet,
        lambda: (_normal(0, (BATCH, 4, 4, 3)), _normal(1, (BATCH, 4, 4, 3))),
        (0,),
        (1,),
    ),
    "at": (losses.at_loss, ref_at, lambda: (_maps(0, AT_S), _maps(10, AT_T)), (0,), (1,)),
    "at_p3": (
        lambda s, t: losses.at_loss(s, t, p=3),
        lambda s, t: ref_at(s, t, p=3),
        lambda: (_maps(0, AT_S[:1]), _maps(10, AT_T[:1])),
        (0,),
        (1,),
    ),
    "nst": (
        losses.nst_loss,
        ref_nst,
        lambda: (_maps(0, AT_S[::2]), _maps(10, AT_T[::2])),
        (0,),
        (1,),
    ),
    "pkt": (
        losses.pkt_loss,
        ref_pkt,
        lambda: (_normal(0, (BATCH, 6)), _normal(1, (BATCH, 10))),
        (0,),
        (1,),
    ),
    # k = 2 (mdistiller's is 1) so that the singular values' normalisation and the
    # matching of several vectors count.
    "kdsvd": (
        lambda s, t: losses.kdsvd_loss(s, t, k=2),
        lambda s, t: ref_kdsvd(s, t, k=2),
        lambda: (_maps(0, SVD_S), _maps(10, SVD_T)),
        (0,),
        (1,),
    ),
    "rkd": (
        losses.rkd_loss,
        ref_rkd,
        _rkd_arrays,
        (0,),
        (1,),
    ),
    "sp": (
        losses.sp_loss,
        ref_sp,
        lambda: (
            _maps(0, [(BATCH, 4, 4, 3), (BATCH, 2, 2, 5)]),
            _maps(10, [(BATCH, 4, 4, 6), (BATCH, 2, 2, 2)]),
        ),
        (0,),
        (1,),
    ),
    "ofd": (
        losses.ofd_loss,
        ref_ofd,
        lambda: (
            _normal(0, (BATCH, 4, 4, 3)),
            _normal(1, (BATCH, 8, 8, 3)),
            ref_ofd_margin(OFD_SCALE, OFD_BIAS).astype(np.float32),
        ),
        (0,),
        (1,),
    ),
    "hcl": (losses.hcl_loss, ref_hcl, lambda: (_maps(0, HCL), _maps(10, HCL)), (0,), (1,)),
    "vid": (
        losses.vid_loss,
        ref_vid,
        lambda: (
            _normal(0, (BATCH, 4, 4, 3)),
            _normal(1, (BATCH, 8, 8, 3)),
            _normal(2, (3,)),
        ),
        (0, 2),
        (1,),
    ),
    "crd": (losses.crd_loss, ref_crd, _crd_arrays, (0, 1), ()),
}


def _f64(tree):
    """Float arrays as float64, index arrays as they are."""
    return jax.tree.map(lambda x: np.float64(x) if np.issubdtype(x.dtype, np.floating) else x, tree)


# PKT's KL is a mean of q log(q / p) with ratios near 1: a float32 rounding of p or q
# (~1e-7) becomes ~3e-6 of a KL of ~0.007 on these inputs.
RTOL = {"pkt": 3e-6}


@functools.cache
def _evaluated(name):
    """(arrays, value, gradients wrt the student and then the teacher arguments), computed
    once per case by one jitted value_and_grad (eager dispatch would dominate the runtime)."""
    loss, _, arrays, student, teacher = CASES[name]
    args = arrays()
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=student + teacher))(*args)
    return args, value, grads


@pytest.mark.parametrize("name", CASES)
def test_matches_float64_reference(name):
    _, ref, _, _, _ = CASES[name]
    args, value, _ = _evaluated(name)
    assert value.dtype == jnp.float32 and value.shape == ()
    expected = ref(*_f64(args))
    assert abs(expected) > 1e-3  # a non-trivial value
    np.testing.assert_allclose(float(value), expected, rtol=RTOL.get(name, 1e-6))


@pytest.mark.parametrize("name", CASES)
def test_gradient_matches_central_difference(name):
    """<grad, u> of the JAX loss equals the float64 central difference of the reference
    along random directions u; the teacher's features get no gradient."""
    _, ref, _, student, teacher = CASES[name]
    args, _, grads = _evaluated(name)
    rng = np.random.default_rng(0)
    h = 1e-5
    for argnum, grad in zip(student, grads, strict=False):
        for _ in range(2):
            u = jax.tree.map(lambda x: rng.normal(size=np.shape(x)), args[argnum])
            shifted = [list(_f64(args)) for _ in range(2)]
            for sign, moved in zip((1, -1), shifted, strict=True):
                moved[argnum] = jax.tree.map(lambda x, d, s=sign: x + s * h * d, moved[argnum], u)
            numeric = (ref(*shifted[0]) - ref(*shifted[1])) / (2 * h)
            analytic = sum(jax.tree.leaves(jax.tree.map(lambda g, d: np.sum(g * d), grad, u)))
            np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-6)
    for leaf in jax.tree.leaves(grads[len(student) :]):
        np.testing.assert_array_equal(leaf, 0)
    assert len(grads) == len(student) + len(teacher)


def _equation_dtypes(jaxpr):
    """Dtypes of every value computed by the equations of a jaxpr and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "convert_element_type":
            yield from (v.aval.dtype for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equation_dtypes(inner)


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_inputs_are_computed_in_float32(name):
    """Nothing but the casts of the inputs is computed in bfloat16 (traced, not run)."""
    loss, _, arrays, _, _ = CASES[name]
    low = jax.tree.map(
        lambda x: jnp.asarray(x, jnp.bfloat16) if x.dtype == np.float32 else x, arrays()
    )
    closed = jax.make_jaxpr(loss)(*low)
    assert closed.out_avals[0].dtype == jnp.float32
    dtypes = set(_equation_dtypes(closed.jaxpr))
    assert np.dtype(np.float32) in dtypes and np.dtype(jnp.bfloat16) not in dtypes


def test_rkd_case_reaches_both_pieces_of_smooth_l1():
    s, t = _f64(_rkd_arrays())
    for psi in (rkd_distances, rkd_angles):
        gap = np.abs(psi(s) - psi(t))
        assert gap.max() > 1 and np.any((gap > 0) & (gap < 1))


def test_pkt_is_finite_for_opposite_student_embeddings():
    """eps keeps log((q + eps) / (p + eps)) finite where a cosine of -1 makes p 0 (exactly:
    3 + 1e-7 rounds to 3 in float32, so the normalised rows are exactly +-e_0)."""
    student, teacher = _normal(0, (BATCH, 6)), _normal(1, (BATCH, 10))
    student[0], student[1] = np.eye(6)[0] * 3, -np.eye(6)[0] * 3
    value, grad = jax.jit(jax.value_and_grad(losses.pkt_loss))(student, teacher)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_ofd_margin_matches_truncated_normal_mean():
    margin = jax.jit(losses.ofd_margin)(OFD_SCALE, OFD_BIAS)
    assert margin.dtype == jnp.float32
    np.testing.assert_allclose(margin, ref_ofd_margin(OFD_SCALE, OFD_BIAS), rtol=1e-6)
    assert float(margin[2]) == pytest.approx(-0.6)  # the -3 |gamma| fallback


def test_vid_initial_variance_is_init_pred_var():
    alpha = losses.vid_init_log_scale(3)
    assert alpha.shape == (3,) and alpha.dtype == jnp.float32
    np.testing.assert_allclose(np.log1p(np.exp(np.float64(alpha))) + 1e-5, 5.0, rtol=1e-6)


def test_crd_normalizers_are_the_scaled_mean_score():
    es, et, mem_s, mem_t, idx, z = _crd_arrays()
    # exp(score / 0.07) turns the float32 rounding of a score into 14 times its relative error.
    z_jax = jax.jit(losses.crd_normalizers)(es, et, mem_s, mem_t, idx)
    np.testing.assert_allclose(z_jax, z, rtol=3e-6)


def test_crd_update_memory_moves_rows_and_normalises_them():
    es, _, mem_s, _, idx, _ = _crd_arrays()
    index = idx[:, 0]
    updated = np.asarray(jax.jit(losses.crd_update_memory)(mem_s, es, index))
    expected = np.float64(mem_s).copy()
    v = unit_rows(np.float64(es))
    for row, i in enumerate(index):
        moved = 0.5 * expected[i] + 0.5 * v[row]
        expected[i] = moved / np.linalg.norm(moved)
    np.testing.assert_allclose(updated, expected, rtol=1e-6, atol=1e-7)
    untouched = np.setdiff1d(np.arange(len(mem_s)), index)
    np.testing.assert_array_equal(updated[untouched], mem_s[untouched])


def test_crd_memory_starts_in_the_stated_range():
    init = jax.jit(losses.crd_init_memory, static_argnums=(1, 2))
    bank = np.asarray(init(jax.random.key(0), 1000, 12))
    bound = 1 / math.sqrt(12 / 3)
    assert bank.shape == (1000, 12) and np.abs(bank).max() <= bound
    assert np.abs(bank).max() > 0.95 * bound


def _x(shape):
    return np.zeros(shape, np.float32)


BAD_CALLS = {
    "fitnet shapes": lambda: losses.fitnet_loss(_x((4, 4, 4, 3)), _x((4, 4, 4, 2))),
    "at stage count": lambda: losses.at_loss([_x((4, 4, 4, 3))] * 2, [_x((4, 4, 4, 3))]),
    "at batch": lambda: losses.at_loss([_x((4, 4, 4, 3))], [_x((2, 4, 4, 3))]),
    "nst stage count": lambda: losses.nst_loss([], []),
    "nst rank": lambda: losses.nst_loss([_x((4, 4, 3))], [_x((4, 4, 3))]),
    "pkt batch": lambda: losses.pkt_loss(_x((4, 6)), _x((3, 6))),
    "kdsvd stage count": lambda: losses.kdsvd_loss([_x((4, 4, 4, 3))], []),
    "kdsvd width": lambda: losses.kdsvd_loss([_x((4, 4, 4, 3))], [_x((4, 4, 8, 3))]),
    "rkd batch": lambda: losses.rkd_loss(_x((4, 6)), _x((5, 6))),
    "sp stage count": lambda: losses.sp_loss([_x((4, 2, 2, 3))] * 2, [_x((4, 2, 2, 3))] * 3),
    "ofd channels": lambda: losses.ofd_loss(_x((4, 4, 4, 3)), _x((4, 4, 4, 2)), _x((3,))),
    "ofd margin": lambda: losses.ofd_loss(_x((4, 4, 4, 3)), _x((4, 4, 4, 3)), _x((2,))),
    "ofd_margin shapes": lambda: losses.ofd_margin(_x((3,)), _x((2,))),
    "hcl shapes": lambda: losses.hcl_loss([_x((4, 4, 4, 3))], [_x((4, 2, 2, 3))]),
    "hcl stage count": lambda: losses.hcl_loss([_x((4, 4, 4, 3))], []),
    "vid channels": lambda: losses.vid_loss(_x((4, 4, 4, 3)), _x((4, 4, 4, 2)), _x((3,))),
    "vid teacher smaller": lambda: losses.vid_loss(_x((4, 4, 4, 3)), _x((4, 2, 2, 3)), _x((3,))),
    "vid scale": lambda: losses.vid_loss(_x((4, 4, 4, 3)), _x((4, 4, 4, 3)), _x((2,))),
    "crd embeddings": lambda: losses.crd_loss(
        _x((4, 6)), _x((4, 5)), _x((20, 6)), _x((20, 6)), np.zeros((4, 3), int), _x((2,))
    ),
    "crd bank": lambda: losses.crd_loss(
        _x((4, 6)), _x((4, 6)), _x((20, 5)), _x((20, 5)), np.zeros((4, 3), int), _x((2,))
    ),
    "crd index rows": lambda: losses.crd_loss(
        _x((4, 6)), _x((4, 6)), _x((20, 6)), _x((20, 6)), np.zeros((3, 3), int), _x((2,))
    ),
    "crd no negatives": lambda: losses.crd_loss(
        _x((4, 6)), _x((4, 6)), _x((20, 6)), _x((20, 6)), np.zeros((4, 1), int), _x((2,))
    ),
    "crd float index": lambda: losses.crd_loss(
        _x((4, 6)), _x((4, 6)), _x((20, 6)), _x((20, 6)), _x((4, 3)), _x((2,))
    ),
    "crd normalizers": lambda: losses.crd_loss(
        _x((4, 6)), _x((4, 6)), _x((20, 6)), _x((20, 6)), np.zeros((4, 3), int), _x((1,))
    ),
    "crd update index": lambda: losses.crd_update_memory(_x((20, 6)), _x((4, 6)), np.zeros(3, int)),
    "crd update dim": lambda: losses.crd_update_memory(_x((20, 6)), _x((4, 5)), np.zeros(4, int)),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_mismatched_inputs_are_rejected(name):
    """Rejected by the loss's own check (its message starts with the loss's name), not by
    whatever operation would have failed later."""
    with pytest.raises(ValueError, match=rf"^{name.split()[0]}"):
        BAD_CALLS[name]()


# --- KD-SVD on the CPU: no batched LAPACK call that could hang the step ----------------

_KDSVD_STEPS = """
import jax, jax.numpy as jnp
from bkd_jax import losses
keys = jax.random.split(jax.random.key(0), 4)
shapes = [(8, 16, 16, 16), (8, 8, 8, 32)]
fs = [jax.random.normal(k, s) for k, s in zip(keys[:2], shapes)]
ft = [jax.random.normal(k, s) for k, s in zip(keys[2:], shapes)]
step = jax.jit(jax.grad(lambda fs, ft: losses.kdsvd_loss(fs, ft, k=1)))
for _ in range(50):
    fs = [f - 0.01 * g for f, g in zip(fs, step(fs, ft))]
jax.block_until_ready(fs)
print("done")
"""


def test_kdsvd_step_takes_no_batched_svd_on_the_cpu():
    """Every LAPACK SVD in the jitted step is on one matrix (`num_batch_dims = "0"`):
    batched ones block XLA's pool threads and hung the step on 2-core hosts."""
    fs, ft = (
        _maps(60, [(8, 16, 16, 16), (8, 8, 8, 32)]),
        _maps(62, [(8, 16, 16, 16), (8, 8, 8, 32)]),
    )
    step = jax.jit(jax.value_and_grad(lambda fs, ft: losses.kdsvd_loss(fs, ft, k=1)))
    calls = [line for line in step.lower(fs, ft).as_text().splitlines() if "gesdd" in line]
    assert len(calls) == 4  # student and teacher, two stages
    assert all('num_batch_dims = "0"' in line for line in calls)


def test_kdsvd_loop_svd_equals_batched_svd():
    x = jnp.asarray(_normal(64, (6, 40, 12)))
    for looped, batched in zip(
        jax.jit(feature_losses._svd_one_by_one)(x), jnp.linalg.svd(x, full_matrices=False)
    ):
        np.testing.assert_allclose(looped, batched, rtol=1e-5, atol=1e-6)


def test_kdsvd_jitted_steps_finish_in_a_subprocess():
    """A fresh process runs 50 jitted steps (100 pairs of concurrent SVDs); a hang fails
    by timeout. Takes 10 to 25 s on 2 cores, mostly compilation."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", _KDSVD_STEPS],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    assert done.stdout.strip() == "done"
