"""The optional Weights & Biases backend of MetricWriter, against a stand-in `wandb`
module that records what it is given (the real one needs an account or a network)."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import jax.numpy as jnp
import pytest

from bkd_jax.training import metric_writers


class _Run:
    def __init__(self, **settings):
        self.settings, self.logged, self.finished = settings, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def runs(monkeypatch) -> list[_Run]:
    """Every run the stand-in `wandb.init` makes."""
    made: list[_Run] = []
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda **settings: made.append(_Run(**settings)) or made[-1]
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return made


def test_scalars_go_to_one_run_per_workdir_resumed_by_id(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "kd")
    for _ in range(2):  # the same workdir twice: a resumed run
        with metric_writers.MetricWriter(tmp_path / "c100_bkd", tensorboard=False) as writer:
            writer.write_scalars(jnp.int32(3), {"train/loss": jnp.float32(0.5)})
    metric_writers.MetricWriter(tmp_path / "other", tensorboard=False, wandb_project="x").close()
    first, second, other = runs
    assert first.settings["project"] == "kd" and first.settings["name"] == "c100_bkd"
    assert first.settings["resume"] == "allow"
    assert first.settings["id"] == second.settings["id"] != other.settings["id"]
    assert other.settings["project"] == "x"
    assert first.logged == [(3, {"train/loss": 0.5})] and first.finished
    assert (tmp_path / "c100_bkd" / "metrics.jsonl").read_text().count("\n") == 2


def test_no_project_no_run(runs, tmp_path):
    metric_writers.MetricWriter(tmp_path, tensorboard=False).close()
    assert runs == []


def test_project_without_wandb_installed_warns_and_writes_json(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: not installed
    with caplog.at_level("WARNING"):
        writer = metric_writers.MetricWriter(tmp_path, tensorboard=False, wandb_project="kd")
    writer.write_scalars(1, {"a": 1.0})
    writer.close()
    assert "W&B project 'kd' set, but wandb is not installed." in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "a": 1.0}\n'
