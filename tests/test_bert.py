"""BERT encoders as text BlockNets: sizes, the padding mask through the blocks, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax.blocknet import MaskedTokens, text_input
from bkd_jax.models import bert

VOCAB = 100  # tiny vocabulary: the tests' models are bert_2x128 with small tables


def tiny(num_classes: int = 3, **options):
    options = {"vocab_size": VOCAB, "max_positions": 32, **options}
    return bert.get_model("bert_2x128", num_classes, **options)


def random_text(key, lengths, length: int):
    """A right-padded batch: random ids and segments up to each length, zeros after."""
    k1, k2 = jax.random.split(key)
    batch = len(lengths)
    mask = (jnp.arange(length)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)
    ids = jax.random.randint(k1, (batch, length), 1, VOCAB) * mask
    types = jax.random.randint(k2, (batch, length), 0, 2) * mask
    return text_input(ids, types, mask)


@pytest.fixture(scope="module")
def net_and_vars():
    net = tiny(groups=2)
    x = random_text(jax.random.key(0), [7, 3, 5], 8)
    return net, net.init(jax.random.key(1), x), x


def param_count(variables) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def abstract_count(name: str, num_classes: int = 2) -> int:
    net = bert.get_model(name, num_classes)
    x = jax.ShapeDtypeStruct((1, 3, 8), jnp.int32)
    return param_count(jax.eval_shape(net.init, jax.random.key(0), x))


@pytest.mark.parametrize("name", list(bert.SIZES))
def test_parameter_counts_of_every_size(name):
    depth, dim, _, hidden = bert.SIZES[name]
    embeddings = (bert.VOCAB_SIZE + bert.MAX_POSITIONS + bert.TYPE_VOCAB) * dim + 2 * dim
    layer = 4 * (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim) + 4 * dim
    pooler, classifier = dim * dim + dim, dim * 2 + 2
    assert abstract_count(name) == embeddings + depth * layer + pooler + classifier


def test_bert_base_has_the_parameters_of_bert_base_uncased():
    encoder_and_pooler = abstract_count("bert_base") - (768 * 2 + 2)
    assert encoder_and_pooler == 109_482_240  # bert-base-uncased, BertModel with pooler


@pytest.mark.parametrize("name", list(bert.SIZES))
def test_counts_equal_transformers_models_of_the_same_config(name):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch = pytest.importorskip("torch")
    depth, dim, heads, hidden = bert.SIZES[name]
    config = transformers.BertConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=hidden, num_labels=2,
    )  # fmt: skip
    with torch.device("meta"):  # shapes only, nothing allocated
        model = transformers.BertForSequenceClassification(config)
    assert abstract_count(name) == sum(p.numel() for p in model.parameters())


def test_blocks_pass_masked_tokens_and_chain_to_apply(net_and_vars):
    net, variables, x = net_and_vars
    h, _ = net.apply_block(variables, 1, x)
    assert isinstance(h, MaskedTokens)
    assert h.tokens.shape == (3, 8, 128)
    np.testing.assert_array_equal(h.mask, x[:, 2])
    h, _ = net.apply_block(variables, 2, h)
    logits, _ = net.apply(variables, x)
    np.testing.assert_allclose(net.apply_head(variables, h)[0], logits, atol=1e-6)


def test_groups_cut_the_same_function(net_and_vars):
    net, variables, x = net_and_vars
    one = tiny(groups=1)
    merged = {"params": {"block1": {**variables["params"]["block1"]}}}
    merged["params"]["block1"].update(variables["params"]["block2"])
    merged["params"]["head"] = variables["params"]["head"]
    np.testing.assert_allclose(one.apply(merged, x)[0], net.apply(variables, x)[0], atol=1e-5)


def test_a_padded_batch_gives_each_sequence_its_own_logits(net_and_vars):
    net, variables, x = net_and_vars
    batched, _ = net.apply(variables, x)
    for row, length in enumerate([7, 3, 5]):
        alone, _ = net.apply(variables, x[row : row + 1, :, :length])
        np.testing.assert_allclose(batched[row], alone[0], atol=2e-5)
    # Changing what sits at padded positions changes nothing.
    noisy = x.at[1, 0, 3:].set(42).at[1, 1, 3:].set(1)
    np.testing.assert_allclose(net.apply(variables, noisy)[0][1], batched[1], atol=1e-6)


def test_regression_head_has_one_output(net_and_vars):
    _, _, x = net_and_vars
    net = tiny(num_classes=1)
    assert net.apply(net.init(jax.random.key(0), x), x)[0].shape == (3, 1)


def test_bad_inputs_and_options_fail_in_words(net_and_vars):
    net, variables, x = net_and_vars
    with pytest.raises(ValueError, match=r"\(batch, 3, length\)"):
        net.apply(variables, x[:, :2])
    with pytest.raises(ValueError, match="integer token ids"):
        net.apply(variables, x.astype(jnp.float32))
    with pytest.raises(ValueError, match="groups=5"):
        tiny(groups=5)
    with pytest.raises(ValueError, match="unknown text model"):
        bert.get_model("bert_huge", 2)
    with pytest.raises(ValueError, match="no feature maps"):
        net.taps(variables, x)


def test_dropout_applies_in_training_with_a_key_only(net_and_vars):
    net, variables, x = net_and_vars
    inference, _ = net.apply(variables, x)
    trained = lambda rng: net.apply(variables, x, train=True, rng=rng)[0]  # noqa: E731
    key = jax.random.key(3)
    np.testing.assert_array_equal(trained(None), inference)  # no key: no dropout
    np.testing.assert_array_equal(trained(key), trained(key))  # a pure function of the key
    assert not np.allclose(trained(key), inference, atol=1e-3)
    assert not np.allclose(trained(key), trained(jax.random.key(4)), atol=1e-3)
    off = tiny(groups=2, dropout=0.0)
    np.testing.assert_array_equal(off.apply(variables, x, train=True, rng=key)[0], inference)


def test_dropout_sits_where_berts_does(net_and_vars):
    """transformers' BertForSequenceClassification drops out after the embeddings, on the
    attention probabilities, on each sublayer's output (attention and feed-forward) and on
    the pooled output: 1 + 3 per layer + 1 sites; each drops about its rate."""
    net, variables, x = net_and_vars
    sites = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, bert.nn.Dropout) and not args[1]:
            kept = args[0] != 0  # attention to padding is zero before dropout
            sites.append(float(jnp.sum((out == 0) & kept) / jnp.sum(kept)))
        return out

    with bert.nn.intercept_methods(record):
        net.apply(variables, x, train=True, rng=jax.random.key(5))
    depth = bert.SIZES["bert_2x128"][0]
    assert len(sites) == 1 + 3 * depth + 1
    assert 0.05 < np.mean(sites) < 0.15  # the rate, 0.1
