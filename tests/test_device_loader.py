"""Tests for the device-memory loader (bkd_jax.training.inputs, bkd_jax.data.arrays and
bkd_jax.data.device_augment): the augmentations against their definitions, the same eval
images as the tf.data pipeline, the stream's contract (a pure function of seed and step,
the same on any number of devices), the decoded-image cache, the choice of loader, and
one-line errors for bad data."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from conftest import write_images

import bkd_jax.data
from bkd_jax.data import arrays, datasets, device_augment
from bkd_jax.training import inputs, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
MESH = sharding.make_mesh(jax.devices()[:1])


def config(name: str, **overrides):
    ds_config = datasets.default_dataset_config(name)
    ds_config.update(overrides)
    return ds_config


def random_folder(root: pathlib.Path, per_class: int = 6, size: int = 8) -> str:
    rng = np.random.default_rng(0)
    return write_images(
        root,
        {
            split: {
                c: [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(per_class)]
                for c in "abc"
            }
            for split in ("train", "test")
        },
    )


def host_eval(ds_config) -> list[dict[str, np.ndarray]]:
    pipeline = pytest.importorskip("bkd_jax.data.pipeline", reason="needs TensorFlow")
    return list(pipeline.eval_batches(ds_config, global_batch_size=16))


def device_eval(ds_config) -> list[dict[str, np.ndarray]]:
    loader = inputs.DeviceLoader(ds_config, MESH)
    return [jax.device_get(b) for b in loader.eval_batches(16)]


def real_examples(batches) -> dict[str, np.ndarray]:
    """The unpadded examples of eval batches, concatenated, by index."""
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    keep = joined["mask"]
    order = np.argsort(joined["index"][keep])
    return {k: v[keep][order] for k, v in joined.items()}


# ---------------------------------------------------------------------------------------
# Augmentations against their definitions.


def test_crop_flip_is_a_crop_of_the_zero_padded_image_flipped_half_the_time():
    image = np.random.default_rng(0).integers(1, 256, (6, 5, 3), np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    candidates = {
        (top, left, flip): (crop[:, ::-1] if flip else crop)
        for top in range(9)
        for left in range(9)
        for flip in (False, True)
        for crop in [padded[top : top + 6, left : left + 5]]
    }
    keys = jax.random.split(jax.random.key(1), 400)
    outputs = np.asarray(jax.vmap(device_augment.crop_flip, (None, 0))(jnp.asarray(image), keys))
    seen = []
    for out in outputs:
        matches = [k for k, c in candidates.items() if np.array_equal(out, c)]
        assert matches, "not a crop of the padded image"
        seen.append(matches[0])
    tops = {t for t, _, _ in seen}
    lefts = {left for _, left, _ in seen}
    assert tops == lefts == set(range(9))  # torchvision's offsets: 0..2 * padding
    flips = np.mean([f for _, _, f in seen])
    assert 0.4 < flips < 0.6


def test_cutout_zeroes_a_square_clipped_at_the_borders_and_nothing_else():
    size, side = 10, 4
    image = jnp.ones((size, size, 3), jnp.float32)
    keys = jax.random.split(jax.random.key(2), 300)
    outputs = np.asarray(jax.vmap(device_augment.cutout, (None, 0, None))(image, keys, side))
    heights, centres = set(), set()
    for out in outputs:
        zero = np.all(out == 0, axis=-1)
        assert np.all((out == 0) | (out == 1)) and np.all(zero == np.any(out == 0, axis=-1))
        rows, cols = np.nonzero(zero)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert zero[top:bottom, left:right].all() and zero.sum() == (bottom - top) * (right - left)
        # A centre (y, x) drawn in the image, the square [c - 2, c + 2) clipped to it.
        ys = [y for y in range(size) if (max(y - 2, 0), min(y + 2, size)) == (top, bottom)]
        assert ys, (top, bottom)
        heights.add(bottom - top)
        centres.update(ys)
    assert heights == {2, 3, 4} and centres == set(range(size))


def test_normalise_divides_by_white_then_standardises():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 1, 3, 3) * 14
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    got = device_augment.normalise(jnp.asarray(pixels), 255, mean, std)
    want = (pixels.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The same eval images as the tf.data pipeline.


def test_digits_eval_equals_the_host_pipeline():
    ds_config = config("digits")
    device, host = real_examples(device_eval(ds_config)), real_examples(host_eval(ds_config))
    assert len(device["index"]) == 360
    for key in ("index", "label"):
        np.testing.assert_array_equal(device[key], host[key])
    np.testing.assert_allclose(device["image"], host["image"], atol=1e-6)


def test_png_folder_decoded_by_pil_equals_the_host_pipeline(tmp_path):
    ds_config = config("image_folder", data_dir=random_folder(tmp_path), image_size=8)
    ds_config.augment = "crop_flip"
    device, host = real_examples(device_eval(ds_config)), real_examples(host_eval(ds_config))
    assert len(device["index"]) == 18
    np.testing.assert_array_equal(device["label"], host["label"])
    np.testing.assert_allclose(device["image"], host["image"], atol=1e-6)


def test_array_record_tfds_data_read_without_tensorflow_equals_the_host_pipeline(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow", reason="writing the TFDS data set needs TensorFlow")

    class Tiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(12), "test": self._generate_examples(7)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": i % 10}

    Tiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds_config = config("cifar10", data_dir=str(tmp_path))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds, "builder", lambda name, data_dir: Tiny(data_dir=data_dir))
        device = real_examples(device_eval(ds_config))
        host = real_examples(host_eval(ds_config))
    assert len(device["index"]) == 7
    np.testing.assert_array_equal(device["label"], host["label"])
    np.testing.assert_allclose(device["image"], host["image"], atol=1e-6)


# ---------------------------------------------------------------------------------------
# The stream: a pure function of (seed, step); the eval split once.


def take(batches, n):
    return [jax.device_get(next(batches)) for _ in range(n)]


def test_train_batches_follow_the_epoch_permutations_and_resume_exactly():
    ds_config = config("digits", augment="crop_flip", max_train_examples=40)
    loader = inputs.DeviceLoader(ds_config, MESH)
    stream = take(loader.train_batches(16, seed=3, start_step=0), 5)  # 2 steps per epoch
    for step, batch in enumerate(stream):
        epoch, position = divmod(step, 2)
        order = datasets.epoch_permutation(3, epoch, 40)
        np.testing.assert_array_equal(batch["index"], order[position * 16 : (position + 1) * 16])
        digits = arrays.DigitsSource().load("train", 40)
        np.testing.assert_array_equal(batch["label"], digits.labels[batch["index"]])
        assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype == np.float32
    resumed = take(loader.train_batches(16, seed=3, start_step=3), 2)
    for a, b in zip(stream[3:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other_seed = take(loader.train_batches(16, seed=4, start_step=0), 1)[0]
    assert not np.array_equal(other_seed["index"], stream[0]["index"])


def test_eval_covers_the_split_once_and_masks_the_padding():
    loader = inputs.DeviceLoader(config("digits"), MESH)
    batches = [jax.device_get(b) for b in loader.eval_batches(64)]
    assert len(batches) == 6  # 360 examples in batches of 64
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(index[mask], np.arange(360))
    assert np.all(index[~mask] == -1) and (~mask).sum() == 24
    padding = batches[-1]["image"][~batches[-1]["mask"]]
    assert np.all(padding == 0)


_TOPOLOGY_SCRIPT = textwrap.dedent(
    """
    import jax
    import numpy as np

    from bkd_jax.data import datasets
    from bkd_jax.training import inputs, sharding

    def stream(devices, placement):
        ds_config = datasets.default_dataset_config("digits")
        ds_config.update(augment="crop_flip", cutout=4, max_train_examples=40)
        if placement == "sharded":  # 76,800 bytes decoded: more than 50,000, not a shard
            ds_config.device_memory_share = 50_000 / inputs.device_memory_bytes(jax.devices()[0])
        loader = inputs.DeviceLoader(ds_config, sharding.make_mesh(jax.devices()[:devices]))
        assert loader.placement == placement, (loader.placement, placement)
        train = loader.train_batches(16, seed=5, start_step=1)
        batches = [next(train) for _ in range(3)] + list(loader.eval_batches(16))
        return [jax.device_get(b) for b in batches]

    single = stream(1, "replicated")
    for devices in (2, 8):
        for placement in ("replicated", "sharded"):
            for a, b in zip(single, stream(devices, placement), strict=True):
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key])
    print("SAME")
    """
)


def test_global_batches_are_the_same_on_1_2_and_8_devices_replicated_or_sharded():
    result = subprocess.run(
        [sys.executable, "-c", _TOPOLOGY_SCRIPT],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "SAME" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# The decoded-image cache.


def test_second_load_reads_the_cache_and_a_changed_file_invalidates_it(tmp_path, monkeypatch):
    root = random_folder(tmp_path / "data")
    ds_config = config("image_folder", data_dir=root, image_size=8, augment="crop_flip")
    first = arrays.open_source(ds_config).load("train", 18)
    cached = sorted((tmp_path / "data" / ".bkd_jax_cache").glob("train-8px-18-*.npz"))
    assert len(cached) == 1

    def no_decoding(self, path):
        raise AssertionError(f"decoded {path} though the split is cached")

    with monkeypatch.context() as patch:
        patch.setattr(arrays._FolderSource, "_decode", no_decoding)
        second = arrays.open_source(ds_config).load("train", 18)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)

    changed = pathlib.Path(root) / "train" / "a" / "00.png"
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    third = arrays.open_source(ds_config).load("train", 18)
    assert np.all(third.images[0] == 0) and not np.array_equal(third.images, first.images)


def test_cache_dir_setting_and_resizing_to_the_image_size(tmp_path):
    root = random_folder(tmp_path / "data", size=12)
    ds_config = config("image_folder", data_dir=root, image_size=8, augment="crop_flip")
    ds_config.cache_dir = str(tmp_path / "cache")
    split = arrays.open_source(ds_config).load("test", 18)
    assert split.images.shape == (18, 8, 8, 3) and split.images.dtype == np.uint8
    assert len(list((tmp_path / "cache").glob("test-8px-*.npz"))) == 1
    assert not (tmp_path / "data" / ".bkd_jax_cache").exists()


# ---------------------------------------------------------------------------------------
# Which loader, and one-line errors before any compute.


def test_auto_uses_device_memory_when_the_data_fits_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        loader = inputs.make_loader(config("digits"), MESH)
    assert loader.kind == "device"
    assert "Input: device memory" in caplog.text


def test_data_larger_than_the_memory_share_falls_back_or_fails_naming_the_sizes(caplog):
    pytest.importorskip("bkd_jax.data.pipeline", reason="the host loader needs TensorFlow")
    small = config("digits", device_memory_share=1e-9)
    with caplog.at_level(logging.INFO):
        assert inputs.make_loader(small, MESH).kind == "host"
    assert "Input: the host's tf.data pipeline, as its decoded splits take 0.3 MiB" in caplog.text
    small.loader = "device"
    with pytest.raises(
        ValueError, match=r"loader is 'device', but .* 0.3 MiB, more than .*\(0.0 MiB\)"
    ):
        inputs.make_loader(small, MESH)


def test_inception_augmentation_goes_to_the_host_loader(caplog, tmp_path):
    pytest.importorskip("bkd_jax.data.pipeline", reason="the host loader needs TensorFlow")
    ds_config = config("image_folder", data_dir=random_folder(tmp_path), image_size=8)
    with caplog.at_level(logging.INFO):
        assert inputs.make_loader(ds_config, MESH).kind == "host"
    assert "the 'inception' augmentation crops full-size images" in caplog.text


def test_host_loader_without_tensorflow_names_the_extra_and_why(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bkd_jax.data.pipeline", None)
    monkeypatch.delattr(bkd_jax.data, "pipeline", raising=False)
    with pytest.raises(ValueError, match=r"'host'\), which needs TensorFlow .*'bkd_jax\[tf\]'"):
        inputs.make_loader(config("digits", loader="host"), MESH)
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"not prepared in data_dir .*pip install 'bkd_jax\[tf\]'"):
        inputs.make_loader(config("cifar10", data_dir=str(tmp_path)), MESH)


def test_cutout_on_the_host_loader_is_an_error():
    pytest.importorskip("bkd_jax.data.pipeline", reason="the host loader needs TensorFlow")
    with pytest.raises(ValueError, match="cutout runs on the device loader only"):
        inputs.make_loader(config("digits", loader="host", cutout=4), MESH)


def test_unknown_loader_is_rejected():
    with pytest.raises(ValueError, match="unknown loader 'gpu'; known: auto, device, host"):
        inputs.make_loader(config("digits", loader="gpu"), MESH)


def test_corrupt_image_is_named(tmp_path):
    root = random_folder(tmp_path)
    bad = pathlib.Path(root) / "train" / "b" / "03.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(
        ValueError, match=r"1 bad image files in .*train: .*03\.png: does not decode"
    ):
        inputs.make_loader(
            config("image_folder", data_dir=root, image_size=8, augment="none"), MESH
        )


def test_class_missing_from_a_split_is_named(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), np.uint8)
    root = write_images(tmp_path, {"train": {"a": [image], "b": [image]}, "test": {"a": [image]}})
    with pytest.raises(ValueError, match=r"test lacks 1 class folders that other splits have: b;"):
        inputs.make_loader(
            config("image_folder", data_dir=root, image_size=8, augment="none"), MESH
        )


def write_npz(folder: pathlib.Path, split: str, **stored) -> None:
    folder.mkdir(exist_ok=True)
    np.savez(folder / f"{split}.npz", **stored)


def test_npz_arrays_train_and_evaluate_as_stored(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (10, 32, 32), np.uint8)
    write_npz(tmp_path, "train", images=grey, labels=np.arange(10) % 4)
    write_npz(tmp_path, "test", images=grey[:5, ..., None], labels=np.arange(5) % 4)
    ds_config = config("npz", data_dir=str(tmp_path))
    loader = inputs.make_loader(ds_config, MESH)
    assert loader.info == datasets.DatasetInfo(4, (32, 32, 3), 10, 5)
    test = real_examples(device_eval(ds_config))
    want = (grey[:5, ..., None] / 255 - np.array(ds_config.mean)) / np.array(ds_config.std)
    np.testing.assert_allclose(test["image"], want, atol=1e-6)


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ({"pixels": np.zeros((2, 32, 32), np.uint8)}, r"lacks the arrays \['images', 'labels'\]"),
        ({"images": np.zeros((2, 32, 32), np.float32), "labels": [0, 1]}, "images must be uint8"),
        ({"images": np.zeros((2, 16, 16), np.uint8), "labels": [0, 1]}, "image_size 32"),
        ({"images": np.zeros((2, 32, 32), np.uint8), "labels": [0]}, "one per image"),
        (
            {"images": np.zeros((2, 32, 32), np.uint8), "labels": [0, 7]},
            r"\[0, 7\], outside \[0, 3\)",
        ),
    ],
)
def test_bad_npz_files_are_one_line_errors(tmp_path, stored, message):
    write_npz(tmp_path, "train", images=np.zeros((3, 32, 32), np.uint8), labels=[0, 1, 2])
    write_npz(tmp_path, "test", **stored)
    with pytest.raises(ValueError, match=message):
        inputs.make_loader(config("npz", data_dir=str(tmp_path), num_classes=3), MESH)


# ---------------------------------------------------------------------------------------
# MLKD's strong view.


def test_strong_view_is_a_separately_drawn_crop_then_randaugment(monkeypatch):
    ds_config = config("digits", augment="crop_flip", max_train_examples=32)
    ds_config.strong_view = "randaugment"
    loader = inputs.DeviceLoader(ds_config, MESH)
    batch = take(loader.train_batches(32, seed=0, start_step=0), 1)[0]
    again = take(loader.train_batches(32, seed=0, start_step=0), 1)[0]
    assert batch["image_strong"].shape == batch["image"].shape == (32, 8, 8, 3)
    np.testing.assert_array_equal(batch["image_strong"], again["image_strong"])
    assert not np.allclose(batch["image_strong"], batch["image"])
    # Without RandAugment the strong view is a pad-crop-flip of its own: the same pixels
    # as some weak views, drawn apart from them.
    monkeypatch.setattr(device_augment.randaugment, "randaugment", lambda images, keys: images)
    loader = inputs.DeviceLoader(ds_config, MESH)
    plain = take(loader.train_batches(32, seed=0, start_step=0), 1)[0]
    np.testing.assert_array_equal(plain["image"], batch["image"])
    mean, std = np.array(ds_config.mean), np.array(ds_config.std)
    digits = arrays.DigitsSource().load("train", 32).images[plain["index"]] / 16
    for strong, original in zip(plain["image_strong"], digits, strict=True):
        padded = (np.pad(original, ((4, 4), (4, 4), (0, 0))) - mean) / std
        crops = [padded[t : t + 8, u : u + 8] for t in range(9) for u in range(9)]
        crops += [crop[:, ::-1] for crop in crops]
        assert any(np.allclose(strong, crop, atol=1e-5) for crop in crops)
    assert any(not np.array_equal(s, w) for s, w in zip(plain["image_strong"], plain["image"]))


def test_a_method_with_two_views_needs_the_strong_view():
    from bkd_jax.config_defaults import base_config
    from bkd_jax.training import validation

    config = base_config("digits", teacher="resnet8", student="resnet8", method="mlkd")
    config.teacher_checkpoint = "/teacher"
    assert config.dataset.strong_view == "randaugment"  # the method brings its data need
    validation.validate_config(config)
    config.dataset.strong_view = "none"
    with pytest.raises(ValueError, match=r"mlkd' trains on two views .*strong_view='randaugment'"):
        validation.validate_config(config)


def test_strong_view_on_the_host_loader_is_an_error():
    pytest.importorskip("bkd_jax.data.pipeline", reason="the host loader needs TensorFlow")
    with pytest.raises(ValueError, match="strong_view runs on the device loader only"):
        inputs.make_loader(config("digits", loader="host", strong_view="randaugment"), MESH)
