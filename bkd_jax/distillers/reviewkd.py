"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021).

    L = ce_weight * CE(z_s, y) + r(t) * feat_weight * HCL(fused student features, teacher's)

The student's stage outputs and its pooled feature (as a 1x1 map) are reviewed deepest
first by attention-based fusion (ABF) modules: each maps its level to `mid` channels (1x1
convolution, BN), fuses it with the previous level's residual (nearest-resized to this
level) through two sigmoid attention maps, resizes the result to the teacher's size at this
level and maps it to the teacher's channels (3x3 convolution, BN). The hierarchical context
loss (`bkd_jax.losses.hcl_loss`) compares each fused map with the teacher's pre-activation
stage output, and the pooled level with the teacher's pooled feature; r(t) is the warm-up
over `warmup_epochs`.

Shapes. mdistiller takes each level's sizes and channels from per-pair config lists
(engine/cfg.py REVIEWKD.SHAPES, OUT_SHAPES, IN_CHANNELS, OUT_CHANNELS); here they are read
from the two networks' taps, level by level, which gives the authors' lists for their
pairs (dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py). The networks need the same
number of stages; `mid` is min(max_mid_channel, the student's pooled channels). mdistiller
reads REVIEWKD.MAX_MID_CHANNEL but builds min(512, IN_CHANNELS[-1]), so the 256 of its
r50_mv1 recipe has no effect there; here the knob is honoured, as the authors' ImageNet
code (ImageNet/models/reviewkd.py, mid_channel 256 for MobileNet) intends.

Defaults are mdistiller's engine/cfg.py CFG.REVIEWKD; the recipes' weights per pair are in
configs/cifar100.py and configs/imagenet.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bkd_jax import losses, shapes
from bkd_jax.blocknet import Taps
from bkd_jax.distillers.base import Loss, Method, Pair, Recipe
from bkd_jax.distillers.crd import torch_uniform
from bkd_jax.models.layers import batch_norm

# ABF.__init__ in mdistiller/distillers/ReviewKD.py: kaiming_uniform_(a=1) on both
# convolutions, i.e. U(+-sqrt(3 / fan_in)); the attention convolution keeps PyTorch's
# default, U(+-1 / sqrt(fan_in)) for weights and bias.
_KAIMING_UNIFORM_A1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def knobs() -> dict:
    return {
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.REVIEWKD.CE_WEIGHT
        "feat_weight": 1.0,  # CFG.REVIEWKD.REVIEWKD_WEIGHT
        "warmup_epochs": 20,  # CFG.REVIEWKD.WARMUP_EPOCHS
        "stu_preact": False,  # CFG.REVIEWKD.STU_PREACT: student maps before their ReLU
        "max_mid_channel": 512,  # CFG.REVIEWKD.MAX_MID_CHANNEL
    }


def nearest_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """PyTorch's F.interpolate(mode="nearest") on NHWC: source index floor(i * in / out)."""
    if x.shape[1:3] == tuple(size):
        return x
    rows = [
        np.minimum(np.floor(np.arange(o) * (n / o)), n - 1).astype(np.int32)
        for n, o in zip(x.shape[1:3], size)
    ]
    return x[:, rows[0]][:, :, rows[1]]


class Level(NamedTuple):
    """One reviewed level: the student's map in, the teacher's map out (H, W, C each)."""

    student: tuple[int, int, int]
    teacher: tuple[int, int, int]


class ABF(nn.Module):
    """One attention-based fusion module; returns (output, residual for the next level)."""

    mid_channels: int
    level: Level
    fuse: bool  # every level but the pooled one fuses the residual of the level below
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual=None, train: bool = False):
        x = nn.Conv(
            self.mid_channels, (1, 1), use_bias=False, dtype=self.dtype,
            kernel_init=_KAIMING_UNIFORM_A1, name="conv1",
        )(x)  # fmt: skip
        x = batch_norm(train, dtype=self.dtype, name="bn1")(x)
        if self.fuse:
            y = nearest_resize(residual, x.shape[1:3])
            init = torch_uniform(2 * self.mid_channels)
            z = nn.Conv(
                2, (1, 1), dtype=self.dtype, kernel_init=init, bias_init=init, name="att_conv"
            )(jnp.concatenate([x, y], axis=-1))
            z = nn.sigmoid(z)
            x = x * z[..., :1] + y * z[..., 1:]
        x = nearest_resize(x, self.level.teacher[:2])
        y = nn.Conv(
            self.level.teacher[2], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
            dtype=self.dtype, kernel_init=_KAIMING_UNIFORM_A1, name="conv2",
        )(x)  # fmt: skip
        return batch_norm(train, dtype=self.dtype, name="bn2")(y), x


class Review(nn.Module):
    """The ABFs of every level, applied deepest (the pooled feature) first.

    Takes and returns the levels shallowest first: the student's stage maps then its
    pooled feature as a 1x1 map in, maps of the teacher's shapes out.
    """

    levels: tuple[Level, ...]
    mid_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool = False) -> tuple[jax.Array, ...]:
        n = len(self.levels)
        outputs, residual = [], None
        for i in reversed(range(n)):
            abf = ABF(self.mid_channels, self.levels[i], i < n - 1, self.dtype, name=f"abf{i + 1}")
            out, residual = abf(feats[i], residual, train=train)
            outputs.insert(0, out)
        return tuple(outputs)


def _as_map(pooled: jax.Array) -> jax.Array:
    return pooled.reshape(pooled.shape[0], 1, 1, -1)


def student_levels(taps: Taps, stu_preact: bool) -> tuple[jax.Array, ...]:
    """What the ABFs review: the student's stage outputs (or pre-activations), pooled last."""
    return (*(taps.preact if stu_preact else taps.blocks), _as_map(taps.pooled))


def teacher_levels(taps: Taps) -> tuple[jax.Array, ...]:
    """What the fused maps are compared with: the teacher's pre-activations, pooled last."""
    return (*taps.preact, _as_map(taps.pooled))


def _level_shapes(net, input_shape: Sequence[int], levels) -> list[tuple[int, ...]]:
    """(H, W, C) of `levels(taps)` of `net` on inputs of NHWC `input_shape`.

    The taps' shapes are traced once per network and input shape (`bkd_jax.shapes`).
    """
    maps = jax.eval_shape(levels, shapes.tap_structs(net, input_shape))
    return [tuple(m.shape[1:]) for m in maps]


def review_levels(
    student, teacher, input_shape: Sequence[int], stu_preact: bool = False
) -> tuple[Level, ...]:
    """The levels of a pair, shallowest first, read from both networks' taps.

    Raises:
      ValueError: when the networks have different numbers of stages (naming them).
    """
    s = _level_shapes(student, input_shape, lambda taps: student_levels(taps, stu_preact))
    t = _level_shapes(teacher, input_shape, teacher_levels)
    if len(s) != len(t):
        raise ValueError(
            f"reviewkd pairs each student stage with the teacher's at the same depth, but "
            f"{student.name} has {len(s) - 1} stages {s[:-1]} and {teacher.name} has "
            f"{len(t) - 1} stages {t[:-1]} (NHWC, batch left out)"
        )
    return tuple(Level(a, b) for a, b in zip(s, t))


@dataclasses.dataclass(frozen=True)
class ReviewModules:
    """The review of the student's features; trained by the HCL loss only."""

    review: Review
    student_shapes: tuple[tuple[int, int, int], ...]
    stu_preact: bool

    def init(self, key: jax.Array) -> dict[str, Any]:
        feats = [jnp.zeros((1, *shape), jnp.float32) for shape in self.student_shapes]
        return self.review.init(key, feats, train=False)

    def apply(self, variables, out, batch, teacher_vars, *, train: bool):
        del batch, teacher_vars
        if not train:  # the review only serves the training loss
            return out, variables
        fused, updates = self.review.apply(
            variables, student_levels(out.student_taps, self.stu_preact), train=True,
            mutable=["batch_stats"],
        )  # fmt: skip
        extras = {"fused": fused, "teacher_feats": teacher_levels(out.teacher_taps)}
        return out._replace(extras=extras), {**variables, **updates}


def build(k, pair: Pair) -> Recipe:
    levels = review_levels(pair.student, pair.teacher, pair.input_shape, k["stu_preact"])
    mid = min(int(k["max_mid_channel"]), levels[-1].student[2])
    modules = ReviewModules(
        Review(levels, mid, pair.dtype), tuple(lv.student for lv in levels), k["stu_preact"]
    )

    def objective(out, batch, warmup) -> Loss:
        ce = losses.cross_entropy(out.student_logits, batch["label"])
        hcl = losses.hcl_loss(out.extras["fused"], out.extras["teacher_feats"])
        distill = warmup * k["feat_weight"] * hcl
        return Loss(k["ce_weight"] * ce, distill, {"ce": ce, "hcl": hcl, "warmup": warmup})

    return Recipe(objective, modules, taps=True)


METHOD = Method(
    name="reviewkd",
    summary="ReviewKD: attention-fused student stages against the teacher's, HCL loss",
    knobs=knobs,
    build=build,
    consumes=("logits", "taps"),
)
