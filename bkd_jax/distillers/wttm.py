"""WTTM: Zheng and Yang, "Knowledge Distillation Based on Transformed Teacher Matching"
(ICLR 2024).

    L = ce_weight * CE(z_s, y) + wttm_weight * mean_x U(p_t) KL(p_t^gamma / U(p_t) || q_s)

with p_t the teacher's softmax, U its power sum sum_k p_k^gamma and q_s the student's
softmax at temperature 1 (`bkd_jax.losses.wttm_loss`; the paper's gamma is 1 / T, the
authors' code's `--ttm_l`). Defaults from github zkxufo/TTM: ce_weight 1 (`-r`,
train_student.py default), and gamma 0.2 at weight 4 (README.md, its WTTM example on
vgg13 -> vgg8: `--add wttm --ttm_l 0.2 -a 4`). The paper tunes gamma and the weight per
pair (its appendix A.4); those values are not in the released code, so set them per pair
when reproducing its table. With `standardize`, logits are z-scored first (Sun et al.).

WTTM is also a logit distance of Block-KD (`distance = "wttm"`; its gamma replaces the
temperature, which this distance ignores).
"""

from __future__ import annotations

from bkd_jax.distillers.base import Method, Recipe, distance_objective

# The knobs of this method's logit distance (also Block-KD's, by this name).
DISTANCE_KNOBS = ("gamma",)


def knobs() -> dict:
    return {
        "gamma": 0.2,  # zkxufo/TTM README.md WTTM example, --ttm_l 0.2
        "ce_weight": 1.0,  # zkxufo/TTM train_student.py -r default 1
        "wttm_weight": 4.0,  # zkxufo/TTM README.md WTTM example, -a 4
        "standardize": False,  # logit standardisation (Sun et al., CVPR 2024)
    }


def build(k, pair) -> Recipe:
    del pair
    return Recipe(distance_objective("wttm", k, DISTANCE_KNOBS, weight="wttm_weight"))


METHOD = Method(
    name="wttm",
    summary="WTTM: CE + sample-weighted match to the power-transformed teacher",
    knobs=knobs,
    build=build,
    distance_knobs=DISTANCE_KNOBS,
)
