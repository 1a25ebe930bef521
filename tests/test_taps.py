"""`BlockNet.taps`: one pass gives mdistiller's feats, preact_feats and pooled_feat.

Shapes are written out from the published architectures (mdistiller's
`models/cifar/*.py`, `models/imagenet/*.py`) at the test input sizes, NHWC. Numerical
agreement with those PyTorch models is in test_convert.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MAP_MODELS, images, input_size, random_variables

from bkd_jax import blocknet, models, shapes

BATCH = 2


def _cifar_resnet(f: tuple[int, int, int, int]):
    return (32, f[0]), ((32, f[1]), (16, f[2]), (8, f[3])), f[3]


def _imagenet_resnet(expansion: int):
    widths = [expansion * c for c in (64, 128, 256, 512)]
    return (32, 64), tuple(zip((16, 8, 4, 2), widths)), widths[-1]


def _wrn(widen: int):
    return (32, 16), ((32, 16 * widen), (16, 32 * widen), (8, 64 * widen)), 64 * widen


# name -> ((side, channels) of the stem, of each native block, pooled width), at 32 pixels
# (CIFAR) or 64 (ImageNet).
SHAPES = {
    **{
        n: _cifar_resnet((16, 16, 32, 64))
        for n in ("resnet8", "resnet20", "resnet32", "resnet56", "resnet110")
    },
    "resnet8x4": _cifar_resnet((32, 64, 128, 256)),
    "resnet32x4": _cifar_resnet((32, 64, 128, 256)),
    "resnet50": ((32, 64), ((32, 256), (16, 512), (8, 1024), (4, 2048)), 2048),
    "wrn_16_1": _wrn(1),
    "wrn_16_2": _wrn(2),
    "wrn_40_1": _wrn(1),
    "wrn_40_2": _wrn(2),
    # block0 is the stem; pool3 is skipped below 64 pixels.
    "vgg8": ((32, 64), ((16, 128), (8, 256), (4, 512), (4, 512)), 512),
    "vgg13": ((32, 64), ((16, 128), (8, 256), (4, 512), (4, 512)), 512),
    # Stride-2 stem; width 0.5 halves 32, 24, 32, 96, 320 (the last 160 before the 1x1 conv2).
    "mobilenetv2": ((16, 16), ((16, 12), (8, 16), (4, 48), (2, 160)), 1280),
    "shufflenetv1": ((32, 24), ((16, 240), (8, 480), (4, 960)), 960),
    "shufflenetv2": ((32, 24), ((16, 116), (8, 232), (4, 464)), 1024),
    "imagenet_resnet18": _imagenet_resnet(1),
    "imagenet_resnet34": _imagenet_resnet(1),
    "imagenet_resnet50": _imagenet_resnet(4),
    "imagenet_mobilenetv1": ((32, 32), ((16, 128), (8, 256), (4, 512), (2, 1024)), 1024),
}


def num_classes(name: str) -> int:
    return 1000 if name.startswith("imagenet_") else 100


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _shuffle(x: np.ndarray, groups: int) -> np.ndarray:
    """Channel c = i * C/g + j goes to j * g + i, by index arithmetic."""
    channels = x.shape[-1]
    out = np.empty_like(x)
    for c in range(channels):
        i, j = divmod(c, channels // groups)
        out[..., j * groups + i] = x[..., c]
    return out


def _bn(x: np.ndarray, stats, params) -> np.ndarray:
    """Inference BatchNorm, float64, from the formula."""
    x = np.asarray(x, np.float64)
    mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
    scale, bias = np.asarray(params["scale"], np.float64), np.asarray(params["bias"], np.float64)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _check_preact(name, net, variables, taps):
    """Each family's preact against its block output, as the model docstrings state."""
    relu = lambda a: np.maximum(np.asarray(a), 0.0)  # noqa: E731
    if name.startswith("wrn"):
        # The BatchNorm that opens what follows, before its ReLU.
        bns = [("block2", "block2", "layer_0", "bn1"), ("block3", "block3", "layer_0", "bn1")]
        bns.append(("head", "bn1"))
        for block, preact, (part, *path) in zip(taps.blocks, taps.preact, bns, strict=True):
            stats, params = variables["batch_stats"][part], variables["params"][part]
            for key in path:
                stats, params = stats[key], params[key]
            np.testing.assert_allclose(preact, _bn(block, stats, params), rtol=1e-4, atol=1e-4)
    elif name == "mobilenetv2":
        for block, preact in zip(taps.blocks, taps.preact, strict=True):
            np.testing.assert_array_equal(block, preact)
    elif name == "shufflenetv2":
        for block, preact in zip(taps.blocks, taps.preact, strict=True):
            np.testing.assert_array_equal(block, _shuffle(relu(preact), 2))
    else:
        for block, preact in zip(taps.blocks, taps.preact, strict=True):
            np.testing.assert_array_equal(block, relu(preact))
            assert (np.asarray(preact) < 0).any()  # a pre-activation, not the output again


@pytest.mark.parametrize("name", MAP_MODELS)
def test_taps_of_every_zoo_model(name):
    net = models.get_model(name, num_classes(name))
    size = input_size(name)
    x = images(BATCH, size)
    variables = random_variables(shapes.variable_shapes(net, x.shape), seed=0)

    logits, taps, _ = net.taps(variables, x)
    _close(logits, net.apply(variables, x)[0])
    stem, block_shapes, pooled = SHAPES[name]
    nhwc = lambda side_channels: (BATCH, side_channels[0], side_channels[0], side_channels[1])  # noqa: E731
    assert taps.stem.shape == nhwc(stem)
    assert [b.shape for b in taps.blocks] == [nhwc(s) for s in block_shapes]
    assert [p.shape for p in taps.preact] == [nhwc(s) for s in block_shapes]
    assert taps.pooled.shape == (BATCH, pooled)
    _close(net.apply_head(variables, taps.blocks[-1])[0], logits)
    # The pooled embedding is what the classifier (the head's one 2-D kernel) reads.
    head = variables["params"]["head"].values()
    (fc,) = [m for m in head if "kernel" in m and m["kernel"].ndim == 2]
    _close(taps.pooled @ fc["kernel"] + fc["bias"], logits)

    # Native blocks are BlockNet blocks, except VGG's block 1, which is the stem.
    _, feats, _ = net.features(variables, x)
    native = feats[1:] if name.startswith("vgg") else feats
    if name.startswith("vgg"):
        _close(taps.stem, feats[0])
    for tapped, feat in zip(taps.blocks, native, strict=True):
        _close(tapped, feat)
    _check_preact(name, net, variables, taps)

    train_logits, train_taps, trained = net.taps(variables, x, train=True)
    expected_logits, expected = net.apply(variables, x, train=True)
    _close(train_logits, expected_logits)
    assert jax.tree.structure(trained) == jax.tree.structure(expected)
    jax.tree.map(_close, trained, expected)
    assert not np.allclose(train_taps.blocks[-1], taps.blocks[-1], atol=1e-4)  # batch stats


def test_taps_jit_and_cost_no_more_than_apply():
    net = models.get_model("resnet8", 10)
    x = images(BATCH, 32)
    variables = random_variables(shapes.variable_shapes(net, x.shape), seed=0)
    logits, taps, _ = jax.jit(net.taps)(variables, x)
    eager_logits, eager_taps, _ = net.taps(variables, x)
    _close(logits, eager_logits)
    jax.tree.map(_close, taps, eager_taps)
    # Taps are tensors the forward pass computes anyway: no operation is added.
    apply_eqns = len(jax.make_jaxpr(net.apply)(variables, x).eqns)
    taps_eqns = len(jax.make_jaxpr(net.taps)(variables, x).eqns)
    assert apply_eqns == taps_eqns


class _Block(nn.Module):
    record: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x, train=False):
        for name in self.record:
            blocknet.tap(self, name, x)
        return x + 1.0


def _toy(*records: tuple[str, ...]) -> blocknet.BlockNet:
    *blocks, head = (_Block(r) for r in records)
    return blocknet.BlockNet("toy", tuple(blocks), head)


@pytest.mark.parametrize(
    "records, message",
    [
        ((("stem", "preact"), (), ("pooled",)), "block2 records no pre-activation"),
        ((("stem", "preact"), ("preact",), ("input_preact", "pooled")), "recorded twice"),
        ((("preact",), ("preact",), ("pooled",)), "no 'stem' tap"),
        ((("stem", "preact"), ("preact",), ()), "no 'pooled' tap"),
        ((("stem", "preact", "feat"), ("preact",), ("pooled",)), r"unknown taps \['feat'\]"),
        ((("stem", "preact", "preact"), ("preact",), ("pooled",)), "'preact' 2 times"),
    ],
)
def test_incomplete_or_inconsistent_taps_are_refused(records, message):
    net = _toy(*records)
    x = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match=message):
        net.taps(net.init(jax.random.key(0), x), x)


def test_taps_assemble_by_the_recording_rules():
    # Block 1 is the stem alone; block 2's pre-activation comes from the head.
    net = _toy(("stem",), ("preact",), (), ("input_preact", "pooled"))
    x = jnp.zeros((1, 2, 2, 3))
    logits, taps, _ = net.taps(net.init(jax.random.key(0), x), x)
    assert float(taps.stem[0, 0, 0, 0]) == 0.0
    assert [float(b[0, 0, 0, 0]) for b in taps.blocks] == [2.0, 3.0]
    assert [float(p[0, 0, 0, 0]) for p in taps.preact] == [1.0, 3.0]
    assert float(taps.pooled[0, 0, 0, 0]) == 3.0 and float(logits[0, 0, 0, 0]) == 4.0
