"""Tests of the command line, `python -m bkd_jax.main`, in subprocesses: preemption by
SIGTERM, Ctrl-C (SIGINT) during the first compilation, an exact resume with every step
logged once, the console output, the saved config and the locked config.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bkd_jax.training import checkpointing, config_guard, loop

REPO = pathlib.Path(__file__).resolve().parents[1]
# Optimisation level 1 compiles faster on CPU than the default and runs these steps about as
# fast; every run here uses it, so their numbers stay comparable bit for bit.
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_backend_optimization_level=1",
    "PYTHONPATH": str(REPO),
}
CONFIG = """
from bkd_jax.config_defaults import base_config


def get_config():
    return base_config("digits", teacher="resnet8", student="resnet8", method="ce")
"""
# Steps take a few ms here, so the run is long enough for SIGTERM to land well before its
# end; the single evaluation at the end makes the best checkpoint the final one.
STEPS = 300
OVERRIDES = [
    f"--config.num_train_steps={STEPS}",
    "--config.global_batch_size=16",  # 89 steps per epoch: the resume is mid-epoch
    "--config.log_every_steps=1",
    "--config.eval_every_epochs=100",
    "--config.tensorboard=False",
]
SIGNAL_AFTER_STEP = 3


def main_command(config_file: pathlib.Path, workdir: pathlib.Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bkd_jax.main",
        f"--config={config_file}",
        f"--workdir={workdir}",
        *flags,
    ]


def start(command: list[str], log: pathlib.Path) -> subprocess.Popen:
    """Starts `command` with its output (logs and progress) going to the file `log`."""
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: pathlib.Path, status: int = 0) -> str:
    """Waits for `process` and checks its exit status (success by default); returns its
    output."""
    process.wait(timeout=300)
    assert process.returncode == status, log.read_text()[-5000:]
    return log.read_text()


def logged_steps(workdir: pathlib.Path) -> list[int]:
    """Steps in metrics.jsonl so far; a line still being written (no newline yet) is left out."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line)["step"] for line in lines]


def train_losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    records = (json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def wait_for_text(process: subprocess.Popen, log: pathlib.Path, text: str) -> None:
    deadline = time.monotonic() + 240
    while text not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {text!r} in the output: {log.read_text()[-5000:]}")
        time.sleep(0.01)


def wait_for_step(
    process: subprocess.Popen, log: pathlib.Path, workdir: pathlib.Path, step: int
) -> None:
    deadline = time.monotonic() + 240
    while max(logged_steps(workdir), default=0) < step:
        if process.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {log.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no step {step} in {workdir}/metrics.jsonl after 240 s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """An uninterrupted run, and a run stopped by SIGTERM, resumed and stopped by SIGINT as
    soon as it starts compiling, then resumed to the end by the same command."""
    root = tmp_path_factory.mktemp("cli")
    config_file = root / "digits_config.py"
    config_file.write_text(CONFIG)
    uninterrupted, resumed = root / "uninterrupted", root / "resumed"
    logs = {name: root / f"{name}.log" for name in ("reference", "first", "second", "third")}
    reference = start(main_command(config_file, uninterrupted, *OVERRIDES), logs["reference"])
    try:
        first = start(main_command(config_file, resumed, *OVERRIDES), logs["first"])
        wait_for_step(first, logs["first"], resumed, SIGNAL_AFTER_STEP)
        first.send_signal(signal.SIGTERM)
        first_output = finish(first, logs["first"], 128 + signal.SIGTERM)
        stopped_at = max(logged_steps(resumed))
        saved_at_stop = sorted(p.name for p in (resumed / checkpointing.LATEST_DIR).iterdir())
        had_results = (resumed / loop.RESULTS_FILE).exists()
        second = start(main_command(config_file, resumed, *OVERRIDES), logs["second"])
        wait_for_text(second, logs["second"], " on digits (1437 train / 360 eval images)")
        second.send_signal(signal.SIGINT)  # the train step is about to be compiled
        second_output = finish(second, logs["second"], 128 + signal.SIGINT)
        interrupted_at = max(logged_steps(resumed))
        third = start(main_command(config_file, resumed, *OVERRIDES), logs["third"])
        third_output = finish(third, logs["third"])
        reference_output = finish(reference, logs["reference"])
    finally:
        reference.kill()  # only matters when something above failed
    return {
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "first_output": first_output,
        "second_output": second_output,
        "third_output": third_output,
        "interrupted_at": interrupted_at,
        "reference_output": reference_output,
        "stopped_at": stopped_at,
        "saved_at_stop": saved_at_stop,
        "had_results": had_results,
    }


def test_sigterm_saves_a_checkpoint_and_stops_early(runs):
    stop = runs["stopped_at"]
    assert SIGNAL_AFTER_STEP <= stop < STEPS
    assert runs["saved_at_stop"] == [str(stop)]
    assert not runs["had_results"]
    assert f"Preempted: saved step {stop}; rerun the command to resume." in runs["first_output"]
    assert runs["first_output"].endswith(
        f"Stopped at step {stop} of {STEPS}, exit status 143 (128 + the signal's number); "
        "rerun the same command to resume.\n"
    )
    assert f"Resuming from step {stop}." in runs["second_output"]


def test_ctrl_c_during_compilation_saves_and_exits_with_status_130(runs):
    stop, interrupted = runs["stopped_at"], runs["interrupted_at"]
    output = runs["second_output"]
    assert "Got SIGINT: will save a checkpoint after this step and stop" in output
    assert stop < interrupted < STEPS
    assert f"Interrupted: saved step {interrupted}; rerun the command to resume." in output
    assert "Fatal Python error" not in output and "Traceback" not in output
    # Exit status 130 (checked in `runs`): `main ... && next` must not run `next`.
    assert f"Stopped at step {interrupted} of {STEPS}, exit status 130" in output
    assert f"Resuming from step {interrupted}." in runs["third_output"]


def test_resumed_run_matches_the_uninterrupted_one(runs):
    resumed, uninterrupted = runs["resumed"], runs["uninterrupted"]
    expected = train_losses(uninterrupted)
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    # Every step logged once (each resume starts right after the saved step), same losses.
    assert train_losses(resumed) == expected

    got, got_meta = checkpointing.load_variables(resumed)
    want, want_meta = checkpointing.load_variables(uninterrupted)
    assert got_meta["step"] == want_meta["step"] == STEPS
    got_leaves, want_leaves = flat(got), flat(want)
    assert got_leaves.keys() == want_leaves.keys() and len(got_leaves) > 10
    for key, value in want_leaves.items():
        np.testing.assert_array_equal(got_leaves[key], value, err_msg=key)

    results = [json.loads((w / loop.RESULTS_FILE).read_text()) for w in (resumed, uninterrupted)]
    assert results[0] == results[1]
    assert results[0]["last"]["eval/count"] == 360


def test_console_shows_progress_and_final_accuracies_without_library_chatter(runs):
    output = runs["reference_output"]
    assert f"step {STEPS}/{STEPS} (100.0%) |" in output
    assert " img/s | ETA 0:00:00 | loss " in output
    results = json.loads((runs["uninterrupted"] / loop.RESULTS_FILE).read_text())
    best, last = results["best"]["eval/student/top1"], results["last"]["eval/student/top1"]
    # Percentages everywhere; a run without a teacher has no "student".
    assert f"top1% {100 * last:.4g}" in output
    assert f"] Top-1: best {100 * best:.2f}% (step {STEPS}, " in output
    assert f"last {100 * last:.2f}%" in output
    assert "ce resnet8 (student 78,042 parameters) on digits (1437 train / 360 eval" in output
    assert "checkpoint_manager.py" not in output  # orbax's INFO lines are filtered out
    assert "oneDNN" not in output and "absl::InitializeLog" not in output  # TensorFlow's
    rows = [json.loads(line) for line in (runs["uninterrupted"] / "metrics.jsonl").open()]
    timed = [r for r in rows if "train/loss" in r]
    assert len(timed) == STEPS
    assert all(0 <= r["train/data_seconds_per_step"] <= r["train/seconds_per_step"] for r in timed)


def test_resolved_config_is_saved_in_the_workdir(runs):
    saved = json.loads((runs["uninterrupted"] / config_guard.CONFIG_FILE).read_text())
    assert saved["num_train_steps"] == STEPS
    assert saved["global_batch_size"] == 16
    assert saved["dataset"]["name"] == "digits"
    assert saved["distill"]["method"] == "ce"


def test_misspelt_config_field_is_rejected(tmp_path):
    config_file = tmp_path / "digits_config.py"
    config_file.write_text(CONFIG)
    result = subprocess.run(
        main_command(config_file, tmp_path / "run", "--config.num_train_stepz=5"),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "error: unknown field num_train_stepz; did you mean num_train_steps?" in result.stderr
    assert not (tmp_path / "run").exists()


def test_dataset_name_on_the_command_line_brings_that_data_sets_fields(tmp_path):
    # configs/cifar100.py builds CIFAR-100's dataset fields; the digits' are 8x8, unaugmented.
    result = subprocess.run(
        main_command(
            REPO / "configs/cifar100.py:student=resnet8,method=ce",
            tmp_path / "run",
            "--config.dataset.name=digits",
            "--config.num_train_steps=2",
            "--config.global_batch_size=16",
            "--config.tensorboard=False",
        ),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "on digits (1437 train / 360 eval images)" in result.stderr
    saved = json.loads((tmp_path / "run" / config_guard.CONFIG_FILE).read_text())["dataset"]
    expected = {"name": "digits", "image_size": 8, "augment": "none", "mean": [0.3053] * 3}
    assert {key: saved[key] for key in expected} == expected
