"""The distillation methods, behind a registry: one module per method, each a `Method`.

    distillers.available()           # ['ce', 'kd', 'dkd', ..., 'blockkd', 'blockkd_lite']
    distillers.get("dkd").knobs()    # its knobs and their defaults
    distillers.register(Method(...)) # a method of your own (README, "Adding a distiller")

A config selects a method with `config.distill.method` and sets its knobs in the section
of the same name, `config.distill.<method>` (`default_config` builds both); a section of
another method is an error, so no knob is ever shared by mistake. `make_distiller` checks
the knobs against the method's defaults and builds the `Distiller` the trainer runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections

from bkd_jax.blocknet import BlockNet, TextBlockNet
from bkd_jax.distillers.base import (
    TENSORS,
    Distiller,
    Forward,
    Loss,
    Method,
    Modules,
    Pair,
    Recipe,
    warmup_factor,
)

__all__ = [
    "TENSORS",
    "Distiller",
    "Forward",
    "Loss",
    "Method",
    "Modules",
    "Pair",
    "Recipe",
    "available",
    "default_config",
    "get",
    "make_distiller",
    "register",
    "warmup_factor",
]

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds `method` to the registry under `method.name`; returns it."""
    if method.name in _REGISTRY:
        raise ValueError(f"a distillation method named {method.name!r} is already registered")
    unknown = set(method.consumes) - set(TENSORS)
    if unknown:
        raise ValueError(f"method {method.name!r} consumes unknown tensors {sorted(unknown)}")
    _REGISTRY[method.name] = method
    return method


def available() -> list[str]:
    """Names of the registered methods, in registration order (baselines first)."""
    return list(_REGISTRY)


def get(name: str) -> Method:
    """The registered method `name`; a ValueError listing the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown distillation method {name!r}; known: {', '.join(available())}")
    return _REGISTRY[name]


def default_config(method: str) -> ml_collections.ConfigDict:
    """`config.distill` for `method`: its name and its knobs' defaults."""
    return ml_collections.ConfigDict({"method": method, method: get(method).knobs()})


def method_knobs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of `cfg.method` from a `config.distill`, checked against its defaults.

    A missing section means the defaults; a section of another method, or a knob the
    method does not have, is a ValueError naming it.
    """
    method = get(cfg["method"])
    others = sorted(k for k in cfg if k not in ("method", method.name))
    if others:
        raise ValueError(
            f"config.distill has knobs of {', '.join(others)}, but the method is "
            f"{method.name!r}: set them in config.distill.{method.name} or choose that method"
        )
    defaults = method.knobs()
    given = dict(cfg.get(method.name) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"config.distill.{method.name} has no knob {', '.join(unknown)}; "
            f"its knobs: {', '.join(defaults)}"
        )
    return {**defaults, **given}


def _check_text_pair(
    method: Method, knobs: Mapping[str, Any], student: BlockNet, teacher: BlockNet | None
) -> None:
    """Refuses, in words, methods that read feature maps or an image's second, strongly
    augmented view (MLKD's RandAugment) when a network is a text network."""
    text = [net.name for net in (student, teacher) if isinstance(net, TextBlockNet)]
    if text and "strong_view" in method.consumes:
        raise ValueError(
            f"method {method.name!r} trains on a RandAugment view of every image, which text "
            f"networks ({', '.join(text)}) have no counterpart of"
        )
    feature = "taps" in method.consumes or knobs.get("feature_method")
    if text and feature:
        raise ValueError(
            f"method {method.name!r} reads feature maps, which text networks "
            f"({', '.join(text)}) do not have; logit methods (ce, kd, dkd, dist, wttm, "
            "blockkd, blockkd_lite) work on text"
        )


def make_distiller(
    cfg: Mapping[str, Any],
    student: BlockNet,
    teacher: BlockNet | None,
    input_shape: Sequence[int],
    *,
    dtype: Any = jnp.float32,
    batch_stones: bool = True,
    remat_teacher: bool = False,
    num_examples: int | None = None,
) -> Distiller:
    """Builds the distiller of `cfg.method` with the knobs of `cfg` (a `config.distill`).

    `input_shape` (NHWC) sizes the method's modules and `dtype` is their compute dtype;
    `batch_stones` and `remat_teacher` are the cost options of Block-KD's stepping-stones;
    `num_examples` is the size of the training split, for methods that keep per-example
    state.
    """
    method = get(cfg["method"])
    knobs = method_knobs(cfg)
    if not method.needs_teacher:
        teacher = None
    elif teacher is None:
        raise ValueError(f"method {method.name!r} distils from a teacher, but none was given")
    _check_text_pair(method, knobs, student, teacher)
    pair = Pair(
        student, teacher, tuple(input_shape), dtype, batch_stones, remat_teacher, num_examples
    )
    recipe = method.build(knobs, pair)
    return Distiller(
        method.name, student, recipe.objective, teacher, recipe.modules,
        float(knobs.get("warmup_epochs", 0)), recipe.taps or "taps" in method.consumes,
        recipe.schedule,
    )  # fmt: skip


# The built-in methods. Block-KD comes last: its knobs list every registered distance.
from bkd_jax.distillers import (  # noqa: E402
    at,
    blockkd,
    ce,
    crd,
    dist,
    dkd,
    dot,
    fitnet,
    kd,
    kdsvd,
    mlkd,
    nst,
    ofd,
    pkt,
    reviewkd,
    rkd,
    sp,
    vid,
    wkd,
    wttm,
)

for _method in (
    ce.METHOD, kd.METHOD, dkd.METHOD, dot.METHOD, dist.METHOD, wttm.METHOD, mlkd.METHOD,
    fitnet.METHOD, at.METHOD, nst.METHOD, pkt.METHOD, kdsvd.METHOD, rkd.METHOD, sp.METHOD,
    vid.METHOD, ofd.METHOD, crd.METHOD, reviewkd.METHOD, wkd.METHOD_L, wkd.METHOD_F, wkd.METHOD,
    blockkd.BLOCKKD, blockkd.BLOCKKD_LITE,
):  # fmt: skip
    register(_method)
