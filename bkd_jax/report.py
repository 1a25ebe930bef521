r"""From run workdirs to the paper's table: the runs, their statistics, tables and plots.

    python -m bkd_jax.report RUNS... [--format=md|csv|json] [--plot=FILE.png] \
        [--curves=FILE.png]

RUNS are workdirs of `python -m bkd_jax.main` or folders holding them (a `bkd_jax.sweep`
root, say), searched recursively. The reporting protocol:

- A run is a folder with `config.json`; it counts once its `results.json` says it trained
  all its steps. Unfinished and evaluation-only runs are listed as skipped.
- Runs whose configs are equal but for the seed (and paths and logging settings,
  `IGNORED_KEYS`) are seeds of one experiment: one row. Rows sharing a pair and method
  but not their settings show the settings they differ in.
- Every figure is a mean over the row's seeds, ± the sample standard deviation (ddof=1);
  with one seed, the value alone. Accuracies are in %.
- "last" is the student's top-1 (top-5) at the final evaluation: the headline figure.
  "best" is its best top-1 over all evaluations, and the top-5 of that same evaluation;
  best-over-epochs is what mdistiller reports (`best_acc` in mdistiller/engine/trainer.py),
  so "published" (`bkd_jax.published`) and "Δ best" (our best mean − published) set our
  best beside theirs.
- Text runs (`bkd_jax.text_train`) add GLUE's other metrics (F1, Matthews, Pearson,
  Spearman; STS-B has no top-1) and the student's figures on further evaluation splits
  (MNLI mismatched: "validation_mismatched top1 last").
- "teacher" is the teacher's top-1 as the distilled runs evaluated it; "stoneK" stepping-
  stone K's top-1 at the last evaluation (Block-KD runs).
- "images/s" is the global batch size over the median of the logged
  `train/seconds_per_step`, mean over seeds. Those are wall-clock times between logged
  steps, so the first includes compilation and any evaluation or checkpoint in between
  counts: a measure of the run, not of the step (that is `bkd_jax.bench`).

The functions below are the pieces: `find_runs`, `load_run`, `summarize`, the three
formats, `draw_bars` / `draw_curves` on Matplotlib axes and the two figures built from
them. `bkd_jax.demo` makes its table and plot with the same functions.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import app, flags

from bkd_jax import distillers, published
from bkd_jax.training import config_guard, run_files
from bkd_jax.training.metric_writers import METRICS_FILE

TOP1, TOP5 = run_files.BEST_METRIC, "eval/student/top5"
TEACHER_TOP1 = "eval/teacher/top1"
# Config fields that do not change what a run computes.
IGNORED_KEYS = frozenset(
    {"seed", "teacher_checkpoint", "student_checkpoint", "dataset.data_dir"}
    | {"checkpoint_every_steps", "keep_checkpoints", *run_files.COSMETIC_KEYS}
)
# A row's fields before its figures.
ROW_FIELDS = (
    "dataset", "teacher", "student", "method", "label", "pair", "teacher_run", "settings", "seeds",
)  # fmt: skip
# The student's figures, in table order; stepping-stones follow, then images/s.
STUDENT_METRICS = ("top1_last", "top1_best", "top5_last", "top5_best", "teacher_top1")
# GLUE's metrics besides accuracy (bkd_jax.text_train's runs), x 100 as GLUE reports them.
GLUE_METRICS = ("f1", "matthews", "pearson", "spearman")
_LEGEND_FIGURES = (
    "Top-1 and top-5 in %, mean ± sample standard deviation (ddof=1) over the seeds (one "
    "seed: the value). last: at the final evaluation (the headline figure); best: the best "
    "top-1 over the evaluations, what mdistiller reports, and the top-5 of that evaluation."
)
# What each optional column means, by the start of its header (stone1, stone2, ...).
_LEGEND_COLUMNS = {
    "published": "published: mdistiller's / RepDistiller's figure (bkd_jax/published.py).",
    "Δ best": "Δ best = best − published.",
    "teacher": "teacher: the teacher's top-1 as the distilled runs evaluated it.",
    "stone": "stoneK: stepping-stone K at the last evaluation.",
    "images/s": "images/s: global batch over the median wall-clock seconds per logged "
    "step, mean over seeds.",
}


Row = dict[str, Any]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run: its workdir, config and results, and the row it belongs to.

    `teacher_run` marks a teacher's own training (its row is labelled "teacher" and drawn
    as the teacher's line in plots); `label` is the row's method column.
    """

    path: pathlib.Path
    config: dict[str, Any]
    results: dict[str, Any]
    label: str = ""
    teacher_run: bool = False

    @property
    def method(self) -> str:
        return self.config["distill"]["method"]

    @property
    def dataset(self) -> str:
        return self.config["dataset"]["name"]

    @property
    def teacher(self) -> str:
        return self.config["teacher"]

    @property
    def student(self) -> str:
        return self.config["student"]

    @property
    def settings(self) -> dict[str, Any]:
        """The config, flattened, without the fields that do not change the result."""
        return {k: v for k, v in _flatten(self.config).items() if k not in IGNORED_KEYS}


def is_finished(run_dir: str | pathlib.Path) -> bool:
    """Whether `run_dir` holds the results of a training run that did all its steps."""
    path = pathlib.Path(run_dir) / run_files.RESULTS_FILE
    if not path.is_file():
        return False
    results = json.loads(path.read_text())
    return "last" in results and results.get("steps") == results.get("total_steps")


def load_run(
    run_dir: str | pathlib.Path, *, label: str | None = None, teacher_run: bool | None = None
) -> Run:
    """The finished run in `run_dir`; ValueError when it is not one.

    Unless given, `teacher_run` is whether it is a "ce" run of a model as its own teacher
    (`find_runs` knows better when other runs distil from it) and `label` is "teacher" for
    a teacher run, else the method.
    """
    run_dir = pathlib.Path(run_dir)
    if not is_finished(run_dir):
        raise ValueError(f"{run_dir} holds no finished training run ({run_files.RESULTS_FILE})")
    config = json.loads((run_dir / config_guard.CONFIG_FILE).read_text())
    results = json.loads((run_dir / run_files.RESULTS_FILE).read_text())
    method = config["distill"]["method"]
    if teacher_run is None:
        teacher_run = method == "ce" and config["teacher"] == config["student"]
    return Run(run_dir, config, results, label or _label(method, teacher_run), teacher_run)


def _label(method: str, teacher_run: bool) -> str:
    return "teacher" if teacher_run else method


def _mark_teachers(runs: Sequence[Run]) -> list[Run]:
    """Teacher runs are the runs others distil from (their `teacher_checkpoint`).

    Without any such run (teachers converted from PyTorch, or not among `runs`), `load_run`'s
    guess stands. The guess alone would take the "ce" baseline of a student with the
    teacher's architecture for a teacher.
    """
    referenced = {
        pathlib.Path(r.config["teacher_checkpoint"]).resolve()
        for r in runs
        if r.method != "ce" and r.config.get("teacher_checkpoint")
    }
    if not any(r.path.resolve() in referenced for r in runs):
        return list(runs)
    marked = []
    for run in runs:
        is_teacher = run.path.resolve() in referenced
        label = _label(run.method, is_teacher)
        marked.append(dataclasses.replace(run, teacher_run=is_teacher, label=label))
    return marked


def _sort_key(run: Run) -> tuple:
    """Data set, teacher, its own run first, student, methods in registry order."""
    methods = distillers.available()
    rank = methods.index(run.method) if run.method in methods else len(methods)
    teacher = run.student if run.teacher_run else run.teacher
    return (run.dataset, teacher, not run.teacher_run, run.student, rank, str(run.path))


def find_runs(paths: Iterable[str | pathlib.Path]) -> tuple[list[Run], list[pathlib.Path]]:
    """(finished runs, other run folders) found under `paths`, in table order."""
    runs, skipped = [], []
    for root in paths:
        root = pathlib.Path(root)
        if not root.exists():
            raise FileNotFoundError(f"no such run or folder: {root}")
        for config in sorted(root.rglob(config_guard.CONFIG_FILE)):
            if is_finished(config.parent):
                runs.append(load_run(config.parent))
            else:
                skipped.append(config.parent)
    return sorted(_mark_teachers(runs), key=_sort_key), skipped


def metrics_by_step(run_dir: pathlib.Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl merged per step; a step repeated after a resume keeps its last lines.

    Only whole lines count: a run still going may be writing the last one.
    """
    by_step: dict[int, dict[str, float]] = {}
    path = run_dir / METRICS_FILE
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    for line in lines:
        record = json.loads(line)
        by_step.setdefault(record.pop("step"), {}).update(record)
    return dict(sorted(by_step.items()))


def images_per_second(run: Run) -> float | None:
    """Global batch size / median logged seconds per step; None without timings."""
    seconds = [
        m["train/seconds_per_step"]
        for m in metrics_by_step(run.path).values()
        if "train/seconds_per_step" in m
    ]
    if not seconds:
        return None
    return run.config["global_batch_size"] / statistics.median(seconds)


def run_values(run: Run) -> dict[str, float]:
    """The reported figures of one run (accuracies in %)."""
    last, best = run.results["last"], run.results["best"]
    values = {}
    if TOP1 in last:  # STS-B runs (a regression) report correlations only
        values.update(top1_last=100 * last[TOP1], top1_best=100 * best[TOP1])
    if TOP5 in last:  # text classification runs (bkd_jax.text_train) report no top-5
        values.update(top5_last=100 * last[TOP5], top5_best=100 * best[TOP5])
    for name in GLUE_METRICS:
        if f"eval/student/{name}" in last:
            values[f"{name}_last"] = 100 * last[f"eval/student/{name}"]
    values.update(_other_split_values(last))
    if TEACHER_TOP1 in last:
        values["teacher_top1"] = 100 * last[TEACHER_TOP1]
    stones = [k.split("/")[1] for k in last if k.startswith("eval/stone") and k.endswith("/top1")]
    for stone in sorted(stones, key=_stone_number):
        values[f"{stone}_top1"] = 100 * last[f"eval/{stone}/top1"]
    speed = images_per_second(run)
    if speed is not None:
        values["images_per_second"] = speed
    return values


def _other_split_values(last: dict[str, float]) -> dict[str, float]:
    """The student's metrics on evaluation splits past the first, "eval/<split>/student/<m>"
    in text runs (MNLI mismatched), as "<split> <m>_last" (x 100)."""
    values = {}
    for key, value in last.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[2] == "student":
            values[f"{parts[1]} {parts[3]}_last"] = 100 * value
    return values


def _other_split_figures(rows: Sequence[Row]) -> list[str]:
    found = {k.removesuffix("_mean") for r in rows for k in r if k.endswith("_last_mean")}
    return sorted(name for name in found if " " in name)


def _stone_number(name: str) -> int:
    return int(name.removeprefix("stone"))


def pair_name(teacher: str, student: str, teacher_run: bool) -> str:
    """ "T -> S", or the model a teacher run trains."""
    return student if teacher_run else f"{teacher} -> {student}"


def _differing_settings(groups: Sequence[Sequence[Run]]) -> list[str]:
    """Per group, the settings it differs in from groups with the same pair and label."""
    out = []
    for group in groups:
        run = group[0]
        mine = run.settings
        peers = [
            g[0].settings
            for g in groups
            if (g[0].dataset, g[0].teacher, g[0].student, g[0].label, g[0].teacher_run)
            == (run.dataset, run.teacher, run.student, run.label, run.teacher_run)
        ]
        keys = sorted({k for p in peers for k in p.keys() | mine.keys() if p.get(k) != mine.get(k)})
        out.append(", ".join(f"{k}={mine.get(k)}" for k in keys))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def summarize(runs: Sequence[Run]) -> list[Row]:
    """One row per experiment, in the order of its first run: means and stds over seeds.

    A row has "dataset", "teacher", "student", "method", "label", "pair", "teacher_run",
    "settings", "seeds", "runs" (paths), "<figure>_mean" / "<figure>_std" for each figure of
    `run_values`, "published_top1" and "delta_top1_best" (None where unknown).
    """
    grouped: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (run.label, run.teacher_run, json.dumps(run.settings, sort_keys=True, default=str))
        grouped.setdefault(key, []).append(run)
    groups = list(grouped.values())
    rows = []
    for group, settings in zip(groups, _differing_settings(groups), strict=True):
        first = group[0]
        per_run = [run_values(r) for r in group]
        names = list(dict.fromkeys(k for values in per_run for k in values))
        pair = pair_name(first.teacher, first.student, first.teacher_run)
        values = (first.dataset, first.teacher, first.student, first.method, first.label, pair)
        values += (first.teacher_run, settings, len(group))
        row: Row = dict(zip(ROW_FIELDS, values, strict=True))
        row["runs"] = [str(r.path) for r in group]
        for name in names:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(
                [values[name] for values in per_run if name in values]
            )
        reference = published.top1(first.dataset, first.teacher, first.student, first.method)
        row["published_top1"] = reference
        found = reference is not None and "top1_best_mean" in row
        row["delta_top1_best"] = row["top1_best_mean"] - reference if found else None
        rows.append(row)
    return rows


def _stones(rows: Sequence[Row]) -> list[str]:
    found = {k.removesuffix("_top1_mean") for r in rows for k in r if k.endswith("_top1_mean")}
    found = {name for name in found if name.startswith("stone")}
    return sorted(found, key=_stone_number)


def figure_names(rows: Sequence[Row]) -> list[str]:
    """The figures some row has, in table order."""
    names = [*STUDENT_METRICS, *(f"{m}_last" for m in GLUE_METRICS), *_other_split_figures(rows)]
    names += [*(f"{s}_top1" for s in _stones(rows)), "images_per_second"]
    return [n for n in names if any(f"{n}_mean" in r for r in rows)]


def format_mean_std(row: Row, name: str, digits: int = 2) -> str:
    """'mean ± std' of figure `name` in `row`, the mean alone for one seed, '' if absent."""
    mean = row.get(f"{name}_mean")
    if mean is None:
        return ""
    std = row.get(f"{name}_std")
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _number(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def columns(rows: Sequence[Row]) -> list[tuple[str, Callable[[Row], str]]]:
    """(header, cell) of each table column that has a value in some row."""
    candidates: list[tuple[str, Callable[[Row], str]]] = [
        ("pair", lambda r: r["pair"]),
        ("method", lambda r: r["label"]),
        ("settings", lambda r: r["settings"]),
        ("seeds", lambda r: str(r["seeds"])),
        ("top-1 last", lambda r: format_mean_std(r, "top1_last")),
        ("top-1 best", lambda r: format_mean_std(r, "top1_best")),
        ("published", lambda r: _number(r["published_top1"], ".2f")),
        ("Δ best", lambda r: _number(r["delta_top1_best"], "+.2f")),
        ("top-5 last", lambda r: format_mean_std(r, "top5_last")),
        ("top-5 best", lambda r: format_mean_std(r, "top5_best")),
        ("teacher", lambda r: format_mean_std(r, "teacher_top1")),
        *((f"{m} last", lambda r, m=m: format_mean_std(r, f"{m}_last")) for m in GLUE_METRICS),
        *((f"{n.removesuffix('_last')} last", lambda r, n=n: format_mean_std(r, n))
          for n in _other_split_figures(rows)),
    ]  # fmt: skip
    for stone in _stones(rows):
        candidates.append((stone, lambda r, s=stone: format_mean_std(r, f"{s}_top1")))
    candidates.append(("images/s", lambda r: format_mean_std(r, "images_per_second", 0)))
    return [(header, cell) for header, cell in candidates if any(cell(r) for r in rows)]


def legend(rows: Sequence[Row]) -> str:
    """What the figures and the columns of `rows`' table mean; only the columns it shows."""
    headers = [header for header, _ in columns(rows)]
    shown = [
        text for start, text in _LEGEND_COLUMNS.items() if any(h.startswith(start) for h in headers)
    ]
    return " ".join([_LEGEND_FIGURES, *shown])


def markdown_table(rows: Sequence[Row]) -> str:
    """`summarize`'s rows as a Markdown table (columns empty in every row left out)."""
    cols = columns(rows)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row]) -> str:
    """The rows as CSV: one column per field of any row, numbers unformatted."""
    fields = [*ROW_FIELDS, *(f"{n}_{s}" for n in figure_names(rows) for s in ("mean", "std"))]
    fields += ["published_top1", "delta_top1_best"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def json_table(rows: Sequence[Row], skipped: Sequence[pathlib.Path] = ()) -> str:
    return json.dumps({"rows": list(rows), "skipped": [str(p) for p in skipped]}, indent=2)


# Plots ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib  # Imported here: only plots need it.

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_curves(run: Run) -> dict[str, list[tuple[float, float]]]:
    """(epoch, value) series of one run: "loss" (its objective), "ce" (the student's
    cross-entropy on its training batches, comparable across methods) and "top1" (%)."""
    last = run.results["last"]
    steps_per_epoch = last["step"] / last["epoch"]
    curves: dict[str, list[tuple[float, float]]] = {"loss": [], "ce": [], "top1": []}
    for step, record in metrics_by_step(run.path).items():
        epoch = step / steps_per_epoch
        if "train/loss" in record:
            curves["loss"].append((epoch, record["train/loss"]))
        # ce, kd and dkd log the student's CE as "ce", Block-KD as "ce_student".
        ce = record.get("train/ce", record.get("train/ce_student"))
        if ce is not None:
            curves["ce"].append((epoch, ce))
        if TOP1 in record:
            curves["top1"].append((epoch, 100 * record[TOP1]))
    return curves


def _mean_curve(series: Sequence[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The mean over seeds at the epochs every seed logged."""
    common = set.intersection(*(set(dict(s)) for s in series)) if series else set()
    values = [dict(s) for s in series]
    return [(e, statistics.fmean(v[e] for v in values)) for e in sorted(common)]


def _row_name(row: Row, with_pair: bool) -> str:
    name = row["label"] + (f" [{row['settings']}]" if row["settings"] else "")
    return f"{row['pair']} {name}" if with_pair else name


def _teacher_top1(rows: Sequence[Row]) -> float | None:
    """The teacher's top-1 the distilled rows measured, else a teacher row's best."""
    measured = [r["teacher_top1_mean"] for r in rows if "teacher_top1_mean" in r]
    if measured:
        return statistics.fmean(measured)
    own = [r["top1_best_mean"] for r in rows if r["teacher_run"]]
    return own[0] if own else None


def draw_bars(ax, rows: Sequence[Row], teacher_rows: Sequence[Row] = ()) -> None:
    """Top-1 last and best per row (mean, sample-std error bars) on `ax`; the published
    figure as a cross where known, the teacher's top-1 as a dashed line."""
    xs = range(len(rows))
    lowest = 100.0
    for offset, key in ((-0.2, "top1_last"), (0.2, "top1_best")):
        means = [r[f"{key}_mean"] for r in rows]
        spread = [r[f"{key}_std"] or 0.0 for r in rows]
        ax.bar([x + offset for x in xs], means, 0.4, yerr=spread, capsize=3, label=key[5:])
        lowest = min([lowest, *means])
    known = [(x, r["published_top1"]) for x, r in zip(xs, rows, strict=True)]
    known = [(x, v) for x, v in known if v is not None]
    if known:
        ax.plot(*zip(*known, strict=True), "kx", ms=8, mew=2, label="published (best)")
        lowest = min(lowest, *(v for _, v in known))
    teacher = _teacher_top1([*rows, *teacher_rows])
    if teacher is not None:
        ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher")
        lowest = min(lowest, teacher)
    pairs = dict.fromkeys(r["pair"] for r in rows)
    ax.set(
        xticks=list(xs),
        xticklabels=[_row_name(r, with_pair=False) for r in rows],
        ylabel="student top-1 (%)",
        title=f"{', '.join(pairs)}: mean ± std over seeds",
    )
    ax.set_ylim(bottom=max(0.0, lowest - 5), top=min(ax.get_ylim()[1], 101.0))
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(loc="best", fontsize=8)


CURVE_LABELS = {
    "loss": "training objective",
    "ce": "student's training cross-entropy",
    "top1": "student test top-1 (%)",
}


def draw_curves(axes: dict[str, Any], runs: Sequence[Run], rows: Sequence[Row]) -> None:
    """Per row, the mean over its seeds of each series of `read_curves` against epoch, on
    `axes[series]` for the series ("loss", "ce", "top1") given."""
    with_pair = len({r["pair"] for r in rows}) > 1
    for row in rows:
        curves = [read_curves(r) for r in runs if str(r.path) in row["runs"]]
        for series, ax in axes.items():
            mean = _mean_curve([c[series] for c in curves if c[series]])
            if mean:
                ax.plot(*zip(*mean, strict=True), marker=".", label=_row_name(row, with_pair))
    for series, ax in axes.items():
        ax.set(xlabel="epoch", ylabel=CURVE_LABELS[series], title=CURVE_LABELS[series])
        if series != "top1":
            ax.set_yscale("log")
        ax.legend(fontsize=8)


def _blocks(rows: Sequence[Row]) -> list[tuple[list[Row], list[Row]]]:
    """(student rows of one data set and pair, the rows of that teacher's own runs)."""
    students = [r for r in rows if not r["teacher_run"]]
    teachers = [r for r in rows if r["teacher_run"]]
    keys = dict.fromkeys((r["dataset"], r["teacher"], r["student"]) for r in students)
    return [
        (
            [r for r in students if (r["dataset"], r["teacher"], r["student"]) == key],
            [r for r in teachers if (r["dataset"], r["student"]) == key[:2]],
        )
        for key in keys
    ]


def save_bar_chart(path: str | pathlib.Path, rows: Sequence[Row]) -> None:
    """One panel per data set and pair: `draw_bars` of its rows."""
    blocks = _blocks(rows) or [(list(rows), [])]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(blocks), figsize=(1.2 + 1.3 * len(rows), 4.5), squeeze=False)
    for ax, (students, teachers) in zip(axes[0], blocks, strict=True):
        draw_bars(ax, students, teachers)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_curves(path: str | pathlib.Path, runs: Sequence[Run], rows: Sequence[Row]) -> None:
    """Training objective, the student's cross-entropy and test top-1 against epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    draw_curves(dict(zip(("loss", "ce", "top1"), axes, strict=True)), runs, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# Command line -----------------------------------------------------------------------------

FORMATS = {"md": markdown_table, "csv": csv_table}


def render(rows: Sequence[Row], fmt: str, skipped: Sequence[pathlib.Path] = ()) -> str:
    """The table in format `fmt` (md with its legend and skipped runs, csv, json)."""
    if fmt == "json":
        return json_table(rows, skipped)
    text = FORMATS[fmt](rows)
    if fmt == "md":
        text += "\n" + legend(rows) + "\n"
        if skipped:
            text += f"\nSkipped {len(skipped)} unfinished runs: {', '.join(map(str, skipped))}\n"
    return text


def define_flags() -> None:
    flags.DEFINE_enum("format", "md", ["md", "csv", "json"], "Table format.")
    flags.DEFINE_string("plot", None, "Write a bar chart of top-1 per method to this PNG.")
    flags.DEFINE_string("curves", None, "Write training curves to this PNG.")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("give one or more run workdirs or folders of them")
    args = flags.FLAGS
    # Bad folders are one line, not the usage text: the command itself was right.
    try:
        runs, skipped = find_runs(argv[1:])
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if not runs:
        sys.exit(f"error: no finished runs under {', '.join(argv[1:])}")
    rows = summarize(runs)
    print(render(rows, args.format, skipped), end="")
    if args.plot:
        save_bar_chart(args.plot, rows)
    if args.curves:
        save_curves(args.curves, runs, rows)


if __name__ == "__main__":
    define_flags()
    app.run(main)
