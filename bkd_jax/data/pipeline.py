"""Image batches from TFDS, an image folder or scikit-learn's digits, via tf.data.

Nothing is ever downloaded: TFDS data sets must already be prepared in ``data_dir``.

The training stream does not depend on the number of processes or devices. With ``n``
training examples, global batch ``B`` and ``S = n // B`` steps per epoch, the global
batch of step ``k = e * S + s`` holds the examples ``perm_e[s * B : (s + 1) * B]`` in
that order, where ``perm_e`` is a permutation of ``range(n)`` drawn from ``(seed, e)``
alone (the last ``n % B`` examples of each permutation sit the epoch out). Example ``i``
of epoch ``e`` is augmented by stateless random ops keyed by ``(seed, e, i)``. So the
global batch of a step is a pure function of ``(seed, step)``; a run can resume from a
checkpoint on any topology and train on the same data. Process ``p`` of ``P`` yields rows
``[p * B / P, (p + 1) * B / P)`` of every global batch, the block that
`jax.make_array_from_process_local_data` expects on the trainer's 1-D "data" mesh, and
reads only those examples; ``train_batches(..., start_step=k)`` starts at step ``k``
without reading anything before it.

That needs random access by example index, which each source provides its own way:
  digits: arrays in memory.
  image_folder: the list of files (paths in memory: about 100 MB for ImageNet), each
    read by path; as much CPU per image as reading the folder in order.
  TFDS in the ArrayRecord format (``tfds build --file_format=array_record``): the
    `tfds.data_source`, its serialized records read by index (from Python, in chunks)
    and parsed by TensorFlow; nothing held in memory, about a quarter more CPU per
    CIFAR image than the TFRecord path.
  TFDS in the TFRecord format (TFDS's default; TFRecord files are sequential): the
    training split's encoded examples are read once into host memory and indexed there
    (CIFAR-10 or CIFAR-100: about 130 MB per process, read in seconds at the start). A
    split of more than `IN_MEMORY_LIMIT_BYTES` (ImageNet's train split: 140 GB) is
    refused with the advice to rebuild it as ArrayRecord.
A data set built in both formats has the same examples at the same indices, hence the
same stream. The permutations come from NumPy's `Generator.permutation`, whose output
NumPy keeps stable in practice but does not promise across versions.

Evaluation covers the eval split exactly once on any topology: process ``p`` reads its
contiguous slice ``[p * N / P, (p + 1) * N / P)`` in order (from TFRecord TFDS data
sets, only that slice) and pads it, to the same number of batches on every process, with
blank examples whose ``mask`` is False and ``index`` is -1.

Batches are ``{"image": float32 [b, H, W, 3], "label": int32 [b], "index": int32 [b]}``
with ``b = B / P``, plus ``"mask": bool [b]`` for eval. ``index`` is the example's
position in its split: TFDS's order (``split[i]``), the files of an image folder sorted
by class and then by file name, the fixed order of the digits split; with
``max_*_examples`` the indices are those of the first examples.

Image folders are checked when their source is built, once per split and process: every
file of a split read must start with the header of an image format that
`tf.io.decode_image` reads (JPEG, PNG, GIF, BMP, WebP, JPEG XL), at the cost of one small
read per file (CIFAR-10's 60,000 JPEGs: seconds). A bad file is an error naming it, or
with ``dataset.bad_files = "skip"`` is left out and counted in the log; names starting
with "." are ignored. A file whose header is fine but whose body does not decode stops
training with an error naming it when its batch is read. Class folders without files and
data dirs without split folders are errors naming them.

Config: `config.dataset`, documented in `bkd_jax.data.datasets`.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import math
import pathlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bkd_jax.data import arrays, datasets, folders
from bkd_jax.data.datasets import AUGMENTATIONS, DATASETS, DatasetInfo, check_choice

# JAX owns the accelerators; tf.data runs on the host CPU only.
tf.config.set_visible_devices([], "GPU")

IN_MEMORY_LIMIT_BYTES = 16 * 2**30
_CROP_PADDING = 4
_FETCH_CHUNK = 256  # Indices per lookup call, which may run Python code.


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


def train_batches(
    ds_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the endless stream of augmented training batches.

    Args:
      ds_config: the `config.dataset` ConfigDict.
      global_batch_size: examples per step summed over all processes.
      seed: fixes the order and augmentation of every epoch.
      start_step: first step to yield; the stream equals the tail of the one from step 0.
      process_index, process_count: this process and the number of processes; default
        JAX's.

    Yields:
      ``{"image": float32 [b, H, W, 3], "label": int32 [b], "index": int32 [b]}``, rows
      ``[p * b, (p + 1) * b)`` of the global batch, b = global / processes.
    """
    index, count = _process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    source = _source(ds_config)
    info = _describe(source, ds_config)
    steps = datasets.steps_per_epoch(info, global_batch_size)
    if steps == 0:
        raise ValueError(
            f"global_batch_size {global_batch_size} exceeds the {info.num_train} training "
            "examples: not even one step per epoch"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    first_epoch, first_step = divmod(start_step, steps)
    rows = slice(index * local_batch, (index + 1) * local_batch)

    def host_rows(epoch: int) -> np.ndarray:
        """[steps, local_batch] example indices of this process in `epoch`, from start_step."""
        order = datasets.epoch_permutation(seed, int(epoch), info.num_train)
        order = order[: steps * global_batch_size]
        skip = first_step if epoch == first_epoch else 0
        return order.reshape(steps, global_batch_size)[skip:, rows]

    def epoch_examples(epoch: tf.Tensor) -> tf.data.Dataset:
        indices = tf.numpy_function(lambda e: host_rows(e).ravel(), [epoch], tf.int64)
        indices = tf.ensure_shape(indices, [None])
        return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(indices), epoch), indices))

    lookup = source.lookup(ds_config.train_split, info.num_train)
    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_examples)
    ds = ds.batch(local_batch).map(
        lambda epoch, i: (epoch, i, lookup.fetch(i)), num_parallel_calls=tf.data.AUTOTUNE
    )
    preprocess = _train_preprocess(lookup, ds_config, seed)
    ds = ds.unbatch().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True).with_options(_deterministic())
    ds = ds.prefetch(tf.data.AUTOTUNE)
    steps_rows = itertools.chain.from_iterable(map(host_rows, itertools.count(first_epoch)))
    return _numpy_batches(ds, lookup, steps_rows)


def eval_batches(
    ds_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches of the whole eval split, padded and masked, one pass.

    Every process yields ``ceil(ceil(num_eval / processes) / b)`` batches; examples that
    only pad have ``mask`` False, ``index`` -1, a blank image and label 0.

    Yields:
      ``{"image": float32 [b, H, W, 3], "label": int32 [b], "index": int32 [b],
      "mask": bool [b]}``.
    """
    index, count = _process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    source = _source(ds_config)
    info = _describe(source, ds_config)
    start, stop = _host_slice(info.num_eval, index, count)
    num_batches = math.ceil(math.ceil(info.num_eval / count) / local_batch)
    padded = np.full(num_batches * local_batch, -1)
    padded[: stop - start] = np.arange(start, stop)

    lookup, ds = source.read(ds_config.eval_split, start, stop)
    ds = ds.map(_eval_preprocess(lookup, ds_config), num_parallel_calls=tf.data.AUTOTUNE)
    blank = {
        "image": tf.zeros(info.image_shape, tf.float32),
        "label": tf.constant(0, tf.int32),
        "index": tf.constant(-1, tf.int32),
        "mask": tf.constant(False),
    }
    padding = tf.data.Dataset.from_tensors(blank).repeat(len(padded) - (stop - start))
    ds = ds.concatenate(padding).batch(local_batch).prefetch(tf.data.AUTOTUNE)
    return _numpy_batches(ds, lookup, np.split(padded, num_batches))


# ---------------------------------------------------------------------------------------
# Sources: split sizes, and random access to a split's examples by index.


# (H, W, C) image shape -> (begin, size) of a crop, as `tf.slice` takes them.
CropWindow = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def _crop(image: tf.Tensor, window: CropWindow | None) -> tf.Tensor:
    if window is None:
        return image
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)


def decode_encoded(raw: tf.Tensor, window: CropWindow | None = None) -> tf.Tensor:
    """PNG/JPEG/... bytes -> float32 [H, W, 3] in [0, 1], cropped to `window` if given.

    A JPEG's crop window is sampled from its header and only that window is decoded
    (`decode_and_crop_jpeg`: the decoder stops after the window's last row and does not
    transform the columns beside it; for random-resized crops of ImageNet-size photos
    the decode costs about a quarter less CPU, see BENCHMARKS.md); other formats
    (by their bytes, not their file names) are decoded whole, then sliced. The pixels are
    those of the whole decode, except that with subsampled chroma (4:2:0, as in most
    photographs) the window's outermost rows and columns may differ: their chroma is
    upsampled without the neighbours outside the window.
    """

    def decode_whole() -> tf.Tensor:
        return _crop(tf.io.decode_image(raw, channels=3, expand_animations=False), window)

    def decode_window() -> tf.Tensor:
        begin, size = window(tf.io.extract_jpeg_shape(raw))
        crop = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(raw, crop, channels=3)

    if window is None:
        image = decode_whole()
    else:
        image = tf.cond(tf.io.is_jpeg(raw), decode_window, decode_whole)
    return tf.image.convert_image_dtype(image, tf.float32)


def _decode_file(path: tf.Tensor, window: CropWindow | None = None) -> tf.Tensor:
    """`decode_encoded` of the file at `path`."""
    return decode_encoded(tf.io.read_file(path), window)


class _Lookup:
    """Random access to a split inside tf.data: `fetch` gathers the records of a vector of
    indices, `parse` turns one record into (float32 [H, W, 3] image in [0, 1], label),
    decoding only the crop `window` of the image when one is given."""

    def __init__(self, decode=decode_encoded):
        self._decode = decode

    def fetch(self, indices: tf.Tensor) -> Any:
        raise NotImplementedError

    def parse(self, record: Any, window: CropWindow | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        raw, label = record
        return self._decode(raw, window), label

    def bad_file(self, indices: np.ndarray) -> str | None:
        """A file among `indices` (-1: none) that does not decode, and why; None: unknown."""
        del indices
        return None


class _ArrayLookup(_Lookup):
    """A split held in host memory: images, encoded images or file paths."""

    def __init__(self, raw: np.ndarray, labels: np.ndarray, decode=decode_encoded):
        super().__init__(decode)
        self._raw = tf.constant(raw)
        self._labels = tf.constant(labels, tf.int64)

    def fetch(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.gather(self._raw, indices), tf.gather(self._labels, indices)


class _FileLookup(_ArrayLookup):
    """Image files: their paths in memory, each file read when its example is parsed."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray):
        super().__init__(paths, labels, _decode_file)
        self._paths = paths

    def bad_file(self, indices: np.ndarray) -> str | None:
        for path in self._paths[indices[indices >= 0]]:
            try:
                self._decode(path)
            except tf.errors.OpError as error:
                return f"{path}: {error.message}"
        return None


class _DataSourceLookup(_Lookup):
    """A `tfds.data_source` (ArrayRecord) of serialized examples, parsed by TensorFlow."""

    def __init__(self, records: Sequence[bytes], features: tfds.features.FeaturesDict):
        super().__init__()
        self._records = records
        self._features = features

    def fetch(self, indices: tf.Tensor) -> tf.Tensor:
        def read(indices: np.ndarray) -> np.ndarray:
            return np.array([self._records[i] for i in indices.tolist()], dtype=object)

        return tf.ensure_shape(tf.numpy_function(read, [indices], tf.string), [None])

    def parse(
        self, record: tf.Tensor, window: CropWindow | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        example = self._features.deserialize_example(record, decoders=_SKIP_IMAGE_DECODING)
        return super().parse(_image_label(example), window)


class _Source:
    """A data set: split sizes and random access to a split."""

    num_classes: int

    def count(self, split: str) -> int:
        raise NotImplementedError

    def lookup(self, split: str, num_examples: int) -> _Lookup:
        """Random access to the first `num_examples` examples of `split`."""
        raise NotImplementedError

    def read(self, split: str, start: int, stop: int) -> tuple[_Lookup, tf.data.Dataset]:
        """Examples [start, stop) of `split` in order, as (index, record) for the lookup."""
        lookup = self.lookup(split, stop)
        ds = tf.data.Dataset.range(start, stop).batch(_FETCH_CHUNK)
        ds = ds.map(lambda i: (i, lookup.fetch(i)), num_parallel_calls=tf.data.AUTOTUNE)
        return lookup, ds.unbatch()


class _TfdsSource(_Source):
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

    def lookup(self, split: str, num_examples: int) -> _Lookup:
        if self._random_access():
            records = self._builder.as_data_source(
                split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
            )
            return _DataSourceLookup(records, self._builder.info.features)
        self._check_fits_in_memory(split, num_examples)
        raw, labels = [], []
        pairs = self._open(split).take(num_examples).map(_image_label).batch(1024)
        for raw_batch, label_batch in pairs.as_numpy_iterator():
            raw.append(raw_batch)
            labels.append(label_batch)
        return _ArrayLookup(np.concatenate(raw), np.concatenate(labels))

    def read(self, split: str, start: int, stop: int) -> tuple[_Lookup, tf.data.Dataset]:
        if self._random_access():
            return super().read(split, start, stop)
        # TFRecord: read only the slice. `take` also bounds readers that ignore the slice
        # (tfds.testing.mock_data).
        pairs = self._open(f"{split}[{start}:{stop}]").take(stop - start).map(_image_label)
        return _Lookup(), tf.data.Dataset.zip(tf.data.Dataset.range(start, stop), pairs)

    def _random_access(self) -> bool:
        return self._builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD

    def _check_fits_in_memory(self, split: str, num_examples: int) -> None:
        info = self._builder.info.splits.get(split) if self._builder.info.splits else None
        if info is None or not info.num_examples:
            return
        size = info.num_bytes * min(num_examples, info.num_examples) / info.num_examples
        if size > IN_MEMORY_LIMIT_BYTES:
            raise ValueError(
                f"{self._name} split {split!r} is stored as TFRecord, which has no random "
                f"access, and at {size / 2**30:.1f} GiB is too large to index in memory "
                f"(limit {IN_MEMORY_LIMIT_BYTES / 2**30:.1f} GiB). Rebuild it as ArrayRecord: "
                f"`tfds build {self._name} --file_format=array_record "
                f"--data_dir={self._root()}`, or use it as an image_folder."
            )

    def _open(self, split: str) -> tf.data.Dataset:
        """`split` in TFDS's order: one file at a time, in order."""
        try:
            return self._builder.as_dataset(
                split=split,
                shuffle_files=False,
                decoders=_SKIP_IMAGE_DECODING,
                read_config=tfds.ReadConfig(interleave_cycle_length=1),
            )
        except AssertionError as e:  # TFDS's way of saying the data is not prepared.
            raise ValueError(self._not_prepared_message()) from e

    def _root(self) -> pathlib.Path:
        return pathlib.Path(self._builder.data_dir).parents[1]

    def _not_prepared_message(self) -> str:
        return arrays.tfds_not_prepared_message(self._name, self._builder.data_dir)


_SKIP_IMAGE_DECODING = {"image": tfds.decode.SkipDecoding()}


def _image_label(example: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    return example["image"], example["label"]


class _FolderSource(_Source):
    """An image folder (`bkd_jax.data.folders`), each file read when its example is parsed."""

    def __init__(self, root: str | None, bad_files: str):
        self._folder = folders.ImageFolder(root, bad_files)
        self.num_classes = self._folder.num_classes

    def count(self, split: str) -> int:
        return len(self._folder.files(split).paths)

    def lookup(self, split: str, num_examples: int) -> _Lookup:
        paths, labels = self._folder.files(split)
        return _FileLookup(paths[:num_examples], labels[:num_examples])


class _ArraysSource(_Source):
    """A `bkd_jax.data.arrays` source held in host memory: the digits, or .npz arrays."""

    def __init__(self, source: arrays.ArraySource):
        self._source = source
        self.num_classes = source.num_classes

    def count(self, split: str) -> int:
        return self._source.count(split)

    def lookup(self, split: str, num_examples: int) -> _Lookup:
        images, labels = self._source.load(split, num_examples)
        white = self._source.white

        def decode(image: tf.Tensor, window: CropWindow | None = None) -> tf.Tensor:
            return _crop(tf.cast(image, tf.float32) / white, window)

        return _ArrayLookup(images, labels, decode)


def _source(ds_config: ml_collections.ConfigDict) -> _Source:
    """The validated source `ds_config` names."""
    check_choice("dataset", ds_config.name, DATASETS)
    check_choice("augmentation", ds_config.augment, AUGMENTATIONS)
    if ds_config.name == "image_folder":
        return _FolderSource(ds_config.data_dir, ds_config.bad_files)
    if ds_config.name in ("digits", "npz"):
        return _ArraysSource(arrays.open_source(ds_config))
    return _TfdsSource(ds_config.name, ds_config.data_dir)


# ---------------------------------------------------------------------------------------
# Preprocessing: a record -> example with a normalised [size, size, 3] image.


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


def inception_crop_window(image_shape: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(begin, size)` of a random-resized crop (area 0.08..1, aspect 3/4..4/3) of an image
    of `image_shape` (H, W, C), a function of `seed`."""
    begin, crop_shape, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.zeros([0, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, crop_shape


def _inception_crop(
    lookup: _Lookup, record: Any, size: int, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """The record's image, random-resized cropped (`inception_crop_window`, only the window
    decoded) to size x size and randomly flipped; and its label."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = functools.partial(inception_crop_window, seed=crop_seed)
    image, label = lookup.parse(record, window)
    image = tf.image.stateless_random_flip_left_right(_resize(image, size), seed=flip_seed)
    return image, label


def _resize_shorter_centre_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Shorter side to size * 256 / 224 (torchvision's Resize(int)), then a centre crop."""
    shorter = round(size * 256 / 224)
    hw = tf.shape(image)[:2]
    new_hw = hw * shorter // tf.reduce_min(hw)
    image = tf.image.resize(image, new_hw, antialias=True)
    return tf.image.resize_with_crop_or_pad(image, size, size)


def _example(image, label, index, ds_config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
    """The batch entries of one example; (image - mean) / std with its static shape."""
    mean = tf.constant(ds_config.mean, tf.float32)
    std = tf.constant(ds_config.std, tf.float32)
    size = ds_config.image_size
    return {
        "image": tf.ensure_shape((image - mean) / std, (size, size, 3)),
        "label": tf.cast(label, tf.int32),
        "index": tf.cast(index, tf.int32),
    }


def _train_preprocess(lookup: _Lookup, ds_config: ml_collections.ConfigDict, seed: int):
    """(epoch, index, record) -> augmented example, keyed by (seed, epoch, index)."""
    size = ds_config.image_size
    key = tf.constant(np.random.SeedSequence(seed).generate_state(2).astype(np.int64))

    def preprocess(epoch, index, record):
        fold_in = tf.random.experimental.stateless_fold_in
        example_key = fold_in(fold_in(key, epoch), index)
        if ds_config.augment == "inception":
            image, label = _inception_crop(lookup, record, size, example_key)
        else:
            image, label = lookup.parse(record)
            if ds_config.augment == "crop_flip":
                image = _crop_flip(image, size, example_key)
            else:
                image = _resize(image, size)
        return _example(image, label, index, ds_config)

    return preprocess


def _eval_preprocess(lookup: _Lookup, ds_config: ml_collections.ConfigDict):
    """(index, record) -> unaugmented example with mask True."""
    size = ds_config.image_size

    def preprocess(index, record):
        image, label = lookup.parse(record)
        if ds_config.augment == "inception":
            image = _resize_shorter_centre_crop(image, size)
        else:
            image = _resize(image, size)
        return {**_example(image, label, index, ds_config), "mask": tf.constant(True)}

    return preprocess


# ---------------------------------------------------------------------------------------
# Small helpers.


def _numpy_batches(
    ds: tf.data.Dataset, lookup: _Lookup, indices: Iterable[np.ndarray]
) -> Iterator[dict[str, np.ndarray]]:
    """`ds` as numpy batches, batch j holding examples `indices[j]`.

    An image that fails to decode is reported by its file name where the lookup knows
    it. The stream closes at exit at the latest (see `_close_open_streams`).
    """
    stream = _named_errors(ds, lookup, indices)
    _OPEN_STREAMS.add(stream)
    return stream


def _named_errors(ds, lookup, indices):
    batches = ds.as_numpy_iterator()
    for batch_indices in indices:
        try:
            batch = next(batches)
        except tf.errors.OpError as error:
            bad = lookup.bad_file(batch_indices)
            if bad is None:
                raise
            raise ValueError(f"cannot decode image file {bad}") from error
        except StopIteration:
            return
        yield batch


_OPEN_STREAMS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    """Stops the tf.data threads of streams still open at exit, before Python finalizes:
    one of them calling Python code (`tf.numpy_function`) then would abort the process."""
    for stream in list(_OPEN_STREAMS):
        stream.close()


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
    """[start, stop) of process `index` among `count` in n examples; sizes differ by <= 1."""
    return index * n // count, (index + 1) * n // count
