"""Tests for bkd_jax.training.config_guard: one experiment per workdir."""

import json
import subprocess
import sys

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


# Reads config.json in a loop until told to stop; prints how many reads found a whole file
# and how many a partial one (text that is not the complete JSON document).
_READER = r"""
import json, pathlib, sys
path, stop = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
whole = partial = 0
while not stop.exists():
    try:
        text = path.read_text()
    except FileNotFoundError:
        continue
    try:
        json.loads(text)
        whole += 1
    except ValueError:
        partial += 1
print(json.dumps({"whole": whole, "partial": partial}))
"""


def test_config_guard_never_shows_a_reader_a_partial_file(tmp_path):
    """Another process reading config.json while it is written, again and again, sees either
    no file or all of it: with a plain write, the same loop sees partial files."""
    workdir, stop = tmp_path / "workdir", tmp_path / "stop"
    config = {**CONFIG, "notes": "x" * 4_000_000}  # a long write, a wide window to see
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(workdir / "config.json"), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(60):
            (workdir / "config.json").unlink(missing_ok=True)
            config_guard.check_or_write_config(workdir, config)
    finally:
        stop.touch()
        counts = json.loads(reader.communicate(timeout=60)[0])
    assert counts["partial"] == 0, counts
    assert counts["whole"] > 0, counts
    assert list(workdir.iterdir()) == [workdir / "config.json"]  # no temporary file left
