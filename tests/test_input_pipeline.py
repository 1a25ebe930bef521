"""Tests for bkd_jax.data.pipeline: shapes, normalisation, coverage, determinism, resume."""

from __future__ import annotations

import itertools
import pathlib
import tarfile

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from bkd_jax.data import datasets, pipeline

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


def write_images(root: pathlib.Path, images: dict[str, dict[str, list[np.ndarray]]]) -> str:
    """Writes {split: {class: [uint8 HxWx3]}} as root/split/class/NN.png."""
    for split, classes in images.items():
        for name, arrays in classes.items():
            (root / split / name).mkdir(parents=True)
            for i, array in enumerate(arrays):
                PIL.Image.fromarray(array).save(root / split / name / f"{i:02d}.png")
    return str(root)


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
    assert pipeline.steps_per_epoch(info, global_batch_size=4) == 2


def test_train_batches_shapes_dtypes_and_label_range():
    with tfds.testing.mock_data(num_examples=10):
        batches = take(pipeline.train_batches(config("cifar10"), global_batch_size=4, seed=0), 3)
    for batch in batches:
        assert batch.keys() == {"image", "label"}
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert np.all((batch["label"] >= 0) & (batch["label"] < 10))


def test_eval_is_the_normalised_split_once_with_masked_padding():
    with tfds.testing.mock_data(num_examples=10):
        reference = list(tfds.builder("cifar10").as_dataset(split="test").as_numpy_iterator())
        batches = list(pipeline.eval_batches(config("cifar10"), global_batch_size=4))
    assert len(batches) == 3
    np.testing.assert_array_equal(
        np.concatenate([b["mask"] for b in batches]), [True] * 10 + [False] * 2
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
    root = write_images(tmp_path, {"train": {"a": images, "b": images}, "test": {"a": images}})
    ds_config = config("image_folder", data_dir=root, image_size=16)
    (train,) = take(pipeline.train_batches(ds_config, global_batch_size=6, seed=0), 1)
    (evaluated,) = pipeline.eval_batches(ds_config, global_batch_size=4)
    assert train["image"].shape == (6, 16, 16, 3)
    assert evaluated["image"].shape == (4, 16, 16, 3)
    assert evaluated["mask"].tolist() == [True, True, True, False]


def test_image_folder_classes_counts_and_exact_eval(numbered_folder):
    ds_config = numbered_config(numbered_folder)
    assert pipeline.dataset_info(ds_config) == datasets.DatasetInfo(3, (32, 32, 3), 10, 7)
    batches = list(pipeline.eval_batches(ds_config, global_batch_size=4))
    mask = np.concatenate([b["mask"] for b in batches])
    ids = [identify(im) for im in np.concatenate([b["image"] for b in batches])[mask]]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    assert sorted(ids) == list(range(10, 17))
    np.testing.assert_array_equal(labels, [k % 3 for k in ids])


def test_two_hosts_read_disjoint_training_shards(numbered_folder):
    ds_config = numbered_config(numbered_folder)
    seen = []
    for host in range(2):
        batches = pipeline.train_batches(
            ds_config, global_batch_size=4, seed=0, process_index=host, process_count=2
        )
        images = np.concatenate([b["image"] for b in take(batches, 6)])  # 3 epochs
        assert images.shape[0] == 12  # local batch 2
        seen.append({identify(im) for im in images})
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] <= set(range(10))


def test_two_hosts_evaluate_everything_once_in_equal_batch_counts(numbered_folder):
    ds_config = numbered_config(numbered_folder)
    per_host = [
        list(
            pipeline.eval_batches(
                ds_config, global_batch_size=4, process_index=host, process_count=2
            )
        )
        for host in range(2)
    ]
    assert [len(b) for b in per_host] == [2, 2]  # 7 examples: slices of 3 and 4, batches of 2
    ids = [
        identify(image)
        for batches in per_host
        for batch in batches
        for image in batch["image"][batch["mask"]]
    ]
    assert sorted(ids) == list(range(10, 17))


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
