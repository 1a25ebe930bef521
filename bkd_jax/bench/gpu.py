r"""The accelerator benchmark: one command, a few minutes on one GPU.

  python -m bkd_jax.bench.gpu [--out=gpu_bench.md] [--steps=2 --rounds=3] [--notorch]
  python -m bkd_jax.bench.gpu --smoke      # tiny models, batch 4, one step: any CPU

Times, on random data, the full train step (`bkd_jax.bench`) of

- resnet32x4 -> resnet8x4 (CIFAR, 100 classes): KD, DKD, Block-KD and Block-KD lite at
  batch 64 and 512, in float32 and bfloat16, rematerialisation off and (for the Block-KD
  methods in bfloat16 at batch 512, where stone activations are largest) on;
- imagenet_resnet34 -> imagenet_resnet18 (224 px, 1000 classes): KD and Block-KD at
  batch 256 in bfloat16, remat off and on for Block-KD;

with images/s, MFU (against the device's datasheet peak, `bkd_jax.bench.mfu`), the compiled
step's memory and the device's peak memory in use, and the PyTorch reference step of the
same method on the same device (`bkd_jax.bench.torch_reference`) when torch is installed. Needs jax,
flax, optax, ml_collections and numpy; no TensorFlow or TFDS. JAX is limited to a share
of the device memory so that the PyTorch reference fits beside it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import jax
from absl import app, flags

from bkd_jax import bench

_OUT = flags.DEFINE_string("out", None, "Also write the tables to this Markdown file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny models and batches, one step: a CPU check.")
FLAGS = flags.FLAGS  # --steps, --rounds and --torch are bkd_jax.bench's
_MEMORY_FRACTION = "0.6"  # of the device for JAX; the rest for the PyTorch reference


@dataclasses.dataclass(frozen=True)
class Case:
    """One pair at one batch size and dtype, and the methods timed on it."""

    pair: tuple[str, str]
    image_size: int
    classes: int
    batch_size: int
    dtype: str
    methods: tuple[str, ...]
    remat: bool  # also time the Block-KD methods with rematerialised teacher blocks


def cases(smoke: bool) -> list[Case]:
    """The benchmark's cases; with `smoke`, the same shape of work on tiny networks."""
    cifar_methods = ("kd", "dkd", "blockkd", "blockkd_lite")
    if smoke:
        return [
            Case(("resnet8", "resnet8"), 32, 10, 4, "bfloat16", ("kd", "blockkd"), False),
            Case(("imagenet_resnet18", "imagenet_resnet18"), 32, 10, 2, "float32", ("kd",), False),
        ]  # fmt: skip
    out = [
        Case(("resnet32x4", "resnet8x4"), 32, 100, batch, dtype, cifar_methods,
             remat=(batch, dtype) == (512, "bfloat16"))
        for dtype in ("float32", "bfloat16")
        for batch in (64, 512)
    ]  # fmt: skip
    imagenet = ("imagenet_resnet34", "imagenet_resnet18")
    return [*out, Case(imagenet, 224, 1000, 256, "bfloat16", ("kd", "blockkd"), True)]


def peak_memory() -> str:
    """The first device's peak bytes in use so far, where the backend reports it."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"


def run_case(case: Case, steps: int, rounds: int, torch: bool) -> str:
    """The Markdown section of one case: a header line and the bench's table."""
    b = bench.Bench(case.pair, case.batch_size, case.image_size, case.classes)
    base = bench.Variant(case.methods[0], case.dtype, batch_size=case.batch_size)
    ablate = ["remat"] if case.remat else []
    torch_methods = case.methods if torch and bench_torch_pair(case.pair) else ()
    results = b.run(bench.variants(base, case.methods, ablate, torch_methods), steps, rounds)
    title = (
        f"### {case.pair[0]} -> {case.pair[1]}, {case.image_size} px, batch "
        f"{case.batch_size}, {case.dtype}"
    )
    return f"{title}\n\n{bench.table(results, base)}\n\nDevice peak memory so far: {peak_memory()}"


def bench_torch_pair(pair: tuple[str, str]) -> bool:
    """Whether torch is installed and has a reference for both networks of `pair`."""
    if not bench.torch_available():
        return False
    from bkd_jax.bench import torch_reference

    return torch_reference.has_models(pair)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", _MEMORY_FRACTION)
    steps, rounds = (1, 1) if _SMOKE.value else (FLAGS.steps, FLAGS.rounds)
    sections = [f"## Train step on {jax.devices()[0].device_kind}\n\n{bench.machine()}"]
    print(sections[0], flush=True)
    for case in cases(_SMOKE.value):
        sections.append(run_case(case, steps, rounds, FLAGS.torch))
        print(f"\n{sections[-1]}", flush=True)
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    app.run(main)
