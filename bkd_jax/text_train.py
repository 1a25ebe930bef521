r"""Fine-tuning and distillation of text BlockNets (BERT) on sentence classification.

    python -m bkd_jax.text_train --config=configs/glue.py:task=sst2,method=blockkd \
        --workdir=runs/sst2/blockkd --config.teacher_checkpoint=... \
        --config.dataset.vocab_file=vocab.txt --config.dataset.data_dir=DATA

The image trainer (`bkd_jax.main`) is built around image pipelines; text needs its own
loop: tokenised examples in host memory, batches padded per batch to bucketed lengths
(`bkd_jax.data.text`), one compiled step per bucket. Everything else is shared: the
distillers, `bkd_jax.steps`' train step, AdamW with BERT's linear warm-up and decay.
Each epoch ends with an evaluation of the student, the teacher and the stepping-stones
under GLUE's metrics on every evaluation split of the task; the workdir gets
`config.json`, `metrics.jsonl` and, at the end, `results.json` as `bkd_jax.report` reads
them. The first split's metrics are the headline ones, named as the image trainer's
("eval/student/top1" is accuracy); those of further splits carry the split's name
("eval/validation_mismatched/student/top1" for MNLI, whose first split is the matched one).
The loop keeps no checkpoints of its own beyond the final student (`student/`).
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bkd_jax import distillers, optim, steps
from bkd_jax.blocknet import TEXT_ROWS
from bkd_jax.data import text
from bkd_jax.distillers import regression
from bkd_jax.models import bert
from bkd_jax.training import run_files
from bkd_jax.training.config_guard import CONFIG_FILE
from bkd_jax.training.metric_writers import METRICS_FILE


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW, linear warm-up over `warmup_fraction` of the steps, linear decay to 0 (BERT)."""
    warmup = int(cfg.warmup_fraction * total_steps)
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
            optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=optim.decay_mask)


def _load(path: str, net: bert.TextBlockNet, role: str) -> dict[str, Any]:
    """Variables of `net` from a converted checkpoint or a finished run's workdir."""
    from bkd_jax.training import checkpointing  # orbax only when a checkpoint is read

    variables, _ = checkpointing.load_variables(path)
    parts = {k for k in variables["params"] if k.startswith("block")}
    if len(parts) != net.num_blocks:
        raise ValueError(
            f"{role}_checkpoint {path} is cut into {len(parts)} blocks, the config into "
            f"{net.num_blocks}: set groups={len(parts)} or convert with --groups"
        )
    return jax.tree.map(jnp.asarray, variables)


def evaluate(
    eval_fn, state, teacher_vars, data: text.Encoded, metrics, batch_size: int, split: str = ""
) -> dict[str, float]:
    """GLUE `metrics` of the student, the teacher and each stone on `data`, named
    "eval/[split/]model/metric"."""
    outputs: dict[str, list[np.ndarray]] = {}
    for batch in text.batches(data, batch_size):
        for name, logits in eval_fn(state, teacher_vars, batch["image"]).items():
            outputs.setdefault(name, []).append(np.asarray(logits))
    found = {}
    for name, parts in outputs.items():
        values = text.glue_metrics(metrics, np.concatenate(parts), data.labels)
        if "accuracy" in values:
            values["top1"] = values.pop("accuracy")
        prefix = f"eval/{split}/{name}" if split else f"eval/{name}"
        found.update({f"{prefix}/{k}": v for k, v in values.items()})
    return found


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    train_data: text.Encoded,
    eval_data: text.Encoded,
    *,
    num_classes: int,
    metrics: tuple[str, ...] = ("accuracy",),
    other_splits: Mapping[str, text.Encoded] = MappingProxyType({}),
) -> dict[str, Any]:
    """Trains `config.student` on `train_data`; returns (and writes) the results summary.

    `eval_data` is the headline evaluation split (it picks "best"); `other_splits`, by
    split name, are evaluated alongside under names qualified by that name.

    `num_classes=1` is a regression (STS-B): the objectives of `bkd_jax.distillers.regression`.
    `config.model_options`, when present, go to `bkd_jax.models.bert.get_model` for both
    networks (a vocabulary of other than BERT's size, shorter position tables).
    """
    regression_task, knobs = num_classes == 1, distillers.method_knobs(config.distill)
    if regression_task:
        regression.check_method(config.distill.method, knobs)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, default=str))
    options = {"groups": config.groups, **config.get("model_options", {})}
    student = bert.get_model(config.student, num_classes, **options)
    method = distillers.get(config.distill.method)
    if method.optimizer:
        raise ValueError(
            f"method {method.name!r} is its own optimizer ({method.optimizer}), not the "
            "AdamW of BERT fine-tuning the text trainer runs"
        )
    teacher = teacher_vars = None
    if method.needs_teacher:
        if not config.teacher_checkpoint:
            raise ValueError(f"method {method.name!r} needs config.teacher_checkpoint")
        teacher = bert.get_model(config.teacher, num_classes, **options)
        teacher_vars = _load(config.teacher_checkpoint, teacher, "teacher")
    input_shape = (len(TEXT_ROWS), config.dataset.max_length)
    distiller = distillers.make_distiller(
        config.distill, student, teacher, input_shape, num_examples=len(train_data)
    )
    if regression_task:
        distiller = regression.regression_distiller(distiller, knobs)
    batch = config.global_batch_size
    steps_per_epoch = len(train_data) // batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_data)} training examples make no batch of {batch}")
    total = steps_per_epoch * config.num_epochs
    optimizer = make_optimizer(config.optim, total)
    example = next(text.batches(train_data, batch))["image"]
    state = steps.create_train_state(distiller, optimizer, jax.random.key(config.seed), example)
    if config.student_checkpoint:
        params = _load(config.student_checkpoint, student, "student")["params"]
        state = state.replace(
            params={**state.params, "student": params},
            opt_state=optimizer.init({**state.params, "student": params}),
        )
    warmup_epochs = distiller.warmup_epochs
    train_step = jax.jit(
        steps.make_train_step(
            distiller, optimizer,
            lambda step: distillers.warmup_factor(step, steps_per_epoch, warmup_epochs),
        )
    )  # fmt: skip

    def eval_logits(state, teacher_vars, x):
        return distiller.eval_logits(
            state.variables("student"), state.variables("modules"), teacher_vars, x
        )

    eval_fn = jax.jit(eval_logits)
    rng = np.random.default_rng(config.seed)
    history, best = [], None
    with open(workdir / METRICS_FILE, "w") as log:
        for epoch in range(1, config.num_epochs + 1):
            start = time.perf_counter()
            for batch_arrays in text.batches(train_data, batch, rng=rng, drop_remainder=True):
                state, step_metrics = train_step(state, teacher_vars, batch_arrays)
            seconds = (time.perf_counter() - start) / steps_per_epoch
            record = {
                "step": int(state.step), "epoch": epoch, "train/seconds_per_step": seconds,
                **{f"train/{k}": float(v) for k, v in step_metrics.items()},
                **evaluate(eval_fn, state, teacher_vars, eval_data, metrics, batch),
            }  # fmt: skip
            for split, data in other_splits.items():
                record.update(evaluate(eval_fn, state, teacher_vars, data, metrics, batch, split))
            log.write(json.dumps(record) + "\n")
            log.flush()
            history.append(record)
            headline = f"eval/student/{'top1' if metrics[0] == 'accuracy' else metrics[0]}"
            if best is None or record[headline] > best[headline]:
                best = record
    keep = lambda r: {k: v for k, v in r.items() if k.startswith("eval/")}  # noqa: E731
    results = {
        "last": keep(history[-1]), "best": keep(best), "best_step": best["step"],
        "steps": int(state.step), "total_steps": total,
    }  # fmt: skip
    (workdir / run_files.RESULTS_FILE).write_text(json.dumps(results, indent=2))
    _save_student(workdir / "student", state, config, num_classes)
    return results


def _save_student(path: pathlib.Path, state, config, num_classes: int) -> None:
    from bkd_jax.training import checkpointing

    metadata = {"model": config.student, "num_classes": num_classes, "groups": config.groups}
    checkpointing.save_variables(path.absolute(), {"params": state.params["student"]}, metadata)


def load_task(dataset: ml_collections.ConfigDict) -> dict[str, text.Encoded]:
    """The tokenised "train" split and every evaluation split of `dataset.task`, by name,
    evaluation splits in the task's order (MNLI: matched, then mismatched)."""
    if not dataset.vocab_file:
        raise ValueError("config.dataset.vocab_file: the checkpoint's WordPiece vocab.txt")
    task = text.glue_task(dataset.task)
    tokenizer = text.wordpiece(
        dataset.vocab_file, lowercase=dataset.lowercase, max_length=dataset.max_length
    )
    return {
        split: text.encode(tokenizer, text.load_glue(dataset.task, split, dataset.data_dir or None))
        for split in ("train", *task.eval_splits)
    }


def run_task(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """`train` on GLUE task `config.dataset.task`, evaluated on all its evaluation splits."""
    task = text.glue_task(config.dataset.task)
    splits = load_task(config.dataset)
    headline, *others = task.eval_splits
    return train(
        config, workdir, splits["train"], splits[headline],
        num_classes=task.num_classes, metrics=task.metrics,
        other_splits={split: splits[split] for split in others},
    )  # fmt: skip


def main(argv) -> None:
    del argv
    print(json.dumps(run_task(_CONFIG.value, _WORKDIR.value)["last"], indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/glue.py:...")
    _WORKDIR = flags.DEFINE_string("workdir", None, "the run's directory")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
