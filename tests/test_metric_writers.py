"""Tests for bkd_jax.training.metric_writers: exact JSON lines, TensorBoard scalars read back, and
silence on processes other than 0."""

import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax.training import metric_writers


def test_jsonl_lines_are_exact_and_appended_across_writers(tmp_path):
    with metric_writers.MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write_scalars(1, {"train/loss": jnp.float32(0.5), "lr": 0.1, "n": np.int64(3)})
        writer.write_scalars(jnp.int32(2), {"eval/top1": jnp.asarray(0.25)})
        # Flushed at once: readable before close.
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    with metric_writers.MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write_scalars(3, {"train/loss": np.float32(0.1)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == [
        '{"step": 1, "train/loss": 0.5, "lr": 0.1, "n": 3}',
        '{"step": 2, "eval/top1": 0.25}',
        json.dumps({"step": 3, "train/loss": float(np.float32(0.1))}),
    ]
    assert not (tmp_path / "tensorboard").exists()


def test_resume_drops_the_lines_of_replayed_steps_and_a_torn_last_line(tmp_path):
    with metric_writers.MetricWriter(tmp_path, tensorboard=False) as writer:
        for step in (1, 2, 3, 4):
            writer.write_scalars(step, {"train/loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')  # a line cut short by a kill
    with metric_writers.MetricWriter(tmp_path, tensorboard=False, resume_step=2) as writer:
        writer.write_scalars(3, {"train/loss": 30.0})
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "train/loss": 2.0},
        {"step": 3, "train/loss": 30.0},
    ]


def _read_events(logdir):
    """{tag: [(step, value)]} and {tag: plugin name} from the event files in `logdir`, read
    by TensorBoard's own loader."""
    from tensorboard.backend.event_processing import event_file_loader

    found, plugins = {}, {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                tensor = value.tensor
                read = tensor.string_val[0] if tensor.string_val else tensor.float_val[0]
                found.setdefault(value.tag, []).append((event.step, read))
                plugins.setdefault(value.tag, value.metadata.plugin_data.plugin_name)
    return found, plugins


def test_tensorboard_scalars_and_texts_read_back(tmp_path):
    with metric_writers.MetricWriter(tmp_path) as writer:
        writer.write_scalars(10, {"train/loss": 2.5, "eval/top1": jnp.float32(0.75)})
        writer.write_scalars(20, {"train/loss": np.float64(1.25)})
        writer.write_texts(0, {"config": "lr: 0.05"})
    events, plugins = _read_events(tmp_path / "tensorboard")
    assert plugins == {
        "train/loss": "scalars",
        "eval/top1": "scalars",
        "config/text_summary": "text",
    }
    assert events["train/loss"] == [(10, 2.5), (20, 1.25)]
    assert events["eval/top1"] == [(10, 0.75)]
    assert events["config/text_summary"] == [(0, b"lr: 0.05")]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_without_tensorboardx_a_warning_replaces_the_events(tmp_path, monkeypatch):
    real_find_spec = metric_writers.importlib.util.find_spec
    monkeypatch.setattr(
        metric_writers.importlib.util,
        "find_spec",
        lambda name: None if name == "tensorboardX" else real_find_spec(name),
    )
    with (
        mock.patch.object(metric_writers.logging, "warning") as warning,
        metric_writers.MetricWriter(tmp_path) as writer,
    ):
        writer.write_scalars(1, {"train/loss": 1.0})
    warning.assert_called_once_with("No TensorBoard events: tensorboardX is not installed.")
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 1.0}\n'


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with metric_writers.MetricWriter(tmp_path / "run") as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_texts(1, {"note": "x"})
    assert not (tmp_path / "run").exists()


def test_non_scalar_values_are_refused(tmp_path):
    with (
        metric_writers.MetricWriter(tmp_path, tensorboard=False) as writer,
        pytest.raises(ValueError),
    ):
        writer.write_scalars(1, {"logits": np.zeros(3)})
