"""Named parts: Flax modules applied one at a time as pure functions of one variable tree.

A network's blocks and head, Block-KD's connectors and a feature method's heads are each
a few Flax modules trained together and applied one by one. `Parts` names them and keeps
their variables in one tree, part `name`'s under ``variables[collection][name]`` in every
collection it has ("params", "batch_stats"): the layout of checkpoints and converters.

One return convention, whatever the mode, so that callers never branch on it: applying a
part gives ``(y, variables)``, the variables with the part's BatchNorm statistics updated
in training and the variables it was given in inference. Parts with dropout draw it from
the `DROPOUT` RNG stream, only in training and only when given a key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

Variables = Mapping[str, Any]
DROPOUT = "dropout"  # the Flax RNG stream of parts with dropout


def part_variables(variables: Variables, name: str) -> dict[str, Any]:
    """The variables of part `name`, collection by collection."""
    return {col: tree[name] for col, tree in variables.items() if name in tree}


def with_part(variables: Variables, name: str, updates: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` with the collections in `updates` replaced for part `name`."""
    new = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in updates.items():
        new.setdefault(col, {})[name] = tree
    return new


@dataclasses.dataclass(frozen=True)
class Parts:
    """Flax modules by name, their variables in one tree (module docstring)."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]

    def module(self, name: str) -> nn.Module:
        return self.modules[self.names.index(name)]

    def init(self, key: jax.Array, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Variables of the parts named in `inputs`, each initialised on its example input.

        A part's variables do not depend on which others are initialised, so Block-KD can
        leave out the connectors of the stones it does not train.
        """
        keys = dict(zip(self.names, jax.random.split(key, len(self.names))))
        variables: dict[str, Any] = {}
        for name, x in inputs.items():
            part = self.module(name).init(keys[name], x, train=False)
            variables = with_part(variables, name, part)
        return variables

    def init_chain(self, key: jax.Array, x: Any) -> dict[str, Any]:
        """Variables of every part, each initialised on its predecessor's output on `x`.

        The parts of a network, whose input shapes follow from the network's input.
        """
        variables: dict[str, Any] = {}
        keys = jax.random.split(key, len(self.names))
        for name, module, k in zip(self.names, self.modules, keys):
            part = module.init(k, x, train=False)
            x = module.apply(part, x, train=False)
            variables = with_part(variables, name, part)
        return variables

    def apply(
        self,
        variables: Variables,
        name: str,
        h: Any,
        *,
        train: bool,
        rng: jax.Array | None = None,
    ) -> tuple[Any, Variables]:
        """Part `name` on `h`: `(y, variables)`, updated in training (module docstring).

        `rng`, in training only, is the part's `dropout` key.
        """
        module, part = self.module(name), part_variables(variables, name)
        if not train:
            return module.apply(part, h, train=False), variables
        rngs = {} if rng is None else {DROPOUT: rng}
        y, updates = module.apply(part, h, train=True, mutable=["batch_stats"], rngs=rngs)
        return y, with_part(variables, name, updates)
