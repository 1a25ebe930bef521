"""Hugging Face BERT checkpoints -> bkd_jax: conversion and forward parity.

Random weights are laid out under Hugging Face's keys; the reference forward is written
here in float64 numpy from BERT's definition (Devlin et al. 2019; transformers'
modeling_bert.py): embeddings summed and layer-normalised, post-norm layers, masked
softmax attention, erf GELU, tanh pooler on the first token, linear classifier. Where
transformers imports, its BertForSequenceClassification with the same weights is a
second reference.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.special import erf

from bkd_jax import convert, convert_bert
from bkd_jax.blocknet import text_input
from bkd_jax.models import bert

# A tiny random configuration: (vocabulary, positions, width, heads, ff width, layers).
VOCAB, POSITIONS, DIM, HEADS, HIDDEN, LAYERS, CLASSES = 50, 16, 16, 2, 24, 2, 3
OPTIONS = dict(
    dim=DIM, heads=HEADS, hidden=HIDDEN, depth=LAYERS, vocab_size=VOCAB, max_positions=POSITIONS
)


def hf_state_dict(
    seed: int = 0, classifier: bool = True, *, vocab: int = VOCAB, positions: int = POSITIONS,
    dim: int = DIM, hidden: int = HIDDEN, layers: int = LAYERS, classes: int = CLASSES,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Random float32 weights under BertForSequenceClassification's keys."""
    rng = np.random.default_rng(seed)
    shapes = {
        "bert.embeddings.word_embeddings.weight": (vocab, dim),
        "bert.embeddings.position_embeddings.weight": (positions, dim),
        "bert.embeddings.token_type_embeddings.weight": (2, dim),
        "bert.embeddings.LayerNorm.weight": (dim,),
        "bert.embeddings.LayerNorm.bias": (dim,),
    }
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):  # fmt: skip
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (dim, dim), (dim,)
        shapes[p + "intermediate.dense.weight"] = (hidden, dim)
        shapes[p + "intermediate.dense.bias"] = (hidden,)
        shapes[p + "output.dense.weight"] = (dim, hidden)
        shapes[p + "output.dense.bias"] = (dim,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (dim,), (dim,)
    shapes["bert.pooler.dense.weight"], shapes["bert.pooler.dense.bias"] = (dim, dim), (dim,)
    if classifier:
        shapes["classifier.weight"], shapes["classifier.bias"] = (classes, dim), (classes,)
    return {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _layer_norm(x, sd, prefix):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def numpy_bert(sd: dict[str, np.ndarray], ids, types, mask) -> np.ndarray:
    """BertForSequenceClassification's logits in float64, from the definition."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    batch, length = ids.shape
    x = (
        sd["bert.embeddings.word_embeddings.weight"][ids]
        + sd["bert.embeddings.position_embeddings.weight"][np.arange(length)][None]
        + sd["bert.embeddings.token_type_embeddings.weight"][types]
    )
    x = _layer_norm(x, sd, "bert.embeddings.LayerNorm")
    d = DIM // HEADS
    for i in range(LAYERS):
        p = f"bert.encoder.layer.{i}."

        def split(t):
            return t.reshape(batch, length, HEADS, d).transpose(0, 2, 1, 3)

        q, k, v = (
            split(_linear(x, sd, p + f"attention.self.{n}")) for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
        scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, DIM)
        x = _layer_norm(_linear(context, sd, p + "attention.output.dense") + x, sd,
                        p + "attention.output.LayerNorm")  # fmt: skip
        h = _linear(x, sd, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = _layer_norm(_linear(h, sd, p + "output.dense") + x, sd, p + "output.LayerNorm")
    pooled = np.tanh(_linear(x[:, 0], sd, "bert.pooler.dense"))
    return _linear(pooled, sd, "classifier")


def padded_batch(seed: int = 1):
    rng = np.random.default_rng(seed)
    lengths = np.array([9, 4, 6])
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, (3, 9)) * mask
    types = (np.arange(9)[None] >= lengths[:, None] // 2).astype(np.int64) * mask
    return ids, types, mask


@pytest.fixture(scope="module")
def converted():
    sd = hf_state_dict()
    return sd, convert_bert.from_state_dict("bert_2x128", sd, groups=2, **OPTIONS)


def test_converted_logits_equal_the_float64_definition(converted):
    sd, done = converted
    ids, types, mask = padded_batch()
    net = bert.get_model("bert_2x128", CLASSES, groups=2, **OPTIONS)
    logits, _ = net.apply(done.variables, text_input(ids, types, mask))
    np.testing.assert_allclose(logits, numpy_bert(sd, ids, types, mask), atol=1e-5)
    assert done.num_classes == CLASSES and not done.dropped and not done.initialised


def test_converted_logits_equal_transformers_bert(converted):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch = pytest.importorskip("torch")
    sd, done = converted
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=HIDDEN, max_position_embeddings=POSITIONS, num_labels=CLASSES,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    state = model.state_dict()
    assert set(state) - {"bert.embeddings.position_ids"} == set(sd)  # the same key layout
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    ids, types, mask = padded_batch()
    with torch.no_grad():
        theirs = model(
            input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types),
            attention_mask=torch.from_numpy(mask),
        ).logits.numpy()  # fmt: skip
    net = bert.get_model("bert_2x128", CLASSES, groups=2, **OPTIONS)
    ours, _ = net.apply(done.variables, text_input(ids, types, mask))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_files_convert_through_the_command(tmp_path, converted):
    from safetensors.numpy import save_file

    sd, done = converted
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    loaded = convert_bert.from_file("bert_2x128", path, groups=2, **OPTIONS)
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, done.variables)
    torch = pytest.importorskip("torch")
    for zip_format in (True, False):  # torch >= 1.6's zip archive, the legacy format
        bin_path = tmp_path / f"zip_{zip_format}" / "pytorch_model.bin"
        bin_path.parent.mkdir()
        tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
        torch.save(tensors, bin_path, _use_new_zipfile_serialization=zip_format)
        loaded = convert_bert.from_file("bert_2x128", bin_path, groups=2, **OPTIONS)
        jax.tree.map(np.testing.assert_array_equal, loaded.variables, done.variables)
    # The command builds bert_2x128's own tables, which the tiny vocabulary does not fit.
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--model", "bert_2x128", "--input", str(path), "--output",
                      str(tmp_path / "out")])  # fmt: skip
    assert exit_info.value.code == 1


def test_pretraining_checkpoints_drop_their_heads_and_keep_a_fresh_classifier():
    sd = hf_state_dict(classifier=False)
    sd["cls.predictions.bias"] = np.zeros(VOCAB, np.float32)
    sd["bert.embeddings.position_ids"] = np.arange(POSITIONS)[None]
    sd = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in sd.items()
    }
    with pytest.raises(ValueError, match="no classifier"):
        convert_bert.from_state_dict("bert_2x128", sd, **OPTIONS)
    done = convert_bert.from_state_dict("bert_2x128", sd, num_classes=4, **OPTIONS)
    assert done.num_classes == 4
    assert set(done.dropped) == {"cls.predictions.bias", "bert.embeddings.position_ids"}
    assert sorted(done.initialised) == [
        "head/classifier/bias (4,)",
        "head/classifier/kernel (16, 4)",
    ]
    np.testing.assert_array_equal(
        done.variables["params"]["block1"]["embeddings"]["LayerNorm"]["scale"],
        sd["bert.embeddings.LayerNorm.gamma"],
    )


def test_unknown_missing_and_misshapen_keys_are_all_named():
    sd = hf_state_dict()
    sd["bert.encoder.layer.7.output.dense.weight"] = np.zeros((DIM, HIDDEN), np.float32)
    del sd["bert.pooler.dense.bias"]
    sd["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((HIDDEN + 1, DIM), np.float32)
    with pytest.raises(ValueError) as error:
        convert_bert.from_state_dict("bert_2x128", sd, **OPTIONS)
    message = str(error.value)
    assert "bert.encoder.layer.7.output.dense.weight" in message
    assert "head/pooler/dense/bias" in message
    assert "bert.encoder.layer.0.intermediate.dense.weight: checkpoint (16, 25)" in message
    with pytest.raises(ValueError, match="3 classes, not 2"):
        convert_bert.from_state_dict("bert_2x128", hf_state_dict(), num_classes=2, **OPTIONS)


def test_the_command_writes_a_checkpoint(tmp_path):
    """A random checkpoint of bert_2x128's real size, converted by the command, read back."""
    from safetensors.numpy import save_file

    from bkd_jax.training import checkpointing

    sd = hf_state_dict(vocab=bert.VOCAB_SIZE, positions=bert.MAX_POSITIONS, dim=128,
                       hidden=512, classes=2)  # fmt: skip
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    convert.main(["--model", "bert_2x128", "--input", str(path), "--groups", "2",
                  "--output", str(tmp_path / "out")])  # fmt: skip
    variables, metadata = checkpointing.load_variables(tmp_path / "out")
    assert metadata["groups"] == 2 and metadata["num_classes"] == 2
    np.testing.assert_array_equal(
        variables["params"]["block2"]["layer_1"]["output"]["dense"]["kernel"],
        sd["bert.encoder.layer.1.output.dense.weight"].T,
    )
