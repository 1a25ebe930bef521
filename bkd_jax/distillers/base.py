"""What every distillation method is made of, and the `Distiller` that runs one.

A method (`Method`) declares, in one place: whether it needs a teacher, which tensors it
consumes, its knobs with their defaults, how it builds its objective and the extra
trainable modules it owns (Block-KD's connectors), and the optimiser it requires, if any
(DOT). `bkd_jax.distillers.make_distiller` turns a method and its knobs into a
`Distiller`: a student, an optional frozen teacher, the method's modules and objective.

One forward pass (`Distiller.forward`) runs the teacher once (inference mode, no
gradient), the student once (its block outputs kept, and its feature taps when the method
consumes them), and the method's modules on them.
An objective maps that `Forward` and the batch to a `Loss`: the weighted task term, the
weighted distillation term and the metrics. The two terms stay apart because an optimiser
may treat their gradients differently (DOT); every other optimiser sees their sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from bkd_jax import losses
from bkd_jax.blocknet import BlockNet, Taps
from bkd_jax.parts import Variables, part_variables, with_part

# Tensors a method may consume; `Method.consumes` documents which (taps: stem, block,
# pre-activation outputs and pooled embeddings; index: each example's dataset index;
# strong_view: a second, strongly augmented view of each image, batch["image_strong"],
# of the shape and dtype of batch["image"]).
TENSORS = ("logits", "blocks", "stones", "taps", "index", "strong_view")


class Forward(NamedTuple):
    """One forward pass of a distiller; variables are updated in training, else as given."""

    student_logits: jax.Array
    teacher_logits: jax.Array | None
    student_features: tuple[jax.Array, ...]  # outputs of the student's blocks (BlockNet's)
    stone_logits: dict[int, jax.Array]  # Block-KD's stepping-stones, i -> logits
    student_vars: Any
    module_vars: Any
    student_taps: Taps | None = None  # when the method consumes "taps"
    teacher_taps: Taps | None = None
    extras: Mapping[str, Any] = MappingProxyType({})  # what a method's modules compute


class Loss(NamedTuple):
    """An objective's value: the weighted task and distillation terms, and the metrics."""

    task: jax.Array
    distill: jax.Array
    metrics: dict[str, jax.Array]

    @property
    def total(self) -> jax.Array:
        return self.task + self.distill


Objective = Callable[[Forward, Mapping[str, jax.Array], jax.Array], Loss]


class Modules(Protocol):
    """Extra trainable modules of a method, run on the student's (and teacher's) outputs."""

    def init(self, key: jax.Array) -> dict[str, Any]:
        """Their variables: "params", "batch_stats" and any state they update untrained."""

    def apply(
        self,
        variables: Variables,
        out: Forward,
        batch: Mapping[str, jax.Array],
        teacher_vars: Variables,
        *,
        train: bool,
    ) -> tuple[Forward, Variables]:
        """`out` with what they compute (stone logits, extras) and updated variables.

        In training, `batch` also holds "rng", the key of this step.
        """


@dataclasses.dataclass(frozen=True)
class CombinedModules:
    """Two methods' modules as one: variables nested by name inside each collection."""

    parts: tuple[tuple[str, Modules], ...]

    def init(self, key: jax.Array) -> dict[str, Any]:
        variables: dict[str, Any] = {}
        for (name, modules), k in zip(self.parts, jax.random.split(key, len(self.parts))):
            variables = with_part(variables, name, modules.init(k))
        return variables

    def apply(self, variables, out, batch, teacher_vars, *, train: bool):
        new: dict[str, Any] = {}
        for name, modules in self.parts:
            own = part_variables(variables, name)
            out, own = modules.apply(own, out, batch, teacher_vars, train=train)
            new = with_part(new, name, own)
        return out, new


class Pair(NamedTuple):
    """What a method's `build` gets: the networks and how the distiller will run."""

    student: BlockNet
    teacher: BlockNet | None
    input_shape: tuple[int, ...]  # NHWC of one batch; sizes the modules
    dtype: Any  # compute dtype of the modules
    batch_stones: bool  # cost options of the stepping-stones (results do not change)
    remat_teacher: bool
    num_examples: int | None = None  # training examples (CRD's memory bank has a row each)


class Recipe(NamedTuple):
    """What a method's `build` returns."""

    objective: Objective
    modules: Modules | None = None
    taps: bool = False  # the forward pass collects feature taps (methods that consume them)
    # r(t) other than the linear warm-up: `(step, steps_per_epoch) -> factor` (WKD's decay).
    schedule: Callable[[jax.Array, int], jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A distillation method, as the registry holds it.

    Attributes:
      name: registry name (`config.distill.method`).
      summary: one line for listings.
      knobs: `() -> dict`, the default knobs of `config.distill.<name>`; each default's
        source is written beside it in the method's module. A knob may be a dict of
        further knobs. Knob "warmup_epochs", when present, is r(t)'s length.
      build: `(knobs, pair) -> Recipe`, called once per run with the config's knobs.
      needs_teacher: whether `config.teacher_checkpoint` is required.
      consumes: which of `TENSORS` the objective reads.
      optimizer: the name of the optimiser the method requires (`bkd_jax.optim`), or
        None for the config's own.
      distance_knobs: for a method that is also a logit distance of Block-KD (registered
        under its name in `bkd_jax.losses.DISTANCES`), the knobs of `knobs()` that
        parametrise that distance; Block-KD takes their defaults from here.
    """

    name: str
    summary: str
    knobs: Callable[[], dict[str, Any]]
    build: Callable[[Mapping[str, Any], Pair], Recipe]
    needs_teacher: bool = True
    consumes: tuple[str, ...] = ("logits",)
    optimizer: str | None = None
    distance_knobs: tuple[str, ...] = ()


def distance_objective(
    distance: str,
    knobs: Mapping[str, Any],
    distance_knobs: tuple[str, ...] = (),
    *,
    weight: str | None = None,
    warmup: bool = False,
) -> Objective:
    """The objective of a logit method: `ce_weight` CE + [r(t)] [knobs[weight]] D.

    D is the registered logit distance `distance` (`bkd_jax.losses.DISTANCES`) between the
    student's and the teacher's logits, at `knobs["temperature"]` (1 if the method has
    none), with the `distance_knobs` of `knobs`, on z-scored logits when
    `knobs["standardize"]`; `warmup` scales it by the warm-up factor r(t).
    """
    own = {name: knobs[name] for name in distance_knobs}

    def objective(out: Forward, batch: Mapping[str, jax.Array], r: jax.Array) -> Loss:
        labels = batch["label"]
        ce = losses.cross_entropy(out.student_logits, labels)
        d = losses.distance(
            distance, out.student_logits, out.teacher_logits, labels,
            temperature=knobs.get("temperature", 1.0), standardize=knobs["standardize"],
            knobs=own,
        )  # fmt: skip
        scale = (knobs[weight] if weight else 1.0) * (r if warmup else 1.0)
        metrics = {"ce": ce, distance: d, **({"warmup": r} if warmup else {})}
        return Loss(knobs["ce_weight"] * ce, scale * d, metrics)

    return objective


def warmup_factor(step: jax.Array, steps_per_epoch: int, warmup_epochs: float) -> jax.Array:
    """r(t) = min(1, epoch / warmup_epochs), epochs counted from 1; 1 when disabled.

    Counting from 1 is mdistiller's (its epochs start at 1, so the first epoch already gets
    1 / warmup_epochs).
    """
    if warmup_epochs <= 0:
        return jnp.ones((), jnp.float32)
    epoch = jnp.floor_divide(step, steps_per_epoch) + 1
    return jnp.minimum(1.0, epoch.astype(jnp.float32) / warmup_epochs)


DROPOUT_STREAM = 1  # folded into the step's key for the student's dropout


@dataclasses.dataclass(frozen=True)
class Distiller:
    """A student, its frozen teacher (if any), a method's modules (if any), its objective."""

    method: str
    student: BlockNet
    objective: Objective
    teacher: BlockNet | None = None
    modules: Modules | None = None
    warmup_epochs: float = 0.0
    taps: bool = False  # whether the forward pass collects feature taps
    schedule: Callable[[jax.Array, int], jax.Array] | None = None  # Recipe.schedule

    def weight_factor(self, step: jax.Array, steps_per_epoch: int) -> jax.Array:
        """r(t) of the objective: the recipe's schedule, else the linear warm-up."""
        if self.schedule is not None:
            return self.schedule(step, steps_per_epoch)
        return warmup_factor(step, steps_per_epoch, self.warmup_epochs)

    def init_modules(self, key: jax.Array) -> dict[str, Any]:
        """Variables of the method's extra trainable modules, or nothing."""
        return self.modules.init(key) if self.modules else {}

    def forward(
        self,
        student_vars: Variables,
        module_vars: Variables,
        teacher_vars: Variables | None,
        batch: Mapping[str, jax.Array],
        *,
        train: bool,
    ) -> Forward:
        images = batch["image"]
        teacher_logits = teacher_taps = student_taps = None
        if self.teacher is not None:
            teacher_vars = jax.lax.stop_gradient(teacher_vars)
            if self.taps:
                teacher_logits, teacher_taps, _ = self.teacher.taps(teacher_vars, images)
                teacher_taps = jax.lax.stop_gradient(teacher_taps)
            else:
                teacher_logits, _ = self.teacher.apply(teacher_vars, images)
            teacher_logits = jax.lax.stop_gradient(teacher_logits)
        if self.taps:
            logits, feats, student_taps, student_vars = self.student.tapped_features(
                student_vars, images, train=train
            )
        else:
            # The training step's key (`steps.make_train_step`) drives the student's dropout,
            # if any; folded so that it is not the key a method draws from itself (CRD's
            # negatives). Evaluation batches have none.
            rng = batch.get("rng")
            rng = None if rng is None else jax.random.fold_in(rng, DROPOUT_STREAM)
            logits, feats, student_vars = self.student.features(
                student_vars, images, train=train, rng=rng
            )
        out = Forward(
            logits, teacher_logits, tuple(feats), {}, student_vars, module_vars, student_taps,
            teacher_taps, {},
        )  # fmt: skip
        if self.modules is None:
            return out
        out, module_vars = self.modules.apply(module_vars, out, batch, teacher_vars, train=train)
        return out._replace(module_vars=module_vars)

    def loss(
        self,
        student_vars: Variables,
        module_vars: Variables,
        teacher_vars: Variables | None,
        batch: Mapping[str, jax.Array],
        warmup: jax.Array,
    ) -> tuple[Loss, tuple[Any, Any]]:
        """The training `Loss` and (new student variables, new module variables)."""
        out = self.forward(student_vars, module_vars, teacher_vars, batch, train=True)
        loss = self.objective(out, batch, warmup)
        metrics = {**loss.metrics, "loss": loss.total}
        return loss._replace(metrics=metrics), (out.student_vars, out.module_vars)

    def eval_logits(
        self,
        student_vars: Variables,
        module_vars: Variables,
        teacher_vars: Variables | None,
        images: jax.Array,
    ) -> dict[str, jax.Array]:
        """Inference-mode logits of the student, the teacher and each stepping-stone."""
        out = self.forward(student_vars, module_vars, teacher_vars, {"image": images}, train=False)
        logits = {"student": out.student_logits}
        if out.teacher_logits is not None:
            logits["teacher"] = out.teacher_logits
        logits.update({f"stone{i}": v for i, v in out.stone_logits.items()})
        return logits
