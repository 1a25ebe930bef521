"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    L = ce_weight * CE(z_s, y) + feat_weight * MSE(r(F_s[h]), F_t[h])

at the hint layer h of mdistiller's `feats` (0 the stem, i the i-th native block; default
2, mdistiller engine/cfg.py CFG.FITNET.HINT_LAYER), r the trainable hint regressor of
mdistiller's `ConvReg` (distillers/_common.py): a convolution to the teacher's channels
and size, BatchNorm and ReLU. The convolution is chosen by the maps' heights, as there:
3x3 with stride 2 when the student's map is twice the teacher's, a 4x4 transposed
convolution with stride 2 when it is half, a valid convolution of kernel
1 + (student size - teacher size) when it is at least as large; any other pair of maps
is a ValueError at build time. PyTorch's default initialisation, as mdistiller leaves it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax import losses
from bkd_jax.distillers.base import Recipe
from bkd_jax.distillers.feature_modules import (
    Heads,
    check_int,
    check_knobs,
    feats,
    feature_method,
    feature_objective,
    tap_shapes,
    torch_default_bias_init,
    torch_default_kernel_init,
    torch_default_transpose_init,
)
from bkd_jax.models.layers import batch_norm


def knobs() -> dict:
    return {
        "hint_layer": 2,  # mdistiller engine/cfg.py CFG.FITNET.HINT_LAYER (index into feats)
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.FITNET.LOSS.CE_WEIGHT
        "feat_weight": 100.0,  # mdistiller engine/cfg.py CFG.FITNET.LOSS.FEAT_WEIGHT
    }


class HintRegressor(nn.Module):
    """mdistiller's ConvReg: convolution to `out_shape` (H, W, C), BatchNorm, ReLU."""

    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        (h, w, c), (th, tw, channels) = self.in_shape, self.out_shape
        if h == 2 * th:
            x = nn.Conv(
                channels, (3, 3), (2, 2), ((1, 1), (1, 1)), dtype=self.dtype,
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(9 * c), name="conv",
            )(x)  # fmt: skip
        elif 2 * h == th:
            # PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1): 4 - 1 - 1 = 2 here.
            x = nn.ConvTranspose(
                channels, (4, 4), (2, 2), ((2, 2), (2, 2)), dtype=self.dtype,
                kernel_init=torch_default_transpose_init,
                bias_init=torch_default_bias_init(16 * channels), name="conv",
            )(x)  # fmt: skip
        else:
            kernel = (1 + h - th, 1 + w - tw)
            x = nn.Conv(
                channels, kernel, padding="VALID", dtype=self.dtype,
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(kernel[0] * kernel[1] * c), name="conv",
            )(x)  # fmt: skip
        return nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))


def regressor_output(student: tuple[int, ...], teacher: tuple[int, ...]) -> tuple | None:
    """(H, W) the regressor makes of a student map for a teacher map; None if it has none."""
    (h, w, _), (th, tw, _) = student, teacher
    if h == 2 * th:
        return (h - 1) // 2 + 1, (w - 1) // 2 + 1
    if 2 * h == th:
        return 2 * h, 2 * w
    if h >= th and w >= tw:
        return th, tw
    return None


def build(k, pair) -> Recipe:
    check_knobs("fitnet", k)
    s_feats = feats(tap_shapes(pair.student, pair.input_shape))
    t_feats = feats(tap_shapes(pair.teacher, pair.input_shape))
    h = check_int("fitnet", "hint_layer", k["hint_layer"], 0, min(len(s_feats), len(t_feats)) - 1)
    s_shape, t_shape = s_feats[h], t_feats[h]
    if regressor_output(s_shape, t_shape) != t_shape[:2]:
        raise ValueError(
            f"fitnet: no hint regressor maps {pair.student.name}'s feats[{h}] {s_shape} to "
            f"{pair.teacher.name}'s feats[{h}] {t_shape} (H, W, C): the student's map must be "
            "twice, half or at least the teacher's size; choose another "
            "config.distill.fitnet.hint_layer"
        )
    heads = Heads(
        "hint", (HintRegressor(s_shape, t_shape, pair.dtype),),
        lambda taps: (feats(taps)[h],), (s_shape,),
    )  # fmt: skip

    def feature(out):
        return losses.fitnet_loss(out.extras["hint"][0], feats(out.teacher_taps)[h])

    return Recipe(feature_objective("fitnet", k, feature), heads, taps=True)


METHOD = feature_method(
    "fitnet", "FitNet: regress the teacher's hint-layer feature from the student's", knobs, build
)
