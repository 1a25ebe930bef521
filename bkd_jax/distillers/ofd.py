"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019).

    L = ce_weight * CE(z_s, y) + feat_weight * sum_i ofd_loss(C_i(P_s_i), P_t_i, m_i) / 2^(n-1-i)

on the pre-activations of the native blocks (mdistiller's `preact_feats[1:]`;
mdistiller/distillers/OFD.py), the deepest stage weighted 1. With unequal stage counts
the last stages are paired (OFD.py `_align_list`). Connector C_i is a trainable
convolution (kernel `connector_kernel_size`, no bias, He fan-out normal initialisation)
and BatchNorm from the student's channels to the teacher's; the teacher's map is
average-pooled to the student's size (`bkd_jax.losses.ofd_loss`). The margin m_i is
computed from the teacher's BatchNorm before stage i's final ReLU
(`bkd_jax.losses.ofd_margin`), read from the teacher's variables in every forward pass;
which BatchNorm that is, per architecture, is mdistiller's `get_bn_before_relu` of its
models (`_margin_bn`). mdistiller has none for ShuffleNets, so a ShuffleNet teacher is a
ValueError at build time.

Two differences from mdistiller: its margins are the teacher's stages from the first,
not aligned with the paired (last) stages, which only matters for a teacher with more
stages than its student; and its `OFD.train` puts the teacher in training mode (batch
statistics, running averages updated), where the teacher here stays in inference mode,
as for every method.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax import losses
from bkd_jax.blocknet import BlockNet
from bkd_jax.distillers.base import Recipe
from bkd_jax.distillers.feature_modules import (
    Heads,
    check_int,
    check_knobs,
    feature_method,
    feature_objective,
    last_stages,
    tap_shapes,
    teacher_param_shapes,
)
from bkd_jax.models.layers import batch_norm, conv


def knobs() -> dict:
    return {
        "connector_kernel_size": 1,  # mdistiller engine/cfg.py CFG.OFD.CONNECTOR.KERNEL_SIZE
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.OFD.LOSS.CE_WEIGHT
        "feat_weight": 0.001,  # mdistiller engine/cfg.py CFG.OFD.LOSS.FEAT_WEIGHT
    }


class Connector(nn.Module):
    """OFD.py's ConnectorConvBN for one stage: convolution and BatchNorm."""

    channels: int
    kernel: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pad = (self.kernel - 1) // 2
        x = conv(self.channels, self.kernel, padding=pad, dtype=self.dtype, name="conv")(x)
        return batch_norm(train, dtype=self.dtype, name="bn")(x)


def _last(tree: Mapping[str, Any], pattern: str) -> str:
    """The key of `tree` matching `pattern` whose numbers are largest (the last unit)."""
    keys = [key for key in tree if re.fullmatch(pattern, key)]
    return max(keys, key=lambda key: tuple(map(int, re.findall(r"\d+", key))))


def _bn(tree: Mapping[str, Any]) -> bool:
    return isinstance(tree, Mapping) and "scale" in tree


# Per architecture: (params, native block j (1-based), its part) -> the BatchNorm's params,
# following mdistiller's `get_bn_before_relu`.
def _resnet(params, j: int, part: str):
    # cifar/resnet.py, resnetv2.py, imagenet/resnet.py: the last unit's bn2 (bn3 in a
    # bottleneck), before the residual sum.
    unit = params[part][_last(params[part], r"layer\d+_\d+")]
    return unit["bn3"] if "bn3" in unit else unit["bn2"]


def _wrn(params, j: int, part: str):
    # cifar/wrn.py: block{j+1}.layer[0].bn1, the final bn1 after the last block.
    following = f"block{j + 1}"
    if following in params:
        return params[following][following]["layer_0"]["bn1"]
    return params["head"]["bn1"]


def _last_bn(params, j: int, part: str):
    # cifar/vgg.py (blockK[-1]), imagenet/mobilenetv1.py (model[i][-2]): the part's last
    # BatchNorm.
    bns = {key: tree for key, tree in params[part].items() if _bn(tree)}
    return bns[_last(bns, r"\D+\d+_\d+")]


def _mobilenetv2(params, j: int, part: str):
    # cifar/mobilenetv2.py: blocks[g][-1].conv[-1], the last unit's pointwise-linear BN.
    return params[part][_last(params[part], r"blocks_\d+_\d+")]["conv_7"]


_MARGIN_BN: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("resnet", _resnet),
    ("imagenet_resnet", _resnet),
    ("wrn_", _wrn),
    ("vgg", _last_bn),
    ("imagenet_mobilenetv1", _last_bn),
    ("mobilenetv2", _mobilenetv2),
)


def _margin_bn(teacher: BlockNet, num_stages: int) -> Callable[[Any], list[Any]]:
    """`params -> [BatchNorm params of each native block]` for `teacher`'s architecture."""
    rule = next((r for prefix, r in _MARGIN_BN if teacher.name.startswith(prefix)), None)
    if rule is None:
        raise ValueError(
            f"ofd: no margins for a {teacher.name} teacher: mdistiller defines the BatchNorm "
            "before each stage's ReLU (get_bn_before_relu) for ResNets, WRNs, VGGs and "
            "MobileNets only"
        )
    offset = teacher.num_blocks - num_stages  # VGG's block 1 is the stem
    return lambda params: [
        rule(params, j, BlockNet.part_name(j + offset)) for j in range(1, num_stages + 1)
    ]


def build(k, pair) -> Recipe:
    check_knobs("ofd", k)
    kernel = check_int("ofd", "connector_kernel_size", k["connector_kernel_size"], 1)
    if kernel % 2 == 0:
        raise ValueError(f"config.distill.ofd.connector_kernel_size={kernel} must be odd")
    s_all = tap_shapes(pair.student, pair.input_shape).preact
    t_all = tap_shapes(pair.teacher, pair.input_shape).preact
    s_pre, t_pre = last_stages(s_all, t_all)
    n, skip_s, skip_t = len(s_pre), len(s_all) - len(s_pre), len(t_all) - len(t_pre)
    bns = _margin_bn(pair.teacher, len(t_all))
    param_shapes = teacher_param_shapes(pair.teacher, pair.input_shape)
    for j, (bn, shape) in enumerate(zip(bns(param_shapes), t_all), 1):
        if bn["scale"].shape != shape[-1:]:
            raise ValueError(
                f"ofd: {pair.teacher.name}'s BatchNorm before block {j}'s ReLU has "
                f"{bn['scale'].shape} channels, its pre-activation {shape}"
            )
    connectors = tuple(Connector(t[-1], kernel, pair.dtype) for t in t_pre)

    def margins(teacher_vars):
        chosen = bns(teacher_vars["params"])[skip_t:]
        return {"ofd_margins": tuple(losses.ofd_margin(b["scale"], b["bias"]) for b in chosen)}

    heads = Heads("ofd", connectors, lambda taps: taps.preact[skip_s:], s_pre, margins)

    def feature(out):
        stages = zip(out.extras["ofd"], out.teacher_taps.preact[skip_t:], out.extras["ofd_margins"])
        return sum(
            losses.ofd_loss(s, t, m) / 2 ** (n - 1 - i) for i, (s, t, m) in enumerate(stages)
        )

    return Recipe(feature_objective("ofd", k, feature), heads, taps=True)


METHOD = feature_method(
    "ofd", "OFD: partial L2 of connected pre-ReLU features with the teacher's margins",
    knobs, build,
)  # fmt: skip
