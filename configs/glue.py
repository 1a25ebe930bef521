r"""GLUE fine-tuning and distillation of BERT encoders (`python -m bkd_jax.text_train`).

Arguments (`configs/glue.py:key=value,...`): task (sst2 | mrpc | cola | stsb | qnli | rte |
qqp | mnli; default sst2), teacher (default bert_base), student (default bert_6x768; also
bert_4x312, bert_2x128 and bert_base), method (ce, kd, dkd, dist, wttm, blockkd,
blockkd_lite; default blockkd; not DOT, an SGD optimiser), groups (blocks each network is
cut into; default the largest common divisor of both depths up to 4: 3 for 12 -> 6, 4 for
12 -> 4), seed.
The teacher's own fine-tuning is `method=ce,student=bert_base`.

Setting: the Block-KD paper's NLP runs fine-tune for 10 epochs at batch 32 (its tasks and
models are not recoverable); teacher and students are BERT encoders on GLUE, the field's
standard setting. The optimiser is that of BERT's GLUE fine-tuning, which the GLUE
distillation setups keep (sources beside each value). Every evaluation split of a task is
evaluated: MNLI's matched split gives the headline figures, the mismatched one is logged
as "eval/validation_mismatched/..." and tabulated by the report.
STS-B is a regression (a 1-wide head, Pearson and Spearman correlations): ce, kd,
blockkd and blockkd_lite train it with squared errors to the label and to the teacher's
score (`bkd_jax.distillers.regression`); the methods defined on class distributions (dkd, dist,
wttm) are refused with it.

Launch, from Hugging Face files (`model.safetensors` or `pytorch_model.bin`, `vocab.txt`)
of bert-base-uncased and prepared TFDS data (`tfds build glue/sst2 --data_dir=DATA`):

  python -m bkd_jax.convert --model bert_base --input bert-base-uncased/model.safetensors \
      --num-classes 2 --groups 3 --output ckpt/bert_base_pretrained
  python -m bkd_jax.text_train --workdir=runs/sst2/teacher \
      --config=configs/glue.py:task=sst2,student=bert_base,method=ce \
      --config.student_checkpoint=ckpt/bert_base_pretrained \
      --config.dataset.data_dir=DATA --config.dataset.vocab_file=bert-base-uncased/vocab.txt
  python -m bkd_jax.text_train --workdir=runs/sst2/blockkd \
      --config=configs/glue.py:task=sst2,method=blockkd \
      --config.teacher_checkpoint=runs/sst2/teacher \
      --config.dataset.data_dir=DATA --config.dataset.vocab_file=bert-base-uncased/vocab.txt
  python -m bkd_jax.report runs/sst2

Measured: nothing on GLUE (no GLUE data and no pretrained BERT weights reach this
machine); the trainer, the objectives and the metrics are tested on tiny models and real
text (`python -m bkd_jax.text_demo`), and the step cost of the 12 -> 6 pair at length
128 is in BENCHMARKS.md. The students start from random weights unless
`student_checkpoint` names converted ones (e.g. a 6-layer BERT's).
"""

from __future__ import annotations

import ml_collections

from bkd_jax.config_defaults import distill_config, parse_arguments
from bkd_jax.distillers import regression

TASKS = ("sst2", "mrpc", "cola", "stsb", "qnli", "rte", "qqp", "mnli")
DEPTHS = {"bert_base": 12, "bert_6x768": 6, "bert_4x312": 4, "bert_2x128": 2}


def default_groups(teacher: str, student: str) -> int:
    """The largest common divisor of both depths up to 4 (ours: the CNN zoo's 3-4 stages)."""
    return max(g for g in range(1, 5) if DEPTHS[teacher] % g == 0 == DEPTHS[student] % g)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arguments(
        arg,
        dict(task="sst2", teacher="bert_base", student="bert_6x768", method="blockkd",
             groups="", seed="0"),
    )  # fmt: skip
    if args["task"] not in TASKS:
        raise ValueError(f"task={args['task']!r}: one of {', '.join(TASKS)}")
    if args["task"] == "stsb" and args["method"] not in regression.METHODS:
        raise ValueError(
            f"task=stsb (a regression) with method={args['method']!r}: one of "
            f"{', '.join(regression.METHODS)}; the others are defined on class distributions"
        )
    for role in ("teacher", "student"):
        if args[role] not in DEPTHS:
            raise ValueError(f"{role}={args[role]!r}: one of {', '.join(DEPTHS)}")
    groups = int(args["groups"] or default_groups(args["teacher"], args["student"]))
    config = ml_collections.ConfigDict()
    config.dataset = ml_collections.ConfigDict(
        dict(
            name=f"glue/{args['task']}",
            task=args["task"],
            data_dir="",  # the prepared TFDS directory; "" for TFDS's default
            vocab_file="",  # the checkpoint's WordPiece vocab.txt
            lowercase=True,  # uncased checkpoints (bert-base-uncased)
            max_length=128,  # BERT's run_classifier.py max_seq_length for GLUE
        )
    )
    config.teacher = args["teacher"]
    config.student = args["student"]
    config.groups = groups
    # bkd_jax.models.bert.get_model's options for both networks. Dropout 0.1 on hidden
    # states and attention probabilities: google-research/bert modeling.py BertConfig
    # (hidden_dropout_prob, attention_probs_dropout_prob), bert-base-uncased's config.json.
    config.model_options = ml_collections.ConfigDict(dict(dropout=0.1))
    config.teacher_checkpoint = ""
    config.student_checkpoint = ""  # converted weights to start the student from
    config.num_epochs = 10  # Block-KD (Yu et al. 2024), NLP experiments
    config.global_batch_size = 32  # Block-KD, NLP experiments; also BERT's GLUE batch
    config.optim = ml_collections.ConfigDict(
        dict(
            # google-research/bert README, GLUE (run_classifier.py): learning_rate 2e-5;
            # in BERT's fine-tuning grid (Devlin et al. 2019, A.3) and PKD's (Sun et al.
            # 2019, Sec. 4.2: {1e-5, 2e-5, 5e-5}).
            learning_rate=2e-5,
            # run_classifier.py warmup_proportion 0.1: linear warm-up over the first 10% of
            # the steps, then linear decay to 0 (optimization.py).
            warmup_fraction=0.1,
            # optimization.py AdamWeightDecayOptimizer weight_decay_rate 0.01, LayerNorm
            # and biases excluded.
            weight_decay=0.01,
        )
    )
    config.distill = distill_config(args["method"])
    if args["method"] in ("blockkd", "blockkd_lite", "dkd"):
        # DKD's and Block-KD's 20-epoch warm-up of the CIFAR recipe exceeds the 10 epochs
        # here; 1 epoch, as their ImageNet recipes (mdistiller's DKD ImageNet config). Ours.
        config.distill[args["method"]].warmup_epochs = 1
    config.seed = int(args["seed"])
    return config
