"""Single convolutions on the CPU: XLA's kernels against PyTorch's, pass by pass.

    python benchmarks/conv_kernels.py                 # batch 64, the zoo's CIFAR shapes
    python benchmarks/conv_kernels.py --batch=32 --repeats=50

A CIFAR training step is almost all 3x3 convolutions, each run three ways: forward, input
gradient and weight gradient. This times each pass alone for the shapes of the CIFAR
ResNets' stages (resnet8/32: 16, 32, 64 channels at 32, 16, 8 pixels; the x4 variants:
64, 128, 256), XLA's compiled `lax.conv_general_dilated` and its VJPs on one CPU device
against PyTorch's `conv2d` and `convolution_backward` on channels-last tensors with one
thread per core, in three alternating rounds. It also times the weight gradient
summed over batch chunks (the best of 2, 4 and 8 chunks): XLA:CPU's weight gradient, which
contracts over batch and pixels, slows more than linearly with the batch, and the chunked
sum shows how much of that is the kernel's and not the arithmetic's. Beside them, the
weight gradient of the zoo's CPU path (`bkd_jax.models.cpu_conv`: tap by tap, for 1x1
and depthwise kernels), timed on every shape, with the 1x1 shortcuts of resnet8x4, and
MobileNetV2's and ShuffleNetV1's 1x1, grouped 1x1 and depthwise convolutions added to the
shapes. Needs torch.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bkd_jax.models import cpu_conv


class Shape(NamedTuple):
    """A convolution: input side and channels, output channels, kernel, stride, groups."""

    pixels: int
    channels: int
    out: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1

    def gflop(self, batch: int) -> float:
        side = self.pixels // self.stride
        return 2 * batch * side**2 * self.out * self.channels // self.groups * self.kernel**2 / 1e9


SHAPES = (
    Shape(32, 16, 16),  # the 3x3 stages of resnet8/32
    Shape(16, 32, 32),
    Shape(8, 64, 64),
    Shape(32, 64, 64),  # of resnet8x4/32x4
    Shape(16, 128, 128),
    Shape(8, 256, 256),
    Shape(32, 64, 128, 1, 2),  # resnet8x4's 1x1 shortcuts
    Shape(16, 128, 256, 1, 2),
    Shape(16, 24, 144, 1),  # MobileNetV2: a 1x1 expansion, depthwise 3x3s
    Shape(16, 144, 144, 3, 1, 144),
    Shape(16, 144, 144, 3, 2, 144),
    Shape(8, 240, 240, 1, 1, 3),  # ShuffleNetV1's grouped 1x1 (3 groups)
)
CHUNKS = (2, 4, 8)
_ROUNDS = 3  # Each pass is timed `repeats` times in a row per round, rounds alternating.
_DIMS = ("NHWC", "HWIO", "NHWC")


def _convolution(shape: Shape, conv=jax.lax.conv_general_dilated) -> Callable[..., jax.Array]:
    pad = shape.kernel // 2
    return functools.partial(
        conv, window_strides=(shape.stride,) * 2, padding=((pad, pad), (pad, pad)),
        dimension_numbers=_DIMS, feature_group_count=shape.groups,
    )  # fmt: skip


def _passes(conv: Callable[..., jax.Array]) -> dict[str, Callable[..., jax.Array]]:
    """Forward, input gradient and weight gradient of `conv`, as functions of (x, w, g)."""
    return {
        "fwd": lambda x, w, g: conv(x, w),
        "dx": lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
        "dw": lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
    }


def _chunked_weight_grad(conv: Callable[..., jax.Array], chunks: int) -> Callable[..., jax.Array]:
    weight_grad = _passes(conv)["dw"]

    def grad(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
        xs, gs = jnp.split(x, chunks), jnp.split(g, chunks)
        return sum(weight_grad(xc, w, gc) for xc, gc in zip(xs, gs))

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


def _torch_passes(
    shape: Shape, x: np.ndarray, w: np.ndarray, g: np.ndarray
) -> dict[str, Callable[[], float]]:
    channels_last = torch.channels_last
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)
    stride, pad = [shape.stride] * 2, [shape.kernel // 2] * 2

    def backward(mask: list[bool]) -> Callable[[], object]:
        return lambda: torch.ops.aten.convolution_backward(
            tg, tx, tw, None, stride, pad, [1, 1], False, [0, 0], shape.groups, mask
        )

    passes = {
        "fwd": lambda: torch.nn.functional.conv2d(tx, tw, None, stride, pad, 1, shape.groups),
        "dx": backward([True, False, False]),
        "dw": backward([False, True, False]),
    }
    for run in passes.values():
        run()
    return {name: _timer(run) for name, run in passes.items()}


def measure(batch: int, shape: Shape, repeats: int) -> dict[str, float]:
    """Median milliseconds of each pass, XLA, the CPU path and PyTorch timed in alternation."""
    rng = np.random.default_rng(0)
    side = shape.pixels // shape.stride
    x = rng.standard_normal((batch, shape.pixels, shape.pixels, shape.channels), np.float32)
    w = rng.standard_normal(
        (shape.kernel, shape.kernel, shape.channels // shape.groups, shape.out), np.float32
    )
    g = rng.standard_normal((batch, side, side, shape.out), np.float32)
    args = tuple(map(jnp.asarray, (x, w, g)))
    xla = _convolution(shape)
    timers = {f"xla {name}": _jax_pass(fn, *args) for name, fn in _passes(xla).items()}
    timers["cpu_conv dw"] = _jax_pass(
        _passes(_convolution(shape, cpu_conv.conv_general_dilated))["dw"], *args
    )
    for chunks in CHUNKS:
        if batch % chunks == 0:
            timers[f"xla dw/{chunks}"] = _jax_pass(_chunked_weight_grad(xla, chunks), *args)
    timers.update({f"torch {name}": t for name, t in _torch_passes(shape, x, w, g).items()})
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
        f"batch {args.batch}, float32; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} (1 device), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, channels-last); median of "
        f"{_ROUNDS} x {args.repeats} calls\n"
    )
    print(
        "| pixels | channels in, out | kernel / stride / groups | GFLOP | fwd ms XLA / torch | "
        "dx ms XLA / torch | dw ms XLA / torch | dw ms cpu_conv | dw ms XLA, chunked | "
        "torch / XLA: fwd, dx, dw |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        ms = measure(args.batch, shape, args.repeats)
        best = min((k for k in ms if k.startswith("xla dw/")), key=ms.get)
        passes = ("fwd", "dx", "dw")
        cells = [
            f"{shape.pixels}",
            f"{shape.channels}, {shape.out}",
            f"{shape.kernel}x{shape.kernel} / {shape.stride} / {shape.groups}",
            f"{shape.gflop(args.batch):.2f}",
        ]
        cells += [f"{ms['xla ' + p]:.2f} / {ms['torch ' + p]:.2f}" for p in passes]
        cells.append(f"{ms['cpu_conv dw']:.2f}")
        cells.append(f"{ms[best]:.2f} ({best.split('/')[1]} chunks)")
        cells.append(", ".join(f"{ms['torch ' + p] / ms['xla ' + p]:.2f}" for p in passes))
        print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
