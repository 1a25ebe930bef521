"""Command-line entry: `python -m bkd_jax.main --config=configs/cifar100.py --workdir=DIR`.

Config files take big_vision-style arguments (`--config=configs/cifar100.py:student=
resnet8x4,method=dkd`) and `--config.field=value` overrides; the config is locked, so a
misspelt field is an error rather than a silently ignored flag. Rerunning the same command
with the same workdir resumes the run; SIGTERM makes it save a checkpoint and exit.

The console shows bkd_jax's own INFO lines (the run, resuming, the final best and last
top-1), a progress line with images/s and ETA, and only warnings and errors of the
libraries (orbax alone logs dozens of INFO lines per checkpoint); `--verbosity=1` shows
everything.
"""

from __future__ import annotations

import logging as py_logging
import os
import pathlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bkd_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with `:arguments`.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Join a multi-process run first (TPU pod slices, multi-node GPU); see launch/.",
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    100,  # jax.distributed.initialize's default
    "With --multihost: a process that sends no heartbeat for this long counts as dead, and "
    "the others then exit with an error instead of waiting for it.",
)
flags.mark_flags_as_required(["config", "workdir"])

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent)


def initialize_distributed(heartbeat_timeout_seconds: int = 100) -> None:
    """`jax.distributed.initialize()`, which finds its peers on its own on TPU VMs, under
    SLURM (one task per node) and under Open MPI's mpirun.

    Elsewhere, every process sets JAX_COORDINATOR_ADDRESS (host:port of process 0, read by
    JAX itself), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 on the coordinator). When a
    process dies, the others fail at their next collective and exit within about
    `heartbeat_timeout_seconds`, once the coordination service has declared it dead.
    """
    kwargs = {"heartbeat_timeout_seconds": heartbeat_timeout_seconds}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


def _own_info_or_warning(record: py_logging.LogRecord) -> bool:
    """Keeps warnings and errors, and INFO records logged from bkd_jax's own modules."""
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() <= logging.INFO:
        logging.get_absl_handler().addFilter(_own_info_or_warning)
    if _MULTIHOST.value:
        initialize_distributed(_HEARTBEAT.value)
    logging.info(
        "Process %d of %d, %d local of %d devices (%s).",
        jax.process_index(), jax.process_count(), jax.local_device_count(),
        jax.device_count(), jax.devices()[0].platform,
    )  # fmt: skip
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
