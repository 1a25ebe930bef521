"""Vision Transformers (timm's `deit_*_patch16_224` and CIFAR variants) as BlockNets.

The architecture is that of timm's `VisionTransformer` as `deit_tiny/small/base_patch16_224`
configure it (Touvron et al., "Training data-efficient image transformers", 2021): a p x p
stride-p patch convolution, a class token and learned position embeddings over the
1 + g*g tokens, `depth` pre-norm encoder layers (LayerNorm, multi-head self-attention
with a qkv bias, residual; LayerNorm, MLP with exact GELU, residual; LayerNorm epsilon
1e-6), a final LayerNorm and a linear classifier on the class token. The `_cifar`
variants take 32-pixel images in 4-pixel patches (1 + 64 tokens).

Cut into blocks: block 1 is the patch embedding, class token and position embeddings
followed by the first `depth / groups` encoder layers; each further block is the next
`depth / groups` consecutive layers (12 layers, 4 groups: layers 0-2, 3-5, 6-8, 9-11);
the head is the final LayerNorm, class-token pooling and the classifier. Blocks output
the token sequence `(batch, 1 + g*g, dim)`, class token first, then the patch grid
row-major (`BlockNet.prefix_tokens = 1`). There is no dropout or drop-path: the BlockNet
contract passes no random keys (the DeiT recipe's stochastic depth is not available), and
no BatchNorm, so training and inference compute the same function.

Taps (`BlockNet.taps`), so that every NHWC feature method runs on a ViT: `stem` is the
patch embedding after the position embeddings, its patch tokens as a `(batch, g, g, dim)`
map (the class token left out); a block's `preact` is its output's patch tokens as such
a map (an encoder layer ends with a residual sum, not a ReLU, so the pre-activation is the
output itself); `blocks` are those same maps (`BlockNet.tapped_features` gives networks
with `prefix_tokens` their blocks' patch grids, while `features` keeps the token
sequences); `pooled` is the class token after the final LayerNorm, `(batch, dim)`.

Submodules carry the names of timm's state-dict paths (`blocks.3.attn.qkv` ->
`blocks_3/attn/qkv`, `cls_token` and `pos_embed` parameters of block 1), which is what
lets `bkd_jax.convert` map timm weights generically.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax.blocknet import POOLED, PREACT, STEM, BlockNet, patch_grid, tap

# timm's `init_weights_vit_timm` (timm/models/vision_transformer.py): Linear weights
# trunc_normal_(std=.02), biases zero; `VisionTransformer.init_weights`: pos_embed
# trunc_normal_(std=.02), cls_token normal_(std=1e-6). trunc_normal_'s bounds are absolute
# (+-2), a hundred standard deviations out, so the draw is a plain normal(0.02). The patch
# convolution keeps PyTorch's default, kaiming_uniform_(a=sqrt(5)): uniform with variance
# 1 / (3 fan_in).
dense_init = nn.initializers.normal(0.02)
patch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
cls_init = nn.initializers.normal(1e-6)
LN_EPSILON = 1e-6  # timm's ViT: norm_layer = partial(nn.LayerNorm, eps=1e-6)
PREFIX_TOKENS = 1  # the class token, ahead of the patch tokens


def _dense(features: int, dtype: jnp.dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=dense_init, name=name)


def _layer_norm(dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection (with bias), softmax in float32."""

    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.heads
        # qkv's features are laid out (3, heads, head_dim), as timm reshapes them.
        qkv = _dense(3 * self.dim, self.dtype, "qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.heads, head_dim), 2, 0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, self.dim)
        return _dense(self.dim, self.dtype, "proj")(out)


class Mlp(nn.Module):
    """fc1, exact (erf) GELU, fc2."""

    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(_dense(self.hidden, self.dtype, "fc1")(x), approximate=False)
        return _dense(self.dim, self.dtype, "fc2")(x)


class PatchEmbed(nn.Module):
    """The p x p stride-p patch convolution (`proj`, with bias): NHWC -> (B, g, g, dim)."""

    dim: int
    patch: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch
        conv = nn.Conv(
            self.dim, (p, p), (p, p), "VALID", dtype=self.dtype, kernel_init=patch_init, name="proj"
        )
        return conv(images)


class EncoderLayer(nn.Module):
    """A pre-norm transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    dim: int
    heads: int
    mlp_hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        attn = Attention(self.dim, self.heads, self.dtype, name="attn")
        x = x + attn(_layer_norm(self.dtype, "norm1")(x))
        mlp = Mlp(self.dim, self.mlp_hidden, self.dtype, name="mlp")
        return x + mlp(_layer_norm(self.dtype, "norm2")(x))


class LayerGroup(nn.Module):
    """One BlockNet block: encoder layers `first`..`first + count - 1` (`blocks_{i}`).

    With `patch` set it is block 1 and opens with the embedding: the patch convolution
    (`patch_embed.proj`), the class token and the position embeddings.
    """

    dim: int
    heads: int
    mlp_hidden: int
    first: int
    count: int
    patch: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no BatchNorm: one function in both modes
        if self.patch is not None:
            x = self._embed(x)
        for i in range(self.first, self.first + self.count):
            layer = EncoderLayer(
                self.dim, self.heads, self.mlp_hidden, self.dtype, name=f"blocks_{i}"
            )
            x = layer(x)
        tap(self, PREACT, lambda: patch_grid(x, PREFIX_TOKENS))
        return x

    def _embed(self, images: jax.Array) -> jax.Array:
        """Patch tokens, class token prepended, plus position embeddings; taps the stem."""
        grid = PatchEmbed(self.dim, self.patch, self.dtype, name="patch_embed")(images)
        batch, g, _, dim = grid.shape
        cls_token = self.param("cls_token", cls_init, (1, 1, dim))
        pos_embed = self.param("pos_embed", dense_init, (1, 1 + g * g, dim))
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, dim))
        tokens = jnp.concatenate([cls, grid.reshape(batch, g * g, dim)], axis=1)
        tokens = tokens + pos_embed.astype(self.dtype)
        tap(self, STEM, lambda: patch_grid(tokens, PREFIX_TOKENS))
        return tokens


class ClassTokenHead(nn.Module):
    """Final LayerNorm (`norm`), the class token (the `pooled` tap), the classifier (`head`)."""

    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        pooled = _layer_norm(self.dtype, "norm")(x)[:, 0]
        tap(self, POOLED, pooled)
        return _dense(self.num_classes, self.dtype, "head")(pooled)


def vision_transformer(
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    image_size: int = 224,
    patch_size: int = 16,
    dim: int = 192,
    depth: int = 12,
    heads: int = 3,
    mlp_ratio: int = 4,
    groups: int = 4,
    in_channels: int = 3,
    name: str = "vit",
) -> BlockNet:
    """A ViT of `depth` layers cut into `groups` blocks of consecutive layers.

    Args:
      num_classes: classifier width.
      dtype: computation dtype (parameters stay float32; softmax runs in float32).
      image_size: the input side; the position embeddings fix it.
      patch_size: side of the square patches; must divide `image_size`.
      dim, depth, heads, mlp_ratio: width, layers, attention heads (must divide `dim`)
        and MLP hidden width / `dim`.
      groups: number of blocks; must divide `depth`.
      in_channels: channels of the input images.
      name: name for messages and the registry.
    """
    if groups < 1 or depth % groups:
        raise ValueError(f"{name}: groups={groups} must be a positive divisor of depth={depth}")
    if image_size % patch_size:
        raise ValueError(f"{name}: patch_size={patch_size} must divide image_size={image_size}")
    if dim % heads:
        raise ValueError(f"{name}: heads={heads} must divide dim={dim}")
    per_group = depth // groups
    layers = functools.partial(
        LayerGroup, dim, heads, mlp_ratio * dim, count=per_group, dtype=dtype
    )
    blocks = tuple(
        layers(first=k * per_group, patch=patch_size if k == 0 else None) for k in range(groups)
    )
    return BlockNet(
        name,
        blocks,
        ClassTokenHead(num_classes, dtype),
        post_activation=False,
        input_channels=in_channels,
        input_size=image_size,
        prefix_tokens=PREFIX_TOKENS,
    )


# DeiT's sizes (Touvron et al. 2021, Table 1; timm's deit_*_patch16_224): dim, heads.
_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}

MODELS = {
    f"vit_{size}{suffix}": functools.partial(
        vision_transformer,
        image_size=image,
        patch_size=patch,
        dim=dim,
        heads=heads,
        name=f"vit_{size}{suffix}",
    )
    for size, (dim, heads) in _SIZES.items()
    for suffix, image, patch in (("", 224, 16), ("_cifar", 32, 4))
}
