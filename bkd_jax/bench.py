r"""Benchmark of the jitted train step of every distillation method.

  python -m bkd_jax.bench --pair=resnet32x4:resnet8x4 --batch_size=64 \
      --methods=ce,kd,dkd,blockkd,blockkd_lite --dtype=float32 --ablate=batch_stones,remat

Block-KD costs more than KD because every stepping-stone runs part of the frozen teacher
forward and, for the input gradient only, backward. The floor of that cost is set by the
arithmetic, so each method's measured step time stands next to the FLOPs that XLA's cost
analysis counts in the same compiled step, and the ratio of Block-KD's time to KD's is
printed beside the ratio of their FLOPs.

Per row: images/s of the whole train step (forward, backward, optimizer update; median
over the timed steps), the median process CPU time per step, the XLA compile time, the
memory of the compiled step (XLA's buffer assignment: arguments + outputs - donated
aliases + temporaries) and GFLOPs per step. CPU time is the steadier measure on a shared
CPU host, where the wall time depends on how many cores other processes leave free; on an
accelerator the wall time is the one that counts. `--ablate` adds rows with one option
flipped (`batch_stones`, `remat`, `dtype`, `donate`) to show what each buys. Variants are
timed interleaved, a few steps each per round, so that load from other processes hits them
alike. Batches are random: no data is read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from bkd_jax import config_defaults, distillers, models, optim, steps

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ABLATIONS = ("batch_stones", "remat", "dtype", "donate")
STONE_OPTIONS = ("batch_stones", "remat")  # options that only change Block-KD methods
RATIOS = (("blockkd", "kd"), ("blockkd_lite", "kd"), ("blockkd_lite", "blockkd"))
MARGINS = (("kd", "ce"), ("blockkd", "kd"), ("blockkd_lite", "kd"), ("blockkd", "blockkd_lite"))
NUM_EXAMPLES = 50_000  # training-set size (CIFAR-100's) for CRD's memory bank

_PAIR = flags.DEFINE_string("pair", "resnet32x4:resnet8x4", "teacher:student zoo names.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per step.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the square input images.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classifier width.")
_METHODS = flags.DEFINE_list("methods", distillers.available(), "Methods to time.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype of the models.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise teacher blocks on stone paths.")
_DONATE = flags.DEFINE_bool("donate", True, "Donate the train state to the step.")
_BATCH_STONES = flags.DEFINE_bool(
    "batch_stones", True, "Run the stones that reach a teacher block as one batched call."
)
_ABLATE = flags.DEFINE_list(
    "ablate", [], f"Extra rows with one option flipped, any of {', '.join(ABLATIONS)}."
)
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per variant per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds over all variants.")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One train step to compile and time: a method and the options it runs with."""

    method: str
    dtype: str = "float32"
    remat: bool = False
    batch_stones: bool = True
    donate: bool = True

    def flipped(self, option: str) -> Variant:
        """This variant with `option` (one of `ABLATIONS`) switched to its other value."""
        if option == "dtype":
            other = "bfloat16" if self.dtype == "float32" else "float32"
            return dataclasses.replace(self, dtype=other)
        return dataclasses.replace(self, **{option: not getattr(self, option)})

    def label(self, base: Variant) -> str:
        """The method, and how this variant differs from `base`: e.g. "blockkd +remat"."""
        diffs = []
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            if value == getattr(base, field.name):
                continue
            if isinstance(value, bool):
                value = ("+" if value else "-") + field.name
            diffs.append(value)
        return " ".join([self.method, *diffs])


@dataclasses.dataclass
class Result:
    """Static measurements of one compiled variant, and its timed steps in seconds."""

    variant: Variant
    compile_s: float
    memory_bytes: float | None
    flops: float | None
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu)


def cost_flops(compiled) -> float | None:
    """FLOPs from XLA's cost analysis: a dict, or a list of dicts in older jax versions."""
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def memory_bytes(compiled) -> float | None:
    """Bytes the compiled step holds: arguments + outputs - donated aliases + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return float(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )


class Bench:
    """Compiles and times train-step variants of one teacher/student pair on random data."""

    def __init__(self, pair: tuple[str, str], batch_size: int, image_size: int, classes: int):
        self.pair = pair
        self.classes = classes
        image_key, label_key, teacher_key = jax.random.split(jax.random.key(0), 3)
        shape = (batch_size, image_size, image_size, 3)
        self.batch = {
            "image": jax.random.normal(image_key, shape, jnp.float32),
            "label": jax.random.randint(label_key, (batch_size,), 0, classes),
            "index": jnp.arange(batch_size, dtype=jnp.int32),  # CRD's memory-bank rows
        }
        teacher = models.get_model(pair[0], classes)
        self.teacher_vars = jax.jit(teacher.init)(teacher_key, self.batch["image"])
        self.optim_config = config_defaults.optim_config(0.05, (150, 180, 210), 5e-4)

    def distiller(self, v: Variant) -> distillers.Distiller:
        dtype = DTYPES[v.dtype]
        teacher, student = (models.get_model(name, self.classes, dtype) for name in self.pair)
        return distillers.make_distiller(
            config_defaults.distill_config(v.method), student, teacher,
            self.batch["image"].shape, dtype=dtype, batch_stones=v.batch_stones,
            remat_teacher=v.remat, num_examples=NUM_EXAMPLES,
        )  # fmt: skip

    def compile(self, v: Variant) -> tuple[Any, steps.TrainState, Result]:
        """The compiled step of `v`, a fresh train state for it, and its static measures."""
        distiller = self.distiller(v)
        optimizer = optim.make_optimizer(
            self.optim_config, steps_per_epoch=782, name=distillers.get(v.method).optimizer
        )
        init = functools.partial(steps.create_train_state, distiller, optimizer)
        state = jax.jit(init)(jax.random.key(1), self.batch["image"])
        step = steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0))
        lowered = jax.jit(step, donate_argnums=0 if v.donate else ()).lower(
            state, self.teacher_vars, self.batch
        )
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        return compiled, state, Result(v, compile_s, memory_bytes(compiled), cost_flops(compiled))

    def run(self, variants: Sequence[Variant], steps_per_round: int, rounds: int) -> list[Result]:
        """Compiles every variant, then times them round-robin."""
        compiled = [self.compile(v) for v in variants]
        states = []
        for fn, state, _ in compiled:  # warm-up: the first call allocates and pages in
            state, metrics = fn(state, self.teacher_vars, self.batch)
            jax.block_until_ready(metrics)
            states.append(state)
        for _ in range(rounds):
            for k, (fn, _, result) in enumerate(compiled):
                for _ in range(steps_per_round):
                    wall, cpu = time.perf_counter(), time.process_time()
                    states[k], metrics = fn(states[k], self.teacher_vars, self.batch)
                    jax.block_until_ready((states[k], metrics))
                    result.wall.append(time.perf_counter() - wall)
                    result.cpu.append(time.process_time() - cpu)
        return [result for *_, result in compiled]


def variants(base: Variant, methods: Sequence[str], ablate: Sequence[str]) -> list[Variant]:
    """Each method with the base options, then each method with each ablated option flipped."""
    out = [dataclasses.replace(base, method=m) for m in methods]
    for option in ablate:
        for m in methods:
            if option not in STONE_OPTIONS or "stones" in distillers.get(m).consumes:
                out.append(dataclasses.replace(base, method=m).flipped(option))
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: Sequence[Result], base: Variant, batch_size: int) -> str:
    """A Markdown table with one row per variant."""
    rows = [
        "| variant | images/s | step ms | CPU ms/step | compile s | memory MiB | GFLOPs/step "
        "| GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        memory = None if r.memory_bytes is None else r.memory_bytes / 2**20
        flops = None if r.flops is None else r.flops / 1e9
        rate = None if flops is None else flops / r.wall_s
        rows.append(
            f"| {r.variant.label(base)} | {batch_size / r.wall_s:.1f} | {1e3 * r.wall_s:.0f} "
            f"| {1e3 * r.cpu_s:.0f} | {r.compile_s:.1f} | {_fmt(memory, '.0f')} "
            f"| {_fmt(flops, '.1f')} | {_fmt(rate, '.1f')} |"
        )
    return "\n".join(rows)


def _base_rows(results: Sequence[Result], base: Variant) -> dict[str, Result]:
    """The result of each method run with the `base` options."""
    return {
        r.variant.method: r
        for r in results
        if r.variant == dataclasses.replace(base, method=r.variant.method)
    }


def ratios(results: Sequence[Result], base: Variant) -> str:
    """Time ratios against FLOP ratios (the floor) between methods run with `base` options."""
    rows = _base_rows(results, base)
    lines = [
        "| ratio | wall time | CPU time | FLOPs (floor) | wall / FLOPs | CPU / FLOPs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for num, den in RATIOS:
        a, b = rows.get(num), rows.get(den)
        if a is None or b is None or not (a.flops and b.flops):
            continue
        wall, cpu, flops = a.wall_s / b.wall_s, a.cpu_s / b.cpu_s, a.flops / b.flops
        lines.append(
            f"| {num} / {den} | {wall:.2f} | {cpu:.2f} | {flops:.2f} | {wall / flops:.2f} "
            f"| {cpu / flops:.2f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def margins(results: Sequence[Result], base: Variant) -> str:
    """The cost of what one method adds to another, and the FLOP rate it runs at.

    kd - ce is the teacher's own forward; blockkd - kd the stepping-stones. Stones that run
    at the teacher forward's rate cost what their arithmetic costs on this hardware.
    """
    rows = _base_rows(results, base)
    lines = [
        "| difference | GFLOPs | wall ms | CPU ms | GFLOP/s (wall) | GFLOP per CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for more, less in MARGINS:
        a, b = rows.get(more), rows.get(less)
        if a is None or b is None or not (a.flops and b.flops):
            continue
        flops, wall, cpu = (a.flops - b.flops) / 1e9, a.wall_s - b.wall_s, a.cpu_s - b.cpu_s
        lines.append(
            f"| {more} - {less} | {flops:.1f} | {1e3 * wall:.0f} | {1e3 * cpu:.0f} "
            f"| {flops / wall:.1f} | {flops / cpu:.1f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def machine() -> str:
    """The host CPU, the jax devices and the jax version, in one line."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    cpu = names[0] if names else platform.processor() or platform.machine()
    device = jax.devices()[0]
    return (
        f"{cpu} ({os.cpu_count()} cores), {jax.device_count()} x {device.platform} "
        f"({device.device_kind}), jax {jax.__version__}"
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = set(_METHODS.value) - set(distillers.available())
    if unknown:
        raise app.UsageError(
            f"unknown methods {sorted(unknown)}; known: {', '.join(distillers.available())}"
        )
    bad = set(_ABLATE.value) - set(ABLATIONS)
    if bad:
        raise app.UsageError(f"unknown --ablate options {sorted(bad)}; known: {ABLATIONS}")
    teacher, sep, student = _PAIR.value.partition(":")
    if not sep:
        raise app.UsageError(f"--pair must be teacher:student, got {_PAIR.value!r}")
    base = Variant(
        _METHODS.value[0], _DTYPE.value, _REMAT.value, _BATCH_STONES.value, _DONATE.value
    )
    bench = Bench((teacher, student), _BATCH_SIZE.value, _IMAGE_SIZE.value, _NUM_CLASSES.value)
    results = bench.run(variants(base, _METHODS.value, _ABLATE.value), _STEPS.value, _ROUNDS.value)
    print(f"{teacher} -> {student}, batch {_BATCH_SIZE.value}, {base.dtype}; {machine()}")
    print(table(results, base, _BATCH_SIZE.value))
    for summary in (ratios(results, base), margins(results, base)):
        if summary:
            print(f"\n{summary}")


if __name__ == "__main__":
    app.run(main)
