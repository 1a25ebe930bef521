"""Single convolutions on the CPU: XLA's kernels against PyTorch's, pass by pass.

    python benchmarks/conv_kernels.py                 # batch 64, the CIFAR ResNets' 3x3 shapes
    python benchmarks/conv_kernels.py --batch=32 --repeats=50

A CIFAR training step is almost all 3x3 convolutions, each run three ways: forward, input
gradient and weight gradient. This times each pass alone for the shapes of the CIFAR
ResNets' stages (resnet8/32: 16, 32, 64 channels at 32, 16, 8 pixels; the x4 variants:
64, 128, 256), XLA's compiled `lax.conv_general_dilated` and its VJPs on one CPU device
against PyTorch's `conv2d` and `convolution_backward` on channels-last tensors with one
thread per core, in three alternating rounds. It also times the weight gradient
summed over batch chunks (the best of 2, 4 and 8 chunks): XLA:CPU's weight gradient, which
contracts over batch and pixels, slows more than linearly with the batch, and the chunked
sum shows how much of that is the kernel's and not the arithmetic's. Needs torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = (  # (pixels, channels): the stages of resnet8/32, then of resnet8x4/32x4
    (32, 16),
    (16, 32),
    (8, 64),
    (32, 64),
    (16, 128),
    (8, 256),
)
CHUNKS = (2, 4, 8)
_ROUNDS = 3  # Each pass is timed `repeats` times in a row per round, rounds alternating.
_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS)


def _input_grad(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
    return jax.vjp(lambda x: _conv(x, w), x)[1](g)[0]


def _weight_grad(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
    return jax.vjp(lambda w: _conv(x, w), w)[1](g)[0]


def _chunked_weight_grad(chunks: int) -> Callable[..., jax.Array]:
    def grad(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
        xs, gs = jnp.split(x, chunks), jnp.split(g, chunks)
        return sum(_weight_grad(xc, w, gc) for xc, gc in zip(xs, gs))

    return grad


def _timer(run: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    return timed


def _jax_pass(fn: Callable[..., jax.Array], *args: jax.Array) -> Callable[[], float]:
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return _timer(lambda: jax.block_until_ready(compiled(*args)))


def _torch_passes(x: np.ndarray, w: np.ndarray, g: np.ndarray) -> dict[str, Callable[[], float]]:
    channels_last = torch.channels_last
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)

    def backward(mask: list[bool]) -> Callable[[], object]:
        return lambda: torch.ops.aten.convolution_backward(
            tg, tx, tw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        )

    passes = {
        "fwd": lambda: torch.nn.functional.conv2d(tx, tw, padding=1),
        "dx": backward([True, False, False]),
        "dw": backward([False, True, False]),
    }
    for run in passes.values():
        run()
    return {name: _timer(run) for name, run in passes.items()}


def measure(batch: int, pixels: int, channels: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each pass, XLA and PyTorch timed in alternation."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, pixels, pixels, channels), dtype=np.float32)
    w = rng.standard_normal((3, 3, channels, channels), dtype=np.float32)
    g = rng.standard_normal((batch, pixels, pixels, channels), dtype=np.float32)
    jx, jw, jg = map(jnp.asarray, (x, w, g))
    timers = {
        "xla fwd": _jax_pass(_conv, jx, jw),
        "xla dx": _jax_pass(_input_grad, jx, jw, jg),
        "xla dw": _jax_pass(_weight_grad, jx, jw, jg),
    }
    for chunks in CHUNKS:
        if batch % chunks == 0:
            timers[f"xla dw/{chunks}"] = _jax_pass(_chunked_weight_grad(chunks), jx, jw, jg)
    timers.update({f"torch {name}": t for name, t in _torch_passes(x, w, g).items()})
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(_ROUNDS):
        for name, timed in timers.items():
            # The first call after the other library's is dropped: PyTorch's OpenMP threads
            # spin for a while after each operator and would slow XLA's next one.
            samples[name].extend([timed() for _ in range(repeats + 1)][1:])
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"batch {args.batch}, 3x3 stride 1, float32; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} (1 device), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, channels-last); median of "
        f"{_ROUNDS} x {args.repeats} calls\n"
    )
    print(
        "| pixels | channels | GFLOP | fwd ms XLA / torch | dx ms XLA / torch | "
        "dw ms XLA / torch | dw ms XLA, chunked | torch / XLA: fwd, dx, dw |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for pixels, channels in SHAPES:
        ms = measure(args.batch, pixels, channels, args.repeats)
        gflop = 2 * args.batch * pixels**2 * channels**2 * 9 / 1e9
        best = min((k for k in ms if k.startswith("xla dw/")), key=ms.get)
        passes = ("fwd", "dx", "dw")
        cells = [f"{pixels}", f"{channels}", f"{gflop:.2f}"]
        cells += [f"{ms['xla ' + p]:.2f} / {ms['torch ' + p]:.2f}" for p in passes]
        cells.append(f"{ms[best]:.2f} ({best.split('/')[1]} chunks)")
        cells.append(", ".join(f"{ms['torch ' + p] / ms['xla ' + p]:.2f}" for p in passes))
        print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
