"""The real multi-process trainer: `python -m bkd_jax.main --multihost` as 2 processes on
localhost (gloo collectives), against 1 process.

One distillation run is stopped by SIGTERM to both processes (they must agree on the step
and both save it), resumed, crashed by SIGKILL to one process (the other must exit with an
error within the heartbeat timeout instead of hanging), and resumed to the end. Every
step's loss and the final parameters must equal the single-process run's: the data stream
is a function of (seed, step) alone, whatever the number of processes.

The stress tests start the digits teacher's run as 2 processes (one CPU device each) again
and again, fresh and resumed, beside a generator of CPU load: each run must start, finish
and give the one-process losses. They take minutes, so they run only when asked for:
BKD_JAX_STRESS=short (2 fresh runs, 1 resumed) or BKD_JAX_STRESS=full (10 fresh, 5 resumed).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax import models
from bkd_jax.training import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30
HEARTBEAT_SECONDS = 10  # --heartbeat_timeout_seconds: the bound on noticing a dead process
CONFIG = """
from bkd_jax.config_defaults import base_config


def get_config():
    return base_config("digits", teacher="resnet8", student="resnet8", method="kd")
"""
FLAGS = [
    f"--config.num_train_steps={STEPS}",
    "--config.global_batch_size=16",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=5",
    "--config.eval_every_epochs=100",  # one evaluation, at the end
    "--config.tensorboard=False",
    f"--heartbeat_timeout_seconds={HEARTBEAT_SECONDS}",
]


def _env(devices: int, cache: pathlib.Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # The three two-process runs compile the same programs: the later ones load them.
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=1",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "PYTHONPATH": str(REPO),
        **extra,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distill_args(root: pathlib.Path) -> list[str]:
    """The distillation run's flags: `root`'s config file and teacher, `FLAGS`."""
    return [
        f"--config={root / 'config.py'}", f"--config.teacher_checkpoint={root / 'teacher'}",
        *FLAGS,
    ]  # fmt: skip


class _Run:
    """`python -m bkd_jax.main ARGS` as `processes` processes, each logging to its own file
    in `root`, with `root/jax_cache` as their compilation cache."""

    def __init__(
        self,
        root: pathlib.Path,
        name: str,
        processes: int,
        devices: int,
        args: list[str],
        workdir: pathlib.Path | None = None,
    ):
        self.workdir, self.logs, self.procs = workdir or root / "workdir", [], []
        port = _free_port()
        command = [sys.executable, "-m", "bkd_jax.main", f"--workdir={self.workdir}", *args]
        for index in range(processes):
            multi = {
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(processes),
                "JAX_PROCESS_ID": str(index),
            }
            log = root / f"{name}.{index}.log"
            with log.open("w") as out:
                self.procs.append(
                    subprocess.Popen(
                        command + (["--multihost"] if processes > 1 else []),
                        cwd=REPO,
                        env=_env(devices, root / "jax_cache", **(multi if processes > 1 else {})),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            self.logs.append(log)

    def output(self, index: int = 0) -> str:
        return self.logs[index].read_text()

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [proc.returncode for proc in self.procs]

    def wait_for_step(self, step: int) -> None:
        deadline = time.monotonic() + 240
        while max(_logged(self.workdir), default=0) < step:
            if any(p.poll() is not None for p in self.procs):
                pytest.fail(f"a process ended before step {step}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no step {step} after 240 s:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


def _logged(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line)["step"] for line in lines if "train/loss" in line]


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _final_student(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    variables, _ = checkpointing.read_student(workdir / checkpointing.LATEST_DIR / str(STEPS))
    return {jax.tree_util.keystr(p): v for p, v in jax.tree.leaves_with_path(variables)}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A config file and a (randomly initialised) resnet8 teacher in two run folders."""
    net = models.get_model("resnet8", 10)
    teacher = jax.tree.map(
        np.asarray, net.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3), jnp.float32))
    )
    roots = {}
    for name in ("one_process", "two_processes"):
        root = tmp_path_factory.mktemp(name)
        (root / "config.py").write_text(CONFIG)
        checkpointing.save_variables(root / "teacher", teacher, {"model": "resnet8"})
        roots[name] = root
    return roots


def test_two_processes_preempted_crashed_and_resumed_match_one_process(roots):
    reference = _Run(roots["one_process"], "reference", 1, 4, _distill_args(roots["one_process"]))
    root = roots["two_processes"]
    runs = []
    try:
        # 1. SIGTERM to both: they agree on one step, both save it and exit with 143
        # (128 + SIGTERM), the status of a run stopped before its end.
        runs.append(_Run(root, "first", 2, 2, _distill_args(root)))
        runs[-1].wait_for_step(3)
        for proc in runs[-1].procs:
            proc.send_signal(signal.SIGTERM)
        assert runs[-1].wait() == [143, 143], runs[-1].output()[-4000:]
        stopped = max(_logged(root / "workdir"))
        for index in (0, 1):
            assert f"Preempted: saved step {stopped}; rerun" in runs[-1].output(index)
        assert checkpointing.saved_steps(root / "workdir" / "checkpoints")[-1] == stopped

        # 2. Resumed, then one process killed: the other stops with an error, in bounded time.
        runs.append(_Run(root, "second", 2, 2, _distill_args(root)))
        runs[-1].wait_for_step(stopped + 6)
        assert f"Resuming from step {stopped}." in runs[-1].output(0)
        runs[-1].procs[1].kill()
        killed_at = time.monotonic()
        runs[-1].procs[0].wait(timeout=HEARTBEAT_SECONDS + 60)
        assert time.monotonic() - killed_at < HEARTBEAT_SECONDS + 60
        assert runs[-1].procs[0].returncode != 0
        # Whichever notices first says why: the failed collective (bkd_jax's message), or
        # JAX's coordination service missing the dead process's heartbeats (JAX's own).
        assert any(
            why in runs[-1].output(0)
            for why in (
                "most likely because another process died",
                "This most likely indicates that another task died",
            )
        ), runs[-1].output(0)[-4000:]

        # 3. Resumed to the end.
        runs.append(_Run(root, "third", 2, 2, _distill_args(root)))
        assert runs[-1].wait() == [0, 0], runs[-1].output()[-4000:]
        assert reference.wait() == [0], reference.output()[-4000:]
    finally:
        for run in [reference, *runs]:
            run.kill()

    got, want = _losses(root / "workdir"), _losses(roots["one_process"] / "workdir")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=0, atol=1e-5)
    got, want = (_final_student(r / "workdir") for r in (root, roots["one_process"]))
    assert got.keys() == want.keys() and len(want) > 10
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-5, err_msg=key)


# The start-up and shut-down stress test: the digits teacher's run as 2 processes of one
# CPU device each, on a machine kept busy by a load generator.
STRESS_STEPS = 20
STRESS_ARGS = [
    "--config=configs/demo.py:role=teacher",
    f"--config.num_train_steps={STRESS_STEPS}",
    "--config.eval_every_epochs=1",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=5",  # steps a resumed run starts from
    "--config.keep_checkpoints=4",
]
STRESS_VARIABLE = "BKD_JAX_STRESS"


@contextlib.contextmanager
def _cpu_load(workers: int, seconds: float):
    """`workers` busy-looping processes beside the block; each stops by itself after
    `seconds` at most, and all are killed when the block ends."""
    burn = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(workers)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _stop_at(workdir: pathlib.Path, step: int) -> int:
    """Makes a finished `workdir` look stopped after `step`: later checkpoints and the
    results go. Returns the step a rerun resumes from (the newest checkpoint left)."""
    (workdir / "results.json").unlink()
    left = []
    for saved in checkpointing.saved_steps(workdir / checkpointing.LATEST_DIR):
        if saved > step:
            shutil.rmtree(workdir / checkpointing.LATEST_DIR / str(saved))
        else:
            left.append(saved)
    return max(left)


def _check_finished(run: _Run, want: dict[int, float]) -> None:
    """Both processes ended well, every step's loss is the one-process run's, and nothing
    half-written (a temporary file or checkpoint) is left in the workdir."""
    codes = run.wait(timeout=600)
    assert codes == [0, 0], f"{run.workdir}: exit codes {codes}\n" + "\n".join(
        f"--- process {i}:\n{run.output(i)[-3000:]}" for i in (0, 1)
    )
    got = _losses(run.workdir)
    assert sorted(got) == list(range(1, STRESS_STEPS + 1)), run.workdir
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=0, atol=1e-5)
    assert json.loads((run.workdir / "results.json").read_text())["steps"] == STRESS_STEPS
    assert not [p for p in run.workdir.rglob("*") if "tmp" in p.name], run.workdir


def _stress(root: pathlib.Path, fresh: int, resumed: int) -> None:
    """`fresh` two-process runs in fresh workdirs, then `resumed` reruns of the first one
    stopped at various steps, all beside a CPU load of 2 busy processes."""
    reference = _Run(root, "reference", 1, 2, STRESS_ARGS, root / "reference")
    assert reference.wait(timeout=600) == [0], reference.output()[-4000:]
    want = _losses(root / "reference")
    runs = []
    try:
        with _cpu_load(workers=2, seconds=1800):
            for index in range(fresh):
                runs.append(_Run(root, f"fresh{index}", 2, 1, STRESS_ARGS, root / f"w{index}"))
                _check_finished(runs[-1], want)
            stops = itertools.islice(itertools.cycle((15, 10, 5)), resumed)
            for index, stop in enumerate(stops):
                start = _stop_at(root / "w0", stop)
                runs.append(_Run(root, f"resumed{index}", 2, 1, STRESS_ARGS, root / "w0"))
                _check_finished(runs[-1], want)
                assert f"Resuming from step {start}." in runs[-1].output(0)
    finally:
        for run in [reference, *runs]:
            run.kill()


def _stress_level() -> str:
    return os.environ.get(STRESS_VARIABLE, "")


@pytest.mark.skipif(
    _stress_level() != "short",
    reason=f"long (8 min on a busy 2-core machine): set {STRESS_VARIABLE}=short to run it",
)
def test_two_processes_start_and_finish_under_load(tmp_path):
    """2 fresh runs and 1 resumed run, every one finishing with the one-process losses."""
    _stress(tmp_path, fresh=2, resumed=1)


@pytest.mark.skipif(
    _stress_level() != "full",
    reason=f"long (32 min on a busy 2-core machine): set {STRESS_VARIABLE}=full to run it",
)
def test_two_processes_start_and_finish_under_load_many_times(tmp_path):
    """The bar of 10 fresh runs in a row and 5 resumed ones."""
    _stress(tmp_path, fresh=10, resumed=5)
