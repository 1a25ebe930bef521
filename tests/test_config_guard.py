"""Tests for bkd_jax.training.config_guard: one experiment per workdir."""

import json

import pytest

from bkd_jax.training import config_guard

CONFIG = {"model": {"student": "resnet8x4", "teacher": "resnet32x4"}, "optim": {"lr": 0.05}}


def test_config_guard_writes_then_accepts_same_config(tmp_path):
    config_guard.check_or_write_config(tmp_path, CONFIG)
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG
    config_guard.check_or_write_config(tmp_path, json.loads(json.dumps(CONFIG)))


def test_config_guard_refuses_changed_config_and_names_keys(tmp_path):
    config_guard.check_or_write_config(tmp_path, CONFIG)
    written = (tmp_path / "config.json").read_text()
    changed = {"model": {"student": "resnet8x4", "teacher": "resnet56"}, "optim": {"lr": 0.05}}
    changed["seed"] = 1
    with pytest.raises(ValueError) as info:
        config_guard.check_or_write_config(tmp_path, changed)
    message = str(info.value)
    assert 'model.teacher: "resnet32x4" -> "resnet56"' in message
    assert "seed: <absent> -> 1" in message
    assert "optim.lr" not in message and "model.student" not in message
    assert "fresh --workdir" in message
    assert (tmp_path / "config.json").read_text() == written


def test_config_guard_ignores_cosmetic_keys(tmp_path):
    config_guard.check_or_write_config(tmp_path, {**CONFIG, "log": {"every": 10}})
    config_guard.check_or_write_config(
        tmp_path, {**CONFIG, "log": {"every": 50, "tb": True}}, ignore={"log"}
    )
    with pytest.raises(ValueError, match=r"log\.every: 10 -> 50"):
        config_guard.check_or_write_config(tmp_path, {**CONFIG, "log": {"every": 50}})


def test_read_config(tmp_path):
    assert config_guard.read_config(tmp_path) is None
    config_guard.check_or_write_config(tmp_path, CONFIG)
    assert config_guard.read_config(tmp_path) == CONFIG
