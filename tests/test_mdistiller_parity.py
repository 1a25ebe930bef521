"""FitNet, VID, OFD, CRD and ReviewKD, whole objective and one SGD step, against
mdistiller's distillers.

PyTorch transcriptions of mdistiller's models (`torch_reference`) and of its distillers'
modules and losses run next to bkd_jax's distillers on the same weights: the student
and teacher converted with `bkd_jax.convert`, each trainable module's weights copied into
bkd_jax's module variables. The total loss (CE and feature term) and one step of
mdistiller's SGD (momentum 0.9, weight decay 5e-4 on every learnable parameter) must
agree: the student's and the modules' parameters and BatchNorm statistics afterwards,
and CRD's memory state (both banks, each row of the batch moved with momentum 0.5, and
the partition constants the first batch sets). CRD's contrast indices, drawn by mdistiller's
data loader and by bkd_jax from the step's key, are bkd_jax's on both sides. ReviewKD runs
at half its warm-up (mdistiller's epoch 10 of 20). About 25 s per method on 2 cores,
mostly compilation.

Two differences of mdistiller are left out on purpose, as bkd_jax documents them:
OFD's `train` puts the teacher in training mode (here it stays in inference mode, for
both), and VID's per-channel variances, kept in a plain list, are never given to the
optimizer (bkd_jax trains them, as VID's authors do); the variances are not compared
after the step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
import torch_reference  # noqa: E402  (needs torch)

from bkd_jax import config_defaults, convert, distillers, models, steps  # noqa: E402
from bkd_jax.distillers import crd  # noqa: E402

STUDENT, TEACHER = "resnet8", "resnet8x4"  # unequal widths: every module is rectangular
SHAPE = (8, 16, 16, 3)
NUM_EXAMPLES = 32  # CRD's bank rows; the batch is 8 of them
CRD_KNOBS = {"negatives": 64, "feat_dim": 16}  # small banks; the rest are the defaults
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4  # mdistiller's CIFAR-100 SGD


def _np(tensor) -> np.ndarray:
    """A copy: `Tensor.numpy` shares memory that the optimizer step then overwrites."""
    return tensor.detach().numpy().copy()


def _hwio(weight) -> np.ndarray:
    return _np(weight).transpose(2, 3, 1, 0)


def _bn_params(bn):
    return {"scale": _np(bn.weight), "bias": _np(bn.bias)}


def _bn_stats(bn):
    return {"mean": _np(bn.running_mean), "var": _np(bn.running_var)}


def _stage_channels(s_feats, t_feats) -> list[tuple[int, int]]:
    """(student, teacher) channels of every stage, feats[1:]."""
    return [(a.shape[1], b.shape[1]) for a, b in zip(s_feats["feats"][1:], t_feats["feats"][1:])]


class FitNet:
    """feats[2] through the hint regressor, MSE to the teacher's, weight 100."""

    def __init__(self, s_feats, t_feats, teacher, batch):
        del teacher, batch
        (_, cs, hs, _), (_, ct, ht, _) = s_feats["feats"][2].shape, t_feats["feats"][2].shape
        self.reg = torch_reference.HintRegressor(cs, ct, hs, ht)

    def parameters(self):
        return list(self.reg.parameters())

    def loss(self, fs, ft):
        return 100.0 * torch_reference.fitnet_feat_loss(self.reg, fs["feats"][2], ft["feats"][2])

    def variables(self):
        conv, bn = self.reg.conv, self.reg.bn
        params = {"conv": {"kernel": _hwio(conv.weight), "bias": _np(conv.bias)}}
        return (
            {"hint0": {**params, "bn": _bn_params(bn)}},
            {"hint0": {"bn": _bn_stats(bn)}},
            {},
        )


class VID:
    """A regressor and variances per stage, feats[1:], weight 1."""

    def __init__(self, s_feats, t_feats, teacher, batch):
        del teacher, batch
        pairs = _stage_channels(s_feats, t_feats)
        self.regs = [torch_reference.vid_regressor(cs, ct) for cs, ct in pairs]
        self.log_scales = [
            torch_reference.vid_init_log_scale(ct).requires_grad_() for _, ct in pairs
        ]

    def parameters(self):  # the variances are not among them (see the module docstring)
        return [p for reg in self.regs for p in reg.parameters()]

    def loss(self, fs, ft):
        return sum(
            torch_reference.vid_feat_loss(reg, alpha, a, b)
            for reg, alpha, a, b in zip(
                self.regs, self.log_scales, fs["feats"][1:], ft["feats"][1:]
            )
        )

    def variables(self):
        params = {
            f"vid{i}": {
                **{f"conv{j}": {"kernel": _hwio(reg[2 * j].weight)} for j in range(3)},
                "log_scale": _np(alpha),
            }
            for i, (reg, alpha) in enumerate(zip(self.regs, self.log_scales))
        }
        return params, {}, {}


class OFD:
    """A connector per stage on preact_feats[1:], margins from the teacher's BatchNorms
    before the stages' last ReLU, stage i weighted 1 / 2^(stages - 1 - i), weight 0.001."""

    def __init__(self, s_feats, t_feats, teacher, batch):
        del batch
        pairs = _stage_channels(s_feats, t_feats)
        self.connectors = [torch_reference.ofd_connector(cs, ct) for cs, ct in pairs]
        # mdistiller's resnet `get_bn_before_relu`: each stage's last unit's bn2.
        self.margins = [
            torch_reference.ofd_margins(getattr(teacher, f"layer{i + 1}")[-1].bn2)
            for i in range(len(pairs))
        ]

    def parameters(self):
        return [p for c in self.connectors for p in c.parameters()]

    def loss(self, fs, ft):
        n = len(self.connectors)
        return 0.001 * sum(
            torch_reference.ofd_feat_loss(conn(a), b, margin) / 2 ** (n - 1 - i)
            for i, (conn, margin, a, b) in enumerate(
                zip(self.connectors, self.margins, fs["preact_feats"][1:], ft["preact_feats"][1:])
            )
        )

    def variables(self):
        params = {
            f"ofd{i}": {"conv": {"kernel": _hwio(c[0].weight)}, "bn": _bn_params(c[1])}
            for i, c in enumerate(self.connectors)
        }
        stats = {f"ofd{i}": {"bn": _bn_stats(c[1])} for i, c in enumerate(self.connectors)}
        return params, stats, {}


class CRD:
    """Embedded pooled features against the momentum banks, NCE both ways, weight 0.8."""

    def __init__(self, s_feats, t_feats, teacher, batch):
        del teacher
        dims = s_feats["pooled_feat"].shape[1], t_feats["pooled_feat"].shape[1]
        dim = CRD_KNOBS["feat_dim"]
        self.embed_s, self.embed_t = (torch_reference.CRDEmbed(d, dim) for d in dims)
        self.memory = torch_reference.CRDMemory(
            NUM_EXAMPLES, dim, CRD_KNOBS["negatives"], 0.07, 0.5
        )
        self.index = torch.tensor(batch["index"], dtype=torch.long)
        self.contrast_idx = torch.tensor(batch["contrast_idx"], dtype=torch.long)

    def parameters(self):
        return [*self.embed_s.parameters(), *self.embed_t.parameters()]

    def loss(self, fs, ft):
        v_s, v_t = self.embed_s(fs["pooled_feat"]), self.embed_t(ft["pooled_feat"])
        out_s, out_t = self.memory.scores(v_s, v_t, self.index, self.contrast_idx)
        nce = functools.partial(torch_reference.crd_contrast_loss, num_data=NUM_EXAMPLES)
        return 0.8 * (nce(out_s) + nce(out_t))

    def variables(self):
        params = {
            name: {"kernel": _np(e.linear.weight).T, "bias": _np(e.linear.bias)}
            for name, e in (("embed_student", self.embed_s), ("embed_teacher", self.embed_t))
        }
        memory = {
            "student": _np(self.memory.student),
            "teacher": _np(self.memory.teacher),
            "normalizers": _np(self.memory.params[2:4]),
        }
        return params, {}, {"memory": memory}


class ReviewKD:
    """ABFs over the student's stages and pooled feature, HCL to the teacher's
    pre-activations and pooled feature, weight 1, at mdistiller's epoch 10 of 20."""

    EPOCH, WARMUP_EPOCHS = 10, 20

    def __init__(self, s_feats, t_feats, teacher, batch):
        del teacher, batch
        s_maps = [*s_feats["feats"][1:], s_feats["pooled_feat"][:, :, None, None]]
        t_maps = [*t_feats["preact_feats"][1:], t_feats["pooled_feat"][:, :, None, None]]
        mid = min(512, s_maps[-1].shape[1])  # mdistiller's, whatever MAX_MID_CHANNEL says
        created = [
            torch_reference.ABF(a.shape[1], mid, b.shape[1], i < len(s_maps) - 1)
            for i, (a, b) in enumerate(zip(s_maps, t_maps))
        ]
        self.abfs = created[::-1]  # deepest first, as ReviewKD keeps them
        self.shapes = [a.shape[2] for a in s_maps][::-1]
        self.out_shapes = [b.shape[2] for b in t_maps][::-1]
        for abf in created:  # random BatchNorms, as torch_reference.build makes them
            for bn in (abf.conv1[1], abf.conv2[1]):
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.normal_(0.0, 0.1)
                    bn.running_mean.normal_(0.0, 0.1)
                    bn.running_var.uniform_(0.5, 1.5)

    def parameters(self):
        return [p for abf in self.abfs for p in abf.parameters()]

    def loss(self, fs, ft):
        fused = torch_reference.review(self.abfs, fs, self.shapes, self.out_shapes)
        targets = [*ft["preact_feats"][1:], ft["pooled_feat"][:, :, None, None]]
        warmup = min(self.EPOCH / self.WARMUP_EPOCHS, 1.0)
        return 1.0 * warmup * torch_reference.hcl_loss(fused, targets)

    def variables(self):
        params, stats = {}, {}
        for i, abf in enumerate(self.abfs[::-1]):  # abf{i + 1} reviews level i
            conv1, bn1 = abf.conv1
            conv2, bn2 = abf.conv2
            params[f"abf{i + 1}"] = {
                "conv1": {"kernel": _hwio(conv1.weight)},
                "bn1": _bn_params(bn1),
                "conv2": {"kernel": _hwio(conv2.weight)},
                "bn2": _bn_params(bn2),
            }
            if abf.att_conv is not None:
                att = abf.att_conv[0]
                params[f"abf{i + 1}"]["att_conv"] = {
                    "kernel": _hwio(att.weight), "bias": _np(att.bias)
                }  # fmt: skip
            stats[f"abf{i + 1}"] = {"bn1": _bn_stats(bn1), "bn2": _bn_stats(bn2)}
        return params, stats, {}


METHODS = {"fitnet": FitNet, "vid": VID, "ofd": OFD, "crd": CRD, "reviewkd": ReviewKD}
KNOBS = {"crd": CRD_KNOBS}
WARMUP = {"reviewkd": ReviewKD.EPOCH / ReviewKD.WARMUP_EPOCHS}


@functools.cache
def _batch():
    rng = np.random.default_rng(0)
    images = rng.normal(size=SHAPE).astype(np.float32)
    labels = rng.integers(0, 100, SHAPE[0])
    index = rng.choice(NUM_EXAMPLES, SHAPE[0], replace=False).astype(np.int32)
    return images, labels, index


def _jax_variables(model: torch.nn.Module, name: str):
    state = {k: _np(v) for k, v in model.state_dict().items()}
    return convert.from_pytorch_state_dict(name, state)


def _torch_run(method: str, batch: dict):
    """mdistiller's loss and the student and modules after one SGD step on `batch`."""
    student = torch_reference.build(STUDENT, seed=0).train()
    teacher = torch_reference.build(TEACHER, seed=1).eval()
    x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2))
    with torch.no_grad():
        _, t_feats = teacher(x[:1])
        _, s_feats = student.eval()(x[:1])
    student.train()
    torch.manual_seed(2)
    distiller = METHODS[method](s_feats, t_feats, teacher, batch)
    before = (_jax_variables(student, STUDENT), distiller.variables())
    optimizer = torch.optim.SGD(
        list(student.parameters()) + distiller.parameters(),
        lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
    )  # fmt: skip
    logits, fs = student(x)
    with torch.no_grad():
        _, ft = teacher(x)
    loss = F.cross_entropy(logits, torch.from_numpy(batch["label"])) + distiller.loss(fs, ft)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = (_jax_variables(student, STUDENT), distiller.variables())
    return loss.item(), before, after, _jax_variables(teacher, TEACHER)


@pytest.mark.parametrize("method", list(METHODS))
def test_objective_and_one_sgd_step_equal_mdistillers(method):
    config = config_defaults.distill_config(method)
    config[method].update(KNOBS.get(method, {}))
    distiller = distillers.make_distiller(
        config,
        models.get_model(STUDENT, 100),
        models.get_model(TEACHER, 100),
        SHAPE,
        num_examples=NUM_EXAMPLES,
    )
    optimizer = optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM)
    )
    images, labels, index = _batch()
    state = steps.create_train_state(distiller, optimizer, jax.random.key(0), images)
    # CRD's contrast indices of this step, which mdistiller is given too.
    contrast_idx = crd.contrast_indices(
        state.step_key(), jnp.asarray(index), NUM_EXAMPLES, CRD_KNOBS["negatives"]
    )
    torch_batch = {
        "image": images, "label": labels, "index": index, "contrast_idx": np.asarray(contrast_idx)
    }  # fmt: skip
    loss, (student, modules), after, teacher_vars = _torch_run(method, torch_batch)
    module_params, module_stats, module_state = modules
    # Every module variable bkd_jax made has its PyTorch counterpart, of the same shape.
    shapes = jax.tree.map(
        np.shape, (state.params["modules"], state.batch_stats["modules"], state.module_state)
    )
    assert jax.tree.map(np.shape, modules) == shapes
    params = {"student": student["params"], "modules": module_params}
    state = state.replace(
        params=jax.tree.map(jnp.asarray, params),
        batch_stats=jax.tree.map(
            jnp.asarray, {"student": student["batch_stats"], "modules": module_stats}
        ),
        module_state=jax.tree.map(jnp.asarray, module_state),
        opt_state=optimizer.init(jax.tree.map(jnp.asarray, params)),
    )
    warmup = jnp.float32(WARMUP.get(method, 1.0))
    step = jax.jit(steps.make_train_step(distiller, optimizer, lambda s: warmup))
    batch = {
        "image": jnp.asarray(images),
        "label": jnp.asarray(labels, jnp.int32),
        "index": jnp.asarray(index),
    }
    new, metrics = step(state, teacher_vars, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)

    student_after, (modules_after, stats_after, state_after) = after
    if method == "vid":  # mdistiller never updates the variances (module docstring)
        for i in range(len(modules_after)):
            modules_after[f"vid{i}"]["log_scale"] = new.params["modules"][f"vid{i}"]["log_scale"]
    expected = (
        student_after["params"], modules_after, student_after["batch_stats"], stats_after,
        state_after,
    )  # fmt: skip
    got = (
        new.params["student"],
        new.params["modules"],
        new.batch_stats["student"],
        new.batch_stats["modules"],
        new.module_state,
    )
    for path, want, have in zip(
        jax.tree_util.tree_flatten_with_path(expected)[0],
        jax.tree.leaves(expected),
        jax.tree.leaves(got),
        strict=True,
    ):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6, err_msg=str(path[0]))
