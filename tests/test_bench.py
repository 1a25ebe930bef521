"""The bench's tables, MFU, device split, PyTorch reference and GPU script (smoke mode)."""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from bkd_jax import bench, models
from bkd_jax.bench import mfu
from bkd_jax.training import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def fake_result(method: str, wall: float, flops: float, **options) -> bench.Result:
    variant = bench.Variant(method, **options)
    return bench.Result(
        variant, 1.0, 2.0**20, flops, wall=[wall, 9.0, wall], cpu=[2 * wall], peak=1e12
    )


def test_variants_labels_ratios_and_table():
    base = bench.Variant("kd")
    ablate = ["remat", "dtype", "devices", "cpu_conv"]
    got = bench.variants(base, ["kd", "blockkd"], ablate, ["kd"])
    assert [v.label(base) for v in got] == [
        "kd", "blockkd", "blockkd +remat", "kd bfloat16", "blockkd bfloat16",
        "kd 1 device", "blockkd 1 device", "kd -cpu_conv", "blockkd -cpu_conv", "kd torch",
    ]  # fmt: skip
    results = [
        fake_result("kd", 1.0, 100e9),
        fake_result("blockkd", 2.5, 200e9),
        fake_result("blockkd", 0.5, 100e9, remat=True),  # not the base options: no ratio
        bench.Result(bench.Variant("kd", torch=True), None, None, None, [3.0], [1.0]),
    ]
    assert bench.ratios(results, base).splitlines()[2:] == [
        "| blockkd / kd | 2.50 | 2.50 | 2.00 | 1.25 | 1.25 |"
    ]
    assert bench.margins(results, base).splitlines()[2:] == [
        "| blockkd - kd | 100.0 | 1500 | 3000 | 66.7 | 33.3 |"
    ]
    rows = bench.table(results, base).splitlines()
    # 64 images in 1 s; 100 GFLOP/s of a 1 TFLOP/s peak is 10% MFU; torch took 3 s wall
    # and 1 s CPU against this step's 1 s and 2 s.
    assert (
        rows[2] == "| kd | 64 | 64.0 | 1000 | 2000 | 1.0 | 1 | 100.0 | 100.0 | 10.0 | 3.00 | 0.50 |"
    )
    assert rows[3].endswith("| 200.0 | 80.0 | 8.0 | n/a | n/a |")  # no torch blockkd row
    assert (
        rows[5]
        == "| kd torch | 64 | 21.3 | 3000 | 1000 | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"
    )


class _Compiled:
    def __init__(self, cost):
        self.cost = cost

    def cost_analysis(self):
        return self.cost


def test_cost_flops_reads_both_cost_analysis_layouts():
    assert bench.cost_flops(_Compiled({"flops": 7.0})) == 7.0
    assert bench.cost_flops(_Compiled([{"flops": 7.0}])) == 7.0
    assert bench.cost_flops(_Compiled([])) is None


@pytest.mark.parametrize(
    ("kind", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 PCIe", "float32", 378e12),
        ("NVIDIA H200", "float32", 495e12),
        ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
        ("TPU v4", "float32", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("Tesla T4", "bfloat16", None),
    ],
)
def test_table_peaks(kind, dtype, peak):
    assert mfu.table_peak(kind, dtype) == peak


def test_cpu_peak_is_measured():
    mesh = sharding.make_mesh()
    peak, source = mfu.peak_flops(mesh, "float32")
    assert source == "measured float32 matmul" and 1e8 < peak < 1e14


def test_one_cpu_device_per_core_only_on_cpu_hosts_and_only_once(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert sharding.use_one_cpu_device_per_core(3) == 3
    assert os.environ["XLA_FLAGS"] == (
        "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3"
    )
    assert sharding.use_one_cpu_device_per_core(5) is None  # already set: left alone
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert sharding.use_one_cpu_device_per_core(3) is None
    assert os.environ["XLA_FLAGS"] == ""


_SPLIT_DRIVER = """
import jax, numpy as np
from bkd_jax import bench
assert jax.device_count() == 2
b = bench.Bench(("resnet8", "resnet8"), 8, 16, 10)
out = []
for devices in (1, 2):
    run, result = b.compile(bench.Variant("kd", devices=devices, batch_size=8))
    out.append(jax.tree.leaves(jax.device_get(run())))
for one, two in zip(*out, strict=True):
    np.testing.assert_allclose(one, two, rtol=2e-5, atol=2e-6)
print(len(out[0]))
"""


def test_step_split_over_two_cpu_devices_computes_the_same():
    # Optimisation level 0: a fraction of the default's compile time on a CPU (the
    # initialisers' PRNG code dominates); the two layouts still compute the same step.
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags}
    result = subprocess.run(
        [sys.executable, "-c", _SPLIT_DRIVER],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 20  # state leaves and metrics were compared


def test_torch_reference_models_match_the_zoo_and_kd_formula():
    torch = pytest.importorskip("torch")
    from bkd_jax.bench import torch_reference

    for name, size in (("resnet8x4", 32), ("resnet32", 32), ("imagenet_resnet18", 64)):
        net = models.get_model(name, 100)
        shapes = jax.eval_shape(
            net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
        )
        zoo = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
        ref = sum(p.numel() for p in torch_reference.make_model(name, 100).parameters())
        assert ref == zoo, name
    # tau^2 KL(p_t || p_s) at tau = 4 for logits (0, 0) vs (0, 4 ln 3): p_t = (1/2, 1/2),
    # p_s = (1/4, 3/4) -> 16 (1/2 ln 2 + 1/2 ln(2/3)).
    student = torch.tensor([[0.0, 4 * math.log(3.0)]])
    teacher = torch.zeros(1, 2)
    want = 16 * (0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0))
    assert torch_reference.kd(student, teacher).item() == pytest.approx(want, rel=1e-5)


def test_torch_reference_steps_run_and_lower_their_loss():
    pytest.importorskip("torch")
    from bkd_jax.bench import torch_reference

    for method in torch_reference.METHODS:
        step = torch_reference.ReferenceStep(method, ("resnet8", "resnet8"), 8, 16, 10)
        first = step().item()
        for _ in range(3):
            last = step().item()
        assert math.isfinite(first) and last < first, method


def test_gpu_script_smoke_mode(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        [sys.executable, "-m", "bkd_jax.bench.gpu", "--smoke", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"},  # compiles fast
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "### resnet8 -> resnet8, 32 px, batch 4, bfloat16" in text
    assert "### imagenet_resnet18 -> imagenet_resnet18" in text
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    jax_rows = ["kd", "blockkd", "kd"]
    torch_rows = ["kd torch", "blockkd torch", "kd torch"] if bench.torch_available() else []
    assert sorted(x for x in labels if x != "variant") == sorted(jax_rows + torch_rows)
    assert "nan" not in text


def test_input_bench_runs_the_pipeline_on_generated_jpegs(tmp_path):
    pytest.importorskip("tensorflow")
    from bkd_jax.bench import input as input_bench

    measured = input_bench.rows(tmp_path, None, count=1)
    assert [what for _, what, *_ in measured][:8] == [
        "pad-crop-flip (train)",
        "random-resized crop 224, window decoded (train)",
        "resize 256, centre crop 224 (eval)",
        *(f"stage: {stage}" for stage in input_bench.CROP_STAGES),
    ]
    assert all(rate > 0 and per_core > 0 for *_, rate, per_core in measured)


@pytest.mark.parametrize(
    "command, flag",
    [
        ("bkd_jax.bench", "--pair"),
        ("bkd_jax.bench.gpu", "--smoke"),
        ("bkd_jax.bench.input", "--cifar_tarball"),
    ],
)
def test_the_package_commands_run_with_their_own_flags(command, flag):
    if command.endswith("input"):
        pytest.importorskip("tensorflow")
    result = subprocess.run(
        [sys.executable, "-m", command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert flag in result.stdout, result.stderr[-3000:]  # absl's --help exits with 1


def test_distill_overrides_give_a_row_per_value_with_those_knobs(monkeypatch):
    rows = bench.distill_rows(
        ["blockkd.distance=kd|wkd_l|mlkd", "blockkd.wkd_l.cost_sharpen=2"], ["kd", "blockkd"]
    )
    assert rows["kd"] == [()]
    assert [dict(knobs) for knobs in rows["blockkd"]] == [
        {"distance": d, "wkd_l.cost_sharpen": 2} for d in ("kd", "wkd_l", "mlkd")
    ]
    base = bench.Variant("kd")
    got = bench.variants(base, ["kd", "blockkd"], ["remat"], ["blockkd"], rows)
    labels = [v.label(base) for v in got]
    assert labels[:3] == [
        "kd",
        "blockkd distance=kd wkd_l.cost_sharpen=2",
        "blockkd distance=wkd_l wkd_l.cost_sharpen=2",
    ]
    assert labels[4] == "blockkd +remat distance=kd wkd_l.cost_sharpen=2"
    assert got[-1].torch and got[-1].knobs == ()  # the reference runs the defaults
    seen = []
    monkeypatch.setattr(bench.distillers, "make_distiller", lambda cfg, *a, **k: seen.append(cfg))
    runner = object.__new__(bench.Bench)  # no teacher: only the config is looked at
    runner.pair, runner.classes = ("resnet8", "resnet8"), 10
    runner.batch = {"image": np.zeros((1, 8, 8, 3), np.float32)}
    runner.distiller(got[2])
    assert seen[0].method == "blockkd" and seen[0].blockkd.distance == "wkd_l"
    assert seen[0].blockkd.wkd_l.cost_sharpen == 2.0 and seen[0].blockkd.gamma == 1.0


@pytest.mark.parametrize(
    "value, message",
    [
        ("blockkd.distanse=kd", "blockkd has no knob 'distanse'; knobs there: alpha,"),
        ("blockkd.wkd_l.nope=1", "no knob 'wkd_l.nope'; knobs there: cost_matrix,"),
        ("blockkd.gamma.x=1", "blockkd.gamma has no knobs"),
        ("blockkd.gamma=abc", "'abc' is not a value of the kind of 1.0"),
        ("dkd.beta=1", "names 'dkd', which --methods does not time"),
        ("blockkd=1", "must be METHOD.KNOB=VALUE"),
    ],
)
def test_distill_overrides_refuse_unknown_knobs_and_bad_values(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.distill_rows([value], ["blockkd"])


def test_bench_command_refuses_an_unknown_distill_knob_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "bkd_jax.bench", "--methods=blockkd", "--distill=blockkd.tau=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--distill: blockkd has no knob 'tau'" in result.stderr.strip().splitlines()[-1]
