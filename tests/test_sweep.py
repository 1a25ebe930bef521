"""The sweep: its plan and commands, checks of the grid, and a real sweep on digits."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import types

import pytest

from bkd_jax import console, report, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


def _sweep(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [PY, "-m", "bkd_jax.sweep", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_teachers_then_seed_pair_method(tmp_path):
    root = tmp_path / "c100"
    done_dir = root / "vgg13_vgg8" / "kd" / "seed0"  # finished earlier: commented out
    done_dir.mkdir(parents=True)
    (done_dir / "results.json").write_text(json.dumps({"steps": 5, "total_steps": 5, "last": {}}))
    done = _sweep(
        "--config=configs/cifar100.py", "--pairs=resnet32x4:resnet8x4,vgg13:vgg8",
        "--methods=ce,kd", "--seeds=0,1", f"--root={root}",
        "--teacher_checkpoints=vgg13=/teachers/vgg13", "--extra=--config.num_epochs=2",
        "--extra=--config.dtype=bfloat16", "--dry_run",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    main = f"{PY} -m bkd_jax.main --config=configs/cifar100.py:"
    extra = " --config.num_epochs=2 --config.dtype=bfloat16"
    r32 = f" --config.teacher_checkpoint={root}/teachers/resnet32x4"
    v13 = " --config.teacher_checkpoint=/teachers/vgg13"
    assert done.stdout.splitlines() == [
        f"{main}teacher=resnet32x4,student=resnet32x4,method=ce "
        f"--workdir={root}/teachers/resnet32x4{extra}",
        f"{main}teacher=resnet32x4,student=resnet8x4,method=ce "
        f"--workdir={root}/resnet32x4_resnet8x4/ce/seed0 --config.seed=0{extra}",
        f"{main}teacher=resnet32x4,student=resnet8x4,method=kd "
        f"--workdir={root}/resnet32x4_resnet8x4/kd/seed0 --config.seed=0{r32}{extra}",
        f"{main}teacher=vgg13,student=vgg8,method=ce "
        f"--workdir={root}/vgg13_vgg8/ce/seed0 --config.seed=0{extra}",
        f"# finished: {main}teacher=vgg13,student=vgg8,method=kd "
        f"--workdir={root}/vgg13_vgg8/kd/seed0 --config.seed=0{v13}{extra}",
        f"{main}teacher=resnet32x4,student=resnet8x4,method=ce "
        f"--workdir={root}/resnet32x4_resnet8x4/ce/seed1 --config.seed=1{extra}",
        f"{main}teacher=resnet32x4,student=resnet8x4,method=kd "
        f"--workdir={root}/resnet32x4_resnet8x4/kd/seed1 --config.seed=1{r32}{extra}",
        f"{main}teacher=vgg13,student=vgg8,method=ce "
        f"--workdir={root}/vgg13_vgg8/ce/seed1 --config.seed=1{extra}",
        f"{main}teacher=vgg13,student=vgg8,method=kd "
        f"--workdir={root}/vgg13_vgg8/kd/seed1 --config.seed=1{v13}{extra}",
    ]


def _module(pairs=None):
    module = types.SimpleNamespace(get_config=lambda arg: None)
    if pairs is not None:
        module.PAIRS = pairs
    return module


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(methods=["kdd"]), "unknown method 'kdd'"),
        (dict(seeds=[0, 0]), "repeated"),
        (dict(pairs=[]), "needs a pair"),
        (dict(teacher_checkpoints={"vgg13": "/t"}), "vgg13 has a checkpoint but is no pair's"),
        (dict(module=_module(pairs=(("vgg13", "vgg8"),))), "no recipe for pair resnet56:resnet20"),
    ],
)
def test_bad_grids_are_refused_before_any_run(tmp_path, kwargs, message):
    args = dict(
        module=_module(), root=tmp_path, pairs=[("resnet56", "resnet20")], methods=["kd"],
        seeds=[0],
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        sweep.plan(**{**args, **kwargs})


def test_pairs_and_checkpoints_parse():
    assert sweep.parse_pairs(["a:b", "c:d"]) == [("a", "b"), ("c", "d")]
    assert sweep.parse_checkpoints(["a=/x=y"]) == {"a": "/x=y"}
    with pytest.raises(ValueError, match="TEACHER:STUDENT"):
        sweep.parse_pairs(["ab"])
    with pytest.raises(ValueError, match="TEACHER=PATH"):
        sweep.parse_checkpoints(["a"])


DIGITS = ["--config=configs/demo.py", "--pairs=resnet8:resnet8", "--extra=--config.num_epochs=1"]
NAMES = ["teachers/resnet8", "resnet8_resnet8/kd/seed0", "resnet8_resnet8/kd/seed1"]


def _progress(out: str) -> list[str]:
    """The sweep's progress lines without their times."""
    lines = [line for line in out.splitlines() if line.startswith("[")]
    return [re.sub(r" \(.* elapsed\)| in \d+:\d\d:\d\d", "", line) for line in lines]


def test_sweep_on_digits_finishes_skips_when_rerun_and_resumes(tmp_path):
    """A teacher, then kd x 2 seeds, one epoch each; then the same command twice.

    (The order of seeds, pairs and methods is the dry run's test.)
    """
    root = tmp_path / "digits"
    args = [*DIGITS, "--methods=kd", "--seeds=0,1", f"--root={root}"]
    done = _sweep(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _progress(done.stdout) == [
        f"[{i}/3] {name}: {s}" for i, name in enumerate(NAMES, 1) for s in ("starting", "done")
    ]
    runs = [report.load_run(root / name) for name in NAMES]
    assert [(r.method, r.config["seed"]) for r in runs] == [("ce", 0), ("kd", 0), ("kd", 1)]
    assert all(r.config["num_epochs"] == 1 and r.results["steps"] > 0 for r in runs)
    assert {r.config["teacher_checkpoint"] for r in runs[1:]} == {str(root / NAMES[0])}
    # Distilled from the teacher trained first: they evaluate its best checkpoint.
    teacher_best = runs[0].results["best"][report.TOP1]
    assert {r.results["last"][report.TEACHER_TOP1] for r in runs[1:]} == {teacher_best}
    table = report.markdown_table(report.summarize(report.find_runs([root])[0]))
    assert table in done.stdout
    assert [line.split(" | ")[1:3] for line in table.splitlines()[2:]] == [
        ["teacher", "1"], ["kd", "2"],
    ]  # fmt: skip

    again = _sweep(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [f"[{i}/3] {name}: finished earlier, skipped" for i, name in enumerate(NAMES, 1)]
    assert _progress(again.stdout) == skipped
    assert table in again.stdout

    # An interrupted run (here: its results gone, its checkpoints kept) resumes.
    (root / NAMES[2] / "results.json").unlink()
    module = console.load_config_file(ROOT / "configs" / "demo.py")
    plan = sweep.plan(module, root, [("resnet8", "resnet8")], ["kd"], [0, 1])
    commands = [sweep.command(r, "configs/demo.py", ["--config.num_epochs=1"]) for r in plan]
    lines: list[str] = []
    sweep.execute(plan, commands, env=sweep.subprocess_env(root), log=lines.append)
    assert _progress("\n".join(lines)) == [
        *skipped[:2],
        f"[3/3] {NAMES[2]}: resuming",
        f"[3/3] {NAMES[2]}: done",
    ]
    assert report.load_run(root / NAMES[2]).results == runs[2].results


def test_sweep_of_a_two_view_method_trains_on_both_views_and_reports_it(tmp_path):
    """MLKD through the sweep: its runs get the strong view from the recipe, not the
    command line, train on both views and land in the report as their own row."""
    root = tmp_path / "digits"
    done = _sweep(*DIGITS, "--methods=mlkd", "--seeds=0", f"--root={root}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "strong_view" not in done.stdout  # no command line carries it
    run = report.load_run(root / "resnet8_resnet8" / "mlkd" / "seed0")
    assert run.method == "mlkd" and run.config["dataset"]["strong_view"] == "randaugment"
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    strong = [r["train/ce_strong"] for r in records if "train/ce_strong" in r]
    assert strong and all(v > 0 for v in strong)  # the strong view's own cross-entropy
    table = report.markdown_table(report.summarize(report.find_runs([root])[0]))
    assert [line.split(" | ")[1:3] for line in table.splitlines()[2:]] == [
        ["teacher", "1"], ["mlkd", "1"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "why"), [(3, "failed (exit code 3)"), (0, "stopped before its last step")]
)
def test_sweep_stops_at_a_failed_or_unfinished_run_and_says_how_to_go_on(tmp_path, code, why):
    plan = [sweep.PlannedRun(f"run{i}", tmp_path / f"run{i}", "method=kd") for i in range(2)]
    commands = [[PY, "-c", f"raise SystemExit({code})"], [PY, "-c", "raise SystemExit(4)"]]
    lines: list[str] = []
    with pytest.raises(sweep.SweepError) as error:
        sweep.execute(plan, commands, log=lines.append)
    assert _progress("\n".join(lines)) == ["[1/2] run0: starting"]  # run1 never starts
    assert str(error.value).startswith(f"[1/2] run0 {why}.\n  command: {PY} -c ")
    assert f"workdir: {tmp_path}/run0" in str(error.value)
    assert "rerun the same sweep command" in str(error.value)
