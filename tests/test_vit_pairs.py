"""Block-KD and the other distillers on pairs with ViTs: connectors, stones, methods, errors.

The token connectors' outputs are recomputed here in float64 numpy from their definitions
(space-to-depth as explicit patch slices, average pooling as means over windows, Dense as
a matrix product, LayerNorm with eps 1e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bkd_jax.connectors import ConvConnector, TokenConnector


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _layer_norm(x: np.ndarray, params) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * _np(params["scale"]) + _np(params["bias"])


def _random_params(variables, seed: int):
    """`variables` with every parameter redrawn, so that zero offsets and unit scales count."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _windows(x: np.ndarray, f: int) -> list[np.ndarray]:
    """The f x f windows of NHWC `x` in row-major order: (r, c) is rows f r..f r + f - 1."""
    n = x.shape[1] // f
    return [x[:, f * r : f * r + f, f * c : f * c + f] for r in range(n) for c in range(n)]


def _tokens_by_hand(patches: np.ndarray, prefix: np.ndarray | None, params) -> np.ndarray:
    """Dense per token, the prefix carried or made from the patch mean, LayerNorm."""
    kernel, bias = _np(params["proj"]["kernel"]), _np(params["proj"]["bias"])
    if prefix is not None:
        tokens = np.concatenate([prefix, patches], axis=1) @ kernel + bias
    else:
        projected = patches @ kernel + bias
        made = projected.mean(axis=1, keepdims=True) + _np(params["prefix_offset"])
        tokens = np.concatenate([made, projected], axis=1)
    return _layer_norm(tokens, params["norm"])


def test_patchify_is_space_to_depth_then_a_dense_layer_and_the_class_token_the_mean():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    module = TokenConnector(out_tokens=(5, 6), out_prefix=1)  # a 2x2 grid and a class token
    params = _random_params(module.init(jax.random.key(1), x)["params"], 2)
    y = module.apply({"params": params}, x)
    assert y.shape == (2, 5, 6)
    xs = _np(x)
    # Patch (r, c) holds the 2x2 window's pixels row by row, each pixel's 3 channels.
    patches = np.stack([w.reshape(2, 12) for w in _windows(xs, 2)], axis=1)
    np.testing.assert_allclose(_np(y), _tokens_by_hand(patches, None, params), atol=1e-5)


def test_pool_averages_windows_and_a_smaller_map_is_upsampled():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    module = TokenConnector(out_tokens=(5, 6), out_prefix=1, patchify=False)
    params = _random_params(module.init(jax.random.key(1), x)["params"], 2)
    xs = _np(x)
    patches = np.stack([w.mean((1, 2)) for w in _windows(xs, 2)], axis=1)
    want = _tokens_by_hand(patches, None, params)
    np.testing.assert_allclose(_np(module.apply({"params": params}, x)), want, atol=1e-5)
    # A 2x2 map into a 4x4 grid: each pixel repeated over a 2x2 block of patches.
    up = TokenConnector(out_tokens=(17, 6), out_prefix=1)
    small = x[:, :2, :2]
    up_params = _random_params(up.init(jax.random.key(1), small)["params"], 3)
    grid = np.repeat(np.repeat(_np(small), 2, axis=1), 2, axis=2).reshape(2, 16, 3)
    np.testing.assert_allclose(
        _np(up.apply({"params": up_params}, small)), _tokens_by_hand(grid, None, up_params),
        atol=1e-5,
    )  # fmt: skip


def test_tokens_to_tokens_pools_the_grid_and_carries_the_class_token():
    x = jax.random.normal(jax.random.key(0), (2, 1 + 16, 3))  # class token, 4x4 grid
    module = TokenConnector(out_tokens=(5, 6), out_prefix=1, in_prefix=1)
    params = _random_params(module.init(jax.random.key(1), x)["params"], 2)
    assert "prefix_offset" not in params  # the class token is carried, not made
    xs = _np(x)
    grid = xs[:, 1:].reshape(2, 4, 4, 3)
    patches = np.stack([w.mean((1, 2)) for w in _windows(grid, 2)], axis=1)
    want = _tokens_by_hand(patches, xs[:, :1], params)
    np.testing.assert_allclose(_np(module.apply({"params": params}, x)), want, atol=1e-5)


def test_tokens_to_map_drops_the_prefix_and_reads_the_grid():
    x = jax.random.normal(jax.random.key(0), (2, 1 + 4, 3))
    grid = x[:, 1:].reshape(2, 2, 2, 3)
    tokens = ConvConnector((4, 4, 5), relu=True, in_prefix=1)
    maps = ConvConnector((4, 4, 5), relu=True)
    variables = tokens.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, maps.init(jax.random.key(1), grid)
    )
    variables = {**variables, "params": _random_params(variables["params"], 2)}
    y = tokens.apply(variables, x)
    assert y.shape == (2, 4, 4, 5) and float(y.min()) >= 0
    # By hand: nearest upsampling by 2, the 1x1 convolution, BatchNorm's running
    # statistics (0 mean, unit variance at initialisation, eps 1e-5), ReLU.
    up = np.repeat(np.repeat(_np(grid), 2, axis=1), 2, axis=2)
    conv = np.einsum("nhwc,cd->nhwd", up, _np(variables["params"]["conv"]["kernel"])[0, 0])
    bn = variables["params"]["bn"]
    want = np.maximum(conv / np.sqrt(1 + 1e-5) * _np(bn["scale"]) + _np(bn["bias"]), 0)
    np.testing.assert_allclose(_np(y), want, atol=1e-5)
