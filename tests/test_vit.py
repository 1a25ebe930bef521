"""The ViT family: DeiT's exact parameter counts, blocks chaining to the whole network, one
function in both modes, taps as NHWC maps, and clear errors.

Behaviour is tested on a small ViT built with the family's builder (16-pixel images in
4-pixel patches, 4 layers in 2 blocks); the registry's sizes are only traced
(`jax.eval_shape`), for their parameter counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax import blocknet, convert, models
from bkd_jax.models import vit

# timm's deit_{tiny,small,base}_patch16_224, 1000 classes (the DeiT paper, Table 1: 5M,
# 22M, 86M parameters); `deit_params` derives them below.
DEIT_PARAMS = {"vit_tiny": 5_717_416, "vit_small": 22_050_664, "vit_base": 86_567_656}
SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # dim, heads

SMALL = dict(image_size=16, patch_size=4, dim=32, depth=4, heads=2, groups=2)
CLASSES = 10
BATCH = 2


def deit_params(dim: int, patch: int, image: int, classes: int, depth: int = 12) -> int:
    """Trainable parameters of a ViT, part by part, from the architecture."""
    tokens = 1 + (image // patch) ** 2
    patch_embed = patch * patch * 3 * dim + dim  # conv kernel + bias
    cls_token, pos_embed = dim, tokens * dim
    norm = 2 * dim  # LayerNorm scale + bias
    attention = (dim * 3 * dim + 3 * dim) + (dim * dim + dim)  # qkv, proj
    mlp = (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)  # fc1, fc2
    layer = norm + attention + norm + mlp
    head = dim * classes + classes
    return patch_embed + cls_token + pos_embed + depth * layer + norm + head


def param_count(net: blocknet.BlockNet, size: int) -> int:
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    assert list(variables) == ["params"]  # no BatchNorm statistics, nothing else
    return sum(p.size for p in jax.tree.leaves(variables))


def small_net(**overrides) -> blocknet.BlockNet:
    return vit.vision_transformer(CLASSES, **{**SMALL, **overrides})


def images(size: int = 16, batch: int = BATCH, seed: int = 0, channels: int = 3) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


@pytest.fixture(scope="module")
def small():
    net = small_net()
    x = images()
    return net, net.init(jax.random.key(1), x), x


def test_registry_names():
    names = {f"vit_{s}{v}" for s in SIZES for v in ("", "_cifar")}
    assert set(vit.MODELS) == names
    assert names <= set(models.available())


@pytest.mark.parametrize("name", sorted(DEIT_PARAMS))
def test_parameter_counts_are_deits(name):
    dim, _ = SIZES[name.removeprefix("vit_")]
    assert deit_params(dim, 16, 224, 1000) == DEIT_PARAMS[name]
    net = models.get_model(name, 1000)
    assert (net.input_size, net.prefix_tokens, net.num_blocks) == (224, 1, 4)
    assert not net.post_activation
    assert param_count(net, 224) == DEIT_PARAMS[name]


def test_cifar_variant_parameter_count():
    net = models.get_model("vit_small_cifar", 100)
    assert net.input_size == 32
    assert param_count(net, 32) == deit_params(384, 4, 32, 100)


def test_blocks_chain_to_apply_and_both_modes_compute_the_same(small):
    net, variables, x = small
    logits, _ = net.apply(variables, x)
    assert logits.shape == (BATCH, CLASSES)
    h = x
    for i in range(1, net.num_blocks + 1):
        h, _ = net.apply_block(variables, i, h)
        assert h.shape == (BATCH, 1 + 16, 32)  # class token + 4 x 4 patches
    np.testing.assert_allclose(net.apply_head(variables, h)[0], logits, rtol=1e-6, atol=1e-6)

    # LayerNorm has no batch statistics: training mode is the same function and
    # returns the variables untouched.
    train_logits, new = net.apply(variables, x, train=True)
    np.testing.assert_array_equal(train_logits, logits)
    jax.tree.map(np.testing.assert_array_equal, new, variables)
    # Per-example computation: an example's logits do not depend on its batch.
    np.testing.assert_allclose(net.apply(variables, x[:1])[0], logits[:1], rtol=1e-5, atol=1e-6)


def test_jit_equals_eager(small):
    net, variables, x = small
    np.testing.assert_allclose(
        jax.jit(net.apply)(variables, x)[0], net.apply(variables, x)[0], rtol=1e-5, atol=1e-6
    )


def test_variables_are_named_after_timm_state_dict_paths(small):
    _, variables, _ = small
    params = variables["params"]
    assert sorted(params) == ["block1", "block2", "head"]
    assert sorted(params["block1"]) == [
        "blocks_0",
        "blocks_1",
        "cls_token",
        "patch_embed",
        "pos_embed",
    ]
    assert sorted(params["block2"]) == ["blocks_2", "blocks_3"]
    assert sorted(params["head"]) == ["head", "norm"]
    layer = params["block2"]["blocks_3"]
    assert sorted(layer) == ["attn", "mlp", "norm1", "norm2"]
    assert sorted(layer["attn"]) == ["proj", "qkv"] and sorted(layer["mlp"]) == ["fc1", "fc2"]
    assert layer["attn"]["qkv"]["kernel"].shape == (32, 96)
    assert params["block1"]["patch_embed"]["proj"]["kernel"].shape == (4, 4, 3, 32)
    assert params["block1"]["cls_token"].shape == (1, 1, 32)
    assert params["block1"]["pos_embed"].shape == (1, 17, 32)


def test_compute_dtype_keeps_float32_parameters():
    net = small_net(dtype=jnp.bfloat16)
    x = images()
    variables = net.init(jax.random.key(1), x)
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, _ = net.apply(variables, x)
    assert logits.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits, np.float32)).all()


@pytest.mark.parametrize(
    "shape, message",
    [
        ((BATCH, 32, 32, 3), r"expected 16x16 images"),
        ((BATCH, 16, 16, 1), "expected 3 input channels"),
        ((16, 16, 3), "rank 3"),
    ],
)
def test_wrong_images_are_refused_clearly(small, shape, message):
    net, variables, _ = small
    with pytest.raises(ValueError, match=message):
        net.apply(variables, jnp.zeros(shape))
    with pytest.raises(ValueError, match=message):
        net.init(jax.random.key(0), jnp.zeros(shape))


def test_registry_vit_refuses_other_sizes():
    net = models.get_model("vit_tiny", 10)
    with pytest.raises(ValueError, match="vit_tiny: expected 224x224 images"):
        jax.eval_shape(
            net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"groups": 3}, "groups=3 must be a positive divisor of depth=4"),
        ({"groups": 0}, "groups=0 must be a positive divisor"),
        ({"patch_size": 5}, "patch_size=5 must divide image_size=16"),
        ({"heads": 3}, "heads=3 must divide dim=32"),
    ],
)
def test_bad_configurations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_net(**overrides)


@pytest.mark.parametrize("groups, per_block", [(1, 4), (4, 1)])
def test_groups_cut_the_layers(groups, per_block):
    net = small_net(groups=groups)
    x = images()
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    layers = [
        sorted(k for k in variables["params"][net.part_name(i)] if k.startswith("blocks_"))
        for i in range(1, groups + 1)
    ]
    assert layers == [
        [f"blocks_{j}" for j in range(k * per_block, (k + 1) * per_block)] for k in range(groups)
    ]


def test_taps_are_nhwc_maps_of_the_patch_tokens(small):
    net, variables, x = small
    logits, feats, taps, _ = net.tapped_features(variables, x)
    np.testing.assert_allclose(logits, net.apply(variables, x)[0], rtol=1e-6, atol=1e-6)
    g, dim = 4, 32
    params = variables["params"]

    # The stem: each 4x4 patch (rows, columns, channels) times the conv kernel, plus the
    # bias and the position embedding of its token (1 + row * g + column).
    patches = np.asarray(x).reshape(BATCH, g, 4, g, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    kernel = np.asarray(params["block1"]["patch_embed"]["proj"]["kernel"])
    stem = patches.reshape(BATCH, g, g, -1) @ kernel.reshape(-1, dim)
    stem += np.asarray(params["block1"]["patch_embed"]["proj"]["bias"])
    stem += np.asarray(params["block1"]["pos_embed"])[0, 1:].reshape(g, g, dim)
    np.testing.assert_allclose(taps.stem, stem, rtol=1e-5, atol=1e-5)

    # Blocks and pre-activations: the blocks' patch tokens, row-major, as maps.
    assert len(taps.blocks) == len(taps.preact) == net.num_blocks
    for feat, block, preact in zip(feats, taps.blocks, taps.preact, strict=True):
        assert feat.shape == (BATCH, 1 + g * g, dim)
        assert block.shape == (BATCH, g, g, dim)
        np.testing.assert_array_equal(block, preact)
        np.testing.assert_array_equal(block[:, 1, 2], feat[:, 1 + 1 * g + 2])

    # Pooled: the class token after the final LayerNorm, which the classifier reads.
    cls = np.asarray(feats[-1][:, 0], np.float64)
    norm = params["head"]["norm"]
    mean, var = cls.mean(-1, keepdims=True), cls.var(-1, keepdims=True)
    pooled = (cls - mean) / np.sqrt(var + 1e-6) * np.asarray(norm["scale"]) + np.asarray(
        norm["bias"]
    )
    np.testing.assert_allclose(taps.pooled, pooled, rtol=1e-5, atol=1e-5)
    head = params["head"]["head"]
    np.testing.assert_allclose(
        taps.pooled @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5
    )

    _, jit_taps, _ = jax.jit(net.taps)(variables, x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), jit_taps, taps
    )


# Conversion from timm's state dicts.


def timm_layout(dim: int, depth: int, patch: int, image: int, classes: int):
    """timm's VisionTransformer state-dict keys and shapes, written out from its layers."""
    tokens = 1 + (image // patch) ** 2
    layout = [
        ("cls_token", (1, 1, dim)),
        ("pos_embed", (1, tokens, dim)),
        ("patch_embed.proj.weight", (dim, 3, patch, patch)),
        ("patch_embed.proj.bias", (dim,)),
    ]
    linears = {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim)}
    linears |= {"mlp.fc1": (4 * dim, dim), "mlp.fc2": (dim, 4 * dim)}
    for i in range(depth):
        for norm in ("norm1", "norm2"):
            layout += [(f"blocks.{i}.{norm}.weight", (dim,)), (f"blocks.{i}.{norm}.bias", (dim,))]
        for name, (out, inp) in linears.items():
            layout += [
                (f"blocks.{i}.{name}.weight", (out, inp)),
                (f"blocks.{i}.{name}.bias", (out,)),
            ]
    layout += [("norm.weight", (dim,)), ("norm.bias", (dim,))]
    return [*layout, ("head.weight", (classes, dim)), ("head.bias", (classes,))]


def random_timm_state_dict(layout, seed: int = 0) -> dict[str, np.ndarray]:
    """Distinct random values; LayerNorm scales around 1, so that none is the identity."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in layout:
        if "norm" in key and key.endswith("weight"):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            scale = 1.0 if key in ("cls_token", "pos_embed") else 0.05
            sd[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return sd


def reference_forward(torch, sd, x, heads: int, patch: int):
    """timm's ViT forward from the architecture, with torch.nn.functional: logits and the
    final-normed class token."""
    F = torch.nn.functional
    w = {k: torch.from_numpy(np.asarray(v)).to(x.dtype) for k, v in sd.items()}
    dim = w["cls_token"].shape[-1]
    h = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2)  # (batch, patches, dim), patches row-major
    h = torch.cat([w["cls_token"].expand(len(x), -1, -1), h], dim=1) + w["pos_embed"]
    batch, tokens, _ = h.shape
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})

    def norm(t, name):
        return F.layer_norm(t, (dim,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-6)

    def linear(t, name):
        return F.linear(t, w[f"{name}.weight"], w[f"{name}.bias"])

    for i in range(depth):
        b = f"blocks.{i}"
        qkv = linear(norm(h, f"{b}.norm1"), f"{b}.attn.qkv")
        q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        h = h + linear(out, f"{b}.attn.proj")
        mlp = F.gelu(linear(norm(h, f"{b}.norm2"), f"{b}.mlp.fc1"))  # exact (erf) GELU
        h = h + linear(mlp, f"{b}.mlp.fc2")
    pooled = norm(h, "norm")[:, 0]
    return linear(pooled, "head"), pooled


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_timm_layout_converts_exactly():
    sd = random_timm_state_dict(timm_layout(192, 12, 4, 32, 10))
    variables = convert.from_pytorch_state_dict("vit_tiny_cifar", sd)
    block1, head = variables["params"]["block1"], variables["params"]["head"]
    np.testing.assert_array_equal(block1["cls_token"], sd["cls_token"])
    np.testing.assert_array_equal(block1["pos_embed"], sd["pos_embed"])
    np.testing.assert_array_equal(
        block1["patch_embed"]["proj"]["kernel"],
        sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
    )
    qkv = variables["params"]["block4"]["blocks_10"]["attn"]["qkv"]
    np.testing.assert_array_equal(qkv["kernel"], sd["blocks.10.attn.qkv.weight"].T)
    np.testing.assert_array_equal(qkv["bias"], sd["blocks.10.attn.qkv.bias"])
    np.testing.assert_array_equal(
        variables["params"]["block2"]["blocks_3"]["norm2"]["scale"], sd["blocks.3.norm2.weight"]
    )
    np.testing.assert_array_equal(head["norm"]["scale"], sd["norm.weight"])
    np.testing.assert_array_equal(head["head"]["kernel"], sd["head.weight"].T)
    assert sum(v.size for v in jax.tree.leaves(variables)) == sum(v.size for v in sd.values())


def test_converted_vit_matches_the_reference_forward():
    torch = pytest.importorskip("torch")
    sd = random_timm_state_dict(timm_layout(192, 12, 4, 32, 10), seed=1)
    variables = convert.from_pytorch_state_dict("vit_tiny_cifar", sd)
    x = np.asarray(images(32, seed=2))
    with torch.no_grad():
        nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))
        expected, expected_pooled = reference_forward(torch, sd, nchw, heads=3, patch=4)
    net = models.get_model("vit_tiny_cifar", 10)
    logits, taps, _ = net.taps(variables, jnp.asarray(x))
    diff = _max_diff(logits, expected.numpy())
    print(f"vit_tiny_cifar: max |flax float32 - torch float64| of the logits = {diff:.2e}")
    assert diff < 1e-4
    assert _max_diff(taps.pooled, expected_pooled.numpy()) < 1e-4


def test_a_checkpoint_of_another_size_is_refused_naming_the_keys():
    sd = random_timm_state_dict(timm_layout(192, 12, 16, 224, 10))  # deit_tiny at 224 px
    with pytest.raises(ValueError) as err:
        convert.from_pytorch_state_dict("vit_tiny_cifar", sd)
    message = str(err.value)
    assert "2 shape mismatches" in message
    assert "pos_embed: checkpoint (1, 197, 192), model (1, 65, 192)" in message
    assert "patch_embed.proj.weight: checkpoint (192, 3, 16, 16), model (192, 3, 4, 4)" in message
    del sd["blocks.11.attn.qkv.bias"]
    with pytest.raises(ValueError, match=r"blocks\.11\.attn\.qkv\.bias \(576,\)"):
        convert.from_pytorch_state_dict("vit_tiny", sd)


def test_timm_deit_tiny_converts_to_vit_tiny():
    """timm itself, where it imports: deit_tiny_patch16_224's own state dict and forward."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    assert sum(p.numel() for p in model.parameters()) == DEIT_PARAMS["vit_tiny"]
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert sorted(layout) == sorted(timm_layout(192, 12, 16, 224, 1000))
    for p in model.parameters():  # timm's init leaves biases and the class token near zero
        p.data.add_(0.02 * torch.randn_like(p))
    variables = convert.from_pytorch_state_dict("vit_tiny", model.state_dict())
    x = np.asarray(images(224, batch=1, seed=3))
    with torch.no_grad():
        expected = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    logits, _ = models.get_model("vit_tiny", 1000).apply(variables, jnp.asarray(x))
    diff = _max_diff(logits, expected)
    print(f"deit_tiny_patch16_224: max |flax - timm| of the logits = {diff:.2e}")
    assert diff < 1e-4


def test_command_line_converts_a_timm_file(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from bkd_jax.training import checkpointing

    sd = random_timm_state_dict(timm_layout(192, 12, 4, 32, 10), seed=4)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "vit.pth")
    out = tmp_path / "vit_tiny_cifar"
    convert.main(["--model", "vit_tiny_cifar", "--input", str(tmp_path / "vit.pth"),
                  "--output", str(out)])  # fmt: skip
    assert "vit_tiny_cifar (10 classes)" in capsys.readouterr().out
    variables, metadata = checkpointing.load_variables(out)
    assert metadata["model"] == "vit_tiny_cifar"
    jax.tree.map(
        np.testing.assert_array_equal,
        variables,
        convert.from_pytorch_state_dict("vit_tiny_cifar", sd),
    )


def test_patch_grid_folds_the_tokens_after_the_prefix_row_major():
    tokens = jnp.arange(2 * 10 * 5).reshape(2, 10, 5)  # a class token and 3 x 3 patches
    grid = blocknet.patch_grid(tokens, 1)
    assert grid.shape == (2, 3, 3, 5)
    np.testing.assert_array_equal(grid[1, 2, 0], tokens[1, 1 + 2 * 3 + 0])
    with pytest.raises(ValueError, match="10 tokens less 2 prefix tokens are not a square grid"):
        blocknet.patch_grid(tokens, 2)
    with pytest.raises(ValueError, match=r"expected tokens \(batch, tokens, dim\)"):
        blocknet.patch_grid(tokens[0], 1)
