"""CRD: Tian et al., "Contrastive Representation Distillation" (ICLR 2020).

    L = ce_weight * CE(z_s, y) + feat_weight * (NCE_student + NCE_teacher)

Two linear embedding heads map the student's and the teacher's pooled features to
`feat_dim` (L2-normalised); each example's embedding is contrasted with its own row of the
other side's memory bank against `negatives` rows of other examples (NCE, temperature
`temperature`; `bkd_jax.losses.crd_loss`). The banks hold a momentum average of every
training example's embedding, one row per example of the training split (`Pair.num_examples`),
and the partition constants Z are set from the first batch and then kept, as mdistiller's
ContrastMemory does.

State. The banks and Z are the "memory" collection of the method's variables, so the
trainer keeps them in `TrainState.module_state`: they are updated inside the jitted step,
checkpointed with the state and restored with it, and a resumed run continues exactly. They
are replicated over the data mesh, like the rest of the state: the step updates the rows of
the global batch's indices, which every device then holds, so the result does not depend
on the number of devices, at a cost per device of 2 x num_examples x feat_dim x 4 bytes
(51 MB for CIFAR-100's 50,000 images, 1.3 GB for ImageNet's 1,281,167). The rows the
negatives read, batch x (negatives + 1) x feat_dim per bank, are split over the devices
with the batch.

Negatives. For each example, `negatives` bank rows are drawn uniformly, with replacement,
from the other examples, with the step's key (`batch["rng"]`: the run's seed folded with
the step), so they are a function of (seed, step). mdistiller's data loader
(mdistiller/dataset/cifar100.py, CIFAR100InstanceSample, mode "exact") draws them from the
examples of the other classes, without replacement when there are enough; here the
distiller does not know every example's label, and with 100 classes about 1% of the
negatives share the anchor's class.

Defaults are mdistiller's (engine/cfg.py CFG.CRD; configs/cifar100/crd.yaml and
configs/imagenet/*/crd.yaml change only the embedding heads' input sizes, which are read
from the networks here).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bkd_jax import losses, shapes
from bkd_jax.distillers.base import Loss, Method, Pair, Recipe

MEMORY = "memory"  # the variable collection of the banks and the partition constants
_HEADS = ("embed_student", "embed_teacher")


def knobs() -> dict:
    return {
        "ce_weight": 1.0,  # mdistiller engine/cfg.py CFG.CRD.LOSS.CE_WEIGHT
        "feat_weight": 0.8,  # mdistiller engine/cfg.py CFG.CRD.LOSS.FEAT_WEIGHT
        "feat_dim": losses.CRD_FEAT_DIM,  # 128, CFG.CRD.FEAT.DIM
        "negatives": losses.CRD_NCE_K,  # 16384, CFG.CRD.NCE.K
        "temperature": losses.CRD_NCE_TEMPERATURE,  # 0.07, CFG.CRD.NCE.TEMPERATURE
        "momentum": losses.CRD_NCE_MOMENTUM,  # 0.5, CFG.CRD.NCE.MOMENTUM
    }


def torch_uniform(fan_in: int):
    """PyTorch's default initialiser of a layer's weights and bias: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def embedding_head(fan_in: int, dim: int, dtype: Any) -> nn.Dense:
    """CRD's Embed before its L2 normalisation: a linear layer, PyTorch's initialisation."""
    init = torch_uniform(fan_in)
    return nn.Dense(dim, dtype=dtype, kernel_init=init, bias_init=init)


def contrast_indices(
    key: jax.Array, index: jax.Array, num_examples: int, negatives: int
) -> jax.Array:
    """(batch, 1 + negatives) bank rows: each example's own index, then its negatives.

    The negatives are uniform over the other `num_examples - 1` rows, with replacement.
    """
    draws = jax.random.randint(key, (index.shape[0], negatives), 0, num_examples - 1)
    others = draws + (draws >= index[:, None])  # skips the example's own row
    return jnp.concatenate([index[:, None], others], axis=1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ContrastModules:
    """The two embedding heads and the memory banks, run on both networks' pooled features."""

    student_head: nn.Dense
    teacher_head: nn.Dense
    in_dims: tuple[int, int]  # pooled feature sizes of the student and the teacher
    num_examples: int
    negatives: int
    temperature: float
    momentum: float

    def init(self, key: jax.Array) -> dict[str, Any]:
        keys = jax.random.split(key, 4)
        params = {
            name: head.init(k, jnp.zeros((1, dim), jnp.float32))["params"]
            for name, head, k, dim in zip(
                _HEADS, (self.student_head, self.teacher_head), keys, self.in_dims
            )
        }
        dim = self.student_head.features
        memory = {
            "student": losses.crd_init_memory(keys[2], self.num_examples, dim),
            "teacher": losses.crd_init_memory(keys[3], self.num_examples, dim),
            "normalizers": -jnp.ones((2,), jnp.float32),  # unset: the first batch sets them
        }
        return {"params": params, MEMORY: memory}

    def embed(self, params: Any, out) -> tuple[jax.Array, jax.Array]:
        """The heads' outputs on the student's and the teacher's pooled features."""
        n = out.student_logits.shape[0]
        e_s = self.student_head.apply(
            {"params": params[_HEADS[0]]}, out.student_taps.pooled.reshape(n, -1)
        )
        e_t = self.teacher_head.apply(
            {"params": params[_HEADS[1]]}, out.teacher_taps.pooled.reshape(n, -1)
        )
        return e_s, e_t

    def apply(self, variables, out, batch, teacher_vars, *, train: bool):
        del teacher_vars
        if not train:  # the banks only serve the training loss
            return out, variables
        if "index" not in batch:
            raise ValueError(
                "crd: the training batch has no 'index' (each example's dataset index, int32 "
                "[batch]); CRD's memory bank needs it. The input pipeline must yield it."
            )
        memory = variables[MEMORY]
        e_s, e_t = self.embed(variables["params"], out)
        index = batch["index"].astype(jnp.int32)
        idx = contrast_indices(batch["rng"], index, self.num_examples, self.negatives)
        bank_s, bank_t = memory["student"], memory["teacher"]
        first = functools.partial(
            losses.crd_normalizers, e_s, e_t, bank_s, bank_t, idx, temperature=self.temperature
        )
        z = jax.lax.cond(memory["normalizers"][0] < 0, first, lambda: memory["normalizers"])
        update = functools.partial(losses.crd_update_memory, index=index, momentum=self.momentum)
        new_memory = {
            "student": update(bank_s, e_s),
            "teacher": update(bank_t, e_t),
            "normalizers": z,
        }
        extras = {
            "student_emb": e_s, "teacher_emb": e_t, "memory_student": bank_s,
            "memory_teacher": bank_t, "contrast_idx": idx, "normalizers": z,
        }  # fmt: skip
        return out._replace(extras=extras), {**variables, MEMORY: new_memory}


def _pooled_dims(pair: Pair) -> tuple[int, int]:
    def pooled(net):  # shapes traced once per network and input shape (bkd_jax.shapes)
        return math.prod(shapes.tap_structs(net, pair.input_shape).pooled.shape[1:])

    return pooled(pair.student), pooled(pair.teacher)


def build(k, pair: Pair) -> Recipe:
    if pair.num_examples is None or pair.num_examples < 2:
        raise ValueError(
            "crd keeps a memory-bank row per training example: make_distiller needs "
            f"num_examples (the training-set size, at least 2), got {pair.num_examples}"
        )
    in_dims = _pooled_dims(pair)
    modules = ContrastModules(
        embedding_head(in_dims[0], k["feat_dim"], pair.dtype),
        embedding_head(in_dims[1], k["feat_dim"], pair.dtype),
        in_dims, pair.num_examples, int(k["negatives"]), k["temperature"], k["momentum"],
    )  # fmt: skip

    def objective(out, batch, warmup) -> Loss:
        del warmup  # mdistiller's CRD has no warm-up
        ce = losses.cross_entropy(out.student_logits, batch["label"])
        x = out.extras
        crd = losses.crd_loss(
            x["student_emb"], x["teacher_emb"], x["memory_student"], x["memory_teacher"],
            x["contrast_idx"], x["normalizers"], temperature=k["temperature"],
        )  # fmt: skip
        return Loss(k["ce_weight"] * ce, k["feat_weight"] * crd, {"ce": ce, "crd": crd})

    return Recipe(objective, modules, taps=True)


METHOD = Method(
    name="crd",
    summary="CRD: contrastive NCE of embedded pooled features against momentum memory banks",
    knobs=knobs,
    build=build,
    consumes=("logits", "taps", "index"),
)
