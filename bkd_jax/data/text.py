"""Text classification data for BERT students: GLUE from TFDS, WordPiece, bucketed batches.

Sentences (and sentence pairs) are tokenised with a checkpoint's WordPiece vocabulary
(`vocab.txt`) through Hugging Face's `tokenizers` library, as BERT does: lower-cased and
accent-stripped for uncased checkpoints, `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` with
segment ids 0 and 1, truncated longest-first to `max_length`. Each batch is padded only to
the smallest bucket length (`BUCKETS`) that holds its longest sequence, so short
sentences do not pay for the longest one, while the number of distinct shapes (each one a
compilation) stays small. A batch is `{"image": (batch, 3, length) int32, "label": ...}`:
"image" is the network input of every BlockNet step, here the packed text input of
`bkd_jax.blocknet.text_input`.

GLUE comes from TensorFlow Datasets and is never downloaded at run time (`download=False`):
prepare it once with `tfds build glue/<task> --data_dir=DIR` where the network is
reachable. TensorFlow is imported only when GLUE is read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bkd_jax.blocknet import TEXT_ROWS

# Padded lengths a batch may take; BERT's position table ends at 512.
BUCKETS = (16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """A GLUE task as TFDS holds it: its text features, classes, eval splits, metrics."""

    tfds_name: str
    text_keys: tuple[str, ...]
    num_classes: int  # 1: regression (STS-B)
    eval_splits: tuple[str, ...] = ("validation",)
    metrics: tuple[str, ...] = ("accuracy",)


# The metrics GLUE reports per task (Wang et al. 2019, Table 1 / the GLUE leaderboard).
GLUE = {
    "sst2": GlueTask("glue/sst2", ("sentence",), 2),
    "mrpc": GlueTask("glue/mrpc", ("sentence1", "sentence2"), 2, metrics=("accuracy", "f1")),
    "cola": GlueTask("glue/cola", ("sentence",), 2, metrics=("matthews",)),
    "stsb": GlueTask("glue/stsb", ("sentence1", "sentence2"), 1, metrics=("pearson", "spearman")),
    "qnli": GlueTask("glue/qnli", ("question", "sentence"), 2),
    "rte": GlueTask("glue/rte", ("sentence1", "sentence2"), 2),
    "qqp": GlueTask("glue/qqp", ("question1", "question2"), 2, metrics=("accuracy", "f1")),
    "mnli": GlueTask(
        "glue/mnli",
        ("premise", "hypothesis"),
        3,
        eval_splits=("validation_matched", "validation_mismatched"),
    ),
}


def glue_task(name: str) -> GlueTask:
    if name not in GLUE:
        raise ValueError(f"unknown GLUE task {name!r}; known: {', '.join(GLUE)}")
    return GLUE[name]


@dataclasses.dataclass(frozen=True)
class TextExamples:
    """Sentences (or pairs: `second` not None) and their labels (ints, or floats for STS-B)."""

    first: tuple[str, ...]
    second: tuple[str, ...] | None
    labels: np.ndarray


def load_glue(task: str, split: str, data_dir: str | None = None) -> TextExamples:
    """The examples of GLUE `task`'s `split` from a prepared TFDS directory.

    Raises ValueError in one line naming the data set and how to prepare it when it is
    not there; nothing is downloaded.
    """
    spec = glue_task(task)
    import tensorflow_datasets as tfds  # TensorFlow only once GLUE is read

    try:
        data = tfds.load(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises assertion, not-found and I/O errors alike
        where = data_dir or "the default TFDS data directory"
        raise ValueError(
            f"{spec.tfds_name} (split {split}) is not prepared in {where}: run `tfds build "
            f"{spec.tfds_name} --data_dir=DIR` where the network is reachable and pass "
            f"DIR as the data directory ({type(e).__name__})"
        ) from None
    columns: dict[str, list[Any]] = {key: [] for key in (*spec.text_keys, "label")}
    for example in tfds.as_numpy(data):
        for key in columns:
            columns[key].append(example[key])
    texts = [tuple(t.decode("utf-8") for t in columns[key]) for key in spec.text_keys]
    dtype = np.float32 if spec.num_classes == 1 else np.int32
    second = texts[1] if len(texts) > 1 else None
    return TextExamples(texts[0], second, np.asarray(columns["label"], dtype))


def wordpiece(vocab_file: str | os.PathLike, *, lowercase: bool = True, max_length: int = 128):
    """BERT's WordPiece tokenizer over `vocab_file`, truncating pairs longest-first.

    `lowercase` also strips accents, as for uncased checkpoints; False for cased ones.
    """
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(
        os.fspath(vocab_file), lowercase=lowercase, strip_accents=lowercase
    )
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    return tokenizer


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token and segment ids of every example, unpadded, with the labels."""

    ids: tuple[np.ndarray, ...]
    types: tuple[np.ndarray, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer, examples: TextExamples) -> Encoded:
    """Every sentence or pair through `tokenizer` (`wordpiece`)."""
    inputs = examples.first if examples.second is None else list(
        zip(examples.first, examples.second)
    )  # fmt: skip
    encodings = tokenizer.encode_batch(list(inputs))
    ids = tuple(np.asarray(e.ids, np.int32) for e in encodings)
    types = tuple(np.asarray(e.type_ids, np.int32) for e in encodings)
    return Encoded(ids, types, np.asarray(examples.labels))


def bucket_length(longest: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket that holds `longest` tokens."""
    for bucket in sorted(buckets):
        if bucket >= longest:
            return bucket
    raise ValueError(f"a sequence of {longest} tokens is longer than every bucket {buckets}")


def pad_batch(ids: Sequence[np.ndarray], types: Sequence[np.ndarray], length: int) -> np.ndarray:
    """The `(batch, 3, length)` input (`bkd_jax.blocknet.text_input`'s layout) of
    sequences right-padded with id 0 to `length`."""
    batch = np.zeros((len(ids), len(TEXT_ROWS), length), np.int32)
    for row, (i, t) in enumerate(zip(ids, types, strict=True)):
        batch[row, 0, : len(i)], batch[row, 1, : len(t)], batch[row, 2, : len(i)] = i, t, 1
    return batch


def batches(
    data: Encoded,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    drop_remainder: bool = False,
    buckets: Sequence[int] = BUCKETS,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `data` in batches padded to their bucket; shuffled when `rng` is given."""
    order = np.arange(len(data)) if rng is None else rng.permutation(len(data))
    stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
    for start in range(0, stop, batch_size):
        rows = order[start : start + batch_size]
        ids = [data.ids[r] for r in rows]
        length = bucket_length(max(len(i) for i in ids), buckets)
        yield {
            "image": pad_batch(ids, [data.types[r] for r in rows], length),
            "label": data.labels[rows],
        }


def glue_metrics(metrics: Sequence[str], outputs: np.ndarray, labels: np.ndarray) -> dict:
    """GLUE's `metrics` of logits `outputs` (a regression's scores when 1 wide).

    accuracy; F1 of the positive class (MRPC, QQP); Matthews correlation (CoLA);
    Pearson and Spearman correlation (STS-B), by scikit-learn and SciPy.
    """
    from scipy import stats
    from sklearn import metrics as sk

    outputs = np.asarray(outputs)
    if outputs.shape[-1] == 1:
        scores = outputs[:, 0]
        found = {
            "pearson": lambda: stats.pearsonr(scores, labels)[0],
            "spearman": lambda: stats.spearmanr(scores, labels)[0],
        }
    else:
        predicted = outputs.argmax(-1)
        found = {
            "accuracy": lambda: sk.accuracy_score(labels, predicted),
            "f1": lambda: sk.f1_score(labels, predicted),
            "matthews": lambda: sk.matthews_corrcoef(labels, predicted),
        }
    unknown = [m for m in metrics if m not in found]
    if unknown:
        raise ValueError(f"metrics {unknown} do not apply to outputs of shape {outputs.shape}")
    return {m: float(found[m]()) for m in metrics}
