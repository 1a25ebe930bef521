"""MLKD: Jin et al., "Multi-Level Logit Distillation" (CVPR 2023).

    L = ce_weight * (CE(z_s^weak, y) + CE(z_s^strong, y)) + mlkd_loss(weak, strong)

over two views of every image: the batch's "image" (the weak view, the usual crop and
flip) and "image_strong" (the same images under RandAugment(2, 10) with MLKD's own op
list, then Cutout; `bkd_jax.data.randaugment` where present). The student runs on both in
training mode, weak view first, so its BatchNorm statistics update twice per step, as in
the authors' `AugTrainer`; the teacher runs on both in inference mode. Evaluation sees the
weak (test) view only. `bkd_jax.losses.mlkd_loss` has the multi-level terms, the released
code's quirks (the default) and the paper's reading (`released=False`).

Defaults: github Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/
KD_ours.py with that repository's mdistiller/engine/cfg.py (CFG.KD: temperature 4, CE
weight 0.1, KD weight 0.9; configs/cifar100/ours/*.yaml set no KD section). Its per-pair
learning rates and lengths are in configs/cifar100.py.

Block-KD can use MLKD's single-view terms as its distance (`distance="mlkd"`, this
project's extension): the instance, class and batch terms on the one view the stones see,
at Block-KD's temperature and the four fixed ones, with `released` from its section. With
Block-KD's `standardize` every one of those terms sees z-scored logits (the
logit-standardisation code z-scores MLKD's KD terms only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from bkd_jax import losses
from bkd_jax.blocknet import BlockNet
from bkd_jax.distillers.base import Forward, Loss, Method, Recipe
from bkd_jax.distillers.feature_modules import check_knobs

STRONG_VIEW = "image_strong"  # the batch key of the strong view


def knobs() -> dict:
    return {
        "temperature": 4.0,  # CFG.KD.TEMPERATURE (MLKD's mdistiller/engine/cfg.py)
        "ce_weight": 0.1,  # CFG.KD.LOSS.CE_WEIGHT
        "kd_weight": 0.9,  # CFG.KD.LOSS.KD_WEIGHT
        "released": True,  # the released code's loss; False: the paper's reading
        "standardize": False,  # logit standardisation of the KD terms (Sun et al., CVPR 2024)
    }


@dataclasses.dataclass(frozen=True)
class StrongView:
    """The student's and the teacher's logits on the strong view, as `Modules` (no variables).

    In training the student's updated BatchNorm statistics replace those of the weak pass.
    """

    student: BlockNet
    teacher: BlockNet

    def init(self, key: jax.Array) -> dict[str, Any]:
        del key
        return {}

    def apply(self, variables, out: Forward, batch, teacher_vars, *, train: bool):
        if not train:  # evaluation: the weak (test) view only
            return out, variables
        if STRONG_VIEW not in batch:
            raise ValueError(
                f"mlkd trains on two views: the batch needs {STRONG_VIEW!r} (RandAugment(2, 10) "
                "+ Cutout of each image) beside 'image'; enable the data's strong view"
            )
        strong = batch[STRONG_VIEW]
        if strong.shape != batch["image"].shape or strong.dtype != batch["image"].dtype:
            raise ValueError(
                f"mlkd: {STRONG_VIEW!r} must match 'image' in shape and dtype, got "
                f"{strong.shape} {strong.dtype} and {batch['image'].shape} {batch['image'].dtype}"
            )
        logits, student_vars = self.student.apply(out.student_vars, strong, train=True)
        teacher_logits, _ = self.teacher.apply(jax.lax.stop_gradient(teacher_vars), strong)
        extras = {
            **out.extras,
            "strong_student_logits": logits,
            "strong_teacher_logits": jax.lax.stop_gradient(teacher_logits),
        }
        return out._replace(extras=extras, student_vars=student_vars), variables


def build(k, pair) -> Recipe:
    check_knobs("mlkd", k, nonnegative=("ce_weight", "kd_weight"), positive=("temperature",))

    def objective(out: Forward, batch: Mapping[str, jax.Array], r: jax.Array) -> Loss:
        del r
        labels = batch["label"]
        strong_s = out.extras["strong_student_logits"]
        ce_weak = losses.cross_entropy(out.student_logits, labels)
        ce_strong = losses.cross_entropy(strong_s, labels)
        mlkd = losses.mlkd_loss(
            out.student_logits, out.teacher_logits, strong_s, out.extras["strong_teacher_logits"],
            temperature=k["temperature"], kd_weight=k["kd_weight"], released=k["released"],
            standardize=k["standardize"],
        )  # fmt: skip
        metrics = {"ce": ce_weak, "ce_strong": ce_strong, "mlkd": mlkd}
        return Loss(k["ce_weight"] * (ce_weak + ce_strong), mlkd, metrics)

    return Recipe(objective, StrongView(pair.student, pair.teacher))


METHOD = Method(
    name="mlkd",
    summary="Multi-level logit distillation on a weak and a strong view",
    knobs=knobs,
    build=build,
    consumes=("logits", "strong_view"),
    # Block-KD's distance "mlkd" (losses.mlkd_weak_view_loss): one view, so only these.
    distance_knobs=("released",),
)
