"""A network defined here, cut into blocks by hand, as a BlockNet: the contract is checked,
and Block-KD stepping-stones run between it and a zoo model in both directions."""

from __future__ import annotations

import itertools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bkd_jax import distillers, models, steps
from bkd_jax.blockwise import stepping_stones
from bkd_jax.config_defaults import distill_config
from bkd_jax.connectors import make_connectors
from bkd_jax.models import vit
from bkd_jax.own_model import as_blocknet, check_blocknet

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SIZE = 16  # resnet8's stages then run at 16, 8 and 4 pixels, like the model below
SHAPE = (SIZE, SIZE, 3)


class ConvBN(nn.Module):
    """conv 3x3, BatchNorm, ReLU; the mode under `train`, as zoo blocks take it."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.relu(x)


class DownBlock(nn.Module):
    """The same with the mode as Flax's own layers name it."""

    features: int

    @nn.compact
    def __call__(self, x, use_running_average: bool = True):
        x = nn.Conv(self.features, (3, 3), 2, use_bias=False)(x)
        return nn.relu(nn.BatchNorm(use_running_average=use_running_average)(x))


class Head(nn.Module):
    """Global average pooling and a classifier; no mode at all."""

    classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def own_net(classes: int = 10):
    return as_blocknet("tiny", (ConvBN(8), DownBlock(16), ConvBN(24, strides=2)), Head(classes))


def images(seed: int, batch: int = 8) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, *SHAPE))


def test_contract_holds_and_the_modes_reach_batchnorm():
    net = own_net()
    assert check_blocknet(net, SHAPE) == [(16, 16, 8), (8, 8, 16), (4, 4, 24)]
    x = images(0)
    variables = jax.jit(net.init)(jax.random.key(1), x)
    assert sorted(variables["params"]) == ["block1", "block2", "block3", "head"]

    @jax.jit
    def run(variables, x):
        return (
            net.apply(variables, x)[0],
            net.apply(variables, x[:2])[0],
            net.apply(variables, x, train=True),
            net.apply(variables, x[:2], train=True)[0],
        )

    full, pair, (logits, new), pair_train = run(variables, x)
    # Inference uses running statistics: an example's logits do not depend on its batch.
    np.testing.assert_allclose(full[:2], pair, rtol=1e-5, atol=1e-5)
    # Training normalises with the batch's statistics and updates the running ones,
    # in the wrapped block 2 (use_running_average) as in the plain blocks 1 and 3.
    assert logits.shape == (8, 10)
    assert not np.allclose(logits[:2], pair_train, atol=1e-3)
    for block in ("block1", "block2", "block3"):
        old, upd = (jax.tree.leaves(v["batch_stats"][block]) for v in (variables, new))
        assert any(not np.allclose(a, b) for a, b in zip(old, upd)), block


def test_contract_violations_are_named():
    flat_block = as_blocknet("flat", (ConvBN(8), Head(4)), Head(10))
    with pytest.raises(ValueError, match=r"flat: block 2 returns shape \(2, 4\); expected an NHWC"):
        check_blocknet(flat_block, SHAPE)
    with pytest.raises(ValueError, match="expected 3 input channels"):
        check_blocknet(own_net(), (SIZE, SIZE, 1))


class DropToken(nn.Module):
    """A token block that breaks the grid: drops the last token."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(x.shape[-1])(x[:, :-1])


def test_token_blocks_pass_the_contract_when_prefix_tokens_is_set():
    zoo_vit = vit.vision_transformer(10, image_size=16, patch_size=4, dim=32, depth=2, heads=2,
                                     groups=2)  # fmt: skip
    tokens = as_blocknet("mine", zoo_vit.blocks, zoo_vit.head, post_activation=False,
                         input_size=16, prefix_tokens=1)  # fmt: skip
    assert (tokens.input_size, tokens.prefix_tokens) == (16, 1)
    assert check_blocknet(tokens, SHAPE) == [(17, 32), (17, 32)]
    # The same blocks as a map network: the token sequences are refused...
    as_maps = as_blocknet("maps", zoo_vit.blocks, zoo_vit.head, input_size=16)
    with pytest.raises(
        ValueError, match=r"maps: block 1 returns shape \(2, 17, 32\); expected an NHWC"
    ):
        check_blocknet(as_maps, SHAPE)
    # ...and so are tokens whose patches are no square grid, or images of another side.
    broken = as_blocknet("broken", (zoo_vit.blocks[0], DropToken()), zoo_vit.head,
                         input_size=16, prefix_tokens=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"broken: block 2 returns shape .*: 16 tokens less 1"):
        check_blocknet(broken, SHAPE)
    with pytest.raises(ValueError, match="expected 16x16 images"):
        check_blocknet(tokens, (32, 32, 3))


@pytest.mark.parametrize("own_is_student", [True, False])
def test_stepping_stones_between_own_and_zoo_model(own_is_student):
    own, zoo = own_net(), models.get_model("resnet8", 10)
    student, teacher = (own, zoo) if own_is_student else (zoo, own)
    x = images(2)
    student_vars = student.init(jax.random.key(3), x)
    teacher_vars = teacher.init(jax.random.key(4), x)
    connectors = make_connectors(student, teacher, x.shape)
    connector_vars = connectors.init(jax.random.key(5))

    def stones(student_params, stones):
        variables = {**student_vars, "params": student_params}
        return stepping_stones(
            student, variables, teacher, teacher_vars, connectors, connector_vars, x,
            stones=stones, train=False,
        ).stone_logits  # fmt: skip

    @jax.jit
    def run(student_params):
        # N_2 by hand: T_head . T_3 . C_2 . S_2 . S_1
        h, _ = student.apply_range({**student_vars, "params": student_params}, x, 1, 2)
        h, _ = connectors.apply(connector_vars, 2, h)
        h, _ = teacher.apply_block(teacher_vars, 3, h)
        # Stone 1's loss reaches the student's first block through the connector and
        # the teacher's blocks 2..3, and nothing of the student after block 1.
        grads = jax.grad(lambda p: jnp.sum(stones(p, (1,))[1] ** 2))(student_params)
        return stones(student_params, (1, 2, 3)), teacher.apply_head(teacher_vars, h)[0], grads

    logits, by_hand, grads = run(student_vars["params"])
    assert sorted(logits) == [1, 2, 3]
    assert all(v.shape == (8, 10) for v in logits.values())
    np.testing.assert_allclose(logits[2], by_hand, rtol=1e-4, atol=1e-4)
    assert optax.global_norm(grads["block1"]) > 0
    assert optax.global_norm(grads["block3"]) == 0


def test_blockkd_training_steps_reduce_the_loss_of_an_own_student():
    student, teacher = own_net(), models.get_model("resnet8", 10)
    distiller = distillers.make_distiller(distill_config("blockkd"), student, teacher, (1, *SHAPE))
    optimizer = optax.sgd(0.05, momentum=0.9)
    x = images(6, batch=16)
    batch = {"image": x, "label": jnp.arange(16) % 10}
    teacher_vars = teacher.init(jax.random.key(7), x)
    state = steps.create_train_state(distiller, optimizer, jax.random.key(8), x[:1])
    step = jax.jit(steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0)))
    losses = []
    for _ in range(6):
        state, metrics = step(state, teacher_vars, batch)
        losses.append(float(metrics["loss"]))
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert int(state.step) == 6


def test_readme_bring_your_own_model_example_runs():
    (example,) = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert sorted(namespace["out"].stone_logits) == [1, 2, 3]
