"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).

    L = ce_weight * CE(z_s, y) + tau^2 (beta * inter-class + gamma * intra-class)

the two relation losses being one minus the mean Pearson correlation between the
student's and the teacher's softened predictions, per example across classes (inter)
and per class across the batch (intra); `bkd_jax.losses.dist_loss`. Defaults: the first
author's CIFAR-100 recipe (github hunto/LocalMamba, classification/configs/strategies/
distill/dist_cifar.yaml: `kd: dist_t4`, CE weight 1, kd_loss_weight 2 over
beta = gamma = 1, so beta = gamma = 2 and tau = 4); its ImageNet recipe (resnet_dist.yaml)
has tau = 1, which configs/imagenet.py sets.

DIST is also a logit distance of Block-KD (`config.distill.blockkd.distance = "dist"`).
"""

from __future__ import annotations

from bkd_jax.distillers.base import Method, Recipe, distance_objective

# The knobs of this method's logit distance (also Block-KD's, by this name).
DISTANCE_KNOBS = ("beta", "gamma")


def knobs() -> dict:
    return {
        "temperature": 4.0,  # dist_cifar.yaml `kd: dist_t4`
        "ce_weight": 1.0,  # dist_cifar.yaml ori_loss_weight 1
        "beta": 2.0,  # inter-class weight: kd_loss_weight 2 x beta 1 (kd_loss.py)
        "gamma": 2.0,  # intra-class weight: kd_loss_weight 2 x gamma 1 (kd_loss.py)
        "standardize": False,  # logit standardisation (Sun et al., CVPR 2024)
    }


def build(k, pair) -> Recipe:
    del pair
    return Recipe(distance_objective("dist", k, DISTANCE_KNOBS))


METHOD = Method(
    name="dist",
    summary="DIST: CE + inter- and intra-class Pearson relations of the predictions",
    knobs=knobs,
    build=build,
    distance_knobs=DISTANCE_KNOBS,
)
