"""A `jax.profiler` trace of a few training steps, for TensorBoard's profile plugin or Perfetto.

`config.profile_steps = N` traces the N steps after the first two of a run (the first
compiles, the second may still page in), into `workdir/profile/`. On several processes
each traces into its own `workdir/profile/process_<index>/`: the trace file is named after
the host and the second it was written, so two processes on one machine would otherwise
write the same file.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import logging
from etils import epath

PROFILE_DIR = "profile"


class StepProfiler:
    """Starts a trace before step `first` and stops it after step `first + num_steps - 1`."""

    def __init__(self, workdir: epath.Path, start_step: int, num_steps: int):
        self.directory = workdir / PROFILE_DIR
        if jax.process_count() > 1:
            self.directory /= f"process_{jax.process_index()}"
        self.first = start_step + 3 if num_steps > 0 else None
        self.last = None if self.first is None else self.first + num_steps - 1

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))

    def after(self, step: int, state: Any) -> None:
        if step == self.last:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            logging.info("Traced steps %d to %d into %s.", self.first, self.last, self.directory)
