"""DOT: Zhao et al., "DOT: A Distillation-Oriented Trainer" (ICCV 2023).

DOT changes the optimiser, not the loss: KD's objective (`bkd_jax.distillers.kd`, same knobs
and defaults) trained with separate momentum buffers for the task and the distillation
gradients (`bkd_jax.optim.dot`; `config.optim.dot_delta`, mdistiller engine/cfg.py
CFG.SOLVER.DOT.DELTA = 0.075). This is mdistiller's DOT recipe: its
configs/cifar100/dot/*.yaml pair DISTILLER.TYPE "KD" with SOLVER.TRAINER "dot". The same
optimiser serves any other method through `config.optim.name = "dot"` (DKD, Block-KD).
"""

from __future__ import annotations

from bkd_jax.distillers import kd
from bkd_jax.distillers.base import Method

METHOD = Method(
    name="dot",
    summary="KD trained with DOT's separate task and distillation momentum",
    knobs=kd.knobs,
    build=kd.build,
    optimizer="dot",
)
