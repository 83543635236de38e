"""Margin losses applied to cosine logits: combined (ArcFace / CosFace / SphereFace-style and true
combinations), AdaFace and CurricularFace.

Every margin is called as ``margin(logits, labels)`` on cosine logits [N, C_shard] with
``labels[i] = -1`` when row i's target class lives in another shard (Partial FC), and returns the
final scaled logits. The target logit becomes ``cos(m1 * theta + m2) - m3``; where
``m1 * theta + m2`` leaves [0, pi] the curve continues linearly in cos(theta) with slope 1, so the
target logit is continuous and monotonic in cos(theta) (no wrap-around past pi), and the exact
gradient is finite at cos = +-1.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from utils.devices.distributed import all_reduce_

logger = logging.getLogger(__name__)

MARGIN_GRADS = ("straight_through", "exact")
HEADS = ("combined", "adaface", "curricularface")
# The exact derivative m1*sin(m1*theta+m2)/sin(theta) diverges at theta=0 when m2 > 0; it is
# evaluated with theta clamped to [THETA_EPS, pi - THETA_EPS] so it stays finite (|grad| <~ 1/THETA_EPS).
THETA_EPS = 1e-3


class MarginLossError(ValueError):
    """A bad margin-loss setting or input; the message is one line."""


def _as_row_tensor(value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.full_like(like, float(value))


def margin_curve(cos_theta: torch.Tensor, m1: float, m2) -> torch.Tensor:
    """``cos(m1*theta + m2)`` for m1*theta + m2 in [0, pi], continued linearly (slope 1 in cos theta)
    outside, so the result is continuous and non-decreasing in ``cos_theta``. ``m2`` may be a tensor
    broadcastable to ``cos_theta`` (per-row margins). No autograd (values only)."""
    x = cos_theta.clamp(-1.0, 1.0)
    m2 = _as_row_tensor(m2, x)
    theta = torch.acos(x)
    phi = m1 * theta + m2
    value = torch.cos(phi)
    # Upper tail: phi > pi starts at cos(theta_hi), theta_hi = (pi - m2) / m1, where the curve is -1.
    theta_hi = ((math.pi - m2) / m1).clamp(0.0, math.pi)
    value = torch.where(phi > math.pi, -1.0 + (x - torch.cos(theta_hi)), value)
    # Lower tail (negative angular margins, e.g. AdaFace): phi < 0 ends at theta_lo = -m2 / m1.
    theta_lo = (-m2 / m1).clamp(0.0, math.pi)
    return torch.where(phi < 0, 1.0 + (x - torch.cos(theta_lo)), value)


def margin_curve_slope(cos_theta: torch.Tensor, m1: float, m2) -> torch.Tensor:
    """d margin_curve / d cos_theta: ``m1 * sin(m1*theta + m2) / sin(theta)`` inside, 1 in the tails."""
    x = cos_theta.clamp(-1.0, 1.0)
    m2 = _as_row_tensor(m2, x)
    theta = torch.acos(x)
    phi = m1 * theta + m2
    theta_c = theta.clamp(THETA_EPS, math.pi - THETA_EPS)
    slope = m1 * torch.sin(m1 * theta_c + m2) / torch.sin(theta_c)
    return torch.where((phi > math.pi) | (phi < 0), torch.ones_like(slope), slope)


class _TargetMargin(torch.autograd.Function):
    """Applies margin_curve; backward uses the exact slope or 1 (straight-through)."""

    @staticmethod
    def forward(ctx, cos_theta, m1, m2, exact):
        ctx.m1, ctx.exact = m1, exact
        ctx.m2_is_tensor = isinstance(m2, torch.Tensor)
        if ctx.m2_is_tensor:
            ctx.save_for_backward(cos_theta, m2)
        else:
            ctx.m2 = m2
            ctx.save_for_backward(cos_theta)
        with torch.no_grad():
            return margin_curve(cos_theta, m1, m2)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.exact:
            return grad, None, None, None
        if ctx.m2_is_tensor:
            cos_theta, m2 = ctx.saved_tensors
        else:
            (cos_theta,), m2 = ctx.saved_tensors, ctx.m2
        return grad * margin_curve_slope(cos_theta, ctx.m1, m2), None, None, None


def apply_target_margin(cos_theta: torch.Tensor, m1: float, m2, exact: bool) -> torch.Tensor:
    """Differentiable ``margin_curve``; ``exact=False`` passes the gradient straight through (d/dcos = 1)."""
    if isinstance(m2, torch.Tensor):
        m2 = m2.detach()
    return _TargetMargin.apply(cos_theta, float(m1), m2, bool(exact))


def _check_margin_grad(margin_grad: str) -> str:
    if margin_grad not in MARGIN_GRADS:
        raise MarginLossError(f"margin_grad={margin_grad!r}: expected one of {', '.join(MARGIN_GRADS)}")
    return margin_grad


def _check_scale(s: float) -> float:
    if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
        raise MarginLossError(f"scale={s!r}: expected a finite number > 0 (arcface_torch uses 64)")
    return float(s)


@dataclass
class FusedMargin:
    """What ``margin.fused_(cos, ...)`` did to the logits (the fused-margin protocol's return value):
    d logits / d cos = ``scale`` everywhere, times ``target_slope`` at the targets (None: 1, the
    straight-through or pure-cosine case), and 0 where ``zeroed`` (inter-class filtering) is True."""

    scale: float
    target_slope: torch.Tensor | None = None
    zeroed: torch.Tensor | None = None

    def backward_(self, grad: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                  multiplier: float | torch.Tensor) -> torch.Tensor:
        """d loss / d logits -> d loss / d cos, in place; ``multiplier`` is ``scale`` times any
        outer factor the caller folds into the same pass."""
        grad.mul_(multiplier)
        if self.target_slope is not None:
            grad[rows, columns] *= self.target_slope
        if self.zeroed is not None:
            grad.masked_fill_(self.zeroed, 0.0)
        return grad


class _ApplyFusedMargin(torch.autograd.Function):
    """Autograd wrapper around a margin's ``fused_`` form: the same numbers in and out of Partial FC."""

    @staticmethod
    def forward(ctx, logits, margin, rows, columns, norms):
        ctx.mark_dirty(logits)  # fused_ writes in place; callers pass a copy unless inplace=True
        ctx.fused, ctx.rows, ctx.columns = margin.fused_(logits, rows, columns, norms=norms), rows, columns
        return logits

    @staticmethod
    def backward(ctx, grad):
        grad = ctx.fused.backward_(grad.clone(), ctx.rows, ctx.columns, ctx.fused.scale)
        return grad, None, None, None, None


@runtime_checkable
class FusedMarginLoss(Protocol):
    """The fused-margin protocol: a margin whose gradient touches only the target logits (plus a
    constant scale and a mask) may implement it, and Partial FC then runs cosine, margin and softmax
    cross-entropy as one function with a hand-written backward (no [N, C] autograd temporaries).

    ``fused_(cos, rows, columns, norms)`` turns the cosine logits [N, C] into final logits in place,
    without autograd, where ``cos[rows, columns]`` are the target logits (rows whose target is in
    another shard are absent), and returns a ``FusedMargin`` saying how to map d loss / d logits back
    to d loss / d cos (``FusedMargin.backward_``). ``needs_norms``: ``norms`` (the embedding norms of
    the N rows) must be passed. CombinedMarginLoss and AdaFaceLoss implement it; CurricularFaceLoss
    (its hard negatives depend on every logit) does not.
    """

    needs_norms: bool

    def fused_(self, cos: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
               norms: torch.Tensor | None = None) -> FusedMargin:
        """Turn cosine logits into final logits in place; return how to map gradients back."""


class MarginLoss(nn.Module):
    """Base of the margin losses: input checks and target lookup.

    The calling convention Partial FC relies on: ``margin(logits, labels, norms=None, inplace=False,
    model_parallel=False)`` on cosine logits [N, C_shard], ``labels[i] = -1`` when row i's target is in
    another shard; ``norms`` is given when ``needs_norms`` is True, ``inplace=True`` lets the margin
    overwrite ``logits``, ``model_parallel=True`` says the classes are split over ranks (a margin that
    needs whole-row statistics all-reduces them). Subclasses may also implement ``FusedMarginLoss``.
    """

    needs_norms = False

    def _prepare(self, logits: torch.Tensor, labels: torch.Tensor, inplace: bool):
        if logits.dim() != 2:
            raise MarginLossError(f"{type(self).__name__}: logits must be [N, C], got shape {tuple(logits.shape)}")
        if labels.shape != (logits.shape[0],):
            raise MarginLossError(f"{type(self).__name__}: labels must be [N={logits.shape[0]}], got shape "
                                  f"{tuple(labels.shape)}")
        logits = logits.float()
        if not inplace:
            logits = logits.clone()
        rows = torch.nonzero(labels != -1, as_tuple=True)[0]
        columns = labels[rows].long()
        return logits, rows, columns


class CombinedMarginLoss(MarginLoss):
    """Target logit ``cos(m1*theta + m2) - m3``, all logits times ``s``.

    ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4), SphereFace-style m1 > 1 and true combinations such as
    (1, 0.3, 0.2). ``margin_grad``: "straight_through" (arcface_torch's current behaviour: the margin
    value is applied but d target / d cos = 1) or "exact" (analytic derivative). Negatives whose
    cosine exceeds ``interclass_filtering_threshold`` (> 0) are zeroed, as in arcface_torch.
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0.0,
                 margin_grad: str = "straight_through"):
        super().__init__()
        self.s = _check_scale(s)
        if not m1 >= 1.0:
            raise MarginLossError(f"margin m1={m1!r}: expected >= 1 (multiplicative angular margin)")
        if not 0.0 <= m2 < math.pi:
            raise MarginLossError(f"margin m2={m2!r}: expected 0 <= m2 < pi (additive angular margin)")
        if not 0.0 <= m3 < 2.0:
            raise MarginLossError(f"margin m3={m3!r}: expected 0 <= m3 < 2 (additive cosine margin)")
        if not 0.0 <= interclass_filtering_threshold < 1.0:
            raise MarginLossError(f"interclass_filtering_threshold={interclass_filtering_threshold!r}: "
                                  f"expected 0 (off) or a cosine in (0, 1)")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.margin_grad = _check_margin_grad(margin_grad)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None,
                inplace: bool = False, model_parallel: bool = False) -> torch.Tensor:
        """Scaled margin logits. ``inplace=True`` lets the loss overwrite ``logits`` (saves one [N, C] copy;
        Partial FC uses it); ``model_parallel`` is part of the common convention and not needed here: every
        statistic of this margin is per element."""
        logits, rows, columns = self._prepare(logits, labels, inplace)
        return _ApplyFusedMargin.apply(logits, self, rows, columns, norms)

    @torch.no_grad()
    def fused_(self, cos: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
               norms: torch.Tensor | None = None) -> FusedMargin:
        """FusedMarginLoss protocol: filter, margin and scale ``cos`` in place."""
        zeroed = None
        if self.interclass_filtering_threshold > 0:
            zeroed = cos > self.interclass_filtering_threshold
            zeroed[rows, columns] = False
            cos.masked_fill_(zeroed, 0.0)
        target = cos[rows, columns]
        slope = None
        if self.m1 != 1.0 or self.m2 != 0.0:
            if self.margin_grad == "exact":
                slope = margin_curve_slope(target, self.m1, self.m2)
            target = margin_curve(target, self.m1, self.m2)
        cos[rows, columns] = target - self.m3 if self.m3 != 0.0 else target
        cos.mul_(self.s)
        return FusedMargin(self.s, slope, zeroed)

    def extra_repr(self) -> str:
        """The margin settings, shown by ``print(module)``."""
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, margin_grad={self.margin_grad}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}")


class AdaFaceLoss(MarginLoss):
    """AdaFace (Kim et al., CVPR 2022): the margin adapts to the embedding norm (image quality).

    With z = clip(h * (norm - mean) / (std + eps), -1, 1) from EMA batch statistics of the norms,
    the target logit is ``cos(theta - m*z) - (m + m*z)``: low-quality samples (z -> -1) get an
    ArcFace margin, high-quality ones (z -> 1) a CosFace-like one. Needs ``norms`` (the embedding
    norms of the logits' rows, i.e. the global batch inside Partial FC, so the statistics do not
    depend on the world size).
    """

    needs_norms = True

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01,
                 eps: float = 1e-3, margin_grad: str = "exact"):
        super().__init__()
        self.s = _check_scale(s)
        if not 0.0 < m < math.pi / 2:
            raise MarginLossError(f"adaface margin m={m!r}: expected 0 < m < pi/2 (paper: 0.4)")
        if not 0.0 < t_alpha <= 1.0:
            raise MarginLossError(f"adaface t_alpha={t_alpha!r}: expected 0 < t_alpha <= 1")
        self.m, self.h, self.t_alpha, self.eps = float(m), float(h), float(t_alpha), float(eps)
        self.margin_grad = _check_margin_grad(margin_grad)
        # Initial statistics as in the paper; updated with an EMA of the global batch statistics.
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None,
                inplace: bool = False, model_parallel: bool = False) -> torch.Tensor:
        """Scaled AdaFace logits; ``norms`` are the rows' embedding norms (already global inside Partial FC,
        so ``model_parallel`` needs no extra all-reduce here)."""
        self._check_norms(norms, logits.shape[0])
        logits, rows, columns = self._prepare(logits, labels, inplace)
        return _ApplyFusedMargin.apply(logits, self, rows, columns, norms)

    @staticmethod
    def _check_norms(norms: torch.Tensor | None, num_rows: int) -> None:
        if norms is None or norms.shape != (num_rows,):
            raise MarginLossError(f"AdaFaceLoss needs norms=[N={num_rows}] (embedding norms), got "
                                  f"{None if norms is None else tuple(norms.shape)}")

    @torch.no_grad()
    def _quality(self, norms: torch.Tensor) -> torch.Tensor:
        """z in [-1, 1] per row; in training, first moves the EMA statistics towards this batch."""
        safe_norms = norms.detach().float().clamp(0.001, 100.0)
        if self.training:
            std = safe_norms.std() if safe_norms.numel() > 1 else torch.zeros_like(self.batch_std)
            self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * safe_norms.mean())
            self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        return ((safe_norms - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)

    @torch.no_grad()
    def fused_(self, cos: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
               norms: torch.Tensor | None = None) -> FusedMargin:
        """FusedMarginLoss protocol: the quality-adaptive margin and the scale, in place."""
        self._check_norms(norms, cos.shape[0])
        quality = self._quality(norms)[rows]
        target = cos[rows, columns]
        slope = margin_curve_slope(target, 1.0, -self.m * quality) if self.margin_grad == "exact" else None
        cos[rows, columns] = margin_curve(target, 1.0, -self.m * quality) - (self.m + self.m * quality)
        cos.mul_(self.s)
        return FusedMargin(self.s, slope, None)

    def extra_repr(self) -> str:
        """The margin settings, shown by ``print(module)``."""
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}, margin_grad={self.margin_grad}"


class CurricularFaceLoss(MarginLoss):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace target plus hard negatives re-weighted as
    ``cos * (t + cos)`` where t is an EMA (momentum 0.01) of the mean target cosine.

    A negative is hard when its cosine exceeds the row's margin target. In Partial FC the target
    sits on one shard, so the per-row targets and the batch mean are all-reduced
    (``model_parallel=True``), which keeps the result independent of the world size.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, t_alpha: float = 0.01, margin_grad: str = "exact"):
        super().__init__()
        self.s = _check_scale(s)
        if not 0.0 < m < math.pi / 2:
            raise MarginLossError(f"curricularface margin m={m!r}: expected 0 < m < pi/2 (paper: 0.5)")
        self.m, self.t_alpha = float(m), float(t_alpha)
        self.margin_grad = _check_margin_grad(margin_grad)
        self.register_buffer("t", torch.tensor(0.0))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None,
                inplace: bool = False, model_parallel: bool = False) -> torch.Tensor:
        """Scaled CurricularFace logits; with ``model_parallel`` the per-row targets are all-reduced over the
        class shards, so the hard-negative threshold and ``t`` do not depend on the world size."""
        logits, rows, columns = self._prepare(logits, labels, inplace)
        target = logits[rows, columns]
        target_m = apply_target_margin(target, 1.0, self.m, self.margin_grad == "exact")
        with torch.no_grad():
            # Per row: [raw target cos, margin target, 1 if this shard owns the target].
            per_row = logits.new_zeros((logits.shape[0], 3))
            per_row[rows, 0] = target.detach()
            per_row[rows, 1] = target_m.detach()
            per_row[rows, 2] = 1.0
            if model_parallel:
                all_reduce_(per_row)
            owned = per_row[:, 2] > 0
            if self.training and bool(owned.any()):
                self.t.mul_(1 - self.t_alpha).add_(self.t_alpha * per_row[owned, 0].mean())
            # Rows whose target is nowhere (should not happen) get no hard negatives.
            threshold = torch.where(owned, per_row[:, 1], torch.full_like(per_row[:, 1], 2.0))
            hard = logits > threshold[:, None]
            hard[rows, columns] = False
        t = self.t.to(logits.dtype)
        logits = torch.where(hard, logits * (t + logits), logits)
        logits = logits.index_put_((rows, columns), target_m)
        return logits.mul_(self.s)

    def extra_repr(self) -> str:
        """The margin settings, shown by ``print(module)``."""
        return f"s={self.s}, m={self.m}, t_alpha={self.t_alpha}, margin_grad={self.margin_grad}"


def build_margin_loss(cfg: Mapping[str, Any]) -> nn.Module:
    """The margin module named by ``cfg.head`` with cfg.scale, cfg.margin_list, cfg.margin_grad and
    cfg.interclass_filtering_threshold. adaface / curricularface take m = margin_list[1]."""
    head = cfg.get("head", "combined")
    if head not in HEADS:
        raise MarginLossError(f"config key 'head'={head!r}: expected one of {', '.join(HEADS)}")
    margins = cfg.get("margin_list")
    if not isinstance(margins, (list, tuple)) or len(margins) != 3 or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in margins):
        raise MarginLossError(f"config key 'margin_list'={margins!r}: expected three numbers (m1, m2, m3), "
                              f"e.g. (1.0, 0.5, 0.0) for ArcFace")
    m1, m2, m3 = (float(value) for value in margins)
    scale = cfg.get("scale", 64.0)
    margin_grad = cfg.get("margin_grad", "straight_through")
    threshold = cfg.get("interclass_filtering_threshold", 0.0)
    if head == "combined":
        return CombinedMarginLoss(scale, m1, m2, m3, threshold, margin_grad=margin_grad)
    if m1 != 1.0 or m3 != 0.0:
        raise MarginLossError(f"config key 'margin_list'={tuple(margins)!r} with head={head!r}: expected "
                              f"(1.0, m, 0.0); the head's margin m is margin_list[1]")
    if threshold:
        raise MarginLossError(f"config key 'interclass_filtering_threshold'={threshold!r}: only head='combined' "
                              f"supports inter-class filtering")
    if head == "adaface":
        return AdaFaceLoss(scale, m=m2, margin_grad=margin_grad)
    return CurricularFaceLoss(scale, m=m2, margin_grad=margin_grad)

