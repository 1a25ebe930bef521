"""Feature-distillation losses of the feature-based baselines, as pure float32 functions.

Each loss reproduces what mdistiller (megvii-research/mdistiller, the code base whose
CIFAR-100 and ImageNet recipes the baselines follow) computes: the same reductions,
normalisations and constants. Features are NHWC here where mdistiller's are NCHW; every
reduction is over the same axes, so the values agree. Inputs are cast to float32 whatever
the dtype the networks ran in, and every contraction runs at `Precision.HIGHEST`, since
Gram matrices, kernels and SVDs of bfloat16 features are too coarse to distil from.
Features named `teacher_*` come from the frozen teacher and are treated as constants
(`stop_gradient`, like mdistiller's `torch.no_grad()` and `.detach()`); CRD is the
exception, because its teacher embedding head is trained.

Where the spatial sizes of a student and a teacher stage differ (AT, NST, OFD, VID), the
larger map is average-pooled to the smaller one with PyTorch's `adaptive_avg_pool2d`
windows (cell i of n_out over n_in spans [floor(i n_in / n_out), ceil((i+1) n_in / n_out))).
Stage lists come in matching order; which stages a method uses is the caller's choice, and
mdistiller's ("feats[1:]": every stage output after the stem) is given per loss. Loss
weights below are the `FEAT_WEIGHT`s of mdistiller/engine/cfg.py, applied by the caller.

FitNet (Romero et al., ICLR 2015; distillers/FitNet.py). L = mean((r(F_s) - F_t)^2) over
  every element, r the student's hint regressor (conv, BN, ReLU: _common.py ConvReg,
  applied by the caller).
  Hint stage feats[2] (cfg.py FITNET.HINT_LAYER = 2), weight 100.
AT (Zagoruyko & Komodakis, ICLR 2017; distillers/AT.py). Per stage, the attention map
  a = mean_c(F^p) over channels, flattened over HW and L2-normalised per example;
  L = sum_stages mean((a_s - a_t)^2) over batch and positions. p = 2 (cfg.py AT.P),
  stages feats[1:], weight 1000.
NST (Huang & Wang, 2017; distillers/NST.py). Per stage, each channel's spatial map is
  L2-normalised over HW, f_i; with the polynomial kernel k(x, y) = (x^T y)^2, the squared
  MMD L = mean_ij k(t_i, t_j) + mean_ij k(s_i, s_j) - 2 mean_ij k(s_i, t_j), the means over
  the batch and the channel pairs; summed over stages feats[1:], weight 50.
PKT (Passalis & Tefas, ECCV 2018; distillers/PKT.py). Embeddings are divided by
  (||x|| + eps); the cosine similarities K_ij are mapped to (K_ij + 1) / 2 and each row is
  normalised to sum 1, giving p (student) and q (teacher);
  L = mean_ij q_ij log((q_ij + eps) / (p_ij + eps)) over all N^2 pairs. eps = 1e-7
  (PKT.py), the pooled features, weight 30000.
KD-SVD (Lee et al., ECCV 2018; distillers/KDSVD.py). Per stage, the feature map as a
  matrix X = U S V^T; the teacher keeps its top k right singular vectors, the student its
  top k + 3, singular values of the top ones L2-normalised to sigma. Each teacher vector
  is matched with the student vector of largest |cosine|, sign-aligned to it, and both
  are scaled by the teacher's sigma, giving v_t, v_s. Between consecutive stages the RBF
  maps g_ab = exp(-(v[a] - v_prev[b])^2 / 8) (all row pairs a, b; per singular vector) of
  the student and teacher are compared: L = sum_stages>0 sum (g_s - g_t)^2 / batch, with
  non-finite entries dropped. k = 1 (cfg.py KDSVD.K), stages feats[1:], weight 1.
  X is what mdistiller decomposes: the NCHW map viewed as (C H) x W, so the singular
  vectors span the width axis; the authors' TensorFlow code (sseung0703/SSKD_SVD) and the
  paper use the NHWC map as HW x C. The sign of a singular vector is arbitrary (LAPACK and
  cuSOLVER choose it), and the cross-stage RBF depends on the teacher's signs; they are
  fixed here by making the largest-magnitude entry of each teacher vector positive, so
  the loss is a function of its inputs. The student's signs never matter (it is aligned).
RKD (Park et al., CVPR 2019; distillers/RKD.py). Distances d_ij = ||e_i - e_j|| (computed
  as sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)), diagonal 0), divided by their mean
  over the pairs with d > 0; angles A_ijk = <n(e_j - e_i), n(e_k - e_i)> with n the L2
  normalisation (a zero vector stays 0). L = w_d smoothL1(d_s, d_t) + w_a smoothL1(A_s, A_t),
  smooth L1 with beta 1 averaged over all N^2 and N^3 entries. w_d = 25, w_a = 50
  (cfg.py RKD.DISTANCE_WEIGHT, ANGLE_WEIGHT), eps 1e-12 and unsquared distances
  (RKD.PDIST.EPSILON, SQUARED), the pooled features, weight 1.
SP (Tung & Mori, ICCV 2019; distillers/SP.py). G = F F^T over the flattened features of
  the batch, each row L2-normalised; L = sum_stages ||G_t - G_s||_F^2 / N^2. Only the last
  stage feats[-1], weight 3000.
OFD (Heo et al., ICCV 2019; distillers/OFD.py). Partial L2 between the student's
  connector output s and the teacher's pre-ReLU feature t (pooled to s's size), with the
  per-channel margin m:
  (s - m)^2 [s > m, t <= m] + (s - t)^2 [s > t, m < t <= 0] + (s - t)^2 [t > 0],
  summed over C, H, W and averaged over the batch. The margin is E[x | x < 0] for
  x ~ N(beta, |gamma|^2) of the teacher BN before the ReLU:
  m = -|gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|) + beta, or -3 |gamma| where
  Phi(-beta/|gamma|) <= 0.001. mdistiller sums the stages preact_feats[1:] weighted
  1 / 2^(n - 1 - i) (the deepest 1), weight 0.001.
ReviewKD's HCL (Chen et al., CVPR 2021; distillers/ReviewKD.py). Per stage, the MSE of
  the maps plus the MSEs of their average pools to 4x4, 2x2 and 1x1, each level with half
  the previous weight (1, 1/2, 1/4, 1/8) and levels not smaller than the map skipped,
  divided by the sum of the weights used; summed over stages. mdistiller compares the
  fused student features with the teacher's preact_feats[1:] plus its pooled feature as
  a 1x1 map, weight 1 (cfg.py REVIEWKD.REVIEWKD_WEIGHT), warmed up over 20 epochs.
VID (Ahn et al., CVPR 2019; distillers/VID.py). With the regressor's mean mu and the
  per-channel variance sigma^2 = softplus(alpha_c) + eps,
  L = mean(0.5 ((mu - t)^2 / sigma^2 + log sigma^2)) over every element. alpha starts at
  softplus^-1(5 - eps) so that sigma^2 starts at 5; eps = 1e-5 (cfg.py VID.INIT_PRED_VAR,
  VID.EPS), stages feats[1:], weight 1.
CRD (Tian et al., ICLR 2020; distillers/CRD.py). Embeddings are L2-normalised; a memory
  bank of M rows per side holds momentum-averaged embeddings of every training example.
  For example i with the K + 1 bank rows j (its own index first, then K negatives from
  other classes), P_ij = exp(v_i . m_j / T) / Z with Z = M times the mean of exp(v . m / T)
  over the first batch (then fixed). With c = K / M + 1e-7,
  L = -(1/N) sum_i [log(P_i0 / (P_i0 + c)) + sum_{j>0} log((K / M) / (P_ij + c))],
  once for the student against the teacher's bank and once for the teacher against the
  student's bank, the two summed. After the step each side's rows of the batch become
  n(0.5 m + 0.5 v). T = 0.07, K = 16384, momentum 0.5, embedding dim 128 (cfg.py
  CRD.NCE.TEMPERATURE, NCE.K, NCE.MOMENTUM, FEAT.DIM), the pooled features, weight 0.8.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# CRD: mdistiller/engine/cfg.py CRD.NCE.{TEMPERATURE, K, MOMENTUM}, CRD.FEAT.DIM.
CRD_NCE_TEMPERATURE = 0.07
CRD_NCE_K = 16384
CRD_NCE_MOMENTUM = 0.5
CRD_FEAT_DIM = 128
# VID: mdistiller/engine/cfg.py VID.INIT_PRED_VAR, VID.EPS.
VID_INIT_PRED_VAR = 5.0
VID_EPS = 1e-5

# F.normalize's default eps, used by AT, NST, RKD, SP and KD-SVD in mdistiller.
_NORMALIZE_EPS = 1e-12
# RKD.PDIST.EPSILON in mdistiller/engine/cfg.py (distances unsquared: PDIST.SQUARED False).
_RKD_PDIST_EPS = 1e-12
# The eps of ContrastLoss in mdistiller/distillers/CRD.py.
_CRD_NCE_EPS = 1e-7
# Pyramid levels of hcl_loss in mdistiller/distillers/ReviewKD.py.
_HCL_LEVELS = (4, 2, 1)
# OFD.py: below this Phi(-beta / |gamma|) the margin falls back to -3 |gamma|.
_OFD_MIN_NEGATIVE_MASS = 0.001

_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _teacher(x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(_f32(x))


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
    """x / max(||x||, 1e-12) along `axis` (F.normalize), with a finite gradient at 0."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, _NORMALIZE_EPS**2))


def _finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights of adaptive average pooling along one axis."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """PyTorch's adaptive_avg_pool2d on an NHWC map."""
    if x.shape[1:3] == tuple(out_hw):
        return x
    ph, pw = _pool_matrix(x.shape[1], out_hw[0]), _pool_matrix(x.shape[2], out_hw[1])
    return _einsum("ih,nhwc,jw->nijc", ph, x, pw)


def pool_to_smaller(fs: jax.Array, ft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two NHWC maps, the one of greater height average-pooled to the other's size.

    mdistiller's AT and NST (distillers/AT.py, NST.py) compare heights (`if s_H > t_H`);
    the zoo's maps are square, so this is also the larger area.
    """
    if fs.shape[1] > ft.shape[1]:
        fs = adaptive_avg_pool(fs, ft.shape[1:3])
    elif fs.shape[1] < ft.shape[1]:
        ft = adaptive_avg_pool(ft, fs.shape[1:3])
    return fs, ft


def _check_maps(fs: jax.Array, ft: jax.Array, what: str, same_shape: bool = False) -> None:
    if fs.ndim != 4 or ft.ndim != 4:
        raise ValueError(f"{what}: features must be NHWC, got {fs.shape} and {ft.shape}.")
    if same_shape and fs.shape != ft.shape:
        raise ValueError(f"{what}: feature shapes differ: {fs.shape} vs {ft.shape}.")
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"{what}: batch sizes differ: {fs.shape} vs {ft.shape}.")


def _check_stages(
    student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array], what: str
) -> None:
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"{what}: {len(student_feats)} student stages but {len(teacher_feats)} teacher stages."
        )
    if not student_feats:
        raise ValueError(f"{what}: no stages given.")


def _check_embeddings(es: jax.Array, et: jax.Array, what: str) -> None:
    if es.ndim < 2 or et.ndim < 2 or es.shape[0] != et.shape[0]:
        raise ValueError(
            f"{what}: embeddings must be (batch, ...) with one batch size, got {es.shape} and "
            f"{et.shape}."
        )


def fitnet_loss(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
    """FitNet's hint loss: the MSE of the regressed student feature to the teacher's."""
    _check_maps(student_feat, teacher_feat, "fitnet_loss", same_shape=True)
    return jnp.mean(jnp.square(_f32(student_feat) - _teacher(teacher_feat)))


def _attention_map(f: jax.Array, p: float) -> jax.Array:
    return _l2_normalize(jnp.mean(f**p, axis=-1).reshape(f.shape[0], -1), axis=1)


def at_loss(
    student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array], p: float = 2
) -> jax.Array:
    """Attention transfer: summed MSE of L2-normalised channel means of F^p per stage."""
    _check_stages(student_feats, teacher_feats, "at_loss")
    total = jnp.zeros((), jnp.float32)
    for fs, ft in zip(student_feats, teacher_feats):
        _check_maps(fs, ft, "at_loss")
        fs, ft = pool_to_smaller(_f32(fs), _teacher(ft))
        total += jnp.mean(jnp.square(_attention_map(fs, p) - _attention_map(ft, p)))
    return total


def _channel_maps(f: jax.Array) -> jax.Array:
    """(N, C, HW): each channel's spatial map, L2-normalised."""
    n, h, w, c = f.shape
    return _l2_normalize(jnp.swapaxes(f.reshape(n, h * w, c), 1, 2), axis=2)


def _poly_kernel_mean(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(_einsum("nid,njd->nij", a, b)))


def nst_loss(student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array]) -> jax.Array:
    """Neuron selectivity transfer: squared MMD of channel maps, kernel (x^T y)^2."""
    _check_stages(student_feats, teacher_feats, "nst_loss")
    total = jnp.zeros((), jnp.float32)
    for fs, ft in zip(student_feats, teacher_feats):
        _check_maps(fs, ft, "nst_loss")
        fs, ft = pool_to_smaller(_f32(fs), _teacher(ft))
        s, t = _channel_maps(fs), _channel_maps(ft)
        total += _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)
    return total


def _similarity_distribution(e: jax.Array, eps: float) -> jax.Array:
    e = e / (jnp.linalg.norm(e, axis=1, keepdims=True) + eps)
    k = (_einsum("id,jd->ij", e, e) + 1.0) / 2.0
    return k / jnp.sum(k, axis=1, keepdims=True)


def pkt_loss(student_emb: jax.Array, teacher_emb: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Probabilistic knowledge transfer: KL of the batch's cosine-similarity distributions.

    Embeddings are (batch, ...) and flattened per example; eps = 1e-7 as in PKT.py.
    """
    _check_embeddings(student_emb, teacher_emb, "pkt_loss")
    n = student_emb.shape[0]
    p = _similarity_distribution(_f32(student_emb).reshape(n, -1), eps)
    q = _similarity_distribution(_teacher(teacher_emb).reshape(n, -1), eps)
    return jnp.mean(q * jnp.log((q + eps) / (p + eps)))


def _svd_one_by_one(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SVDs of a batch of matrices, one LAPACK call per matrix (a loop), for the CPU.

    jaxlib's CPU LAPACK kernels split a batch into chunks on XLA's intra-op thread pool and
    block the calling pool thread until the chunks finish (`ParallelBatchMap`). The step
    runs independent SVDs concurrently (student and teacher), each blocking a pool thread;
    on a 2-core host both threads then wait for chunks that no free thread can run, and the
    step hangs. A call on one matrix runs inline, so the loop never waits on the pool.
    """
    return jax.lax.map(lambda m: jnp.linalg.svd(m, full_matrices=False), x)


def _batched_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SVDs of (N, M, W) matrices: batched on accelerators, one by one on the CPU."""
    return jax.lax.platform_dependent(
        x,
        cpu=_svd_one_by_one,
        default=lambda x: jnp.linalg.svd(x, full_matrices=False),
    )


def _kdsvd_vectors(f: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Top-n normalised singular values (N, n) and right singular vectors (N, W, n)."""
    b, h, w, c = f.shape
    x = jnp.transpose(f, (0, 3, 1, 2)).reshape(b, c * h, w)
    _, s, vh = _batched_svd(x)
    s, v = _finite_or_zero(s), _finite_or_zero(jnp.swapaxes(vh, 1, 2))
    return _l2_normalize(s[:, :n], axis=1), _l2_normalize(v[:, :, :n], axis=1)


def _canonical_signs(v: jax.Array) -> jax.Array:
    """Flips each column of (N, W, k) so that its largest-magnitude entry is positive."""
    peak = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=1)[:, None, :], axis=1)
    return v * jnp.where(peak < 0, -1.0, 1.0)


def _align_to(v_s: jax.Array, v_t: jax.Array) -> jax.Array:
    """For each teacher column, the student column of largest |cosine|, sign-aligned."""
    cosine = _einsum("nwa,nwb->nab", v_s, v_t)
    best = jnp.abs(cosine) == jnp.max(jnp.abs(cosine), axis=1, keepdims=True)
    mask = jax.lax.stop_gradient(jnp.where(best, jnp.sign(cosine), 0.0))
    return _einsum("nwa,nab->nwb", v_s, mask)


def _rbf(v: jax.Array, v_prev: jax.Array) -> jax.Array:
    return jnp.exp(-jnp.square(v[:, :, None, :] - v_prev[:, None, :, :]) / 8.0)


def kdsvd_loss(
    student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array], k: int = 1
) -> jax.Array:
    """KD-SVD: RBF relations of aligned singular vectors between consecutive stages.

    Student and teacher maps of a stage must have the same width W (the singular vectors'
    length, see the module docstring); k = 1 is mdistiller's default (cfg.py KDSVD.K).
    """
    what = "kdsvd_loss"
    _check_stages(student_feats, teacher_feats, what)
    total = jnp.zeros((), jnp.float32)
    previous = None
    for fs, ft in zip(student_feats, teacher_feats):
        _check_maps(fs, ft, what)
        if fs.shape[2] != ft.shape[2]:
            raise ValueError(f"{what}: widths differ at a stage: {fs.shape} vs {ft.shape}.")
        s_t, v_t = _kdsvd_vectors(_teacher(ft), k)
        v_t = _canonical_signs(v_t)
        _, v_s = _kdsvd_vectors(_f32(fs), k + 3)
        v_s = _align_to(v_s, v_t)
        v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
        if previous is not None:
            v_sb, v_tb = previous
            diff = jnp.square(_rbf(v_s, v_sb) - _rbf(v_t, v_tb))
            total += jnp.sum(_finite_or_zero(diff))
        previous = v_s, v_t
    return total / student_feats[0].shape[0]


def _smooth_l1(x: jax.Array, y: jax.Array) -> jax.Array:
    d = jnp.abs(x - y)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def _rkd_distances(e: jax.Array) -> jax.Array:
    """Pairwise distances divided by their mean over the positive ones."""
    sq = jnp.sum(e * e, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * _einsum("id,jd->ij", e, e)
    d = jnp.sqrt(jnp.maximum(d2, _RKD_PDIST_EPS))
    d = jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)
    positive = d > 0
    return d / (jnp.sum(jnp.where(positive, d, 0.0)) / jnp.sum(positive))


def _rkd_angles(e: jax.Array) -> jax.Array:
    """A_ijk = <n(e_j - e_i), n(e_k - e_i)>, (N, N, N)."""
    u = _l2_normalize(e[None, :, :] - e[:, None, :], axis=2)
    return _einsum("ijd,ikd->ijk", u, u)


def rkd_loss(
    student_emb: jax.Array,
    teacher_emb: jax.Array,
    *,
    distance_weight: float = 25,
    angle_weight: float = 50,
) -> jax.Array:
    """Relational KD: smooth-L1 on normalised distances and angles within the batch.

    Embeddings are (batch, ...) and flattened per example. The weights default to
    mdistiller's (cfg.py RKD.DISTANCE_WEIGHT = 25, RKD.ANGLE_WEIGHT = 50).
    """
    _check_embeddings(student_emb, teacher_emb, "rkd_loss")
    n = student_emb.shape[0]
    s, t = _f32(student_emb).reshape(n, -1), _teacher(teacher_emb).reshape(n, -1)
    loss_d = _smooth_l1(_rkd_distances(s), _rkd_distances(t))
    loss_a = _smooth_l1(_rkd_angles(s), _rkd_angles(t))
    return distance_weight * loss_d + angle_weight * loss_a


def _normalized_gram(f: jax.Array) -> jax.Array:
    f = f.reshape(f.shape[0], -1)
    return _l2_normalize(_einsum("id,jd->ij", f, f), axis=1)


def sp_loss(student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array]) -> jax.Array:
    """Similarity preserving: ||G_t - G_s||_F^2 / N^2 of row-normalised Gram matrices."""
    _check_stages(student_feats, teacher_feats, "sp_loss")
    total = jnp.zeros((), jnp.float32)
    for fs, ft in zip(student_feats, teacher_feats):
        _check_maps(fs, ft, "sp_loss")
        diff = _normalized_gram(_teacher(ft)) - _normalized_gram(_f32(fs))
        total += jnp.sum(jnp.square(diff)) / fs.shape[0] ** 2
    return total


def ofd_margin(bn_scale: jax.Array, bn_bias: jax.Array) -> jax.Array:
    """OFD's per-channel margin E[x | x < 0], x ~ N(bias, scale^2), from the teacher BN.

    `bn_scale` (gamma) and `bn_bias` (beta) are the (C,) parameters of the BatchNorm before
    the teacher's ReLU; where the negative mass Phi(-beta / |gamma|) is at most 0.001 the
    margin is -3 |gamma| (OFD.py).
    """
    if jnp.shape(bn_scale) != jnp.shape(bn_bias) or jnp.ndim(bn_scale) != 1:
        raise ValueError(
            f"ofd_margin: scale and bias must be (C,), got {jnp.shape(bn_scale)} and "
            f"{jnp.shape(bn_bias)}."
        )
    std, mean = jnp.abs(_f32(bn_scale)), _f32(bn_bias)
    z = -mean / std
    mass = jax.scipy.stats.norm.cdf(z)
    enough = mass > _OFD_MIN_NEGATIVE_MASS
    density = jnp.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    conditional = -std * density / jnp.where(enough, mass, 1.0) + mean
    return jax.lax.stop_gradient(jnp.where(enough, conditional, -3 * std))


def ofd_loss(student_feat: jax.Array, teacher_feat: jax.Array, margin: jax.Array) -> jax.Array:
    """OFD's partial L2 of one stage, summed over C, H, W and averaged over the batch.

    `student_feat` is the connector's output, `teacher_feat` the teacher's pre-ReLU map
    (average-pooled to the student's spatial size here), `margin` the (C,) output of
    `ofd_margin`. mdistiller weights stage i of n by 1 / 2^(n - 1 - i) (OFD.py).
    """
    what = "ofd_loss"
    _check_maps(student_feat, teacher_feat, what)
    if student_feat.shape[3] != teacher_feat.shape[3]:
        raise ValueError(f"{what}: channels differ: {student_feat.shape} vs {teacher_feat.shape}.")
    if jnp.shape(margin) != (student_feat.shape[3],):
        raise ValueError(
            f"{what}: margin must be ({student_feat.shape[3]},), got {jnp.shape(margin)}."
        )
    s, m = _f32(student_feat), jax.lax.stop_gradient(_f32(margin))
    t = adaptive_avg_pool(_teacher(teacher_feat), s.shape[1:3])
    loss = (
        jnp.square(s - m) * ((s > m) & (t <= m))
        + jnp.square(s - t) * ((s > t) & (t > m) & (t <= 0))
        + jnp.square(s - t) * (t > 0)
    )
    return jnp.sum(loss) / s.shape[0]


def hcl_loss(student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array]) -> jax.Array:
    """ReviewKD's hierarchical context loss: MSE over a 4/2/1 pooling pyramid per stage."""
    _check_stages(student_feats, teacher_feats, "hcl_loss")
    total = jnp.zeros((), jnp.float32)
    for fs, ft in zip(student_feats, teacher_feats):
        _check_maps(fs, ft, "hcl_loss", same_shape=True)
        fs, ft = _f32(fs), _teacher(ft)
        loss, weight, weights = jnp.mean(jnp.square(fs - ft)), 1.0, 1.0
        for level in _HCL_LEVELS:
            if level >= fs.shape[1]:
                continue
            weight /= 2.0
            pooled_s = adaptive_avg_pool(fs, (level, level))
            pooled_t = adaptive_avg_pool(ft, (level, level))
            loss += weight * jnp.mean(jnp.square(pooled_s - pooled_t))
            weights += weight
        total += loss / weights
    return total


def vid_init_log_scale(
    num_channels: int, init_pred_var: float = VID_INIT_PRED_VAR, eps: float = VID_EPS
) -> jax.Array:
    """VID's initial variance parameter: softplus^-1(init_pred_var - eps) per channel."""
    return jnp.full((num_channels,), math.log(math.expm1(init_pred_var - eps)), jnp.float32)


def vid_loss(
    pred_mean: jax.Array,
    teacher_feat: jax.Array,
    log_scale_param: jax.Array,
    eps: float = VID_EPS,
) -> jax.Array:
    """VID's Gaussian negative log-likelihood (up to its constant), averaged over elements.

    `pred_mean` is the regressor's output, `log_scale_param` the (C,) parameter of the
    variance softplus(log_scale_param) + eps. A teacher map larger than `pred_mean` is
    average-pooled to its size; where the student's map is the larger, VID pools the
    student's feature before the regressor, which is the caller's part.
    """
    what = "vid_loss"
    _check_maps(pred_mean, teacher_feat, what)
    if pred_mean.shape[3] != teacher_feat.shape[3] or teacher_feat.shape[1] < pred_mean.shape[1]:
        raise ValueError(
            f"{what}: the prediction {pred_mean.shape} needs the teacher's channels and at most "
            f"its spatial size {teacher_feat.shape} (pool the student before the regressor)."
        )
    if jnp.shape(log_scale_param) != (pred_mean.shape[3],):
        raise ValueError(
            f"{what}: log_scale_param must be ({pred_mean.shape[3]},), got "
            f"{jnp.shape(log_scale_param)}."
        )
    mu = _f32(pred_mean)
    t = adaptive_avg_pool(_teacher(teacher_feat), mu.shape[1:3])
    var = jax.nn.softplus(_f32(log_scale_param)) + eps
    return jnp.mean(0.5 * (jnp.square(mu - t) / var + jnp.log(var)))


def crd_init_memory(key: jax.Array, num_examples: int, dim: int = CRD_FEAT_DIM) -> jax.Array:
    """One CRD memory bank, (num_examples, dim) uniform in +-1/sqrt(dim/3) (CRD.py).

    A distiller keeps two banks in its train state, one of student and one of teacher
    embeddings, with `crd_update_memory` applied to each after every step.
    """
    bound = 1.0 / math.sqrt(dim / 3)
    return jax.random.uniform(key, (num_examples, dim), jnp.float32, -bound, bound)


def _check_crd(
    student_emb: jax.Array,
    teacher_emb: jax.Array,
    memory_student: jax.Array,
    memory_teacher: jax.Array,
    contrast_idx: jax.Array,
) -> None:
    what = "crd"
    if student_emb.ndim != 2 or student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"{what}: embeddings must be (batch, dim) of one shape, got {student_emb.shape} "
            f"and {teacher_emb.shape}."
        )
    if memory_student.shape != memory_teacher.shape or memory_student.shape[1:] != (
        student_emb.shape[1],
    ):
        raise ValueError(
            f"{what}: memory banks must be (num_examples, {student_emb.shape[1]}), got "
            f"{memory_student.shape} and {memory_teacher.shape}."
        )
    if contrast_idx.ndim != 2 or contrast_idx.shape[0] != student_emb.shape[0]:
        raise ValueError(
            f"{what}: contrast_idx must be (batch, 1 + negatives), got {contrast_idx.shape}."
        )
    if contrast_idx.shape[1] < 2 or not jnp.issubdtype(contrast_idx.dtype, jnp.integer):
        raise ValueError(
            f"{what}: contrast_idx needs integer indices, the positive and at least one "
            f"negative per example, got {contrast_idx.shape} {contrast_idx.dtype}."
        )


def _crd_scores(
    student_emb: jax.Array,
    teacher_emb: jax.Array,
    memory_student: jax.Array,
    memory_teacher: jax.Array,
    contrast_idx: jax.Array,
    temperature: float,
) -> tuple[jax.Array, jax.Array]:
    """exp(v . m / T) of each side's embedding against the other side's sampled rows."""
    _check_crd(student_emb, teacher_emb, memory_student, memory_teacher, contrast_idx)
    v_s, v_t = _l2_normalize(_f32(student_emb), 1), _l2_normalize(_f32(teacher_emb), 1)
    rows_t = jax.lax.stop_gradient(_f32(memory_teacher))[contrast_idx]
    rows_s = jax.lax.stop_gradient(_f32(memory_student))[contrast_idx]
    scores_s = jnp.exp(_einsum("nkd,nd->nk", rows_t, v_s) / temperature)
    scores_t = jnp.exp(_einsum("nkd,nd->nk", rows_s, v_t) / temperature)
    return scores_s, scores_t


def crd_normalizers(
    student_emb: jax.Array,
    teacher_emb: jax.Array,
    memory_student: jax.Array,
    memory_teacher: jax.Array,
    contrast_idx: jax.Array,
    *,
    temperature: float = CRD_NCE_TEMPERATURE,
) -> jax.Array:
    """CRD's partition constants (Z_student, Z_teacher): M times the batch's mean score.

    ContrastMemory sets them from the first batch and keeps them for the whole training;
    a distiller computes them once and keeps them beside the memory banks.
    """
    scores = _crd_scores(
        student_emb, teacher_emb, memory_student, memory_teacher, contrast_idx, temperature
    )
    num_examples = memory_student.shape[0]
    return jax.lax.stop_gradient(jnp.stack([jnp.mean(x) * num_examples for x in scores]))


def _nce_loss(p: jax.Array, num_examples: int) -> jax.Array:
    """ContrastLoss of (batch, 1 + K) normalised scores, the positive first."""
    m_pn = (p.shape[1] - 1) / num_examples
    log_pos = jnp.log(p[:, 0] / (p[:, 0] + m_pn + _CRD_NCE_EPS))
    log_neg = jnp.log(m_pn / (p[:, 1:] + m_pn + _CRD_NCE_EPS))
    return -(jnp.sum(log_pos) + jnp.sum(log_neg)) / p.shape[0]


def crd_loss(
    student_emb: jax.Array,
    teacher_emb: jax.Array,
    memory_student: jax.Array,
    memory_teacher: jax.Array,
    contrast_idx: jax.Array,
    normalizers: jax.Array,
    *,
    temperature: float = CRD_NCE_TEMPERATURE,
) -> jax.Array:
    """CRD's NCE loss, student against the teacher's bank plus teacher against the student's.

    Args:
      student_emb, teacher_emb: (batch, dim) outputs of the two embedding heads (linear
        layers), L2-normalised here as CRD's Embed does; both carry gradients.
      memory_student, memory_teacher: (num_examples, dim) banks (`crd_init_memory`); read,
        never differentiated.
      contrast_idx: (batch, 1 + K) integer bank rows, each example's own index first, then
        K negatives (mdistiller draws K = 16384 of other classes' examples, CRD_NCE_K).
      normalizers: (2,) from `crd_normalizers`, fixed after the first batch.
      temperature: T = 0.07 (CRD_NCE_TEMPERATURE).
    """
    if jnp.shape(normalizers) != (2,):
        raise ValueError(f"crd_loss: normalizers must be (2,), got {jnp.shape(normalizers)}.")
    scores_s, scores_t = _crd_scores(
        student_emb, teacher_emb, memory_student, memory_teacher, contrast_idx, temperature
    )
    z = jax.lax.stop_gradient(_f32(normalizers))
    num_examples = memory_student.shape[0]
    return _nce_loss(scores_s / z[0], num_examples) + _nce_loss(scores_t / z[1], num_examples)


def crd_update_memory(
    memory: jax.Array, emb: jax.Array, index: jax.Array, momentum: float = CRD_NCE_MOMENTUM
) -> jax.Array:
    """One bank after a step: rows `index` become n(momentum m + (1 - momentum) n(emb)).

    Apply to the student bank with the student embeddings and to the teacher bank with
    the teacher's, after `crd_loss` has read the banks; `index` holds the batch's
    example indices. momentum = 0.5 (CRD_NCE_MOMENTUM).
    """
    if emb.ndim != 2 or memory.ndim != 2 or emb.shape[1] != memory.shape[1]:
        raise ValueError(
            f"crd_update_memory: need a (num_examples, dim) bank and (batch, dim) embeddings, "
            f"got {memory.shape} and {emb.shape}."
        )
    if jnp.shape(index) != (emb.shape[0],):
        raise ValueError(
            f"crd_update_memory: index must be ({emb.shape[0]},), got {jnp.shape(index)}."
        )
    v = jax.lax.stop_gradient(_l2_normalize(_f32(emb), 1))
    rows = momentum * _f32(memory)[index] + (1 - momentum) * v
    return _f32(memory).at[index].set(_l2_normalize(rows, 1))
