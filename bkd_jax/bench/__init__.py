"""Benchmark of the jitted train step of every distillation method.

  python -m bkd_jax.bench --pair=resnet32x4:resnet8x4 --batch_sizes=64,256 \
      --methods=ce,kd,dkd,blockkd,blockkd_lite --dtype=float32 --ablate=batch_stones,remat

The package's other commands: `python -m bkd_jax.bench.gpu` (the accelerator table) and
`python -m bkd_jax.bench.input` (the input pipeline alone).

Block-KD costs more than KD because every stepping-stone runs part of the frozen teacher
forward and, for the input gradient only, backward. The floor of that cost is set by the
arithmetic, so each method's measured step time stands next to the FLOPs that XLA's cost
analysis counts in the same compiled step, and the ratio of Block-KD's time to KD's is
printed beside the ratio of their FLOPs.

Per row: images/s of the whole train step (forward, backward, optimizer update; median
over the timed steps), the median process CPU time per step, the XLA compile time, the
memory of the compiled step on one device (XLA's buffer assignment: arguments + outputs
- donated aliases + temporaries), GFLOPs per step over all devices, the FLOP rate, MFU
(that rate over the peak of the devices in the dtype, `bkd_jax.bench.mfu`) and, when
torch is installed, the speed against a PyTorch reference step of the same method timed
in the same rounds (`bkd_jax.bench.torch_reference`; wall and CPU time ratios, above 1
means bkd_jax is faster). The step runs jitted over a mesh of every device with the
batch split, as the trainer runs it; on a CPU-only host the bench first asks XLA for one
CPU device per core (`--cpu_devices`). CPU time is the
steadier measure on a shared CPU host; on an accelerator the wall time is the one that
counts. `--ablate` adds rows with one option flipped (`batch_stones`, `remat`, `dtype`,
`donate`, `devices`: one device instead of all, `cpu_conv`: XLA's own weight gradients
instead of the batch-chunked ones on CPU) to show what each buys. `--distill` sets a
method's knobs for its rows, `--distill=blockkd.distance=wkd_l` (a nested knob by dots,
`blockkd.wkd_l.cost_sharpen=2`); values separated by "|" give one row per value, the
product over a method's knobs (`--distill=blockkd.distance=kd|wkd_l|mlkd`). Variants are timed
interleaved, a few steps each per round, so that load from other processes hits them
alike. Batches are random: no data is read.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib.util
import itertools
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from bkd_jax import config_defaults, distillers, models, optim, steps
from bkd_jax.bench import mfu
from bkd_jax.models import cpu_conv
from bkd_jax.training import sharding
from bkd_jax.training.validation import DTYPES

ABLATIONS = ("batch_stones", "remat", "dtype", "donate", "devices", "cpu_conv")
STONE_OPTIONS = ("batch_stones", "remat")  # options that only change Block-KD methods
RATIOS = (("blockkd", "kd"), ("blockkd_lite", "kd"), ("blockkd_lite", "blockkd"))
MARGINS = (("kd", "ce"), ("blockkd", "kd"), ("blockkd_lite", "kd"), ("blockkd", "blockkd_lite"))
NUM_EXAMPLES = 50_000  # training-set size (CIFAR-100's) for CRD's memory bank


def known_methods() -> tuple[str, ...]:
    """The distillation methods the bench can time: every registered one."""
    return tuple(distillers.available())


def uses_stones(method: str) -> bool:
    """Whether `method` runs stepping-stones, the only ones stone options change."""
    return "stones" in distillers.get(method).consumes


_PAIR = flags.DEFINE_string("pair", "resnet32x4:resnet8x4", "teacher:student zoo names.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["64"], "Images per step; one table each.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the square input images.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classifier width.")
_METHODS = flags.DEFINE_list("methods", None, "Methods to time; default all.")
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
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch reference step when installed.")
_DISTILL = flags.DEFINE_multi_string(
    "distill", [], 'METHOD.KNOB=VALUE for that method\'s rows; "a|b" gives a row per value.'
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "XLA CPU devices on a CPU-only host: 0 = one per core, 1 = one."
)


Knobs = tuple[tuple[str, Any], ...]


def _knob_value(raw: str, default: Any) -> Any:
    """`raw` as a value of `default`'s kind: as given for a string knob, else a literal."""
    if isinstance(default, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None:
            return raw
        raise ValueError(f"{raw!r} is not a value of the kind of {default!r}") from None
    return tuple(value) if isinstance(value, list) else value


def _knob_default(method: str, path: str) -> Any:
    """The default of `method`'s knob at the dotted `path`; a ValueError naming the knobs."""
    value = config_defaults.distill_config(method)[method]
    names = path.split(".")
    for depth, name in enumerate(names):
        if not isinstance(value, ml_collections.ConfigDict):
            raise ValueError(f"--distill: {method}.{'.'.join(names[:depth])} has no knobs")
        if name not in value:
            known = ", ".join(value)
            raise ValueError(f"--distill: {method} has no knob {path!r}; knobs there: {known}")
        value = value[name]
    return value


def set_knobs(config: ml_collections.ConfigDict, knobs: Knobs) -> None:
    """Sets each (dotted path, value) of `knobs` in `config.distill`'s method section."""
    for path, value in knobs:
        *parents, name = path.split(".")
        section = config[config.method]
        for parent in parents:
            section = section[parent]
        section[name] = value


def distill_rows(values: Sequence[str], methods: Sequence[str]) -> dict[str, list[Knobs]]:
    """The knob settings of each method's rows from `--distill` values, checked.

    A method no value names has one row of its defaults, `[()]`.
    """
    alternatives: dict[str, dict[str, list[Any]]] = {m: {} for m in methods}
    for text in values:
        target, sep, raw = text.partition("=")
        method, dot, path = target.partition(".")
        if not (sep and dot and path):
            raise ValueError(f"--distill must be METHOD.KNOB=VALUE, got {text!r}")
        if method not in alternatives:
            raise ValueError(f"--distill names {method!r}, which --methods does not time")
        default = _knob_default(method, path)
        config = config_defaults.distill_config(method)
        try:
            options = [_knob_value(part, default) for part in raw.split("|")]
            for option in options:  # the config's own type check
                set_knobs(config, ((path, option),))
        except (TypeError, ValueError) as error:
            raise ValueError(f"--distill {text!r}: {error}".splitlines()[0]) from None
        alternatives[method][path] = options
    return {
        method: [tuple(zip(knobs, combo)) for combo in itertools.product(*knobs.values())]
        for method, knobs in alternatives.items()
    }


@dataclasses.dataclass(frozen=True)
class Variant:
    """One train step to compile and time: a method and the options it runs with."""

    method: str
    dtype: str = "float32"
    remat: bool = False
    batch_stones: bool = True
    donate: bool = True
    devices: int = 0  # devices of the data mesh; 0 = all
    cpu_conv: bool = True  # the zoo's chunked weight gradient on CPU (models.cpu_conv)
    torch: bool = False  # the PyTorch reference step (bkd_jax.bench.torch_reference) instead
    knobs: Knobs = ()  # the method's knobs set by --distill, as (dotted path, value)
    batch_size: int = 64  # its own table column, not part of the label

    def flipped(self, option: str) -> Variant:
        """This variant with `option` (one of `ABLATIONS`) switched to its other value."""
        if option == "dtype":
            other = "bfloat16" if self.dtype == "float32" else "float32"
            return dataclasses.replace(self, dtype=other)
        if option == "devices":
            return dataclasses.replace(self, devices=0 if self.devices == 1 else 1)
        return dataclasses.replace(self, **{option: not getattr(self, option)})

    def label(self, base: Variant) -> str:
        """The method, and how this variant differs from `base`: e.g. "blockkd +remat"."""
        diffs = []
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            if field.name == "batch_size" or value == getattr(base, field.name):
                continue
            if field.name == "devices":
                value = f"{value or 'all'} device{'s' if value != 1 else ''}"
            elif field.name == "torch":
                value = "torch" if value else "jax"
            elif field.name == "knobs":
                value = " ".join(f"{path}={knob}" for path, knob in value)
            elif isinstance(value, bool):
                value = ("+" if value else "-") + field.name
            diffs.append(value)
        return " ".join([self.method, *diffs])


@dataclasses.dataclass
class Result:
    """Static measurements of one compiled variant, and its timed steps in seconds."""

    variant: Variant
    compile_s: float | None
    memory_bytes: float | None
    flops: float | None
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    peak: float | None = None  # FLOP/s of the devices it ran on, in its dtype

    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu)

    @property
    def mfu(self) -> float | None:
        """Achieved FLOP/s over the peak."""
        if self.flops is None or not self.peak:
            return None
        return self.flops / self.wall_s / self.peak


def cost_flops(compiled) -> float | None:
    """FLOPs from XLA's cost analysis of a compiled or lowered step: a dict, or a list of
    dicts in older jax versions."""
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


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


class Bench:
    """Compiles and times train-step variants of one teacher/student pair on random data."""

    def __init__(self, pair: tuple[str, str], batch_size: int, image_size: int, classes: int):
        self.pair = pair
        self.classes = classes
        self.image_size = image_size
        self.batch = self.random_batch(batch_size)
        teacher = models.get_model(pair[0], classes)
        self.teacher_vars = jax.jit(teacher.init)(jax.random.key(3), self.batch["image"][:1])

    def random_batch(self, batch_size: int) -> dict[str, jax.Array]:
        image_key, label_key, strong_key = jax.random.split(jax.random.key(batch_size), 3)
        shape = (batch_size, self.image_size, self.image_size, 3)
        return {
            "image": jax.random.normal(image_key, shape, jnp.float32),
            "label": jax.random.randint(label_key, (batch_size,), 0, self.classes),
            "index": jnp.arange(batch_size, dtype=jnp.int32),  # examples' dataset indices
            "image_strong": jax.random.normal(strong_key, shape, jnp.float32),  # MLKD's view
        }

    def distiller(self, v: Variant) -> distillers.Distiller:
        dtype = DTYPES[v.dtype]
        teacher, student = (models.get_model(name, self.classes, dtype) for name in self.pair)
        config = config_defaults.distill_config(v.method)
        set_knobs(config, v.knobs)
        return distillers.make_distiller(
            config, student, teacher,
            self.batch["image"][:1].shape, dtype=dtype, batch_stones=v.batch_stones,
            remat_teacher=v.remat, num_examples=NUM_EXAMPLES,
        )  # fmt: skip

    def mesh(self, v: Variant) -> jax.sharding.Mesh:
        """`v.devices` devices, or as many of all as split the batch evenly."""
        devices = jax.devices()
        count = v.devices or math.gcd(len(devices), v.batch_size)
        mesh = sharding.make_mesh(devices[:count])
        sharding.check_batch_size(v.batch_size, mesh)
        return mesh

    def lower(self, v: Variant) -> tuple[jax.stages.Lowered, Any, Any, dict[str, jax.Array]]:
        """The train step of `v` lowered for its mesh, and its state, teacher and batch."""
        mesh = self.mesh(v)
        repl, split = sharding.replicated(mesh), sharding.batch_sharded(mesh)
        batch = jax.device_put(self.random_batch(v.batch_size), split)
        teacher_vars = jax.device_put(self.teacher_vars, repl)
        distiller = self.distiller(v)
        required = distillers.get(v.method).optimizer
        cfg = config_defaults.optim_config(0.05, (150, 180, 210), 5e-4, required or "sgd")
        optimizer = optim.make_optimizer(cfg, 782, required)
        init = functools.partial(steps.create_train_state, distiller, optimizer)
        state = jax.jit(init, out_shardings=repl)(jax.random.key(1), batch["image"])
        step = steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0))
        with contextlib.nullcontext() if v.cpu_conv else cpu_conv.xla_convolutions():
            lowered = jax.jit(
                step,
                in_shardings=(repl, repl, split),
                out_shardings=(repl, repl),
                donate_argnums=0 if v.donate else (),
            ).lower(state, teacher_vars, batch)
        return lowered, state, teacher_vars, batch

    def compile(self, v: Variant) -> tuple[Callable[[], Any], Result]:
        """A function running one step of `v` on its own state, and its static measures."""
        if v.torch:
            return self._torch_step(v), Result(v, None, None, None)
        lowered, state, teacher_vars, batch = self.lower(v)
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        mesh = self.mesh(v)
        peak, _ = mfu.peak_flops(mesh, v.dtype)
        flops = cost_flops(compiled)  # of one device's partitioned program
        total = None if flops is None else flops * mesh.devices.size
        result = Result(v, compile_s, memory_bytes(compiled), total, peak=peak)
        holder = [state]

        def run() -> Any:
            holder[0], metrics = compiled(holder[0], teacher_vars, batch)
            return jax.block_until_ready((holder[0], metrics))

        return run, result

    def _torch_step(self, v: Variant) -> Callable[[], Any]:
        import torch  # Only the torch rows need it.

        from bkd_jax.bench import torch_reference

        device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
        dtype = torch.bfloat16 if v.dtype == "bfloat16" else torch.float32
        return torch_reference.ReferenceStep(
            v.method, self.pair, v.batch_size, self.image_size, self.classes,
            device=device, dtype=dtype,
        )  # fmt: skip

    def run(self, variants: Sequence[Variant], steps_per_round: int, rounds: int) -> list[Result]:
        """Compiles every variant, then times them round-robin."""
        compiled = [self.compile(v) for v in variants]
        for step, _ in compiled:  # warm-up: the first call allocates and pages in
            step()
        for _ in range(rounds):
            for step, result in compiled:
                for _ in range(steps_per_round):
                    wall, cpu = time.perf_counter(), time.process_time()
                    step()
                    result.wall.append(time.perf_counter() - wall)
                    result.cpu.append(time.process_time() - cpu)
        return [result for _, result in compiled]


def variants(
    base: Variant,
    methods: Sequence[str],
    ablate: Sequence[str],
    torch_methods: Sequence[str] = (),
    knob_rows: Mapping[str, Sequence[Knobs]] | None = None,
) -> list[Variant]:
    """Each method with the base options (a row per knob setting of `knob_rows`, default
    its defaults), each with each ablated option flipped, then the PyTorch reference of
    each of `torch_methods` with the base options and default knobs."""
    rows = [
        dataclasses.replace(base, method=m, knobs=knobs)
        for m in methods
        for knobs in (knob_rows or {}).get(m, [()])
    ]
    out = list(rows)
    for option in ablate:
        for row in rows:
            if option not in STONE_OPTIONS or uses_stones(row.method):
                out.append(row.flipped(option))
    out += [dataclasses.replace(base, method=m, torch=True, devices=0) for m in torch_methods]
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def torch_speedup(r: Result, results: Sequence[Result]) -> tuple[float, float] | None:
    """Reference step time over this step's time (wall, CPU), same method, knobs, batch,
    dtype."""
    if r.variant.torch:
        return None

    def key(v: Variant) -> tuple:
        return v.method, v.knobs, v.batch_size, v.dtype

    for t in results:
        if t.variant.torch and key(t.variant) == key(r.variant):
            return t.wall_s / r.wall_s, t.cpu_s / r.cpu_s
    return None


def table(results: Sequence[Result], base: Variant) -> str:
    """A Markdown table with one row per variant."""
    rows = [
        "| variant | batch | images/s | step ms | CPU ms/step | compile s | memory MiB "
        "| GFLOPs/step | GFLOP/s | MFU % | x torch | x torch CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        memory = None if r.memory_bytes is None else r.memory_bytes / 2**20
        flops = None if r.flops is None else r.flops / 1e9
        rate = None if flops is None else flops / r.wall_s
        mfu_pct = None if r.mfu is None else 100 * r.mfu
        batch = r.variant.batch_size
        speedup = torch_speedup(r, results) or (None, None)
        rows.append(
            f"| {r.variant.label(base)} | {batch} | {batch / r.wall_s:.1f} "
            f"| {1e3 * r.wall_s:.0f} | {1e3 * r.cpu_s:.0f} | {_fmt(r.compile_s, '.1f')} "
            f"| {_fmt(memory, '.0f')} | {_fmt(flops, '.1f')} | {_fmt(rate, '.1f')} "
            f"| {_fmt(mfu_pct, '.1f')} | {_fmt(speedup[0], '.2f')} | {_fmt(speedup[1], '.2f')} |"
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
    """The host CPU, its load, the jax devices and the library versions, in one line."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    cpu = names[0] if names else platform.processor() or platform.machine()
    device = jax.devices()[0]
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    versions = f"jax {jax.__version__}"
    if torch_available():
        import torch

        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return (
        f"{cpu} ({os.cpu_count()} cores{load}), {jax.device_count()} x {device.platform} "
        f"({device.device_kind}), {versions}"
    )


def _batch_sizes(values: Sequence[str]) -> list[int]:
    try:
        sizes = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--batch_sizes must be integers, got {values}") from None
    if not sizes or min(sizes) < 1:
        raise app.UsageError(f"--batch_sizes must be positive, got {values}")
    return sizes


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CPU_DEVICES.value != 1:
        sharding.use_one_cpu_device_per_core(_CPU_DEVICES.value or None)
    methods = _METHODS.value or list(known_methods())
    unknown = set(methods) - set(known_methods())
    if unknown:
        raise app.UsageError(f"unknown methods {sorted(unknown)}; known: {known_methods()}")
    bad = set(_ABLATE.value) - set(ABLATIONS)
    if bad:
        raise app.UsageError(f"unknown --ablate options {sorted(bad)}; known: {ABLATIONS}")
    try:
        knob_rows = distill_rows(_DISTILL.value, methods)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    teacher, sep, student = _PAIR.value.partition(":")
    if not sep:
        raise app.UsageError(f"--pair must be teacher:student, got {_PAIR.value!r}")
    torch_methods = []
    if _TORCH.value and torch_available():
        from bkd_jax.bench import torch_reference

        if torch_reference.has_models((teacher, student)):
            torch_methods = [m for m in methods if m in torch_reference.METHODS]
    sizes = _batch_sizes(_BATCH_SIZES.value)
    bench = Bench((teacher, student), sizes[0], _IMAGE_SIZE.value, _NUM_CLASSES.value)
    print(f"{teacher} -> {student}, {_DTYPE.value}; {machine()}")
    for size in sizes:
        base = Variant(
            methods[0], _DTYPE.value, _REMAT.value, _BATCH_STONES.value, _DONATE.value,
            batch_size=size,
        )  # fmt: skip
        todo = variants(base, methods, _ABLATE.value, torch_methods, knob_rows)
        results = bench.run(todo, _STEPS.value, _ROUNDS.value)
        peak = next((r.peak for r in results if r.peak), None)
        print(f"\nbatch {size}; peak {_fmt(peak and peak / 1e9, '.0f')} GFLOP/s")
        print(table(results, base))
        for summary in (ratios(results, base), margins(results, base)):
            if summary:
                print(f"\n{summary}")
