"""Shared test helpers: zoo input sizes and the optional ../shared data folder."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def input_size(model_name: str) -> int:
    """Smallest convenient input side: 32 for CIFAR models, 64 for ImageNet ones."""
    return 64 if model_name.startswith("imagenet_") else 32


def images(batch: int, size: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (a user's checkout has no shared/)")
    return SHARED_DATA
