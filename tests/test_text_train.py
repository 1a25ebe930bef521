"""The text trainer on generated data: every evaluation split, named by split, reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bkd_jax import report, text_demo, text_train
from bkd_jax.data import text

VOCAB_SIZE = 50


def random_encoded(n: int, seed: int, *, regression: bool = False) -> text.Encoded:
    """`n` "[CLS] tokens [SEP]" sequences of 3-8 random ids, random labels."""
    rng = np.random.default_rng(seed)
    ids = tuple(
        np.array([2, *rng.integers(5, VOCAB_SIZE, rng.integers(1, 7)), 3], np.int32)
        for _ in range(n)
    )
    types = tuple(np.zeros(len(i), np.int32) for i in ids)
    labels = rng.uniform(0, 5, n).astype(np.float32) if regression else rng.integers(0, 2, n)
    return text.Encoded(ids, types, labels)


def test_further_splits_are_evaluated_under_their_names_and_reported(tmp_path):
    train_data, eval_data = random_encoded(64, 0), random_encoded(40, 1)
    # Binary labels flipped: the accuracy on this split is 1 - that on the first.
    flipped = text.Encoded(eval_data.ids, eval_data.types, 1 - eval_data.labels)
    config = text_demo.run_config("student", "ce", VOCAB_SIZE, epochs=1)
    results = text_train.train(
        config, tmp_path / "run", train_data, eval_data, num_classes=2,
        other_splits={"flipped": flipped},
    )  # fmt: skip
    last = results["last"]
    assert last["eval/flipped/student/top1"] == pytest.approx(1 - last["eval/student/top1"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert logged[-1]["eval/flipped/student/top1"] == last["eval/flipped/student/top1"]
    runs, _ = report.find_runs([tmp_path])
    table = report.markdown_table(report.summarize(runs))
    header, _, row = table.splitlines()
    assert header.split(" | ")[-2:] == ["flipped top1 last", "images/s |"]
    assert f"| {100 * last['eval/flipped/student/top1']:.2f} |" in row


def test_mnli_loads_train_and_both_evaluation_splits(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    config = text_demo.run_config("student", "ce", 7, epochs=1)
    config.dataset.update(task="mnli", vocab_file=str(vocab), lowercase=True, data_dir="")
    with tfds.testing.mock_data(num_examples=5):
        splits = text_train.load_task(config.dataset)
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    for data in splits.values():
        assert len(data) == 5 and data.labels.dtype.kind == "i"
        assert all(i[0] == 2 and i[-1] == 3 and 3 in i[1:-1] for i in data.ids)  # pairs
    config.dataset.vocab_file = ""
    with pytest.raises(ValueError, match=r"config\.dataset\.vocab_file"):
        text_train.load_task(config.dataset)
