"""The report on hand-made workdirs: discovery, grouping, statistics, formats and plots.

Expected cells are computed here with numpy (float64, ddof=1) from the values the test
writes, and a few by hand, never with the report's own helpers.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from bkd_jax import published, report
from bkd_jax.config_defaults import base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
T, S = "resnet32x4", "resnet8x4"
BATCH = 64  # base_config's global batch


def write_run(
    path: pathlib.Path,
    *,
    method: str,
    teacher: str = T,
    student: str = S,
    seed: int = 0,
    top1: tuple[float, float],  # (last, best)
    top5: tuple[float, float] = (0.9, 0.91),
    teacher_top1: float | None = None,
    stones: dict[str, float] | None = None,
    seconds: tuple[float, ...] = (0.2,),
    schedule: str = "step",
    finished: bool = True,
    teacher_checkpoint: pathlib.Path | None = None,
) -> None:
    config = base_config("cifar100", teacher=teacher, student=student, method=method)
    config.seed = seed
    config.optim.schedule = schedule
    # Paths do not split rows: the teacher's, or an unrelated one per seed.
    config.teacher_checkpoint = str(teacher_checkpoint or f"/checkpoints/{teacher}/{seed}")
    config.log_every_steps = 10 + seed  # nor do logging settings
    last = {"eval/student/top1": top1[0], "eval/student/top5": top5[0], "step": 40, "epoch": 4.0}
    best = {"eval/student/top1": top1[1], "eval/student/top5": top5[1], "step": 30, "epoch": 3.0}
    if teacher_top1 is not None:
        last["eval/teacher/top1"] = best["eval/teacher/top1"] = teacher_top1
    last.update({f"eval/{name}/top1": value for name, value in (stones or {}).items()})
    results = {"steps": 40 if finished else 20, "total_steps": 40, "best": best, "last": last}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    if finished:
        (path / "results.json").write_text(json.dumps(results))
    lines = [
        {"step": 10 * (i + 1), "train/loss": 3.0 - i, "train/ce": 2.0 - i / 2,
         "train/epoch": i + 1.0, "train/seconds_per_step": s}
        for i, s in enumerate(seconds)
    ]  # fmt: skip
    lines.append({"step": 40, "eval/student/top1": top1[0], "eval/count": 10000.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


KD_LAST, KD_BEST = (0.7300, 0.7350, 0.7200), (0.7400, 0.7380, 0.7310)
KD_TOP5 = ((0.9200, 0.9210), (0.9300, 0.9310), (0.9250, 0.9260))
KD_SECONDS = ((0.5, 0.1, 0.2), (0.2, 0.2), (0.25,))  # medians 0.2, 0.2, 0.25
BKD_LAST, BKD_BEST = (0.7500, 0.7600), (0.7600, 0.7650)
STONES = {"stone3": (0.78, 0.79), "stone1": (0.60, 0.62), "stone2": (0.70, 0.71)}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("runs")
    teacher = root / "teachers" / T
    write_run(teacher, method="ce", teacher=T, student=T, top1=(0.7900, 0.7950))
    for seed in range(3):
        write_run(
            root / "kd" / f"seed{seed}", method="kd", seed=seed,
            top1=(KD_LAST[seed], KD_BEST[seed]), top5=KD_TOP5[seed], teacher_top1=0.795,
            seconds=KD_SECONDS[seed], teacher_checkpoint=teacher,
        )  # fmt: skip
    for seed in range(2):
        write_run(
            root / "blockkd" / f"seed{seed}", method="blockkd", seed=seed,
            top1=(BKD_LAST[seed], BKD_BEST[seed]), teacher_top1=0.795,
            stones={name: values[seed] for name, values in STONES.items()},
            teacher_checkpoint=teacher,
        )  # fmt: skip
    write_run(root / "ce" / "seed0", method="ce", top1=(0.7250, 0.7262))
    write_run(root / "kd_cosine" / "seed0", method="kd", top1=(0.7410, 0.7450), schedule="cosine")
    write_run(root / "dkd" / "seed0", method="dkd", top1=(0.7, 0.7), finished=False)
    return root


def cell(fractions) -> str:
    """'mean ± std' in %, numpy float64 and ddof=1; the value alone for one."""
    values = 100 * np.asarray(fractions, np.float64)
    if values.size == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def test_runs_are_found_in_table_order_and_unfinished_ones_skipped(runs_root):
    runs, skipped = report.find_runs([runs_root])
    names = [str(r.path.relative_to(runs_root)) for r in runs]
    assert names == [
        f"teachers/{T}", "ce/seed0", "kd/seed0", "kd/seed1", "kd/seed2", "kd_cosine/seed0",
        "blockkd/seed0", "blockkd/seed1",
    ]  # fmt: skip
    assert skipped == [runs_root / "dkd" / "seed0"]
    assert runs[0].teacher_run and not any(r.teacher_run for r in runs[1:])
    # A run folder itself works as well as a folder of runs.
    assert [r.path for r in report.find_runs([runs_root / "ce" / "seed0"])[0]] == [runs[1].path]
    with pytest.raises(FileNotFoundError):
        report.find_runs([runs_root / "nothing"])


def test_markdown_table_is_exact(runs_root):
    rows = report.summarize(report.find_runs([runs_root])[0])
    lines = report.markdown_table(rows).splitlines()
    assert lines[0] == (
        "| pair | method | settings | seeds | top-1 last | top-1 best | published | Δ best | "
        "top-5 last | top-5 best | teacher | stone1 | stone2 | stone3 | images/s |"
    )
    assert lines[1] == "|" + "---|" * 15
    pair = f"{T} -> {S}"
    # By hand: kd last (73.0, 73.5, 72.0) -> 72.83 ± 0.76; best (74.0, 73.8, 73.1) ->
    # 73.63 ± 0.47; published 73.33, so Δ = 73.6333 - 73.33 = +0.30.
    assert cell(KD_LAST) == "72.83 ± 0.76" and cell(KD_BEST) == "73.63 ± 0.47"
    kd_images = [BATCH / 0.2, BATCH / 0.2, BATCH / 0.25]  # 320, 320, 256
    kd_speed = f"{np.mean(kd_images):.0f} ± {np.std(kd_images, ddof=1):.0f}"
    assert kd_speed == "299 ± 37"
    kd_delta = 100 * np.mean(KD_BEST) - published.top1("cifar100", T, S, "kd")
    bkd_delta = ""  # no published Block-KD figure for this pair in mdistiller's README
    top5_last, top5_best = zip(*KD_TOP5, strict=True)
    assert lines[2:] == [
        f"| {T} | teacher |  | 1 | 79.00 | 79.50 | 79.42 | +0.08 | 90.00 | 91.00 |  |  |  |  | "
        "320 |",
        f"| {pair} | ce |  | 1 | 72.50 | 72.62 | 72.50 | +0.12 | 90.00 | 91.00 |  |  |  |  | 320 |",
        f"| {pair} | kd | optim.schedule=step | 3 | {cell(KD_LAST)} | {cell(KD_BEST)} | 73.33 | "
        f"{kd_delta:+.2f} | {cell(top5_last)} | {cell(top5_best)} | 79.50 ± 0.00 |  |  |  | "
        f"{kd_speed} |",
        f"| {pair} | kd | optim.schedule=cosine | 1 | 74.10 | 74.50 | 73.33 | +1.17 | 90.00 | "
        "91.00 |  |  |  |  | 320 |",
        f"| {pair} | blockkd |  | 2 | {cell(BKD_LAST)} | {cell(BKD_BEST)} |  | {bkd_delta} | "
        f"90.00 ± 0.00 | 91.00 ± 0.00 | 79.50 ± 0.00 | {cell(STONES['stone1'])} | "
        f"{cell(STONES['stone2'])} | {cell(STONES['stone3'])} | 320 ± 0 |",
    ]
    assert kd_delta == pytest.approx(0.3033, abs=1e-4)


def test_csv_and_json_carry_the_unformatted_numbers(runs_root):
    runs, skipped = report.find_runs([runs_root])
    rows = report.summarize(runs)
    table = list(csv.DictReader(io.StringIO(report.csv_table(rows))))
    assert [(r["label"], r["settings"], r["seeds"]) for r in table] == [
        ("teacher", "", "1"), ("ce", "", "1"), ("kd", "optim.schedule=step", "3"),
        ("kd", "optim.schedule=cosine", "1"), ("blockkd", "", "2"),
    ]  # fmt: skip
    kd = table[2]
    assert float(kd["top1_last_mean"]) == pytest.approx(100 * np.mean(KD_LAST), rel=1e-12)
    assert float(kd["top1_last_std"]) == pytest.approx(100 * np.std(KD_LAST, ddof=1), rel=1e-9)
    assert float(kd["published_top1"]) == 73.33 and table[4]["published_top1"] == ""
    assert table[1]["top1_last_std"] == ""  # one seed: no standard deviation
    assert float(table[4]["stone2_top1_mean"]) == pytest.approx(70.5)
    payload = json.loads(report.render(rows, "json", skipped))
    assert payload["skipped"] == [str(runs_root / "dkd" / "seed0")]
    assert [len(r["runs"]) for r in payload["rows"]] == [1, 1, 3, 1, 2]
    assert payload["rows"][4]["stone1_top1_std"] == pytest.approx(100 * np.std((0.6, 0.62), ddof=1))


def test_teachers_are_the_runs_students_distil_from(tmp_path):
    """A student with its teacher's architecture: its CE baseline is no teacher run."""
    teacher = tmp_path / "teachers" / "resnet8"
    write_run(teacher, method="ce", teacher="resnet8", student="resnet8", top1=(0.99, 0.99))
    for method in ("ce", "kd"):
        write_run(
            tmp_path / method, method=method, teacher="resnet8", student="resnet8",
            top1=(0.9, 0.9), teacher_checkpoint=teacher,
        )  # fmt: skip
    # Each alone looks like a teacher's own run: ce, teacher and student the same model.
    assert report.load_run(tmp_path / "ce").teacher_run
    runs, _ = report.find_runs([tmp_path])
    assert [(r.label, r.teacher_run) for r in runs] == [
        ("teacher", True), ("ce", False), ("kd", False),
    ]  # fmt: skip
    rows = report.summarize(runs)
    assert [(r["pair"], r["label"], r["settings"]) for r in rows] == [
        ("resnet8", "teacher", ""), ("resnet8 -> resnet8", "ce", ""),
        ("resnet8 -> resnet8", "kd", ""),
    ]  # fmt: skip


def test_curves_are_against_epoch_and_keep_the_last_line_of_a_repeated_step(tmp_path):
    write_run(tmp_path / "run", method="kd", top1=(0.5, 0.6), seconds=(0.1, 0.1))
    lines = [
        {"step": 10, "train/ce_student": 2.0, "train/loss": 5.0},
        {"step": 20, "train/ce_student": 1.5, "train/loss": 4.0},
        {"step": 20, "eval/student/top1": 0.5},
        # Resumed from step 10: step 20 again, with other values.
        {"step": 20, "train/ce_student": 1.4, "train/loss": 3.9},
        {"step": 20, "eval/student/top1": 0.6},
        {"step": 30, "train/ce_student": 1.0, "train/loss": 3.0},
    ]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curves = report.read_curves(report.load_run(tmp_path / "run"))
    # results.json's last evaluation is step 40 = epoch 4: 10 steps an epoch.
    assert curves == {
        "loss": [(1.0, 5.0), (2.0, 3.9), (3.0, 3.0)],
        "ce": [(1.0, 2.0), (2.0, 1.4), (3.0, 1.0)],
        "top1": [(2.0, 60.0)],
    }


def test_command_line_prints_the_table_and_draws_both_plots(runs_root, tmp_path):
    bars, curves = tmp_path / "bars.png", tmp_path / "curves.png"
    command = [sys.executable, "-m", "bkd_jax.report", str(runs_root), f"--plot={bars}"]
    command.append(f"--curves={curves}")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = report.summarize(report.find_runs([runs_root])[0])
    assert done.stdout.startswith(report.markdown_table(rows) + "\n" + report.legend(rows))
    assert "Skipped 1 unfinished runs" in done.stdout
    for path in (bars, curves):
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and np.std(image[..., :3]) > 0.05
    fails = subprocess.run(
        [sys.executable, "-m", "bkd_jax.report", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fails.returncode != 0
    assert fails.stderr.strip() == f"error: no finished runs under {tmp_path}"
    missing = subprocess.run(
        [sys.executable, "-m", "bkd_jax.report", str(tmp_path / "nowhere")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0
    assert missing.stderr.strip() == f"error: no such run or folder: {tmp_path / 'nowhere'}"


def test_metrics_by_step_skips_the_line_a_running_run_is_writing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "train/loss": 2.0}\n{"step": 1, "eval/top1": 0.5}\n{"step": 2, "train/lo'
    )
    assert report.metrics_by_step(tmp_path) == {1: {"train/loss": 2.0, "eval/top1": 0.5}}
