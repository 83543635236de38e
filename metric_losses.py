"""Triplet loss (FaceNet, Schroff et al. 2015) with semi-hard, batch-hard and all-triplet mining over
the global batch. Imports flow one way: this module uses losses.MarginLossError; losses.py knows nothing of it.

Distances are between L2-normalised embeddings: squared Euclidean (FaceNet) or Euclidean.

Distributed gradient convention. Every rank gathers the embeddings and labels of all ranks, mines
and computes the SAME loss value L of the global batch (what one process with the W*B batch gets).
The gathered matrix holds the rank's own rows as the live tensor and the other ranks' rows as
constants, so ``L.backward()`` on rank r gives exactly dL/d(rank r's embeddings), with no
collective in backward. The trainer's DDP hook SUMS parameter gradients over ranks, and the sum
over ranks of "own samples' contribution" is the one-process gradient: nothing to rescale. (Using
the autograd all-gather instead would sum W identical copies of dL in backward, i.e. W x too large.)
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from losses import MarginLossError
from utils.devices import distributed as dist_utils

logger = logging.getLogger(__name__)

MINING = ("semihard", "batch_hard", "all")
# Squared distances below this count as 0 for the sqrt (its derivative 1 / (2 sqrt d) diverges at 0).
SQRT_EPS = 1e-12
# Anchors per chunk in "all" mining keep the [chunk, N, N] hinge tensor at ~16M elements.
ALL_CHUNK_ELEMENTS = 1 << 24


def pairwise_distances(embeddings: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """[N, N] squared Euclidean (or Euclidean) distances between rows already L2-normalised."""
    # ||a - b||^2 = 2 - 2 a.b for unit rows; clamp the rounding noise below 0.
    sq = (2.0 - 2.0 * embeddings @ embeddings.t()).clamp_min(0.0)
    if squared:
        return sq
    positive = sq > SQRT_EPS
    # sqrt only where d > 0, gradient 0 (a subgradient) at d = 0 instead of inf * 0 = nan.
    return torch.where(positive, sq.clamp_min(SQRT_EPS).sqrt(), torch.zeros_like(sq))


def _gather_global(embeddings: torch.Tensor, labels: torch.Tensor,
                   equal_batches: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-batch rows (own rows live, the others constant) and labels, in rank order
    (``equal_batches``: every rank has as many rows as this one, so no size exchange)."""
    if not dist_utils.is_distributed():
        return embeddings, labels
    sizes = ([embeddings.shape[0]] * dist_utils.get_world_size() if equal_batches
             else dist_utils.all_gather_sizes(embeddings.shape[0], embeddings.device))
    rank = dist_utils.get_rank()
    everyone = dist_utils.all_gather_rows(embeddings.detach(), sizes)
    all_labels = dist_utils.all_gather_rows(labels, sizes)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    return torch.cat([everyone[:start], embeddings, everyone[stop:]]), all_labels


class TripletLoss(nn.Module):
    """``loss = TripletLoss(margin, mining, squared)(embeddings [N, D], labels [N])``.

    mining:
      semihard   -- per ordered (anchor, positive) pair, the negative with the smallest d(a,n) > d(a,p),
                    else the negative with the largest d(a,n); mean of max(d_ap - d_an + margin, 0)
                    over all pairs whose anchor has a negative (TensorFlow's triplet_semihard_loss rule).
      batch_hard -- per anchor with a positive and a negative, max(max_p d_ap - min_n d_an + margin, 0);
                    mean over those anchors (Hermans et al. 2017).
      all        -- every valid (a, p, n); mean over the triplets with a loss > 0 (0 if none).
    Without any valid triplet the loss is 0, still connected to the graph (zero gradients).
    In a process group the mining sees the global batch; see the module docstring for the gradient
    convention (every rank returns the global loss; the DDP hook's SUM gives the one-process gradient).
    ``last_stats`` (floats, read on demand): active_fraction, mean_ap, mean_an, triplets.
    """

    def __init__(self, margin: float = 0.2, mining: str = "semihard", squared: bool = True) -> None:
        super().__init__()
        if mining not in MINING:
            raise MarginLossError(f"config key 'triplet_mining'={mining!r}: expected one of {', '.join(MINING)}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
            raise MarginLossError(f"config key 'triplet_margin'={margin!r}: expected a number > 0 (FaceNet: 0.2)")
        self.margin, self.mining, self.squared = float(margin), mining, bool(squared)
        self.equal_batches = False  # True: every rank passes as many rows (a drop_last loader); saves a host sync
        self._stats: dict[str, torch.Tensor] = {}

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last forward (global batch); converting here keeps .item() syncs off the step."""
        return {key: float(value) for key, value in self._stats.items()}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean triplet loss of the global batch (the same value on every rank)."""
        if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],):
            raise MarginLossError(f"TripletLoss: expected embeddings [N, D] and labels [N], got "
                                  f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
        x = F.normalize(embeddings.float(), dim=1)
        x, labels = _gather_global(x, labels.to(x.device).long(), self.equal_batches)
        dist = pairwise_distances(x, self.squared)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
        positive = same & ~eye
        negative = ~same
        if self.mining == "semihard":
            loss, stats = self._semihard(dist, positive, negative)
        elif self.mining == "batch_hard":
            loss, stats = self._batch_hard(dist, positive, negative)
        else:
            loss, stats = self._all(dist, positive, negative)
        self._stats = stats
        if loss is None:
            # No valid triplet: a zero that still reaches every input, so backward works everywhere.
            loss = embeddings.sum() * 0.0
        return loss

    def _finish(self, hinge: torch.Tensor, d_ap: torch.Tensor, d_an: torch.Tensor):
        stats = {"triplets": torch.tensor(float(hinge.numel())),
                 "active_fraction": (hinge.detach() > 0).float().mean() if hinge.numel() else torch.tensor(0.0),
                 "mean_ap": d_ap.detach().mean() if d_ap.numel() else torch.tensor(0.0),
                 "mean_an": d_an.detach().mean() if d_an.numel() else torch.tensor(0.0)}
        return (hinge.mean() if hinge.numel() else None), stats

    def _semihard(self, dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor):
        has_negative = negative.any(dim=1)
        anchors, positives = torch.nonzero(positive & has_negative[:, None], as_tuple=True)
        with torch.no_grad():
            # Per anchor, negative distances sorted ascending with non-negatives pushed to +inf; for
            # each pair, searchsorted(right) finds the first negative strictly farther than d(a,p).
            masked = torch.where(negative, dist.detach(), torch.full_like(dist, float("inf")))
            sorted_d, order = masked.sort(dim=1)
            # One [N, N] search (every column as a candidate positive) instead of [pairs, N] copies.
            slot = torch.searchsorted(sorted_d, dist.detach().contiguous(), right=True)[anchors, positives]
            count = negative.sum(dim=1)[anchors]
            # None farther: the hardest-but-easiest fallback is the largest negative distance.
            slot = torch.where(slot < count, slot, count - 1)
            chosen = order[anchors, slot]
        d_ap = dist[anchors, positives]
        d_an = dist[anchors, chosen]
        return self._finish((d_ap - d_an + self.margin).clamp_min(0.0), d_ap, d_an)

    def _batch_hard(self, dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor):
        valid = positive.any(dim=1) & negative.any(dim=1)
        hardest_p = torch.where(positive, dist, torch.full_like(dist, float("-inf"))).max(dim=1).values[valid]
        hardest_n = torch.where(negative, dist, torch.full_like(dist, float("inf"))).min(dim=1).values[valid]
        return self._finish((hardest_p - hardest_n + self.margin).clamp_min(0.0), hardest_p, hardest_n)

    def _all(self, dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor):
        # The hinge is linear where active: sum over active (a,p,n) of d_ap - d_an + m equals
        # sum_ap c_ap d_ap - sum_an c_an d_an + m * active, with c_ap = active negatives of (a,p) and
        # c_an = active positives of (a,n). Counting under no_grad in anchor chunks keeps memory at
        # O(chunk * N^2) with no N^3 autograd graph, and the gradient is exactly the hinge's.
        n = dist.shape[0]
        const = dist.detach()
        c_ap, c_an = torch.zeros_like(const), torch.zeros_like(const)
        chunk = max(1, ALL_CHUNK_ELEMENTS // max(1, n * n))
        with torch.no_grad():
            for start in range(0, n, chunk):
                rows = slice(start, min(n, start + chunk))
                hinge = const[rows, :, None] - const[rows, None, :] + self.margin     # [c, p, n]
                active = (hinge > 0) & positive[rows, :, None] & negative[rows, None, :]
                c_ap[rows] = active.sum(dim=2).to(const.dtype)
                c_an[rows] = active.sum(dim=1).to(const.dtype)
            num_active = c_ap.sum()
            num_valid = (positive.sum(dim=1) * negative.sum(dim=1)).sum().to(const.dtype)
        num_pos, num_neg = positive.sum().clamp_min(1), negative.sum().clamp_min(1)
        stats = {"triplets": num_valid,
                 "active_fraction": num_active / num_valid.clamp_min(1.0),
                 "mean_ap": torch.where(positive, const, 0.0).sum() / num_pos,
                 "mean_an": torch.where(negative, const, 0.0).sum() / num_neg}
        # No active triplet: 0 * dist stays connected to the graph (zero gradients), without a sync.
        total = (c_ap * dist).sum() - (c_an * dist).sum() + self.margin * num_active
        return total / num_active.clamp_min(1.0), stats

    def extra_repr(self) -> str:
        """The loss settings, shown by ``print(module)``."""
        return f"margin={self.margin}, mining={self.mining}, squared={self.squared}"


def build_triplet_loss(cfg: Mapping[str, Any]) -> TripletLoss:
    """TripletLoss from cfg.triplet_margin, cfg.triplet_mining and cfg.triplet_squared."""
    return TripletLoss(cfg.get("triplet_margin", 0.2), cfg.get("triplet_mining", "semihard"),
                       bool(cfg.get("triplet_squared", True)))
