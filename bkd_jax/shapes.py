"""Shapes of a BlockNet's variables, taps and block outputs, traced once per network.

Building a distiller reads shapes from its networks: connectors the blocks' output
shapes, heads the taps', WKD and OFD the teacher's parameters. Each is a
`jax.eval_shape` of the network's `init` (and of a forward pass), which computes nothing
but traces every layer in Python, seconds for a deep network; and a session building
several distillers of one pair (a sweep, a method grid, `make_distiller` called by several
builders) asked for the same shapes again and again. These functions memoise them, keyed
by the network (a frozen, hashable dataclass; two equal BlockNets compute the same
shapes) and the per-example input shape. Inputs are float32 NHWC images of batch one.

What a caller gets is its own copy of the containers (the `ShapeDtypeStruct` leaves are
immutable), so memoising changes no result; a network that cannot be hashed is traced
every time, as before. Errors are not memoised: a failing trace raises on every call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bkd_jax.blocknet import BlockNet, Taps

_CACHE_SIZE = 64  # networks x input shapes; each entry is a small tree of shapes


def _input(input_shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)


def _memoised(fn: Callable[[BlockNet, tuple[int, ...]], Any]):
    cached = functools.lru_cache(maxsize=_CACHE_SIZE)(fn)

    @functools.wraps(fn)
    def wrapper(net: BlockNet, input_shape: Sequence[int]) -> Any:
        key = tuple(input_shape[-3:])
        try:
            hash(net)
        except TypeError:  # a network with unhashable fields: trace it, as before
            return jax.tree.map(lambda a: a, fn(net, key))
        return jax.tree.map(lambda a: a, cached(net, key))

    wrapper.cache_clear = cached.cache_clear
    return wrapper


@_memoised
def variable_shapes(net: BlockNet, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """`net.init`'s variables as `ShapeDtypeStruct`s for NHWC `input_shape` (key 0)."""
    return jax.eval_shape(net.init, jax.random.key(0), _input(input_shape))


@_memoised
def tap_structs(net: BlockNet, input_shape: tuple[int, ...]) -> Taps:
    """`net.taps` (of its initial variables) as `Taps` of `ShapeDtypeStruct`s, batch one."""
    variables = variable_shapes(net, input_shape)
    return jax.eval_shape(lambda v, x: net.taps(v, x)[1], variables, _input(input_shape))


@_memoised
def block_output_structs(net: BlockNet, input_shape: tuple[int, ...]) -> list[Any]:
    """The output of every native block (`net.features`) as `ShapeDtypeStruct`s, batch one."""
    variables = variable_shapes(net, input_shape)
    return jax.eval_shape(lambda v, x: net.features(v, x)[1], variables, _input(input_shape))
