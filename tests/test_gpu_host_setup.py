"""bkd_jax on a host shaped like the accelerator machines users rent, proven on a CPU.

A fresh virtual environment gets only jax, flax, optax, orbax-checkpoint, absl-py, numpy,
pillow, scikit-learn and ml_collections (what such a host has, plus ml_collections) at
the versions this interpreter runs, and bkd_jax with ``--no-deps``: no TensorFlow, no
tensorflow-datasets, no tensorboardX. In it, the accelerator study's smoke mode runs on a
small JPEG folder and `python -m bkd_jax.main` trains on the digits from device memory.
Building the environment takes seconds from pip's cache: this interpreter's pip installs
into it (the venv gets no pip of its own) without byte-compiling every module; the few
modules the runs import are compiled when first imported. The runs compile their XLA
programs at backend optimisation level 0 (a tenth of the default's compile time on a CPU;
what is tested is that the code runs, not how fast).
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HOST_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "absl-py",
    "numpy",
    "pillow",
    "scikit-learn",
    "ml_collections",
)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)


@pytest.fixture(scope="module")
def host_python(tmp_path_factory) -> pathlib.Path:
    """The Python of a fresh venv with the host's packages and bkd_jax (--no-deps)."""
    venv = tmp_path_factory.mktemp("gpu_host") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).check_returncode()
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile"]
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in HOST_PACKAGES]
    installed = run([*pip, *pins])
    if installed.returncode:
        pytest.skip(f"the package index is out of reach: {installed.stderr[-500:]}")
    run([*pip, "--no-deps", str(REPO)]).check_returncode()
    return python


# Level 0: the smoke runs' compilations take a tenth of the default level's time on a CPU.
FAST_COMPILE = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def jpeg_folder(root: pathlib.Path) -> pathlib.Path:
    """CIFAR-10's layout, 4 train and 2 test 32x32 JPEGs in each of 10 classes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
                PIL.Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")
    return root


def test_the_host_has_no_tensorflow(host_python):
    result = run([str(host_python), "-c", "import tensorflow"])
    assert "No module named 'tensorflow'" in result.stderr
    result = run([str(host_python), "-c", "import tensorflow_datasets"])
    assert "No module named 'tensorflow_datasets'" in result.stderr


def test_accelerator_study_smoke_mode(host_python, tmp_path):
    data = jpeg_folder(tmp_path / "cifar")
    result = run(
        [str(host_python), "-m", "bkd_jax.accelerator_study", f"--data={data}",
         f"--workdir={tmp_path / 'study'}", "--smoke", "--students=kd,blockkd"],
        cwd=tmp_path,
        env=FAST_COMPILE,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = (tmp_path / "study" / "study.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| teacher", "| kd", "| blockkd"]
    assert "n/a" not in "".join(table[2:])  # every run measured its rate and MFU


def test_digits_training_from_device_memory(host_python, tmp_path):
    where = run(
        [str(host_python), "-c", "import bkd_jax.configs as c; print(c.__path__[0])"],
        cwd=tmp_path,  # outside the checkout: the installed bkd_jax
    )
    configs = pathlib.Path(where.stdout.strip())
    result = run(
        [str(host_python), "-m", "bkd_jax.main", f"--config={configs / 'demo.py'}:role=teacher",
         f"--workdir={tmp_path / 'teacher'}", "--config.num_train_steps=5"],
        cwd=tmp_path,
        env={**FAST_COMPILE, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Input: device memory" in result.stderr
    assert (tmp_path / "teacher" / "results.json").exists()
