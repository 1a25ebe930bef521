"""Shared test helpers: zoo input sizes, image folders and the optional real-data files.

Most of the suite's time is XLA compiling programs, and processes a test starts compile
some of the same ones (model inits, a digits train step). So before JAX is imported, the
run gets a persistent compilation cache in a temporary folder (removed at exit), which the
pytest-xdist workers and every subprocess inherit through the environment. A test that
sets JAX_COMPILATION_CACHE_DIR itself keeps its own. And unless XLA_FLAGS names a level,
XLA compiles at backend optimisation level 1: on a CPU the tests' programs compile faster
than at the default level (initialisers in half the time) and run about as fast. Level 0
compiles faster still but runs train steps several times slower; a test that runs a small
program a few times compiles it there (`jit_for_one_run`).
"""

from __future__ import annotations

import atexit
import functools
import os
import pathlib
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="bkd_jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # small programs too
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=1".strip()

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from bkd_jax import models

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def input_size(model_name: str) -> int:
    """`models.smallest_input_size` of zoo model `model_name`."""
    return models.smallest_input_size(models.get_model(model_name, 1))


# Zoo models whose blocks output feature maps; token models (ViT) have tests of their own
# (test_vit.py), at sizes small enough for CPUs.
MAP_MODELS = [name for name in models.available() if not models.get_model(name, 1).prefix_tokens]


def write_images(root: pathlib.Path, images: dict[str, dict[str, list[np.ndarray]]]) -> str:
    """Writes {split: {class: [uint8 HxWx3]}} as root/split/class/NN.png."""
    for split, classes in images.items():
        for name, arrays in classes.items():
            (root / split / name).mkdir(parents=True)
            for i, array in enumerate(arrays):
                PIL.Image.fromarray(array).save(root / split / name / f"{i:02d}.png")
    return str(root)


def random_variables(shapes, seed: int):
    """Random variables shaped like `shapes` (`ShapeDtypeStruct`s): kernels scaled by fan-in,
    running means near 0, variances and BatchNorm scales in [0.5, 2] (no BatchNorm is the
    identity), optimizer state 0.

    Drawn in NumPy: an eager `init` compiles a sampler per parameter shape, seconds for a
    deep network, where a test needs variables, not the initialisers' values."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if not jnp.issubdtype(s.dtype, jnp.floating) or "opt_state" in name:
            value = np.zeros(s.shape)
        elif name.endswith("['kernel']"):
            value = rng.normal(0.0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
        elif name.endswith(("['var']", "['scale']")):
            value = rng.uniform(0.5, 2.0, s.shape)
        else:
            value = rng.normal(0.0, 0.1, s.shape)
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# For a small program a test runs a few times (one step, a row of gradients per stone):
# without its LLVM optimisations XLA:CPU compiles a train step in about a third less time
# and runs it several times slower, which for a few runs saves more than it costs. Tests
# check values, not speed.
jit_for_one_run = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def in_float64(tree):
    """`tree` with its floating leaves in float64 (inside `jax.enable_x64`)."""
    floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
    return jax.tree.map(lambda x: x.astype(jnp.float64) if floating(x) else x, tree)


def images(batch: int, size: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


@pytest.fixture
def shared_data() -> pathlib.Path:
    """The folder of the real-data files (the CIFAR-10 JPEG tarball, PyTorch state-dict
    layouts); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"missing data files: no folder {SHARED_DATA}")
    return SHARED_DATA
