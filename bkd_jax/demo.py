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
                        the table's rows; rewritten after each run
    demo_table.md       `bkd_jax.report`'s table of the runs: test top-1 per method, mean ±
                        std over seeds, at the last and the best evaluation, and more
    demo.png            top-1 per method, and the training curves (mean over seeds)

The table and the plot are `bkd_jax.report`'s, which reports any set of runs the same way.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import app, flags, logging

from bkd_jax import console, distillers, report
from bkd_jax.console import load_config_file, packaged_config_file
from bkd_jax.training import run_files

with console.quiet_native_logs():  # TensorFlow's INFO lines as it loads
    from bkd_jax.training import loop

TOP1 = run_files.BEST_METRIC
TEACHER = "teacher"
# The methods of the demo's published table (configs/demo.py); any registered one can run.
DEFAULT_METHODS = ("ce", "kd", "dkd", "blockkd", "blockkd_lite")
RESULTS_FILE = "demo_results.json"
TABLE_FILE = "demo_table.md"
PLOT_FILE = "demo.png"
_DEFAULT_CONFIG = packaged_config_file("demo.py")

Record = dict[str, Any]


def run_plan(methods: Sequence[str], seeds: int) -> list[tuple[str, int]]:
    """(row, seed) of every run in order: the teacher, then all methods seed by seed."""
    unknown = [m for m in methods if m not in distillers.available()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(distillers.available())}")
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
        finished = (run_dir / run_files.RESULTS_FILE).exists()
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


def report_runs(workdir: pathlib.Path, records: Sequence[Record]) -> list[report.Run]:
    """The runs of `records` for `bkd_jax.report`, labelled with their rows."""
    return [
        report.load_run(workdir / r["name"], label=r["row"], teacher_run=r["row"] == TEACHER)
        for r in records
    ]


def plot(path: pathlib.Path, runs: Sequence[report.Run], rows: Sequence[report.Row]) -> None:
    """Top-1 per method with error bars, the training cross-entropy and test top-1 per
    method (mean over seeds), side by side, as a PNG."""
    import matplotlib  # Imported here: only the plot needs it.

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, losses, accuracy) = plt.subplots(1, 3, figsize=(17, 4.8))
    students = [r for r in rows if not r["teacher_run"]]
    teachers = [r for r in rows if r["teacher_run"]]
    report.draw_bars(bars, students, teachers)
    report.draw_curves({"ce": losses, "top1": accuracy}, runs, students)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write_json(workdir: pathlib.Path, records: Sequence[Record], table: Any) -> None:
    payload = {"runs": list(records), "table": table}
    run_files.atomic_write_text(workdir / RESULTS_FILE, json.dumps(payload, indent=2) + "\n")


def write_outputs(workdir: pathlib.Path, records: Sequence[Record]) -> str:
    """Writes demo_results.json, demo_table.md and demo.png; returns the table and its
    legend, to print."""
    runs = report_runs(workdir, records)
    rows = report.summarize(runs)
    table = report.markdown_table(rows)
    _write_json(workdir, records, rows)
    run_files.atomic_write_text(workdir / TABLE_FILE, table)
    plot(workdir / PLOT_FILE, runs, rows)
    return f"{table}\n{report.legend(rows)}\n"


def define_flags() -> None:
    """The command line's flags; only when run as a program, so importing defines none."""
    flags.DEFINE_string("workdir", None, "Directory for the runs, table and plot.", required=True)
    flags.DEFINE_integer("seeds", 3, "Student runs per method, with seeds 0, 1, ...")
    flags.DEFINE_list("methods", list(DEFAULT_METHODS), "Student methods, in table order.")
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
