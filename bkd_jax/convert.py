"""PyTorch state dicts -> bkd_jax variables, for every zoo model, by one naming rule.

Distillation starts from a trained teacher, and the published ones (mdistiller's CIFAR
teachers, torchvision's ImageNet models) are PyTorch checkpoints. Zoo models name their
Flax submodules after PyTorch's state-dict paths, so one generic mapping converts them
all: split a key on '.', join every all-digit component to the one before it with '_'
(`layer1.0.downsample.0.weight` -> module `layer1_0/downsample_0`, leaf `weight`), and
find the part (`block1`..`blockN`, `head`) holding that module. Leaves map as

    conv / linear weight -> params kernel   (OIHW -> HWIO, (out, in) -> (in, out))
    Batch/LayerNorm weight -> params scale
    bias                 -> params bias
    running_mean / _var  -> batch_stats mean / var      (num_batches_tracked dropped)
    cls_token, pos_embed -> params cls_token, pos_embed (a ViT's, shapes as they are)

so timm's ViTs (`deit_tiny_patch16_224` -> `vit_tiny`) convert by the same rule.

The conversion is all-or-nothing: every key must land on a model variable of the right
shape and every variable must be filled, or a ValueError lists all that did not fit.

As a command, it writes each converted model as a standalone variables checkpoint
(`bkd_jax.training.checkpointing.save_variables`). It takes one `.pth` file, whose model
`--model` names or, for torchvision's released ImageNet ResNets, the file name tells; or
mdistiller's archive of CIFAR-100 teachers (`cifar_teachers.tar`, or the folder it
extracts to), converting every teacher in it into `--output/<zoo name>`:

    python -m bkd_jax.convert --model resnet32x4 --input ckpt_epoch_240.pth --output DIR
    python -m bkd_jax.convert --input resnet18-f37072fd.pth --output teachers/imagenet_resnet18
    python -m bkd_jax.convert --input cifar_teachers.tar --output teachers

Hugging Face BERT checkpoints (`pytorch_model.bin` or `model.safetensors`) convert into
the text models of `bkd_jax.models.bert` (`bkd_jax.convert_bert`), with `--num-classes`
for a checkpoint without a classifier and `--groups` for the blocks to cut it into:

    python -m bkd_jax.convert --model bert_base --input model.safetensors --num-classes 2 \
        --groups 3 --output teachers/bert_base
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import pickle
import re
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bkd_jax import pth
from bkd_jax import shapes as shape_cache
from bkd_jax.blocknet import BlockNet
from bkd_jax.models import available, bert, get_model, smallest_input_size

# PyTorch leaf -> where it may live in Flax: (collection, leaf) candidates, first match wins.
_TARGETS = {
    "weight": (("params", "kernel"), ("params", "scale")),
    "bias": (("params", "bias"),),
    "running_mean": (("batch_stats", "mean"),),
    "running_var": (("batch_stats", "var"),),
    # A ViT's (timm's) own parameters, kept in timm's shapes: (1, 1, dim), (1, tokens, dim).
    "cls_token": (("params", "cls_token"),),
    "pos_embed": (("params", "pos_embed"),),
}
_TORCH_LEAF = {
    flax_leaf: torch_leaf for torch_leaf, targets in _TARGETS.items() for _, flax_leaf in targets
}
_IGNORED_LEAVES = frozenset({"num_batches_tracked"})

# mdistiller's released CIFAR-100 teachers, `cifar_teachers.tar`: the folder of each (with
# the checkpoint file inside it) as mdistiller/models/cifar/__init__.py names them in
# `cifar_model_dict`, the zoo model, and the top-1 (%) on CIFAR-100 that the DKD paper
# (Zhao et al., CVPR 2022, Tables 1 and 2, teacher rows) reports for it.
MDISTILLER_CHECKPOINT = "ckpt_epoch_240.pth"
MDISTILLER_TEACHERS = {
    "resnet56_vanilla": ("resnet56", 72.34),
    "resnet110_vanilla": ("resnet110", 74.31),
    "resnet32x4_vanilla": ("resnet32x4", 79.42),
    "ResNet50_vanilla": ("resnet50", 79.34),
    "wrn_40_2_vanilla": ("wrn_40_2", 75.61),
    "vgg13_vanilla": ("vgg13", 74.64),
}
# torchvision's ImageNet ResNets by released file name (the URLs of
# torchvision/models/resnet.py), the zoo model, and the ImageNet-1k top-1 (%) of those
# weights in torchvision's documentation (ResNet*_Weights, acc@1).
TORCHVISION_FILES = {
    "resnet18-f37072fd.pth": ("imagenet_resnet18", 69.758),  # IMAGENET1K_V1
    "resnet34-b627a593.pth": ("imagenet_resnet34", 73.314),  # IMAGENET1K_V1
    "resnet50-0676ba61.pth": ("imagenet_resnet50", 76.130),  # IMAGENET1K_V1
    "resnet50-11ad3fa6.pth": ("imagenet_resnet50", 80.858),  # IMAGENET1K_V2
}

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


def variable_shapes(net: BlockNet) -> dict[FlatKey, jax.ShapeDtypeStruct]:
    """Every variable of `net`, flattened, as abstract shapes (nothing is computed).

    Traced once per network (`bkd_jax.shapes`): each conversion of a model reads them.
    """
    size = smallest_input_size(net)
    shape = (size, size, net.input_channels)
    return traverse_util.flatten_dict(shape_cache.variable_shapes(net, shape))


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


class Job(NamedTuple):
    """One conversion of the command line: a .pth file into a new checkpoint directory."""

    model: str
    source: pathlib.Path
    output: pathlib.Path
    published_top1: float | None  # the publisher's figure (%), when known
    label: str  # where the file came from, for messages and the metadata


def archive_jobs(
    root: pathlib.Path, output: pathlib.Path, label: str
) -> tuple[list[Job], list[str]]:
    """Every mdistiller teacher under `root` (`<folder>/ckpt_epoch_240.pth` at any depth),
    to `output/<zoo name>`, and the checkpoint folders that are not known teachers.
    `label` stands for `root` in messages."""
    jobs, unknown = [], []
    for path in sorted(root.rglob(MDISTILLER_CHECKPOINT)):
        folder = path.parent.name
        if folder not in MDISTILLER_TEACHERS:
            unknown.append(folder)
            continue
        model, top1 = MDISTILLER_TEACHERS[folder]
        where = f"{label}{path.relative_to(root)}"
        jobs.append(Job(model, path, output / model, top1, where))
    return jobs, unknown


def file_job(path: pathlib.Path, model: str | None, output: pathlib.Path) -> Job:
    """The conversion of one .pth file; its model from `model` or its released name."""
    known = TORCHVISION_FILES.get(path.name)
    if model is None and known is None:
        raise ValueError(
            f"cannot tell the model of {path.name}; name it with --model (known file names: "
            f"{', '.join(TORCHVISION_FILES)})"
        )
    if model is not None and known is not None and known[0] != model:
        raise ValueError(f"{path.name} is torchvision's {known[0]}, not {model}")
    return Job(model or known[0], path, output, known[1] if known else None, str(path))


@contextlib.contextmanager
def _input_tree(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """`path` itself, or a temporary folder with the .pth files of the tar archive `path`."""
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".pth")]
        archive.extractall(tmp, members=members, filter="data")
        yield pathlib.Path(tmp)


def convert_file(job: Job) -> int:
    """Converts `job.source` and saves it to `job.output`; returns its number of classes."""
    from bkd_jax.training import checkpointing  # orbax: loaded only once there is work

    state_dict = pth.load_state_dict(job.source)
    num_classes = infer_num_classes(job.model, state_dict)
    variables = from_pytorch_state_dict(job.model, state_dict)
    metadata = {"model": job.model, "num_classes": num_classes, "source": job.label}
    if job.published_top1 is not None:
        metadata["published_top1"] = job.published_top1
    checkpointing.save_variables(job.output, variables, metadata)
    return num_classes


def _run(jobs: Sequence[Job]) -> None:
    """Converts every job, after checking that none of the outputs exists yet."""
    existing = [str(job.output) for job in jobs if job.output.exists()]
    if existing:
        raise ValueError(f"{', '.join(existing)} already exists; refusing to overwrite it")
    for job in jobs:
        num_classes = convert_file(job)
        print(f"wrote {job.model} ({num_classes} classes) from {job.label} to {job.output}")
        if job.published_top1 is not None:
            print(f"  its publisher reports {job.published_top1}% top-1")


def _convert_bert(
    model: str, source: pathlib.Path, output: pathlib.Path, num_classes: int | None, groups: int
) -> None:
    """Converts one Hugging Face BERT file and saves it as `save_variables` does."""
    from bkd_jax import convert_bert
    from bkd_jax.training import checkpointing

    if output.exists():
        raise ValueError(f"{output} already exists; refusing to overwrite it")
    done = convert_bert.from_file(model, source, num_classes=num_classes, groups=groups)
    metadata = {
        "model": model, "num_classes": done.num_classes, "groups": groups, "source": str(source)
    }  # fmt: skip
    checkpointing.save_variables(output, done.variables, metadata)
    print(f"wrote {model} ({done.num_classes} classes, {groups} blocks) from {source} to {output}")
    if done.dropped:
        print(f"  dropped {len(done.dropped)} keys: pretraining heads and buffers")
    if done.initialised:
        print(f"  no classifier in the checkpoint: initialised {', '.join(done.initialised)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: convert `.pth` files and save each with `checkpointing.save_variables`."""
    parser = argparse.ArgumentParser(
        prog="python -m bkd_jax.convert",
        description=(
            "Convert PyTorch checkpoints of zoo models into bkd_jax checkpoints: one .pth "
            "file, or every teacher in mdistiller's cifar_teachers.tar (or its folder)."
        ),
    )
    parser.add_argument(
        "--model",
        help="zoo model of a single .pth file; optional for torchvision's released files "
        f"({', '.join(TORCHVISION_FILES)}). Zoo: {', '.join(available())}; BERT (a "
        f"Hugging Face .bin or .safetensors file): {', '.join(bert.MODELS)}",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="a .pth file (torch.save, zip or legacy format), or mdistiller's "
        "cifar_teachers.tar or the folder it extracts to",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="directory to create (must not exist); for an archive, the parent of one "
        "directory per teacher, named after its zoo model",
    )
    parser.add_argument(
        "--num-classes", type=int, help="BERT: classifier width when the checkpoint has none"
    )
    parser.add_argument("--groups", type=int, default=2, help="BERT: blocks to cut it into")
    args = parser.parse_args(argv)
    # orbax wants absolute paths.
    source, output = pathlib.Path(args.input), pathlib.Path(args.output).absolute()
    try:
        if not source.exists():
            raise ValueError(f"{source} does not exist")
        if args.model in bert.MODELS:
            _convert_bert(args.model, source, output, args.num_classes, args.groups)
            return
        if source.is_file() and not tarfile.is_tarfile(source):
            _run([file_job(source, args.model, output)])
            return
        if args.model:
            raise ValueError("--model names the model of one .pth file, not of an archive")
        label = f"{source}/" if source.is_dir() else f"{source}:"
        with _input_tree(source) as root:
            jobs, unknown = archive_jobs(root, output, label)
            for folder in unknown:
                print(f"skipped {folder}: not one of mdistiller's teachers")
            if not jobs:
                raise ValueError(
                    f"no mdistiller teacher in {source}: expected folders "
                    f"{', '.join(MDISTILLER_TEACHERS)} holding {MDISTILLER_CHECKPOINT}"
                )
            _run(jobs)
    except (OSError, ValueError, pickle.UnpicklingError, tarfile.TarError) as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
