"""Checkpoints and teacher weights: the one place that knows orbax.

A training workdir holds, besides its config (`config_guard`)::

    workdir/checkpoints/<step>/ the latest `max_to_keep` checkpoints, saved on a schedule,
                                and the best one by a metric, kept regardless of age
    workdir/corrupt/            checkpoints found unreadable, moved aside (never deleted)

One orbax CheckpointManager keeps them: its preservation policy keeps a step when it is
among the latest `max_to_keep` (LatestN) or is the best by the metric (BestN). Each step
holds two items: ``state``, the train-state pytree (jax arrays, sharded or not, typed PRNG
keys included: orbax stores their key data and re-wraps them), and ``extra``, a JSON dict
for everything that is not an array (data position, epoch, best metric so far); orbax adds
``metrics`` for the ranking. Restoring onto an abstract target puts every array on the
target's sharding, so a sharded state comes back sharded.

Crash safety: orbax writes a step into a temporary directory and renames it when every
file is written, so a process killed mid-save leaves no step that looks complete; orbax
removes such leftovers when the next run opens the directory (`cleanup_tmp_directories`)
and waits for that before its first save. Orbax checks no file's contents on restore, so
when it finalizes an item (with every file written, before the rename) process 0 adds
``integrity.json`` (size and CRC-32 of every file) to it: a file truncated or damaged
later is named when the step is restored; `Checkpointer.restore` then logs it, moves the
step to ``workdir/corrupt/`` (orbax can only delete steps) and falls back to the previous
one. On several processes, process 0 alone moves a directory, and the others wait for it
at a barrier before they list the steps again; all of them agree on whether each step
could be read, so all resume from the same one.

The student's variables inside a train state are ``state["params"]["student"]`` and
``state["batch_stats"]["student"]`` (a dict or any pytree whose keys or fields are named so);
`load_variables` reads them from a workdir's best (else latest) checkpoint, or reads a
standalone variables checkpoint written by `save_variables` (the weight converter's output).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint.checkpoint_manager import METRIC_ITEM_NAME

from bkd_jax.training.run_files import atomic_write_text

PyTree = Any

LATEST_DIR = "checkpoints"  # the step directories, latest and best alike
# Where workdirs of the earlier two-manager layout keep their best step; still read.
LEGACY_BEST_DIR = "best"
CORRUPT_DIR = "corrupt"
INTEGRITY_FILE = "integrity.json"
BEST, LATEST = "best", "latest"  # which kind of step `load_variables` read
STUDENT = "student"
STUDENT_COLLECTIONS = ("params", "batch_stats")
# Item names inside one checkpoint step (Checkpointer) or a standalone variables checkpoint.
_STATE, _EXTRA = "state", "extra"
_VARIABLES, _METADATA = "variables", "metadata"
# The ranking value in a step's orbax metrics: the best metric, negated when lower is
# better, so that higher always wins and a reader needs neither the metric nor the mode.
_SCORE = "best_score"
_CHUNK = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or changed since it was written."""


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
    """Every file under `directory` but the record itself (epath has no recursive glob)."""
    files = []
    for path in directory.iterdir():
        if path.is_dir():
            files += _files(path)
        elif path.name != INTEGRITY_FILE:
            files.append(path)
    return sorted(files)


def write_integrity(directory: str | epath.PathLike) -> None:
    """Records the size and CRC-32 of the files under `directory` in its integrity.json."""
    directory = epath.Path(directory)
    record = {
        str(p.relative_to(directory)): [p.stat().length, _crc32(p)] for p in _files(directory)
    }
    atomic_write_text(directory / INTEGRITY_FILE, json.dumps(record, indent=0, sort_keys=True))


def _verify_record(record_path: epath.Path) -> None:
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        raise CorruptCheckpointError(f"{record_path}: not valid JSON") from None
    for name, (size, crc) in sorted(record.items()):
        path = record_path.parent / name
        if not path.exists():
            raise CorruptCheckpointError(f"{path}: missing")
        if (actual := path.stat().length) != size:
            raise CorruptCheckpointError(f"{path}: {actual} bytes, {size} when written")
        if _crc32(path) != crc:
            raise CorruptCheckpointError(f"{path}: contents changed since written (CRC-32)")


def verify_integrity(step_dir: str | epath.PathLike) -> None:
    """Checks every file recorded in the integrity.json of each item of a step.

    An item without a record (saved by an older version, or its record failed to write)
    is not checked.

    Raises:
      CorruptCheckpointError: naming the first file that is missing, has another size
        (truncated) or another checksum (changed) than when it was written.
    """
    step_dir = epath.Path(step_dir)
    # One record for the whole step: how steps of the two-directory layout were sealed.
    legacy = [step_dir / INTEGRITY_FILE] if (step_dir / INTEGRITY_FILE).exists() else []
    for record_path in legacy + sorted(step_dir.glob(f"*/{INTEGRITY_FILE}")):
        _verify_record(record_path)


class _Sealing:
    """Adds integrity.json to an item when orbax finalizes it.

    Orbax calls `finalize` once every process has written its files and before it renames
    the item's temporary directory, so the record is part of the item from the moment the
    step exists.
    """

    def finalize(self, directory: epath.Path) -> None:
        super().finalize(directory)
        if jax.process_index() != 0:
            return
        try:
            write_integrity(directory)
        except OSError as e:  # The checkpoint itself is fine; it is only not verifiable.
            logging.warning("Could not write %s in %s: %s", INTEGRITY_FILE, directory, e)


class _SealedStandardHandler(_Sealing, ocp.StandardCheckpointHandler):
    """The `state` item: a StandardCheckpointHandler that records its files."""


class _SealedJsonHandler(_Sealing, ocp.JsonCheckpointHandler):
    """The `extra` item: a JsonCheckpointHandler that records its file."""


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The sealing handlers of a step's items, for saving and restoring."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state, extra = _SealedStandardHandler(), _SealedJsonHandler()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add(_STATE, args, state)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add(_EXTRA, args, extra)
    return registry


def _save_args(state: PyTree, extra: Mapping[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(dict(extra))}
    )


def _restore_args(abstract_state: PyTree) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_state), _EXTRA: ocp.args.JsonRestore()}
    )


def _score(metrics: Mapping[str, Any] | None) -> float:
    """A step's rank for BestN and `best_step`; a step saved without a new best is last."""
    return float((metrics or {}).get(_SCORE, -math.inf))


def _preservation_policy(
    max_to_keep: int, track_best: bool
) -> checkpoint_managers.PreservationPolicy:
    """Keeps the latest `max_to_keep` steps, and the best one when `track_best`."""
    latest = checkpoint_managers.LatestN(n=max_to_keep)
    if not track_best:
        return latest
    best = checkpoint_managers.BestN(get_metric_fn=_score, n=1)
    return checkpoint_managers.AnyPreservationPolicy([latest, best])


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
      save_interval_steps: `save` writes a checkpoint when `step` is a multiple.
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
        self._best_metric = best_metric
        self._best_sign = 1.0 if best_mode == "max" else -1.0
        track_best = best_metric is not None
        self._manager = ocp.CheckpointManager(
            self._workdir / LATEST_DIR,
            handler_registry=_handler_registry(),
            options=ocp.CheckpointManagerOptions(
                save_decision_policy=checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                preservation_policy=_preservation_policy(max_to_keep, track_best),
                # Makes orbax save each step's metrics and rank steps by them (`best_step`).
                best_fn=_score if track_best else None,
                cleanup_tmp_directories=True,
            ),
        )
        self._best_value = self._saved_best_value()

    def _saved_best_value(self) -> float | None:
        step = self._manager.best_step() if self._best_metric is not None else None
        metrics = {} if step is None else self._manager.metrics(step) or {}
        return metrics.get(self._best_metric)

    @property
    def best_value(self) -> float | None:
        """The best `best_metric` value saved so far (also across restarts), or None."""
        return self._best_value

    def latest_step(self) -> int | None:
        """The newest saved step, or None in a fresh workdir."""
        return self._manager.latest_step()

    def _new(self, step: int) -> bool:
        newest = self._manager.latest_step()
        return newest is None or step > newest

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` writes a checkpoint without `force` or a better metric."""
        return self._new(step) and self._manager.should_save(step)

    def _improves(self, metrics: Mapping[str, Any] | None) -> bool:
        if self._best_metric is None or metrics is None or self._best_metric not in metrics:
            return False
        value = float(metrics[self._best_metric])
        return self._best_value is None or self._best_sign * (value - self._best_value) > 0

    def _orbax_metrics(self, best: float | None) -> dict[str, float] | None:
        """What orbax records for a step: a new best value and its `_SCORE`, else `{}`.

        Only improvements are ranked, so among equal values the first step to reach one
        stays the best, and no best is kept while no evaluation has been saved.
        """
        if self._best_metric is None:
            return None
        return {} if best is None else {self._best_metric: best, _SCORE: self._best_sign * best}

    def save(
        self,
        step: int,
        state: PyTree,
        extra: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` and `extra` at `step` when due; returns whether it was saved.

        A checkpoint is written when `step` is on the schedule, when `force` is set, or
        when `metrics[best_metric]` beats every earlier value, but never twice for one step.
        """
        if not self._new(step):
            return False
        best = float(metrics[self._best_metric]) if self._improves(metrics) else None
        if not (force or best is not None or self._manager.should_save(step)):
            return False
        self._manager.save(
            step, args=_save_args(state, extra), metrics=self._orbax_metrics(best), force=True
        )
        if best is not None:
            self._best_value = best
        return True

    def restore(self, target: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
        """Restores the newest usable checkpoint as `(state, extra)`.

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
        candidates = sorted(self._manager.all_steps(), reverse=True)
        for step in candidates:
            restored, why = _read_step(self._manager, step, abstract)
            if why is None:
                logging.info("Restored step %d from %s.", step, self._manager.directory)
                return restored[_STATE], restored[_EXTRA]
            logging.error(
                "Checkpoint step %d in %s is unusable, falling back to the previous one: %s",
                step, self._manager.directory, why,
            )  # fmt: skip
            self._set_aside(step)
        if candidates:
            raise ValueError(
                f"None of the checkpoints in {self._workdir} can be read (steps "
                f"{sorted(candidates)}, now in {self._workdir / CORRUPT_DIR}); use a fresh "
                "--workdir to start over."
            )
        return None

    def _set_aside(self, step: int) -> None:
        """Moves an unusable step out of the checkpoint directory, so a later save may reuse
        its number; orbax's own `delete` would lose the files."""
        source = self._manager.directory / str(step)
        if jax.process_index() == 0 and source.exists():
            aside = self._workdir / CORRUPT_DIR
            aside.mkdir(parents=True, exist_ok=True)
            name, n = f"{LATEST_DIR}_{step}", 1
            while (aside / name).exists():
                name, n = f"{LATEST_DIR}_{step}.{n}", n + 1
            source.rename(aside / name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"bkd_jax set aside {source}")
        self._manager.reload()
        self._best_value = self._saved_best_value()

    def wait_until_finished(self) -> None:
        """Blocks until every asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()


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


def _step_reader() -> ocp.Checkpointer:
    """Reads a step's items, metrics included (so orbax has no item it cannot read)."""
    handler = ocp.CompositeCheckpointHandler(
        **{
            _STATE: ocp.PyTreeCheckpointHandler(),
            _EXTRA: ocp.JsonCheckpointHandler(),
            METRIC_ITEM_NAME: ocp.JsonCheckpointHandler(filename=METRIC_ITEM_NAME),
        }
    )
    return ocp.Checkpointer(handler)


def read_student(step_dir: str | epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The student variables and the extra dict of one step, e.g. workdir/checkpoints/100.

    Raises:
      CorruptCheckpointError: when a recorded file is missing, truncated or changed.
    """
    step_dir = absolute(step_dir)
    verify_integrity(step_dir)
    with _step_reader() as checkpointer:
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


def _best_step(directory: epath.Path, steps: list[int]) -> int | None:
    """The step with the highest `_SCORE` in orbax's metrics, or None when none has one."""
    scores = {}
    with _step_reader() as checkpointer:
        for step in steps:
            try:
                restored = checkpointer.restore(
                    directory / str(step),
                    args=ocp.args.Composite(**{METRIC_ITEM_NAME: ocp.args.JsonRestore()}),
                )
            except Exception:  # No metrics (no best metric tracked), or unreadable ones.
                continue
            scores[step] = _score(restored[METRIC_ITEM_NAME])
    best = max(scores, key=lambda step: (scores[step], step), default=None)
    return None if best is None or scores[best] == -math.inf else best


def _load_student(workdir: epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The student variables of a workdir's best checkpoint, else of its latest.

    Reads the step directories directly (no CheckpointManager), so nothing in the workdir
    is created or cleaned up: it may belong to a run still going, or be read-only.
    """
    directory = workdir / LATEST_DIR
    steps = saved_steps(directory)
    best = _best_step(directory, steps)
    candidates = [(BEST, step, directory / str(step)) for step in [best] if step is not None]
    if best is None and (workdir / LEGACY_BEST_DIR).is_dir():
        legacy = workdir / LEGACY_BEST_DIR
        candidates += [(BEST, step, legacy / str(step)) for step in saved_steps(legacy)[::-1]]
    candidates += [(LATEST, step, directory / str(step)) for step in steps[::-1] if step != best]
    for kind, step, step_dir in candidates:
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
        metadata ``{"checkpoint": "best" | "latest", "step": int, "directory": str,
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
