"""Command-line entry: `python -m bkd_jax.main --config=configs/cifar100.py --workdir=DIR`.

Config files take big_vision-style arguments (`--config=configs/cifar100.py:student=
resnet8x4,method=dkd`) and `--config.field=value` overrides; the config is locked, so a
misspelt field is an error rather than a silently ignored flag. Rerunning the same command
with the same workdir resumes the run.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bkd_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with `:arguments`.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first (TPU pod slices, multi-node GPU).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _MULTIHOST.value:
        jax.distributed.initialize()
    logging.info(
        "Process %d of %d, %d local of %d devices (%s).",
        jax.process_index(), jax.process_count(), jax.local_device_count(),
        jax.device_count(), jax.devices()[0].platform,
    )  # fmt: skip
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
