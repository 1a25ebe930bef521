"""BERT encoders (Devlin et al., 2019) as text BlockNets, in Hugging Face's layout.

The architecture is `transformers`' `BertForSequenceClassification`: word, position
(absolute, from 0) and segment-type embeddings summed and layer-normalised; `depth`
post-norm encoder layers, each multi-head self-attention (separate query, key and value
projections with biases, padding keys masked out) whose projected output is added to the
input and layer-normalised, then a feed-forward layer (exact erf GELU) added and
layer-normalised, every LayerNorm with BERT's epsilon 1e-12; a pooler (dense + tanh on
the first, [CLS], token) and a linear classifier. With `num_classes=1` the classifier is
a regression head (STS-B's similarity score), as `num_labels=1` makes it in transformers.

Cut into blocks: block 1 is the embeddings and the first `depth / groups` layers; each
further block the next `depth / groups` consecutive layers; the head the pooler and the
classifier. Block outputs are `bkd_jax.blocknet.MaskedTokens`: `(batch, length, dim)`
features with the padding mask carried beside them (the text contract of
`bkd_jax.blocknet.TextBlockNet`).

Dropout is BERT's: `dropout` (0.1, BertConfig's hidden_dropout_prob and
attention_probs_dropout_prob) after the embeddings, on the attention probabilities, on
each sublayer's output before its residual sum, and on the pooled output before the
classifier (classifier_dropout, which defaults to hidden_dropout_prob). It applies in
training when the part is given a `dropout` key (`bkd_jax.blocknet`): the trainer gives
one to the student's own forward pass. The student's blocks inside Block-KD's
stepping-stones get none, so the stones see the student without dropout.

Submodules carry the names of Hugging Face's state-dict paths
(`bert.encoder.layer.3.attention.self.query` -> `layer_3/attention/self/query`), which
is what `bkd_jax.convert_bert` relies on to read `pytorch_model.bin` or
`model.safetensors` files.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax.blocknet import MaskedTokens, TextBlockNet
from bkd_jax.parts import DROPOUT as DROPOUT_RNG

# transformers' BertConfig defaults (models/bert/configuration_bert.py): layer_norm_eps,
# initializer_range (normal std of every Linear and Embedding weight, biases zero,
# `BertPreTrainedModel._init_weights`), max_position_embeddings, type_vocab_size, and the
# uncased WordPiece vocabulary size of bert-base-uncased.
LN_EPSILON = 1e-12
DROPOUT = 0.1
dense_init = nn.initializers.normal(0.02)
MAX_POSITIONS = 512
TYPE_VOCAB = 2
VOCAB_SIZE = 30522


def _dense(features: int, dtype: jnp.dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=dense_init, name=name)


def _layer_norm(dtype: jnp.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, name="LayerNorm")


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (`bert.embeddings`)."""

    dim: int
    vocab_size: int
    max_positions: int
    type_vocab: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool
    ) -> jax.Array:
        def embed(size: int, name: str) -> nn.Embed:
            return nn.Embed(size, self.dim, dtype=self.dtype, embedding_init=dense_init, name=name)

        positions = jnp.arange(input_ids.shape[1])[None]
        x = (
            embed(self.vocab_size, "word_embeddings")(input_ids)
            + embed(self.max_positions, "position_embeddings")(positions)
            + embed(self.type_vocab, "token_type_embeddings")(token_type_ids)
        )
        return nn.Dropout(self.dropout)(_layer_norm(self.dtype)(x), deterministic)


class SelfAttention(nn.Module):
    """Scaled dot-product attention over the unmasked keys; softmax in float32."""

    dim: int
    heads: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        batch, length, _ = x.shape
        head_dim = self.dim // self.heads

        def heads(name: str) -> jax.Array:
            return _dense(self.dim, self.dtype, name)(x).reshape(batch, length, self.heads, -1)

        q, k, v = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        # Padding keys get the lowest float, as transformers' extended attention mask does.
        logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout)(weights, deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, self.dim)


class AddNorm(nn.Module):
    """Dense, residual sum, LayerNorm: BERT's `*.output` (post-norm)."""

    dim: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
        x = nn.Dropout(self.dropout)(_dense(self.dim, self.dtype, "dense")(x), deterministic)
        return _layer_norm(self.dtype)(x + residual)


class Attention(nn.Module):
    """Self-attention and its output projection with residual and LayerNorm."""

    dim: int
    heads: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        attend = SelfAttention(self.dim, self.heads, self.dropout, self.dtype, name="self")
        output = AddNorm(self.dim, self.dropout, self.dtype, name="output")
        return output(attend(x, mask, deterministic), x, deterministic)


class Intermediate(nn.Module):
    """The feed-forward expansion and exact (erf) GELU, BERT's `hidden_act="gelu"`."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.gelu(_dense(self.hidden, self.dtype, "dense")(x), approximate=False)


class EncoderLayer(nn.Module):
    """One post-norm BERT layer (`bert.encoder.layer.i`)."""

    dim: int
    heads: int
    hidden: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        attention = Attention(self.dim, self.heads, self.dropout, self.dtype, name="attention")
        x = attention(x, mask, deterministic)
        expanded = Intermediate(self.hidden, self.dtype, name="intermediate")(x)
        return AddNorm(self.dim, self.dropout, self.dtype, name="output")(
            expanded, x, deterministic
        )


class LayerGroup(nn.Module):
    """One block: encoder layers `first`..`first + count - 1` (`layer_{i}`).

    With `embed` it is block 1: it takes the packed `(batch, 3, length)` input and opens
    with the embeddings; otherwise it takes the previous block's `MaskedTokens`.
    """

    dim: int
    heads: int
    hidden: int
    first: int
    count: int
    embed: bool = False
    vocab_size: int = VOCAB_SIZE
    max_positions: int = MAX_POSITIONS
    type_vocab: int = TYPE_VOCAB
    dropout: float = DROPOUT
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array | MaskedTokens, train: bool = False) -> MaskedTokens:
        deterministic = not (train and self.has_rng(DROPOUT_RNG))
        if self.embed:
            input_ids, token_type_ids, mask = h[:, 0], h[:, 1], h[:, 2]
            embeddings = Embeddings(
                self.dim, self.vocab_size, self.max_positions, self.type_vocab, self.dropout,
                self.dtype, name="embeddings",
            )  # fmt: skip
            x = embeddings(input_ids, token_type_ids, deterministic)
        else:
            x, mask = h
        for i in range(self.first, self.first + self.count):
            layer = EncoderLayer(
                self.dim, self.heads, self.hidden, self.dropout, self.dtype, name=f"layer_{i}"
            )
            x = layer(x, mask, deterministic)
        return MaskedTokens(x, mask)


class Head(nn.Module):
    """The pooler (dense + tanh on the first, [CLS], token) and the classifier."""

    dim: int
    num_classes: int
    dropout: float = DROPOUT
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: MaskedTokens, train: bool = False) -> jax.Array:
        deterministic = not (train and self.has_rng(DROPOUT_RNG))
        pooled = jnp.tanh(Pooler(self.dim, self.dtype, name="pooler")(h.tokens[:, 0]))
        pooled = nn.Dropout(self.dropout)(pooled, deterministic)
        return _dense(self.num_classes, self.dtype, "classifier")(pooled).astype(jnp.float32)


class Pooler(nn.Module):
    """`bert.pooler.dense`."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _dense(self.dim, self.dtype, "dense")(x)


def bert(
    num_classes: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    dim: int = 768,
    depth: int = 12,
    heads: int = 12,
    hidden: int = 3072,
    groups: int = 2,
    vocab_size: int = VOCAB_SIZE,
    max_positions: int = MAX_POSITIONS,
    type_vocab: int = TYPE_VOCAB,
    dropout: float = DROPOUT,
    name: str = "bert",
) -> TextBlockNet:
    """A BERT encoder of `depth` layers cut into `groups` blocks, with a classifier.

    Args:
      num_classes: classifier width; 1 for a regression head.
      dtype: computation dtype (parameters stay float32; softmax runs in float32).
      dim, depth, heads, hidden: width, layers, attention heads (must divide `dim`) and
        feed-forward width.
      groups: number of blocks; must divide `depth`.
      vocab_size, max_positions, type_vocab: the embedding tables' sizes.
      dropout: the dropout rate of training (module docstring); 0 turns it off.
      name: name for messages and the registry.
    """
    if groups < 1 or depth % groups:
        raise ValueError(f"{name}: groups={groups} must be a positive divisor of depth={depth}")
    if dim % heads:
        raise ValueError(f"{name}: heads={heads} must divide dim={dim}")
    if not 0 <= dropout < 1:
        raise ValueError(f"{name}: dropout={dropout} must be in [0, 1)")
    per_group = depth // groups
    layers = functools.partial(
        LayerGroup, dim, heads, hidden, count=per_group, vocab_size=vocab_size,
        max_positions=max_positions, type_vocab=type_vocab, dropout=dropout, dtype=dtype,
    )  # fmt: skip
    blocks = tuple(layers(first=k * per_group, embed=k == 0) for k in range(groups))
    head = Head(dim, num_classes, dropout, dtype)
    return TextBlockNet(name, blocks, head, post_activation=False)


# Sizes: (depth, dim, heads, feed-forward width). bert_base is bert-base-uncased (Devlin et
# al. 2019); bert_6x768 the 6-layer students of the GLUE distillation setups (DistilBERT,
# Sanh et al. 2019; PKD, Sun et al. 2019); bert_4x312 TinyBERT-4 (Jiao et al. 2020,
# huawei-noah/TinyBERT_General_4L_312D config: 12 heads, 1200 wide); bert_2x128 Google's
# smallest released BERT (bert_uncased_L-2_H-128_A-2, Turc et al. 2019), for tests.
SIZES = {
    "bert_base": (12, 768, 12, 3072),
    "bert_6x768": (6, 768, 12, 3072),
    "bert_4x312": (4, 312, 12, 1200),
    "bert_2x128": (2, 128, 2, 512),
    # The text demo's (bkd_jax.text_demo) teacher and student, with its own vocabulary.
    "bert_4x64": (4, 64, 2, 256),
    "bert_2x32": (2, 32, 2, 128),
}

MODELS = {
    name: functools.partial(bert, depth=depth, dim=dim, heads=heads, hidden=hidden, name=name)
    for name, (depth, dim, heads, hidden) in SIZES.items()
}


def get_model(
    name: str, num_classes: int, dtype: jnp.dtype = jnp.float32, **options
) -> TextBlockNet:
    """BERT size `name` (`SIZES`) with `options` of `bert` (e.g. `groups=3`)."""
    if name not in MODELS:
        raise ValueError(f"unknown text model {name!r}; known: {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return MODELS[name](num_classes, dtype, **options)
