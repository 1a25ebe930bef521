"""Published top-1 accuracies (%), to set beside ours in `bkd_jax.report`'s tables.

Sources, read at the commits given:

- Distilled students: the tables of megvii-research/mdistiller's README.md (commit
  a08d46f10d6102bd6e3f258ca5ac880b020ea259): KD and DKD on CIFAR-100 and ImageNet, and KD
  trained with DOT ("KD+DOT", our method `dot`). mdistiller reports the best test top-1
  over its per-epoch evaluations (`best_acc` in mdistiller/engine/trainer.py), so these
  compare with our "best", not our "last".
- Models trained alone with cross-entropy, on CIFAR-100: the "Teacher / Student" rows of
  HobbitLong/RepDistiller's README.md (commit 0eb3a95611e6e006b0db5ccdae1e29522db88b0c),
  the CRD benchmark whose code mdistiller is built on (its README's acknowledgement).

Model names are bkd_jax's (`bkd_jax.models.available()`), data set names
`config.dataset.name`. One correction: mdistiller's README heads the last column of its
second CIFAR-100 table "ResNet32x4 / MobileNet-V2", but that column's KD figure, 74.45, is
resnet32x4 -> ShuffleNet-V2 in the same README's DOT table and in RepDistiller's table; it
is filed below under shufflenetv2.
"""

from __future__ import annotations

# Trained alone with cross-entropy (RepDistiller README, "Teacher / Student" rows).
CE_TOP1: dict[str, dict[str, float]] = {
    "cifar100": {
        "wrn_40_2": 75.61,
        "wrn_16_2": 73.26,
        "wrn_40_1": 71.98,
        "resnet56": 72.34,
        "resnet20": 69.06,
        "resnet110": 74.31,
        "resnet32": 71.14,
        "resnet32x4": 79.42,
        "resnet8x4": 72.50,
        "vgg13": 74.64,
        "vgg8": 70.36,
        "resnet50": 79.34,
        "mobilenetv2": 64.60,
        "shufflenetv1": 70.50,
        "shufflenetv2": 71.82,
    },
}

# (teacher, student) -> method -> student top-1 (mdistiller README).
DISTILLED_TOP1: dict[str, dict[tuple[str, str], dict[str, float]]] = {
    "cifar100": {
        ("resnet56", "resnet20"): {"kd": 70.66, "dkd": 71.97},
        ("resnet110", "resnet32"): {"kd": 73.08, "dkd": 74.11},
        ("resnet32x4", "resnet8x4"): {"kd": 73.33, "dkd": 76.32, "dot": 75.12},
        ("wrn_40_2", "wrn_16_2"): {"kd": 74.92, "dkd": 76.23},
        ("wrn_40_2", "wrn_40_1"): {"kd": 73.54, "dkd": 74.81},
        ("vgg13", "vgg8"): {"kd": 72.98, "dkd": 74.68, "dot": 73.77},
        ("resnet32x4", "shufflenetv1"): {"kd": 74.07, "dkd": 76.45},
        ("wrn_40_2", "shufflenetv1"): {"kd": 74.83, "dkd": 76.70},
        ("vgg13", "mobilenetv2"): {"kd": 67.37, "dkd": 69.71},
        ("resnet50", "mobilenetv2"): {"kd": 67.35, "dkd": 70.35},
        ("resnet32x4", "shufflenetv2"): {"kd": 74.45, "dkd": 77.07, "dot": 75.55},
    },
    "imagenet2012": {
        ("imagenet_resnet34", "imagenet_resnet18"): {"kd": 71.03, "dkd": 71.70, "dot": 71.72},
        ("imagenet_resnet50", "imagenet_mobilenetv1"): {
            "kd": 70.50,
            "dkd": 72.05,
            "dot": 73.09,
        },
    },
}


def top1(dataset: str, teacher: str, student: str, method: str) -> float | None:
    """The published top-1 (%) of `student` trained by `method`, or None if none is known.

    For method "ce" the teacher plays no part: the figure is the student trained alone.
    """
    if method == "ce":
        return CE_TOP1.get(dataset, {}).get(student)
    return DISTILLED_TOP1.get(dataset, {}).get((teacher, student), {}).get(method)
