"""Checkpoints, the workdir config guard, teacher weights and preemption: the one place that
knows orbax.

A training workdir looks like this::

    workdir/config.json         the resolved config of the first run (`check_or_write_config`)
    workdir/checkpoints/<step>/ the latest `max_to_keep` checkpoints, saved on a schedule
    workdir/best/<step>/        the single best checkpoint by a metric, kept regardless of age

Each checkpoint step holds two items: ``state``, the train-state pytree (jax arrays, sharded
or not, typed PRNG keys included: orbax stores their key data and re-wraps them), and
``extra``, a JSON dict for everything that is not an array (data position, epoch, best
metric so far). Restoring onto an abstract target puts every array on the target's
sharding, so a sharded state comes back sharded.

The student's variables inside a train state are ``state["params"]["student"]`` and
``state["batch_stats"]["student"]`` (a dict or any pytree whose keys or fields are named so);
`load_variables` reads them from a workdir's best (else latest) checkpoint, or reads a
standalone variables checkpoint written by `save_variables` (the weight converter's output).

Preemption: on one host, `PreemptionGuard` turns SIGTERM into a flag the loop polls. On
several hosts every host must stop at the same step, so it defers to JAX's preemption sync
point (the coordination service watches SIGTERM there) and orbax, configured here with its
preemption policy, saves at that same step.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Collection, Mapping
from types import FrameType
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

PyTree = Any

CONFIG_FILE = "config.json"
LATEST_DIR = "checkpoints"
BEST_DIR = "best"
STUDENT = "student"
STUDENT_COLLECTIONS = ("params", "batch_stats")
# Item names inside one checkpoint step (Checkpointer) or a standalone variables checkpoint.
_STATE, _EXTRA = "state", "extra"
_VARIABLES, _METADATA = "variables", "metadata"


def _save_args(state: PyTree, extra: Mapping[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(dict(extra))}
    )


def absolute(path: str | epath.PathLike) -> epath.Path:
    """`path` made absolute (orbax requires it); URIs such as gs://... are kept as they are."""
    path = epath.Path(path)
    return path if "://" in str(path) else epath.Path(os.path.abspath(path))


class Checkpointer:
    """Saves and restores a training run: the latest few checkpoints plus the best one.

    Every process calls every method (orbax coordinates the hosts). Saving is asynchronous:
    arrays are copied to host memory before `save` returns, so the caller may donate the
    state to the next step; call `wait_until_finished` before reading the files.

    Args:
      workdir: the run's directory (local path or any path etils.epath understands).
      save_interval_steps: `save` writes a latest checkpoint when `step` is a multiple.
      max_to_keep: how many latest checkpoints to keep.
      best_metric: the metric that picks the best checkpoint, or None to keep no best one.
      best_mode: "max" when higher `best_metric` is better, "min" when lower is.
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        *,
        save_interval_steps: int,
        max_to_keep: int = 3,
        best_metric: str | None = "eval/top1",
        best_mode: Literal["max", "min"] = "max",
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        workdir = absolute(workdir)
        policy = checkpoint_managers.AnySavePolicy(
            [
                checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]
        )
        self._latest = ocp.CheckpointManager(
            workdir / LATEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, save_decision_policy=policy
            ),
        )
        self._best_metric = best_metric
        self._best_sign = 1.0 if best_mode == "max" else -1.0
        self._best = None
        self._best_value = None
        if best_metric is not None:
            self._best = ocp.CheckpointManager(
                workdir / BEST_DIR,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda metrics: metrics[best_metric],
                    best_mode=best_mode,
                ),
            )
            best_step = self._best.best_step()
            if best_step is not None:
                self._best_value = float(self._best.metrics(best_step)[best_metric])

    @property
    def best_value(self) -> float | None:
        """The best `best_metric` value saved so far (also across restarts), or None."""
        return self._best_value

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self._latest, self._best) if m is not None]

    def latest_step(self) -> int | None:
        """The newest saved step, latest or best, or None in a fresh workdir."""
        steps = [m.latest_step() for m in self._managers()]
        return max((s for s in steps if s is not None), default=None)

    def _improves(self, metrics: Mapping[str, Any] | None) -> bool:
        if self._best is None or metrics is None or self._best_metric not in metrics:
            return False
        value = float(metrics[self._best_metric])
        return self._best_value is None or self._best_sign * (value - self._best_value) > 0

    def save(
        self,
        step: int,
        state: PyTree,
        extra: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` and `extra` at `step` when due; returns whether anything was saved.

        A latest checkpoint is written when `step` is on the schedule, at a multi-host
        preemption sync point, or when `force` is set, but never twice for one step. A best
        checkpoint is written, whatever the schedule, when `metrics[best_metric]` beats every
        earlier value.
        """
        saved = False
        newest = self._latest.latest_step()
        if (newest is None or step > newest) and (force or self._latest.should_save(step)):
            saved = self._latest.save(step, args=_save_args(state, extra), force=True)
        if self._improves(metrics):
            value = float(metrics[self._best_metric])
            self._best.save(
                step, args=_save_args(state, extra), metrics={self._best_metric: value}, force=True
            )
            self._best_value = value
            saved = True
        return saved

    def restore(self, target: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
        """Restores the newest checkpoint (latest or best) as `(state, extra)`.

        Args:
          target: the state's structure: abstract (jax.ShapeDtypeStruct leaves, from
            jax.eval_shape) or concrete arrays. Arrays are restored with the target's dtype
            and sharding.

        Returns:
          `(state, extra)`, or None when nothing was saved yet.
        """
        step = self.latest_step()
        if step is None:
            return None
        manager = next(m for m in self._managers() if m.latest_step() == step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract), _EXTRA: ocp.args.JsonRestore()}
            ),
        )
        logging.info("Restored step %d from %s.", step, manager.directory)
        return restored[_STATE], restored[_EXTRA]

    def wait_until_finished(self) -> None:
        """Blocks until every asynchronous save has been written."""
        for manager in self._managers():
            manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers."""
        for manager in self._managers():
            manager.close()


# ---------------------------------------------------------------------------------------
# Config guard.


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.path: leaf}; an empty dict is kept as a leaf."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _show(flat: Mapping[str, Any], key: str) -> str:
    return json.dumps(flat[key]) if key in flat else "<absent>"


def _ignored(path: str, ignore: Collection[str]) -> bool:
    return any(path == key or path.startswith(f"{key}.") for key in ignore)


def check_or_write_config(
    workdir: str | epath.PathLike,
    config: Mapping[str, Any],
    *,
    ignore: Collection[str] = (),
) -> None:
    """Refuses to resume a workdir with a different config; writes it on the first run.

    The config (e.g. `ConfigDict.to_dict()`) is compared as JSON, so tuples equal lists
    and values JSON cannot hold compare by their `str`. Process 0 writes the file; an
    existing file is never overwritten.

    Args:
      workdir: the run's directory.
      config: the resolved config, nested mappings of JSON-able values.
      ignore: dotted keys (and everything under them) that may change between runs of the
        same experiment, e.g. {"log_every_steps"}. They are still written on the first run.

    Raises:
      ValueError: when `workdir/config.json` exists and differs outside `ignore`; the
        message lists each differing key with its old and new value.
    """
    path = epath.Path(workdir) / CONFIG_FILE
    new = json.loads(json.dumps(config, default=str))
    if not path.exists():
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
        return
    old, new = _flatten(json.loads(path.read_text())), _flatten(new)
    diffs = [
        f"  {key}: {_show(old, key)} -> {_show(new, key)}"
        for key in sorted(old.keys() | new.keys())
        if not _ignored(key, ignore) and (key in old, old.get(key)) != (key in new, new.get(key))
    ]
    if diffs:
        raise ValueError(
            f"The config differs from the one this workdir was started with ({path}):\n"
            + "\n".join(diffs)
            + "\nUse a fresh --workdir for a new experiment."
        )


# ---------------------------------------------------------------------------------------
# Model variables: teacher weights.


def save_variables(
    directory: str | epath.PathLike, variables: PyTree, metadata: Mapping[str, Any]
) -> None:
    """Writes a standalone checkpoint of model variables and a JSON metadata dict.

    The layout is ``directory/variables`` (the pytree) and ``directory/metadata`` (JSON).
    Raises ValueError when `directory` already exists.
    """
    directory = absolute(directory)
    if directory.exists():
        raise ValueError(f"{directory} already exists; refusing to overwrite it.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            directory,
            args=ocp.args.Composite(
                **{
                    _VARIABLES: ocp.args.StandardSave(variables),
                    _METADATA: ocp.args.JsonSave(dict(metadata)),
                }
            ),
        )


def _numpy_args(tree_metadata: PyTree) -> ocp.args.PyTreeRestore:
    """Restores the leaves in `tree_metadata` as numpy arrays, with no target needed."""
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_metadata)
    return ocp.args.PyTreeRestore(
        item=tree_metadata, restore_args=restore_args, partial_restore=True
    )


def _load_standalone(directory: epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    handler = ocp.CompositeCheckpointHandler(
        **{_VARIABLES: ocp.PyTreeCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}
    )
    with ocp.Checkpointer(handler) as checkpointer:
        tree = checkpointer.metadata(directory).item_metadata[_VARIABLES].tree
        restored = checkpointer.restore(
            directory,
            args=ocp.args.Composite(
                **{_VARIABLES: _numpy_args(tree), _METADATA: ocp.args.JsonRestore()}
            ),
        )
    return restored[_VARIABLES], restored[_METADATA]


def _load_student(workdir: epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The student variables of a workdir's best checkpoint, else of its latest."""
    for kind in (BEST_DIR, LATEST_DIR):
        if not (workdir / kind).is_dir():
            continue
        manager = ocp.CheckpointManager(
            workdir / kind,
            item_handlers={
                _STATE: ocp.PyTreeCheckpointHandler(),
                _EXTRA: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                read_only=True, save_interval_steps=0, create=False
            ),
        )
        with manager:
            step = manager.latest_step()
            if step is None:
                continue
            tree = manager.item_metadata(step)[_STATE].tree
            student = {
                col: {STUDENT: tree[col][STUDENT]}
                for col in STUDENT_COLLECTIONS
                if STUDENT in tree.get(col, {})
            }
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    **{_STATE: _numpy_args(student), _EXTRA: ocp.args.JsonRestore()}
                ),
            )
        variables = {col: sub[STUDENT] for col, sub in restored[_STATE].items()}
        return variables, {"checkpoint": kind, "step": step, "extra": restored[_EXTRA]}
    raise ValueError(f"{workdir} holds no checkpoint.")


def load_variables(path: str | epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads model variables as numpy arrays, with their metadata.

    Args:
      path: a directory written by `save_variables`, or a training workdir written by
        `Checkpointer`; from a workdir, the student's variables of the best checkpoint
        (else the latest) are returned, with metadata ``{"checkpoint": "best" | "checkpoints",
        "step": int, "extra": dict}``.

    Returns:
      `(variables, metadata)`, variables as ``{collection: tree}``.

    Raises:
      ValueError: when `path` does not exist or holds no checkpoint.
    """
    path = absolute(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    if (path / _VARIABLES).is_dir():
        return _load_standalone(path)
    return _load_student(path)


# ---------------------------------------------------------------------------------------
# Preemption.


class PreemptionGuard:
    """Turns a preemption notice into a flag the training loop polls.

    Use it on the main thread, around the loop::

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step):
                    checkpointer.save(step, state, extra, force=True)
                    break

    On a single host it installs a SIGTERM handler that sets `requested`, and puts back the
    previous handler on exit. On several hosts it installs nothing: JAX's coordination
    service already watches SIGTERM, and `should_stop` returns True on every host at the
    same step (the preemption sync point), which requires calling it at every step.
    """

    def __init__(self):
        self._requested = False
        self._previous = None
        self._installed = False

    @property
    def requested(self) -> bool:
        """Whether this process got SIGTERM (single host)."""
        return self._requested

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; agreed across hosts on multi-host."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        logging.warning("Got signal %d: will save a checkpoint and stop.", signum)
        self._requested = True

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() == 1:
            # getsignal gives None for a handler installed outside Python; restore SIG_DFL.
            self._previous = signal.signal(signal.SIGTERM, self._handle) or signal.SIG_DFL
            self._installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
