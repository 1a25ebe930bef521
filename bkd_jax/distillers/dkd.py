"""DKD: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

    L = ce_weight * CE(z_s, y) + r(t) * tau^2 * (alpha * TCKD + beta * NCKD)

TCKD is the KL between the binary (target, non-target) distributions, NCKD the KL between
the distributions over the non-target classes (`bkd_jax.losses.dkd_loss`); r(t) a linear
warm-up over `warmup_epochs`. Defaults from mdistiller/engine/cfg.py: CFG.DKD.CE_WEIGHT =
1.0 (not KD's 0.1), ALPHA = 1.0, BETA = 8.0, T = 4.0, WARMUP = 20. The per-pair betas of
mdistiller's configs/cifar100/dkd/*.yaml and the ImageNet recipe (configs/imagenet/*/dkd.yaml:
T 1, warm-up 1, beta 0.5 for ResNet34 -> ResNet18, 2.0 for ResNet50 -> MobileNetV1, CE
weight 1.0) are set by configs/cifar100.py and configs/imagenet.py.

DKD is also a logit distance of Block-KD (`config.distill.blockkd.distance = "dkd"`).
"""

from __future__ import annotations

from bkd_jax.distillers.base import Method, Recipe, distance_objective

# The knobs of this method's logit distance (also Block-KD's, by this name).
DISTANCE_KNOBS = ("alpha", "beta")


def knobs() -> dict:
    return {
        "temperature": 4.0,  # mdistiller engine/cfg.py CFG.DKD.T
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.DKD.CE_WEIGHT
        "alpha": 1.0,  # mdistiller engine/cfg.py CFG.DKD.ALPHA (TCKD weight)
        "beta": 8.0,  # mdistiller engine/cfg.py CFG.DKD.BETA (NCKD weight)
        "warmup_epochs": 20,  # mdistiller engine/cfg.py CFG.DKD.WARMUP
        "standardize": False,  # logit standardisation (Sun et al., CVPR 2024)
    }


def build(k, pair) -> Recipe:
    del pair
    return Recipe(distance_objective("dkd", k, DISTANCE_KNOBS, warmup=True))


METHOD = Method(
    name="dkd",
    summary="Decoupled KD: CE + warm-up * (alpha TCKD + beta NCKD)",
    knobs=knobs,
    build=build,
    distance_knobs=DISTANCE_KNOBS,
)
