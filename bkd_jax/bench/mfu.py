"""Model FLOP utilisation: achieved FLOP/s over what the devices can do in the dtype.

Accelerator peaks are the vendors' dense (no structured sparsity) matrix-unit rates per
device. A float32 step is measured against the rate JAX computes float32 convolutions
and matmuls at by default: TF32 tensor cores on NVIDIA GPUs since Ampere, one bfloat16
pass on TPUs (https://docs.jax.dev/en/latest/201/precision.html, "By default, JAX leans
toward speed"). CPUs have no such table: their peak is measured, as the best rate of a
large matmul on every device of the mesh at once.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bkd_jax.training import sharding

# (substring of jax's device_kind, {dtype: dense FLOP/s per device}, source). First match
# wins, so the PCIe H100 comes before the SXM one.
PEAKS: tuple[tuple[str, dict[str, float], str], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12},
     "NVIDIA H100 datasheet, PCIe: BF16 1,513 / TF32 756 TFLOPS with sparsity, half dense"),
    ("H100", {"bfloat16": 989e12, "float32": 495e12},
     "NVIDIA H100 datasheet, SXM: BF16 1,979 / TF32 989 TFLOPS with sparsity, half dense"),
    ("H200", {"bfloat16": 989e12, "float32": 495e12},
     "NVIDIA H200 datasheet, SXM: BF16 1,979 / TF32 989 TFLOPS with sparsity, half dense"),
    ("A100", {"bfloat16": 312e12, "float32": 156e12},
     "NVIDIA A100 datasheet: BF16 312 / TF32 156 TFLOPS dense"),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12},
     "Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip"),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12},
     "Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip"),
)  # fmt: skip
_MATMUL_SIDE = 1024
_MATMUL_REPEATS = 5


def table_peak(device_kind: str, dtype: str) -> float | None:
    """Dense FLOP/s of one device of `device_kind` in `dtype`, or None if not tabled."""
    for kind, peaks, _ in PEAKS:
        if kind.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


@functools.cache
def measured_peak(mesh: Mesh, dtype: str) -> float:
    """Best FLOP/s of one 1024^3 matmul per device of `mesh`, run on all of them at once."""
    n, devices = _MATMUL_SIDE, mesh.devices.size
    shape = (devices, n, n)
    a = jax.device_put(
        jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype),
        sharding.batch_sharded(mesh),
    )
    matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(_MATMUL_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * devices / best


def peak_flops(mesh: Mesh, dtype: str) -> tuple[float | None, str]:
    """Peak FLOP/s of all devices of `mesh` in `dtype`, and where the figure comes from."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        return measured_peak(mesh, dtype), f"measured {dtype} matmul"
    per_device = table_peak(device.device_kind, dtype)
    if per_device is None:
        return None, f"no peak tabled for {device.device_kind}"
    return per_device * mesh.devices.size, f"{device.device_kind} datasheet"
