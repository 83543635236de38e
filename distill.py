"""Knowledge distillation: a frozen teacher network's embeddings as a second target for the student.

``teacher = dict(network=..., weights=<file or registered name>)`` in a config adds
``kd_weight * kd_term`` to the head's loss (docs/training.md, "Knowledge distillation"):

- ``cosine``: ``1 - cos(P s, t)`` averaged over the batch;
- ``l2``: ``||P s - t||^2`` (squared Euclidean distance of the raw embeddings) averaged over the batch;
- ``relation``: the mean squared difference of the batch's pairwise cosine-similarity matrices
  (student's vs teacher's), which needs no projection whatever the two sizes are.

``P`` is a trained linear projection (no bias) from the student's embedding size to the teacher's,
present only when the sizes differ (cosine, l2). It is part of the training state (optimizer,
checkpoints, resume), never of the exported model.pt. The teacher runs in eval mode without gradients,
under the trainer's autocast, on each rank's own batch, converted to its own input convention; its file
is only read.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, ContextManager, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from backbones import normalize
from backbones.common import InputSpec, input_spec
from utils.config.rules import ConfigError
from utils.run.checkpoint import CheckpointError
from utils.weights.load import load_backbone_file
from utils.weights.resolve import resolve_weights

logger = logging.getLogger("arcscale.train")

KD_LOSSES = ("cosine", "l2", "relation")


def kd_term(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The unweighted distillation term of one batch: ``student`` [N, D] (already projected for cosine
    and l2) against ``teacher`` [N, D'] (D' = D for cosine and l2); float32 scalar."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
    if kind == "l2":
        return (student - teacher).pow(2).sum(dim=1).mean()
    if kind == "relation":
        s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
        return F.mse_loss(s @ s.t(), t @ t.t())
    raise ConfigError(f"config key 'kd_loss': expected one of {', '.join(map(repr, KD_LOSSES))}, got {kind!r}")


def seeded_projection(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """``nn.Linear(in, out, bias=False)`` with torch's default uniform bound 1/sqrt(in), drawn from its own
    generator seeded with ``seed``: every rank starts from the same matrix (ranks seed torch differently)
    and the trainer's RNG stream is left as it would be without distillation."""
    layer = nn.Linear(in_features, out_features, bias=False)
    generator = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator))
    return layer


class Distiller(nn.Module):
    """``distiller(images_uint8, student_embeddings, autocast)`` -> ``kd_weight * kd_term``.

    Its parameters (and state_dict) are the projection's only: the teacher is held outside the module
    tree, so it is never trained, saved, put in train mode or moved by the trainer. Value: this rank's
    term; gradient: 1/world_size of it (the DDP hook and :meth:`sum_grads` sum the ranks' shares, as the
    heads do), so the update is the global mean's.
    """

    def __init__(self, teacher: nn.Module, teacher_size: int, student_size: int, kind: str, weight: float,
                 seed: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if kind not in KD_LOSSES:
            kd_term(kind, torch.zeros(1, 1), torch.zeros(1, 1))  # the one-line error
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)  # not a submodule: see the docstring
        self.teacher_spec: InputSpec = input_spec(teacher)
        self.kind, self.weight, self.world_size = kind, float(weight), int(world_size)
        needs = kind != "relation" and teacher_size != student_size
        self.projection = seeded_projection(student_size, teacher_size, seed) if needs else None
        self._sum: torch.Tensor | float = 0.0
        self._count = 0

    @torch.no_grad()
    def teacher_embeddings(self, images: torch.Tensor, autocast: ContextManager | None = None) -> torch.Tensor:
        """The teacher's float32 embeddings of uint8 RGB ``images`` (resized and normalised to its convention)."""
        self.teacher.eval()
        x = normalize(images, self.teacher_spec, resize=True)
        with autocast if autocast is not None else torch.autocast(x.device.type, enabled=False):
            return self.teacher(x).float()

    def forward(self, images: torch.Tensor, embeddings: torch.Tensor,
                autocast: ContextManager | None = None) -> torch.Tensor:
        """``kd_weight * kd_term`` of this batch (value), with this rank's share of its gradient."""
        target = self.teacher_embeddings(images, autocast)
        student = embeddings.float()
        if self.projection is not None:
            student = self.projection(student)
        term = kd_term(self.kind, student, target)
        self._sum = self._sum + term.detach()
        self._count += 1
        weighted = self.weight * term
        if self.world_size == 1:
            return weighted
        share = weighted / self.world_size
        return share + (weighted - share).detach()

    def sum_grads(self) -> None:
        """SUM the projection's gradients over ranks (it is replicated, outside DDP)."""
        if self.projection is None or self.world_size == 1 or not dist.is_initialized():
            return
        for param in self.projection.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)

    def take_mean(self) -> float | None:
        """The mean unweighted term since the last call (None when none was computed); one host read."""
        if not self._count:
            return None
        mean = float(self._sum) / self._count
        self._sum, self._count = 0.0, 0
        return mean


def check_teacher(cfg: Any, model_names: Iterable[str]) -> str | None:
    """Before any data: the teacher's network is a registered one and its weights file exists (a registered
    name is fetched) and is not one this run writes; returns the file's path (None without a teacher).
    Errors are one line naming the key."""
    teacher = cfg.get("teacher")
    if not teacher:
        return None
    names = tuple(model_names)
    if teacher["network"] not in names:
        raise ConfigError(f"config key 'teacher.network': unknown network {teacher['network']!r} (expected one of "
                          f"{', '.join(names)})")
    path = resolve_weights(teacher["weights"], "teacher.weights")
    output = os.path.realpath(cfg.output)
    if os.path.dirname(os.path.realpath(path)) == output:
        raise ConfigError(f"config key 'teacher.weights': {path} is inside this run's output folder {cfg.output}, "
                          f"which the run writes: copy the teacher elsewhere or choose another output")
    return path


def build_distiller(cfg: Any, device: torch.device, world_size: int) -> Distiller | None:
    """The configured teacher loaded from its file (network and embedding size from the file, the config's
    ``teacher.network`` checked against it) and the distillation term on ``device``; None without one."""
    if not cfg.get("teacher"):
        return None
    path = resolve_weights(cfg.teacher["weights"], "teacher.weights")
    try:
        teacher, network, size = load_backbone_file(path, network=cfg.teacher["network"])
    except CheckpointError as exc:  # says which network the file holds; the user needs the key too
        raise CheckpointError(f"config key 'teacher': {exc}") from None
    distiller = Distiller(teacher.to(device), size, cfg.embedding_size, cfg.kd_loss, cfg.kd_weight, seed=cfg.seed,
                          world_size=world_size).to(device)
    logger.info("distillation: teacher '%s' from %s (embedding size %d, input %s), kd_loss=%s, kd_weight=%g%s",
                network, path, size, distiller.teacher_spec.describe(), cfg.kd_loss, cfg.kd_weight,
                f", projection {cfg.embedding_size} -> {size}" if distiller.projection is not None else "")
    return distiller
