"""Checkpoints and teacher weights: the one place that knows orbax.

A training workdir holds, besides its config (`config_guard`)::

    workdir/checkpoints/<step>/ the latest `max_to_keep` checkpoints, saved on a schedule
    workdir/best/<step>/        the single best checkpoint by a metric, kept regardless of age
    workdir/corrupt/            checkpoints found unreadable, moved aside (never deleted)

Each checkpoint step holds two items: ``state``, the train-state pytree (jax arrays, sharded
or not, typed PRNG keys included: orbax stores their key data and re-wraps them), and
``extra``, a JSON dict for everything that is not an array (data position, epoch, best
metric so far). Restoring onto an abstract target puts every array on the target's
sharding, so a sharded state comes back sharded.

Crash safety: orbax writes a step into a temporary directory and renames it when every
file is written, so a process killed mid-save leaves no step that looks complete (the
leftover is removed, and logged, at the next start). Before that rename, process 0 adds
``integrity.json`` (size and CRC-32 of every file), so a file truncated or damaged later is
named when the step is restored; `Checkpointer.restore` then logs it, moves the step to
``workdir/corrupt/`` and falls back to the previous step. On several processes, process 0
alone removes or moves a directory, and the others wait for it at a barrier before they
list the steps again; all of them agree on whether each step could be read, so all resume
from the same one.

The student's variables inside a train state are ``state["params"]["student"]`` and
``state["batch_stats"]["student"]`` (a dict or any pytree whose keys or fields are named so);
`load_variables` reads them from a workdir's best (else latest) checkpoint, or reads a
standalone variables checkpoint written by `save_variables` (the weight converter's output).
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from bkd_jax.training.run_files import atomic_write_text

PyTree = Any

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
CORRUPT_DIR = "corrupt"
INTEGRITY_FILE = "integrity.json"
STUDENT = "student"
STUDENT_COLLECTIONS = ("params", "batch_stats")
# Item names inside one checkpoint step (Checkpointer) or a standalone variables checkpoint.
_STATE, _EXTRA = "state", "extra"
_VARIABLES, _METADATA = "variables", "metadata"
_CHUNK = 1 << 20
_TMP_MARK = "orbax-checkpoint-tmp"  # in the name of a step directory orbax is writing
# Not recorded: the record itself, and orbax's step metadata, which it updates after saving.
_UNRECORDED = (INTEGRITY_FILE, "_CHECKPOINT_METADATA")


class _UnrequestedItems(py_logging.Filter):
    """Drops orbax's warning that a step holds an item not asked for: reading a teacher's
    or a student's variables from a best checkpoint leaves its "metrics" item unread on
    purpose."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return "was found in the checkpoint, but could not be restored" not in record.getMessage()


py_logging.getLogger("absl").addFilter(_UnrequestedItems())


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or changed since it was written."""


def _save_args(state: PyTree, extra: Mapping[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(dict(extra))}
    )


def _restore_args(abstract_state: PyTree) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_state), _EXTRA: ocp.args.JsonRestore()}
    )


def absolute(path: str | epath.PathLike) -> epath.Path:
    """`path` made absolute (orbax requires it); URIs such as gs://... are kept as they are."""
    path = epath.Path(path)
    return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def _crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(directory: epath.Path) -> list[epath.Path]:
    """Every recorded file under `directory` (epath has no recursive glob)."""
    files = []
    for path in directory.iterdir():
        if path.is_dir():
            files += _files(path)
        elif path.name not in _UNRECORDED:
            files.append(path)
    return sorted(files)


def write_integrity(directory: str | epath.PathLike) -> None:
    """Records the size and CRC-32 of the files under `directory` in its integrity.json."""
    directory = epath.Path(directory)
    record = {
        str(p.relative_to(directory)): [p.stat().length, _crc32(p)] for p in _files(directory)
    }
    atomic_write_text(directory / INTEGRITY_FILE, json.dumps(record, indent=0, sort_keys=True))


def verify_integrity(directory: str | epath.PathLike) -> None:
    """Checks every file recorded in `directory/integrity.json`; no record, no check.

    Raises:
      CorruptCheckpointError: naming the first file that is missing, has another size
        (truncated) or another checksum (changed) than when it was written.
    """
    directory = epath.Path(directory)
    record_path = directory / INTEGRITY_FILE
    if not record_path.exists():
        return
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        raise CorruptCheckpointError(f"{record_path}: not valid JSON") from None
    for name, (size, crc) in sorted(record.items()):
        path = directory / name
        if not path.exists():
            raise CorruptCheckpointError(f"{path}: missing")
        if (actual := path.stat().length) != size:
            raise CorruptCheckpointError(f"{path}: {actual} bytes, {size} when written")
        if _crc32(path) != crc:
            raise CorruptCheckpointError(f"{path}: contents changed since written (CRC-32)")


def _sealer(directory: epath.Path, saving: dict[str, int]) -> Callable[[], None]:
    """A post-finalization callback writing integrity.json into the step being saved.

    Orbax calls it with every file written, before it renames the temporary directory, so
    the record is part of the step from the moment the step exists.
    """

    def seal() -> None:
        if jax.process_index() != 0:
            return
        step = saving["step"]
        pending = list(directory.glob(f"{step}.{_TMP_MARK}*"))
        target = pending[0] if len(pending) == 1 else directory / str(step)
        try:
            write_integrity(target)
        except OSError as e:  # The checkpoint itself is fine; it is only not verifiable.
            logging.warning("Could not write %s in %s: %s", INTEGRITY_FILE, target, e)

    return seal


def _remove_partial_steps(directory: epath.Path) -> None:
    """Deletes the temporary directories of saves that never finished (process 0)."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for path in directory.iterdir():
        if _TMP_MARK in path.name and path.is_dir():
            logging.warning("Removing %s: its save was interrupted.", path)
            path.rmtree()


def _manager(
    directory: epath.Path, saving: dict[str, int], **options: Any
) -> ocp.CheckpointManager:
    # Done here, synchronously, rather than by orbax's cleanup_tmp_directories in a
    # background thread that would still run when the first save starts; and before any
    # process lists the steps, which the manager does as it starts.
    _remove_partial_steps(directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"bkd_jax partial steps removed {directory}")
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            async_options=ocp.AsyncOptions(post_finalization_callback=_sealer(directory, saving)),
            # Its own barrier names: on several processes the latest and the best manager
            # may save the same step at once, and same-named barriers would collide.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=f"bkd_jax_{directory.name}"
            ),
            **options,
        ),
    )


def saved_steps(directory: str | epath.PathLike) -> list[int]:
    """The complete steps in a checkpoint directory (e.g. workdir/checkpoints), ascending."""
    return sorted(ocp.path.step.checkpoint_steps(directory))


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process: a collective, which every process must call."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _read_step(
    manager: ocp.CheckpointManager, step: int, abstract: PyTree
) -> tuple[Any, str | None]:
    """`(restored, None)`, or `(None, why)` when any process cannot read `step`.

    Every process verifies the step's files, and they agree on the outcome, before any
    starts orbax's restore (whose collectives would wait forever for a process that
    skipped it); then they agree on the restore's outcome.
    """
    why = None
    try:
        verify_integrity(manager.directory / str(step))
    except Exception as e:  # Any unreadable step falls back.
        why = _one_line(e)
    if not _everywhere(why is None):
        return None, why or "another process found a file damaged (see its log)"
    try:
        restored = manager.restore(step, args=_restore_args(abstract))
    except Exception as e:  # Any unreadable step falls back.
        restored, why = None, _one_line(e)
    if not _everywhere(why is None):
        return None, why or "another process could not restore it (see its log)"
    return restored, None


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
        self._workdir = absolute(workdir)
        # The step of each manager's save in flight, for its `_sealer`.
        self._saving = {LATEST_DIR: {"step": -1}, BEST_DIR: {"step": -1}}
        self._latest = _manager(
            self._workdir / LATEST_DIR,
            self._saving[LATEST_DIR],
            max_to_keep=max_to_keep,
            save_decision_policy=checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
        )
        self._best_metric = best_metric
        self._best_sign = 1.0 if best_mode == "max" else -1.0
        self._best = None
        if best_metric is not None:
            self._best = _manager(
                self._workdir / BEST_DIR,
                self._saving[BEST_DIR],
                max_to_keep=1,
                best_fn=lambda metrics: metrics[best_metric],
                best_mode=best_mode,
            )
        self._best_value = self._saved_best_value()

    def _saved_best_value(self) -> float | None:
        step = None if self._best is None else self._best.best_step()
        return None if step is None else float(self._best.metrics(step)[self._best_metric])

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

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` writes a latest checkpoint without `force`."""
        newest = self._latest.latest_step()
        return (newest is None or step > newest) and self._latest.should_save(step)

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

        A latest checkpoint is written when `step` is on the schedule or when `force` is
        set, but never twice for one step. A best checkpoint is written, whatever the
        schedule, when `metrics[best_metric]` beats every earlier value.
        """
        saved = False
        newest = self._latest.latest_step()
        if (newest is None or step > newest) and (force or self._latest.should_save(step)):
            self._latest.wait_until_finished()  # one save in flight, whose step `_sealer` reads
            self._saving[LATEST_DIR]["step"] = step
            saved = self._latest.save(step, args=_save_args(state, extra), force=True)
        if self._improves(metrics):
            value = float(metrics[self._best_metric])
            self._best.wait_until_finished()
            self._saving[BEST_DIR]["step"] = step
            self._best.save(
                step, args=_save_args(state, extra), metrics={self._best_metric: value}, force=True
            )
            self._best_value = value
            saved = True
        return saved

    def restore(self, target: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
        """Restores the newest usable checkpoint (latest or best) as `(state, extra)`.

        A step that cannot be read (a file missing, truncated or changed, or orbax failing on
        it) is logged as an error naming the file, moved to ``workdir/corrupt/``, and the
        next older step is tried. On several processes they agree on each step: one that
        any process cannot read is set aside by all, so all resume from the same step.

        Args:
          target: the state's structure: abstract (jax.ShapeDtypeStruct leaves, from
            jax.eval_shape) or concrete arrays. Arrays are restored with the target's dtype
            and sharding.

        Returns:
          `(state, extra)`, or None when nothing was saved yet.

        Raises:
          ValueError: when checkpoints exist but none of them can be read.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        # Listed by every process before any step is set aside: that happens only once all
        # have agreed on the first step (in `_read_step`).
        candidates = sorted(
            ((step, rank) for rank, m in enumerate(self._managers()) for step in m.all_steps()),
            key=lambda c: (-c[0], c[1]),
        )
        failed = []
        for step, rank in candidates:
            manager = self._managers()[rank]
            restored, why = _read_step(manager, step, abstract)
            if why is None:
                logging.info("Restored step %d from %s.", step, manager.directory)
                return restored[_STATE], restored[_EXTRA]
            logging.error(
                "Checkpoint step %d in %s is unusable, falling back to the previous one: %s",
                step, manager.directory, why,
            )  # fmt: skip
            failed.append(step)
            self._set_aside(manager, step)
        if failed:
            raise ValueError(
                f"None of the checkpoints in {self._workdir} can be read (steps {failed}, now "
                f"in {self._workdir / CORRUPT_DIR}); use a fresh --workdir to start over."
            )
        return None

    def _set_aside(self, manager: ocp.CheckpointManager, step: int) -> None:
        """Moves an unusable step out of `manager`'s directory, so later saves may reuse it."""
        source = manager.directory / str(step)
        if jax.process_index() == 0 and source.exists():
            aside = self._workdir / CORRUPT_DIR
            aside.mkdir(parents=True, exist_ok=True)
            name, n = f"{manager.directory.name}_{step}", 1
            while (aside / name).exists():
                name, n = f"{manager.directory.name}_{step}.{n}", n + 1
            source.rename(aside / name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"bkd_jax set aside {manager.directory} {step}")
        manager.reload()
        self._best_value = self._saved_best_value()

    def wait_until_finished(self) -> None:
        """Blocks until every asynchronous save has been written."""
        for manager in self._managers():
            manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers."""
        for manager in self._managers():
            manager.close()


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


def read_student(step_dir: str | epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The student variables and the extra dict of one step, e.g. workdir/checkpoints/100.

    Raises:
      CorruptCheckpointError: when a recorded file is missing, truncated or changed.
    """
    step_dir = absolute(step_dir)
    verify_integrity(step_dir)
    handler = ocp.CompositeCheckpointHandler(
        **{_STATE: ocp.PyTreeCheckpointHandler(), _EXTRA: ocp.JsonCheckpointHandler()}
    )
    with ocp.Checkpointer(handler) as checkpointer:
        tree = checkpointer.metadata(step_dir).item_metadata[_STATE].tree
        student = {
            col: {STUDENT: tree[col][STUDENT]}
            for col in STUDENT_COLLECTIONS
            if STUDENT in tree.get(col, {})
        }
        restored = checkpointer.restore(
            step_dir,
            args=ocp.args.Composite(
                **{_STATE: _numpy_args(student), _EXTRA: ocp.args.JsonRestore()}
            ),
        )
    variables = {col: sub[STUDENT] for col, sub in restored[_STATE].items()}
    return variables, restored[_EXTRA]


def _load_student(workdir: epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The student variables of a workdir's best checkpoint, else of its latest.

    Reads the step directories directly (no CheckpointManager), so nothing in the workdir
    is created or cleaned up: it may belong to a run still going, or be read-only.
    """
    for kind in (BEST_DIR, LATEST_DIR):
        for step in reversed(saved_steps(workdir / kind)):
            step_dir = workdir / kind / str(step)
            try:
                variables, extra = read_student(step_dir)
            except Exception as e:  # Any unreadable step falls back.
                logging.error("Skipping checkpoint %s: %s", step_dir, _one_line(e))
                continue
            return variables, {
                "checkpoint": kind,
                "step": step,
                "directory": str(step_dir),
                "extra": extra,
            }
    raise ValueError(f"{workdir} holds no checkpoint.")


def load_variables(path: str | epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads model variables as numpy arrays, with their metadata.

    Args:
      path: a directory written by `save_variables`, or a training workdir written by
        `Checkpointer`; from a workdir, the student's variables of the best checkpoint
        (else the latest; an unreadable step is logged and skipped) are returned, with
        metadata ``{"checkpoint": "best" | "checkpoints", "step": int, "directory": str,
        "extra": dict}``.

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
