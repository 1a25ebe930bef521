"""What the feature-based baselines share: their objective, stage selection and heads.

Every feature method of mdistiller (megvii-research/mdistiller, `distillers/*.py`) has the
same objective shape, ce_weight * CE(z_s, y) + feat_weight * L_feat, without warm-up, and
reads mdistiller's `feats` list, which is `[stem, *blocks]` of `bkd_jax.blocknet.Taps`.
When the two networks have different numbers of stages, mdistiller pairs the first ones
(`zip` in AT, NST, KD-SVD, VID) or the last ones (OFD's `_align_list`): `first_stages` and
`last_stages`. Methods with trainable modules on the student's taps (FitNet's hint
regressor, VID's regressors, OFD's connectors) describe them as `Heads`, which initialises
them and runs them in the distiller's forward pass, their outputs in `Forward.extras`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax import losses, shapes
from bkd_jax.blocknet import BlockNet, Taps
from bkd_jax.distillers.base import Forward, Loss, Method, Objective, Pair, Recipe
from bkd_jax.losses.feature import adaptive_avg_pool
from bkd_jax.parts import Parts, Variables

# PyTorch's default initialisation of `nn.Conv2d` (kaiming_uniform with a = sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); mdistiller leaves FitNet's and VID's modules at it.
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# The same for `nn.ConvTranspose2d`, whose fan-in PyTorch takes over the output channels.
torch_default_transpose_init = nn.initializers.variance_scaling(
    1 / 3, "fan_in", "uniform", in_axis=-1, out_axis=-2
)


def torch_default_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def feats(taps: Taps) -> tuple[Any, ...]:
    """mdistiller's `feats`: the stem, then every native block's output."""
    return (taps.stem, *taps.blocks)


def tap_shapes(net: BlockNet, input_shape: Sequence[int]) -> Taps:
    """Per-example shapes of `net`'s taps for NHWC `input_shape`, as `Taps` of tuples.

    Traced once per network and input shape (`bkd_jax.shapes`): builds repeat it.
    """
    return jax.tree.map(lambda a: tuple(a.shape[1:]), shapes.tap_structs(net, input_shape))


def teacher_param_shapes(net: BlockNet, input_shape: Sequence[int]) -> Any:
    """The shapes of `net`'s parameters (`ShapeDtypeStruct`s), without computing them.

    Traced once per network and input shape (`bkd_jax.shapes`): builds repeat it.
    """
    return shapes.variable_shapes(net, input_shape)["params"]


def first_stages(student: Sequence[Any], teacher: Sequence[Any]) -> tuple[tuple, tuple]:
    """The first min(n_s, n_t) stages of each (mdistiller's `zip`)."""
    n = min(len(student), len(teacher))
    return tuple(student[:n]), tuple(teacher[:n])


def last_stages(student: Sequence[Any], teacher: Sequence[Any]) -> tuple[tuple, tuple]:
    """The last min(n_s, n_t) stages of each (mdistiller OFD.py `_align_list`)."""
    n = min(len(student), len(teacher))
    return tuple(student[len(student) - n :]), tuple(teacher[len(teacher) - n :])


def pool_to(x: jax.Array, hw: Sequence[int]) -> jax.Array:
    """`x` (NHWC) average-pooled to spatial size `hw` with PyTorch's adaptive windows."""
    return adaptive_avg_pool(x, tuple(hw))


def check_knobs(
    method: str,
    k: Mapping[str, Any],
    *,
    nonnegative: Sequence[str] = ("ce_weight", "feat_weight"),
    positive: Sequence[str] = (),
) -> None:
    """Raises ValueError naming the first knob that is not a finite number in range."""
    for name, low_ok in [(n, True) for n in nonnegative] + [(n, False) for n in positive]:
        value = k[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0 or (value == 0 and not low_ok):
            bound = ">= 0" if low_ok else "> 0"
            raise ValueError(
                f"config.distill.{method}.{name}={value!r} must be a finite number {bound}"
            )


def check_int(method: str, name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; a ValueError naming the knob otherwise."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"config.distill.{method}.{name}={value!r} must be an integer {span}")
    return value


def feature_objective(
    name: str, k: Mapping[str, Any], feature: Callable[[Forward], jax.Array]
) -> Objective:
    """ce_weight * CE + feat_weight * feature(out); metric `name` is the unweighted term."""

    def objective(out: Forward, batch: Mapping[str, jax.Array], warmup: jax.Array) -> Loss:
        del warmup  # mdistiller's feature methods have no warm-up
        ce = losses.cross_entropy(out.student_logits, batch["label"])
        feat = feature(out)
        return Loss(k["ce_weight"] * ce, k["feat_weight"] * feat, {"ce": ce, name: feat})

    return objective


def feature_method(
    name: str,
    summary: str,
    knobs: Callable[[], dict],
    build: Callable[[Mapping[str, Any], Pair], Recipe],
) -> Method:
    """A feature method: needs a teacher, consumes logits and taps."""
    return Method(name, summary, knobs, build, consumes=("logits", "taps"))


@dataclasses.dataclass(frozen=True)
class Heads:
    """Trainable Flax modules, one per selected student tap, as a method's `Modules`.

    Module i is part `{name}{i}` of the variables (`bkd_jax.parts.Parts`) and reads
    `inputs(student_taps)[i]` (per-example shape `in_shapes[i]`); the tuple of their
    outputs is `out.extras[name]`. `teacher_extras`, if given, adds what the objective
    needs from the teacher's variables (OFD's margins) to the extras.
    """

    name: str
    modules: tuple[nn.Module, ...]
    inputs: Callable[[Taps], Sequence[jax.Array]]
    in_shapes: tuple[tuple[int, ...], ...]
    teacher_extras: Callable[[Variables], Mapping[str, Any]] | None = None

    @property
    def parts(self) -> Parts:
        return Parts(tuple(f"{self.name}{i}" for i in range(len(self.modules))), self.modules)

    def init(self, key: jax.Array) -> dict[str, Any]:
        parts = self.parts
        examples = [jnp.zeros((1, *shape), jnp.float32) for shape in self.in_shapes]
        return parts.init(key, dict(zip(parts.names, examples, strict=True)))

    def apply(self, variables, out, batch, teacher_vars, *, train: bool):
        del batch
        outputs = []
        parts = self.parts
        for name, x in zip(parts.names, self.inputs(out.student_taps), strict=True):
            y, variables = parts.apply(variables, name, x, train=train)
            outputs.append(y)
        extras = {**out.extras, self.name: tuple(outputs)}
        if self.teacher_extras is not None:
            extras.update(self.teacher_extras(teacher_vars))
        return out._replace(extras=extras), variables
