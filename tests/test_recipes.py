"""Every recipe the configs offer builds, and its train step runs: no recipe ships untested.

For each config file, each of its published pairs and each registered method, the config
validates and its distiller and optimiser build (knobs, DOT's split). The train step is
traced for every pair with Block-KD, whose connectors are the only modules that depend on
the pair, and for every method on ImageNet's first pair; one jitted step of every method
runs on CIFAR-100's vgg13 -> vgg8 recipe, on a batch of two.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_for_one_run

from bkd_jax import console, distillers, models, optim, shapes, steps
from bkd_jax.training.validation import validate_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
IMAGE_SIZE = {"cifar100": 32, "imagenet2012": 32, "digits": 8}
CLASSES = {"cifar100": 100, "imagenet2012": 1000, "digits": 10}
NUM_EXAMPLES = 100  # training-set size for methods with per-example state (CRD's memory)


@functools.cache
def config_module(name: str):
    return console.load_config_file(CONFIGS / f"{name}.py")


def recipe(name: str, pair: tuple[str, str], method: str):
    module = config_module(name)
    if name == "demo":
        config = module.get_config(f"method={method}")
    else:
        config = module.get_config(f"teacher={pair[0]},student={pair[1]},method={method}")
    config.teacher_checkpoint = "/teacher"
    return config


def build(config):
    """Distiller, optimiser and a batch of two for `config` (random data)."""
    classes, size = CLASSES[config.dataset.name], IMAGE_SIZE[config.dataset.name]
    method = distillers.get(config.distill.method)
    student = models.get_model(config.student, classes)
    teacher = models.get_model(config.teacher, classes)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (2, size, size, 3)),
        "label": jnp.array([0, classes - 1], jnp.int32),
        "index": jnp.array([0, 1], jnp.int32),
        "image_strong": jax.random.normal(jax.random.key(1), (2, size, size, 3)),  # MLKD's
    }
    distiller = distillers.make_distiller(
        config.distill, student, teacher, batch["image"].shape, num_examples=NUM_EXAMPLES
    )
    optimizer = optim.make_optimizer(config.optim, 10, method.optimizer, total_steps=1000)
    return distiller, optimizer, teacher, batch


@functools.cache
def teacher_variables(teacher, image_shape: tuple[int, ...]):
    """The teacher's variables (read only by a step), computed once for every method."""
    return teacher.init(jax.random.key(1), jax.random.normal(jax.random.key(0), image_shape))


def train_step_shapes(config):
    distiller, optimizer, teacher, batch = build(config)
    teacher_vars = shapes.variable_shapes(teacher, batch["image"].shape)  # traced once a pair
    state = jax.eval_shape(
        lambda key: steps.create_train_state(distiller, optimizer, key, batch["image"]),
        jax.random.key(2),
    )
    step = steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0))
    return jax.eval_shape(step, state, teacher_vars, batch)


GRID = [
    (name, pair, method)
    for name in ("cifar100", "imagenet", "demo")
    for pair in config_module(name).PAIRS
    for method in distillers.available()
]


@pytest.mark.parametrize("name", ["cifar100", "imagenet", "demo"])
def test_every_pair_and_method_validates_and_builds(name):
    for _, pair, method in [g for g in GRID if g[0] == name]:
        config = recipe(name, pair, method)
        validate_config(config)
        assert (config.teacher, config.student) == pair or name == "demo"
        if "stones" not in distillers.get(method).consumes:  # Block-KD: traced below
            build(config)


@pytest.mark.parametrize("name", ["cifar100", "imagenet"])
def test_every_pair_traces_with_block_kd(name):
    for pair in config_module(name).PAIRS:
        _, metrics = train_step_shapes(recipe(name, pair, "blockkd"))
        assert metrics["loss"].shape == ()


def test_every_method_traces_on_an_imagenet_pair():
    for method in distillers.available():
        config = recipe("imagenet", config_module("imagenet").PAIRS[0], method)
        if method in ("wkd_f", "wkd"):  # 1x1 last maps at 32 pixels: no variance to match
            with pytest.raises(ValueError, match="for 1x1 maps"):
                train_step_shapes(config)
            continue
        _, metrics = train_step_shapes(config)
        assert np.dtype(metrics["loss"].dtype) == np.float32, method


@pytest.mark.parametrize("method", distillers.available())
def test_every_method_runs_one_jitted_step_of_a_cifar_recipe(method):
    config = recipe("cifar100", ("vgg13", "vgg8"), method)
    distiller, optimizer, teacher, batch = build(config)
    teacher_vars = teacher_variables(teacher, batch["image"].shape)
    state = steps.create_train_state(distiller, optimizer, jax.random.key(2), batch["image"])
    step = jit_for_one_run(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    new_state, metrics = step(state, teacher_vars, batch)
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1


@pytest.mark.parametrize(
    "name, pair, beta",
    [
        # DKD.BETA of mdistiller configs/cifar100/dkd/<pair>.yaml and configs/imagenet/<pair>/
        # dkd.yaml; resnet32x4 -> resnet8x4 has none and keeps CFG.DKD.BETA = 8.
        ("cifar100", ("resnet56", "resnet20"), 2.0),
        ("cifar100", ("vgg13", "vgg8"), 6.0),
        ("cifar100", ("resnet32x4", "resnet8x4"), 8.0),
        ("imagenet", ("imagenet_resnet34", "imagenet_resnet18"), 0.5),
        ("imagenet", ("imagenet_resnet50", "imagenet_mobilenetv1"), 2.0),
    ],
)
def test_a_pairs_dkd_beta_reaches_dkd_and_the_dkd_term_of_block_kd(name, pair, beta):
    assert recipe(name, pair, "dkd").distill.dkd.beta == beta
    for method in ("blockkd", "blockkd_lite"):
        assert recipe(name, pair, method).distill[method].dkd.beta == beta
