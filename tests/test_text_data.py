"""Text data: WordPiece ids, bucketed padding, GLUE's metrics and its missing-data error."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bkd_jax.data import text

# A tiny WordPiece vocabulary, one token a line; the line number is the id.
VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "un", "##believ",
    "##able", "!", "cafe", ",", "good", "a", "##s",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return text.wordpiece(path, max_length=16)


def test_a_fixed_sentence_and_pair_get_bert_wordpiece_ids(tokenizer):
    # Lower-cased, accents stripped, punctuation split off, greedy longest-match pieces:
    # [CLS] the movie was un ##believ ##able , cafe ! [SEP]; unknown words are [UNK].
    examples = text.TextExamples(
        ("The movie was UNBELIEVABLE, café!", "Zebras"), ("good movies", "a"), np.array([1, 0])
    )
    encoded = text.encode(tokenizer, examples)
    np.testing.assert_array_equal(
        encoded.ids[0], [2, 5, 6, 7, 8, 9, 10, 13, 12, 11, 3, 14, 6, 16, 3]
    )
    np.testing.assert_array_equal(encoded.types[0], [0] * 11 + [1] * 4)
    np.testing.assert_array_equal(encoded.ids[1], [2, 1, 3, 15, 3])


def test_truncation_is_longest_first_to_max_length(tokenizer):
    long = " ".join(["the"] * 30)
    encoded = text.encode(tokenizer, text.TextExamples((long,), ("good",), np.array([0])))
    assert len(encoded.ids[0]) == 16
    np.testing.assert_array_equal(encoded.ids[0][-3:], [3, 14, 3])  # b kept, a cut


def test_batches_pad_to_the_bucket_of_their_longest_sequence():
    lengths = [3, 20, 5, 9]
    data = text.Encoded(
        tuple(np.arange(1, n + 1, dtype=np.int32) for n in lengths),
        tuple(np.zeros(n, np.int32) for n in lengths), np.arange(4),
    )  # fmt: skip
    first, second = list(text.batches(data, 2, buckets=(8, 16, 32)))
    assert first["image"].shape == (2, 3, 32) and second["image"].shape == (2, 3, 16)
    np.testing.assert_array_equal(first["image"][0, 2], [1] * 3 + [0] * 29)
    np.testing.assert_array_equal(first["image"][0, 0, :4], [1, 2, 3, 0])
    shuffled = list(text.batches(data, 3, rng=np.random.default_rng(0), drop_remainder=True))
    assert len(shuffled) == 1 and len(set(shuffled[0]["label"])) == 3
    with pytest.raises(ValueError, match="longer than every bucket"):
        text.bucket_length(40, (8, 16, 32))


def test_glue_metrics_equal_their_definitions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    logits = rng.standard_normal((50, 2))
    predicted = logits.argmax(-1)
    tp = np.sum((predicted == 1) & (labels == 1))
    fp = np.sum((predicted == 1) & (labels == 0))
    fn = np.sum((predicted == 0) & (labels == 1))
    tn = np.sum((predicted == 0) & (labels == 0))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    found = text.glue_metrics(("accuracy", "f1", "matthews"), logits, labels)
    assert found["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert found["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert found["matthews"] == pytest.approx(mcc)
    scores, targets = rng.standard_normal(30), rng.uniform(0, 5, 30)
    found = text.glue_metrics(("pearson", "spearman"), scores[:, None], targets)
    assert found["pearson"] == pytest.approx(np.corrcoef(scores, targets)[0, 1])
    ranks = stats.rankdata(scores), stats.rankdata(targets)
    assert found["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1])
    with pytest.raises(ValueError, match="do not apply"):
        text.glue_metrics(("pearson",), logits, labels)


def test_glue_is_never_downloaded_and_a_missing_set_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ValueError, match=r"glue/sst2 \(split train\) is not prepared in ") as e:
        text.load_glue("sst2", "train", data_dir=str(tmp_path))
    assert "tfds build glue/sst2 --data_dir=DIR" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown GLUE task 'sst5'"):
        text.load_glue("sst5", "train")
