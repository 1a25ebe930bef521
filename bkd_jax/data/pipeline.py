"""Per-host image batches from TFDS, an image folder or scikit-learn's digits, via tf.data.

Each host reads its own contiguous slice of a split and yields numpy batches of
``global_batch_size // process_count`` examples; the trainer assembles the global
`jax.Array` with `jax.make_array_from_process_local_data`. Nothing is ever downloaded:
TFDS data sets must already be prepared in ``data_dir``.

Training batches are a pure function of ``(seed, step)``. Epoch ``e`` of a host is its
slice shuffled with a seed derived from ``(seed, process_index, e)``; the augmentation of
the example at position ``i`` of that epoch uses stateless random ops seeded from the same
triple and ``i``. So ``train_batches(..., start_step=k)`` rebuilds exactly the stream an
uninterrupted run yields from step k on: whole epochs are skipped by arithmetic, and the
examples before step k of its epoch are dropped before they are decoded. Every host takes
the same ``steps_per_epoch`` batches per epoch (the remainder of a shuffled epoch is
dropped), so hosts never disagree on the step count.

Evaluation covers every example of the eval split exactly once: each host pads its slice
with blank examples whose ``mask`` is False, up to the same number of batches on every
host.

Config: `config.dataset`, documented in `bkd_jax.data.datasets`.
"""

from __future__ import annotations

import itertools
import math
import pathlib
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bkd_jax.data.datasets import AUGMENTATIONS, DATASETS, DatasetInfo, check_choice

# JAX owns the accelerators; tf.data runs on the host CPU only.
tf.config.set_visible_devices([], "GPU")

_CROP_PADDING = 4
_DIGITS_NUM_TEST = 360


def dataset_info(ds_config: ml_collections.ConfigDict) -> DatasetInfo:
    """Validates `ds_config` and its data (never downloading) and describes the data set."""
    return _describe(_source(ds_config), ds_config)


def _describe(source: _Source, ds_config: ml_collections.ConfigDict) -> DatasetInfo:
    """`dataset_info` for an already built source."""
    size = ds_config.image_size
    return DatasetInfo(
        num_classes=source.num_classes,
        image_shape=(size, size, 3),
        num_train=_capped(source.count(ds_config.train_split), ds_config.max_train_examples),
        num_eval=_capped(source.count(ds_config.eval_split), ds_config.max_eval_examples),
    )


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
    """Training steps in one epoch; the last incomplete global batch is dropped."""
    return info.num_train // global_batch_size


def train_batches(
    ds_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's endless stream of augmented training batches, from step `start_step` on.

    Args:
      ds_config: the `config.dataset` ConfigDict.
      global_batch_size: examples per step summed over all hosts.
      seed: fixes the shuffles and augmentations of every epoch.
      start_step: first step to yield; the stream equals the tail of the one from step 0.
      process_index, process_count: this host and the number of hosts; default JAX's.

    Yields:
      ``{"image": float32 [B, H, W, 3], "label": int32 [B]}``, B = global / hosts.
    """
    index, count = _process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    source = _source(ds_config)
    info = _describe(source, ds_config)
    steps = steps_per_epoch(info, global_batch_size)
    if steps == 0:
        raise ValueError(
            f"global_batch_size {global_batch_size} exceeds the {info.num_train} training "
            "examples: not even one step per epoch"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    start, stop = _host_slice(info.num_train, index, count)
    first_epoch, first_step = divmod(start_step, steps)

    def epoch(number: int, skip_steps: int) -> tf.data.Dataset:
        shuffle_seed, augment_seed = _epoch_seeds(seed, index, number)
        ds = source.read(ds_config.train_split, start, stop, shuffle_seed=shuffle_seed)
        ds = ds.shuffle(ds_config.shuffle_buffer, seed=shuffle_seed)
        ds = ds.take(steps * local_batch).enumerate().skip(skip_steps * local_batch)
        preprocess = _train_preprocess(source, ds_config, augment_seed)
        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local_batch, drop_remainder=True).with_options(_deterministic())
        return ds.prefetch(tf.data.AUTOTUNE)

    def stream() -> Iterator[dict[str, np.ndarray]]:
        for number in itertools.count(first_epoch):
            skip_steps = first_step if number == first_epoch else 0
            yield from epoch(number, skip_steps).as_numpy_iterator()

    return stream()


def eval_batches(
    ds_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of the whole eval split, padded and masked, one pass.

    Every host yields ``ceil(ceil(num_eval / hosts) / B)`` batches; examples that only
    pad have ``mask`` False (and a blank image, label 0).

    Yields:
      ``{"image": float32 [B, H, W, 3], "label": int32 [B], "mask": bool [B]}``.
    """
    index, count = _process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    source = _source(ds_config)
    info = _describe(source, ds_config)
    start, stop = _host_slice(info.num_eval, index, count)
    num_batches = math.ceil(math.ceil(info.num_eval / count) / local_batch)

    ds = source.read(ds_config.eval_split, start, stop)
    ds = ds.map(_eval_preprocess(source, ds_config), num_parallel_calls=tf.data.AUTOTUNE)
    blank = {
        "image": tf.zeros(info.image_shape, tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
    }
    padding = tf.data.Dataset.from_tensors(blank).repeat(num_batches * local_batch - stop + start)
    ds = ds.concatenate(padding).batch(local_batch).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()


# ---------------------------------------------------------------------------------------
# Sources: each reads a slice of a split as (undecoded image, label) pairs and decodes
# images to float32 [H, W, 3] in [0, 1].


def _decode_encoded(raw: tf.Tensor) -> tf.Tensor:
    """PNG/JPEG/... bytes -> float32 [H, W, 3] in [0, 1]."""
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    return tf.image.convert_image_dtype(image, tf.float32)


class _EncodedSource:
    """A source whose images are encoded files (PNG, JPEG, ...)."""

    decode = staticmethod(_decode_encoded)


class _TfdsSource(_EncodedSource):
    """A TFDS data set already prepared in a data dir; images stay encoded until decoded."""

    def __init__(self, name: str, data_dir: str | None):
        self._name = name
        self._builder = tfds.builder(name, data_dir=data_dir)
        self.num_classes = self._builder.info.features["label"].num_classes

    def count(self, split: str) -> int:
        splits = self._builder.info.splits
        if not splits:  # No metadata (tfds.testing.mock_data): count by reading.
            return _count(self._open(split))
        if split not in splits:
            raise ValueError(f"{self._name} has no split {split!r}; it has {sorted(splits)}")
        return splits[split].num_examples

    def read(self, split: str, start: int, stop: int, shuffle_seed: int | None = None):
        # `take` also bounds readers that ignore the slice (tfds.testing.mock_data).
        ds = self._open(f"{split}[{start}:{stop}]", shuffle_seed).take(stop - start)
        return ds.map(lambda ex: (ex["image"], ex["label"]))

    def _open(self, split: str, shuffle_seed: int | None = None) -> tf.data.Dataset:
        try:
            return self._builder.as_dataset(
                split=split,
                shuffle_files=shuffle_seed is not None,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
            )
        except AssertionError as e:  # TFDS's way of saying the data is not prepared.
            raise ValueError(self._not_prepared_message()) from e

    def _not_prepared_message(self) -> str:
        root = pathlib.Path(self._builder.data_dir).parents[1]
        message = (
            f"TFDS data set {self._name!r} is not prepared in data_dir {root} (searched "
            f"{self._builder.data_dir}); bkd_jax never downloads. Prepare it once on a "
            f"machine with network, `tfds build {self._name} --data_dir={root}`, and copy "
            "it there, or set dataset.data_dir to where it is."
        )
        if self._name == "imagenet2012":
            message += (
                " ImageNet cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar in {root}/downloads/manual before `tfds build`."
            )
        return message


class _FolderSource(_EncodedSource):
    """``root/<split>/<class>/<image>`` read by `tfds.folder_dataset.ImageFolder`."""

    def __init__(self, root: str | None):
        if not root or not tf.io.gfile.isdir(root):
            raise ValueError(
                f"image_folder root {root!r} is not a directory; set dataset.data_dir to a "
                "folder laid out as <data_dir>/<split>/<class>/<image>"
            )
        self._root = root
        self._builder = tfds.folder_dataset.ImageFolder(root)
        self.num_classes = self._builder.info.features["label"].num_classes

    def count(self, split: str) -> int:
        splits = self._builder.info.splits
        if split not in splits:
            raise ValueError(
                f"image folder {self._root} has no split folder {split!r} with images in "
                f"class subfolders; split folders found: {sorted(splits)}"
            )
        return splits[split].num_examples

    def read(self, split: str, start: int, stop: int, shuffle_seed: int | None = None):
        del shuffle_seed  # File order is fixed; the pipeline's shuffle does the work.
        ds = self._builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        return ds.skip(start).take(stop - start).map(lambda ex: (ex["image"], ex["label"]))


class _DigitsSource:
    """scikit-learn's digits with a fixed split: the 360 first of a seed-0 permutation test."""

    num_classes = 10

    def __init__(self):
        from sklearn.datasets import load_digits  # Imported here: only this source needs it.

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[..., None]
        labels = digits.target.astype(np.int32)
        order = np.random.default_rng(0).permutation(len(labels))
        test, train = order[:_DIGITS_NUM_TEST], order[_DIGITS_NUM_TEST:]
        self._splits = {
            "train": (images[train], labels[train]),
            "test": (images[test], labels[test]),
        }

    def count(self, split: str) -> int:
        if split not in self._splits:
            raise ValueError(f"digits has no split {split!r}; it has {sorted(self._splits)}")
        return len(self._splits[split][1])

    def read(self, split: str, start: int, stop: int, shuffle_seed: int | None = None):
        del shuffle_seed  # In memory: the pipeline's shuffle permutes it.
        images, labels = self._splits[split]
        return tf.data.Dataset.from_tensor_slices((images[start:stop], labels[start:stop]))

    decode = staticmethod(tf.image.grayscale_to_rgb)


_Source = _TfdsSource | _FolderSource | _DigitsSource


def _source(ds_config: ml_collections.ConfigDict) -> _Source:
    """The validated source `ds_config` names."""
    check_choice("dataset", ds_config.name, DATASETS)
    check_choice("augmentation", ds_config.augment, AUGMENTATIONS)
    if ds_config.name == "image_folder":
        return _FolderSource(ds_config.data_dir)
    if ds_config.name == "digits":
        return _DigitsSource()
    return _TfdsSource(ds_config.name, ds_config.data_dir)


# ---------------------------------------------------------------------------------------
# Preprocessing: float32 [H, W, 3] in [0, 1] -> normalised [size, size, 3].


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes to size x size (bilinear, antialiased; exact identity at the same size)."""
    return tf.image.resize(image, [size, size], antialias=True)


def _crop_flip(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """torchvision's RandomCrop(size, padding=4) then RandomHorizontalFlip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    pad = _CROP_PADDING
    padded = tf.pad(_resize(image, size), [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(padded, [size, size, 3], seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _inception_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Random-resized crop (area 0.08..1, aspect 3/4..4/3) to size x size, random flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, crop_shape, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([0, 1, 4]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = _resize(tf.slice(image, begin, crop_shape), size)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _resize_shorter_centre_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Shorter side to size * 256 / 224 (torchvision's Resize(int)), then a centre crop."""
    shorter = round(size * 256 / 224)
    hw = tf.shape(image)[:2]
    new_hw = hw * shorter // tf.reduce_min(hw)
    image = tf.image.resize(image, new_hw, antialias=True)
    return tf.image.resize_with_crop_or_pad(image, size, size)


def _normalise(image: tf.Tensor, ds_config: ml_collections.ConfigDict) -> tf.Tensor:
    """(image - mean) / std, with the static shape [size, size, 3] made known."""
    mean = tf.constant(ds_config.mean, tf.float32)
    std = tf.constant(ds_config.std, tf.float32)
    size = ds_config.image_size
    return tf.ensure_shape((image - mean) / std, (size, size, 3))


def _train_preprocess(source: _Source, ds_config: ml_collections.ConfigDict, augment_seed):
    """(position in epoch, (raw, label)) -> example, augmented with a seed per position."""
    size = ds_config.image_size

    def preprocess(position, raw_label):
        raw, label = raw_label
        image = source.decode(raw)
        seed = tf.random.experimental.stateless_fold_in(augment_seed, position)
        if ds_config.augment == "crop_flip":
            image = _crop_flip(image, size, seed)
        elif ds_config.augment == "inception":
            image = _inception_crop(image, size, seed)
        else:
            image = _resize(image, size)
        return {"image": _normalise(image, ds_config), "label": tf.cast(label, tf.int32)}

    return preprocess


def _eval_preprocess(source: _Source, ds_config: ml_collections.ConfigDict):
    """(raw, label) -> unaugmented example with mask True."""
    size = ds_config.image_size

    def preprocess(raw, label):
        image = source.decode(raw)
        if ds_config.augment == "inception":
            image = _resize_shorter_centre_crop(image, size)
        else:
            image = _resize(image, size)
        return {
            "image": _normalise(image, ds_config),
            "label": tf.cast(label, tf.int32),
            "mask": tf.constant(True),
        }

    return preprocess


# ---------------------------------------------------------------------------------------
# Small helpers.


def _deterministic() -> tf.data.Options:
    """tf.data options that keep element order fixed (resuming relies on it)."""
    options = tf.data.Options()
    options.deterministic = True
    return options


def _capped(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"{process_count} processes"
        )
    return global_batch_size // process_count


def _host_slice(n: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of host `index` among `count` in n examples; sizes differ by <= 1."""
    return index * n // count, (index + 1) * n // count


def _epoch_seeds(seed: int, index: int, epoch: int) -> tuple[int, tf.Tensor]:
    """Shuffle seed and augmentation key of one host's epoch, derived from all three."""
    words = np.random.SeedSequence([seed, index, epoch]).generate_state(3)
    return int(words[0]), tf.constant(words[1:].astype(np.int64))
