"""Partial FC: a model-parallel, optionally sampled, classifier head with its own sparse optimizer.

Class centers are sharded over ranks as contiguous balanced ranges. Every rank all-gathers the
embeddings and labels of the global batch, computes cosine logits against its (sampled) centers,
applies the margin, and a distributed softmax cross-entropy (fp32: all-reduce of the row max, then of
the sum of exponentials) gives the mean loss over the global batch. Gradients returned to the
embeddings are the true gradients of that global mean (the backbone's DDP hook must SUM them).

The head owns its weight shard and optimizer state (SGD with momentum, Adam or AdamW). The weight is
a buffer, not a parameter, so DDP and the backbone optimizer never see it; each forward gathers the
sampled rows, and ``step`` updates only those rows (``pfc_update="sparse"``, the default) or every
row (``"dense"``, arcface_torch v2 semantics: momentum and weight decay move all centers every step).
Sparse is the default because with sample_rate r < 1 it never materialises a [num_local, D] gradient
or touches unsampled rows, so memory is weight + optimizer state and the update costs O(r) of the
dense one; it is the Partial FC v1 behaviour insightface published.

This module is the head (sampling, forward, world-size independent state); the kernels, the
reduced-precision storage and the optimizer live in ``pfc.kernels``, ``pfc.storage`` and
``pfc.optim``. A training loop steps backbone and head together with ``pfc.optim.JointOptimizer``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from losses import FusedMarginLoss, MarginLoss
from pfc import PartialFCError
from pfc.kernels import (CosineLogits, DistributedSoftmaxCE, FusedMarginSoftmax, GradientSink, Workspace,
                         row_chunks)
from pfc.optim import OPTIMIZERS, STATE_NAMES, RowOptimizer
from pfc.storage import (STATE_DTYPES, WEIGHT_DTYPES, RowStorage, dequantize_rows_int8, quantize_rows_int8,
                         stochastic_round)
from utils.devices import distributed as dist_utils

logger = logging.getLogger(__name__)

__all__ = ["PartialFC", "PartialFCError", "init_weight_rows", "OPTIMIZERS", "WEIGHT_DTYPES",
           "STATE_DTYPES", "stochastic_round", "quantize_rows_int8", "dequantize_rows_int8"]

STATE_FORMAT = "arcscale-partial-fc"
STATE_VERSION = 1
PFC_UPDATES = ("sparse", "dense")
INIT_BLOCK_ROWS = 1 << 16  # weight init is generated per block of rows from (seed, block): world-size independent
GATHER_CHUNK_VALUES = 1 << 24  # values per transfer to rank 0 when a checkpoint gathers the head (bounds its memory)


def init_weight_rows(start: int, count: int, embedding_size: int, seed: int, std: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [start, start+count) of the N(0, std) initial weight; identical for any sharding."""
    weight = torch.empty((count, embedding_size), dtype=dtype)
    row = start
    while row < start + count:
        block = row // INIT_BLOCK_ROWS
        block_start = block * INIT_BLOCK_ROWS
        # Offset so block 0 of seed 0 is not torch.manual_seed(0)'s stream (which users also draw inputs from).
        generator = torch.Generator().manual_seed((seed * 1_000_003 + block + 0x5DEECE66D) % 2**62)
        values = torch.empty((INIT_BLOCK_ROWS, embedding_size)).normal_(0.0, std, generator=generator)
        stop = min(start + count, block_start + INIT_BLOCK_ROWS)
        weight[row - start: stop - start] = values[row - block_start: stop - block_start]
        row = stop
    return weight


class PartialFC(nn.Module):
    """Model-parallel margin-softmax head (arcface_torch's ``PartialFC_V2`` interface).

    ``loss = head(local_embeddings, local_labels)``, then backward; a trainer steps it with
    ``pfc.optim.JointOptimizer`` (backbone and head together). The head's own step API, which that
    optimizer calls: ``unscale_``, ``grads_finite``, ``step(lr)``, ``zero_grad()``, and
    ``center_grad()`` to read the accumulated gradient rows. ``pfc_update="sparse"`` (default) moves
    only sampled rows and their optimizer state; ``"dense"`` decays every row every step (arcface_torch
    v2). ``weight_dtype`` ("float32" or "bfloat16") and ``state_dtype`` ("float32", "bfloat16" or, for
    SGD momentum, "int8" with a per-row scale), all with stochastic rounding, are explicit memory
    options; logits, margin and cross-entropy are always fp32 (``fp16`` is accepted for arcface_torch
    compatibility and changes nothing). ``equal_batches=True``: every rank passes the same number of rows
    to every forward (no size exchange); ``check_labels=False``: the caller guarantees labels in
    ``[0, num_classes)`` (no range check; an out-of-range label would have no target class).
    """

    def __init__(self, margin_loss: nn.Module, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 pfc_update: str = "sparse", fp16: bool = False, weight_dtype: str = "float32",
                 state_dtype: str = "float32", seed: int = 0, init_std: float = 0.01,
                 update_chunk_rows: int = 4096, equal_batches: bool = False, check_labels: bool = True):
        super().__init__()
        if not callable(margin_loss):
            raise PartialFCError(f"PartialFC: margin_loss must be callable (e.g. losses.CombinedMarginLoss), "
                                 f"got {type(margin_loss).__name__}")
        if not isinstance(embedding_size, int) or embedding_size <= 0:
            raise PartialFCError(f"PartialFC: embedding_size={embedding_size!r}: expected a positive int")
        if not isinstance(sample_rate, (int, float)) or not 0.0 < sample_rate <= 1.0:
            raise PartialFCError(f"PartialFC: sample_rate={sample_rate!r}: expected 0 < sample_rate <= 1")
        if pfc_update not in PFC_UPDATES:
            raise PartialFCError(f"PartialFC: pfc_update={pfc_update!r}: expected one of {', '.join(PFC_UPDATES)}")
        for key, value, choices in (("weight_dtype", weight_dtype, WEIGHT_DTYPES),
                                    ("state_dtype", state_dtype, STATE_DTYPES)):
            if value not in choices:
                raise PartialFCError(f"PartialFC: {key}={value!r} (config key 'pfc_{key}'): expected one of "
                                     f"{', '.join(choices)}")
        self.rank, self.world_size = dist_utils.get_rank(), dist_utils.get_world_size()
        if not isinstance(num_classes, int) or num_classes < self.world_size:
            raise PartialFCError(f"PartialFC: num_classes={num_classes!r}: expected an int >= world size "
                                 f"{self.world_size}")
        self.margin_loss = margin_loss
        # How the margin is called, decided once: the fused protocol, our keyword convention, or (custom
        # callables) margin(logits, labels).
        self.fused = isinstance(margin_loss, FusedMarginLoss)
        self.margin_kwargs = isinstance(margin_loss, MarginLoss)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.pfc_update = float(sample_rate), pfc_update
        self.weight_dtype, self.state_dtype = WEIGHT_DTYPES[weight_dtype], STATE_DTYPES[state_dtype]
        self.seed, self.update_chunk_rows = int(seed), int(update_chunk_rows)
        # A trainer whose loader drops the last partial batch knows every rank's batch size and has checked
        # the labels as it read them: it turns off the size exchange and the range check, each a host sync
        # (a GPU stall) per forward.
        self.equal_batches, self.check_labels = bool(equal_batches), bool(check_labels)
        # contiguous class shards, sizes differ by at most one (the same split as every other sharded tensor)
        self.class_start, class_end = dist_utils.shard_bounds(num_classes, self.world_size)[self.rank]
        self.num_local = class_end - self.class_start
        self.num_sample = max(1, int(round(self.sample_rate * self.num_local)))
        # A buffer, not a Parameter: `.to(device)` moves it, DDP and the backbone optimizer never see it.
        self.register_buffer("weight", init_weight_rows(self.class_start, self.num_local, embedding_size,
                                                        self.seed, init_std, self.weight_dtype), persistent=False)
        self.row_optimizer: RowOptimizer | None = None
        self.grad_sink = GradientSink(self.num_local, embedding_size)
        self.workspace = Workspace()
        self._generators: dict[str, torch.Generator] = {}
        self.storage = RowStorage(lambda device: self._get_generator(device, "rounding"), self.update_chunk_rows)
        self.last_index: torch.Tensor | None = None  # sampled rows of the latest forward (None: all rows)
        if fp16:
            logger.info("PartialFC: fp16=True ignored; logits, margin and cross-entropy always run in fp32")

    # ------------------------------------------------------------------ optimizer
    @property
    def optimizer_name(self) -> str | None:
        """The configured row optimizer's name (None before ``configure_optimizer``)."""
        return None if self.row_optimizer is None else self.row_optimizer.name

    def configure_optimizer(self, name: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                            betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """Choose the row optimizer (sgd, adam, adamw) and allocate its state for this shard (call after
        ``.to(device)``)."""
        optimizer = RowOptimizer(name, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps)
        specs = optimizer.state_specs(self.num_local, self.embedding_size, self.state_dtype)
        for key in STATE_NAMES:
            if key in self._buffers:
                del self._buffers[key]
        self.row_optimizer = optimizer
        for key, (shape, dtype) in specs.items():
            self.register_buffer(key, torch.zeros(shape, dtype=dtype, device=self.weight.device), persistent=False)

    def optimizer_state_names(self) -> list[str]:
        """Names of the per-row optimizer state buffers this head holds."""
        return [key for key in STATE_NAMES if key in self._buffers]

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise PartialFCError(f"PartialFC: embeddings must be [B, embedding_size={self.embedding_size}], got "
                                 f"shape {tuple(embeddings.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise PartialFCError(f"PartialFC: labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.numel() != embeddings.shape[0]:
            raise PartialFCError(f"PartialFC: {labels.numel()} labels for {embeddings.shape[0]} embeddings")

    def _check_label_range(self, labels: torch.Tensor) -> None:
        # Every rank checks the gathered labels, so all ranks raise together instead of hanging.
        if labels.numel() == 0:
            return
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            bad = low if low < 0 else high
            raise PartialFCError(f"PartialFC: label {bad} is outside [0, num_classes={self.num_classes}); check "
                                 f"config key 'num_classes' against the dataset's labels")

    def _get_generator(self, device: torch.device, purpose: str = "sampling") -> torch.Generator:
        """Per-rank generators: "sampling" (negatives) and "rounding" (stochastic rounding noise), apart
        so that the storage dtype never changes which negatives are drawn."""
        generator = self._generators.get(purpose)
        if generator is None or generator.device != device:
            generator = self._generators[purpose] = torch.Generator(device=device)
            offset = 0 if purpose == "sampling" else 0x9E3779B9
            generator.manual_seed((self.seed * 7919 + 104729 * (self.rank + 1) + offset) % 2**62)
        return generator

    def sample(self, shard_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted sampled row indices, labels remapped to positions in them; -1 stays -1): every
        positive class of the global batch plus random negatives up to ``num_sample`` rows."""
        valid = shard_labels >= 0
        positives = torch.unique(shard_labels[valid], sorted=True)
        if positives.numel() >= self.num_sample:
            index = positives
        else:
            scores = torch.rand(self.num_local, device=shard_labels.device,
                                generator=self._get_generator(shard_labels.device))
            scores[positives] = 2.0  # positives always win the top-k
            index = torch.topk(scores, self.num_sample, sorted=False).indices.sort().values
        remapped = shard_labels.clone()
        remapped[valid] = torch.searchsorted(index, shard_labels[valid])
        return index, remapped

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax loss over the global batch (fp32, also under autocast)."""
        self._check_inputs(local_embeddings, local_labels)
        self.grad_sink.collect()  # fold the previous micro-step's gradient; frees its leaf copy
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False):
            return self._forward_fp32(local_embeddings.float(), local_labels.reshape(-1).long())

    def _gather_centers(self, index: torch.Tensor):
        """fp32 rows ``weight[index]``: into the workspace (fused path) or a fresh tensor."""
        if not self.fused:
            return self.weight.index_select(0, index).float(), None
        centers, lease = self.workspace.take("centers", (index.numel(), self.embedding_size), self.weight.device)
        if self.weight.dtype == torch.float32:
            torch.index_select(self.weight, 0, index, out=centers)
        else:  # in row chunks: no [S, D] bf16 temporary
            for rows in row_chunks(index.numel()):
                centers[rows] = self.weight.index_select(0, index[rows])
        return centers, lease

    def _forward_fp32(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distributed = dist_utils.is_distributed()
        if distributed:
            sizes = ([embeddings.shape[0]] * self.world_size if self.equal_batches
                     else dist_utils.all_gather_sizes(embeddings.shape[0], embeddings.device))
            embeddings = dist_utils.all_gather_rows(embeddings, sizes)
            labels = dist_utils.all_gather_rows(labels, sizes)
        if self.check_labels:
            self._check_label_range(labels)
        in_shard = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        shard_labels = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))
        centers_lease = None
        if self.sample_rate < 1.0:
            index, shard_labels = self.sample(shard_labels)
            centers, centers_lease = self._gather_centers(index)
        else:
            index = None
            centers = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        self.last_index = index
        centers = centers.detach().requires_grad_(torch.is_grad_enabled())
        norms = embeddings.detach().norm(dim=1) if getattr(self.margin_loss, "needs_norms", False) else None
        embeddings_n = F.normalize(embeddings, dim=1)
        if self.fused:
            return FusedMarginSoftmax.apply(embeddings_n, centers, self.margin_loss, self.workspace, self.grad_sink,
                                            index, shard_labels, labels.shape[0], norms, centers_lease,
                                            self.weight._version)
        logits = CosineLogits.apply(embeddings_n, centers)
        with torch.no_grad():
            logits.clamp_(-1.0, 1.0)  # rounding can leave |cos| a hair above 1
        if self.margin_kwargs:
            logits = self.margin_loss(logits, shard_labels, norms=norms, inplace=True, model_parallel=distributed)
        else:
            logits = self.margin_loss(logits, shard_labels)
        loss = DistributedSoftmaxCE.apply(logits.float(), shard_labels, labels.shape[0])
        if centers.requires_grad:
            self.grad_sink.watch(index, centers)
        return loss

    # ------------------------------------------------------------------ gradients and the update
    def center_grad(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """The accumulated center gradient as (sorted local row index or None = every row, rows), summed
        over the micro-steps since ``zero_grad``; None when there is none."""
        return self.grad_sink.coalesced()

    def unscale_(self, inv_scale: float | torch.Tensor) -> None:
        """Multiply the accumulated center gradients by ``inv_scale`` (AMP loss scaling)."""
        self.grad_sink.unscale_(inv_scale)

    def grads_finite(self) -> torch.Tensor | bool:
        """Whether this rank's accumulated center gradients are all finite (a local check): a 0-dim bool
        tensor on the head's device, not read on the host, or True without gradients."""
        return self.grad_sink.all_finite()

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (and hand their buffers back)."""
        self.grad_sink.clear()

    def step(self, lr: float) -> None:
        """Apply the accumulated gradient: sampled rows only (sparse) or every row (dense)."""
        if self.row_optimizer is None:
            raise PartialFCError("PartialFC: call configure_optimizer() before step()")
        grad = self.center_grad()
        if grad is None:
            return  # like torch.optim: no gradient, no update
        state = {name: self._buffers[name] for name in self.optimizer_state_names()}
        # The forward's fp32 copy of weight[index] is still exact if the weight has not changed since.
        gathered = None if grad[0] is None else self.grad_sink.gathered_rows(grad[0], self.weight._version)
        self.row_optimizer.step(self.weight, state, grad, lr, self.storage, dense=self.pfc_update == "dense",
                                chunk_rows=self.update_chunk_rows, gathered=gathered)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args, **kwargs):
        """Refused: a shard's state depends on the world size; use the collective ``full_state_dict()``."""
        raise PartialFCError("PartialFC: use full_state_dict() / load_full_state_dict() (collective, "
                             "world-size independent) instead of state_dict()")

    def load_state_dict(self, *args, **kwargs):
        """Refused: use ``load_full_state_dict()``, which re-shards for this world size."""
        raise PartialFCError("PartialFC: use load_full_state_dict() instead of load_state_dict()")

    def _gather_to_rank0(self, shard: torch.Tensor) -> torch.Tensor | None:
        """[num_classes, ...] on CPU at rank 0 (None elsewhere): each rank's rows go to rank 0 only, at most
        ``GATHER_CHUNK_VALUES`` values per transfer, so no rank holds more than one such piece beyond the
        result, whatever the number of ranks or classes."""
        row_values = max(1, math.prod(shard.shape[1:]))  # the same on every rank, even on an empty shard
        return dist_utils.gather_rows_to_rank0(shard, dist_utils.shard_bounds(self.num_classes, self.world_size),
                                               max(1, GATHER_CHUNK_VALUES // row_values))

    def full_state_dict(self) -> dict | None:
        """Collective (every rank calls it): the world-size independent head state on rank 0 (CPU),
        None on other ranks."""
        weight = self._gather_to_rank0(self.weight)
        optimizer = {name: self._gather_to_rank0(self._buffers[name]) for name in self.optimizer_state_names()}
        # Every rank's sampling and rounding generators, so a resume on the same world size draws the same
        # negatives as an uninterrupted run (on another world size the streams restart from the seed).
        generator_state = {purpose: generator.get_state() for purpose, generator in self._generators.items()}
        generator_states = [generator_state]
        if dist_utils.is_distributed():
            import torch.distributed as dist

            generator_states = [None] * self.world_size
            dist.all_gather_object(generator_states, generator_state)
        if self.rank != 0:
            return None
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "num_classes": self.num_classes, "embedding_size": self.embedding_size,
            "weight": weight,
            "optimizer": None if self.optimizer_name is None else {"name": self.optimizer_name, **optimizer},
            "margin": {key: value.detach().cpu().clone() for key, value in self.margin_loss.state_dict().items()}
            if isinstance(self.margin_loss, nn.Module) else {},
            "generators": {"world_size": self.world_size, "states": generator_states},
        }

    def load_full_state_dict(self, state: Mapping[str, Any]) -> None:
        """Every rank: load its class range from a ``full_state_dict()`` (any world size wrote it)."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise PartialFCError(f"PartialFC: not a Partial FC state (expected format {STATE_FORMAT!r})")
        if state["num_classes"] != self.num_classes or state["embedding_size"] != self.embedding_size:
            raise PartialFCError(f"PartialFC: checkpoint head has num_classes={state['num_classes']}, "
                                 f"embedding_size={state['embedding_size']}; this head has "
                                 f"{self.num_classes}, {self.embedding_size}")
        rows = slice(self.class_start, self.class_start + self.num_local)
        with torch.no_grad():
            self.weight.copy_(state["weight"][rows])
            optimizer = state.get("optimizer")
            if optimizer is not None:
                if self.optimizer_name is None:
                    logger.warning("PartialFC: checkpoint has %s state but configure_optimizer() was not called; "
                                   "optimizer state not loaded", optimizer["name"])
                elif optimizer["name"] != self.optimizer_name:
                    raise PartialFCError(f"PartialFC: checkpoint optimizer is {optimizer['name']!r}, this head "
                                         f"uses {self.optimizer_name!r}")
                else:
                    self._load_optimizer_rows(optimizer, rows)
            if state.get("margin") and isinstance(self.margin_loss, nn.Module):
                self.margin_loss.load_state_dict(state["margin"])
        generators = state.get("generators")
        if generators and generators["world_size"] == self.world_size and generators["states"][self.rank] is not None:
            saved = generators["states"][self.rank]
            if isinstance(saved, torch.Tensor):  # written before the rounding generator existed
                saved = {"sampling": saved}
            for purpose, generator_state in saved.items():
                self._get_generator(self.weight.device, purpose).set_state(generator_state)
        self.zero_grad()

    def _load_optimizer_rows(self, optimizer: Mapping[str, Any], rows: slice) -> None:
        """Copy this shard's optimizer rows, converting between float32 / bfloat16 / int8 storage."""
        for name in self.optimizer_state_names():
            if name.endswith("_scale"):
                continue  # loaded with its int8 tensor
            target, target_scale = self._buffers[name], self._buffers.get(name + "_scale")
            if name not in optimizer:
                logger.warning("PartialFC: checkpoint has no %s; starting it from zero", name)
                target.zero_()
                if target_scale is not None:
                    target_scale.zero_()
                continue
            source = optimizer[name][rows]
            source_scale = optimizer[name + "_scale"][rows] if source.dtype == torch.int8 else None
            self.storage.convert(target, source, source_scale, target_scale, self.update_chunk_rows)

    def extra_repr(self) -> str:
        """Classes, shard, sampling and update settings, shown by ``print(head)``."""
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, rank={self.rank}/"
                f"{self.world_size}, classes=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate}, pfc_update={self.pfc_update}, optimizer={self.optimizer_name}")
