"""PyTorch state dicts -> bkd_jax variables, for every zoo model, by one naming rule.

Distillation starts from a trained teacher, and the published ones (mdistiller's CIFAR
teachers, torchvision's ImageNet models) are PyTorch checkpoints. Zoo models name their
Flax submodules after PyTorch's state-dict paths, so one generic mapping converts them
all: split a key on '.', join every all-digit component to the one before it with '_'
(`layer1.0.downsample.0.weight` -> module `layer1_0/downsample_0`, leaf `weight`), and
find the part (`block1`..`blockN`, `head`) holding that module. Leaves map as

    conv / linear weight -> params kernel   (OIHW -> HWIO, (out, in) -> (in, out))
    BatchNorm weight     -> params scale
    bias                 -> params bias
    running_mean / _var  -> batch_stats mean / var      (num_batches_tracked dropped)

The conversion is all-or-nothing: every key must land on a model variable of the right
shape and every variable must be filled, or a ValueError lists all that did not fit.

As a command, it writes the converted teacher as a standalone variables checkpoint
(`bkd_jax.training.checkpointing.save_variables`):

    python -m bkd_jax.convert --model resnet32x4 --input ckpt_epoch_240.pth --output DIR
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bkd_jax import pth
from bkd_jax.blocknet import BlockNet
from bkd_jax.models import available, get_model
from bkd_jax.training import checkpointing

# PyTorch leaf -> where it may live in Flax: (collection, leaf) candidates, first match wins.
_TARGETS = {
    "weight": (("params", "kernel"), ("params", "scale")),
    "bias": (("params", "bias"),),
    "running_mean": (("batch_stats", "mean"),),
    "running_var": (("batch_stats", "var"),),
}
_TORCH_LEAF = {
    flax_leaf: torch_leaf for torch_leaf, targets in _TARGETS.items() for _, flax_leaf in targets
}
_IGNORED_LEAVES = frozenset({"num_batches_tracked"})

FlatKey = tuple[str, ...]  # (collection, part, *module path, leaf)


def module_path(torch_key: str) -> tuple[tuple[str, ...], str]:
    """The Flax module path and leaf of a PyTorch key, by the naming rule."""
    *components, leaf = torch_key.split(".")
    path: list[str] = []
    for c in components:
        if c.isdigit() and path:
            path[-1] += f"_{c}"
        else:
            path.append(c)
    return tuple(path), leaf


def _torch_key(flat_key: FlatKey) -> str:
    """The PyTorch key the naming rule maps onto a Flax variable (for messages)."""
    *path, leaf = flat_key[2:]
    return ".".join([re.sub(r"_(\d+)", r".\1", p) for p in path] + [_TORCH_LEAF[leaf]])


def _kernel_axes(ndim: int) -> tuple[int, ...]:
    """Transposition from PyTorch's (out, in, *spatial) to Flax's (*spatial, in, out)."""
    return (*range(2, ndim), 1, 0)


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The PyTorch shape of a variable of `flax_shape`."""
    if leaf != "kernel":
        return tuple(flax_shape)
    shape = [0] * len(flax_shape)
    for flax_axis, torch_axis in enumerate(_kernel_axes(len(flax_shape))):
        shape[torch_axis] = flax_shape[flax_axis]
    return tuple(shape)


def _probe_size(name: str) -> int:
    """An input side length valid for model `name` (small: only shapes are traced)."""
    return 64 if name.startswith("imagenet_") else 32


def variable_shapes(net: BlockNet) -> dict[FlatKey, jax.ShapeDtypeStruct]:
    """Every variable of `net`, flattened, as abstract shapes (nothing is computed)."""
    size = _probe_size(net.name)
    x = jax.ShapeDtypeStruct((1, size, size, net.input_channels), jnp.float32)
    return traverse_util.flatten_dict(jax.eval_shape(net.init, jax.random.key(0), x))


def _module_index(shapes: Mapping[FlatKey, Any], model_name: str) -> dict[FlatKey, str]:
    """(collection, *module path, leaf) -> the part that holds it."""
    index: dict[FlatKey, str] = {}
    for collection, part, *rest in shapes:
        key = (collection, *rest)
        if key in index:
            raise ValueError(
                f"{model_name}: module path {'/'.join(rest[:-1])} appears in both "
                f"{index[key]} and {part}; zoo models must name submodules uniquely"
            )
        index[key] = part
    return index


def _locate(torch_key: str, index: Mapping[FlatKey, str]) -> FlatKey | None:
    """The flat Flax key a PyTorch key fills, or None when the model has no such variable."""
    path, leaf = module_path(torch_key)
    for collection, flax_leaf in _TARGETS.get(leaf, ()):
        part = index.get((collection, *path, flax_leaf))
        if part is not None:
            return (collection, part, *path, flax_leaf)
    return None


def infer_num_classes(model_name: str, state_dict: Mapping[str, np.ndarray]) -> int:
    """The classifier width of the checkpoint: rows of the head's linear weight."""
    shapes = variable_shapes(get_model(model_name, 1))
    classifiers = [
        k
        for k, s in shapes.items()
        if k[:2] == ("params", "head") and k[-1] == "kernel" and s.shape[-1] == 1
    ]
    if len(classifiers) != 1:
        raise ValueError(f"{model_name}: cannot tell the classifier among {classifiers}")
    key = _torch_key(classifiers[0])
    if key not in state_dict or np.ndim(state_dict[key]) != 2:
        raise ValueError(
            f"{model_name}: the checkpoint has no 2-D classifier weight {key!r}, "
            "so its number of classes is unknown"
        )
    return int(np.shape(state_dict[key])[0])


def _mismatch_report(
    model_name: str, unexpected: list[str], missing: list[str], mismatched: list[str]
) -> str:
    lines = [f"cannot convert the checkpoint to {model_name}:"]
    for title, items in (
        ("unexpected keys (no such variable in the model)", unexpected),
        ("missing keys (model variables the checkpoint lacks)", missing),
        ("shape mismatches (PyTorch layout)", mismatched),
    ):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


def from_pytorch_state_dict(
    model_name: str, state_dict: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Variables of zoo model `model_name` holding the weights of a PyTorch state dict.

    The classifier width comes from the checkpoint; the result is what
    `get_model(model_name, num_classes).apply` takes. Raises ValueError for an unknown
    model and, listing every offender, for keys the model lacks, model variables the
    checkpoint lacks, and shapes that differ.
    """
    net = get_model(model_name, infer_num_classes(model_name, state_dict))
    shapes = variable_shapes(net)
    index = _module_index(shapes, model_name)
    filled: dict[FlatKey, jax.Array] = {}
    claimed: dict[FlatKey, str] = {}  # variable -> the key that landed on it
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        value = np.asarray(value)
        if module_path(key)[1] in _IGNORED_LEAVES:
            continue
        target = _locate(key, index)
        if target is None or target in claimed:
            also = f", same variable as {claimed[target]}" if target in claimed else ""
            unexpected.append(f"{key} {value.shape}{also}")
            continue
        claimed[target] = key
        expected = _torch_shape(shapes[target].shape, target[-1])
        if value.shape != expected:
            mismatched.append(f"{key}: checkpoint {value.shape}, model {expected}")
            continue
        if target[-1] == "kernel":
            value = np.transpose(value, _kernel_axes(value.ndim))
        filled[target] = jnp.asarray(value, shapes[target].dtype)
    missing = [
        f"{_torch_key(k)} {_torch_shape(s.shape, k[-1])}"
        for k, s in shapes.items()
        if k not in claimed
    ]
    if unexpected or missing or mismatched:
        raise ValueError(_mismatch_report(model_name, unexpected, missing, mismatched))
    return traverse_util.unflatten_dict(filled)


def from_pytorch_file(model_name: str, path: str | os.PathLike) -> dict[str, Any]:
    """Variables of zoo model `model_name` from a `.pth` checkpoint (see `bkd_jax.pth`)."""
    return from_pytorch_state_dict(model_name, pth.load_state_dict(path))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: convert a `.pth` file and save it with `checkpointing.save_variables`."""
    parser = argparse.ArgumentParser(
        prog="python -m bkd_jax.convert",
        description="Convert a PyTorch checkpoint of a zoo model into bkd_jax variables.",
    )
    parser.add_argument("--model", required=True, help="zoo model: " + ", ".join(available()))
    parser.add_argument("--input", required=True, help="the .pth file (torch.save zip format)")
    parser.add_argument("--output", required=True, help="directory to create; must not exist")
    args = parser.parse_args(argv)
    try:
        state_dict = pth.load_state_dict(args.input)
        num_classes = infer_num_classes(args.model, state_dict)
        variables = from_pytorch_state_dict(args.model, state_dict)
        metadata = {"model": args.model, "num_classes": num_classes, "source": args.input}
        # orbax wants absolute paths.
        checkpointing.save_variables(args.output, variables, metadata)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {args.model} ({num_classes} classes) from {args.input} to {args.output}")


if __name__ == "__main__":
    main()
