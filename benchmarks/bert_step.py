r"""Train-step cost of KD and Block-KD for a BERT 12-layer -> 6-layer pair, as a table.

    python benchmarks/bert_step.py [--length=128] [--batch=32] [--rounds=3] \
        [--methods=kd,blockkd] [--groups=3]

Teacher bert_base (12 x 768) and student bert_6x768, each cut into `groups` blocks, on a
random batch of `batch` sequences of `length` tokens (no padding; BERT's vocabulary).
Per method: the XLA compile time, the memory of the compiled step (XLA's buffer
assignment: arguments + outputs - aliases + temporaries, `bkd_jax.bench.memory_bytes`),
the GFLOPs XLA's cost analysis counts, and the median wall-clock and process CPU time
per step over `rounds` rounds, methods interleaved one step each per round so that load
from other processes hits them alike. The step is the trainer's (`bkd_jax.steps`),
jitted on one device, with AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from bkd_jax import bench, config_defaults, distillers, steps
from bkd_jax.blocknet import text_input
from bkd_jax.models import bert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--methods", default="kd,blockkd")
    args = parser.parse_args()
    teacher = bert.get_model("bert_base", 2, groups=args.groups)
    student = bert.get_model("bert_6x768", 2, groups=args.groups)
    k1, k2 = jax.random.split(jax.random.key(0))
    shape = (args.batch, args.length)
    ids = jax.random.randint(k1, shape, 1, bert.VOCAB_SIZE)
    x = text_input(ids, jnp.zeros(shape, jnp.int32), jnp.ones(shape, jnp.int32))
    batch = {"image": x, "label": jax.random.randint(k2, (args.batch,), 0, 2)}
    teacher_vars = teacher.init(jax.random.key(1), x)
    runs = {}
    for method in args.methods.split(","):
        distiller = distillers.make_distiller(
            config_defaults.distill_config(method), student, teacher, x.shape[1:]
        )
        optimizer = optax.adamw(2e-5, weight_decay=0.01)
        state = steps.create_train_state(distiller, optimizer, jax.random.key(2), x)
        step = jax.jit(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
        start = time.perf_counter()
        compiled = step.lower(state, teacher_vars, batch).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(state, teacher_vars, batch))  # warm-up
        runs[method] = (compiled, state, compile_s, [], [])
    for _ in range(args.rounds):
        for compiled, state, _, walls, cpus in runs.values():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(state, teacher_vars, batch))
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    print(f"{bench.machine()}; batch {args.batch} x {args.length} "
          f"tokens; bert_base -> bert_6x768, {args.groups} blocks each")  # fmt: skip
    print("| method | step s (median) | CPU s/step | compile s | memory MiB | GFLOPs/step |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for method, (compiled, _, compile_s, walls, cpus) in runs.items():
        memory, flops = bench.memory_bytes(compiled), bench.cost_flops(compiled)
        medians[method] = (statistics.median(walls), statistics.median(cpus), flops)
        print(
            f"| {method} | {medians[method][0]:.2f} | {medians[method][1]:.2f} | "
            f"{compile_s:.1f} | {memory / 2**20:.0f} | {flops / 1e9:.0f} |"
        )
    if {"kd", "blockkd"} <= medians.keys():
        wall, cpu, flops = (b / k for b, k in zip(medians["blockkd"], medians["kd"]))
        print(f"blockkd / kd: step time {wall:.2f}, CPU time {cpu:.2f}, FLOPs {flops:.2f}")


if __name__ == "__main__":
    main()
