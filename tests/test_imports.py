"""The pure core, the models, the configs, the bench, the report and the sweep load
without TensorFlow or orbax; the trainer and the accelerator study without TensorFlow.

A GPU machine with jax, flax, optax, ml_collections and numpy but no TensorFlow must be
able to build models and run the bench; each module is imported in a fresh interpreter
and its `sys.modules` checked.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "tensorflow_datasets", "orbax")
MODULES = (
    "bkd_jax.bench",
    "bkd_jax.bench.gpu",
    "bkd_jax.bench.mfu",
    "bkd_jax.config_defaults",
    "bkd_jax.models",
    "bkd_jax.blockwise",
    "bkd_jax.connectors",
    "bkd_jax.losses",
    "bkd_jax.distillers",
    "bkd_jax.steps",
    "bkd_jax.optim",
    "bkd_jax.training.prefetch",
    "bkd_jax.report",
    "bkd_jax.sweep",
)

# The trainer and what runs it: TensorFlow only once the host's tf.data pipeline is used.
TRAINER = (
    "bkd_jax.main",
    "bkd_jax.training.loop",
    "bkd_jax.training.inputs",
    "bkd_jax.data.arrays",
    "bkd_jax.demo",
    "bkd_jax.accelerator_study",
    "bkd_jax.wkd_cost",
    "bkd_jax.text_train",
)

_DRIVER = """
import importlib, pathlib, sys
heavy = {heavy!r}
for name in {modules!r}:
    importlib.import_module(name)
from bkd_jax.console import load_config_file
for path in sorted(pathlib.Path("configs").glob("*.py")):
    load_config_file(path)
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""


def _heavy_modules_loaded(heavy: tuple[str, ...], modules: tuple[str, ...]) -> str:
    code = _DRIVER.format(heavy=heavy, modules=modules)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_core_configs_and_bench_import_neither_tensorflow_nor_orbax():
    assert _heavy_modules_loaded(HEAVY, MODULES) == "[]"


def test_trainer_demo_and_study_import_no_tensorflow():
    assert _heavy_modules_loaded(("tensorflow", "tensorflow_datasets"), TRAINER) == "[]"


def test_the_check_sees_tensorflow_when_it_is_imported():
    code = "import sys; import bkd_jax.data.pipeline; print('tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.stdout.strip() == "True", result.stderr[-3000:]
