"""Networks cut into blocks, and the stepping-stone models Block-KD builds from them.

A `BlockNet` is a network seen as n blocks and a head, each a Flax module with its own
slice of the variables (``variables[collection]["block3"]``, ``[...]["head"]``). Every
part is applied as a pure function of ``(variables, h)``, so a prefix of one network, a
connector and a suffix of another compose as a plain, jittable function chain:

    N_i = T_head . T_n . ... . T_{i+1} . C_i . S_i . ... . S_1

`stepping_stones` evaluates the student once, keeps its block features, and runs every
requested stepping-stone from them. The teacher always runs with running BatchNorm
statistics and is never updated here; gradients still flow through its blocks into the
connectors and the student, which is what aligns the student's features. Because the
teacher processes each example independently, the stones that reach a teacher block run
through it as one batch (`batch_stones`), and its activations may be recomputed in the
backward pass rather than stored (`remat_teacher`); neither changes the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Variables = Mapping[str, Any]


def _part(variables: Variables, name: str) -> dict[str, Any]:
    """The variables of one part (a block or the head), collection by collection."""
    return {col: tree[name] for col, tree in variables.items() if name in tree}


def with_part(variables: Variables, name: str, updates: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` with the collections in `updates` replaced for part `name`."""
    new = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in updates.items():
        new.setdefault(col, {})[name] = tree
    return new


def apply_part(module: nn.Module, variables: Variables, name: str, h: jax.Array, *, train: bool):
    """Applies one named part; returns `y`, or `(y, new_variables)` when training."""
    part = _part(variables, name)
    if not train:
        return module.apply(part, h, train=False)
    y, updates = module.apply(part, h, train=True, mutable=["batch_stats"])
    return y, with_part(variables, name, updates)


@dataclasses.dataclass(frozen=True)
class BlockNet:
    """A network as n blocks and a head, each applied as a pure function.

    Attributes:
      name: registry name of the architecture.
      blocks: the n block modules; block 1 includes the stem.
      head: everything after the last block (pooling, final norm, classifier).
      post_activation: whether block outputs are post-ReLU (ResNet v1, VGG, MobileNet,
        ShuffleNet) rather than pre-activation (WRN); connectors mirror it.
      input_channels: channels the stem expects (last axis of NHWC input).
    """

    name: str
    blocks: tuple[nn.Module, ...]
    head: nn.Module
    post_activation: bool = True
    input_channels: int = 3

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @staticmethod
    def part_name(i: int) -> str:
        return f"block{i}"

    def check_input(self, x: jax.Array) -> None:
        """Raises ValueError unless `x` is an NHWC batch with the expected channels."""
        if x.ndim != 4:
            raise ValueError(
                f"{self.name}: expected images of shape (batch, height, width, "
                f"{self.input_channels}), got an array of rank {x.ndim} with shape {x.shape}"
            )
        if x.shape[-1] != self.input_channels:
            raise ValueError(
                f"{self.name}: expected {self.input_channels} input channels (NHWC, channels "
                f"last), got shape {x.shape}"
            )

    def _check_index(self, i: int) -> None:
        if not 1 <= i <= self.num_blocks:
            raise ValueError(f"{self.name}: block index {i} outside 1..{self.num_blocks}")

    def init(self, key: jax.Array, x: jax.Array) -> dict[str, Any]:
        """Initialises every part by running `x` through the network once."""
        self.check_input(x)
        keys = jax.random.split(key, self.num_blocks + 1)
        parts = [(self.part_name(i + 1), m) for i, m in enumerate(self.blocks)]
        parts.append(("head", self.head))
        variables: dict[str, Any] = {}
        h = x
        for (name, module), k in zip(parts, keys):
            part_vars = module.init(k, h, train=False)
            h = module.apply(part_vars, h, train=False)
            variables = with_part(variables, name, part_vars)
        return variables

    def apply_block(self, variables: Variables, i: int, h: jax.Array, *, train: bool = False):
        """Block i (1-based). Returns `y`, or `(y, new_variables)` when `train`."""
        self._check_index(i)
        if i == 1:
            self.check_input(h)
        return apply_part(self.blocks[i - 1], variables, self.part_name(i), h, train=train)

    def apply_head(self, variables: Variables, h: jax.Array, *, train: bool = False):
        """The head. Returns logits, or `(logits, new_variables)` when `train`."""
        return apply_part(self.head, variables, "head", h, train=train)

    def apply_range(
        self, variables: Variables, h: jax.Array, start: int, stop: int, *, train: bool = False
    ):
        """Blocks start..stop (inclusive, 1-based); `stop < start` is the identity."""
        for i in range(start, stop + 1):
            if train:
                h, variables = self.apply_block(variables, i, h, train=True)
            else:
                h = self.apply_block(variables, i, h)
        return (h, variables) if train else h

    def features(self, variables: Variables, x: jax.Array, *, train: bool = False):
        """Logits and the output of every block: `(logits, [f_1..f_n])`, plus variables."""
        feats = []
        h = x
        for i in range(1, self.num_blocks + 1):
            if train:
                h, variables = self.apply_block(variables, i, h, train=True)
            else:
                h = self.apply_block(variables, i, h)
            feats.append(h)
        if train:
            logits, variables = self.apply_head(variables, h, train=True)
            return logits, feats, variables
        return self.apply_head(variables, h), feats

    def apply(self, variables: Variables, x: jax.Array, *, train: bool = False):
        """Logits, or `(logits, new_variables)` with updated BatchNorm statistics."""
        out = self.features(variables, x, train=train)
        return (out[0], out[2]) if train else out[0]


class SteppingStoneOutput(NamedTuple):
    """What `stepping_stones` computes; variables are the updated ones when training."""

    student_logits: jax.Array
    features: tuple[jax.Array, ...]  # student output at each cut 1..n
    stone_logits: dict[int, jax.Array]  # i -> logits of N_i
    student_vars: Any
    connector_vars: Any


def _teacher_block(teacher: BlockNet, j: int, remat: bool):
    """`(variables, h) -> y` of teacher block j in inference mode, optionally rematerialised."""

    def block(variables: Variables, h: jax.Array) -> jax.Array:
        return teacher.apply_block(variables, j, h)

    return jax.checkpoint(block) if remat else block


def _teacher_suffixes(
    teacher: BlockNet,
    teacher_vars: Variables,
    entries: Mapping[int, tuple[int, jax.Array]],
    *,
    remat: bool,
) -> dict[int, jax.Array]:
    """Logits of each stone, its input `h` run through teacher blocks `start`..n and head.

    `entries` maps a stone to `(start, h)`; each stone runs on its own.
    """
    logits = {}
    for i, (start, h) in entries.items():
        for j in range(start, teacher.num_blocks + 1):
            h = _teacher_block(teacher, j, remat)(teacher_vars, h)
        logits[i] = teacher.apply_head(teacher_vars, h)
    return logits


def _batched_teacher_suffixes(
    teacher: BlockNet,
    teacher_vars: Variables,
    entries: Mapping[int, tuple[int, jax.Array]],
    *,
    remat: bool,
) -> dict[int, jax.Array]:
    """`_teacher_suffixes` with one call per teacher block over every stone that reaches it.

    A stone joins the running batch (concatenated along the batch axis) at its first
    teacher block. Teacher BatchNorm uses running statistics, so each example is processed
    independently and the batched result equals the separate ones.
    """
    order = sorted(entries, key=lambda i: entries[i][0])  # the row order of the batch
    h = None
    for j in range(entries[order[0]][0], teacher.num_blocks + 2):
        joining = [entries[i][1] for i in order if entries[i][0] == j]
        if joining:
            h = jnp.concatenate(joining if h is None else [h, *joining])
        if j <= teacher.num_blocks:
            h = _teacher_block(teacher, j, remat)(teacher_vars, h)
    logits = teacher.apply_head(teacher_vars, h)
    bounds = np.cumsum([entries[i][1].shape[0] for i in order])[:-1]
    by_stone = dict(zip(order, jnp.split(logits, bounds)))
    return {i: by_stone[i] for i in entries}


def stepping_stones(
    student: BlockNet,
    student_vars: Variables,
    teacher: BlockNet,
    teacher_vars: Variables,
    connectors,
    connector_vars: Variables,
    x: jax.Array,
    *,
    stones: Sequence[int],
    train: bool,
    batch_stones: bool = True,
    remat_teacher: bool = False,
) -> SteppingStoneOutput:
    """The student and the stepping-stones N_i for i in `stones`, student computed once.

    `connectors` (a `bkd_jax.connectors.Connectors` built for this pair) carries the cut
    points: with grouping, the i-th Block-KD block of a network may span several of its
    native blocks. The teacher runs in inference mode (running BatchNorm statistics) and
    its variables are never returned.

    Two options change the cost, not the result: `batch_stones` runs each teacher block
    once on the concatenation of every stone that passes through it, and `remat_teacher`
    recomputes the activations of teacher blocks in the backward pass instead of storing
    them (memory for compute).
    """
    n = connectors.num_stones
    for i in stones:
        if not 1 <= i <= n:
            raise ValueError(f"stepping-stone index {i} outside 1..{n}")
    if len(set(stones)) != len(stones):
        raise ValueError(f"repeated stepping-stone index in {tuple(stones)}")
    if train:
        student_logits, native_feats, student_vars = student.features(student_vars, x, train=True)
    else:
        student_logits, native_feats = student.features(student_vars, x)
    feats = tuple(native_feats[c - 1] for c in connectors.student_cuts)
    entries = {}
    for i in stones:
        if train:
            h, connector_vars = connectors.apply(connector_vars, i, feats[i - 1], train=True)
        else:
            h = connectors.apply(connector_vars, i, feats[i - 1])
        entries[i] = (connectors.teacher_cuts[i - 1] + 1, h)
    stone_logits = {}
    if entries:
        run = _batched_teacher_suffixes if batch_stones else _teacher_suffixes
        stone_logits = run(teacher, teacher_vars, entries, remat=remat_teacher)
    return SteppingStoneOutput(student_logits, feats, stone_logits, student_vars, connector_vars)
