"""The device mesh and the shardings of the training step.

One "data" axis spans every device of every host: the batch is split along it and the
train state and teacher are replicated. The same code path serves one CPU, eight fake CPU
devices in tests, a GPU box and a TPU pod slice.
"""

from __future__ import annotations

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
