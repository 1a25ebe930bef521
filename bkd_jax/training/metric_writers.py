"""Training metrics to JSON lines and TensorBoard, written by process 0 only.

`workdir/metrics.jsonl` holds one ``{"step": step, **scalars}`` object per line, flushed at
once, so a crashed or preempted run keeps every line it logged and any tool can read it. A
resumed run first drops the lines of steps after the one it resumed from (they are about
to be replayed), then appends, so every step appears once. `workdir/tensorboard/` holds
the same scalars as TensorBoard events, written by tensorboardX (a dependency; where it is
missing, one warning replaces them). No TensorFlow is needed. With a Weights & Biases project (the
`wandb_project` argument or wandb's own WANDB_PROJECT variable) and `wandb` installed, the
scalars also go to a W&B run, one per workdir, continued when the workdir resumes. On
processes other than 0 every method does nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging
from etils import epath

from bkd_jax.training.run_files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _python_scalar(value: Any) -> int | float | bool:
    """A Python number from a Python, numpy or jax scalar (a jax array is fetched)."""
    return np.asarray(value).item()


class _Backend(Protocol):
    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...

    def close(self) -> None: ...


class _JsonLinesWriter:
    """Appends one JSON object per `write_scalars` call; texts are TensorBoard's only."""

    def __init__(self, path: epath.Path, resume_step: int | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and json.loads(line)["step"] <= resume_step
            ]
            atomic_write_text(path, "".join(kept))
        self._file = path.open("a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _python_scalar(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        del step, texts

    def close(self) -> None:
        self._file.close()


class _TensorBoardWriter:
    """TensorBoard events under `logdir` through tensorboardX (no TensorFlow), flushed
    after every write, as scalars and as text TensorBoard's dashboards read."""

    def __init__(self, logdir: epath.Path):
        import tensorboardX  # Imported here: only TensorBoard output needs it.

        self._writer = tensorboardX.SummaryWriter(os.fspath(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(_python_scalar(value)), int(step))
        self._writer.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for name, text in texts.items():
            self._writer.add_text(name, text, int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandbWriter:
    """Scalars to a Weights & Biases run named after the workdir.

    The run id is derived from the workdir's absolute path, so rerunning the command in the
    same workdir continues the same W&B run. W&B keeps steps increasing: the steps a
    resumed run repeats (those after its last checkpoint) are dropped there, not here.
    """

    def __init__(self, workdir: epath.Path, project: str):
        import wandb  # Optional: only when a project is configured.

        run_id = hashlib.sha256(os.fspath(workdir.resolve()).encode()).hexdigest()[:16]
        self._run = wandb.init(
            project=project, name=workdir.name, id=run_id, resume="allow", dir=os.fspath(workdir)
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._run.log({k: _python_scalar(v) for k, v in scalars.items()}, step=int(step))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        del step, texts

    def close(self) -> None:
        self._run.finish()


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and, optionally, TensorBoard.

    Args:
      workdir: the run's directory.
      tensorboard: also write TensorBoard events under `workdir/tensorboard`.
      wandb_project: also log to this Weights & Biases project when `wandb` is installed;
        None: the WANDB_PROJECT environment variable, if set.
      resume_step: the step a run resumes from (0 for a fresh one): lines of later steps
        are dropped from metrics.jsonl. None keeps every line.
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        resume_step: int | None = None,
    ):
        workdir = epath.Path(workdir)
        self._backends: list[_Backend] = []
        if jax.process_index() == 0:
            self._backends.append(_JsonLinesWriter(workdir / METRICS_FILE, resume_step))
            if tensorboard and importlib.util.find_spec("tensorboardX") is None:
                logging.warning("No TensorBoard events: tensorboardX is not installed.")
            elif tensorboard:
                self._backends.append(_TensorBoardWriter(workdir / TENSORBOARD_DIR))
            project = wandb_project or os.environ.get("WANDB_PROJECT")
            if project and importlib.util.find_spec("wandb") is None:
                logging.warning("W&B project %r set, but wandb is not installed.", project)
            elif project:
                self._backends.append(_WandbWriter(workdir, project))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes `{name: scalar}` at `step`; values may be Python, numpy or jax scalars."""
        for backend in self._backends:
            backend.write_scalars(step, scalars)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes `{name: markdown text}` at `step` to TensorBoard (e.g. the config)."""
        for backend in self._backends:
            backend.write_texts(step, texts)

    def close(self) -> None:
        for backend in self._backends:
            backend.close()
        self._backends = []

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
