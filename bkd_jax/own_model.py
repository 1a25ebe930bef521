"""Your own Flax network as a BlockNet, so Block-KD works between it and any zoo model.

Block-KD needs the network cut into n blocks and a head, each a Flax module of its own:

- block 1 takes the NHWC images (it includes the stem); every block returns an NHWC
  feature map (batch, height, width, channels), because connectors pool or upsample its
  spatial axes and mix its channels with a 1x1 convolution; or, for a transformer
  (`prefix_tokens` set), a token sequence (batch, prefix_tokens + g*g, dim) whose tokens
  after the prefix are a g x g patch grid in row-major order (see `bkd_jax.models.vit`);
- the head takes the last block's map and returns the logits (pooling, classifier);
- BatchNorm statistics live in the "batch_stats" collection and change only in training.

`BlockNet(name, blocks, head)` takes such modules as they are when each is called as
`module(h, train=...)`. `as_blocknet` also takes modules that name their mode differently
(`training`, or `deterministic` / `use_running_average`, which mean the opposite) or take
none, wrapping only those, and `check_blocknet` traces a network once on abstract input
and names the part that breaks the contract.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax.blocknet import BlockNet, grid_side

_TRAIN_FLAGS = ("train", "training")  # True in training
_EVAL_FLAGS = ("deterministic", "use_running_average")  # True in inference


class _ModeAdapter(nn.Module):
    """Calls `module(h)` with the mode under the keyword it takes (or none)."""

    module: nn.Module
    keyword: str | None

    def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
        if self.keyword is None:
            return self.module(h)
        return self.module(
            h, **{self.keyword: train if self.keyword in _TRAIN_FLAGS else not train}
        )


def _mode_keyword(module: nn.Module) -> str | None:
    """The keyword of `module.__call__` that carries the mode; None when it has none."""
    parameters = inspect.signature(type(module).__call__).parameters
    return next((k for k in (*_TRAIN_FLAGS, *_EVAL_FLAGS) if k in parameters), None)


def _as_part(module: nn.Module) -> nn.Module:
    keyword = _mode_keyword(module)
    return module if keyword == "train" else _ModeAdapter(module, keyword)


def as_blocknet(
    name: str,
    blocks: Sequence[nn.Module],
    head: nn.Module,
    *,
    post_activation: bool = True,
    input_channels: int = 3,
    input_size: int | None = None,
    prefix_tokens: int = 0,
) -> BlockNet:
    """A BlockNet of your own blocks and head, whatever keyword each takes for its mode.

    Args:
      name: a name for messages (need not be a zoo name).
      blocks: the n block modules in order; block 1 includes the stem.
      head: the module from the last block's output to the logits.
      post_activation: whether block outputs come after a ReLU (ResNet v1 style; the
        connectors then end with a ReLU too) rather than before one (pre-activation).
      input_channels: channels of the input images (last axis).
      input_size: the image side the network requires, if fixed (position embeddings).
      prefix_tokens: for blocks that return token sequences, the number of leading
        non-patch tokens (a class token: 1); 0 for blocks that return feature maps.

    Modules whose `__call__` takes `train` are used as they are; the others are wrapped,
    which puts their variables one level deeper (under "module").
    """
    return BlockNet(
        name,
        tuple(_as_part(b) for b in blocks),
        _as_part(head),
        post_activation=post_activation,
        input_channels=input_channels,
        input_size=input_size,
        prefix_tokens=prefix_tokens,
    )


def _trace(net: BlockNet, what: str, fn, *args):
    """`jax.eval_shape(fn, *args)`, its errors prefixed with the part that raised them."""
    try:
        return jax.eval_shape(fn, *args)
    except Exception as e:
        raise ValueError(f"{net.name}: {what} fails: {type(e).__name__}: {e}") from e


def check_blocknet(net: BlockNet, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Checks the BlockNet contract on NHWC `input_shape` (per example) without computing.

    Returns the per-example output shape of every block. Raises ValueError naming the
    block or head that cannot be initialised or applied in either mode, returns something
    other than a feature map or, with `prefix_tokens`, a token sequence whose patch tokens
    form a square grid (blocks) or logits (head), or changes shape with the mode.
    """
    h = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    net.check_input(h)
    key = jax.random.key(0)
    shapes = []
    parts = [(f"block {i + 1}", m) for i, m in enumerate(net.blocks)] + [("head", net.head)]
    for what, module in parts:
        variables = _trace(
            net, f"{what} (init)", lambda k, x, m=module: m.init(k, x, train=False), key, h
        )
        out_eval = _trace(
            net, what, lambda v, x, m=module: m.apply(v, x, train=False), variables, h
        )
        out_train, _ = _trace(
            net,
            f"{what} (train=True)",
            lambda v, x, m=module: m.apply(v, x, train=True, mutable=["batch_stats"]),
            variables,
            h,
        )
        if out_train.shape != out_eval.shape:
            raise ValueError(
                f"{net.name}: {what} returns {out_train.shape} in training but "
                f"{out_eval.shape} in inference"
            )
        if what == "head":
            want, kind = 2, "logits (batch, classes)"
        elif net.prefix_tokens:
            want = 3
            kind = (
                f"tokens (batch, {net.prefix_tokens} + patches, dim); pooling and the "
                "classifier belong in the head"
            )
        else:
            want = 4
            kind = (
                "an NHWC feature map (batch, height, width, channels); pooling and the "
                "classifier belong in the head"
            )
        if out_eval.ndim != want:
            raise ValueError(f"{net.name}: {what} returns shape {out_eval.shape}; expected {kind}")
        if what != "head" and net.prefix_tokens:
            try:
                grid_side(out_eval.shape[1], net.prefix_tokens)
            except ValueError as e:
                raise ValueError(f"{net.name}: {what} returns shape {out_eval.shape}: {e}") from e
        if what != "head":
            shapes.append(tuple(out_eval.shape[1:]))
        h = out_eval
    return shapes
