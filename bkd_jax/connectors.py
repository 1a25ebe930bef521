"""Connectors: adapters from a student's block output to a teacher block's input.

Connector C_i maps the student's feature at cut i to the shape the teacher's remaining
blocks (or head, for i = n) expect. Block outputs are feature maps (H, W, C) or, for
networks with `BlockNet.prefix_tokens`, token sequences (T, D): the prefix tokens (a ViT's
class token) first, then a square g x g grid of patch tokens in row-major order. The kind
of C_i follows from the two shapes at the cut:

- map -> map (`ConvConnector`): spatial adaptation first (average pooling when the student
  map is larger, nearest or bilinear upsampling when it is smaller), then a 1x1
  convolution without bias and BatchNorm, then ReLU when the teacher's block outputs are
  post-activation.
- tokens -> map (`ConvConnector` with `in_prefix`): the prefix tokens dropped, the patch
  tokens laid out as their (g, g, D) grid, then the map -> map path.
- map -> tokens (`TokenConnector`): the map brought to the teacher's grid, by
  space-to-depth with an integer factor (`patchify`, a ViT patch embedding on features:
  every activation kept) or by average pooling (`pool`), upsampled when it is smaller;
  a Dense layer to the teacher's width per patch; the teacher's prefix tokens are the mean
  of those patch tokens plus a learned offset per token (zero at first), so the class
  token the teacher's head reads is a function of the student's features; LayerNorm.
- tokens -> tokens (`TokenConnector`): the patch grid pooled or upsampled to the
  teacher's, the prefix tokens carried over (the first ones, when the student has more;
  made as for a map when it has none), a Dense layer and LayerNorm per token.

Text networks (`bkd_jax.blocknet.TextBlockNet`, whose blocks pass `MaskedTokens`) connect
only to text networks, token by token (`TextConnector`): a Dense layer and LayerNorm on
every token when the widths differ, the identity when they match; the padding mask is
carried over unchanged, so the teacher's blocks mask what the student's did.

`make_connectors(..., connector=...)` chooses how maps become tokens: "auto" (patchify) or
explicitly "patchify" or "pool".

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

from bkd_jax import shapes
from bkd_jax.blocknet import BlockNet, MaskedTokens, TextBlockNet, grid_side, patch_grid
from bkd_jax.models.layers import batch_norm, conv
from bkd_jax.parts import Parts, Variables

Grouping = tuple[tuple[int, ...], tuple[int, ...]]
UPSAMPLING = ("nearest", "bilinear")
CONNECTORS = ("auto", "patchify", "pool")  # how feature maps become tokens; auto: patchify


def block_output_shapes(net: BlockNet, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-example output shape of every native block for NHWC `input_shape`, no compute.

    Traced once per network and input shape (`bkd_jax.shapes`): builds repeat it.
    """
    return [tuple(f.shape[1:]) for f in shapes.block_output_structs(net, input_shape)]


def default_grouping(num_student_blocks: int, num_teacher_blocks: int) -> Grouping:
    """Merges the leading native blocks of the deeper network."""
    n = min(num_student_blocks, num_teacher_blocks)

    def cuts(m: int) -> tuple[int, ...]:
        return tuple(range(m - n + 1, m + 1))

    return cuts(num_student_blocks), cuts(num_teacher_blocks)


def _resolve_grouping(
    student: BlockNet, teacher: BlockNet, grouping: Grouping | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(student cuts, teacher cuts): `grouping`, or the default, checked against both nets."""
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
    return student_cuts, teacher_cuts


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


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
    """NHWC `x` -> (N, H/f, W/f, f*f*C): each f x f patch's pixels, row-major, on channels."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // factor, w // factor, factor**2 * c)


def _resize(
    x: jax.Array, hw: tuple[int, int], upsampling: str, patchify: bool = False
) -> jax.Array:
    """NHWC `x` to spatial size `hw`: pooled (or space-to-depth) when larger, else resized."""
    (h, w), (th, tw) = x.shape[1:3], hw
    if h > th:
        factor = (h // th, w // tw)
        return space_to_depth(x, factor[0]) if patchify else nn.avg_pool(x, factor, factor)
    if h < th:
        return jax.image.resize(x, (x.shape[0], th, tw, x.shape[3]), upsampling)
    return x


class ConvConnector(nn.Module):
    """Spatial adaptation, 1x1 convolution, BatchNorm and optional ReLU.

    With `in_prefix`, the input is a token sequence: its patch grid is the map.
    """

    out_shape: tuple[int, int, int]  # (H, W, C) the teacher expects
    relu: bool
    upsampling: str = "nearest"
    dtype: jnp.dtype = jnp.float32
    in_prefix: int | None = None  # prefix tokens of a token-sequence input; None for a map

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.in_prefix is not None:
            x = patch_grid(x, self.in_prefix)
        x = _resize(x, self.out_shape[:2], self.upsampling)
        x = conv(self.out_shape[2], 1, dtype=self.dtype, name="conv")(x)
        x = batch_norm(train, dtype=self.dtype, name="bn")(x)
        return nn.relu(x) if self.relu else x


class TokenConnector(nn.Module):
    """A student map or token sequence -> the teacher's tokens (module docstring)."""

    out_tokens: tuple[int, int]  # (T, D) the teacher expects
    out_prefix: int  # of those T, the teacher's prefix tokens
    in_prefix: int | None = None  # prefix tokens of a token-sequence input; None for a map
    patchify: bool = True  # a larger map: space-to-depth (True) or average pooling
    upsampling: str = "nearest"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        (tokens, dim), out_prefix = self.out_tokens, self.out_prefix
        side = grid_side(tokens, out_prefix)
        prefix = None
        if self.in_prefix is not None:
            prefix, x = x[:, : self.in_prefix], patch_grid(x, self.in_prefix)
        patchify = self.patchify and self.in_prefix is None
        x = _resize(x, (side, side), self.upsampling, patchify)
        x = x.reshape(x.shape[0], side * side, x.shape[3])
        carried = bool(self.in_prefix) and self.in_prefix >= out_prefix
        if carried:
            x = jnp.concatenate([prefix[:, :out_prefix], x], axis=1)
        x = nn.Dense(dim, dtype=self.dtype, name="proj")(x)
        if out_prefix and not carried:
            offset = self.param("prefix_offset", nn.initializers.zeros, (out_prefix, dim))
            made = jnp.mean(x, axis=1, keepdims=True) + offset.astype(x.dtype)
            x = jnp.concatenate([made, x], axis=1)
        return nn.LayerNorm(dtype=self.dtype, name="norm")(x)


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


def _grid(shape: tuple[int, ...], prefix: int) -> tuple[tuple[int, int, int] | None, str | None]:
    """The (g, g, D) patch grid of a (T, D) token shape with `prefix` tokens, or why not."""
    try:
        side = grid_side(shape[0], prefix)
    except ValueError as e:
        return None, str(e)
    return (side, side, shape[1]), None


def _connector(
    src: tuple[int, ...],
    dst: tuple[int, ...],
    student: BlockNet,
    teacher: BlockNet,
    connector: str,
    upsampling: str,
    dtype: jnp.dtype,
) -> tuple[str, nn.Module | None, str | None]:
    """`(kind, C, misfit)` for a student output of shape `src` into a teacher's `dst`.

    kind is "conv" (map -> map), "grid" (tokens -> map), "patchify" or "pool" (map ->
    tokens), or "tokens" (tokens -> tokens); misfit, when not None, says why C cannot work.
    """
    if {len(src), len(dst)} - {2, 3}:
        return "", None, f"shapes {src} -> {dst} are neither (H, W, C) maps nor (T, D) tokens"
    s_prefix = student.prefix_tokens if len(src) == 2 else None
    src_map, why = (src, None) if s_prefix is None else _grid(src, s_prefix)
    if why:
        return "", None, f"student {why}"
    if len(dst) == 3:
        module = ConvConnector(dst, teacher.post_activation, upsampling, dtype, s_prefix)
        kind = "conv" if s_prefix is None else "grid"
        return kind, module, _spatial_misfit(src_map, dst, upsampling)
    t_prefix = teacher.prefix_tokens
    dst_map, why = _grid(dst, t_prefix)
    if why:
        return "", None, f"teacher {why}"
    kind = "tokens" if s_prefix is not None else ("pool" if connector == "pool" else "patchify")
    module = TokenConnector(dst, t_prefix, s_prefix, kind == "patchify", upsampling, dtype)
    if s_prefix is not None and 0 < s_prefix < t_prefix:
        why = f"the student's {s_prefix} prefix tokens cannot make the teacher's {t_prefix}"
    elif src_map[0] != src_map[1]:
        why = f"the student's {src_map[0]}x{src_map[1]} map is not square"
    else:
        why = _spatial_misfit(src_map, dst_map, upsampling)
        if why and kind != "tokens":
            why = why.replace("average-pool", "patchify or pool")
    return kind, module, why


@dataclasses.dataclass(frozen=True)
class Connectors:
    """The n connectors of one (student, teacher, input shape) pair, with their cuts.

    C_i is part `connector{i}` of the connectors' variables (`bkd_jax.parts.Parts`).
    """

    student_cuts: tuple[int, ...]
    teacher_cuts: tuple[int, ...]
    in_shapes: tuple[tuple[int, ...], ...]  # student feature shape at each cut
    modules: tuple[nn.Module, ...]
    kinds: tuple[str, ...] = ()  # each C_i's: conv | grid | patchify | pool | tokens

    @property
    def num_stones(self) -> int:
        return len(self.modules)

    @staticmethod
    def part_name(i: int) -> str:
        return f"connector{i}"

    @property
    def parts(self) -> Parts:
        names = tuple(self.part_name(i) for i in range(1, self.num_stones + 1))
        return Parts(names, self.modules)

    def example(self, i: int) -> Any:
        """A batch of one input of C_i, to initialise it on."""
        return jnp.zeros((1, *self.in_shapes[i - 1]), jnp.float32)

    def init(self, key: jax.Array, stones: Sequence[int] | None = None) -> dict[str, Any]:
        """Variables of C_i for i in `stones` (default all); unused connectors get none."""
        stones = range(1, self.num_stones + 1) if stones is None else stones
        return self.parts.init(key, {self.part_name(i): self.example(i) for i in stones})

    def apply(
        self, variables: Variables, i: int, h: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, Variables]:
        """C_i(h): `(y, variables)`."""
        if not 1 <= i <= self.num_stones:
            raise ValueError(f"connector index {i} outside 1..{self.num_stones}")
        return self.parts.apply(variables, self.part_name(i), h, train=train)


def make_connectors(
    student: BlockNet,
    teacher: BlockNet,
    input_shape: Sequence[int],
    *,
    grouping: Grouping | None = None,
    upsampling: str = "nearest",
    connector: str = "auto",
    dtype: jnp.dtype = jnp.float32,
) -> Connectors:
    """Builds C_1..C_n for `student` -> `teacher` on inputs of NHWC `input_shape`.

    Each C_i's kind follows from the shapes at its cut (module docstring); `connector`
    ("auto", "patchify" or "pool") chooses how a feature map becomes tokens, and a value
    other than "auto" needs a cut where it does.

    Raises:
      ValueError: a malformed grouping or option, or a cut whose student feature cannot be
        adapted to the teacher's (the message names the stone and blocks); raised from
        the shapes alone, before any compute.
    """
    if isinstance(student, TextBlockNet) or isinstance(teacher, TextBlockNet):
        if connector != "auto":
            raise ValueError(
                f"connector={connector!r} chooses how feature maps become tokens; text "
                "networks connect token by token: use 'auto'"
            )
        return make_text_connectors(student, teacher, input_shape, grouping=grouping, dtype=dtype)
    if upsampling not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
    if connector not in CONNECTORS:
        raise ValueError(f"connector must be one of {CONNECTORS}, got {connector!r}")
    student_cuts, teacher_cuts = _resolve_grouping(student, teacher, grouping)
    s_shapes = block_output_shapes(student, input_shape)
    t_shapes = block_output_shapes(teacher, input_shape)
    in_shapes, modules, kinds, misfits = [], [], [], []
    for i, (sc, tc) in enumerate(zip(student_cuts, teacher_cuts), 1):
        src, dst = s_shapes[sc - 1], t_shapes[tc - 1]
        kind, module, why = _connector(src, dst, student, teacher, connector, upsampling, dtype)
        if why:
            misfits.append(
                f"stone {i}: {student.name} block {sc} output {src} -> "
                f"{teacher.name} block {tc} output {dst}: {why}"
            )
        in_shapes.append(src)
        modules.append(module)
        kinds.append(kind)
    where = f"{student.name} to {teacher.name} at input {tuple(input_shape)}"
    if misfits:
        raise ValueError(f"cannot connect {where}:\n  " + "\n  ".join(misfits))
    if connector != "auto" and not {"patchify", "pool"} & set(kinds):
        raise ValueError(
            f"connector={connector!r} chooses how feature maps become tokens, but no cut of "
            f"{where} connects a map to tokens (kinds {tuple(kinds)}); use 'auto'"
        )
    return Connectors(student_cuts, teacher_cuts, tuple(in_shapes), tuple(modules), tuple(kinds))


# LayerNorm epsilon of a text connector: BERT's (transformers' BertConfig.layer_norm_eps),
# as the teacher's blocks read LayerNorm outputs of that epsilon.
TEXT_LN_EPSILON = 1e-12


class TextConnector(nn.Module):
    """Student `MaskedTokens` -> the teacher's width: Dense + LayerNorm per token.

    With `out_dim` None (equal widths) it is the identity and has no parameters.
    """

    out_dim: int | None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: MaskedTokens, train: bool = False) -> MaskedTokens:
        del train
        if self.out_dim is None:
            return h
        x = nn.Dense(self.out_dim, dtype=self.dtype, name="proj")(h.tokens)
        x = nn.LayerNorm(epsilon=TEXT_LN_EPSILON, dtype=self.dtype, name="norm")(x)
        return MaskedTokens(x, h.mask)


@dataclasses.dataclass(frozen=True)
class TextConnectors(Connectors):
    """`Connectors` between text networks: `in_shapes` are `(length, dim)` per cut."""

    def example(self, i: int) -> MaskedTokens:
        length, dim = self.in_shapes[i - 1]
        return MaskedTokens(jnp.zeros((1, length, dim)), jnp.ones((1, length), jnp.int32))


def make_text_connectors(
    student: BlockNet,
    teacher: BlockNet,
    input_shape: Sequence[int],
    *,
    grouping: Grouping | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> TextConnectors:
    """C_1..C_n between two text networks on inputs of shape `(..., 3, length)`.

    Raises:
      ValueError: one network is not a text network, or a malformed grouping.
    """
    if not (isinstance(student, TextBlockNet) and isinstance(teacher, TextBlockNet)):
        raise ValueError(
            f"cannot connect {student.name} to {teacher.name}: text networks connect only to "
            "text networks"
        )
    student_cuts, teacher_cuts = _resolve_grouping(student, teacher, grouping)
    x = jax.ShapeDtypeStruct((1, *input_shape[-2:]), jnp.int32)

    def widths(net: BlockNet) -> list[tuple[int, int]]:
        feats = jax.eval_shape(lambda x: net.features(net.init(jax.random.key(0), x), x)[1], x)
        return [tuple(f.tokens.shape[1:]) for f in feats]

    s_shapes, t_shapes = widths(student), widths(teacher)
    in_shapes, modules = [], []
    for sc, tc in zip(student_cuts, teacher_cuts):
        src, dst = s_shapes[sc - 1], t_shapes[tc - 1]
        in_shapes.append(src)
        modules.append(TextConnector(None if src[-1] == dst[-1] else dst[-1], dtype))
    kinds = tuple("identity" if m.out_dim is None else "tokens" for m in modules)
    return TextConnectors(student_cuts, teacher_cuts, tuple(in_shapes), tuple(modules), kinds)
