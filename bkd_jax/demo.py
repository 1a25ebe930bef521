r"""The demo study: a teacher, then one student per method and seed; a table and a plot.

    python -m bkd_jax.demo --workdir=runs/demo [--seeds=3] [--methods=ce,kd,...] [--quick]

It runs on scikit-learn's handwritten digits, so it needs no download, and through the
same trainer and config machinery as the CIFAR-100 and ImageNet recipes: every run is
`loop.train_and_evaluate(config, run_dir)` with a config from `configs/demo.py` (its
docstring has the settings, why, and the measured table). The teacher trains first; then,
seed by seed, the student trains once per method, distilled from that teacher.

Every run has its own directory under `--workdir`. Rerunning the command resumes an
interrupted run and returns at once for finished ones (the trainer's resume semantics), so
an interrupted demo continues where it stopped; compiled steps are cached in
`--workdir/jax_cache`, which also spares seeds after the first most of their compile time.
Written to `--workdir`:

    demo_results.json   every run (config argument, seconds, the trainer's summary) and
                        the table's numbers; rewritten after each run
    demo_table.md       test top-1 per method, mean ± std over seeds, at the best and the
                        last evaluation
    demo.png            top-1 per method, and the training curves of seed 0
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import jax
from absl import app, flags, logging

from bkd_jax import distillers
from bkd_jax.training import loop
from bkd_jax.training.metric_writers import METRICS_FILE

TOP1 = loop.BEST_METRIC
TEACHER = "teacher"
RESULTS_FILE = "demo_results.json"
TABLE_FILE = "demo_table.md"
PLOT_FILE = "demo.png"
# configs/ is installed as the package bkd_jax.configs; a plain checkout has it beside bkd_jax/.
_CONFIGS = importlib.util.find_spec("bkd_jax.configs")
_DEFAULT_CONFIG = (
    pathlib.Path(_CONFIGS.origin).parent
    if _CONFIGS is not None and _CONFIGS.origin is not None
    else pathlib.Path(__file__).resolve().parents[1] / "configs"
) / "demo.py"

Record = dict[str, Any]


def load_config_file(path: str | pathlib.Path) -> ModuleType:
    """A config file as a module; configs/ is a folder of files, not a package."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_plan(methods: Sequence[str], seeds: int) -> list[tuple[str, int]]:
    """(row, seed) of every run in order: the teacher, then all methods seed by seed."""
    unknown = [m for m in methods if m not in distillers.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(distillers.METHODS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    return [(TEACHER, 0)] + [(m, s) for s in range(seeds) for m in methods]


def run_name(row: str, seed: int) -> str:
    return TEACHER if row == TEACHER else f"{row}_seed{seed}"


def config_argument(row: str, seed: int, quick: bool) -> str:
    """The `configs/demo.py:...` argument of one run."""
    arg = "role=teacher" if row == TEACHER else f"method={row},seed={seed}"
    return arg + (",quick=1" if quick else "")


def _read_records(workdir: pathlib.Path) -> dict[str, Record]:
    path = workdir / RESULTS_FILE
    if not path.exists():
        return {}
    return {r["name"]: r for r in json.loads(path.read_text())["runs"]}


def run_study(
    workdir: pathlib.Path,
    get_config: Callable[[str], Any],
    plan: Sequence[tuple[str, int]],
    *,
    quick: bool,
    log: Callable[[str], None] = print,
) -> list[Record]:
    """Trains, resumes or reuses every run of `plan`; returns one record per run.

    A run that had finished before keeps the seconds it took then (from the previous
    demo_results.json), not the second or so that confirming it takes now.
    """
    earlier = _read_records(workdir)
    records: list[Record] = []
    for number, (row, seed) in enumerate(plan, 1):
        name, arg = run_name(row, seed), config_argument(row, seed, quick)
        run_dir = workdir / name
        config = get_config(arg)
        if row != TEACHER:
            config.teacher_checkpoint = str(workdir / TEACHER)
        finished = (run_dir / loop.RESULTS_FILE).exists()
        log(f"[{number}/{len(plan)}] {name} (configs/demo.py:{arg})")
        start = time.monotonic()
        summary = loop.train_and_evaluate(config, str(run_dir))
        seconds = time.monotonic() - start
        if finished and name in earlier:
            seconds = earlier[name]["seconds"]
        records.append(dict(row=row, name=name, seed=seed, arg=arg, seconds=seconds, **summary))
        _write_json(workdir, records, table=None)
        log(
            f"[{number}/{len(plan)}] {name}: test top-1 best {_pct(summary['best'][TOP1])}, "
            f"last {_pct(summary['last'][TOP1])}, {seconds:.0f} s"
            + (" (finished earlier)" if finished else "")
        )
    return records


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def stone_names(records: Sequence[Record]) -> list[str]:
    """The stepping-stones any run evaluated ('stone1', ...), in order."""
    found = {k.split("/")[1] for r in records for k in r["last"] if k.startswith("eval/stone")}
    return sorted(found, key=lambda s: int(s.removeprefix("stone")))


def summarize(records: Sequence[Record]) -> list[Record]:
    """One row per method in run order: the per-seed values of every number reported.

    "best" and "last" are the student's test top-1 at its best and at its last evaluation,
    "stoneK" stepping-stone K's at the last (runs without that stone are left out).
    """
    stones = stone_names(records)
    rows = []
    for row in dict.fromkeys(r["row"] for r in records):
        runs = [r for r in records if r["row"] == row]
        values = {
            "best": [r["best"][TOP1] for r in runs],
            "last": [r["last"][TOP1] for r in runs],
            **{s: [r["last"][f"eval/{s}/top1"] for r in runs if f"eval/{s}/top1" in r["last"]]
               for s in stones},
            "seconds": [r["seconds"] for r in runs],
        }  # fmt: skip
        rows.append({"row": row, "seeds": len(runs), **values})
    return rows


def mean_std(values: Sequence[float]) -> str:
    """Fractions as 'mean ± std' in percent (sample std); the mean alone for one value."""
    if not values:
        return ""
    mean = f"{100 * statistics.fmean(values):.1f}"
    return mean if len(values) < 2 else f"{mean} ± {100 * statistics.stdev(values):.1f}"


def markdown_table(rows: Sequence[Record]) -> str:
    """`summarize`'s rows as a Markdown table."""
    stones = [k for k in rows[0] if k.startswith("stone")]
    header = ["run", "seeds", "top-1 best (%)", "top-1 last (%)"]
    header += [f"{s} last (%)" for s in stones] + ["seconds / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["row"], str(row["seeds"]), mean_std(row["best"]), mean_std(row["last"])]
        cells += [mean_std(row[s]) for s in stones]
        cells.append(f"{statistics.fmean(row['seconds']):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_curves(run_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of one run: the student's training cross-entropy and test top-1.

    metrics.jsonl repeats steps after a resume; the last line of a step wins.
    """
    by_step: dict[int, Record] = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
    curves: dict[str, list[tuple[int, float]]] = {"train_ce": [], "test_top1": []}
    for step in sorted(by_step):
        record = by_step[step]
        # ce, kd and dkd log the student's CE as "ce", Block-KD as "ce_student".
        ce = record.get("train/ce", record.get("train/ce_student"))
        if ce is not None:
            curves["train_ce"].append((step, ce))
        if TOP1 in record:
            curves["test_top1"].append((step, record[TOP1]))
    return curves


def plot(path: pathlib.Path, rows: Sequence[Record], records: Sequence[Record]) -> None:
    """Top-1 per method with error bars, and seed 0's training curves per method, as a PNG.

    `records` must have their run directories beside `path`.
    """
    import matplotlib  # Imported here: only the plot needs it.

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, losses, accuracy) = plt.subplots(1, 3, figsize=(17, 4.8))
    students = [r for r in rows if r["row"] != TEACHER]
    teacher = next(r for r in rows if r["row"] == TEACHER)
    teacher_top1 = 100 * teacher["best"][0]
    lowest = min([teacher_top1] + [100 * min(r["best"] + r["last"]) for r in students])
    xs = range(len(students))
    for offset, key in ((-0.2, "best"), (0.2, "last")):
        means = [100 * statistics.fmean(r[key]) for r in students]
        spread = [100 * statistics.stdev(r[key]) if len(r[key]) > 1 else 0 for r in students]
        bars.bar([x + offset for x in xs], means, 0.4, yerr=spread, capsize=4, label=key)
    seeds = max((r["seeds"] for r in students), default=1)
    bars.set(
        xticks=list(xs), xticklabels=[r["row"] for r in students], ylabel="test top-1 (%)",
        ylim=(max(0, lowest - 3), 101), title=f"Student test top-1, mean ± std of {seeds} seeds",
    )  # fmt: skip
    for axis in (bars, accuracy):
        axis.axhline(teacher_top1, color="k", ls="--", lw=1, label="teacher")
    for record in (r for r in records if r["row"] != TEACHER and r["seed"] == 0):
        curves = read_curves(path.parent / record["name"])
        losses.plot(*zip(*curves["train_ce"], strict=True), label=record["row"])
        top1 = [(step, 100 * value) for step, value in curves["test_top1"]]
        accuracy.plot(*zip(*top1, strict=True), marker=".", label=record["row"])
    losses.set(yscale="log", xlabel="step", ylabel="student's cross-entropy on its batch",
               title="Training cross-entropy (seed 0)")  # fmt: skip
    accuracy.set(xlabel="step", ylabel="test top-1 (%)", ylim=(max(0, lowest - 8), 100),
                 title="Student test top-1 during training (seed 0)")  # fmt: skip
    bars.legend(loc="upper center", ncols=3, fontsize=8)
    losses.legend(loc="upper right", fontsize=8)
    accuracy.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write_json(workdir: pathlib.Path, records: Sequence[Record], table: Any) -> None:
    payload = {"runs": list(records), "table": table}
    (workdir / RESULTS_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def write_outputs(workdir: pathlib.Path, records: Sequence[Record]) -> str:
    """Writes demo_results.json, demo_table.md and demo.png; returns the table."""
    rows = summarize(records)
    table = markdown_table(rows)
    _write_json(workdir, records, rows)
    (workdir / TABLE_FILE).write_text(table)
    plot(workdir / PLOT_FILE, rows, records)
    return table


def define_flags() -> None:
    """The command line's flags; only when run as a program, so importing defines none."""
    flags.DEFINE_string("workdir", None, "Directory for the runs, table and plot.", required=True)
    flags.DEFINE_integer("seeds", 3, "Student runs per method, with seeds 0, 1, ...")
    flags.DEFINE_list("methods", list(distillers.METHODS), "Student methods, in table order.")
    flags.DEFINE_bool("quick", False, "One epoch per run: a smoke test of the demo.")
    flags.DEFINE_string("config", str(_DEFAULT_CONFIG), "The demo's config file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if not args["verbosity"].present:  # The demo's own lines say enough.
        logging.set_verbosity(logging.WARNING)
    plan = run_plan(args.methods, args.seeds)
    get_config = load_config_file(args.config).get_config
    workdir = pathlib.Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    start = time.monotonic()
    records = run_study(workdir, get_config, plan, quick=args.quick)
    table = write_outputs(workdir, records)
    print(f"\nTest top-1 on the 360 held-out digits ({time.monotonic() - start:.0f} s in all):")
    print(table)
    print(f"Written: {workdir}/{{{RESULTS_FILE}, {TABLE_FILE}, {PLOT_FILE}}}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
