"""Connectors: adapters from a student's block output to a teacher block's input.

Connector C_i maps the student's feature at cut i to the shape the teacher's remaining
blocks (or head, for i = n) expect: spatial adaptation first (average pooling when the
student map is larger, nearest or bilinear upsampling when it is smaller), then a 1x1
convolution without bias and BatchNorm, then ReLU when the teacher's block outputs are
post-activation.

Cuts. Block-KD needs both networks cut into the same number n of blocks. When their
native block counts differ, a *grouping* says which native block ends each Block-KD block:
`(student_cuts, teacher_cuts)`, each a strictly increasing tuple ending at the network's
last block. The default merges the leading native blocks of the deeper network, e.g. a
5-block VGG teacher against a 4-block student gets teacher cuts (2, 3, 4, 5).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax.blocknet import BlockNet, Variables, apply_part, with_part
from bkd_jax.models.layers import batch_norm, conv

Grouping = tuple[tuple[int, ...], tuple[int, ...]]
UPSAMPLING = ("nearest", "bilinear")


def block_output_shapes(net: BlockNet, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-example output shape of every native block for NHWC `input_shape`, no compute."""
    x = jax.ShapeDtypeStruct((1, *input_shape[-3:]), jnp.float32)

    def feats(x):
        return net.features(net.init(jax.random.key(0), x), x)[1]

    return [tuple(f.shape[1:]) for f in jax.eval_shape(feats, x)]


def default_grouping(num_student_blocks: int, num_teacher_blocks: int) -> Grouping:
    """Merges the leading native blocks of the deeper network."""
    n = min(num_student_blocks, num_teacher_blocks)

    def cuts(m: int) -> tuple[int, ...]:
        return tuple(range(m - n + 1, m + 1))

    return cuts(num_student_blocks), cuts(num_teacher_blocks)


def _check_cuts(cuts: Sequence[int], net: BlockNet, role: str) -> None:
    ok = (
        all(1 <= c <= net.num_blocks for c in cuts)
        and all(a < b for a, b in itertools.pairwise(cuts))
        and cuts
        and cuts[-1] == net.num_blocks
    )
    if not ok:
        raise ValueError(
            f"{role} cuts {tuple(cuts)} for {net.name} must be strictly increasing block "
            f"indices in 1..{net.num_blocks} ending at {net.num_blocks}"
        )


class ConvConnector(nn.Module):
    """Spatial adaptation, 1x1 convolution, BatchNorm and optional ReLU."""

    out_shape: tuple[int, int, int]  # (H, W, C) the teacher expects
    relu: bool
    upsampling: str = "nearest"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        (h, w), (th, tw, channels) = x.shape[1:3], self.out_shape
        if h > th:
            x = nn.avg_pool(x, (h // th, w // tw), (h // th, w // tw))
        elif h < th:
            x = jax.image.resize(x, (x.shape[0], th, tw, x.shape[3]), self.upsampling)
        x = conv(channels, 1, dtype=self.dtype, name="conv")(x)
        x = batch_norm(train, dtype=self.dtype, name="bn")(x)
        return nn.relu(x) if self.relu else x


def _spatial_misfit(src: tuple[int, ...], dst: tuple[int, ...], upsampling: str) -> str | None:
    """Why a (H, W, C) map cannot be adapted to (H', W', C'), or None when it can."""
    if len(src) != 3 or len(dst) != 3:
        return f"feature shapes {src} -> {dst} are not both (H, W, C) maps"
    (h, w, _), (th, tw, _) = src, dst
    if (h > th) != (w > tw) or (h < th) != (w < tw):
        return f"{h}x{w} -> {th}x{tw} shrinks one axis and grows the other"
    if h > th and (h % th or w % tw or h // th != w // tw):
        return f"{h}x{w} does not average-pool to {th}x{tw} by one integer factor"
    if h < th and upsampling == "nearest" and (th % h or tw % w):
        return f"{h}x{w} does not nearest-upsample to {th}x{tw} (use bilinear upsampling)"
    return None


@dataclasses.dataclass(frozen=True)
class Connectors:
    """The n connectors of one (student, teacher, input shape) pair, with their cuts."""

    student_cuts: tuple[int, ...]
    teacher_cuts: tuple[int, ...]
    in_shapes: tuple[tuple[int, ...], ...]  # student feature shape at each cut
    modules: tuple[nn.Module, ...]

    @property
    def num_stones(self) -> int:
        return len(self.modules)

    @staticmethod
    def part_name(i: int) -> str:
        return f"connector{i}"

    def init(self, key: jax.Array, stones: Sequence[int] | None = None) -> dict[str, Any]:
        """Variables of C_i for i in `stones` (default all); unused connectors get none."""
        stones = range(1, self.num_stones + 1) if stones is None else stones
        keys = jax.random.split(key, self.num_stones)
        variables: dict[str, Any] = {}
        for i in stones:
            x = jnp.zeros((1, *self.in_shapes[i - 1]), jnp.float32)
            part = self.modules[i - 1].init(keys[i - 1], x, train=False)
            variables = with_part(variables, self.part_name(i), part)
        return variables

    def apply(self, variables: Variables, i: int, h: jax.Array, *, train: bool = False):
        """C_i(h); returns `(y, new_variables)` when `train`."""
        if not 1 <= i <= self.num_stones:
            raise ValueError(f"connector index {i} outside 1..{self.num_stones}")
        return apply_part(self.modules[i - 1], variables, self.part_name(i), h, train=train)


def make_connectors(
    student: BlockNet,
    teacher: BlockNet,
    input_shape: Sequence[int],
    *,
    grouping: Grouping | None = None,
    upsampling: str = "nearest",
    dtype: jnp.dtype = jnp.float32,
) -> Connectors:
    """Builds C_1..C_n for `student` -> `teacher` on inputs of NHWC `input_shape`.

    Raises:
      ValueError: a malformed grouping, or a cut whose student feature cannot be adapted
        to the teacher's (the message names the blocks).
    """
    if upsampling not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
    if grouping is None:
        grouping = default_grouping(student.num_blocks, teacher.num_blocks)
    student_cuts, teacher_cuts = (tuple(int(c) for c in cuts) for cuts in grouping)
    if len(student_cuts) != len(teacher_cuts):
        raise ValueError(
            f"grouping has {len(student_cuts)} student cuts but {len(teacher_cuts)} teacher "
            "cuts; both networks must be cut into the same number of blocks"
        )
    _check_cuts(student_cuts, student, "student")
    _check_cuts(teacher_cuts, teacher, "teacher")
    s_shapes = block_output_shapes(student, input_shape)
    t_shapes = block_output_shapes(teacher, input_shape)
    in_shapes, modules, misfits = [], [], []
    for i, (sc, tc) in enumerate(zip(student_cuts, teacher_cuts), 1):
        src, dst = s_shapes[sc - 1], t_shapes[tc - 1]
        why = _spatial_misfit(src, dst, upsampling)
        if why:
            misfits.append(
                f"stone {i}: {student.name} block {sc} output {src} -> "
                f"{teacher.name} block {tc} output {dst}: {why}"
            )
        in_shapes.append(src)
        modules.append(ConvConnector(dst, teacher.post_activation, upsampling, dtype))
    if misfits:
        raise ValueError(
            f"cannot connect {student.name} to {teacher.name} at input {tuple(input_shape)}:\n  "
            + "\n  ".join(misfits)
        )
    return Connectors(student_cuts, teacher_cuts, tuple(in_shapes), tuple(modules))
