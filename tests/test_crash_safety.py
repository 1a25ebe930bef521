"""Fault injection: the trainer killed with SIGKILL at random moments, checkpoint writes
included (saving is asynchronous), then rerun, again and again, until it finishes.

Every restart must restore the newest complete checkpoint (a step killed mid-write is
never complete: orbax renames it into place only when all its files are written), replay
nothing twice in metrics.jsonl, and the run must end with exactly the parameters, losses
and results of one uninterrupted run.

Starting Python with JAX and TensorFlow takes seconds, too long for a dozen restarts, so
every trainer is forked from a server that imported them once (multiprocessing's
forkserver, which forks from a process with no threads) and compiles from a persistent
compilation cache the uninterrupted run fills.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pathlib
import random
import re
import signal
import sys
import time

import jax
import numpy as np
import pytest

from bkd_jax.training import checkpointing, loop

TRIALS = 10
STEPS = 40
CHECKPOINT_EVERY = 2


def _config():
    from bkd_jax.config_defaults import base_config

    config = base_config("digits", teacher="resnet8", student="resnet8", method="ce")
    config.num_train_steps = STEPS
    config.global_batch_size = 16
    config.log_every_steps = 1
    config.eval_every_epochs = 1  # 89 steps per epoch: one evaluation, at the end
    config.checkpoint_every_steps = CHECKPOINT_EVERY
    config.tensorboard = False
    return config


def _train(workdir: str, log: str) -> None:
    """The trainer, in a forked child: everything it logs goes to the file `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True, format="%(asctime)s %(message)s"
    )
    loop.train_and_evaluate(_config(), workdir)


def _logged_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line)["step"] for line in lines if "train/loss" in line]


def _complete_steps(workdir: pathlib.Path) -> list[int]:
    return checkpointing.saved_steps(workdir / checkpointing.LATEST_DIR)


def _writing(workdir: pathlib.Path) -> bool:
    """Whether a checkpoint is being written: orbax's temporary step directory, any directory
    beside the complete steps, exists."""
    directory = workdir / checkpointing.LATEST_DIR
    if not directory.is_dir():
        return False
    listed = list(directory.iterdir())  # before the steps: a step renamed between is listed
    complete = {str(step) for step in _complete_steps(workdir)}
    return any(p.name not in complete and p.is_dir() for p in listed)


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    """A forkserver context whose server has imported the trainer, with a compilation cache."""
    env = {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=1",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the server when it starts, below
    try:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["bkd_jax.training.loop", "bkd_jax.config_defaults"])
        multiprocessing.forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return context


def _start(context, workdir: pathlib.Path, log: pathlib.Path):
    process = context.Process(target=_train, args=(str(workdir), str(log)))
    process.start()
    return process


def _final_student(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    variables, _ = checkpointing.read_student(workdir / checkpointing.LATEST_DIR / str(STEPS))
    return {jax.tree_util.keystr(p): v for p, v in jax.tree.leaves_with_path(variables)}


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(forkserver, tmp_path):
    reference = tmp_path / "reference"
    process = _start(forkserver, reference, tmp_path / "reference.log")
    process.join(timeout=300)
    assert process.exitcode == 0, (tmp_path / "reference.log").read_text()[-3000:]

    rng = random.Random(0)
    workdir, log = tmp_path / "killed", tmp_path / "killed.log"
    kills_during_writes, restored = 0, []
    for trial in range(TRIALS):
        expected = max(_complete_steps(workdir), default=None)
        offset = log.stat().st_size if log.exists() else 0
        process = _start(forkserver, workdir, log)
        first = max(_logged_steps(workdir), default=0)
        deadline = time.monotonic() + 120
        # Half the trials kill as soon as a checkpoint write is under way, half at a random
        # moment once training has resumed (during a step, an evaluation or a write).
        delay = None if trial % 2 == 0 else rng.uniform(0.0, 0.6)
        while process.is_alive() and time.monotonic() < deadline:
            resumed = max(_logged_steps(workdir), default=0) > first
            if resumed and (_writing(workdir) if delay is None else True):
                time.sleep(delay or 0.0)
                break
            time.sleep(0.002)
        assert process.is_alive(), f"trial {trial}: the run ended: {log.read_text()[-3000:]}"
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
        assert process.exitcode == -signal.SIGKILL
        kills_during_writes += _writing(workdir)
        text = log.read_text()[offset:]
        match = re.search(r"Restored step (\d+) from ", text)
        if expected is None:
            assert match is None, text[-3000:]
        else:
            assert match and int(match.group(1)) == expected, (expected, text[-3000:])
            restored.append(expected)
        assert "unusable" not in text, text[-3000:]

    process = _start(forkserver, workdir, log)
    process.join(timeout=300)
    assert process.exitcode == 0, log.read_text()[-3000:]
    assert kills_during_writes >= 3, kills_during_writes
    assert len(restored) >= TRIALS // 2 and restored == sorted(restored), restored

    assert _losses(workdir) == _losses(reference)  # every step once, the same losses
    assert [s for s, _ in _losses(workdir)] == list(range(1, STEPS + 1))
    got, want = _final_student(workdir), _final_student(reference)
    assert got.keys() == want.keys() and len(want) > 10
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    results = [json.loads((w / loop.RESULTS_FILE).read_text()) for w in (workdir, reference)]
    assert results[0] == results[1]
