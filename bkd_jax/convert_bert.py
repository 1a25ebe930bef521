"""Hugging Face BERT checkpoints -> variables of a `bkd_jax.models.bert` encoder.

Reads `pytorch_model.bin` (torch.save's zip or legacy format, through `bkd_jax.pth`, no torch
needed) or `model.safetensors` (the `safetensors` package's numpy reader) of a
`bert-*` model, `BertModel`, `BertForPreTraining` or `BertForSequenceClassification`.
Keys map by the zoo's naming rule (`bkd_jax.convert.module_path`) once the `bert.` and
`encoder.` prefixes are dropped: `bert.encoder.layer.3.attention.self.query.weight` ->
`layer_3/attention/self/query` kernel (transposed), Embedding weights -> `embedding`,
LayerNorm weight / bias (`gamma` / `beta` in older files) -> scale / bias.

All-or-nothing: every encoder and pooler variable must be filled and every key must land
somewhere, or a ValueError names each offender. Two exceptions, both reported: the
pretraining heads (`cls.*`) and the `position_ids` buffer are dropped, and a checkpoint
without a `classifier` (a pretrained encoder, not yet fine-tuned) leaves the classifier
freshly initialised for `num_classes`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bkd_jax import pth
from bkd_jax.convert import FlatKey, _mismatch_report, module_path
from bkd_jax.models import bert

# Hugging Face leaf -> Flax leaf candidates, first match wins; old files say gamma / beta.
_LEAVES = {
    "weight": ("kernel", "scale", "embedding"),
    "gamma": ("scale",),
    "bias": ("bias",),
    "beta": ("bias",),
}
_DROPPED_PREFIXES = ("cls.",)  # BertForPreTraining's masked-LM and next-sentence heads
_DROPPED_SUFFIXES = ("position_ids",)  # a buffer (arange), not a weight
CLASSIFIER = "classifier."


class Converted(NamedTuple):
    """Variables of the model, and what the conversion left out or left initialised."""

    variables: dict[str, Any]
    num_classes: int
    dropped: tuple[str, ...]  # keys deliberately not read (pretraining heads, buffers)
    initialised: tuple[str, ...]  # model variables the checkpoint lacks by design


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `.safetensors` or torch.save (`.bin`, `.pth`) file as numpy."""
    if pathlib.Path(path).suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(os.fspath(path))
    return pth.load_state_dict(path)


def infer_num_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
    """Rows of the classifier weight, or None when the checkpoint has no classifier."""
    weight = state_dict.get(CLASSIFIER + "weight")
    return None if weight is None else int(np.shape(weight)[0])


def _flax_path(key: str) -> tuple[tuple[str, ...], str]:
    """Module path and Hugging Face leaf of `key`, after the `bert.` / `encoder.` prefixes."""
    key = key.removeprefix("bert.").removeprefix("encoder.")
    return module_path(key)


def from_state_dict(
    model_name: str,
    state_dict: Mapping[str, np.ndarray],
    *,
    num_classes: int | None = None,
    key: jax.Array | None = None,
    **model_options: Any,
) -> Converted:
    """Variables of text model `model_name` from a BERT state dict.

    `model_options` are those of `bkd_jax.models.bert.bert` (`groups`, table sizes).
    `num_classes` is read from a checkpoint with a classifier (and must agree when
    given); a checkpoint without one needs it, and its classifier is initialised from
    `key`. Raises ValueError naming every unknown key, missing variable and shape
    mismatch.
    """
    found = infer_num_classes(state_dict)
    if found is not None and num_classes not in (None, found):
        raise ValueError(f"the checkpoint's classifier has {found} classes, not {num_classes}")
    if found is None and num_classes is None:
        raise ValueError("the checkpoint has no classifier: give the number of classes")
    num_classes = found or num_classes
    net = bert.get_model(model_name, num_classes, **model_options)
    x = jnp.zeros((1, 3, 8), jnp.int32)
    init = net.init(jax.random.key(0) if key is None else key, x)
    flat = traverse_util.flatten_dict(init)
    index = {(col, *rest): (col, part, *rest) for col, part, *rest in flat}
    filled: dict[FlatKey, jax.Array] = {}
    claimed: dict[FlatKey, str] = {}
    unexpected, mismatched, dropped = [], [], []
    for name, value in state_dict.items():
        value = np.asarray(value)
        if name.startswith(_DROPPED_PREFIXES) or name.endswith(_DROPPED_SUFFIXES):
            dropped.append(name)
            continue
        path, leaf = _flax_path(name)
        targets = [index.get(("params", *path, f)) for f in _LEAVES.get(leaf, ())]
        target = next((t for t in targets if t is not None), None)
        if target is None or target in claimed:
            also = f", same variable as {claimed[target]}" if target in claimed else ""
            unexpected.append(f"{name} {value.shape}{also}")
            continue
        claimed[target] = name
        if target[-1] == "kernel":
            value = value.T
        if value.shape != flat[target].shape:
            mismatched.append(f"{name}: checkpoint {value.shape}, model {flat[target].shape}")
            continue
        filled[target] = jnp.asarray(value, flat[target].dtype)
    classifier_missing = found is None
    missing, initialised = [], []
    for target, value in flat.items():
        if target in claimed:
            continue
        described = f"{'/'.join(target[1:])} {value.shape}"
        if classifier_missing and "classifier" in target:
            initialised.append(described)
            filled[target] = value
        else:
            missing.append(described)
    if unexpected or missing or mismatched:
        raise ValueError(_mismatch_report(model_name, unexpected, missing, mismatched))
    variables = traverse_util.unflatten_dict(filled)
    return Converted(variables, num_classes, tuple(dropped), tuple(initialised))


def from_file(model_name: str, path: str | os.PathLike, **options) -> Converted:
    """`from_state_dict` of the tensors in `path` (`.safetensors`, `.bin` or `.pth`)."""
    return from_state_dict(model_name, load_state_dict(path), **options)
