"""The stepping-stone models Block-KD builds from two networks cut into blocks.

A `bkd_jax.blocknet.BlockNet` applies each of its blocks as a pure function of
``(variables, h)``, so a prefix of one network, a connector and a suffix of another
compose as a plain, jittable function chain:

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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bkd_jax.blocknet import BlockNet, Variables
from bkd_jax.connectors import Connectors


class SteppingStoneOutput(NamedTuple):
    """What `stepping_stones` computes; variables are updated in training, else as given."""

    student_logits: jax.Array
    features: tuple[jax.Array, ...]  # student output at each cut 1..n
    stone_logits: dict[int, jax.Array]  # i -> logits of N_i
    student_vars: Any
    connector_vars: Any


def _teacher_block(teacher: BlockNet, j: int, remat: bool):
    """`(variables, h) -> y` of teacher block j in inference mode, optionally rematerialised."""

    def block(variables: Variables, h: jax.Array) -> jax.Array:
        return teacher.apply_block(variables, j, h)[0]

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
        logits[i], _ = teacher.apply_head(teacher_vars, h)
    return logits


def _concatenate(hs: Sequence[Any]) -> Any:
    """Block inputs joined along the batch axis, leaf by leaf (arrays or `MaskedTokens`)."""
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *hs)


def _batch_size(h: Any) -> int:
    return jax.tree.leaves(h)[0].shape[0]


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
            h = _concatenate(joining if h is None else [h, *joining])
        if j <= teacher.num_blocks:
            h = _teacher_block(teacher, j, remat)(teacher_vars, h)
    logits, _ = teacher.apply_head(teacher_vars, h)
    bounds = np.cumsum([_batch_size(entries[i][1]) for i in order])[:-1]
    by_stone = dict(zip(order, jnp.split(logits, bounds)))
    return {i: by_stone[i] for i in entries}


def stone_logits(
    student_features: Sequence[jax.Array],
    teacher: BlockNet,
    teacher_vars: Variables,
    connectors: Connectors,
    connector_vars: Variables,
    *,
    stones: Sequence[int],
    train: bool,
    batch_stones: bool = True,
    remat_teacher: bool = False,
) -> tuple[dict[int, jax.Array], Variables]:
    """Logits of the stepping-stones N_i for i in `stones`, from the student's block outputs.

    `student_features` are the outputs of the student's native blocks (`BlockNet.features`).
    Returns `({i: logits}, connector_vars)`, the connectors' variables updated in training.
    """
    n = connectors.num_stones
    for i in stones:
        if not 1 <= i <= n:
            raise ValueError(f"stepping-stone index {i} outside 1..{n}")
    if len(set(stones)) != len(stones):
        raise ValueError(f"repeated stepping-stone index in {tuple(stones)}")
    feats = [student_features[c - 1] for c in connectors.student_cuts]
    entries = {}
    for i in stones:
        h, connector_vars = connectors.apply(connector_vars, i, feats[i - 1], train=train)
        entries[i] = (connectors.teacher_cuts[i - 1] + 1, h)
    logits = {}
    if entries:
        run = _batched_teacher_suffixes if batch_stones else _teacher_suffixes
        logits = run(teacher, teacher_vars, entries, remat=remat_teacher)
    return logits, connector_vars


def stepping_stones(
    student: BlockNet,
    student_vars: Variables,
    teacher: BlockNet,
    teacher_vars: Variables,
    connectors: Connectors,
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
    student_logits, native_feats, student_vars = student.features(student_vars, x, train=train)
    logits, connector_vars = stone_logits(
        native_feats, teacher, teacher_vars, connectors, connector_vars, stones=stones,
        train=train, batch_stones=batch_stones, remat_teacher=remat_teacher,
    )  # fmt: skip
    feats = tuple(native_feats[c - 1] for c in connectors.student_cuts)
    return SteppingStoneOutput(student_logits, feats, logits, student_vars, connector_vars)
