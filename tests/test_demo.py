"""The demo: its config, the table's arithmetic, and a shortened study end to end."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from bkd_jax import console, demo, report
from bkd_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
get_config = console.load_config_file(ROOT / "configs" / "demo.py").get_config


def test_teacher_config_trains_on_all_digits():
    config = get_config("role=teacher")
    assert (config.teacher, config.student, config.distill.method) == ("resnet8",) * 2 + ("ce",)
    assert config.dataset.name == "digits" and config.dataset.max_train_examples is None
    assert config.num_epochs == 10
    assert config.optim.decay_epochs == (6, 8, 9)  # 10 * (150, 180, 210) / 240, rounded
    loop.validate_config(config)


@pytest.mark.parametrize("method", demo.DEFAULT_METHODS)
def test_student_configs_are_valid_and_share_everything_but_the_method(method):
    config = get_config(f"method={method},seed=2")
    config.teacher_checkpoint = "/somewhere"
    loop.validate_config(config)
    assert config.seed == 2 and config.distill.method == method
    assert config.dataset.max_train_examples == 150 and config.global_batch_size == 32
    assert config.num_epochs == 30
    assert config.optim.decay_epochs == (19, 22, 26)  # 30 * (150, 180, 210) / 240, rounded
    if "warmup_epochs" in config.distill[method]:
        assert config.distill[method].warmup_epochs == 2  # 30 * 20 / 240 = 2.5, rounded to even
    others = get_config("method=ce,seed=2").to_dict()
    mine = config.to_dict()
    assert {k for k in mine if mine[k] != others[k]} <= {"distill", "teacher_checkpoint"}


def test_quick_config_runs_one_epoch():
    assert get_config("method=kd,quick=1").num_epochs == 1
    assert get_config("role=teacher,quick=1").num_epochs == 1


@pytest.mark.parametrize(("arg", "message"), [("methd=kd", "methd"), ("role=pupil", "pupil")])
def test_config_rejects_bad_arguments(arg, message):
    with pytest.raises(ValueError, match=message):
        get_config(arg)


def test_run_plan_is_teacher_then_seed_by_seed():
    assert demo.run_plan(["ce", "kd"], 2) == [
        ("teacher", 0), ("ce", 0), ("kd", 0), ("ce", 1), ("kd", 1),
    ]  # fmt: skip
    assert demo.run_name("kd", 1) == "kd_seed1" and demo.run_name("teacher", 0) == "teacher"
    assert demo.config_argument("kd", 1, quick=True) == "method=kd,seed=1,quick=1"
    with pytest.raises(ValueError, match="kdd"):
        demo.run_plan(["kdd"], 1)
    with pytest.raises(ValueError, match="seeds"):
        demo.run_plan(["kd"], 0)


def _run_quick_demo(workdir: pathlib.Path) -> str:
    command = [sys.executable, "-m", "bkd_jax.demo", f"--workdir={workdir}", "--quick"]
    command += ["--seeds=2", "--methods=ce,blockkd_lite"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quick_demo_writes_results_table_and_plot_and_resumes(tmp_path):
    """Teacher + 2 methods x 2 seeds, one epoch each; then the same command again."""
    out = _run_quick_demo(tmp_path)
    names = ["teacher", "ce_seed0", "blockkd_lite_seed0", "ce_seed1", "blockkd_lite_seed1"]
    assert [line.split(":")[0] for line in out.splitlines() if "test top-1" in line] == [
        f"[{i}/5] {n}" for i, n in enumerate(names, 1)
    ]
    results = json.loads((tmp_path / demo.RESULTS_FILE).read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == names
    for name, run in runs.items():
        assert run["steps"] == run["total_steps"] == (22 if name == "teacher" else 4)
        assert run["last"]["eval/count"] == 360
        stones = {k for k in run["last"] if k.startswith("eval/stone") and k.endswith("top1")}
        lite = name.startswith("blockkd_lite")
        assert stones == ({"eval/stone2/top1", "eval/stone3/top1"} if lite else set())
        for value in [run["best"][demo.TOP1], *(run["last"][k] for k in stones)]:
            assert 0 <= value <= 1
        assert run["seconds"] > 0
    # One epoch on 1437 digits already puts the teacher far above chance (10%).
    assert runs["teacher"]["best"][demo.TOP1] > 0.5
    # Distilled students evaluate the teacher too: the checkpoint they loaded is its best.
    for name in ("blockkd_lite_seed0", "blockkd_lite_seed1"):
        teacher = runs[name]["last"]["eval/teacher/top1"]
        assert math.isclose(teacher, runs["teacher"]["best"][demo.TOP1], abs_tol=1e-6)

    # The table is bkd_jax.report's of the five runs, one row per method.
    table = (tmp_path / demo.TABLE_FILE).read_text()
    runs = demo.report_runs(tmp_path, results["runs"])
    assert table == report.markdown_table(report.summarize(runs))
    assert results["table"] == json.loads(json.dumps(report.summarize(runs)))
    lines = table.splitlines()
    assert lines[0].startswith("| pair | method | seeds | top-1 last | top-1 best |")
    assert [line.split(" | ")[:3] for line in lines[2:]] == [
        ["| resnet8", "teacher", "1"],
        ["| resnet8 -> resnet8", "ce", "2"],
        ["| resnet8 -> resnet8", "blockkd_lite", "2"],
    ]
    assert out.rstrip().splitlines()[-1].startswith("Written: ")
    assert table in out
    # The legend explains the columns shown (stepping-stones), not those left out.
    assert report.legend(report.summarize(runs)) in out
    assert "stoneK: stepping-stone K" in out
    assert "published:" not in out and "Δ best" not in out

    image = matplotlib.image.imread(tmp_path / demo.PLOT_FILE)
    assert image.shape[1] > 2 * image.shape[0] > 600  # three panels side by side
    assert np.std(image[..., :3]) > 0.05

    again = _run_quick_demo(tmp_path)
    assert again.count("(finished earlier)") == 5
    rerun = json.loads((tmp_path / demo.RESULTS_FILE).read_text())
    assert rerun["runs"] == results["runs"]  # same summaries and the first run's seconds
