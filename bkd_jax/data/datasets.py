"""Names, defaults and descriptions of the supported data sets; no TensorFlow.

Configs and the pure core import this module; `bkd_jax.data.pipeline`, which needs
TensorFlow, reads the data.

Config (`config.dataset`; `default_dataset_config(name)` fills in the defaults; a config
built for one data set whose `name` is then changed, as `--config.dataset.name=...` does,
takes the new data set's fields and defaults through `switch_dataset`):
  name: one of `DATASETS`: "cifar100", "cifar10", "imagenet2012" (TFDS), "image_folder"
    (``data_dir/<split>/<class>/<image>``; classes are the sorted class folder names of
    all splits, and every split has every class), "digits" (scikit-learn's 1797 8x8 grey
    digits, a fixed split of 1437 train / 360 test, values scaled from 0..16 to [0, 1]) or
    "npz" (``data_dir/<split>.npz`` with uint8 ``images`` and integer ``labels``, see
    `bkd_jax.data.arrays`).
  data_dir: TFDS data dir (None: TFDS's default), the image folder root or the folder of
    the .npz files. Default None.
  loader: one of `LOADERS`, how batches reach the devices. "device": every split is
    decoded once into uint8 arrays that live on each device; each step gathers its batch
    by index and augments it there (`bkd_jax.training.inputs`), with no per-step host
    work and no TensorFlow. "host": tf.data decodes and augments every batch on the host
    CPU (`bkd_jax.data.pipeline`; needs the ``tf`` extra). "auto": "device" when the data
    can be held that way (digits, npz, image folders, TFDS data in the ArrayRecord format;
    not the "inception" augmentation, which crops full-size images) and both decoded splits
    fit in ``device_memory_share`` of one device's memory, else "host"; the log says which
    and why. Default "auto".
  device_memory_share: the share of one device's memory (of host memory per CPU device)
    the decoded splits may take under loader "auto" or "device". Default 0.25.
  cutout: side of the square zeroed at a random centre of every normalised training
    image (DeVries & Taylor 2017, github uoguelph-mlrg/Cutout: 16 for CIFAR-10, 8 for
    CIFAR-100), after the other augmentation; 0 turns it off. Device loader only. Default 0.
  strong_view: one of `STRONG_VIEWS`, a second view of every training image for methods
    that use two (MLKD), as ``batch["image_strong"]``. "randaugment": MLKD's strong view
    (github Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py): a
    pad-crop-flip drawn apart from the weak view's, then RandAugment(2, 10) and Cutout
    (`bkd_jax.data.randaugment`), normalised as the weak view. Device loader only.
    Default "none".
  train_split, eval_split: whole split names. Default "train" / "test"
    ("train" / "validation" for imagenet2012).
  image_size: side of the square output images. Default 32 (CIFAR), 224 (imagenet2012,
    image_folder), 8 (digits).
  augment: one of `AUGMENTATIONS`. "crop_flip": pad 4 zero pixels, random crop
    image_size, random horizontal flip (mdistiller's CIFAR recipe). "inception": random
    resized crop (area 8%..100%, aspect 3/4..4/3) to image_size, random flip (of a JPEG
    only the crop window is decoded, see `pipeline.decode_encoded`); evaluation then
    resizes the shorter side to image_size * 256 / 224 and takes the centre crop.
    "none". Default "crop_flip" (CIFAR), "inception" (imagenet2012, image_folder),
    "none" (digits). Without "inception", images are resized to image_size (a no-op when
    they already have that size).
  mean, std: per-channel statistics of [0, 1] pixels used to normalise. Default the data
    set's own (ImageNet's for image_folder).
  bad_files (image_folder only): one of `BAD_FILES`, what to do with files of a split
    that are unreadable or have no image header. "fail": an error naming them when the
    data set is opened, before training. "skip": leave them out, logging how many and
    which. Default "fail".
  cache_dir (image_folder only): where the device loader caches decoded splits. Default
    None: ``data_dir/.bkd_jax_cache``.
  num_classes (npz only): the class count; labels must lie in [0, num_classes). Default
    None: the largest training label + 1.
  max_train_examples, max_eval_examples: use only the first that many examples of a split
    (quick runs, tests). Default None (all).

All images have 3 channels (grey ones are repeated); batches are
``{"image": float32 [B, H, W, 3], "label": int32 [B], "index": int32 [B]}`` plus
``"mask": bool [B]`` for eval; ``index`` is each example's position in its split (-1 for
eval padding). Every training epoch is a permutation of the whole training split drawn
from the seed and the epoch, the same for any number of processes (`bkd_jax.data.pipeline`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import numpy as np
from ml_collections import config_dict

DATASETS = ("cifar100", "cifar10", "imagenet2012", "image_folder", "digits", "npz")
AUGMENTATIONS = ("none", "crop_flip", "inception")
BAD_FILES = ("fail", "skip")
LOADERS = ("auto", "device", "host")
STRONG_VIEWS = ("none", "randaugment")

_CIFAR = {"image_size": 32, "augment": "crop_flip"}
_IMAGENET_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_LARGE = {"image_size": 224, "augment": "inception"}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar100": {
        **_CIFAR,
        "mean": (0.5071, 0.4867, 0.4408),
        "std": (0.2675, 0.2565, 0.2761),
    },
    "cifar10": {**_CIFAR, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "imagenet2012": {**_LARGE, **_IMAGENET_STATS, "eval_split": "validation"},
    "image_folder": {
        **_LARGE,
        **_IMAGENET_STATS,
        "bad_files": "fail",
        "cache_dir": config_dict.placeholder(str),
    },
    # Statistics of all 1797 digits scaled to [0, 1].
    "digits": {
        "image_size": 8,
        "augment": "none",
        "mean": (0.3053,) * 3,
        "std": (0.3760,) * 3,
    },
    # User arrays: CIFAR's size and recipe, ImageNet's statistics, until told otherwise.
    "npz": {**_CIFAR, **_IMAGENET_STATS, "num_classes": config_dict.placeholder(int)},
}


class DatasetInfo(NamedTuple):
    """What the model and the loop need to know about a data set (after max_* caps)."""

    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int


def default_dataset_config(name: str) -> ml_collections.ConfigDict:
    """The `config.dataset` for data set `name`, with the defaults documented above."""
    check_choice("dataset", name, DATASETS)
    return ml_collections.ConfigDict(
        {
            "name": name,
            "data_dir": config_dict.placeholder(str),
            "train_split": "train",
            "eval_split": "test",
            "max_train_examples": config_dict.placeholder(int),
            "max_eval_examples": config_dict.placeholder(int),
            "loader": "auto",
            "device_memory_share": 0.25,
            "cutout": 0,
            "strong_view": "none",
            **_DEFAULTS[name],
        }
    )


def switch_dataset(
    ds_config: ml_collections.ConfigDict, built_for: str
) -> ml_collections.ConfigDict:
    """The `config.dataset` of data set `ds_config.name`, from one built for `built_for`.

    Each data set has fields of its own (image_folder's `bad_files`) and defaults of its
    own (image size, augmentation, statistics), so a new name alone would leave the old
    data set's. A field left at `built_for`'s default takes the new data set's default; a
    field set away from it (by the recipe or the command line) keeps its value.

    Raises:
      ValueError: when such a set field does not exist for the new data set.
    """
    old, new = default_dataset_config(built_for), default_dataset_config(ds_config.name)
    for key, value in ds_config.items():
        if key == "name" or value == old[key]:
            continue
        if key not in new:
            raise ValueError(
                f"config.dataset.{key} is a field of {built_for}, not of {ds_config.name}"
            )
        new[key] = value
    return new


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
    """Training steps in one epoch; the last incomplete global batch is dropped."""
    return info.num_train // global_batch_size


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training examples in `epoch`: a permutation drawn from (seed, epoch).

    Both loaders order every epoch with it, so the global batch of step ``k = e * S + s``
    (S steps per epoch, global batch B) is ``perm_e[s * B : (s + 1) * B]`` for any number
    of processes and devices.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_examples)


def check_choice(kind: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"unknown {kind} {value!r}; known: {', '.join(known)}")
