"""Soak benchmark: a long digits run with frequent checkpoints, to catch slow leaks.

    python benchmarks/soak.py --workdir=/tmp/soak            # 5,000 steps, a checkpoint every 50

Trains resnet8 on scikit-learn's digits through `train_and_evaluate` (an evaluation, and so
possibly a best checkpoint, every epoch of 89 steps) while a thread samples this process's
resident memory (RSS), its open file descriptors and the checkpoint directories in the
workdir. It prints, and writes to WORKDIR/soak.json, the first sample taken after the first
checkpoint and the last one: memory and descriptors should stay flat, and the number of
checkpoints should stay at `keep_checkpoints` latest plus one best.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import threading
import time

from bkd_jax.config_defaults import base_config
from bkd_jax.training import checkpointing, loop


def _rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _sample(workdir: pathlib.Path, start: float) -> dict:
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    checkpoints = workdir / checkpointing.LATEST_DIR
    dirs = list(checkpoints.iterdir()) if checkpoints.is_dir() else []
    return {
        "seconds": round(time.monotonic() - start, 1),
        "step": json.loads(lines[-1])["step"] if lines else 0,
        "rss_mib": round(_rss_mib(), 1),
        "open_files": len(os.listdir("/proc/self/fd")),
        "checkpoint_dirs": len(dirs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--checkpoint_every", type=int, default=50)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    args = parser.parse_args()

    config = base_config("digits", teacher="resnet8", student="resnet8", method="ce")
    config.num_train_steps = args.steps
    config.global_batch_size = 16
    config.log_every_steps = 50
    config.checkpoint_every_steps = args.checkpoint_every

    start, samples, done = time.monotonic(), [], threading.Event()

    def sampler() -> None:
        while not done.wait(args.interval):
            samples.append(_sample(args.workdir, start))

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    loop.train_and_evaluate(config, str(args.workdir))
    done.set()
    thread.join()
    samples.append(_sample(args.workdir, start))
    first = next((s for s in samples if s["step"] >= args.checkpoint_every), samples[0])
    report = {"steps": args.steps, "checkpoint_every": args.checkpoint_every}
    report |= {"first": first, "last": samples[-1], "samples": samples}
    (args.workdir / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"first": first, "last": samples[-1]}, indent=1))


if __name__ == "__main__":
    main()
