"""Double buffering: the next global batch is on its devices before the step that needs it.

JAX dispatches a step asynchronously, so the host is free while the devices compute. If
the loop only then assembles the next batch and copies it over, the devices wait for the
copy at the start of every step. `prefetch_to_mesh` keeps `depth` batches in flight: when
the loop takes batch k, batch k + 1 has already been read from the host iterator and its
transfer started, so it overlaps step k. The batches and their order are unchanged, so a
run with it computes exactly what a run without it does.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from bkd_jax.training import sharding


def prefetch_to_mesh(
    batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, depth: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Global batches sharded over `mesh`, `depth` of them transferred ahead of use.

    Args:
      batches: this host's batches (numpy), as `bkd_jax.data.pipeline` yields them.
      mesh: the mesh whose data axis splits the batch (`sharding.make_mesh`).
      depth: batches on the devices at once, the one being used included; 2 is double
        buffering, 1 no look-ahead.

    Yields:
      `sharding.global_batch(local, mesh)` of each host batch, in order.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    queue: collections.deque[dict[str, jax.Array]] = collections.deque()
    for local in batches:
        queue.append(sharding.global_batch(local, mesh))
        if len(queue) == depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
