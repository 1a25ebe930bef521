"""A PyTorch reference train step, to put bkd_jax's step times next to PyTorch's.

The networks are the CIFAR basic-block ResNets (3x3 stem, three stages of
`(depth - 2) / 6` blocks at 32, 16 and 8 pixels, global average pool, linear classifier)
and the ImageNet ResNet-18/34 (7x7 stride-2 stem and max pool, four stages), laid out
block by block like bkd_jax's BlockNets so that Block-KD's stepping-stones can be cut at
the same places. The objectives are written from their formulas, as in docs/method.md:

- ce: CE(student, y);
- kd: 0.1 CE + 0.9 tau^2 KL(p_teacher || p_student), tau = 4;
- dkd: 0.1 CE + DKD(alpha 1, beta 8, tau 4), warm-up factor 1;
- blockkd / blockkd_lite: stones i (all, or the two deepest) run the student's blocks
  1..i, a connector (1x1 convolution, BatchNorm, ReLU; pooling when the maps differ),
  and the frozen teacher's blocks i+1..n and head; alpha = beta = gamma = 1, distance KD.

The update is SGD with momentum 0.9, weight decay 5e-4, learning rate 0.05. The teacher
runs in inference mode without gradients for its own logits; on the stone paths only the
input gradient flows through its blocks (its parameters do not require gradients).
This is a reference for timing, not a trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 4.0
CIFAR_SPECS = {  # name: (depth, (stem, stage 1, stage 2, stage 3 channels))
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
IMAGENET_UNITS = {"imagenet_resnet18": (2, 2, 2, 2), "imagenet_resnet34": (3, 4, 6, 3)}
METHODS = ("ce", "kd", "dkd", "blockkd", "blockkd_lite")


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


class Basic(nn.Module):
    """Two 3x3 convolutions and a residual (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout, 3)
        )
        self.project = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.project(x))


class BlockResNet(nn.Module):
    """A ResNet as a list of blocks (block 1 holds the stem) and a classifier head."""

    def __init__(self, stem: nn.Module, stages: list[tuple[int, int, int, int]], classes: int):
        super().__init__()
        blocks = []
        for k, (cin, cout, units, stride) in enumerate(stages):
            layers = [Basic(cin, cout, stride)] + [Basic(cout, cout, 1) for _ in range(units - 1)]
            blocks.append(nn.Sequential(stem, *layers) if k == 0 else nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(stages[-1][1], classes)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every block."""
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def suffix(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Logits of blocks i+1..n and the head applied to a block-i feature map."""
        for block in self.blocks[i:]:
            h = block(h)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1])


def _stages(stem: int, widths: tuple[int, ...], units: tuple[int, ...]) -> list[tuple]:
    """(in, out, units, stride) per stage; every stage but the first halves the map."""
    ins = (stem, *widths[:-1])
    return [
        (cin, cout, u, 1 if k == 0 else 2)
        for k, (cin, cout, u) in enumerate(zip(ins, widths, units, strict=True))
    ]


def make_model(name: str, classes: int) -> BlockResNet:
    """One of `CIFAR_SPECS` or `IMAGENET_UNITS`."""
    if name in CIFAR_SPECS:
        depth, (c0, *widths) = CIFAR_SPECS[name]
        stem = nn.Sequential(*_conv_bn(3, c0, 3), nn.ReLU(inplace=True))
        return BlockResNet(stem, _stages(c0, tuple(widths), ((depth - 2) // 6,) * 3), classes)
    if name in IMAGENET_UNITS:
        stem = nn.Sequential(*_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        return BlockResNet(stem, _stages(64, (64, 128, 256, 512), IMAGENET_UNITS[name]), classes)
    raise ValueError(f"no reference model {name!r}; known: {(*CIFAR_SPECS, *IMAGENET_UNITS)}")


class Connector(nn.Module):
    """Average pooling to the teacher's map size, then a 1x1 convolution, BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        pool = [nn.AvgPool2d(factor)] if factor > 1 else []
        self.net = nn.Sequential(*pool, *_conv_bn(cin, cout, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def kd(student: torch.Tensor, teacher: torch.Tensor, tau: float = TEMPERATURE) -> torch.Tensor:
    """tau^2 KL(softmax(teacher / tau) || softmax(student / tau)), batch mean."""
    log_s, log_t = F.log_softmax(student / tau, 1), F.log_softmax(teacher / tau, 1)
    return tau**2 * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def dkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Zhao et al.'s TCKD + 8 NCKD at tau = 4 (alpha 1, beta 8)."""
    tau = TEMPERATURE
    target = F.one_hot(labels, student.shape[1]).bool()

    def binary(logits):
        p = F.softmax(logits / tau, 1)
        pt = (p * target).sum(1, keepdim=True)
        return torch.cat([pt, 1 - pt], 1).clamp_min(1e-12).log()

    tckd = F.kl_div(binary(student), binary(teacher), reduction="batchmean", log_target=True)
    masked_s = F.log_softmax(student / tau - 1000.0 * target, 1)
    masked_t = F.log_softmax(teacher / tau - 1000.0 * target, 1)
    nckd = F.kl_div(masked_s, masked_t, reduction="batchmean", log_target=True)
    return tau**2 * (tckd + 8.0 * nckd)


class ReferenceStep:
    """One method's full train step (forward, backward, SGD) on a fixed random batch."""

    def __init__(
        self,
        method: str,
        pair: tuple[str, str],
        batch_size: int,
        image_size: int,
        classes: int,
        *,
        device: str = "cpu",
        channels_last: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        if method not in METHODS:
            raise ValueError(f"no reference step for {method!r}; known: {METHODS}")
        self.method, self.device, self.dtype = method, torch.device(device), dtype
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
        self.images = images.to(self.device, memory_format=fmt)
        self.labels = torch.randint(0, classes, (batch_size,), generator=gen).to(self.device)
        self.student = make_model(pair[1], classes).to(self.device, memory_format=fmt)
        self.teacher = make_model(pair[0], classes).to(self.device, memory_format=fmt).eval()
        self.teacher.requires_grad_(False)
        self.stones: tuple[int, ...] = ()
        self.connectors = nn.ModuleDict()
        if method.startswith("blockkd"):
            n = len(self.student.blocks)
            self.stones = tuple(range(1, n + 1)) if method == "blockkd" else (n - 1, n)
            with torch.no_grad():
                s_feats = self.student.features(self.images[:1])
                t_feats = self.teacher.features(self.images[:1])
            for i in self.stones:
                s, t = s_feats[i - 1], t_feats[i - 1]
                factor = s.shape[-1] // t.shape[-1]
                self.connectors[str(i)] = Connector(s.shape[1], t.shape[1], factor)
            self.connectors.to(self.device, memory_format=fmt)
        params = [*self.student.parameters(), *self.connectors.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def _autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, self.dtype, enabled=enabled)

    def _loss(self) -> torch.Tensor:
        x, y = self.images, self.labels
        if self.method == "ce":
            return F.cross_entropy(self.student(x).float(), y)
        with torch.no_grad():
            teacher = self.teacher(x).float()
        feats = self.student.features(x)
        student = self.student.head(feats[-1]).float()
        ce = F.cross_entropy(student, y)
        if self.method == "kd":
            return 0.1 * ce + 0.9 * kd(student, teacher)
        if self.method == "dkd":
            return 0.1 * ce + dkd(student, teacher, y)
        n = len(feats)
        stones = {
            i: self.teacher.suffix(self.connectors[str(i)](feats[i - 1]), i).float()
            for i in self.stones
        }
        weights = {i: 2.0 ** (i - n) for i in stones}
        task = ce + sum(w * F.cross_entropy(stones[i], y) for i, w in weights.items())
        distill = kd(student, teacher) + sum(w * kd(stones[i], teacher) for i, w in weights.items())
        ensemble = torch.stack(list(stones.values())).mean(0).detach()
        cross = kd(student, ensemble) + sum(kd(s, ensemble) for s in stones.values())
        return task + distill + cross

    def __call__(self) -> torch.Tensor:
        """Runs one step; returns the loss (synchronised with the device)."""
        self.student.train()
        self.connectors.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self._loss()
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss.detach()


def has_models(pair: tuple[str, str]) -> bool:
    """Whether both networks of a (teacher, student) pair have a reference here."""
    return all(name in CIFAR_SPECS or name in IMAGENET_UNITS for name in pair)
