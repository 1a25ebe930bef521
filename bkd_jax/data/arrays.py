"""Whole splits as uint8 arrays in host memory, each image decoded once; no TensorFlow.

The device-memory loader (`bkd_jax.training.inputs`) copies these arrays to the devices
once and gathers every batch there. Sources:
  digits: scikit-learn's arrays (pixel values 0..16, white = 16).
  cifar10, cifar100 (TFDS in the ArrayRecord format): `tfds.data_source` reads the
    records by index and TFDS decodes the PNGs with PIL, without TensorFlow. TFDS's
    default TFRecord format has no reader without TensorFlow: `NeedsHostLoader`.
  image_folder (`bkd_jax.data.folders`): every file decoded with PIL and resized to
    ``image_size`` x ``image_size`` (bilinear, antialiased when shrinking). The decoded
    split is cached as an uncompressed ``.npz`` (`dataset.cache_dir`, by default the hidden
    folder ``.bkd_jax_cache`` inside the data dir), keyed by the image size and the files'
    names, sizes and modification times, so the next run loads it in a second.
  npz: ``data_dir/<split>.npz`` holding ``images`` (uint8 [N, H, W], [N, H, W, 1] or
    [N, H, W, 3], H = W = ``image_size``) and ``labels`` (integers in [0, num_classes);
    ``dataset.num_classes`` defaults to the largest training label + 1).
Grey images are repeated to 3 channels. With ``max_*_examples`` a split holds its first
examples, the same ones the tf.data pipeline reads.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import tempfile
from typing import NamedTuple

import ml_collections
import numpy as np
import PIL.Image
from absl import logging
from etils import epath

from bkd_jax.data import folders

_DECODE_THREADS = 16  # PIL releases the GIL while it decodes and resizes.
_TFDS_CHUNK = 1024  # Records per `__getitems__` call of a TFDS data source.
_CACHE_DIR = ".bkd_jax_cache"  # Hidden: the folder scanner ignores it.
_CACHE_VERSION = 1  # Bump when the decoded pixels of a cached split would change.


class NeedsHostLoader(Exception):
    """The data cannot be held as arrays; the message says why, for the log."""


class Split(NamedTuple):
    """One split in host memory."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int32 [N]


class ArraySource:
    """A data set whose splits load whole: class count, split sizes, the arrays."""

    num_classes: int
    white: int = 255  # the pixel value that maps to 1.0

    def count(self, split: str) -> int:
        raise NotImplementedError

    def load(self, split: str, num_examples: int) -> Split:
        """The first `num_examples` examples of `split`."""
        raise NotImplementedError


def open_source(ds_config: ml_collections.ConfigDict) -> ArraySource:
    """The array source of `ds_config`; `NeedsHostLoader` where there is none."""
    name = ds_config.name
    if name == "digits":
        return DigitsSource()
    if name == "image_folder":
        return _FolderSource(ds_config)
    if name == "npz":
        return _NpzSource(ds_config)
    return _TfdsSource(name, ds_config.data_dir)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, 1 or 3] -> [N, H, W, 3]."""
    if images.ndim == 3:
        images = images[..., None]
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class DigitsSource(ArraySource):
    """scikit-learn's 1797 digits, a fixed split: the first 360 of a seed-0 permutation are
    the test split. Their pixel values are 0..16, so 16 is white."""

    num_classes = 10
    white = 16
    _NUM_TEST = 360

    def __init__(self):
        from sklearn.datasets import load_digits  # Imported here: only this source needs it.

        digits = load_digits()
        images = to_rgb(digits.images.astype(np.uint8))
        labels = digits.target.astype(np.int32)
        order = np.random.default_rng(0).permutation(len(labels))
        test, train = order[: self._NUM_TEST], order[self._NUM_TEST :]
        self._splits = {
            "train": Split(images[train], labels[train]),
            "test": Split(images[test], labels[test]),
        }

    def count(self, split: str) -> int:
        if split not in self._splits:
            raise ValueError(f"digits has no split {split!r}; it has {sorted(self._splits)}")
        return len(self._splits[split].labels)

    def load(self, split: str, num_examples: int) -> Split:
        images, labels = self._splits[split]
        return Split(images[:num_examples], labels[:num_examples])


class _TfdsSource(ArraySource):
    """A TFDS data set prepared in the ArrayRecord format, read through `tfds.data_source`."""

    def __init__(self, name: str, data_dir: str | None):
        try:
            import tensorflow_datasets as tfds  # Only TFDS data sets need it.
        except ImportError:
            raise NeedsHostLoader(
                f"{name} needs tensorflow-datasets, which is not installed"
            ) from None
        self._name = name
        self._builder = tfds.builder(name, data_dir=data_dir)
        if not self._builder.info.splits:  # not prepared, or mocked by tfds.testing
            raise NeedsHostLoader(tfds_not_prepared_message(name, self._builder.data_dir))
        if self._builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise NeedsHostLoader(
                f"{name} is stored as {self._builder.info.file_format.value}, which only "
                f"tf.data reads (`tfds build {name} --file_format=array_record` makes it "
                "readable without TensorFlow)"
            )
        self.num_classes = self._builder.info.features["label"].num_classes

    def count(self, split: str) -> int:
        splits = self._builder.info.splits
        if split not in splits:
            raise ValueError(f"{self._name} has no split {split!r}; it has {sorted(splits)}")
        return splits[split].num_examples

    def load(self, split: str, num_examples: int) -> Split:
        records = self._builder.as_data_source(split)
        images, labels = [], []
        for start in range(0, num_examples, _TFDS_CHUNK):
            chunk = records.__getitems__(range(start, min(start + _TFDS_CHUNK, num_examples)))
            images += [example["image"] for example in chunk]
            labels += [example["label"] for example in chunk]
        return Split(to_rgb(np.stack(images)), np.asarray(labels, np.int32))


def tfds_not_prepared_message(name: str, builder_dir: str) -> str:
    """The one-line error for a TFDS data set missing from its data dir."""
    root = epath.Path(builder_dir).parents[1]
    message = (
        f"TFDS data set {name!r} is not prepared in data_dir {root} (searched "
        f"{builder_dir}); bkd_jax never downloads. Prepare it once on a machine with "
        f"network, `tfds build {name} --data_dir={root}`, and copy it there, or set "
        "dataset.data_dir to where it is."
    )
    if name == "imagenet2012":
        message += (
            " ImageNet cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar in {root}/downloads/manual before `tfds build`."
        )
    return message


class _FolderSource(ArraySource):
    """An image folder, decoded once with PIL (and cached) at `image_size`."""

    def __init__(self, ds_config: ml_collections.ConfigDict):
        self._folder = folders.ImageFolder(ds_config.data_dir, ds_config.bad_files)
        self._size = ds_config.image_size
        self._bad_files = ds_config.bad_files
        self._cache_dir = ds_config.cache_dir or folders.join(self._folder.root, _CACHE_DIR)
        self.num_classes = self._folder.num_classes

    def count(self, split: str) -> int:
        return len(self._folder.files(split).paths)

    def load(self, split: str, num_examples: int) -> Split:
        paths, labels = self._folder.files(split)
        paths, labels = paths[:num_examples], labels[:num_examples]
        cache = self._cache_path(split, paths)
        if cache is not None and os.path.exists(cache):
            with np.load(cache) as cached:
                logging.info("Read the decoded %s split from %s.", split, cache)
                return Split(cached["images"], cached["labels"])
        with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
            decoded = list(pool.map(self._decode, paths))
        bad = [
            (p, image) for p, image in zip(paths, decoded, strict=True) if isinstance(image, str)
        ]
        if bad:
            folders.report_bad_files(folders.join(self._folder.root, split), bad, self._bad_files)
            kept = [i for i, image in enumerate(decoded) if not isinstance(image, str)]
            decoded, labels = [decoded[i] for i in kept], labels[kept]
        result = Split(np.stack(decoded), labels.astype(np.int32))
        if cache is not None:
            _write_cache(cache, result)
        return result

    def _decode(self, path: str) -> np.ndarray | str:
        """uint8 [size, size, 3], or why the file does not decode."""
        try:
            with PIL.Image.open(io.BytesIO(epath.Path(path).read_bytes())) as image:
                image = image.convert("RGB")
                if image.size != (self._size, self._size):
                    image = image.resize((self._size, self._size), PIL.Image.Resampling.BILINEAR)
                return np.asarray(image, np.uint8)
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            return f"does not decode ({error})"

    def _cache_path(self, split: str, paths: np.ndarray) -> str | None:
        """Where the decoded split is cached; None for a folder that is not local."""
        if not os.path.isdir(self._folder.root):
            return None
        digest = hashlib.sha256(f"{_CACHE_VERSION} {self._size} {self._bad_files}".encode())
        for path in paths:
            stat = os.stat(path)
            digest.update(f"\n{path} {stat.st_size} {stat.st_mtime_ns}".encode())
        name = f"{split}-{self._size}px-{len(paths)}-{digest.hexdigest()[:16]}.npz"
        return os.path.join(self._cache_dir, name)


def _write_cache(path: str, split: Split) -> None:
    """Writes the decoded split atomically; a folder that cannot be written is logged."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
            np.savez(f, images=split.images, labels=split.labels)
        os.replace(f.name, path)
    except OSError as error:
        logging.warning(
            "Could not cache the decoded images in %s (%s); set dataset.cache_dir to a "
            "writable folder to start the next run faster.", folder, error,
        )  # fmt: skip
        return
    logging.info("Cached the decoded images in %s.", path)


class _NpzSource(ArraySource):
    """``data_dir/<split>.npz`` files of uint8 images and integer labels."""

    def __init__(self, ds_config: ml_collections.ConfigDict):
        self._dir = ds_config.data_dir
        if not self._dir or not os.path.isdir(self._dir):
            raise ValueError(
                f"npz data_dir {self._dir!r} is not a directory; set dataset.data_dir to a "
                "folder holding <split>.npz files with arrays 'images' and 'labels'"
            )
        self._size = ds_config.image_size
        self._splits = {
            split: self._read(split) for split in (ds_config.train_split, ds_config.eval_split)
        }
        train_labels = self._splits[ds_config.train_split].labels
        self.num_classes = ds_config.num_classes or int(train_labels.max(initial=-1)) + 1
        for split, (_, labels) in self._splits.items():
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"labels of {self._path(split)} range over [{labels.min()}, {labels.max()}], "
                    f"outside [0, {self.num_classes}) for {self.num_classes} classes "
                    "(dataset.num_classes)"
                )

    def _path(self, split: str) -> str:
        return os.path.join(self._dir, f"{split}.npz")

    def _read(self, split: str) -> Split:
        path = self._path(split)
        if not os.path.exists(path):
            raise ValueError(f"npz data set: no file {path} for split {split!r}")
        with np.load(path) as stored:
            missing = sorted({"images", "labels"} - set(stored.files))
            if missing:
                raise ValueError(
                    f"{path} lacks the arrays {missing}; it has {sorted(stored.files)}"
                )
            images, labels = stored["images"], stored["labels"]
        size = self._size
        channels = images.shape[3:] in ((), (1,), (3,))
        if images.dtype != np.uint8 or images.shape[1:3] != (size, size) or not channels:
            raise ValueError(
                f"{path}: images must be uint8 [N, {size}, {size}] or [N, {size}, {size}, 1 or 3] "
                f"(dataset.image_size {size}), got {images.dtype} {list(images.shape)}"
            )
        integers = np.issubdtype(labels.dtype, np.integer)
        if labels.shape != (len(images),) or not integers:
            raise ValueError(
                f"{path}: labels must be integers [{len(images)}], one per image, got "
                f"{labels.dtype} {list(labels.shape)}"
            )
        return Split(to_rgb(images), labels.astype(np.int32))

    def count(self, split: str) -> int:
        if split not in self._splits:
            raise ValueError(f"npz data set has no split {split!r}; it has {sorted(self._splits)}")
        return len(self._splits[split].labels)

    def load(self, split: str, num_examples: int) -> Split:
        images, labels = self._splits[split]
        return Split(images[:num_examples], labels[:num_examples])
