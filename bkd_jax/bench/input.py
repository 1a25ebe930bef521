r"""Benchmark of the input pipeline alone: images/s, and images per second of one core.

  python -m bkd_jax.bench.input [--batches=20] [--cifar_tarball=PATH]

Runs the real `bkd_jax.data.pipeline` functions (`train_batches`, `eval_batches`) on an
image folder in a temporary directory and pulls batches as fast as they come, with no
step to feed:

- CIFAR: 32x32 JPEGs, pad-crop-flip. From the CIFAR-10 JPEG tarball when given (a
  `<split>/<class>/<image>.jpg` archive; a few hundred images per class are extracted),
  otherwise generated 32x32 images.
- ImageNet size: generated 500x375 JPEGs (about the mean ImageNet train image), the
  random-resized crop to 224 for training and the resize / centre crop for evaluation.
  The pipeline decodes only the crop window of a JPEG (`tf.image.decode_and_crop_jpeg`).
  Further rows time the stages of that crop alone (`CROP_STAGES`: reading, decoding the
  whole JPEG or only the window, resizing with or without antialiasing), on the same
  files and crop distribution, to show where the host's time goes.
- When grain and PIL are installed, the CIFAR pad-crop-flip once more through grain's
  `MapDataset` with numpy augmentations, as a TensorFlow-free loader.
- The CIFAR pad-crop-flip of the device-memory loader (`bkd_jax.training.inputs`): the
  images decoded once, then each batch gathered and augmented by one jitted function on
  the first device (each batch waited for, so that its time is counted).

"images / core-s" is images over the process CPU time (all of tf.data's threads), the
rate one fully used host core sustains; it is steady on a loaded machine where the wall
rate is not. A GPU step of R images/s needs about R / rate host cores.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import app, flags

from bkd_jax.data import datasets, pipeline
from bkd_jax.training import inputs, sharding

DEFAULT_TARBALL = (
    pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"
)
_PER_CLASS = 256  # CIFAR images extracted per class of the train split (64 of the test)
_LARGE_SHAPE = (375, 500)  # height, width of the generated ImageNet-size JPEGs
_BATCH = 64

_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per row.")
_CIFAR_TARBALL = flags.DEFINE_string(
    "cifar_tarball", None, "CIFAR-10 JPEG tarball; default ../shared/data's if any."
)


def extract_cifar(tarball: pathlib.Path, root: pathlib.Path) -> None:
    """The first `_PER_CLASS` train and a quarter as many test images of every class."""
    limits = {"train": _PER_CLASS, "test": _PER_CLASS // 4}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(tarball) as archive:
        for member in archive:
            parts = pathlib.PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] not in limits:
                continue
            key = parts[:2]
            if counts.get(key, 0) < limits[parts[0]]:
                counts[key] = counts.get(key, 0) + 1
                archive.extract(member, root, filter="data")


def write_jpegs(
    root: pathlib.Path, shape: tuple[int, int], counts: dict[str, int], seed: int
) -> None:
    """Smooth random colour images (like photos, unlike noise, they compress) as JPEGs."""
    rng = np.random.default_rng(seed)
    h, w = shape
    for split, count in counts.items():
        for k in range(count):
            folder = root / split / f"class{k % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.uniform(0, 255, (max(h // 16, 2), max(w // 16, 2), 3))
            image = tf.image.resize(coarse, shape, "bicubic") + rng.normal(0, 8, (h, w, 3))
            pixels = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
            (folder / f"{k:04d}.jpg").write_bytes(tf.io.encode_jpeg(pixels, quality=90).numpy())


def folder_config(root: pathlib.Path, size: int, augment: str) -> ml_collections.ConfigDict:
    config = datasets.default_dataset_config("image_folder")
    config.data_dir = str(root)
    config.image_size = size
    config.augment = augment
    return config


def timed(batches: Iterator, count: int) -> tuple[float, float]:
    """(images/s, images per CPU second) over `count` batches after a warm-up one."""
    images = 0
    next(batches)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        images += len(next(batches)["image"])
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def _window(path: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """The pipeline's decode of the random-resized crop window of the JPEG at `path`."""
    seed = tf.stack([index, tf.constant(0, tf.int64)])
    window = functools.partial(pipeline.inception_crop_window, seed=seed)
    return pipeline.decode_encoded(tf.io.read_file(path), window)


# What one random-resized crop of a JPEG costs, stage by stage, through the pipeline's
# decode: (index, file path) -> tensor (the decoded image's shape where images differ in
# size, so that they batch).
CROP_STAGES: dict[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]] = {
    "read the file": lambda i, path: tf.strings.length(tf.io.read_file(path)),
    "read, decode the whole JPEG": lambda i, path: tf.shape(
        pipeline.decode_encoded(tf.io.read_file(path))
    ),
    "read, decode the crop window": lambda i, path: tf.shape(_window(path, i)),
    "read, decode the window, resize to 224 (antialiased, as the pipeline)": (
        lambda i, path: tf.image.resize(_window(path, i), [224, 224], antialias=True)
    ),
    "read, decode the window, resize to 224 (bilinear, no antialiasing)": (
        lambda i, path: tf.image.resize(_window(path, i), [224, 224], antialias=False)
    ),
}


def stage_batches(root: pathlib.Path, stage: str) -> Iterator:
    """Batches of one of `CROP_STAGES` over the train JPEGs under `root`, endlessly."""
    files = sorted(str(p) for p in (root / "train").glob("*/*.jpg"))
    ds = tf.data.Dataset.from_tensor_slices(files).repeat().enumerate()
    ds = ds.map(lambda i, path: {"image": CROP_STAGES[stage](i, path)}, tf.data.AUTOTUNE)
    return ds.batch(_BATCH).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def grain_crop_flip_batches(root: pathlib.Path, config: ml_collections.ConfigDict) -> Iterator:
    """CIFAR pad-crop-flip with grain and numpy, no TensorFlow: PIL decodes the JPEGs."""
    import grain.python as grain  # Optional: only this row needs it.
    from PIL import Image

    files = sorted((root / "train").glob("*/*.jpg"))
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    pad = 4

    def crop_flip(path: pathlib.Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        y, x = rng.integers(0, 2 * pad + 1, 2)
        image = padded[y : y + 32, x : x + 32]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": (image - mean) / std}

    ds = grain.MapDataset.source(files).shuffle(seed=0).repeat()
    ds = ds.random_map(crop_flip, seed=0).batch(_BATCH)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def device_batches(config: ml_collections.ConfigDict) -> Iterator[dict[str, jax.Array]]:
    """The device loader's training batches on the first device, each one finished."""
    loader = inputs.DeviceLoader(config, sharding.make_mesh(jax.devices()[:1]))
    for batch in loader.train_batches(_BATCH, seed=0, start_step=0):
        yield jax.block_until_ready(batch)


def rows(workdir: pathlib.Path, tarball: pathlib.Path | None, count: int) -> list[tuple]:
    """(data, transform, images/s, images per core-s) of every measured pipeline."""
    cifar, large = workdir / "cifar", workdir / "large"
    # Enough for the warm-up and timed batches within one epoch (or eval pass).
    per_split = _BATCH * (count + 1)
    if tarball is not None and tarball.is_file():
        extract_cifar(tarball, cifar)
        cifar_name = "CIFAR-10 JPEG 32x32"
    else:
        write_jpegs(cifar, (32, 32), {"train": per_split, "test": per_split}, seed=0)
        cifar_name = "generated JPEG 32x32"
    write_jpegs(large, _LARGE_SHAPE, {"train": per_split, "test": per_split}, seed=1)
    large_name = f"generated JPEG {_LARGE_SHAPE[1]}x{_LARGE_SHAPE[0]}"

    def train(config) -> Callable[[], Iterator]:
        return lambda: pipeline.train_batches(
            config, global_batch_size=_BATCH, seed=0, process_index=0, process_count=1
        )

    def evaluate(config) -> Callable[[], Iterator]:
        def endless():
            while True:
                yield from pipeline.eval_batches(
                    config, global_batch_size=_BATCH, process_index=0, process_count=1
                )

        return endless

    large_config = folder_config(large, 224, "inception")
    cases = [
        (cifar_name, "pad-crop-flip (train)", train(folder_config(cifar, 32, "crop_flip"))),
        (large_name, "random-resized crop 224, window decoded (train)", train(large_config)),
        (large_name, "resize 256, centre crop 224 (eval)", evaluate(large_config)),
    ]
    cases += [
        (large_name, f"stage: {stage}", functools.partial(stage_batches, large, stage))
        for stage in CROP_STAGES
    ]
    cifar_config = folder_config(cifar, 32, "crop_flip")
    cifar_config.cache_dir = str(workdir / "decoded")
    cases.append((cifar_name, "pad-crop-flip, device memory (jitted gather + augment)",
                  lambda: device_batches(cifar_config)))  # fmt: skip
    if importlib.util.find_spec("grain") and importlib.util.find_spec("PIL"):
        config = folder_config(cifar, 32, "crop_flip")
        cases.append((cifar_name, "pad-crop-flip, grain + numpy (no TensorFlow)",
                      lambda: grain_crop_flip_batches(cifar, config)))  # fmt: skip
    return [(data, what, *timed(make(), count)) for data, what, make in cases]


def report(tarball: pathlib.Path | None = DEFAULT_TARBALL, batches: int = 20) -> str:
    """The Markdown table of `rows` over `batches` batches each, in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        measured = rows(pathlib.Path(tmp), tarball, batches)
    lines = [
        "| data | transform | images/s | images / core-s |",
        "|---|---|---:|---:|",
        *(f"| {d} | {w} | {rate:.0f} | {per_core:.0f} |" for d, w, rate, per_core in measured),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(report(pathlib.Path(_CIFAR_TARBALL.value or DEFAULT_TARBALL), _BATCHES.value))


if __name__ == "__main__":
    app.run(main)
