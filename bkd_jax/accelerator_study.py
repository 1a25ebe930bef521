r"""The accelerator study: CIFAR-10 from device memory, a teacher and five students, one table.

    python -m bkd_jax.accelerator_study --data=cifar10-jpeg.tar.gz --workdir=runs/study
    python -m bkd_jax.accelerator_study --data=DIR --workdir=W --smoke   # tiny, any CPU

`--data` is an image folder laid out as ``<data>/{train,test}/<class>/<image>`` (the
CIFAR-10 JPEGs), or a ``.tar.gz`` of one, extracted once into the workdir. The runs are
those of `configs/cifar10_study.py` (its docstring has the schedule and why): a resnet32x4
teacher (cross-entropy), then resnet8x4 students with CE, KD, DKD, Block-KD and Block-KD
lite distilled from it, in bfloat16 at batch 1024, the images decoded once (cached in the
workdir) and fed from device memory. Each run reports its test top-1 (best and last), its
wall time (start-up, compilation and evaluations included), its training rate in images
per second (median of the logged intervals after the first, which holds the
compilation) and its model FLOP utilisation (the step's FLOPs from XLA's cost analysis
over its time, against `bkd_jax.bench.mfu`'s peak of the device). With `--bench`, the time
left of `--budget_minutes` then goes to `bkd_jax.bench.gpu`'s step table.

Needs jax, flax, optax, orbax-checkpoint, absl-py, numpy, pillow and ml_collections; no
TensorFlow or TFDS. Rerunning the command resumes an interrupted run and reuses finished
ones. `--smoke` runs the same code on resnet8s for two steps each: a check, not a study.
Written to `--workdir`: one folder per run, `study.md` (the table, rewritten after each
run) and, with `--bench`, `bench_gpu.md`.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags, logging

from bkd_jax import bench
from bkd_jax.bench import mfu
from bkd_jax.console import load_config_file, packaged_config_file
from bkd_jax.training import loop, run_files

METHODS = ("ce", "kd", "dkd", "blockkd", "blockkd_lite")
TEACHER = "teacher"
TABLE_FILE = "study.md"
_DATA_DIR = "data"  # where a tarball is extracted, inside the workdir
_EXTRACTED = ".extracted"  # written once the extraction is complete


def define_flags() -> None:
    """The command line's flags; only when run as a program, so importing defines none."""
    flags.DEFINE_string(
        "data", None, "Image folder or .tar.gz of one (CIFAR-10 layout).", required=True
    )
    flags.DEFINE_string("workdir", None, "Directory for the runs and the table.", required=True)
    # Not --methods: bkd_jax.bench, imported here, defines that flag.
    flags.DEFINE_list("students", list(METHODS), "Student methods, in table order.")
    flags.DEFINE_bool("smoke", False, "resnet8s, two steps per run: a check on any machine.")
    flags.DEFINE_bool("bench", False, "Then bkd_jax.bench.gpu in the time left.")
    flags.DEFINE_float("budget_minutes", 8.0, "The whole study's time, for --bench.")


def image_folder(data: str, workdir: pathlib.Path) -> pathlib.Path:
    """`data` itself if it is a folder, else the tarball extracted (once) into `workdir`."""
    path = pathlib.Path(data)
    if path.is_dir():
        return path
    if not path.is_file() or not tarfile.is_tarfile(path):
        raise ValueError(f"--data {data} is neither a folder nor a tar archive")
    target = workdir / _DATA_DIR
    if not (target / _EXTRACTED).exists():
        print(f"Extracting {path} into {target} ...", flush=True)
        with tarfile.open(path) as archive:
            archive.extractall(target, filter="data")
        (target / _EXTRACTED).touch()
    return target


def steady_seconds_per_step(run_dir: pathlib.Path) -> float | None:
    """Median logged seconds per step, the first interval (compilation) left out."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    times = [
        r["train/seconds_per_step"] for r in map(json.loads, lines) if "train/seconds_per_step" in r
    ]
    return statistics.median(times[1:]) if len(times) > 1 else None


def step_flops(
    pair: tuple[str, str], method: str, config: Any
) -> tuple[float | None, float | None]:
    """FLOPs of one train step of `method` on `pair` at the config's batch and dtype (XLA's
    cost analysis of the lowered step), and the peak FLOP/s of the devices."""
    b = bench.Bench(pair, config.global_batch_size, config.dataset.image_size, 10)
    variant = bench.Variant(method, config.dtype, batch_size=config.global_batch_size)
    lowered, *_ = b.lower(variant)
    mesh = b.mesh(variant)
    peak, _ = mfu.peak_flops(mesh, config.dtype)
    return bench.cost_flops(lowered), peak


def run_all(
    data_dir: pathlib.Path, workdir: pathlib.Path, methods: Sequence[str], smoke: bool
) -> list[dict[str, Any]]:
    """Trains (or resumes, or reuses) the teacher and then every student; a row for each."""
    get_config = load_config_file(packaged_config_file("cifar10_study.py")).get_config
    rows = []
    for number, name in enumerate([TEACHER, *methods], 1):
        arg = "role=teacher" if name == TEACHER else f"method={name}"
        config = get_config(f"{arg},data_dir={data_dir},smoke={int(smoke)}")
        config.dataset.cache_dir = str(workdir / "decoded")
        if name != TEACHER:
            config.teacher_checkpoint = str(workdir / TEACHER)
        print(f"[{number}/{len(methods) + 1}] {name}: {config.distill.method} "
              f"{config.student} for {config.num_train_steps or config.num_epochs} "
              f"{'steps' if config.num_train_steps else 'epochs'}", flush=True)  # fmt: skip
        start = time.monotonic()
        summary = loop.train_and_evaluate(config, str(workdir / name))
        wall = time.monotonic() - start
        seconds = steady_seconds_per_step(workdir / name)
        pair = (config.teacher, config.student)
        flops, peak = step_flops(pair, config.distill.method, config)
        rows.append(
            {
                "run": name,
                "model": config.student,
                "best": summary["best"][run_files.BEST_METRIC],
                "last": summary["last"][run_files.BEST_METRIC],
                "wall_s": wall,
                "images_per_s": config.global_batch_size / seconds if seconds else None,
                "mfu": flops / seconds / peak if seconds and flops and peak else None,
            }
        )
        (workdir / TABLE_FILE).write_text(table(rows, config) + "\n")
        print(table(rows[-1:], config, header=False), flush=True)
    return rows


def table(rows: Sequence[dict[str, Any]], config: Any, header: bool = True) -> str:
    """The study's Markdown table."""

    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"| run | model | top-1 best | top-1 last | wall s | train img/s | MFU ({config.dtype}) |",
        "|---|---|---|---|---|---|---|",
    ] if header else []  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['model']} | {100 * r['best']:.2f}% | {100 * r['last']:.2f}% | "
            f"{r['wall_s']:.0f} | {fmt(r['images_per_s'], ',.0f')} | "
            f"{fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}% |"
        )
    return "\n".join(lines)


def run_bench(workdir: pathlib.Path, seconds_left: float, smoke: bool) -> None:
    """`bkd_jax.bench.gpu` in a process of its own (it limits JAX's share of the memory
    before JAX starts), stopped when the time is up."""
    if seconds_left < 60:
        print(f"No time left for bkd_jax.bench.gpu ({seconds_left:.0f} s).")
        return
    command = [sys.executable, "-m", "bkd_jax.bench.gpu", f"--out={workdir / 'bench_gpu.md'}"]
    try:
        subprocess.run(command + (["--smoke"] if smoke else []), timeout=seconds_left, check=True)
    except subprocess.TimeoutExpired:
        print("bkd_jax.bench.gpu stopped: the time budget is spent (its tables so far are above).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if not args["verbosity"].present:  # The study's own lines say enough.
        logging.set_verbosity(logging.WARNING)
    start = time.monotonic()
    workdir = pathlib.Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    data_dir = image_folder(args.data, workdir)
    print(
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}", flush=True
    )
    run_all(data_dir, workdir, args.students, args.smoke)
    print(f"\n{(workdir / TABLE_FILE).read_text()}\nStudy: {time.monotonic() - start:.0f} s.")
    if args.bench:
        run_bench(workdir, args.budget_minutes * 60 - (time.monotonic() - start), args.smoke)


if __name__ == "__main__":
    define_flags()
    app.run(main)
