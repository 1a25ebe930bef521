"""The text trainer and demo: real offline text, a teacher, students, the report's table.

The trainer test is the long one: about 30 s of CPU (two cores), three tiny BERTs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json

import numpy as np
import pytest

from bkd_jax import report, text_demo
from bkd_jax.data import text

pytest.importorskip("vaderSentiment", reason="the text demo's data ships in vaderSentiment")


def test_the_demo_data_ships_in_the_wheel_with_its_licence_and_is_what_the_docstring_says():
    files = {str(f) for f in importlib.metadata.files("vaderSentiment")}
    assert "vaderSentiment/vader_lexicon.txt" in files
    assert "vaderSentiment-3.3.2.dist-info/LICENSE.txt" in files or any(
        f.endswith("LICENSE.txt") for f in files
    )
    assert "MIT" in importlib.metadata.metadata("vaderSentiment")["License"]
    train, test = text_demo.vader_polarity()
    assert len(train.first) + len(test.first) == 5578
    labels = np.concatenate([train.labels, test.labels])
    assert labels.sum() == 2435 and not set(train.first) & set(test.first)
    assert train.first == text_demo.vader_polarity()[0].first  # the split is fixed


def _subset(examples: text.TextExamples, n: int) -> text.TextExamples:
    return dataclasses.replace(examples, first=examples.first[:n], labels=examples.labels[:n])


def test_teacher_then_students_train_and_the_report_tabulates_them(tmp_path):
    from bkd_jax import text_train

    train, test = (_subset(e, n) for e, n in zip(text_demo.vader_polarity(), (320, 128)))
    tokenizer = text.wordpiece(
        text_demo.learn_vocabulary(train.first, tmp_path / "vocab"), max_length=16
    )
    train_data, test_data = text.encode(tokenizer, train), text.encode(tokenizer, test)
    size = tokenizer.get_vocab_size()
    teacher = text_demo.run_config("teacher", "ce", size, epochs=1)
    results = text_train.train(teacher, tmp_path / "teacher", train_data, test_data,
                               num_classes=2)  # fmt: skip
    assert results["steps"] == results["total_steps"] == 2 * (320 // 32)
    for method in ("ce", "blockkd"):
        config = text_demo.run_config("student", method, size, epochs=1)
        config.teacher_checkpoint = str(tmp_path / "teacher" / "student")
        text_train.train(config, tmp_path / method, train_data, test_data, num_classes=2)
    last = json.loads((tmp_path / "blockkd" / "results.json").read_text())["last"]
    assert {"eval/student/top1", "eval/teacher/top1", "eval/stone1/top1"} <= set(last)
    assert last["eval/teacher/top1"] == results["last"]["eval/student/top1"]
    runs, skipped = report.find_runs([tmp_path])
    table = report.markdown_table(report.summarize(runs))
    assert not skipped and [r.label for r in runs] == ["teacher", "ce", "blockkd"]
    assert "| bert_4x64 -> bert_2x32 | blockkd |" in table


def test_a_teacher_cut_into_other_blocks_is_refused(tmp_path):
    from bkd_jax import text_train
    from bkd_jax.training import checkpointing

    checkpointing.save_variables(tmp_path / "t", {"params": {"block1": {}, "head": {}}}, {})
    config = text_demo.run_config("student", "kd", 50, epochs=1)
    config.teacher_checkpoint = str(tmp_path / "t")
    data = text.Encoded((np.array([2, 5, 3]),) * 32, (np.zeros(3, np.int32),) * 32,
                        np.zeros(32, np.int32))  # fmt: skip
    with pytest.raises(ValueError, match="cut into 1 blocks, the config into 2: set groups=1"):
        text_train.train(config, tmp_path / "run", data, data, num_classes=2)
