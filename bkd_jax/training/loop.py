"""The training loop: build, validate, resume, step, evaluate, checkpoint, log.

`train_and_evaluate(config, workdir)` is what `python -m bkd_jax.main` runs and what a
notebook calls directly. Everything a bad config can get wrong is checked before any
compute: names of the data set, models and method, the data on disk, the teacher
checkpoint, that the batches split over the devices, and that a workdir being resumed
was started with the same config. Nothing is written to the workdir before these pass.

Resuming: the training stream is a pure function of (seed, step), so a checkpoint of the
state (student, connectors, optimizer, step) and a few scalars in its JSON `extra` (best
accuracy so far) is all a restart needs to continue exactly where it stopped. Checkpoints
are written every `checkpoint_every_steps`, at every evaluation that improves the
student's top-1 (kept apart as the best), at the end, and on SIGTERM or SIGINT (Ctrl-C),
which stop the run after the step in progress. A rerun restores the newest checkpoint
(latest or best, falling back past an unreadable one) and drops the metrics.jsonl lines of
the steps it replays.

Each step runs under `jax.transfer_guard("disallow")`: batches go to the devices and
metrics come back only through explicit transfers. A NaN or Inf in the loss, a loss term,
the gradients or the parameters stops the run at the step where it appeared (or, with
``config.on_nonfinite="skip"``, that step's update is dropped and counted); no checkpoint
ever holds a non-finite state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh

from bkd_jax import distillers, models, optim, shapes, steps
from bkd_jax.data import datasets
from bkd_jax.training import (
    checkpointing,
    config_guard,
    inputs,
    nonfinite,
    preemption,
    profiling,
    sharding,
)
from bkd_jax.training.metric_writers import MetricWriter
from bkd_jax.training.progress import Progress
from bkd_jax.training.run_files import (
    BEST_METRIC,
    COSMETIC_KEYS,
    RESULTS_FILE,
    atomic_write_text,
)
from bkd_jax.training.validation import DTYPES, validate_config


def _held_model(path: str, metadata: dict[str, Any]) -> str | None:
    """The zoo name of the model a checkpoint holds, when it records one."""
    if "checkpoint" in metadata:  # a training workdir: its config names the model trained
        return (config_guard.read_config(path) or {}).get("student")
    return metadata.get("model")


def _describe_source(path: str, metadata: dict[str, Any]) -> str:
    """Which checkpoint directory and step `load_variables` read, for the log."""
    if "checkpoint" not in metadata:
        return f"{path} (converted from {metadata.get('source', 'an unknown source')})"
    step, kind = metadata["step"], metadata["checkpoint"]
    if kind != checkpointing.BEST:
        return f"{metadata['directory']} (the latest checkpoint, step {step})"
    saved = checkpointing.saved_steps(epath.Path(path) / checkpointing.LATEST_DIR)
    latest = max(saved, default=None)
    last = f"; the last is step {latest}" if latest is not None and latest != step else ""
    return f"{metadata['directory']} (the best checkpoint by top-1, step {step}{last})"


def load_model_variables(path: str, net: models.BlockNet, image_shape, field: str) -> Any:
    """Variables from a checkpoint, checked against `net`'s structure and shapes.

    Args:
      path: a training workdir or a directory written by `checkpointing.save_variables`.
      net: the model the config names for them, in `config.<field>`.
      image_shape: one input's shape, to build `net`'s variable shapes.
      field: the config field naming the model ("teacher" or "student"), for messages.
    """
    what = f"{field} checkpoint"
    try:
        variables, metadata = checkpointing.load_variables(path)
    except ValueError as e:
        raise ValueError(f"{what} {path}: {e}") from None
    expected = shapes.variable_shapes(net, image_shape)  # traced once; distillers reuse it
    want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(variables)}
    problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k} {have[k]}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"{k}: checkpoint {have[k]} vs model {want[k]}"
        for k in sorted(want.keys() & have.keys())
        if tuple(have[k]) != tuple(want[k])
    ]
    held = _held_model(path, metadata)
    if problems and held is not None and held != net.name:
        raise ValueError(f"{what} {path} holds {held}, config.{field} is {net.name}")
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise ValueError(
            f"{what} {path} does not match model {net.name} ({len(problems)} problems):\n  {shown}"
        )
    logging.info("Loaded %s %s from %s.", field, net.name, _describe_source(path, metadata))
    return jax.tree.map(lambda v: np.asarray(v, np.float32), variables)


def jit_train_step(
    distiller: distillers.Distiller,
    optimizer: optax.GradientTransformation,
    warmup: Callable[[jax.Array], jax.Array],
    mesh: Mesh,
    on_nonfinite: str = "stop",
) -> Callable:
    """The train step jitted over `mesh`: batch split, state and teacher replicated.

    The state argument is donated: its buffers are reused for the new state. Its metrics
    carry the finite flag of `nonfinite.guard_step` (`on_nonfinite`: "stop" or "skip").
    """
    repl = sharding.replicated(mesh)
    return jax.jit(
        nonfinite.guard_step(steps.make_train_step(distiller, optimizer, warmup), on_nonfinite),
        in_shardings=(repl, repl, sharding.batch_sharded(mesh)),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )


def jit_eval_step(distiller: distillers.Distiller, mesh: Mesh) -> Callable:
    """The eval step jitted over `mesh`; its sums come back replicated."""
    repl = sharding.replicated(mesh)
    return jax.jit(
        steps.make_eval_step(distiller),
        in_shardings=(repl, repl, sharding.batch_sharded(mesh)),
        out_shardings=repl,
    )


def evaluate(
    eval_step: Callable, state: Any, teacher_vars: Any, loader: inputs.Loader, batch_size: int
) -> dict[str, float]:
    """Top-1/top-5 of every evaluated model over the whole eval split."""
    sums = None
    for batch in loader.eval_batches(batch_size):
        out = eval_step(state, teacher_vars, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = float(sums.pop("count"))
    return {"eval/count": count, **{f"eval/{k}": float(v) / count for k, v in sums.items()}}


def _summary(history: list[dict[str, float]]) -> dict[str, Any]:
    """Best (by top-1) and last evaluation of every model."""
    if not history:
        return {}
    best = max(history, key=lambda m: m[BEST_METRIC])
    return {"best": best, "last": history[-1]}


class _Setup(NamedTuple):
    """What a config builds before any compute: everything checked, nothing written."""

    info: datasets.DatasetInfo
    loader: inputs.Loader
    mesh: Mesh
    steps_per_epoch: int
    total_steps: int
    distiller: distillers.Distiller
    optimizer: optax.GradientTransformation
    teacher_vars: Any  # replicated over the mesh; None for a method without a teacher
    student_init: Any  # student variables from config.student_checkpoint, or None


def _set_up(config: ml_collections.ConfigDict) -> _Setup:
    """Validates `config` against the data, the devices and the checkpoints it names."""
    validate_config(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.global_batch_size, mesh, "config.global_batch_size")
    sharding.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    loader = inputs.make_loader(config.dataset, mesh)
    info = loader.info
    steps_per_epoch = datasets.steps_per_epoch(info, config.global_batch_size)
    if steps_per_epoch < 1:
        raise ValueError(
            f"config.global_batch_size {config.global_batch_size} exceeds the "
            f"{info.num_train} training examples"
        )
    dtype = DTYPES[config.dtype]
    method = distillers.get(config.distill.method)
    student = models.get_model(config.student, info.num_classes, dtype)
    teacher = teacher_vars = student_init = None
    if method.needs_teacher:
        teacher = models.get_model(config.teacher, info.num_classes, dtype)
        teacher_vars = jax.device_put(
            load_model_variables(config.teacher_checkpoint, teacher, info.image_shape, "teacher"),
            sharding.replicated(mesh),
        )
    if config.student_checkpoint:
        student_init = load_model_variables(
            config.student_checkpoint, student, info.image_shape, "student"
        )
    total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
    return _Setup(
        info=info,
        loader=loader,
        mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        distiller=distillers.make_distiller(
            config.distill,
            student,
            teacher,
            (1, *info.image_shape),
            dtype=dtype,
            remat_teacher=config.remat_teacher,
            num_examples=info.num_train,
        ),
        optimizer=optim.make_optimizer(
            config.optim, steps_per_epoch, method.optimizer, total_steps
        ),
        teacher_vars=teacher_vars,
        student_init=student_init,
    )


def _initial_state(setup: _Setup, seed: int) -> steps.TrainState:
    """A fresh state, replicated over the mesh, with the student's initial weights if any."""
    repl = sharding.replicated(setup.mesh)
    sample = jnp.zeros((1, *setup.info.image_shape), jnp.float32)
    state = jax.jit(
        functools.partial(steps.create_train_state, setup.distiller, setup.optimizer),
        out_shardings=repl,
    )(jax.random.key(seed), sample)
    if setup.student_init is None:
        return state
    state = state.replace(
        params={**state.params, "student": setup.student_init["params"]},
        batch_stats={**state.batch_stats, "student": setup.student_init.get("batch_stats", {})},
    )
    return jax.device_put(state, repl)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or only evaluates) per `config` in `workdir`; returns the results summary.

    The summary (also written to `workdir/results.json` once the run is complete) holds
    "steps" done, "total_steps", and the "best" (by student top-1) and "last" evaluations;
    with `config.eval_only`, just "eval". A run stopped by SIGTERM or SIGINT returns early
    without results, after saving its last step, and with "exit_status", what a command
    should exit with (`PreemptionGuard.exit_status`).

    Raises:
      FloatingPointError: with `config.on_nonfinite="stop"`, at the first non-finite step.
    """
    # Installed first, so that a signal during set-up or compilation is held, not raised.
    with preemption.PreemptionGuard() as guard:
        summary = _run(config, epath.Path(workdir), guard)
    if summary.get("steps", 0) < summary.get("total_steps", 0):  # stopped by the signal
        summary["exit_status"] = guard.exit_status
    return summary


def _run(
    config: ml_collections.ConfigDict, workdir: epath.Path, guard: preemption.PreemptionGuard
) -> dict[str, Any]:
    setup = _set_up(config)
    workdir.mkdir(parents=True, exist_ok=True)
    config_guard.check_or_write_config(workdir, config.to_dict(), ignore=COSMETIC_KEYS)

    state = _initial_state(setup, config.seed)
    checkpointer = checkpointing.Checkpointer(
        workdir,
        save_interval_steps=config.checkpoint_every_steps,
        max_to_keep=config.keep_checkpoints,
        best_metric=BEST_METRIC,
    )
    try:
        extra = {"history": [], "skipped_steps": 0}
        restored = checkpointer.restore(state)
        if restored is not None:
            state, saved_extra = restored
            extra.update(saved_extra)
            logging.info("Resuming from step %d.", int(state.step))
        eval_step = jit_eval_step(setup.distiller, setup.mesh)
        if config.eval_only:
            with MetricWriter(workdir, tensorboard=config.tensorboard) as writer:
                metrics = evaluate(
                    eval_step, state, setup.teacher_vars, setup.loader, config.eval_batch_size
                )
                writer.write_scalars(int(state.step), metrics)
            summary = {"eval": metrics}
            _write_results(workdir, summary)
            shown = ", ".join(
                f"{key.removeprefix('eval/')} {100 * value:.2f}%"
                for key, value in sorted(metrics.items())
                if key.endswith(("/top1", "/top5"))
            )
            logging.info("Evaluation of %d images: %s.", metrics["eval/count"], shown)
            return summary

        start = int(state.step)
        if guard.should_stop(start):  # a signal during set-up: not worth compiling the step
            logging.warning("Stopped before step %d; nothing new to save.", start + 1)
            return {"steps": start, "total_steps": setup.total_steps}
        _log_start(config, setup, state)
        writer = MetricWriter(workdir, tensorboard=config.tensorboard, resume_step=int(state.step))
        with writer, _explain_peer_failure():
            step = _train(
                config, setup, state, eval_step, checkpointer, writer, extra, guard, workdir
            )
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    summary = {"steps": step, "total_steps": setup.total_steps, **_summary(extra["history"])}
    if step == setup.total_steps:
        _write_results(workdir, summary)
        _log_summary(summary, workdir)
    return summary


@contextlib.contextmanager
def _explain_peer_failure() -> Iterator[None]:
    """On several processes, says why a computation failed when a peer died mid-run."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        raise RuntimeError(
            f"process {jax.process_index()} of {jax.process_count()}: a computation across "
            "processes failed, most likely because another process died (see its log); "
            f"stopping. {str(e).splitlines()[0]}"
        ) from e


def _check_finite(
    pending: list[tuple[int, dict[str, jax.Array]]],
    config: ml_collections.ConfigDict,
    checkpointer: checkpointing.Checkpointer,
    extra: dict[str, Any],
) -> list[tuple[int, dict[str, float]]]:
    """Fetches the metrics of the steps not checked yet and acts on non-finite ones.

    Returns the fetched `(step, metrics)` and empties `pending`; counts skipped steps in
    `extra["skipped_steps"]`.

    Raises:
      FloatingPointError: in "stop" mode, naming the first non-finite step and terms.
    """
    fetched = jax.device_get(pending)
    pending.clear()
    bad = nonfinite.find(fetched)
    if bad and config.on_nonfinite == "stop":
        step, names = bad[0]
        latest = checkpointer.latest_step()
        kept = "no checkpoint was written" if latest is None else f"checkpoint step {latest}"
        raise FloatingPointError(
            f"step {step}: non-finite {', '.join(names)}; stopped. The last finite state is "
            f"{kept}. config.on_nonfinite='skip' drops such updates instead."
        )
    for step, names in bad:
        logging.warning("Step %d: non-finite %s; its update was skipped.", step, ", ".join(names))
    extra["skipped_steps"] += len(bad)
    return fetched


def _train(
    config: ml_collections.ConfigDict,
    setup: _Setup,
    state: steps.TrainState,
    eval_step: Callable,
    checkpointer: checkpointing.Checkpointer,
    writer: MetricWriter,
    extra: dict[str, Any],
    guard: preemption.PreemptionGuard,
    workdir: epath.Path,
) -> int:
    """Steps from `state.step` to the end or a stop request; returns the last step done.

    Appends every evaluation to `extra["history"]`; each checkpoint carries `extra`.
    """
    warmup = functools.partial(setup.distiller.weight_factor, steps_per_epoch=setup.steps_per_epoch)
    train_step = jit_train_step(
        setup.distiller, setup.optimizer, warmup, setup.mesh, config.on_nonfinite
    )
    start = step = int(state.step)
    batches = setup.loader.train_batches(config.global_batch_size, config.seed, start)
    total, per_epoch = setup.total_steps, setup.steps_per_epoch
    eval_every = max(1, int(config.eval_every_epochs * per_epoch))
    progress = Progress(total, images_per_step=config.global_batch_size, initial_step=start)
    profiler = profiling.StepProfiler(workdir, start, config.profile_steps)
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not checked yet
    last_log, last_log_step, data_seconds = time.monotonic(), start, 0.0
    for step in range(start + 1, total + 1):
        waited = time.monotonic()
        batch = next(batches)  # the transfers happen in here, outside the guard
        with jax.transfer_guard("disallow"):
            data_seconds += time.monotonic() - waited
            profiler.before(step)
            state, train_metrics = train_step(state, setup.teacher_vars, batch)
            profiler.after(step, state)
            pending.append((step, train_metrics))
            logs = step % config.log_every_steps == 0 or step == total
            evaluates = step % eval_every == 0 or step == total
            stop = guard.should_stop(step)
            if logs or evaluates or stop or checkpointer.due(step):
                fetched = _check_finite(pending, config, checkpointer, extra)
            scalars = eval_metrics = None
            if logs:
                now, interval = time.monotonic(), step - last_log_step
                scalars = {f"train/{k}": float(v) for k, v in fetched[-1][1].items()}
                del scalars[f"train/{nonfinite.FINITE}"]
                if config.on_nonfinite == "skip":
                    scalars["train/skipped_steps"] = extra["skipped_steps"]
                scalars["train/epoch"] = step / per_epoch
                scalars["train/seconds_per_step"] = (now - last_log) / interval
                scalars["train/data_seconds_per_step"] = data_seconds / interval
                last_log, last_log_step, data_seconds = now, step, 0.0
                writer.write_scalars(step, scalars)
            if evaluates:
                eval_metrics = evaluate(
                    eval_step, state, setup.teacher_vars, setup.loader, config.eval_batch_size
                )
                extra["history"].append({"step": step, "epoch": step / per_epoch, **eval_metrics})
                writer.write_scalars(step, eval_metrics)
            progress.update(step, _short(scalars, eval_metrics))
            checkpointer.save(step, state, extra, metrics=eval_metrics, force=stop or step == total)
        if stop:
            logging.warning("%s: saved step %d; rerun the command to resume.", guard.reason, step)
            break
    progress.close()
    return step


def _log_start(config: ml_collections.ConfigDict, setup: _Setup, state: steps.TrainState) -> None:
    params = sum(x.size for x in jax.tree.leaves(state.params["student"]))
    pair = f"{config.teacher} -> {config.student}" if setup.distiller.teacher else ""
    logging.info(
        "%s %s (student %s parameters) on %s (%d train / %d eval images): steps %d to %d, "
        "%d per epoch, global batch %d over %d devices.",
        config.distill.method, pair or config.student, f"{params:,}", config.dataset.name,
        setup.info.num_train, setup.info.num_eval, int(state.step) + 1, setup.total_steps,
        setup.steps_per_epoch, config.global_batch_size, setup.mesh.devices.size,
    )  # fmt: skip


def _short(train: dict | None, evaluation: dict | None) -> dict[str, float] | None:
    """The few scalars the progress line shows."""
    shown = {}
    if train:
        shown["loss"] = train["train/loss"]
    if evaluation:
        shown["top1%"] = 100 * evaluation[BEST_METRIC]
    return shown or None


def _write_results(workdir: epath.Path, summary: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        atomic_write_text(workdir / RESULTS_FILE, json.dumps(summary, indent=2) + "\n")


def _log_summary(summary: dict[str, Any], workdir: epath.Path) -> None:
    """The student's best and last accuracies, then the last top-1 of the other models.

    A run without a teacher (method ce) trains a model, not a student: "Top-1" then.
    """
    best, last = summary["best"], summary["last"]
    others = [
        f"{key.split('/')[1]} {100 * value:.2f}%"
        for key, value in sorted(last.items())
        if key.endswith("/top1") and key != BEST_METRIC
    ]
    title = "Student top-1" if "eval/teacher/top1" in last else "Top-1"
    logging.info(
        "%s: best %.2f%% (step %d, epoch %.1f), last %.2f%%; top-5: best %.2f%%, "
        "last %.2f%%.%s Results: %s",
        title, 100 * best[BEST_METRIC], best["step"], best["epoch"], 100 * last[BEST_METRIC],
        100 * best["eval/student/top5"], 100 * last["eval/student/top5"],
        f" Last top-1 of {', '.join(others)}." if others else "", workdir / RESULTS_FILE,
    )  # fmt: skip
