"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

    L = ce_weight * CE(z_s, y) + kd_weight * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))

Defaults are mdistiller's CIFAR-100 recipe (mdistiller/engine/cfg.py: CFG.KD.TEMPERATURE = 4,
CFG.KD.LOSS.CE_WEIGHT = 0.1, CFG.KD.LOSS.KD_WEIGHT = 0.9); its ImageNet recipe
(configs/imagenet/r34_r18/kd.yaml) uses temperature 1 and weights 0.5 / 0.5, which
configs/imagenet.py sets. With `standardize`, both logit vectors are z-scored per sample
before the temperature (Sun et al., CVPR 2024; `bkd_jax.losses.standardize_logits`); the
temperature is then that paper's base temperature, which the configs set with it.

KD is also a logit distance of Block-KD (`config.distill.blockkd.distance = "kd"`).
"""

from __future__ import annotations

from bkd_jax.distillers.base import Method, Recipe, distance_objective


def knobs() -> dict:
    return {
        "temperature": 4.0,  # mdistiller engine/cfg.py CFG.KD.TEMPERATURE
        "ce_weight": 0.1,  # mdistiller engine/cfg.py CFG.KD.LOSS.CE_WEIGHT
        "kd_weight": 0.9,  # mdistiller engine/cfg.py CFG.KD.LOSS.KD_WEIGHT; no warm-up
        "standardize": False,  # logit standardisation (Sun et al., CVPR 2024)
    }


def build(k, pair) -> Recipe:
    del pair
    return Recipe(distance_objective("kd", k, weight="kd_weight"))


METHOD = Method(
    name="kd",
    summary="Hinton's KD: CE + KL to the teacher's softened predictions",
    knobs=knobs,
    build=build,
)
