"""Every zoo model: exact parameter counts, shapes, and block-wise = whole-network apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MAP_MODELS, images, input_size, random_variables

from bkd_jax import models, shapes
from bkd_jax.models import vit

# Trainable parameters (BatchNorm running statistics excluded) of the PyTorch originals.
EXPECTED_PARAMS = {
    "resnet8": 83_892,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
    "imagenet_resnet18": 11_689_512,
    "imagenet_resnet34": 21_797_672,
    "imagenet_resnet50": 25_557_032,
    "imagenet_mobilenetv1": 4_231_976,
}


def num_classes(name: str) -> int:
    return 1000 if name.startswith("imagenet_") else 100


def test_registry_holds_exactly_the_zoo():
    # The ViTs' counts and behaviour are tested in test_vit.py.
    assert models.available() == sorted([*EXPECTED_PARAMS, *vit.MODELS])
    assert sorted(EXPECTED_PARAMS) == MAP_MODELS


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name):
    net = models.get_model(name, num_classes(name))
    variables = shapes.variable_shapes(net, (input_size(name), input_size(name), 3))
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == EXPECTED_PARAMS[name]


# Two images are enough for batch statistics to differ from the running ones.
BATCH = 2
# Eager `init` compiles a sampler per parameter shape; XLA compiles those of RBG keys
# markedly faster than threefry's.
RNG_IMPL = "rbg"


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MAP_MODELS)
def test_blocks_chain_to_apply_and_batchnorm_updates_only_in_training(name):
    net = models.get_model(name, num_classes(name))
    x = images(BATCH, input_size(name))
    variables = random_variables(shapes.variable_shapes(net, x.shape), seed=0)

    logits, same = net.apply(variables, x)
    assert same is variables  # inference returns the variables it was given
    assert logits.shape == (BATCH, num_classes(name))
    assert np.isfinite(np.asarray(logits)).all()
    h = x
    for i in range(1, net.num_blocks + 1):
        h, _ = net.apply_block(variables, i, h)
    _close(net.apply_head(variables, h)[0], logits)

    train_logits, trained = net.apply(variables, x, train=True)
    h, chained = x, variables
    for i in range(1, net.num_blocks + 1):
        h, chained = net.apply_block(chained, i, h, train=True)
    chained_logits, chained = net.apply_head(chained, h, train=True)
    _close(chained_logits, train_logits)
    jax.tree.map(_close, chained, trained)
    # Training mode normalises with batch statistics, so its logits differ from eval's.
    assert not np.allclose(train_logits, logits, atol=1e-4)

    # Every BatchNorm's running statistics move in training mode and only there.
    for part in variables["batch_stats"]:
        before, after = variables["batch_stats"][part], trained["batch_stats"][part]
        for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
            assert not np.array_equal(old, new), part
    jax.tree.map(np.testing.assert_array_equal, trained["params"], variables["params"])
    h = x
    for i, block in enumerate(net.blocks, 1):
        part = {c: t[net.part_name(i)] for c, t in variables.items() if net.part_name(i) in t}
        h, updates = block.apply(part, h, train=False, mutable=["batch_stats"])
        jax.tree.map(np.testing.assert_array_equal, updates, {"batch_stats": part["batch_stats"]})


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*resnet8x4"):
        models.get_model("resnet9", 100)


@pytest.mark.parametrize(
    "shape, message",
    [((32, 32, 3), "rank 3"), ((2, 32, 32, 1), "3 input channels"), ((2, 3, 32, 32), "channels")],
)
def test_bad_input_is_rejected_clearly(shape, message):
    net = models.get_model("resnet8", 100)
    with pytest.raises(ValueError, match=message):
        net.init(jax.random.key(0, impl=RNG_IMPL), jnp.zeros(shape))
    variables = net.init(jax.random.key(0, impl=RNG_IMPL), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=message):
        net.apply(variables, jnp.zeros(shape))


def test_block_index_out_of_range():
    net = models.get_model("resnet8", 100)
    with pytest.raises(ValueError, match=r"block index 4 outside 1\.\.3"):
        net.apply_block({}, 4, jnp.zeros((1, 8, 8, 64)))


def test_batch_norm_trains_as_torch_batchnorm2d():
    """Outputs and running statistics after two training steps, then the eval output,
    equal torch.nn.BatchNorm2d's (its running variance uses the unbiased batch variance)."""
    torch = pytest.importorskip("torch")
    from bkd_jax.models.layers import batch_norm

    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, size=(4, 3, 5, 5)).astype(np.float32) for _ in range(3)]
    reference = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        reference.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def nhwc(x):
        return jnp.asarray(x.transpose(0, 2, 3, 1))

    variables = batch_norm(True).init(jax.random.key(0), nhwc(batches[0]))
    params = {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.1, -0.2, 0.3])}
    stats = variables["batch_stats"]
    for x in batches[:2]:
        expected = reference.train()(torch.from_numpy(x)).detach().numpy()
        out, updates = batch_norm(True).apply(
            {"params": params, "batch_stats": stats}, nhwc(x), mutable=["batch_stats"]
        )
        stats = updates["batch_stats"]
        np.testing.assert_allclose(out, expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["mean"], reference.running_mean, rtol=1e-6)
        np.testing.assert_allclose(stats["var"], reference.running_var, rtol=1e-6)
    expected = reference.eval()(torch.from_numpy(batches[2])).detach().numpy()
    out = batch_norm(False).apply({"params": params, "batch_stats": stats}, nhwc(batches[2]))
    np.testing.assert_allclose(out, expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_batch_norm_refuses_one_value_per_channel():
    from bkd_jax.models.layers import batch_norm

    x = jnp.ones((1, 1, 1, 3))
    variables = batch_norm(True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(True).apply(variables, x, mutable=["batch_stats"])
