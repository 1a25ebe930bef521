r"""Short CIFAR-10 schedules for one accelerator: the runs of `bkd_jax.accelerator_study`.

Arguments (`configs/cifar10_study.py:key=value,...`): role (teacher | student; default
student), teacher (default resnet32x4), student (default resnet8x4), method (default
blockkd; students only), data_dir (an image folder laid out as
``<data_dir>/{train,test}/<class>/<image>``, e.g. the CIFAR-10 JPEGs), smoke (1: resnet8
pair, 64 training images, 2 steps: a check that runs anywhere; default 0).

The schedule is short and wide, to finish the teacher and five students in minutes on one
large GPU: global batch 1024 in bfloat16, SGD with Nesterov momentum 0.9, learning rate
0.1 per 128 examples (He et al. 2016's CIFAR rate at batch 128, scaled linearly with the
batch after a warm-up as in Goyal et al. 2017, "Accurate, Large Minibatch SGD") reached
after 2 warm-up epochs, then a cosine decay to 0; weight decay 5e-4 (mdistiller's CIFAR
recipe); the teacher 30 epochs, the students 15; DKD's and Block-KD's loss warm-up 20/240
of the epochs, as in the CIFAR-100 recipes. Images stay in device memory
(`dataset.loader = "device"`) with pad-crop-flip augmentation.

Launch (the whole study: `python -m bkd_jax.accelerator_study`; one run by hand):

  python -m bkd_jax.main --config=configs/cifar10_study.py:role=teacher,data_dir=DATA \
      --workdir=runs/study/teacher
  python -m bkd_jax.main --config=configs/cifar10_study.py:method=kd,data_dir=DATA \
      --config.teacher_checkpoint=runs/study/teacher --workdir=runs/study/kd

Expected: not yet measured on a GPU (BENCHMARKS.md holds what has been measured). A
resnet32x4 trained 30 epochs at this batch should reach roughly 93% on CIFAR-10 and the
students somewhat below it; these schedules are for speed, not for records.
"""

from __future__ import annotations

from bkd_jax.config_defaults import base_config, parse_arguments

ROLES = ("teacher", "student")
TEACHER_EPOCHS = 30
STUDENT_EPOCHS = 15
BATCH = 1024
# 0.1 at batch 128, the CIFAR ResNet recipe (He et al. 2016), scaled linearly with the batch.
LR_PER_128 = 0.1
WARMUP_EPOCHS = 2.0


def _parse(arg: str | None) -> dict[str, str]:
    defaults = dict(
        role="student",
        teacher="resnet32x4",
        student="resnet8x4",
        method="blockkd",
        data_dir="",
        smoke="0",
    )
    args = parse_arguments(arg, defaults)
    if args["role"] not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {args['role']!r}")
    return args


def get_config(arg: str | None = None):
    args = _parse(arg)
    teacher_run = args["role"] == "teacher"
    smoke = bool(int(args["smoke"]))
    teacher, student = ("resnet8", "resnet8") if smoke else (args["teacher"], args["student"])
    config = base_config(
        "image_folder",
        teacher=teacher,
        student=teacher if teacher_run else student,
        method="ce" if teacher_run else args["method"],
    )
    config.dataset.data_dir = args["data_dir"] or None
    config.dataset.image_size = 32
    config.dataset.augment = "crop_flip"
    # CIFAR-10's statistics, as configs' cifar10 data set uses them.
    config.dataset.mean = (0.4914, 0.4822, 0.4465)
    config.dataset.std = (0.2470, 0.2435, 0.2616)
    config.dataset.loader = "device"
    config.dtype = "bfloat16"
    batch = 8 if smoke else BATCH
    config.global_batch_size = batch
    config.eval_batch_size = 16 if smoke else BATCH
    epochs = TEACHER_EPOCHS if teacher_run else STUDENT_EPOCHS
    config.num_epochs = epochs
    config.optim.learning_rate = LR_PER_128 * batch / 128
    config.optim.nesterov = True
    config.optim.schedule = "cosine"
    config.optim.warmup_epochs = 0.0 if smoke else WARMUP_EPOCHS
    knobs = config.distill[config.distill.method]
    if "warmup_epochs" in knobs:  # 20 of 240 epochs in the CIFAR-100 recipes
        knobs.warmup_epochs = max(1, round(epochs * 20 / 240))
    if smoke:
        config.dataset.max_train_examples = 64
        config.dataset.max_eval_examples = 32
        config.num_train_steps = 2
    config.eval_every_epochs = 5
    config.log_every_steps = 10 if not smoke else 1
    config.checkpoint_every_steps = 100_000  # at the end and at each new best only
    config.keep_checkpoints = 1
    config.tensorboard = False  # the study reads metrics.jsonl
    return config
