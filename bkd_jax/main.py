"""Command-line entry: `python -m bkd_jax.main --config=configs/cifar100.py --workdir=DIR`.

Config files take big_vision-style arguments (`--config=configs/cifar100.py:student=
resnet8x4,method=dkd`) and `--config.field=value` overrides; the config is locked, so a
misspelt field is an error rather than a silently ignored flag. Rerunning the same command
with the same workdir resumes the run. SIGTERM or Ctrl-C makes it save a checkpoint and exit
with the shell's status for that signal, 128 + its number (130 for Ctrl-C, 143 for
SIGTERM), so that `main ... && next` does not go on to `next` with an unfinished run.

A bad config, name, data folder or checkpoint path is reported in one line before
TensorFlow and orbax are imported (seconds, not half a minute). The console shows bkd_jax's
own INFO lines (the run, resuming, the final best and last top-1), a progress line with
images/s and ETA, and only warnings and errors of the libraries; `--verbosity=1` shows
everything.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bkd_jax import console, distillers
from bkd_jax.training import sharding
from bkd_jax.training.validation import validate_config

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


def initialize_distributed(heartbeat_timeout_seconds: int = 100) -> None:
    """`jax.distributed.initialize()`, which finds its peers on its own on TPU VMs, under
    SLURM (one task per node) and under Open MPI's mpirun.

    Elsewhere, every process sets JAX_COORDINATOR_ADDRESS (host:port of process 0, read by
    JAX itself), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 on the coordinator). When a
    process dies, the others fail at their next collective and exit within about
    `heartbeat_timeout_seconds`, once the coordination service has declared it dead.
    """
    import jax

    kwargs = {"heartbeat_timeout_seconds": heartbeat_timeout_seconds}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.configure_logging()
    config = _CONFIG.value
    try:
        console.follow_dataset_name(config, sys.argv)
        validate_config(config)  # names and numbers: no TensorFlow yet
        console.check_data_present(config.dataset)
        needs_teacher = distillers.get(config.distill.method).needs_teacher
        console.check_checkpoints_present(config, needs_teacher)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not _MULTIHOST.value:
        # On a CPU-only host, one XLA device per core that the batches split over evenly:
        # each core then runs its own slice of the batch (BENCHMARKS.md measures the gain).
        cores = len(os.sched_getaffinity(0))
        sizes = (config.global_batch_size, config.eval_batch_size)
        devices = max(d for d in range(1, cores + 1) if all(b % d == 0 for b in sizes))
        sharding.use_one_cpu_device_per_core(devices)
    with console.quiet_native_logs():  # TensorFlow's INFO lines as it loads
        from bkd_jax.training import loop
    if _MULTIHOST.value:
        initialize_distributed(_HEARTBEAT.value)
    import jax

    logging.info(
        "Process %d of %d, %d local of %d devices (%s).",
        jax.process_index(), jax.process_count(), jax.local_device_count(),
        jax.device_count(), jax.devices()[0].platform,
    )  # fmt: skip
    try:
        summary = loop.train_and_evaluate(config, _WORKDIR.value)
    except ValueError as e:  # a mismatched checkpoint or workdir, a data set not prepared
        sys.exit(f"error: {e}")
    if "exit_status" in summary:
        print(
            f"Stopped at step {summary['steps']} of {summary['total_steps']}, exit status "
            f"{summary['exit_status']} (128 + the signal's number); rerun the same command "
            "to resume.",
            file=sys.stderr,
        )
        sys.exit(summary["exit_status"])


if __name__ == "__main__":
    app.run(main, flags_parser=console.parse_flags)
