r"""A grid of runs from one command: teachers, then every pair x method x seed.

    python -m bkd_jax.sweep --config=configs/cifar100.py \
        --pairs=resnet32x4:resnet8x4,vgg13:vgg8 --methods=kd,dkd,blockkd --seeds=0,1,2 \
        --root=runs/c100 [--teacher_checkpoints=vgg13=teachers/vgg13,...] [--dry_run] \
        [--extra=--config.dataset.data_dir=$TFDS_DATA_DIR --extra=...]

Every run is one `python -m bkd_jax.main` process with the config file's arguments
`teacher=T,student=S,method=M` (a teacher's own run: `student=T,method=ce`), the seed as
`--config.seed=N`, and the `--extra` flags last. Workdirs under `--root`:

    teachers/T/          teacher T trained alone (the config's seed), unless
                         `--teacher_checkpoints` gives a checkpoint for T (from
                         `python -m bkd_jax.convert` or another run)
    T_S/M/seedN/         student S distilled from T by method M with seed N

Order: the teachers first (every student of T needs T), then seed by seed, pair by pair,
method by method, so a table of every method with one seed exists early. A run whose
workdir holds complete results is skipped; an interrupted one resumes from its latest
checkpoint (the trainer's resume), so after any stop, rerunning the same command
continues the sweep. A finished run is never retrained, so to change settings use another
`--root` (the trainer refuses to resume a workdir with a different config). The sweep stops
at the first run that fails or ends unfinished (preempted), saying which and how to go on,
and at the end prints `bkd_jax.report`'s table of the runs under `--root`.

Runs go one after another, each on every accelerator its process sees. Spreading runs over
device groups is not built in; start one sweep per group with its own
CUDA_VISIBLE_DEVICES and `--root` (or the same root and disjoint `--pairs`).
Subprocesses share a persistent compilation cache in `--root/jax_cache` unless
JAX_COMPILATION_CACHE_DIR is set.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType

from absl import app, flags

from bkd_jax import distillers, report
from bkd_jax.console import load_config_file
from bkd_jax.training import config_guard

TEACHERS_DIR = "teachers"


def config_argument(
    module: ModuleType, teacher: str, student: str, method: str, teacher_run: bool
) -> str:
    """The config file's arguments of one run.

    A teacher's own run is `teacher=T,student=T,method=ce` unless the config file says
    otherwise with a `teacher_argument(teacher)` function.
    """
    if teacher_run and hasattr(module, "teacher_argument"):
        return module.teacher_argument(teacher)
    if teacher_run:
        return f"teacher={teacher},student={teacher},method=ce"
    return f"teacher={teacher},student={student},method={method}"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of the grid: where it goes and what makes it."""

    name: str
    workdir: pathlib.Path
    config_arg: str
    seed: int | None = None  # None: the config's own (teachers)
    teacher_checkpoint: str | None = None


def parse_pairs(items: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        teacher, sep, student = item.partition(":")
        if not (sep and teacher and student):
            raise ValueError(f"a pair is TEACHER:STUDENT, got {item!r}")
        pairs.append((teacher, student))
    return pairs


def parse_checkpoints(items: Sequence[str]) -> dict[str, str]:
    checkpoints = {}
    for item in items:
        teacher, sep, path = item.partition("=")
        if not (sep and teacher and path):
            raise ValueError(f"a teacher checkpoint is TEACHER=PATH, got {item!r}")
        checkpoints[teacher] = path
    return checkpoints


def _check_grid(known_pairs, pairs, methods, seeds, checkpoints) -> None:
    """ValueError naming every problem of the grid's pairs, methods, seeds, checkpoints."""
    problems = []
    if known_pairs is not None:
        problems += [f"no recipe for pair {t}:{s}" for t, s in pairs if (t, s) not in known_pairs]
    problems += [f"unknown method {m!r}" for m in methods if m not in distillers.available()]
    teachers = {t for t, _ in pairs}
    orphans = sorted(checkpoints.keys() - teachers)
    problems += [f"{t} has a checkpoint but is no pair's teacher" for t in orphans]
    if not (pairs and methods and seeds):
        problems.append("the grid needs a pair, a method and a seed")
    if len(set(pairs)) < len(pairs) or len(set(seeds)) < len(seeds):
        problems.append("a pair or seed is repeated")
    if problems:
        known = [f"methods {', '.join(distillers.available())}"]
        if known_pairs is not None:
            known.append(f"pairs {', '.join(f'{t}:{s}' for t, s in known_pairs)}")
        raise ValueError(f"{'; '.join(problems)} (known: {'; '.join(known)})")


def plan(
    module: ModuleType,
    root: pathlib.Path,
    pairs: Sequence[tuple[str, str]],
    methods: Sequence[str],
    seeds: Sequence[int],
    teacher_checkpoints: dict[str, str] | None = None,
) -> list[PlannedRun]:
    """Every run in order: teachers without a given checkpoint, then seed, pair, method.

    Pairs, methods and checkpoints are checked first: against the config's `PAIRS` (when
    it has them), the registered methods, and by building each run's config.
    """
    checkpoints = dict(teacher_checkpoints or {})
    _check_grid(getattr(module, "PAIRS", None), pairs, methods, seeds, checkpoints)
    runs = []
    for teacher in dict.fromkeys(t for t, _ in pairs):
        if teacher not in checkpoints:
            workdir = root / TEACHERS_DIR / teacher
            arg = config_argument(module, teacher, teacher, "ce", teacher_run=True)
            runs.append(PlannedRun(f"{TEACHERS_DIR}/{teacher}", workdir, arg))
            checkpoints[teacher] = str(workdir)
    for seed in seeds:
        for teacher, student in pairs:
            for method in methods:
                name = f"{teacher}_{student}/{method}/seed{seed}"
                arg = config_argument(module, teacher, student, method, teacher_run=False)
                checkpoint = None if method == "ce" else checkpoints[teacher]
                runs.append(PlannedRun(name, root / name, arg, seed, checkpoint))
    for run in runs:
        module.get_config(run.config_arg)  # a bad name fails here, before any training
    return runs


def command(run: PlannedRun, config_file: str, extra: Sequence[str] = ()) -> list[str]:
    """The `python -m bkd_jax.main` command line of `run`."""
    cmd = [sys.executable, "-m", "bkd_jax.main", f"--config={config_file}:{run.config_arg}"]
    cmd.append(f"--workdir={run.workdir}")
    if run.seed is not None:
        cmd.append(f"--config.seed={run.seed}")
    if run.teacher_checkpoint is not None:
        cmd.append(f"--config.teacher_checkpoint={run.teacher_checkpoint}")
    return cmd + list(extra)


def _clock(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


class SweepError(RuntimeError):
    """A run failed or stopped early; the message says which and how to continue."""


def execute(
    runs: Sequence[PlannedRun],
    commands: Sequence[list[str]],
    *,
    env: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Runs, resumes or skips each run in order; SweepError at the first that fails."""
    start = time.monotonic()
    total = len(runs)
    for number, (run, cmd) in enumerate(zip(runs, commands, strict=True), 1):
        head = f"[{number}/{total}] {run.name}"
        if report.is_finished(run.workdir):
            log(f"{head}: finished earlier, skipped")
            continue
        resuming = (run.workdir / config_guard.CONFIG_FILE).exists()
        what = "resuming" if resuming else "starting"
        log(f"{head}: {what} ({_clock(time.monotonic() - start)} elapsed)")
        run_start = time.monotonic()
        code = subprocess.run(cmd, env=env, check=False).returncode
        if code != 0 or not report.is_finished(run.workdir):
            why = f"failed (exit code {code})" if code else "stopped before its last step"
            raise SweepError(
                f"{head} {why}.\n  command: {shlex.join(cmd)}\n  workdir: {run.workdir}\n"
                "Its output is above. Once the cause is fixed, rerun the same sweep command: "
                "finished runs are skipped and this one resumes from its last checkpoint."
            )
        took, elapsed = time.monotonic() - run_start, time.monotonic() - start
        log(f"{head}: done in {_clock(took)} ({_clock(elapsed)} elapsed)")


def subprocess_env(root: pathlib.Path) -> dict[str, str]:
    """This process's environment, with a compilation cache shared by the runs."""
    env = dict(os.environ)
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def define_flags() -> None:
    flags.DEFINE_string("config", None, "Config file (configs/*.py).", required=True)
    flags.DEFINE_list("pairs", None, "TEACHER:STUDENT pairs.", required=True)
    flags.DEFINE_list("methods", None, "Methods, in table order.", required=True)
    flags.DEFINE_list("seeds", ["0"], "Seeds of every student run.")
    flags.DEFINE_string("root", None, "Folder of the sweep's workdirs.", required=True)
    flags.DEFINE_list("teacher_checkpoints", [], "TEACHER=PATH: distil from PATH, no training.")
    flags.DEFINE_bool("dry_run", False, "Print the commands in order (finished ones commented).")
    flags.DEFINE_multi_string("extra", [], "A flag for every run, e.g. --config.num_epochs=1.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    root = pathlib.Path(args.root).resolve()  # absolute: the report matches teacher paths
    module = load_config_file(args.config)
    try:
        runs = plan(
            module,
            root,
            parse_pairs(args.pairs),
            args.methods,
            [int(s) for s in args.seeds],
            parse_checkpoints(args.teacher_checkpoints),
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    commands = [command(run, args.config, args.extra) for run in runs]
    if args.dry_run:
        for run, cmd in zip(runs, commands, strict=True):
            print(("# finished: " if report.is_finished(run.workdir) else "") + shlex.join(cmd))
        return
    try:
        execute(runs, commands, env=subprocess_env(root))
    except SweepError as e:
        print(f"Sweep stopped: {e}", file=sys.stderr)
        sys.exit(1)
    found, skipped = report.find_runs([root])
    print("\n" + report.render(report.summarize(found), "md", skipped), end="")


if __name__ == "__main__":
    define_flags()
    app.run(main)
