"""Partial FC's compute: cosine logits, the distributed softmax cross-entropy, the fused margin
function with its hand-written backward, the persistent workspace it runs in, and the
``GradientSink`` that collects the center gradients of every micro-step until the optimizer step.

The autograd functions touch no module state: the head hands them its ``Workspace`` and
``GradientSink`` explicitly.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from losses import FusedMarginLoss
from utils.devices import distributed as dist_utils

UPDATE_CHUNK_ROWS = 4096


def row_chunks(rows: int, chunk: int = UPDATE_CHUNK_ROWS) -> Iterator[slice]:
    """Row ranges small enough (8 MiB at D = 512) that their temporaries stay in cache and in the heap."""
    return (slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk))


class Lease:
    """Marks one workspace buffer busy until released or garbage collected (e.g. with the autograd
    graph that saved it when no backward ever runs)."""

    def __init__(self, workspace: "Workspace", name: str):
        self.workspace, self.name = workspace, name

    def release(self) -> None:
        """Hand the buffer back (idempotent)."""
        if self.workspace is not None:
            self.workspace.busy.discard(self.name)
            self.workspace = None

    __del__ = release


class Workspace:
    """Persistent [S, D] / [B, S] scratch tensors reused from step to step.

    A fresh 100-400 MB tensor every step costs its page faults (the allocator hands such blocks back to
    the OS on free): at 1M classes, r = 0.1 that was a third of the sparse step on CPU. A buffer in use
    (its lease not yet released) is never handed out twice; the second caller gets a fresh tensor.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.busy: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...], device: torch.device,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Lease | None]:
        """A [shape] view of the named buffer and its lease (a fresh tensor and None when it is busy)."""
        numel = math.prod(shape)
        if name in self.busy:
            return torch.empty(shape, dtype=dtype, device=device), None
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            self.buffers.pop(name, None)  # drop the old one before allocating its replacement
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        self.busy.add(name)
        return buffer[:numel].view(shape), Lease(self, name)


class GradientSink:
    """The head's center gradients between backward and the optimizer step.

    The fused backward ``add``s one micro-step's gradient rows; the generic path's leaf tensors are
    ``watch``ed and read once autograd has filled them. ``coalesced()`` sums all micro-steps into one
    (sorted unique row index or None = every row, gradient rows) pair. The fused backward also leaves
    the fp32 copy of the rows it gathered, so a sparse step need not gather them again.
    """

    def __init__(self, num_rows: int, embedding_size: int):
        self.num_rows, self.embedding_size = num_rows, embedding_size
        self.pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (row index, leaf) awaiting backward
        self.grads: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (row index, gradient rows)
        self.leases: list[Lease] = []
        # (index, fp32 rows of weight[index], weight version then, lease) from the latest fused backward
        self.gathered: tuple[torch.Tensor, torch.Tensor, int, Lease | None] | None = None

    def watch(self, index: torch.Tensor | None, leaf: torch.Tensor) -> None:
        """Read ``leaf.grad`` (rows ``index``) once a backward has filled it."""
        self.pending.append((index, leaf))

    def add(self, index: torch.Tensor | None, grad: torch.Tensor, lease: Lease | None = None) -> None:
        """One micro-step's center gradient for rows ``index`` (None: every row)."""
        self.grads.append((index, grad))
        if lease is not None:
            self.leases.append(lease)

    def keep_gathered(self, index: torch.Tensor, rows: torch.Tensor, weight_version: int,
                      lease: Lease | None) -> None:
        """Remember the forward's fp32 copy of ``weight[index]`` (valid while the weight is unchanged)."""
        self.gathered = (index, rows, weight_version, lease)

    def gathered_rows(self, index: torch.Tensor, weight_version: int) -> torch.Tensor | None:
        """The kept copy of ``weight[index]`` if it is for this very index and the weight is unchanged."""
        gathered = self.gathered
        if gathered is not None and gathered[0] is index and gathered[2] == weight_version:
            return gathered[1]
        return None

    def collect(self) -> None:
        """Move the watched leaves whose gradient has arrived into the accumulated gradients."""
        waiting = []
        for index, leaf in self.pending:
            if leaf.grad is not None:
                self.grads.append((index, leaf.grad))
            else:
                waiting.append((index, leaf))
        self.pending = waiting

    def coalesced(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """All accumulated micro-step gradients as one (sorted unique rows or None = all, rows); None
        when there is no gradient."""
        self.collect()
        if not self.grads:
            return None
        if len(self.grads) > 1:
            if all(index is None for index, _ in self.grads):
                total = self.grads[0][1]
                for _, grad in self.grads[1:]:
                    total.add_(grad)
                self.grads = [(None, total)]
            else:
                full = torch.arange(self.num_rows, device=self.grads[0][1].device)
                indices = torch.cat([full if index is None else index for index, _ in self.grads])
                unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
                total = self.grads[0][1].new_zeros((unique.numel(), self.embedding_size))
                total.index_add_(0, inverse, torch.cat([grad for _, grad in self.grads]))
                self.grads = [(unique, total)]
        return self.grads[0]

    def unscale_(self, inv_scale: float | torch.Tensor) -> None:
        """Multiply the accumulated gradient by ``inv_scale`` (AMP loss scaling)."""
        grad = self.coalesced()
        if grad is not None:
            grad[1].mul_(inv_scale)

    def all_finite(self) -> torch.Tensor | bool:
        """Whether every accumulated gradient value on this rank is finite: a 0-dim bool tensor on the
        gradient's device (reading it is the caller's one host sync), or True when there is no gradient."""
        grad = self.coalesced()
        if grad is None:
            return True
        # In row chunks: one [S, D] boolean temporary would cost more than the check itself.
        finite = torch.ones((), dtype=torch.bool, device=grad[1].device)
        for rows in row_chunks(grad[1].shape[0]):
            finite &= torch.isfinite(grad[1][rows]).all()
        return finite

    def clear(self) -> None:
        """Drop every gradient and hand the workspace buffers back."""
        self.pending, self.grads = [], []
        for lease in self.leases:
            lease.release()
        self.leases = []
        if self.gathered is not None and self.gathered[3] is not None:
            self.gathered[3].release()
        self.gathered = None


def project_center_grad_(grad: torch.Tensor, centers: torch.Tensor, inv_norm: torch.Tensor) -> None:
    """grad_j <- grad_j - (grad_j . w_j) / ||w_j||^2 * w_j: the chain rule through w_j / ||w_j|| when
    ``grad_j`` already holds sum_i dL/dcos_ij * e_i / ||w_j||."""
    for rows in row_chunks(grad.shape[0]):
        coef = torch.linalg.vecdot(grad[rows], centers[rows]).mul_(inv_norm[rows].square())
        grad[rows].addcmul_(centers[rows], coef[:, None], value=-1.0)


def softmax_cross_entropy_(logits: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
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


class CosineLogits(torch.autograd.Function):
    """cos logits = (normalized embeddings @ centers^T) / ||center||, without a normalized copy of
    the centers (the generic path, for margins without a fused form)."""

    @staticmethod
    def forward(ctx, embeddings_n: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """[N, C] cosines of the unit embeddings with the centers."""
        inv_norm = centers.norm(dim=1).clamp_min(1e-12).reciprocal_()
        logits = embeddings_n.mm(centers.t())
        logits.mul_(inv_norm)
        ctx.save_for_backward(embeddings_n, centers, inv_norm)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """Gradients of the embeddings and of the centers (projected: the norm division is part of it)."""
        embeddings_n, centers, inv_norm = ctx.saved_tensors
        grad = grad * inv_norm
        grad_embeddings = grad.mm(centers) if ctx.needs_input_grad[0] else None
        grad_centers = None
        if ctx.needs_input_grad[1]:
            grad_centers = grad.t().mm(embeddings_n)
            project_center_grad_(grad_centers, centers, inv_norm)
        return grad_embeddings, grad_centers


class DistributedSoftmaxCE(torch.autograd.Function):
    """Mean over the global batch of -log softmax(target) with the classes split over ranks."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, total_rows: int) -> torch.Tensor:
        """The loss; ``labels`` are -1 where the row's class is on another shard."""
        rows = torch.nonzero(labels != -1, as_tuple=True)[0]
        columns = labels[rows]
        probs = logits.clone()
        loss = softmax_cross_entropy_(probs, rows, columns, total_rows)
        ctx.save_for_backward(probs, rows, columns)
        ctx.total_rows, ctx.used = total_rows, False
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """(softmax - one-hot) / total_rows, written over the saved softmax; once per graph."""
        if ctx.used:
            raise RuntimeError("PartialFC: backward through the same loss twice (retain_graph) is not supported")
        ctx.used = True
        probs, rows, columns = ctx.saved_tensors
        grad_logits = probs  # reused in place: the saved softmax is not needed afterwards
        grad_logits[rows, columns] -= 1.0
        grad_logits.mul_(grad / ctx.total_rows)
        return grad_logits, None, None


class FusedMarginSoftmax(torch.autograd.Function):
    """Cosine logits, margin and distributed softmax cross-entropy in one function, all in one
    persistent [B, S] buffer, with a hand-written backward: two GEMMs, a few in-place passes, and the
    center gradient handed straight to the ``GradientSink`` (no [S, D] autograd leaf, no [B, S]
    temporaries). For margins implementing ``losses.FusedMarginLoss``; the result equals the generic path.

    ``apply(embeddings_n, centers, margin, workspace, sink, index, shard_labels, total_rows, norms,
    centers_lease, weight_version)``: ``centers`` are the fp32 rows ``index`` of the weight (None: all
    rows), ``centers_lease`` their workspace lease, ``weight_version`` the weight's version counter then.
    """

    @staticmethod
    def forward(ctx, embeddings_n: torch.Tensor, centers: torch.Tensor, margin: FusedMarginLoss,
                workspace: Workspace, sink: GradientSink, index: torch.Tensor | None, shard_labels: torch.Tensor,
                total_rows: int, norms: torch.Tensor | None, centers_lease: Lease | None,
                weight_version: int) -> torch.Tensor:
        """The loss; the softmax stays in the workspace buffer for backward."""
        inv_norm = centers.norm(dim=1).clamp_min(1e-12).reciprocal_()
        logits, logits_lease = workspace.take("logits", (embeddings_n.shape[0], centers.shape[0]), centers.device)
        torch.mm(embeddings_n, centers.t(), out=logits)
        logits.mul_(inv_norm).clamp_(-1.0, 1.0)  # rounding can leave |cos| a hair above 1
        rows = torch.nonzero(shard_labels != -1, as_tuple=True)[0]
        columns = shard_labels[rows]
        fused = margin.fused_(logits, rows, columns, norms=norms)
        loss = softmax_cross_entropy_(logits, rows, columns, total_rows)
        ctx.save_for_backward(embeddings_n, centers, inv_norm)
        ctx.probs, ctx.rows, ctx.columns, ctx.fused = logits, rows, columns, fused
        ctx.workspace, ctx.sink, ctx.index, ctx.total_rows = workspace, sink, index, total_rows
        ctx.leases = (logits_lease, centers_lease)  # released by backward, or with the graph
        ctx.weight_version = weight_version
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        """The embeddings' gradient; the centers' gradient goes to the sink, with the gathered rows kept for
        the optimizer step (tagged with the weight's version, so a changed weight is gathered again)."""
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
            center_grad, lease = ctx.workspace.take("center_grad", tuple(centers.shape), centers.device)
            torch.mm(grad.t(), embeddings_n, out=center_grad)
            project_center_grad_(center_grad, centers, inv_norm)
            ctx.sink.add(ctx.index, center_grad, lease)
            if ctx.index is not None:  # the step may use these rows instead of gathering them again
                ctx.sink.keep_gathered(ctx.index, centers.detach(), ctx.weight_version, ctx.leases[1])
                ctx.leases = (ctx.leases[0], None)
        for lease in ctx.leases:
            if lease is not None:
                lease.release()
        return (grad_embeddings,) + (None,) * 10
