"""The device mesh and the shardings of the training step.

One "data" axis spans every device of every host: the batch is split along it and the
train state and teacher are replicated. The same code path serves one CPU, eight fake CPU
devices in tests, a GPU box and a TPU pod slice. On a CPU-only host, one XLA CPU device
per core (`use_one_cpu_device_per_core`, before JAX starts) makes the same data axis
spread a step over the cores.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices`, by default all devices of all processes."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raises ValueError unless the global batch splits evenly over the devices."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(
            f"{what} {global_batch_size} does not divide by the {devices} devices of the "
            f"mesh; use a multiple of {devices}"
        )


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of a batch into globally sharded arrays."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# Modules whose presence means jax may find an accelerator: the CUDA/ROCm plugins live in
# the jax_plugins namespace (or as jax_cuda*_plugin), TPU support in libtpu.
_ACCELERATOR_MODULES = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_only_host() -> bool:
    """Whether jax will run on the CPU alone: JAX_PLATFORMS=cpu, or no accelerator support."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def use_one_cpu_device_per_core(cores: int | None = None) -> int | None:
    """Makes XLA create one CPU device per core, so that the batch splits over the cores.

    With one device per core, the data axis of the mesh gives each core its own slice of
    the batch, instead of relying on XLA:CPU to parallelise inside each of the many small
    kernels of a CIFAR network (BENCHMARKS.md measures both). Takes effect only before
    JAX first touches a device, and only on a CPU-only host where XLA_FLAGS does not
    already set the count.
    Returns the device count asked for, or None when nothing was changed.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG in flags or not cpu_only_host():
        return None
    cores = cores or len(os.sched_getaffinity(0))
    os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={cores}".strip()
    return cores
