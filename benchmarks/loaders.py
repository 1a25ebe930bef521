"""The two loaders side by side on the real CIFAR-10 JPEGs: input time per step, accuracy.

    python benchmarks/loaders.py share --tarball=cifar10-jpeg.tar.gz     # data share of a step
    python benchmarks/loaders.py accuracy --tarball=cifar10-jpeg.tar.gz  # same run, both loaders

Both train resnet8 (10 classes) with cross-entropy through `train_and_evaluate`, once with
``dataset.loader = "device"`` (`bkd_jax.training.inputs`) and once with "host" (tf.data),
on the CIFAR-10 JPEG folder extracted from the tarball into a temporary directory.

share: batch 64 and 512, `--steps` steps each, logged every 10; prints the trainer's own
  `train/data_seconds_per_step` (the time the loop waits for its next batch) and
  `train/seconds_per_step`, as medians of the logged intervals after the first (which
  holds the compilation), and the data share of the step.
accuracy: 5,000 training images (the first 500 of each class), 10 epochs at batch 64,
  seeds 0 and 1 on each loader, evaluated on the 10,000 test images at the end. The
  loaders draw their augmentations from different random streams, so the runs are not
  equal: they should agree within the seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tarfile
import tempfile

from bkd_jax.config_defaults import base_config
from bkd_jax.training import loop

LOADERS = ("device", "host")
ACCURACY_PER_CLASS = 500


def cifar_config(data_dir: pathlib.Path, loader: str, batch: int):
    config = base_config("image_folder", teacher="resnet8", student="resnet8", method="ce")
    ds = config.dataset
    ds.data_dir, ds.image_size, ds.augment, ds.loader = str(data_dir), 32, "crop_flip", loader
    ds.mean, ds.std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's
    ds.cache_dir = str(data_dir.parent / "decoded")
    config.global_batch_size = batch
    config.eval_batch_size = 500
    config.tensorboard = False
    config.checkpoint_every_steps = 1_000_000
    config.keep_checkpoints = 1
    return config


def medians(workdir: pathlib.Path) -> tuple[float, float]:
    """Median data and step seconds of the logged intervals after the first."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "train/seconds_per_step" in r][1:]
    return (
        statistics.median(r["train/data_seconds_per_step"] for r in rows),
        statistics.median(r["train/seconds_per_step"] for r in rows),
    )


def share(data_dir: pathlib.Path, runs: pathlib.Path, steps: int) -> None:
    print("| loader | batch | data ms/step | step ms | data share |")
    print("|---|---:|---:|---:|---:|")
    for batch in (64, 512):
        for loader in LOADERS:
            config = cifar_config(data_dir, loader, batch)
            config.num_train_steps = steps
            config.log_every_steps = 10
            config.eval_every_epochs = 1000  # once, at the end
            config.dataset.max_eval_examples = 500
            workdir = runs / f"share_{loader}_{batch}"
            loop.train_and_evaluate(config, str(workdir))
            data, step = medians(workdir)
            print(f"| {loader} | {batch} | {1e3 * data:.2f} | {1e3 * step:.0f} | "
                  f"{100 * data / step:.2f}% |", flush=True)  # fmt: skip


def accuracy(data_dir: pathlib.Path, runs: pathlib.Path) -> None:
    print("| loader | seed | test top-1 | seconds per step |")
    print("|---|---:|---:|---:|")
    for loader in LOADERS:
        for seed in (0, 1):
            config = cifar_config(data_dir, loader, 64)
            config.seed = seed
            config.num_epochs = 10
            config.optim.decay_epochs = (5, 8)
            config.eval_every_epochs = 10
            config.log_every_steps = 50
            workdir = runs / f"accuracy_{loader}_{seed}"
            summary = loop.train_and_evaluate(config, str(workdir))
            _, step = medians(workdir)
            print(f"| {loader} | {seed} | {100 * summary['last']['eval/student/top1']:.2f}% | "
                  f"{step:.3f} |", flush=True)  # fmt: skip


def extract(tarball: pathlib.Path, root: pathlib.Path, per_class: int | None) -> None:
    """The tarball's image folder; with `per_class`, only that many training images of
    each class (the folder is sorted by class, so the first N images are one class)."""
    counts: dict[str, int] = {}
    with tarfile.open(tarball) as archive:
        for member in archive:
            parts = pathlib.PurePosixPath(member.name).parts
            if per_class is not None and member.isfile() and parts[0] == "train":
                counts[parts[1]] = counts.get(parts[1], 0) + 1
                if counts[parts[1]] > per_class:
                    continue
            archive.extract(member, root, filter="data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("share", "accuracy"))
    parser.add_argument("--tarball", required=True, help="the CIFAR-10 JPEG tarball")
    parser.add_argument("--steps", type=int, default=60, help="share: steps per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        per_class = None if args.mode == "share" else ACCURACY_PER_CLASS
        extract(pathlib.Path(args.tarball), root / "cifar10", per_class)
        if args.mode == "share":
            share(root / "cifar10", root / "runs", args.steps)
        else:
            accuracy(root / "cifar10", root / "runs")


if __name__ == "__main__":
    main()
