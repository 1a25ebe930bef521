"""The model zoo: every architecture as a `BlockNet`, by registry name.

Each family module exports `MODELS: dict[name, builder(num_classes, dtype) -> BlockNet]`.
"""

from __future__ import annotations

import jax.numpy as jnp

from bkd_jax.blocknet import BlockNet
from bkd_jax.models import (
    mobilenetv1,
    mobilenetv2,
    resnet_cifar,
    resnet_imagenet,
    shufflenet,
    vgg,
    vit,
    wrn,
)

_REGISTRY = {}
for _family in (
    resnet_cifar,
    wrn,
    vgg,
    mobilenetv2,
    shufflenet,
    resnet_imagenet,
    mobilenetv1,
    vit,
):
    _REGISTRY.update(_family.MODELS)


def available() -> list[str]:
    """Names accepted by `get_model`, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str, num_classes: int, dtype: jnp.dtype = jnp.float32) -> BlockNet:
    """Builds zoo model `name` with a `num_classes`-way classifier computing in `dtype`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(available())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return _REGISTRY[name](num_classes, dtype)


def smallest_input_size(net: BlockNet) -> int:
    """A small input side `net` accepts, for tracing shapes and for tests: the side a model
    with position embeddings requires (ViT), 64 for ImageNet models, 32 for CIFAR ones."""
    if net.input_size is not None:
        return net.input_size
    return 64 if net.name.startswith("imagenet_") else 32
