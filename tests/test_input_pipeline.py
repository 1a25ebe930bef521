"""Tests for bkd_jax.data.pipeline: shapes, normalisation, coverage, determinism, resume,
the same global batches on any topology, example indices and bad image folders."""

from __future__ import annotations

import io
import itertools
import logging
import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from conftest import write_images

from bkd_jax.data import datasets, pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def config(name: str, **overrides) -> pipeline.ml_collections.ConfigDict:
    ds_config = datasets.default_dataset_config(name)
    ds_config.update(overrides)
    return ds_config


def take(batches, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(batches, n))


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def normalise(pixels: np.ndarray, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> np.ndarray:
    return (pixels.astype(np.float32) / 255 - mean) / std


def constant_image(value: int, shape=(32, 32, 3)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


def identify(image: np.ndarray) -> int:
    """Index k of a normalised constant image written by constant_image(14 * k + 10)."""
    pixel = round(float((image[0, 0, 0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]) * 255))
    return (pixel - 10) // 14


@pytest.fixture
def numbered_folder(tmp_path) -> str:
    """10 train and 7 test images, image k constant 14k + 10, in classes by k % 3."""
    splits = {"train": range(10), "test": range(10, 17)}
    images = {
        split: {f"c{c}": [constant_image(14 * k + 10) for k in ks if k % 3 == c] for c in range(3)}
        for split, ks in splits.items()
    }
    return write_images(tmp_path, images)


def numbered_config(root: str, **overrides) -> pipeline.ml_collections.ConfigDict:
    return config(
        "image_folder",
        data_dir=root,
        image_size=32,
        augment="none",
        mean=tuple(CIFAR10_MEAN),
        std=tuple(CIFAR10_STD),
        **overrides,
    )


def test_cifar100_info_counts_mock_examples_and_caps():
    with tfds.testing.mock_data(num_examples=9):
        info = pipeline.dataset_info(config("cifar100"))
        capped = pipeline.dataset_info(config("cifar100", max_train_examples=5))
    assert info == datasets.DatasetInfo(100, (32, 32, 3), 9, 9)
    assert (capped.num_train, capped.num_eval) == (5, 9)
    assert datasets.steps_per_epoch(info, global_batch_size=4) == 2


def test_train_batches_shapes_dtypes_and_label_range():
    with tfds.testing.mock_data(num_examples=10):
        batches = take(pipeline.train_batches(config("cifar10"), global_batch_size=4, seed=0), 3)
    for batch in batches:
        assert batch.keys() == {"image", "label", "index"}
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
        assert np.all((batch["label"] >= 0) & (batch["label"] < 10))


def test_eval_is_the_normalised_split_once_with_masked_padding():
    with tfds.testing.mock_data(num_examples=10):
        reference = list(tfds.builder("cifar10").as_dataset(split="test").as_numpy_iterator())
        batches = list(pipeline.eval_batches(config("cifar10"), global_batch_size=4))
    assert len(batches) == 3
    np.testing.assert_array_equal(
        np.concatenate([b["mask"] for b in batches]), [True] * 10 + [False] * 2
    )
    np.testing.assert_array_equal(
        np.concatenate([b["index"] for b in batches]), [*range(10), -1, -1]
    )
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_allclose(images[:10], [normalise(ex["image"]) for ex in reference], atol=1e-6)
    np.testing.assert_array_equal(labels[:10], [ex["label"] for ex in reference])
    np.testing.assert_array_equal(images[10:], 0)


def test_train_stream_is_determined_by_the_seed():
    with tfds.testing.mock_data(num_examples=10):
        ds_config = config("cifar10")

        def stream(seed):
            return take(pipeline.train_batches(ds_config, global_batch_size=4, seed=seed), 3)

        first, again, other = stream(0), stream(0), stream(1)
    assert_same_batches(first, again)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


@pytest.mark.parametrize("start_step", [3, 4])
def test_resume_yields_the_tail_of_the_uninterrupted_stream(start_step):
    # 10 examples, global batch 4: 2 steps per epoch; step 3 is mid-epoch, step 4 starts one.
    with tfds.testing.mock_data(num_examples=10):
        ds_config = config("cifar10")
        full = take(pipeline.train_batches(ds_config, global_batch_size=4, seed=7), 7)
        resumed = pipeline.train_batches(
            ds_config, global_batch_size=4, seed=7, start_step=start_step
        )
        tail = take(resumed, 7 - start_step)
    assert_same_batches(tail, full[start_step:])
    assert not np.array_equal(full[0]["image"], full[2]["image"])  # epochs reshuffle


def test_crop_flip_crops_the_zero_padded_original(tmp_path):
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 256, (32, 32, 3), np.uint8) for _ in range(4)]
    root = write_images(tmp_path, {"train": {"a": originals}, "test": {"a": originals[:1]}})
    ds_config = config(
        "image_folder",
        data_dir=root,
        image_size=32,
        augment="crop_flip",
        mean=tuple(CIFAR10_MEAN),
        std=tuple(CIFAR10_STD),
    )
    batches = take(pipeline.train_batches(ds_config, global_batch_size=4, seed=0), 4)
    padded = [normalise(np.pad(o, [(4, 4), (4, 4), (0, 0)])) for o in originals]
    views = set()
    for image in np.concatenate([b["image"] for b in batches]):
        matches = [
            (k, dy, dx, flip)
            for k, dy, dx, flip in itertools.product(range(4), range(9), range(9), (False, True))
            if np.allclose(
                image[:, ::-1] if flip else image, padded[k][dy : dy + 32, dx : dx + 32], atol=1e-5
            )
        ]
        assert matches, "augmented image is not a window of a padded original"
        views.add(matches[0])
    assert any(view[1:] != (4, 4, False) for view in views), "crop_flip never moved or flipped"


def test_inception_output_shapes_on_non_square_images(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 24, 3), np.uint8) for _ in range(3)]
    splits = {"train": {"a": images, "b": images}, "test": {"a": images, "b": images[:1]}}
    root = write_images(tmp_path, splits)
    ds_config = config("image_folder", data_dir=root, image_size=16)
    (train,) = take(pipeline.train_batches(ds_config, global_batch_size=6, seed=0), 1)
    (evaluated,) = pipeline.eval_batches(ds_config, global_batch_size=8)
    assert train["image"].shape == (6, 16, 16, 3)
    assert evaluated["image"].shape == (8, 16, 16, 3)
    assert evaluated["mask"].tolist() == [True] * 4 + [False] * 4


def smooth_jpeg(rng: np.random.Generator, shape: tuple[int, int], subsampling: int) -> bytes:
    """A JPEG of smooth colour bands; `subsampling` 0 is 4:4:4 chroma, 2 is 4:2:0."""
    pixels = np.cumsum(rng.integers(0, 9, (*shape, 3)), axis=1) % 256
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels.astype(np.uint8)).save(
        buffer, "JPEG", quality=85, subsampling=subsampling
    )
    return buffer.getvalue()


def test_inception_crop_decodes_a_jpeg_window_to_the_pixels_of_the_whole_decode(tmp_path):
    """Full-chroma and grey JPEGs (only the crop window decoded) train on exactly the pixels
    of their whole decodes stored losslessly as PNGs (decoded whole, then cropped)."""
    rng = np.random.default_rng(0)
    shapes = [(75, 100), (100, 75), (61, 47), (48, 48), (33, 90), (90, 33)]
    grey = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (50, 70), np.uint8)).save(grey, "JPEG")
    jpegs = [smooth_jpeg(rng, shape, subsampling=0) for shape in shapes * 2] + [grey.getvalue()]
    for k, raw in enumerate(jpegs):
        pixels = pipeline.tf.io.decode_jpeg(raw, channels=3).numpy()
        for root in ("jpeg", "png"):
            path = tmp_path / root / "train" / f"c{k % 2}" / f"{k:02d}.{root}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if root == "jpeg":
                path.write_bytes(raw)
            else:
                PIL.Image.fromarray(pixels).save(path)
    for root in ("jpeg", "png"):
        write_images(tmp_path / root, {"test": {c: [constant_image(0)] for c in ("c0", "c1")}})

    def stream(root: str) -> list[dict[str, np.ndarray]]:
        ds_config = config("image_folder", data_dir=str(tmp_path / root), image_size=24)
        return take(pipeline.train_batches(ds_config, global_batch_size=13, seed=3), 6)

    assert_same_batches(stream("jpeg"), stream("png"))


def test_window_decode_of_subsampled_jpegs_differs_only_on_the_window_edge():
    """With 4:2:0 chroma, the window's outermost rows and columns may differ from the whole
    decode's (their chroma is upsampled without the neighbours outside the window)."""
    rng = np.random.default_rng(1)
    edges_differ = 0
    for _ in range(30):
        h, w = rng.integers(40, 160, 2)
        raw = smooth_jpeg(rng, (h, w), subsampling=2)
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        begin, size = [top, left, 0], [rng.integers(4, h - top), rng.integers(4, w - left), -1]

        def window(shape, begin=begin, size=size):
            del shape
            return pipeline.tf.constant(begin), pipeline.tf.constant(size)

        cropped = pipeline.decode_encoded(raw, window).numpy()
        whole = pipeline.decode_encoded(raw).numpy()[top : top + size[0], left : left + size[1]]
        assert cropped.shape == whole.shape
        np.testing.assert_array_equal(cropped[1:-1, 1:-1], whole[1:-1, 1:-1])
        edges_differ += not np.array_equal(cropped, whole)
    assert edges_differ > 0  # so the window was decoded on its own, not sliced from the whole


# numbered_folder's examples in index order: files sorted by class (k % 3), then by name.
TRAIN_ORDER = [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
TEST_ORDER = [12, 15, 10, 13, 16, 11, 14]


def test_image_folder_classes_counts_and_exact_eval(numbered_folder):
    ds_config = numbered_config(numbered_folder)
    assert pipeline.dataset_info(ds_config) == datasets.DatasetInfo(3, (32, 32, 3), 10, 7)
    batches = list(pipeline.eval_batches(ds_config, global_batch_size=4))
    mask = np.concatenate([b["mask"] for b in batches])
    ids = [identify(im) for im in np.concatenate([b["image"] for b in batches])[mask]]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    assert ids == TEST_ORDER
    np.testing.assert_array_equal(labels, [k % 3 for k in ids])
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), [*range(7), -1])


@pytest.mark.parametrize(
    "processes, batches_per_process", [(2, 2), (4, 2)]
)  # 7 examples: slices of 3 and 4 in batches of 2; of 1 or 2 in batches of 1
def test_processes_evaluate_everything_once_in_equal_batch_counts(
    numbered_folder, processes, batches_per_process
):
    ds_config = numbered_config(numbered_folder)
    per_process = [
        list(
            pipeline.eval_batches(
                ds_config, global_batch_size=4, process_index=p, process_count=processes
            )
        )
        for p in range(processes)
    ]
    assert [len(b) for b in per_process] == [batches_per_process] * processes
    batches = [batch for process in per_process for batch in process]
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    ids = [identify(im) for im in np.concatenate([b["image"] for b in batches])[mask]]
    np.testing.assert_array_equal(index[mask], range(7))
    assert np.all(index[~mask] == -1)
    assert ids == TEST_ORDER


def test_digits_split_is_fixed_and_covers_the_data_set():
    from sklearn.datasets import load_digits

    ds_config = config("digits", mean=(0.0,) * 3, std=(1.0,) * 3)
    info = pipeline.dataset_info(ds_config)
    assert (info.num_classes, info.image_shape, info.num_train + info.num_eval) == (
        10,
        (8, 8, 3),
        1797,
    )
    passes = []
    for split in ("train", "test", "train"):
        ds_config.eval_split = split
        batches = list(pipeline.eval_batches(ds_config, global_batch_size=512))
        mask = np.concatenate([b["mask"] for b in batches])
        passes.append(
            (
                np.concatenate([b["image"] for b in batches])[mask],
                np.concatenate([b["label"] for b in batches])[mask],
            )
        )
    np.testing.assert_array_equal(passes[0][0], passes[2][0])
    images = np.concatenate([passes[0][0], passes[1][0]])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey in 3 channels

    def as_multiset(images, labels):
        return sorted(zip((im.round(4).tobytes() for im in images), labels.tolist(), strict=True))

    digits = load_digits()
    assert as_multiset(images[..., 0], np.concatenate([passes[0][1], passes[1][1]])) == as_multiset(
        (digits.images / 16).astype(np.float32), digits.target
    )


def test_digits_resized_to_image_size():
    ds_config = config("digits", image_size=16)
    (batch,) = take(pipeline.train_batches(ds_config, global_batch_size=8, seed=0), 1)
    assert batch["image"].shape == (8, 16, 16, 3)


def test_real_cifar10_jpegs_as_an_image_folder(shared_data, tmp_path):
    wanted = {"train/cat", "train/dog", "test/cat", "test/dog"}
    with tarfile.open(shared_data / "cifar10-jpeg.tar.gz") as archive:
        members = [
            m
            for m in archive
            if m.isfile()
            and str(pathlib.Path(m.name).parent) in wanted
            and pathlib.Path(m.name).stem in ("0000", "0001", "0002")
        ]
        archive.extractall(tmp_path, members=members, filter="data")
    cifar10 = datasets.default_dataset_config("cifar10")
    ds_config = config(
        "image_folder",
        data_dir=str(tmp_path),
        image_size=32,
        augment="crop_flip",
        mean=cifar10.mean,
        std=cifar10.std,
    )
    assert pipeline.dataset_info(ds_config) == datasets.DatasetInfo(2, (32, 32, 3), 6, 6)
    (train,) = take(pipeline.train_batches(ds_config, global_batch_size=6, seed=0), 1)
    assert train["image"].shape == (6, 32, 32, 3)
    (evaluated,) = pipeline.eval_batches(ds_config, global_batch_size=8)
    images = evaluated["image"][evaluated["mask"]]
    expected = {
        (name == "dog"): [
            normalise(np.asarray(PIL.Image.open(p)))
            for p in sorted((tmp_path / "test" / name).iterdir())
        ]
        for name in ("cat", "dog")
    }
    for image, label in zip(images, evaluated["label"][evaluated["mask"]], strict=True):
        # TF's and PIL's JPEG decoders may differ by a few levels.
        assert min(np.abs(image - e).max() for e in expected[bool(label)]) < 8 / 255 / 0.24


def test_unknown_dataset_and_augmentation_are_rejected():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar100"):
        datasets.default_dataset_config("mnist")
    with pytest.raises(ValueError, match=r"unknown augmentation 'mixup'.*crop_flip"):
        pipeline.dataset_info(config("digits", augment="mixup"))


@pytest.mark.parametrize("name", ["cifar100", "imagenet2012"])
def test_missing_tfds_dataset_names_it_and_the_data_dir(tmp_path, name):
    with pytest.raises(
        ValueError, match=f"'{name}' is not prepared in data_dir {tmp_path}"
    ) as error:
        pipeline.dataset_info(config(name, data_dir=str(tmp_path)))
    assert f"tfds build {name} --data_dir={tmp_path}" in str(error.value)
    assert ("downloads/manual" in str(error.value)) == (name == "imagenet2012")


def test_missing_image_folder_or_split_folder(tmp_path, numbered_folder):
    with pytest.raises(ValueError, match="is not a directory"):
        pipeline.dataset_info(config("image_folder", data_dir=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match=r"no split folder 'validation'.*\['test', 'train'\]"):
        pipeline.dataset_info(numbered_config(numbered_folder, eval_split="validation"))


def test_batch_size_errors():
    ds_config = config("digits")
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        pipeline.train_batches(
            ds_config, global_batch_size=5, seed=0, process_index=0, process_count=2
        )
    with pytest.raises(ValueError, match="exceeds the 1437 training examples"):
        pipeline.train_batches(ds_config, global_batch_size=2048, seed=0)


# ---------------------------------------------------------------------------------------
# The same global batches whatever the number of processes and devices.


@pytest.fixture(params=["digits", "image_folder", "tfds_tfrecord", "tfds_array_record"])
def small_source(request, tmp_path):
    """The config of 18 training examples of one kind of source, augmented; TFDS mocked.

    Images are square at the output size, so that without augmentation training images
    are the eval images.
    """
    kind = request.param
    if kind == "digits":
        yield config("digits", augment="crop_flip", max_train_examples=18)
    elif kind == "image_folder":
        rng = np.random.default_rng(0)
        images = {
            split: {c: [rng.integers(0, 256, (8, 8, 3), np.uint8) for _ in range(9)] for c in "ab"}
            for split in ("train", "test")
        }
        yield config("image_folder", data_dir=write_images(tmp_path, images), image_size=8)
    else:
        with tfds.testing.mock_data(num_examples=18):
            if kind == "tfds_tfrecord":
                yield config("cifar10")
            else:
                with mock.patch.object(
                    tfds.core.DatasetInfo,
                    "file_format",
                    new_callable=mock.PropertyMock,
                    return_value=tfds.core.FileFormat.ARRAY_RECORD,
                ):
                    yield config("cifar10")


def global_stream(ds_config, processes: int, steps: int, start_step: int = 0):
    """Global batches of 8 (2 steps per epoch of 18), the processes' rows concatenated."""
    per_process = [
        take(
            pipeline.train_batches(
                ds_config,
                global_batch_size=8,
                seed=3,
                start_step=start_step,
                process_index=p,
                process_count=processes,
            ),
            steps,
        )
        for p in range(processes)
    ]
    return [
        {key: np.concatenate([rows[key] for rows in step]) for key in step[0]}
        for step in zip(*per_process, strict=True)
    ]


def test_global_batches_are_the_same_for_1_2_and_4_processes(small_source):
    single = global_stream(small_source, 1, steps=5)  # 2.5 epochs
    for processes in (2, 4):
        assert_same_batches(global_stream(small_source, processes, steps=5), single)
    # Resuming mid-epoch on another topology continues the same stream.
    assert_same_batches(global_stream(small_source, 4, steps=2, start_step=3), single[3:])
    for epoch in range(2):
        indices = np.concatenate([b["index"] for b in single[2 * epoch : 2 * epoch + 2]])
        assert len(set(indices)) == 16 and set(indices) <= set(range(18))
    assert not np.array_equal(single[0]["index"], single[2]["index"])  # epochs reshuffle


def test_training_index_is_the_eval_index_of_the_same_example(small_source):
    small_source.augment = "none"
    small_source.max_eval_examples = 18
    small_source.eval_split = small_source.train_split
    (evaluated,) = pipeline.eval_batches(small_source, global_batch_size=18)
    np.testing.assert_array_equal(evaluated["index"], range(18))
    for batch in global_stream(small_source, 2, steps=3):
        np.testing.assert_allclose(batch["image"], evaluated["image"][batch["index"]], atol=1e-6)
        np.testing.assert_array_equal(batch["label"], evaluated["label"][batch["index"]])


def test_augmentation_differs_between_epochs_of_an_example():
    # One step per epoch: every example in every epoch.
    ds_config = config("digits", augment="crop_flip", max_train_examples=8)
    first, second = (
        dict(zip(b["index"].tolist(), b["image"], strict=True))
        for b in global_stream(ds_config, 1, steps=2)
    )
    assert first.keys() == second.keys()
    assert any(not np.array_equal(first[i], second[i]) for i in first)


def test_training_index_names_the_image_folder_file(numbered_folder):
    ds_config = numbered_config(numbered_folder)
    batches = take(pipeline.train_batches(ds_config, global_batch_size=4, seed=0), 6)
    for batch in batches:
        ids = [identify(image) for image in batch["image"]]
        assert ids == [TRAIN_ORDER[i] for i in batch["index"]]
        np.testing.assert_array_equal(batch["label"], [k % 3 for k in ids])


_DEVICES_SCRIPT = textwrap.dedent(
    """
    import sys

    import jax
    import numpy as np

    from bkd_jax.training import sharding

    steps = np.load(sys.argv[1])
    single = [{k: steps[f"{step}/{k}"] for k in ("image", "label", "index")} for step in range(3)]
    assert len(jax.devices()) == 8
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices)
        for step, local in enumerate(single):
            for key, value in sharding.global_batch(local, mesh).items():
                np.testing.assert_array_equal(np.asarray(value), local[key])
                for shard in value.addressable_shards if len(devices) == 8 else ():
                    # As if 2 processes held 4 of the 8 devices each: a device's shard is
                    # rows of the batch of the process that would feed it.
                    start, stop, _ = shard.index[0].indices(16)
                    process, offset = divmod(start, 8)
                    half = steps[f"{step}/{key}/{process}"][offset : offset + stop - start]
                    np.testing.assert_array_equal(np.asarray(shard.data), half)
    print("DEVICES_OK")
    """
)


def test_global_batch_on_1_and_8_devices_and_each_devices_rows(tmp_path):
    ds_config = config("digits", augment="crop_flip", max_train_examples=64)

    def stream(process, count):
        batches = pipeline.train_batches(
            ds_config, global_batch_size=16, seed=0, process_index=process, process_count=count
        )
        return take(batches, 3)

    single, halves = stream(0, 1), [stream(p, 2) for p in range(2)]
    arrays = {f"{i}/{k}": v for i, batch in enumerate(single) for k, v in batch.items()}
    for p, half in enumerate(halves):
        arrays.update({f"{i}/{k}/{p}": v for i, batch in enumerate(half) for k, v in batch.items()})
    np.savez(tmp_path / "steps.npz", **arrays)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", _DEVICES_SCRIPT, str(tmp_path / "steps.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEVICES_OK" in result.stdout


# ---------------------------------------------------------------------------------------
# Bad image folders.


def test_non_image_file_fails_naming_it(numbered_folder):
    bad = pathlib.Path(numbered_folder) / "train" / "c1" / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="1 bad image files") as error:
        pipeline.dataset_info(numbered_config(numbered_folder))
    assert f"{bad}: not an image" in str(error.value)
    assert "bad_files='skip'" in str(error.value)


def test_skipped_bad_files_are_left_out_and_logged(numbered_folder, caplog):
    bad = pathlib.Path(numbered_folder) / "train" / "c1" / "00.txt"
    bad.write_bytes(b"")
    ds_config = numbered_config(numbered_folder, bad_files="skip")
    with caplog.at_level(logging.WARNING):
        info = pipeline.dataset_info(ds_config)
    assert (info.num_train, info.num_eval) == (10, 7)
    assert f"Skipping 1 bad image files in {pathlib.Path(numbered_folder) / 'train'}" in caplog.text
    assert str(bad) in caplog.text
    (batch,) = take(pipeline.train_batches(ds_config, global_batch_size=10, seed=0), 1)
    assert sorted(identify(image) for image in batch["image"]) == list(range(10))


def test_image_that_does_not_decode_stops_training_naming_it(numbered_folder):
    encoded = io.BytesIO()
    PIL.Image.fromarray(constant_image(200)).save(encoded, "JPEG")
    bad = pathlib.Path(numbered_folder) / "train" / "c2" / "zz.jpg"
    bad.write_bytes(encoded.getvalue()[:200])  # a JPEG header, then the file ends
    ds_config = numbered_config(numbered_folder)
    assert pipeline.dataset_info(ds_config).num_train == 11  # the header looks fine
    batches = pipeline.train_batches(ds_config, global_batch_size=11, seed=0)  # all in step 0
    with pytest.raises(ValueError, match=f"cannot decode image file {bad}: "):
        next(batches)


def test_empty_class_folder_and_missing_split_folders(tmp_path, numbered_folder):
    write_images(pathlib.Path(numbered_folder), {"train": {"c3": [constant_image(0)]}})
    (pathlib.Path(numbered_folder) / "test" / "c3").mkdir()
    with pytest.raises(ValueError, match=f"class folder {numbered_folder}/test/c3 has no image"):
        pipeline.dataset_info(numbered_config(numbered_folder))
    (pathlib.Path(numbered_folder) / "test" / "c3").rmdir()
    with pytest.raises(ValueError, match=r"test lacks 1 class folders that other splits have: c3;"):
        pipeline.dataset_info(numbered_config(numbered_folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"image folder {tmp_path}/empty has no split folders"):
        pipeline.dataset_info(config("image_folder", data_dir=str(tmp_path / "empty")))
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"split folder {tmp_path}/flat/train has no class"):
        pipeline.dataset_info(config("image_folder", data_dir=str(tmp_path / "flat")))


def test_unknown_bad_files_setting_is_rejected(numbered_folder):
    with pytest.raises(ValueError, match=r"unknown bad_files setting 'ignore'.*fail, skip"):
        pipeline.dataset_info(numbered_config(numbered_folder, bad_files="ignore"))


_OPEN_AT_EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit
    import sys
    from unittest import mock

    import tensorflow_datasets as tfds

    from bkd_jax.data import datasets, pipeline

    if sys.argv[1:] == ["unguarded"]:  # Then Python hangs or aborts at exit.
        atexit.unregister(pipeline._close_open_streams)
    with tfds.testing.mock_data(num_examples=64), mock.patch.object(
        tfds.core.DatasetInfo,
        "file_format",
        new_callable=mock.PropertyMock,
        return_value=tfds.core.FileFormat.ARRAY_RECORD,
    ):
        batches = pipeline.train_batches(
            datasets.default_dataset_config("cifar10"), global_batch_size=16, seed=0
        )
        next(batches)
    print("EXITING")  # with the stream open, Python code still running in tf.data
    """
)


def test_process_with_an_open_array_record_stream_exits_cleanly():
    # At exit, tf.data threads still call the data source's Python code.
    result = subprocess.run(
        [sys.executable, "-c", _OPEN_AT_EXIT_SCRIPT],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "EXITING" in result.stdout, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
