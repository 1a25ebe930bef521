"""The BlockNet contract: a network as n blocks and a head, each a pure function.

A `BlockNet` is a network seen as n blocks and a head, each a Flax module with its own
slice of the variables (``variables[collection]["block3"]``, ``[...]["head"]``: named
`bkd_jax.parts.Parts`). Every part is applied as a pure function of ``(variables, h)``, so
a prefix of one network, a connector and a suffix of another compose as a plain, jittable
function chain. Every zoo model is a BlockNet; `bkd_jax.blockwise` builds the
stepping-stones from two of them.

Every method that applies parts returns the variables last, in both modes: updated
BatchNorm statistics in training, the variables it was given in inference, so that one
call site serves both (`apply` is `(logits, variables)`, `features` is `(logits, feats,
variables)`).

Feature distillation reads more than block outputs: the stem output, each block's output
before its final ReLU and the pooled embedding (what mdistiller's models return as
`feats`, `preact_feats` and `pooled_feat`). These live inside the parts, so the parts
record them with `tap` (Flax `sow` into the `intermediates` collection, a no-op unless
that collection is mutable) and `BlockNet.taps` collects them from one forward pass; the
normal path computes exactly what it did without them.

Text networks (`TextBlockNet`) keep the same contract with other values flowing through
it. Their input is one int32 array `(batch, 3, length)` whose rows are the token ids, the
segment (token type) ids and the padding mask (`text_input` packs it), so every path that
moves an array batch (sharding, prefetching, device-resident data) moves text unchanged.
Every block returns, and every block after the first and the head take, `MaskedTokens`:
the token features `(batch, length, dim)` with the padding mask `(batch, length)` beside
them, so each block's attention sees which positions are padding. A pytree is as
jittable as an array, and CNN and ViT BlockNets, whose parts see a plain array, are not
affected. Text networks have no feature maps: `taps` refuses them in words.

Random keys: parts with dropout (BERT's) draw it from Flax's `dropout` RNG stream, and
apply it only in training and only when given a key. `apply_block`, `apply_head`,
`apply_range`, `features` and `apply` take an optional `rng`, from which each part gets
its own key (`part_rng`); without one, training computes what inference does.
Parts without dropout ignore the key, so CNN and ViT BlockNets compute the same either way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax.parts import Parts, Variables, part_variables, with_part

# The collection parts record their feature taps in: Flax's `intermediates`, which `init`
# leaves out by default, so variable trees stay as they were. Then the taps a part may record.
TAPS = "intermediates"
STEM = "stem"  # block 1: the stem's output
PREACT = "preact"  # a block: its output before the final ReLU
# A part: the pre-activation of its *input*, for networks whose blocks end before their
# normalisation, which the next part applies (pre-activation WRN); stands for the
# previous block's PREACT.
INPUT_PREACT = "input_preact"
POOLED = "pooled"  # the head: the pooled embedding the classifier reads
_TAP_NAMES = frozenset({STEM, PREACT, INPUT_PREACT, POOLED})


class Taps(NamedTuple):
    """The features distillation methods read, NHWC, from one forward pass.

    As mdistiller's models return them (`mdistiller/models/cifar/*.py`,
    `models/imagenet/*.py`): `stem` is `feats[0]`, `blocks` are `feats[1:]`, the outputs
    of the network's native blocks (stages), `preact` are `preact_feats[1:]`, those
    outputs before their final ReLU, and `pooled` is `pooled_feat`, the embedding fed to
    the classifier. The model docstrings say what each family records where its blocks
    end without a ReLU. For networks whose blocks output token sequences (`prefix_tokens`
    set), `blocks` hold the blocks' patch tokens as maps (`patch_grid`), and the parts
    record `stem` and `preact` as such maps, so that every feature method reads NHWC.
    """

    stem: jax.Array
    blocks: tuple[jax.Array, ...]
    preact: tuple[jax.Array, ...]
    pooled: jax.Array


def tap(module: nn.Module, name: str, value: jax.Array | Callable[[], jax.Array]) -> None:
    """Records `value` as tap `name` of the part `module` is the top module of.

    Does nothing unless the `intermediates` collection is mutable, as only `BlockNet.taps`
    makes it. A tap the forward pass does not compute anyway is passed as a function that
    computes it, called only then.
    """
    if module.is_mutable_collection(TAPS):
        module.sow(TAPS, name, value() if callable(value) else value)


def grid_side(tokens: int, prefix_tokens: int) -> int:
    """The side g of the patch grid in a sequence of `prefix_tokens + g*g` tokens."""
    g = math.isqrt(max(tokens - prefix_tokens, 0))
    if g == 0 or g * g != tokens - prefix_tokens:
        raise ValueError(
            f"{tokens} tokens less {prefix_tokens} prefix tokens are not a square grid of patches"
        )
    return g


def patch_grid(tokens: jax.Array, prefix_tokens: int) -> jax.Array:
    """The patch tokens of `(batch, prefix_tokens + g*g, dim)` as a `(batch, g, g, dim)` map.

    The tokens after the `prefix_tokens` leading ones (a class token) are a square grid in
    row-major order, as a ViT's patch embedding lays them out.
    """
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens (batch, tokens, dim), got shape {tokens.shape}")
    batch, count, dim = tokens.shape
    g = grid_side(count, prefix_tokens)
    return tokens[:, prefix_tokens:].reshape(batch, g, g, dim)


def part_rng(rng: jax.Array | None, index: int) -> jax.Array | None:
    """The key of part `index` (block i: i, the head: 0) from a network's `rng`, if any."""
    return None if rng is None else jax.random.fold_in(rng, index)


def _apply_tapped(
    module: nn.Module, variables: Variables, name: str, h: jax.Array, train: bool
) -> tuple[jax.Array, dict[str, jax.Array], Variables]:
    """`Parts.apply` that also returns the taps the part records: `(y, taps, variables)`."""
    mutable = [TAPS, "batch_stats"] if train else [TAPS]
    y, updates = module.apply(part_variables(variables, name), h, train=train, mutable=mutable)
    updates = dict(updates)
    sown = dict(updates.pop(TAPS, {}))
    if unknown := sown.keys() - _TAP_NAMES:
        raise ValueError(f"{name} records unknown taps {sorted(unknown)} (or from a submodule)")
    taps = {}
    for key, values in sown.items():
        if len(values) != 1:
            raise ValueError(f"{name} records tap {key!r} {len(values)} times")
        taps[key] = values[0]
    if train:
        variables = with_part(variables, name, updates)
    return y, taps, variables


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
      input_size: the image side the network requires, when it is fixed (a ViT's position
        embeddings); None when any size that survives the downsampling works.
      prefix_tokens: for networks whose blocks output token sequences `(batch, tokens,
        dim)` (ViT), how many leading tokens are not patches (the class token); the rest
        are a square grid of patch tokens in row-major order. 0 for feature maps.
    """

    name: str
    blocks: tuple[nn.Module, ...]
    head: nn.Module
    post_activation: bool = True
    input_channels: int = 3
    input_size: int | None = None
    prefix_tokens: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @staticmethod
    def part_name(i: int) -> str:
        return f"block{i}"

    @property
    def parts(self) -> Parts:
        """Blocks 1..n, then the head."""
        names = tuple(self.part_name(i) for i in range(1, self.num_blocks + 1))
        return Parts((*names, "head"), (*self.blocks, self.head))

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
        if self.input_size is not None and x.shape[1:3] != (self.input_size,) * 2:
            raise ValueError(
                f"{self.name}: expected {self.input_size}x{self.input_size} images, got "
                f"shape {x.shape}"
            )

    def _check_index(self, i: int) -> None:
        if not 1 <= i <= self.num_blocks:
            raise ValueError(f"{self.name}: block index {i} outside 1..{self.num_blocks}")

    def init(self, key: jax.Array, x: jax.Array) -> dict[str, Any]:
        """Initialises every part by running `x` through the network once."""
        self.check_input(x)
        return self.parts.init_chain(key, x)

    def apply_block(
        self,
        variables: Variables,
        i: int,
        h: jax.Array,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """Block i (1-based): `(y, variables)`."""
        self._check_index(i)
        if i == 1:
            self.check_input(h)
        name = self.part_name(i)
        return self.parts.apply(variables, name, h, train=train, rng=part_rng(rng, i))

    def apply_head(
        self,
        variables: Variables,
        h: jax.Array,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """The head: `(logits, variables)`."""
        return self.parts.apply(variables, "head", h, train=train, rng=part_rng(rng, 0))

    def apply_range(
        self,
        variables: Variables,
        h: jax.Array,
        start: int,
        stop: int,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """Blocks start..stop (inclusive, 1-based): `(h, variables)`; none when `stop < start`."""
        for i in range(start, stop + 1):
            h, variables = self.apply_block(variables, i, h, train=train, rng=rng)
        return h, variables

    def features(
        self,
        variables: Variables,
        x: jax.Array,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, list[jax.Array], Variables]:
        """Logits and the output of every block: `(logits, [f_1..f_n], variables)`."""
        feats = []
        h = x
        for i in range(1, self.num_blocks + 1):
            h, variables = self.apply_block(variables, i, h, train=train, rng=rng)
            feats.append(h)
        logits, variables = self.apply_head(variables, h, train=train, rng=rng)
        return logits, feats, variables

    def apply(
        self,
        variables: Variables,
        x: jax.Array,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """The whole network: `(logits, variables)`."""
        logits, _, variables = self.features(variables, x, train=train, rng=rng)
        return logits, variables

    def taps(
        self, variables: Variables, x: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, Taps, Variables]:
        """Logits and the feature `Taps` of one pass: `(logits, taps, variables)`.

        See `tapped_features`, which also returns the blocks' outputs.
        """
        logits, _, taps, variables = self.tapped_features(variables, x, train=train)
        return logits, taps, variables

    def tapped_features(
        self, variables: Variables, x: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, list[jax.Array], Taps, Variables]:
        """`(logits, [f_1..f_n], taps, variables)` of one pass.

        `f_i` are the outputs of this BlockNet's blocks, as `features` returns them; the
        `blocks` taps are the same, except for token networks (`prefix_tokens`), whose
        `blocks` taps are their patch tokens as maps (`patch_grid`).

        Block 1 records the `stem`, the head `pooled`; each native block's output is a
        `blocks` entry, with its `preact` recorded by the block itself or, as
        `input_preact`, by the part after it. A block 1 that records no pre-activation is
        the stem alone (VGG's `block0`) and not a native block.
        """
        self.check_input(x)
        parts = self.parts
        names = parts.names[:-1]
        outputs, recorded = [], []
        h = x
        for name, module in zip(parts.names, parts.modules):
            h, taps, variables = _apply_tapped(module, variables, name, h, train)
            outputs.append(h)
            recorded.append(taps)
        blocks, preact = [], []
        for i, name in enumerate(names):
            own, given = recorded[i].get(PREACT), recorded[i + 1].get(INPUT_PREACT)
            if own is not None and given is not None:
                raise ValueError(f"{self.name}: {name}'s pre-activation is recorded twice")
            if own is None and given is None:
                if i == 0:
                    continue
                raise ValueError(f"{self.name}: {name} records no pre-activation")
            blocks.append(
                patch_grid(outputs[i], self.prefix_tokens) if self.prefix_tokens else outputs[i]
            )
            preact.append(own if own is not None else given)
        for part, key in ((0, STEM), (-1, POOLED)):
            if key not in recorded[part]:
                raise ValueError(f"{self.name}: no {key!r} tap recorded")
        taps = Taps(recorded[0][STEM], tuple(blocks), tuple(preact), recorded[-1][POOLED])
        return h, outputs[:-1], taps, variables


TEXT_ROWS = ("input_ids", "token_type_ids", "attention_mask")  # rows of a text input


class MaskedTokens(NamedTuple):
    """What a text network's blocks pass on: token features and the padding mask.

    `tokens` is `(batch, length, dim)`; `mask` is `(batch, length)`, 1 at real tokens and
    0 at padding. Only the positions the mask marks carry meaning.
    """

    tokens: jax.Array
    mask: jax.Array


def text_input(input_ids: Any, token_type_ids: Any, attention_mask: Any) -> jax.Array:
    """The `(batch, 3, length)` int32 input of a `TextBlockNet`, rows as `TEXT_ROWS`."""
    return jnp.stack([input_ids, token_type_ids, attention_mask], axis=1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TextBlockNet(BlockNet):
    """A BlockNet over token sequences with a padding mask (module docstring).

    Block 1 takes the packed `(batch, 3, length)` int32 input (`text_input`); blocks
    return `MaskedTokens`; the head maps the last block's `MaskedTokens` to logits.
    """

    input_channels: int = len(TEXT_ROWS)

    def check_input(self, x: jax.Array) -> None:
        """Raises ValueError unless `x` is a `(batch, 3, length)` integer array."""
        if x.ndim != 3 or x.shape[1] != len(TEXT_ROWS):
            raise ValueError(
                f"{self.name}: expected a text input of shape (batch, {len(TEXT_ROWS)}, "
                f"length) with rows {', '.join(TEXT_ROWS)} (bkd_jax.blocknet.text_input), "
                f"got shape {x.shape}"
            )
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{self.name}: expected integer token ids, got dtype {x.dtype}")

    def tapped_features(
        self, variables: Variables, x: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, list[jax.Array], Taps, Variables]:
        """Refused: feature taps are NHWC maps, which a text network does not have."""
        raise ValueError(
            f"{self.name} is a text network: it has no feature maps for methods that read "
            "feature taps; use a logit method (ce, kd, dkd, dist, wttm, blockkd, blockkd_lite)"
        )
