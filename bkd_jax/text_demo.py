r"""The text demo: a BERT teacher and CE / KD / Block-KD students on real, offline text.

    python -m bkd_jax.text_demo --workdir=runs/text_demo [--epochs=...]

No sentence-level classification corpus ships inside a PyPI package that installs here
(NLTK's and TextBlob's corpora are downloaded after install; scikit-learn fetches its text
sets), so the demo uses the closest real, offline substitute: the VADER sentiment lexicon
(Hutto & Gilbert, ICWSM 2014), `vader_lexicon.txt` inside the `vaderSentiment` wheel
(MIT licence, in its dist-info). Its entries are English words and phrases with the mean
valence ten human raters gave them (-4 to +4). The task: the polarity of the alphabetic
entries the raters agree are clearly positive or negative (|mean| >= 1), 5,578 words
(lower-cased, repeats dropped),
44% positive, split 80/20 at random (seed 0). A model sees a word only through its
WordPiece pieces (a vocabulary `tokenizers` learns from the training words), so a
held-out word is classified from the pieces it shares with training words ("unhappy"
from "un" and "happy"); it is a word-level, not a sentence-level, task.

Teacher bert_4x64 and students bert_2x32 (2 blocks each), trained from scratch with AdamW
at 1e-3 (ours: a from-scratch learning rate, not BERT's fine-tuning 2e-5), the teacher for
`2 * epochs` epochs and each student for `epochs`, then a table by `bkd_jax.report`.
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np

from bkd_jax import report
from bkd_jax.config_defaults import distill_config
from bkd_jax.data import text

DATASET = "vader_polarity"
TEACHER, STUDENT = "bert_4x64", "bert_2x32"
METHODS = ("ce", "kd", "blockkd")
MAX_LENGTH = 16  # [CLS] pieces [SEP]: the longest word is far shorter
VOCAB_SIZE = 2000


def vader_polarity(seed: int = 0) -> tuple[text.TextExamples, text.TextExamples]:
    """(train, test) polarity of VADER's clearly rated alphabetic entries (docstring)."""
    try:
        import vaderSentiment
    except ImportError:
        raise ValueError(
            "the text demo reads the VADER lexicon of the vaderSentiment package: "
            "pip install vaderSentiment"
        ) from None
    path = pathlib.Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    polarity: dict[str, int] = {}  # lower-cased; the first of repeated entries ("lol", "LOL")
    for line in path.read_text(encoding="utf-8").splitlines():
        word, mean, *_ = line.split("\t")
        if word.isalpha() and abs(float(mean)) >= 1.0:
            polarity.setdefault(word.lower(), int(float(mean) > 0))
    words, labels = list(polarity), list(polarity.values())
    order = np.random.default_rng(seed).permutation(len(words))
    cut = int(0.8 * len(words))

    def subset(rows) -> text.TextExamples:
        return text.TextExamples(
            tuple(words[r] for r in rows), None, np.asarray(labels, np.int32)[rows]
        )

    return subset(order[:cut]), subset(order[cut:])


def learn_vocabulary(words, path: pathlib.Path) -> pathlib.Path:
    """A WordPiece vocabulary of the training words, by `tokenizers`' trainer."""
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(list(words), vocab_size=VOCAB_SIZE, min_frequency=2)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_model(str(path))
    return path / "vocab.txt"


def run_config(role: str, method: str, vocab_size: int, epochs: int, seed: int = 0):
    """The config of one run: the teacher's own (`role="teacher"`) or a student's."""
    config = ml_collections.ConfigDict()
    config.dataset = ml_collections.ConfigDict(
        dict(name=DATASET, task=DATASET, max_length=MAX_LENGTH)
    )
    config.teacher = TEACHER
    config.student = TEACHER if role == "teacher" else STUDENT
    config.groups = 2
    # No dropout: single words through tiny networks for a few epochs; the README's
    # table was measured so.
    config.model_options = dict(vocab_size=vocab_size, max_positions=MAX_LENGTH, dropout=0.0)
    config.teacher_checkpoint = ""
    config.student_checkpoint = ""
    config.num_epochs = 2 * epochs if role == "teacher" else epochs
    config.global_batch_size = 32  # Block-KD's NLP batch
    config.optim = ml_collections.ConfigDict(
        dict(learning_rate=1e-3, warmup_fraction=0.1, weight_decay=0.01)
    )
    config.distill = distill_config(method)
    if method == "blockkd":
        config.distill.blockkd.warmup_epochs = 1  # 20 epochs of the CIFAR recipe > the run
    config.seed = seed
    return config


def run(workdir: str | pathlib.Path, epochs: int = 5) -> str:
    """Trains the teacher, then each student; returns the Markdown table."""
    from bkd_jax import text_train  # JAX and the trainer only once there is work

    workdir = pathlib.Path(workdir)
    train_examples, test_examples = vader_polarity()
    tokenizer = text.wordpiece(
        learn_vocabulary(train_examples.first, workdir / "vocab"), max_length=MAX_LENGTH
    )
    vocab_size = tokenizer.get_vocab_size()
    train_data = text.encode(tokenizer, train_examples)
    test_data = text.encode(tokenizer, test_examples)
    teacher_dir = workdir / "teacher"
    text_train.train(
        run_config("teacher", "ce", vocab_size, epochs), teacher_dir, train_data, test_data,
        num_classes=2,
    )  # fmt: skip
    for method in METHODS:
        config = run_config("student", method, vocab_size, epochs)
        config.teacher_checkpoint = str((teacher_dir / "student").absolute())
        text_train.train(config, workdir / method, train_data, test_data, num_classes=2)
    runs, _ = report.find_runs([workdir])
    return report.markdown_table(report.summarize(runs))


def main(argv) -> None:
    del argv
    print(run(_WORKDIR.value, _EPOCHS.value))


if __name__ == "__main__":
    from absl import app, flags

    _WORKDIR = flags.DEFINE_string("workdir", None, "where the runs go")
    _EPOCHS = flags.DEFINE_integer("epochs", 5, "epochs of each student (teacher: twice)")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
