"""WKD: Lv et al., "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge
Distillation" (NeurIPS 2024).

    L = ce_weight * CE(z_s, y) + WKD-L + d(t) * feat_weight * WKD-F
    WKD-L = target term + d(t) * logit_weight * WD(p_s, p_t; cost)

(`bkd_jax.losses.wkd_logit_loss`, `wkd_feature_loss`, which say what each term is and
where the released code departs from the paper). WKD-F reads the hint layer's map of
mdistiller's `feats` through a trainable projector: "conv1x1", mdistiller's ConvReg
(`fitnet.HintRegressor`), or "bottleneck", the authors' ConvRegBottleNeck (1x1 to 256
channels, 3x3, 1x1 to the teacher's channels, each with bias, then BatchNorm and ReLU;
its upsampling branch cannot run as released). Where the authors' projector does not
apply to a pair's map sizes, the larger map is average-pooled to the smaller one's size
first, as for AT (`_map_sizes`).

d(t) is the released cosine decay of both weights (not of the target term):
1 for epochs <= start, then 0.5 (1 + cos(pi (epoch - start) / (end - start))), epochs
counted from 1 as in mdistiller's trainer (WKD.LOSS.COSINE_DECAY_EPOCH is the start, the
run's SOLVER.EPOCHS the end: `decay_epochs = (start, end)`).

The inter-category cost: "fc" is the authors' `COST_MATRIX: "fc"`, 1 - cosine of the
teacher's classifier rows, sharpened (`bkd_jax.losses.wkd_cost_from_prototypes`). Their
released CIFAR-100 configs use `COST_MATRIX: 'cka'` instead: 1 - linear CKA between the
classes' last feature maps of the teacher on the training split, computed offline
(generate_cost_matrix.sh there). `python -m bkd_jax.wkd_cost --teacher=<checkpoint>
--config=<the teacher's config> --output=cost.npy` computes it from a bkd_jax teacher;
give the file as `cost_matrix` (it is sharpened on loading, as theirs is).

Three registered variants with the defaults of the authors' CIFAR-100 resnet32x4 ->
resnet8x4 configs (github JiamingLv/WKD configs/cifar100/<variant>/res32x4_res8x4.yaml):
`wkd_l`, `wkd_f` and `wkd` (L+F, wkd_lf there); a weight of 0 switches a part off.

WKD-L is also a distance Block-KD can use on its stepping-stones (`distance="wkd_l"`, this
project's extension): `stone_distance` turns the knobs of its section into the loss's
knobs and the cost from the teacher's variables. There the weight is constant (Block-KD's
own warm-up r(t) scales the distance, not the cosine decay) and the temperature is
Block-KD's (8 here, 4 there by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bkd_jax import losses
from bkd_jax.distillers.base import Forward, Loss, Method, Recipe
from bkd_jax.distillers.feature_modules import (
    Heads,
    check_int,
    check_knobs,
    feats,
    pool_to,
    tap_shapes,
    teacher_param_shapes,
    torch_default_bias_init,
    torch_default_kernel_init,
)
from bkd_jax.distillers.fitnet import HintRegressor, regressor_output
from bkd_jax.models.layers import batch_norm

PROJECTORS = ("conv1x1", "bottleneck")
# ConvRegBottleNeck's hidden width (WKD.py: c_hidden=256).
_BOTTLENECK_WIDTH = 256


def _knobs(logit_weight: float, feat_weight: float, mean_cov_ratio: float) -> dict:
    """WKD's knobs; the three arguments differ between the variants' configs."""
    return {
        "ce_weight": 1.0,  # WKD.LOSS.CE_WEIGHT (cfg.py and every config)
        "logit_weight": logit_weight,  # WKD.LOSS.WKD_LOGIT_WEIGHT
        "feat_weight": feat_weight,  # WKD.LOSS.WKD_FEAT_WEIGHT
        # (WKD.LOSS.COSINE_DECAY_EPOCH, SOLVER.EPOCHS) of the CIFAR-100 configs.
        "decay_epochs": (150, 240),
        "temperature": 8.0,  # WKD.TEMPERATURE (cfg.py: 4.0)
        "cost_matrix": "fc",  # WKD.COST_MATRIX "fc" (cfg.py); or a .npy (bkd_jax.wkd_cost)
        "cost_sharpen": 1.0,  # WKD.COST_MATRIX_SHARPEN
        "sinkhorn_lambda": losses.WKD_SINKHORN_LAMBDA,  # WKD.SINKHORN.LAMBDA
        "sinkhorn_iters": losses.WKD_SINKHORN_ITERS,  # WKD.SINKHORN.ITER
        "eps": 1e-5,  # WKD.EPS
        "hint_layer": -1,  # WKD.HINT_LAYER (cfg.py: 4), an index into feats
        "mean_cov_ratio": mean_cov_ratio,  # WKD.MEAN_COV_RATIO
        "projector": "conv1x1",  # WKD.PROJECTOR (cfg.py: "bottleneck")
        "spatial_grid": 1,  # WKD.SPATIAL_GRID (cfg.py: 4)
    }


def knobs_l() -> dict:
    return _knobs(600.0, 0.0, 8.0)  # configs/cifar100/wkd_l/res32x4_res8x4.yaml


def knobs_f() -> dict:
    return _knobs(0.0, 0.08, 4.0)  # configs/cifar100/wkd_f/res32x4_res8x4.yaml


def knobs_lf() -> dict:
    return _knobs(200.0, 0.08, 8.0)  # configs/cifar100/wkd_lf/res32x4_res8x4.yaml


class BottleneckProjector(nn.Module):
    """The authors' ConvRegBottleNeck for maps of equal size: 1x1, 3x3, 1x1, BN, ReLU."""

    in_channels: int
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        hidden = _BOTTLENECK_WIDTH
        for name, (features, kernel, fan_in) in {
            "conv1": (hidden, 1, self.in_channels),
            "conv2": (hidden, 3, 9 * hidden),
            "conv3": (self.out_channels, 1, hidden),
        }.items():
            pad = kernel // 2
            x = nn.Conv(
                features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(fan_in), name=name,
            )(x)  # fmt: skip
        return nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))


def decay_factor(step: jax.Array, steps_per_epoch: int, start: int, end: int) -> jax.Array:
    """d(t): 1 up to epoch `start`, then a cosine to 0 at epoch `end` (epochs from 1)."""
    epoch = (jnp.floor_divide(step, steps_per_epoch) + 1).astype(jnp.float32)
    cosine = 0.5 * (1.0 + jnp.cos((epoch - start) / (end - start) * math.pi))
    return jnp.where(epoch > start, cosine, 1.0)


def _classifier_kernel(teacher_params: Any) -> Any:
    """The teacher's (features, classes) classifier kernel, the one matrix of its head."""
    kernels = [x for x in jax.tree.leaves(teacher_params["head"]) if len(x.shape) == 2]
    if len(kernels) != 1:
        raise ValueError("wkd: the teacher's head must hold exactly one classifier kernel")
    return kernels[0]


def _cost_source(name: str, cost_matrix: str, sharpen: float, num_classes: int):
    """`teacher_vars -> (classes, classes) cost` for the knob `cost_matrix`."""
    if cost_matrix == "fc":
        return lambda teacher_vars: losses.wkd_cost_from_prototypes(
            _classifier_kernel(teacher_vars["params"]).T, sharpen
        )
    try:
        cost = np.load(cost_matrix)
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}.cost_matrix: cannot read {cost_matrix!r}: {error}") from None
    if cost.shape != (num_classes, num_classes):
        raise ValueError(
            f"{name}.cost_matrix: {cost_matrix!r} holds {cost.shape}, the classes need "
            f"({num_classes}, {num_classes})"
        )
    if sharpen != 0:  # WKD.py sharpens a loaded cost as well
        cost = 1.0 - np.exp(-sharpen * cost)
    cost = jnp.asarray(cost, jnp.float32)
    return lambda teacher_vars: cost


# The knobs of wkd_l that Block-KD's distance "wkd_l" reads from its section.
DISTANCE_KNOBS = (
    "logit_weight",
    "cost_matrix",
    "cost_sharpen",
    "sinkhorn_lambda",
    "sinkhorn_iters",
)


def stone_distance(
    knobs: Mapping[str, Any], pair
) -> tuple[dict[str, Any], Callable[[Any], dict[str, jax.Array]]]:
    """Block-KD's distance "wkd_l": the knobs of the loss, and `teacher_vars -> {"cost"}`.

    `knobs` is Block-KD's section `wkd_l` (`DISTANCE_KNOBS`); the cost comes from the
    teacher's classifier ("fc") or a file, as for the method.
    """
    kernel = _classifier_kernel(teacher_param_shapes(pair.teacher, pair.input_shape))
    cost = _cost_source(
        "blockkd.wkd_l", knobs["cost_matrix"], knobs["cost_sharpen"], kernel.shape[1]
    )
    own = {name: knobs[name] for name in ("logit_weight", "sinkhorn_lambda", "sinkhorn_iters")}
    return own, lambda teacher_vars: {"cost": cost(teacher_vars)}


def _projector(name: str, k: Mapping[str, Any], s_shape, t_shape, dtype) -> nn.Module:
    """The projector from a student map of `s_shape` to a teacher map of `t_shape`."""
    if k["projector"] == "bottleneck":
        return BottleneckProjector(s_shape[-1], t_shape[-1], dtype)
    return HintRegressor(s_shape, t_shape, dtype)


def _map_sizes(k: Mapping[str, Any], s_shape, t_shape) -> tuple[tuple, tuple]:
    """(H, W) the student's and the teacher's hint maps are compared at.

    The authors' projectors where they apply (conv1x1: mdistiller's ConvReg sizes; the
    bottleneck: equal sizes); elsewhere the larger map is average-pooled to the smaller
    one's size first, as for AT, so that every pair trains (the authors' code fails there).
    """
    s_hw, t_hw = tuple(s_shape[:2]), tuple(t_shape[:2])
    if k["projector"] == "conv1x1" and regressor_output(s_shape, t_shape) == t_hw:
        return s_hw, t_hw
    if s_hw == t_hw:
        return s_hw, t_hw
    smaller = min(s_hw, t_hw, key=lambda hw: hw[0] * hw[1])
    return smaller, smaller


def _builder(name: str):
    def build(k, pair) -> Recipe:
        check_knobs(
            name, k,
            nonnegative=("ce_weight", "logit_weight", "feat_weight", "mean_cov_ratio"),
            positive=("temperature", "sinkhorn_lambda", "eps"),
        )  # fmt: skip
        check_int(name, "sinkhorn_iters", k["sinkhorn_iters"], 1)
        check_int(name, "spatial_grid", k["spatial_grid"], 1)
        start, end = k["decay_epochs"]
        if not 0 <= start < end:
            raise ValueError(f"{name}.decay_epochs must be (start, end), 0 <= start < end")
        s_feats = feats(tap_shapes(pair.student, pair.input_shape))
        t_feats = feats(tap_shapes(pair.teacher, pair.input_shape))
        depth = min(len(s_feats), len(t_feats))
        hint = check_int(name, "hint_layer", k["hint_layer"], -depth, depth - 1)
        s_shape, t_shape = s_feats[hint], t_feats[hint]
        use_l, use_f = k["logit_weight"] > 0, k["feat_weight"] > 0
        teacher_shapes = teacher_param_shapes(pair.teacher, pair.input_shape)
        num_classes = _classifier_kernel(teacher_shapes).shape[1]
        cost = _cost_source(name, k["cost_matrix"], k["cost_sharpen"], num_classes)
        if k["projector"] not in PROJECTORS:
            raise ValueError(
                f"{name}.projector must be one of {PROJECTORS}, got {k['projector']!r}"
            )
        s_hw, t_hw = _map_sizes(k, s_shape, t_shape)
        s_in = (*s_hw, s_shape[-1])

        def student_map(taps):
            x = feats(taps)[hint]
            return (x if s_hw == s_shape[:2] else pool_to(x, s_hw),)

        projector = _projector(name, k, s_in, (*t_hw, t_shape[-1]), pair.dtype)
        heads = Heads(
            "wkd", (projector,) if use_f else (), student_map if use_f else lambda taps: (),
            (s_in,) if use_f else (),
            teacher_extras=(lambda tv: {"wkd_cost": cost(tv)}) if use_l else None,
        )  # fmt: skip

        def teacher_map(taps):
            x = feats(taps)[hint]
            return x if t_hw == t_shape[:2] else pool_to(x, t_hw)

        def objective(out: Forward, batch: Mapping[str, jax.Array], d: jax.Array) -> Loss:
            labels = batch["label"]
            ce = losses.cross_entropy(out.student_logits, labels)
            metrics = {"ce": ce, "decay": d}
            distill = jnp.zeros((), jnp.float32)
            if use_l:
                wkd_l = losses.wkd_logit_loss(
                    out.student_logits, out.teacher_logits, labels, out.extras["wkd_cost"],
                    temperature=k["temperature"], weight=d * k["logit_weight"],
                    sinkhorn_lambda=k["sinkhorn_lambda"], sinkhorn_iters=k["sinkhorn_iters"],
                )  # fmt: skip
                metrics["wkd_l"] = wkd_l
                distill += wkd_l
            if use_f:
                wkd_f = losses.wkd_feature_loss(
                    out.extras["wkd"][0], teacher_map(out.teacher_taps),
                    mean_cov_ratio=k["mean_cov_ratio"], grid=k["spatial_grid"], eps=k["eps"],
                )  # fmt: skip
                metrics["wkd_f"] = wkd_f
                distill += d * k["feat_weight"] * wkd_f
            return Loss(k["ce_weight"] * ce, distill, metrics)

        def schedule(step: jax.Array, steps_per_epoch: int) -> jax.Array:
            return decay_factor(step, steps_per_epoch, start, end)

        return Recipe(objective, heads, taps=True, schedule=schedule)

    return build


METHOD_L = Method(
    "wkd_l", "WKD-L: Sinkhorn Wasserstein distance of predictions, teacher cost", knobs_l,
    _builder("wkd_l"), consumes=("logits", "taps"), distance_knobs=DISTANCE_KNOBS,
)  # fmt: skip
METHOD_F = Method(
    "wkd_f", "WKD-F: Gaussian Wasserstein distance of projected features", knobs_f,
    _builder("wkd_f"), consumes=("logits", "taps"),
)  # fmt: skip
METHOD = Method(
    "wkd", "WKD-L + WKD-F (Wasserstein KD of logits and features)", knobs_lf, _builder("wkd"),
    consumes=("logits", "taps"),
)  # fmt: skip
