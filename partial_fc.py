"""Partial FC: a model-parallel, optionally sampled, classifier head with its own sparse optimizer.

Class centers are sharded over ranks as contiguous balanced ranges. Every rank all-gathers the
embeddings and labels of the global batch, computes cosine logits against its (sampled) centers,
applies the margin, and a distributed softmax cross-entropy (fp32: all-reduce of the row max, then of
the sum of exponentials) gives the mean loss over the global batch. Gradients returned to the
embeddings are the true gradients of that global mean (the backbone's DDP hook must SUM them).

The head owns its weight shard and optimizer state (SGD with momentum or AdamW). The weight is a
buffer, not a parameter, so DDP and the backbone optimizer never see it; each forward gathers the
sampled rows into a small leaf tensor and ``step`` updates only those rows (``pfc_update="sparse"``,
the default) or every row (``"dense"``, arcface_torch v2 semantics: momentum and weight decay move
all centers every step). Sparse is the default because with sample_rate r < 1 it never materialises
a [num_local, D] gradient or touches unsampled rows, so memory is weight + optimizer state and the
update costs O(r) of the dense one; it is the Partial FC v1 behaviour insightface published.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from losses import _MarginBase
from utils import distributed as dist_utils

logger = logging.getLogger(__name__)

STATE_FORMAT = "arcscale-partial-fc"
STATE_VERSION = 1
PFC_UPDATES = ("sparse", "dense")
STATE_NAMES = ("momentum_buffer", "momentum_buffer_scale", "exp_avg", "exp_avg_sq", "adam_steps")
OPTIMIZERS = ("sgd", "adamw")
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
INIT_BLOCK_ROWS = 1 << 16  # weight init is generated per block of rows from (seed, block): world-size independent


class PartialFCError(ValueError):
    """Bad Partial FC input or setting; the message is one line."""


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) held by ``rank``: contiguous, sizes differ by at most one."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


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


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down with probability given by the distance (unbiased), so small
    updates (lr * weight decay ~ 1e-5 relative) survive bf16's 8-bit mantissa on average. ``noise``:
    int32 values uniform in [0, 2^16) shaped like ``values`` (drawn here when None)."""
    if dtype == torch.float32:
        return values
    bits = values.contiguous().view(torch.int32)
    if noise is None:
        noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(dtype)


def quantize_rows_int8(values: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 with stochastic rounding (unbiased): returns (int8 rows, fp32 scale per row)
    with ``values ~= int8 * scale[:, None]``. ``noise``: int32 uniform in [0, 2^16) like ``values``."""
    scale = values.abs().amax(dim=1).div_(127.0)
    scaled = values / scale.clamp_min(1e-30)[:, None]
    uniform = torch.rand_like(values) if noise is None else noise.float().mul_(1.0 / 65536)
    return scaled.add_(uniform).floor_().clamp_(-127, 127).to(torch.int8), scale


def dequantize_rows_int8(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return rows.float().mul_(scale[:, None])


class _Lease:
    """Marks one workspace buffer busy until released or garbage collected (e.g. with the autograd
    graph that saved it when no backward ever runs)."""

    def __init__(self, workspace: "_Workspace", name: str):
        self.workspace, self.name = workspace, name

    def release(self) -> None:
        if self.workspace is not None:
            self.workspace.busy.discard(self.name)
            self.workspace = None

    __del__ = release


class _Workspace:
    """Persistent [S, D] / [B, S] scratch tensors reused from step to step.

    A fresh 100-400 MB tensor every step costs its page faults (the allocator hands such blocks back to
    the OS on free): at 1M classes, r = 0.1 that was a third of the sparse step on CPU. A buffer in use
    (its lease not yet released) is never handed out twice; the second caller gets a fresh tensor.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.busy: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...], device: torch.device,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, _Lease | None]:
        numel = math.prod(shape)
        if name in self.busy:
            return torch.empty(shape, dtype=dtype, device=device), None
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            self.buffers.pop(name, None)  # drop the old one before allocating its replacement
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        self.busy.add(name)
        return buffer[:numel].view(shape), _Lease(self, name)


def _chunks(rows: int, chunk: int = 4096):
    """Row ranges small enough (8 MiB at D = 512) that their temporaries stay in cache and in the heap."""
    return (slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk))


def _project_center_grad_(grad: torch.Tensor, centers: torch.Tensor, inv_norm: torch.Tensor) -> None:
    """grad_j <- grad_j - (grad_j . w_j) / ||w_j||^2 * w_j: the chain rule through w_j / ||w_j|| when
    ``grad_j`` already holds sum_i dL/dcos_ij * e_i / ||w_j||."""
    for rows in _chunks(grad.shape[0]):
        coef = torch.linalg.vecdot(grad[rows], centers[rows]).mul_(inv_norm[rows].square())
        grad[rows].addcmul_(centers[rows], coef[:, None], value=-1.0)


def _softmax_cross_entropy_(logits: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                            total_rows: int) -> torch.Tensor:
    """Loss = mean over the global batch of -log softmax(target), classes split over ranks; turns
    ``logits`` into the softmax probabilities in place (fp32: all-reduce of the row max, then one
    all-reduce of the sum of exponentials and the target logit)."""
    row_max = logits.amax(dim=1)  # amax: no argmax work (8x faster than max on CPU)
    dist_utils.all_reduce_(row_max, "max")
    logits.sub_(row_max[:, None])
    target = torch.zeros_like(row_max)
    target[rows] = logits[rows, columns]  # shifted target logit; only the owning shard adds it
    logits.exp_()
    packed = torch.stack([logits.sum(dim=1), target])
    dist_utils.all_reduce_(packed, "sum")
    sum_exp, target = packed[0], packed[1]
    logits.div_(sum_exp[:, None])
    return (sum_exp.log() - target).sum() / total_rows


class _CosineLogits(torch.autograd.Function):
    """cos logits = (normalized embeddings @ centers^T) / ||center||, without a normalized copy of
    the centers (the generic path, for margins without a fused form)."""

    @staticmethod
    def forward(ctx, embeddings_n: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        inv_norm = centers.norm(dim=1).clamp_min(1e-12).reciprocal_()
        logits = embeddings_n.mm(centers.t())
        logits.mul_(inv_norm)
        ctx.save_for_backward(embeddings_n, centers, inv_norm)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        embeddings_n, centers, inv_norm = ctx.saved_tensors
        grad = grad * inv_norm
        grad_embeddings = grad.mm(centers) if ctx.needs_input_grad[0] else None
        grad_centers = None
        if ctx.needs_input_grad[1]:
            grad_centers = grad.t().mm(embeddings_n)
            _project_center_grad_(grad_centers, centers, inv_norm)
        return grad_embeddings, grad_centers


class _DistributedSoftmaxCE(torch.autograd.Function):
    """Mean over the global batch of -log softmax(target) with the classes split over ranks."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, total_rows: int) -> torch.Tensor:
        rows = torch.nonzero(labels != -1, as_tuple=True)[0]
        columns = labels[rows]
        probs = logits.clone()
        loss = _softmax_cross_entropy_(probs, rows, columns, total_rows)
        ctx.save_for_backward(probs, rows, columns)
        ctx.total_rows, ctx.used = total_rows, False
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.used:
            raise RuntimeError("PartialFC: backward through the same loss twice (retain_graph) is not supported")
        ctx.used = True
        probs, rows, columns = ctx.saved_tensors
        grad_logits = probs  # reused in place: the saved softmax is not needed afterwards
        grad_logits[rows, columns] -= 1.0
        grad_logits.mul_(grad / ctx.total_rows)
        return grad_logits, None, None


class _FusedMarginSoftmax(torch.autograd.Function):
    """Cosine logits, margin and distributed softmax cross-entropy in one function, all in one
    persistent [B, S] buffer, with a hand-written backward: two GEMMs, a few in-place passes, and the
    center gradient written straight into the head (no [S, D] autograd leaf, no [B, S] temporaries).
    Used for margins with ``supports_fused`` (combined, AdaFace); the result equals the generic path."""

    @staticmethod
    def forward(ctx, embeddings_n: torch.Tensor, centers: torch.Tensor, head: "PartialFC", index,
                shard_labels: torch.Tensor, total_rows: int, norms, centers_lease) -> torch.Tensor:
        inv_norm = centers.norm(dim=1).clamp_min(1e-12).reciprocal_()
        logits, logits_lease = head._workspace.take("logits", (embeddings_n.shape[0], centers.shape[0]),
                                                    centers.device)
        torch.mm(embeddings_n, centers.t(), out=logits)
        logits.mul_(inv_norm).clamp_(-1.0, 1.0)  # rounding can leave |cos| a hair above 1
        rows = torch.nonzero(shard_labels != -1, as_tuple=True)[0]
        columns = shard_labels[rows]
        fused = head.margin_loss.fused_(logits, rows, columns, norms=norms)
        loss = _softmax_cross_entropy_(logits, rows, columns, total_rows)
        ctx.save_for_backward(embeddings_n, centers, inv_norm)
        ctx.probs, ctx.rows, ctx.columns, ctx.fused = logits, rows, columns, fused
        ctx.head, ctx.index, ctx.total_rows = head, index, total_rows
        ctx.leases = (logits_lease, centers_lease)  # released by backward, or with the graph
        ctx.weight_version = head.weight._version
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.probs is None:
            raise RuntimeError("PartialFC: backward through the same loss twice (retain_graph) is not supported")
        embeddings_n, centers, inv_norm = ctx.saved_tensors
        grad, rows, columns, fused = ctx.probs, ctx.rows, ctx.columns, ctx.fused
        ctx.probs = None
        grad[rows, columns] -= 1.0  # d loss / d logits = (softmax - onehot) / total_rows
        fused.backward_(grad, rows, columns, grad_loss * (fused.scale / ctx.total_rows))
        grad.mul_(inv_norm)  # now d loss / d (e_i . w_j) for normalized e_i
        grad_embeddings = grad.mm(centers) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            center_grad, lease = ctx.head._workspace.take("center_grad", tuple(centers.shape), centers.device)
            torch.mm(grad.t(), embeddings_n, out=center_grad)
            _project_center_grad_(center_grad, centers, inv_norm)
            ctx.head._add_grad(ctx.index, center_grad, lease)
            if ctx.index is not None:  # step() may use these rows instead of gathering them again
                ctx.head._gathered_rows = (ctx.index, centers.detach(), ctx.weight_version, ctx.leases[1])
                ctx.leases = (ctx.leases[0], None)
        for lease in ctx.leases:
            if lease is not None:
                lease.release()
        return grad_embeddings, None, None, None, None, None, None, None


class PartialFC(nn.Module):
    """Model-parallel margin-softmax head (arcface_torch's ``PartialFC_V2`` interface).

    ``loss = head(local_embeddings, local_labels)``; then backward, optionally ``unscale_`` /
    ``grads_finite``, ``step(lr)`` and ``zero_grad()``. ``pfc_update="sparse"`` (default) moves only
    sampled rows and their optimizer state; ``"dense"`` decays every row every step (arcface_torch
    v2). ``weight_dtype`` ("float32" or "bfloat16") and ``state_dtype`` ("float32", "bfloat16" or,
    for SGD momentum, "int8" with a per-row scale), all with stochastic rounding, are explicit memory
    options; logits, margin and cross-entropy are always fp32 (``fp16`` is accepted for
    arcface_torch compatibility and changes nothing).
    """

    def __init__(self, margin_loss: nn.Module, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 pfc_update: str = "sparse", fp16: bool = False, weight_dtype: str = "float32",
                 state_dtype: str = "float32", seed: int = 0, init_std: float = 0.01,
                 update_chunk_rows: int = 4096):
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
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.pfc_update = float(sample_rate), pfc_update
        self.weight_dtype, self.state_dtype = WEIGHT_DTYPES[weight_dtype], STATE_DTYPES[state_dtype]
        self.seed, self.update_chunk_rows = int(seed), int(update_chunk_rows)
        self.class_start, self.num_local = class_range(num_classes, self.rank, self.world_size)
        self.num_sample = max(1, int(round(self.sample_rate * self.num_local)))
        # A buffer, not a Parameter: `.to(device)` moves it, DDP and the backbone optimizer never see it.
        self.register_buffer("weight", init_weight_rows(self.class_start, self.num_local, embedding_size,
                                                        self.seed, init_std, self.weight_dtype), persistent=False)
        self.optimizer_name: str | None = None
        self.hyper: dict[str, Any] = {}
        self._pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (row index, leaf) awaiting backward
        self._grads: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (row index, gradient rows)
        self._grad_leases: list[_Lease] = []
        # (index, fp32 rows of weight[index], weight._version then, lease) from the latest fused backward
        self._gathered_rows: tuple[torch.Tensor, torch.Tensor, int, _Lease | None] | None = None
        self._workspace = _Workspace()
        self.last_index: torch.Tensor | None = None  # sampled rows of the latest forward (None: all rows)
        self._generators: dict[str, torch.Generator] = {}
        self._noise_pool: torch.Tensor | None = None
        if fp16:
            logger.info("PartialFC: fp16=True ignored; logits, margin and cross-entropy always run in fp32")

    # ------------------------------------------------------------------ optimizer
    def configure_optimizer(self, name: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                            betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """Allocate the optimizer state for this shard (call after ``.to(device)``)."""
        if name not in OPTIMIZERS:
            raise PartialFCError(f"PartialFC: optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise PartialFCError(f"PartialFC: momentum={momentum!r} / weight_decay={weight_decay!r}: expected "
                                 f"0 <= momentum < 1 and weight_decay >= 0")
        if len(tuple(betas)) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise PartialFCError(f"PartialFC: adam betas={betas!r}: expected two numbers in [0, 1)")
        if self.state_dtype == torch.int8 and name != "sgd":
            raise PartialFCError(f"PartialFC: state_dtype='int8' holds SGD momentum only; optimizer={name!r} needs "
                                 f"state_dtype float32 or bfloat16 (config key 'pfc_state_dtype')")
        for key in STATE_NAMES:
            if key in self._buffers:
                del self._buffers[key]
        self.optimizer_name = name
        self.hyper = dict(momentum=float(momentum), weight_decay=float(weight_decay),
                          betas=tuple(float(beta) for beta in betas), eps=float(eps))
        device, shape = self.weight.device, (self.num_local, self.embedding_size)
        if name == "sgd":
            if momentum > 0:
                self.register_buffer("momentum_buffer", torch.zeros(shape, dtype=self.state_dtype, device=device),
                                     persistent=False)
                if self.state_dtype == torch.int8:
                    self.register_buffer("momentum_buffer_scale", torch.zeros(self.num_local, device=device),
                                         persistent=False)
        else:
            for key in ("exp_avg", "exp_avg_sq"):
                self.register_buffer(key, torch.zeros(shape, dtype=self.state_dtype, device=device), persistent=False)
            self.register_buffer("adam_steps", torch.zeros(self.num_local, dtype=torch.int32, device=device),
                                 persistent=False)

    def optimizer_state_names(self) -> list[str]:
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
        low, high = labels.min(), labels.max()
        low, high = int(low), int(high)
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

    def _collect_grads(self) -> None:
        waiting = []
        for index, leaf in self._pending:
            if leaf.grad is not None:
                self._grads.append((index, leaf.grad))
            else:
                waiting.append((index, leaf))
        self._pending = waiting

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(local_embeddings, local_labels)
        self._collect_grads()  # fold the previous micro-step's gradient; frees its leaf copy
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False):
            return self._forward_fp32(local_embeddings.float(), local_labels.reshape(-1).long())

    def _forward_fp32(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distributed = dist_utils.is_distributed()
        if distributed:
            sizes = dist_utils.all_gather_sizes(embeddings.shape[0], embeddings.device)
            embeddings = dist_utils.all_gather_rows(embeddings, sizes)
            labels = dist_utils.all_gather_rows(labels, sizes)
        self._check_label_range(labels)
        in_shard = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        shard_labels = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))
        fused = isinstance(self.margin_loss, _MarginBase) and self.margin_loss.supports_fused
        centers_lease = None
        if self.sample_rate < 1.0:
            index, shard_labels = self.sample(shard_labels)
            if fused:
                centers, centers_lease = self._workspace.take("centers", (index.numel(), self.embedding_size),
                                                              self.weight.device)
                if self.weight.dtype == torch.float32:
                    torch.index_select(self.weight, 0, index, out=centers)
                else:  # in row chunks: no [S, D] bf16 temporary
                    for rows in _chunks(index.numel()):
                        centers[rows] = self.weight.index_select(0, index[rows])
            else:
                centers = self.weight.index_select(0, index).float()
        else:
            index = None
            centers = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        self.last_index = index
        centers = centers.detach().requires_grad_(torch.is_grad_enabled())
        norms = None
        if isinstance(self.margin_loss, _MarginBase) and self.margin_loss.needs_norms:
            norms = embeddings.detach().norm(dim=1)
        if fused:
            return _FusedMarginSoftmax.apply(F.normalize(embeddings, dim=1), centers, self, index, shard_labels,
                                             labels.shape[0], norms, centers_lease)
        logits = _CosineLogits.apply(F.normalize(embeddings, dim=1), centers)
        with torch.no_grad():
            logits.clamp_(-1.0, 1.0)  # rounding can leave |cos| a hair above 1
        if isinstance(self.margin_loss, _MarginBase):
            logits = self.margin_loss(logits, shard_labels, norms=norms, inplace=True, model_parallel=distributed)
        else:
            logits = self.margin_loss(logits, shard_labels)
        loss = _DistributedSoftmaxCE.apply(logits.float(), shard_labels, labels.shape[0])
        if centers.requires_grad:
            self._pending.append((index, centers))
        return loss

    # ------------------------------------------------------------------ gradients and the update
    def _coalesced_grad(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """All accumulated micro-step gradients as one (sorted unique rows or None = all, rows)."""
        self._collect_grads()
        if not self._grads:
            return None
        if len(self._grads) > 1:
            if all(index is None for index, _ in self._grads):
                total = self._grads[0][1]
                for _, grad in self._grads[1:]:
                    total.add_(grad)
                self._grads = [(None, total)]
            else:
                full = torch.arange(self.num_local, device=self.weight.device)
                indices = torch.cat([full if index is None else index for index, _ in self._grads])
                unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
                total = self._grads[0][1].new_zeros((unique.numel(), self.embedding_size))
                total.index_add_(0, inverse, torch.cat([grad for _, grad in self._grads]))
                self._grads = [(unique, total)]
        return self._grads[0]

    def _add_grad(self, index: torch.Tensor | None, grad: torch.Tensor, lease: _Lease | None) -> None:
        """Called by the fused backward with one micro-step's center gradient (rows ``index``)."""
        self._grads.append((index, grad))
        if lease is not None:
            self._grad_leases.append(lease)

    def unscale_(self, inv_scale: float) -> None:
        """Multiply the accumulated center gradients by ``inv_scale`` (AMP loss scaling)."""
        grad = self._coalesced_grad()
        if grad is not None:
            grad[1].mul_(inv_scale)

    def grads_finite(self) -> bool:
        """True when this rank's accumulated center gradients are all finite."""
        grad = self._coalesced_grad()
        # In row chunks: one [S, D] boolean temporary would cost more than the check itself.
        return grad is None or all(bool(torch.isfinite(grad[1][rows]).all()) for rows in _chunks(grad[1].shape[0]))

    def zero_grad(self) -> None:
        self._pending, self._grads = [], []
        for lease in self._grad_leases:
            lease.release()
        self._grad_leases = []
        if self._gathered_rows is not None and self._gathered_rows[3] is not None:
            self._gathered_rows[3].release()
        self._gathered_rows = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Apply the accumulated gradient: sampled rows only (sparse) or every row (dense)."""
        if self.optimizer_name is None:
            raise PartialFCError("PartialFC: call configure_optimizer() before step()")
        grad = self._coalesced_grad()
        if grad is None:
            return  # like torch.optim: no gradient, no update
        index, rows_grad = grad
        self._noise_pool = None  # fresh rounding noise every step
        dense = index is None or self.pfc_update == "dense"
        if dense:
            for rows in _chunks(self.num_local, self.update_chunk_rows):
                if index is None:
                    local_index, grad_rows = None, rows_grad[rows]
                else:
                    bounds = torch.tensor([rows.start, rows.stop], device=index.device)
                    lo, hi = torch.searchsorted(index, bounds).tolist()
                    local_index, grad_rows = index[lo:hi] - rows.start, rows_grad[lo:hi]
                self._update_rows(rows, local_index, grad_rows, lr)
        else:
            gathered = self._gathered_rows
            # The forward's fp32 copy of weight[index] is still exact if the weight has not changed since.
            reuse = gathered is not None and gathered[0] is index and gathered[2] == self.weight._version
            for rows in _chunks(index.numel(), self.update_chunk_rows):
                self._update_rows(index[rows], None, rows_grad[rows], lr,
                                  weight_rows=gathered[1][rows] if reuse else None)

    def _load_rows(self, tensor: torch.Tensor, rows, scale: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 rows of a stored tensor (int8 ones with their per-row ``scale``); fp32 slices are views."""
        if isinstance(rows, slice):
            view = tensor[rows]
            if view.dtype == torch.int8:
                return dequantize_rows_int8(view, scale[rows])
            return view if view.dtype == torch.float32 else view.float()  # fp32 slices update in place
        if tensor.dtype == torch.int8:
            return dequantize_rows_int8(tensor.index_select(0, rows), scale.index_select(0, rows))
        return tensor.index_select(0, rows).float()

    def _rounding_noise(self, values: torch.Tensor) -> torch.Tensor:
        """Stochastic-rounding noise for ``values``: a random window of rows of one pool drawn per step.
        Drawing fresh noise for every element was 3/4 of a bf16 step on CPU (the generator makes ~100M
        values/s); a window at a random offset keeps every element's noise uniform and independent of
        the value it rounds, hence the rounding unbiased. ``values`` are [rows, D]."""
        generator = self._get_generator(values.device, "rounding")
        rows = values.shape[0]
        pool = self._noise_pool
        if pool is None or pool.shape[0] < 2 * rows or pool.shape[1] != values.shape[1] or pool.device != values.device:
            pool = self._noise_pool = torch.empty((2 * max(rows, self.update_chunk_rows), values.shape[1]),
                                                  dtype=torch.int32, device=values.device)
            pool.random_(0, 1 << 16, generator=generator)
        offset = int(torch.randint(0, pool.shape[0] - rows + 1, (1,), device=values.device, generator=generator))
        return pool[offset: offset + rows]

    def _store_rows(self, tensor: torch.Tensor, rows, values: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        if tensor.dtype == torch.float32:
            if not isinstance(rows, slice):  # fp32 slices were updated in place
                tensor.index_copy_(0, rows, values)
            return
        row_scale = None
        if tensor.dtype == torch.int8:
            rounded, row_scale = quantize_rows_int8(values, noise=self._rounding_noise(values))
        else:
            rounded = stochastic_round(values, tensor.dtype, None, noise=self._rounding_noise(values))
        if isinstance(rows, slice):
            tensor[rows] = rounded
            if row_scale is not None:
                scale[rows] = row_scale
        else:
            tensor.index_copy_(0, rows, rounded)
            if row_scale is not None:
                scale.index_copy_(0, rows, row_scale)

    def _update_rows(self, rows, local_index: torch.Tensor | None, grad: torch.Tensor, lr: float,
                     weight_rows: torch.Tensor | None = None) -> None:
        """One optimizer update of ``rows`` (a slice = dense block, or a sorted index = sampled rows).
        ``local_index`` places ``grad`` inside a dense block (None: grad covers every row of ``rows``).
        Both paths do the same float operations in the same order, so a sampled row gets bit-identical
        values from the sparse and the dense update."""
        hyper = self.hyper
        weight = self._load_rows(self.weight, rows) if weight_rows is None else weight_rows

        def add_grad(target: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> None:
            if local_index is None:
                target.add_(values, alpha=alpha)
            else:
                target.index_add_(0, local_index, values, alpha=alpha)

        if self.optimizer_name == "sgd":
            if "momentum_buffer" in self._buffers:
                buf = self._load_rows(self.momentum_buffer, rows, self._buffers.get("momentum_buffer_scale"))
                buf.mul_(hyper["momentum"])
            else:
                buf = torch.zeros_like(weight)
            buf.add_(weight, alpha=hyper["weight_decay"])
            add_grad(buf, grad)
            weight.add_(buf, alpha=-lr)
            if "momentum_buffer" in self._buffers:
                self._store_rows(self.momentum_buffer, rows, buf, self._buffers.get("momentum_buffer_scale"))
        else:
            beta1, beta2 = hyper["betas"]
            exp_avg, exp_avg_sq = self._load_rows(self.exp_avg, rows), self._load_rows(self.exp_avg_sq, rows)
            steps = self.adam_steps[rows] + 1
            self.adam_steps[rows] = steps
            weight.mul_(1.0 - lr * hyper["weight_decay"])
            exp_avg.mul_(beta1)
            add_grad(exp_avg, grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2)
            add_grad(exp_avg_sq, grad * grad, alpha=1.0 - beta2)
            steps = steps.to(torch.float32)[:, None]
            bias1 = 1.0 - torch.pow(beta1, steps)
            bias2 = 1.0 - torch.pow(beta2, steps)
            denom = (exp_avg_sq.sqrt() / bias2.sqrt()).add_(hyper["eps"])
            weight.addcdiv_(exp_avg / bias1, denom, value=-lr)
            self._store_rows(self.exp_avg, rows, exp_avg)
            self._store_rows(self.exp_avg_sq, rows, exp_avg_sq)
        self._store_rows(self.weight, rows, weight)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args, **kwargs):
        raise PartialFCError("PartialFC: use full_state_dict() / load_full_state_dict() (collective, "
                             "world-size independent) instead of state_dict()")

    def load_state_dict(self, *args, **kwargs):
        raise PartialFCError("PartialFC: use load_full_state_dict() instead of load_state_dict()")

    def _gather_to_rank0(self, shard: torch.Tensor) -> torch.Tensor | None:
        """[num_classes, ...] on CPU at rank 0 (None elsewhere), gathered in bounded row chunks."""
        if not dist_utils.is_distributed():
            return shard.detach().to("cpu", copy=True)
        import torch.distributed as dist

        counts = [class_range(self.num_classes, rank, self.world_size) for rank in range(self.world_size)]
        full = None
        if self.rank == 0:
            full = torch.empty((self.num_classes,) + tuple(shard.shape[1:]), dtype=shard.dtype)
        chunk = max(1, (1 << 24) // max(1, shard[0].numel() if shard.numel() else 1))
        max_local = max(count for _, count in counts)
        for offset in range(0, max_local, chunk):
            piece = shard.new_zeros((chunk,) + tuple(shard.shape[1:]))
            mine = shard[offset: offset + chunk]
            piece[: mine.shape[0]] = mine
            pieces = [torch.empty_like(piece) for _ in range(self.world_size)]
            dist.all_gather(pieces, piece)
            if full is not None:
                for (start, count), received in zip(counts, pieces):
                    rows = max(0, min(chunk, count - offset))
                    full[start + offset: start + offset + rows] = received[:rows].cpu()
        return full

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
            if source.dtype != torch.int8 and target.dtype != torch.int8:
                target.copy_(source)
                continue
            source_scale = optimizer[name + "_scale"][rows] if source.dtype == torch.int8 else None
            for chunk in _chunks(self.num_local, self.update_chunk_rows):  # bounded fp32 temporaries
                values = source[chunk]
                if source_scale is not None:
                    values = dequantize_rows_int8(values, source_scale[chunk])
                values = values.to(device=target.device, dtype=torch.float32)
                if target.dtype == torch.float32:
                    target[chunk] = values
                else:
                    self._store_rows(target, chunk, values, target_scale)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, rank={self.rank}/"
                f"{self.world_size}, classes=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate}, pfc_update={self.pfc_update}, optimizer={self.optimizer_name}")
