r"""ImageNet (ILSVRC-2012) with mdistiller's recipe: 100 epochs, batch 512, lr 0.2.

Arguments: pair=r34_r18 (default; torchvision ResNet34 -> ResNet18) or pair=r50_mv1
(ResNet50 -> MobileNetV1), method (default blockkd). Temperature 1, distillation
warm-up 1 epoch, KD weights CE:KD 0.5:0.5, DKD beta 0.5 (r34_r18) or 2.0 (r50_mv1).
Teachers are torchvision's weights, converted with `python -m bkd_jax.convert`.

Launch on a TPU VM slice (every host runs the same command; see launch/):

  python -m bkd_jax.main --multihost --config=configs/imagenet.py:pair=r34_r18 \
      --config.dataset.data_dir=gs://BUCKET/tfds \
      --config.teacher_checkpoint=gs://BUCKET/teachers/imagenet_resnet34 \
      --workdir=gs://BUCKET/runs/in1k_bkd_r34_r18

Expected (student top-1 from the papers; not yet reproduced with this code): ResNet34
teacher 73.31; ResNet18 with CE 69.76, KD 70.66, DKD 71.70.
"""

from __future__ import annotations

from bkd_jax.config_defaults import base_config, parse_arguments

PAIRS = {
    "r34_r18": ("imagenet_resnet34", "imagenet_resnet18", 0.5),
    "r50_mv1": ("imagenet_resnet50", "imagenet_mobilenetv1", 2.0),
}


def get_config(arg: str | None = None):
    args = parse_arguments(arg, dict(pair="r34_r18", method="blockkd"))
    if args["pair"] not in PAIRS:
        raise ValueError(f"unknown pair {args['pair']!r}; known: {', '.join(PAIRS)}")
    teacher, student, dkd_beta = PAIRS[args["pair"]]
    config = base_config("imagenet2012", teacher=teacher, student=student, method=args["method"])
    config.optim.learning_rate = 0.2
    config.optim.decay_epochs = (30, 60, 90)
    config.optim.weight_decay = 1e-4
    config.num_epochs = 100
    config.global_batch_size = 512
    config.eval_batch_size = 1024
    config.distill.temperature = 1.0
    config.distill.ce_weight = 0.5
    config.distill.kd_weight = 0.5
    config.distill.dkd_beta = dkd_beta
    config.distill.warmup_epochs = 1
    config.log_every_steps = 500
    config.checkpoint_every_steps = 2500
    return config
