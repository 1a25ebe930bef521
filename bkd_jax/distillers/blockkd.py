"""Block-KD: Yu et al., "Decoupling Dark Knowledge via Block-wise Logit Distillation for
Feature-level Alignment" (IEEE TAI 2024), and its lightweight variant.

Stepping-stone N_i runs the student's first i blocks, a connector C_i and the teacher's
remaining blocks and head; the objective (docs/method.md, section 1;
`bkd_jax.losses.blockkd_loss`) distils every stone and the student towards the teacher and
towards the stones' ensemble:

    L = alpha L_task + r(t) (beta L_distill + gamma L_cross)

with D, the logit distance inside L_distill and L_cross, any registered distance
(`distance`: "kd", "dkd", "dist", "wttm", "wkd_l", "mlkd"; its own knobs in the section of
that name, e.g. `config.distill.blockkd.dkd.beta`; only the chosen distance's section is
read, so a recipe may set per-pair values for every distance), on standardised logits with
`standardize`. "wkd_l" (WKD-L, its ground cost from the teacher's classifier or a file,
`bkd_jax.distillers.wkd.stone_distance`) and "mlkd" (MLKD's instance, class and batch
terms of the one view the stones see) are this project's extension: the paper has neither.

A feature loss can join the objective (`feature_method`: any registered method that
consumes feature taps, e.g. "at"): its distillation term, with that method's default knobs
and modules, times `feature_weight`, is added to L, so that the implicit alignment of the
stepping-stones can be compared with, or combined with, an explicit one.

Connectors (`bkd_jax.connectors`) follow from the pair: 1x1 convolutions between feature
maps, Dense layers and LayerNorm into a ViT's tokens (`connector` chooses how a CNN's map
becomes tokens), a ViT's patch grid into a CNN's map.

The paper's code is not public; the defaults are ours and docs/method.md gives the
reasons: alpha = beta = gamma = 1, tau = 4 and a 20-epoch warm-up on CIFAR-100 (tau 1 and
1 epoch on ImageNet, set by configs/imagenet.py), all stones 1..n (`blockkd`) or the two
deepest (`blockkd_lite`; `gamma = 0` also drops L_cross). The defaults of a distance's
knobs are those of the method of that name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from ml_collections import config_dict

from bkd_jax import distillers, losses
from bkd_jax.blockwise import stone_logits
from bkd_jax.connectors import Connectors, make_connectors
from bkd_jax.distillers import wkd
from bkd_jax.distillers.base import CombinedModules, Loss, Method, Pair, Recipe

# Distances with inputs from the teacher's variables: name -> `(section, pair) -> (knobs,
# teacher_vars -> further knobs)`.
_TEACHER_INPUTS = {"wkd_l": wkd.stone_distance}
# Where the stones' module puts those further knobs, in `Forward.extras`.
_DISTANCE_INPUTS = "distance_inputs"


def distance_sections() -> dict[str, dict[str, Any]]:
    """Default knobs of every registered distance that has knobs, by distance name."""
    sections = {}
    for name in losses.DISTANCES:
        method = distillers.get(name)
        if method.distance_knobs:
            defaults = method.knobs()
            sections[name] = {k: defaults[k] for k in method.distance_knobs}
    return sections


def knobs() -> dict:
    return {
        "alpha": 1.0,  # weight of L_task (docs/method.md)
        "beta": 1.0,  # weight of L_distill
        "gamma": 1.0,  # weight of L_cross; 0 drops it
        "temperature": 4.0,  # tau of the distance; mdistiller's CIFAR-100 KD/DKD tau
        "warmup_epochs": 20,  # r(t), as DKD's CIFAR-100 recipe (mdistiller CFG.DKD.WARMUP)
        "distance": "kd",  # D: a name in bkd_jax.losses.DISTANCES
        "standardize": False,  # z-score logits before D (Sun et al., CVPR 2024)
        "stones": (),  # stepping-stones used; () = all 1..n (blockkd) or {n-1, n} (lite)
        "grouping": config_dict.placeholder(
            tuple
        ),  # ((student cuts), (teacher cuts)) for pairs of unequal depth
        "upsampling": "nearest",  # connectors' upsampling: nearest | bilinear
        # How a feature map becomes a ViT teacher's tokens (bkd_jax.connectors): auto
        # (= patchify, space-to-depth keeps every activation; ours) | patchify | pool.
        "connector": "auto",
        "feature_method": "",  # a feature method whose distillation term joins L; "" none
        "feature_weight": 1.0,  # its weight, over the method's own feature weight
        **distance_sections(),
    }


@dataclasses.dataclass(frozen=True)
class SteppingStones:
    """The connectors C_i of the chosen stones, run on the student's block outputs."""

    connectors: Connectors
    stones: tuple[int, ...]
    teacher: Any
    batch_stones: bool
    remat_teacher: bool
    # The distance's knobs that come from the teacher's variables (WKD-L's cost), or None.
    teacher_inputs: Callable[[Any], dict[str, Any]] | None = None

    def init(self, key):
        return self.connectors.init(key, self.stones)

    def apply(self, variables, out, batch, teacher_vars, *, train: bool):
        del batch
        logits, variables = stone_logits(
            out.student_features, self.teacher, teacher_vars, self.connectors, variables,
            stones=self.stones, train=train, batch_stones=self.batch_stones,
            remat_teacher=self.remat_teacher,
        )  # fmt: skip
        out = out._replace(stone_logits=logits)
        if self.teacher_inputs is not None:
            inputs = self.teacher_inputs(jax.lax.stop_gradient(teacher_vars))
            out = out._replace(extras={**out.extras, _DISTANCE_INPUTS: inputs})
        return out, variables


def _stones(requested, default: tuple[int, ...], n: int) -> tuple[int, ...]:
    stones = tuple(sorted(int(i) for i in requested)) if requested else default
    if not all(1 <= i <= n for i in stones) or len(set(stones)) != len(stones):
        raise ValueError(f"distill.blockkd.stones={stones} must be distinct indices in 1..{n}")
    return stones


def _check_distance(k) -> None:
    if k["distance"] not in losses.DISTANCES:
        raise ValueError(
            f"distill.blockkd.distance={k['distance']!r} is not a logit distance Block-KD can "
            f"use; known: {', '.join(losses.DISTANCES)}"
        )


def _distance_knobs(k, pair: Pair):
    """The chosen distance's knobs from its section, and what the teacher's variables add."""
    section = dict(k.get(k["distance"], {}))
    if k["distance"] in _TEACHER_INPUTS:
        return _TEACHER_INPUTS[k["distance"]](section, pair)
    return section, None


def _feature_recipe(name: str, pair: Pair) -> Recipe | None:
    """The recipe of feature method `name` with its default knobs, or None for ""."""
    if not name:
        return None
    method = distillers.get(name)
    if "taps" not in method.consumes:
        raise ValueError(
            f"distill.blockkd.feature_method={name!r} is not a feature method (one that "
            "consumes feature taps)"
        )
    return method.build(method.knobs(), pair)


def _builder(lite: bool):
    def build(k, pair: Pair) -> Recipe:
        _check_distance(k)
        grouping = k["grouping"]
        connectors = make_connectors(
            pair.student, pair.teacher, pair.input_shape,
            grouping=tuple(map(tuple, grouping)) if grouping else None,
            upsampling=k["upsampling"], connector=k["connector"], dtype=pair.dtype,
        )  # fmt: skip
        n = connectors.num_stones
        default = tuple(range(max(1, n - 1), n + 1)) if lite else tuple(range(1, n + 1))
        distance_knobs, teacher_inputs = _distance_knobs(k, pair)
        modules = SteppingStones(
            connectors, _stones(k["stones"], default, n), pair.teacher, pair.batch_stones,
            pair.remat_teacher, teacher_inputs,
        )  # fmt: skip
        feature = _feature_recipe(k["feature_method"], pair)

        def objective(out, batch, warmup) -> Loss:
            _, metrics = losses.blockkd_loss(
                out.student_logits, out.stone_logits, out.teacher_logits, batch["label"],
                num_blocks=n, temperature=k["temperature"], alpha=k["alpha"], beta=k["beta"],
                gamma=k["gamma"], warmup=warmup, distance=k["distance"],
                distance_knobs={**distance_knobs, **out.extras.get(_DISTANCE_INPUTS, {})},
                standardize=k["standardize"],
            )  # fmt: skip
            task = k["alpha"] * metrics["task"]
            distill = warmup * (k["beta"] * metrics["distill"] + k["gamma"] * metrics["cross"])
            metrics = {**metrics, "warmup": warmup}
            if feature is not None:
                extra = feature.objective(out, batch, warmup)
                distill = distill + k["feature_weight"] * extra.distill
                metrics.update({f"feature/{name}": v for name, v in extra.metrics.items()})
            return Loss(task, distill, metrics)

        if feature is None:
            return Recipe(objective, modules)
        if feature.modules is not None:
            modules = CombinedModules((("stones", modules), ("feature", feature.modules)))
        return Recipe(objective, modules, taps=True)

    return build


BLOCKKD = Method(
    name="blockkd",
    summary="Block-KD: logit distillation of every stepping-stone and the student",
    knobs=knobs,
    build=_builder(lite=False),
    consumes=("logits", "blocks", "stones"),
)
BLOCKKD_LITE = Method(
    name="blockkd_lite",
    summary="Block-KD over the two deepest stepping-stones only",
    knobs=knobs,
    build=_builder(lite=True),
    consumes=("logits", "blocks", "stones"),
)
