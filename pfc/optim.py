"""Partial FC's optimizer: the row update rule (SGD with momentum, Adam, AdamW; sparse or dense) and
``JointOptimizer``, one optimizer over the backbone and the head for the training loop.

``RowOptimizer`` updates rows of the head's weight shard with the same arithmetic as torch.optim's
SGD / Adam / AdamW on a full [C, D] parameter, but touches only the rows it is given (the sampled
rows for ``pfc_update="sparse"``, every row in 4096-row chunks for ``"dense"``).

``JointOptimizer`` is what the trainer steps: learning rate for every group, AMP unscaling of the
backbone (through the GradScaler) and of the head's gradient rows, the backbone's grad-norm clip,
one all-reduced decision whether the step is finite on every rank (the head's gradients are per-rank
shards, so a local check is not enough), the step of both, the scaler update, zero_grad and
state_dict. The same calls serve fp32 (a disabled scaler) and fp16.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch

from pfc import PartialFCError
from pfc.kernels import row_chunks
from pfc.storage import RowStorage
from utils.devices import compat
from utils.devices import device as devices
from utils.devices import distributed as dist_utils

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
STATE_NAMES = ("momentum_buffer", "momentum_buffer_scale", "exp_avg", "exp_avg_sq", "adam_steps")


class RowOptimizer:
    """Hyperparameters and update rule of the head's optimizer, applied to rows of its weight shard.

    ``sgd``: torch.optim.SGD (weight decay added to the gradient, momentum without dampening).
    ``adam``: torch.optim.Adam (weight decay as L2 added to the gradient). ``adamw``: torch.optim.AdamW
    (decoupled weight decay). Adam's bias correction counts steps per row (a row's first update is its
    step 1), so a sparse update of a rarely sampled row is not damped by the global step count.
    """

    def __init__(self, name: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if name not in OPTIMIZERS:
            raise PartialFCError(f"PartialFC: optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)} "
                                 f"(config key 'optimizer')")
        if not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise PartialFCError(f"PartialFC: momentum={momentum!r} / weight_decay={weight_decay!r}: expected "
                                 f"0 <= momentum < 1 and weight_decay >= 0")
        if len(tuple(betas)) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise PartialFCError(f"PartialFC: adam betas={betas!r}: expected two numbers in [0, 1)")
        if not eps > 0:
            raise PartialFCError(f"PartialFC: adam eps={eps!r}: expected a number > 0 (config key 'adam_eps')")
        self.name = name
        self.hyper: dict[str, Any] = dict(momentum=float(momentum), weight_decay=float(weight_decay),
                                          betas=tuple(float(beta) for beta in betas), eps=float(eps))

    def state_specs(self, num_rows: int, embedding_size: int, state_dtype: torch.dtype) -> dict[str, tuple]:
        """{state name: (shape, dtype)} of the per-row state this optimizer keeps."""
        if state_dtype == torch.int8 and self.name != "sgd":
            raise PartialFCError(f"PartialFC: state_dtype='int8' holds SGD momentum only; optimizer={self.name!r} "
                                 f"needs state_dtype float32 or bfloat16 (config key 'pfc_state_dtype')")
        shape = (num_rows, embedding_size)
        if self.name == "sgd":
            if self.hyper["momentum"] == 0:
                return {}
            specs = {"momentum_buffer": (shape, state_dtype)}
            if state_dtype == torch.int8:
                specs["momentum_buffer_scale"] = ((num_rows,), torch.float32)
            return specs
        return {"exp_avg": (shape, state_dtype), "exp_avg_sq": (shape, state_dtype),
                "adam_steps": ((num_rows,), torch.int32)}

    @torch.no_grad()
    def step(self, weight: torch.Tensor, state: Mapping[str, torch.Tensor], grad: tuple[torch.Tensor | None, torch.Tensor],
             lr: float, storage: RowStorage, dense: bool, chunk_rows: int,
             gathered: torch.Tensor | None = None) -> None:
        """Apply ``grad`` = (sorted row index or None = every row, gradient rows): to the indexed rows
        only, or (``dense`` or no index) to every row. ``gathered``: fp32 copy of ``weight[index]``."""
        index, rows_grad = grad
        storage.new_step()  # fresh rounding noise every step
        if index is None or dense:
            chunks = list(row_chunks(weight.shape[0], chunk_rows))
            if index is not None:  # where each chunk's rows start in the sorted index: one host read for all
                starts = torch.arange(0, weight.shape[0] + 1, chunk_rows, device=index.device)
                edges = torch.searchsorted(index, starts).tolist() + [index.numel()]
            for number, rows in enumerate(chunks):
                if index is None:
                    local_index, grad_rows = None, rows_grad[rows]
                else:
                    lo, hi = edges[number], edges[number + 1]
                    local_index, grad_rows = index[lo:hi] - rows.start, rows_grad[lo:hi]
                self.update_rows(weight, state, storage, rows, local_index, grad_rows, lr)
        else:
            for rows in row_chunks(index.numel(), chunk_rows):
                self.update_rows(weight, state, storage, index[rows], None, rows_grad[rows], lr,
                                 weight_rows=None if gathered is None else gathered[rows])

    def update_rows(self, weight: torch.Tensor, state: Mapping[str, torch.Tensor], storage: RowStorage, rows,
                    local_index: torch.Tensor | None, grad: torch.Tensor, lr: float,
                    weight_rows: torch.Tensor | None = None) -> None:
        """One update of ``rows`` (a slice = dense block, or a sorted index = sampled rows).
        ``local_index`` places ``grad`` inside a dense block (None: grad covers every row of ``rows``).
        Both paths do the same float operations in the same order, so a sampled row gets bit-identical
        values from the sparse and the dense update."""
        hyper = self.hyper
        values = storage.load(weight, rows) if weight_rows is None else weight_rows

        def add_grad(target: torch.Tensor, update: torch.Tensor, alpha: float = 1.0) -> None:
            if local_index is None:
                target.add_(update, alpha=alpha)
            else:
                target.index_add_(0, local_index, update, alpha=alpha)

        if self.name == "sgd":
            momentum = state.get("momentum_buffer")
            if momentum is not None:
                buf = storage.load(momentum, rows, state.get("momentum_buffer_scale"))
                buf.mul_(hyper["momentum"])
            else:
                buf = torch.zeros_like(values)
            buf.add_(values, alpha=hyper["weight_decay"])
            add_grad(buf, grad)
            values.add_(buf, alpha=-lr)
            if momentum is not None:
                storage.store(momentum, rows, buf, state.get("momentum_buffer_scale"))
        else:
            beta1, beta2 = hyper["betas"]
            exp_avg, exp_avg_sq = storage.load(state["exp_avg"], rows), storage.load(state["exp_avg_sq"], rows)
            steps = state["adam_steps"][rows] + 1
            state["adam_steps"][rows] = steps
            if self.name == "adam" and hyper["weight_decay"]:
                # torch.optim.Adam: L2 added to the gradient, on every row of a dense block.
                full = values * hyper["weight_decay"]
                add_grad(full, grad)
                grad, local_index = full, None  # add_grad reads local_index: from here on, whole rows
            elif self.name == "adamw":
                values.mul_(1.0 - lr * hyper["weight_decay"])
            exp_avg.mul_(beta1)
            add_grad(exp_avg, grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2)
            add_grad(exp_avg_sq, grad * grad, alpha=1.0 - beta2)
            steps = steps.to(torch.float32)[:, None]
            bias1 = 1.0 - torch.pow(beta1, steps)
            bias2 = 1.0 - torch.pow(beta2, steps)
            denom = (exp_avg_sq.sqrt() / bias2.sqrt()).add_(hyper["eps"])
            values.addcdiv_(exp_avg / bias1, denom, value=-lr)
            storage.store(state["exp_avg"], rows, exp_avg)
            storage.store(state["exp_avg_sq"], rows, exp_avg_sq)
        storage.store(weight, rows, values)


class RowUpdatedHead(Protocol):
    """What ``JointOptimizer`` needs of a head whose weight rows it updates (``partial_fc.PartialFC`` is one):
    the row optimizer it was configured with, where its rows live, and the per-step row operations.
    The arrow points one way: partial_fc imports this module, this module knows only the interface."""

    row_optimizer: RowOptimizer | None
    weight: torch.Tensor

    def configure_optimizer(self, name: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                            betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """Choose the row update rule (a ``RowOptimizer``) and allocate its state."""

    def unscale_(self, inv_scale: float | torch.Tensor) -> None:
        """Multiply this step's gradient rows by ``inv_scale`` (AMP; a 0-dim device tensor or a number)."""

    def grads_finite(self) -> torch.Tensor | bool:
        """Whether this rank's gradient rows are all finite (a 0-dim bool tensor, left on the device)."""

    def step(self, lr: float) -> None:
        """Update the rows that have gradients."""

    def zero_grad(self) -> None:
        """Forget this step's gradient rows."""


@dataclass
class StepOutcome:
    """What ``JointOptimizer.step`` decided; every field is the same on every rank."""

    stepped: bool  # backbone and head moved (False: skipped, and an fp16 scale backed off)
    loss_finite: bool  # the loss was finite on every rank
    grads_finite: bool  # every backbone and head gradient was finite on every rank
    grad_norm: float  # this step's backbone gradient norm (before clipping; nan / inf when not finite)
    loss: float = math.nan  # this rank's loss as passed to step()
    flags: list[bool] = field(default_factory=list)  # step(flags=...) agreed on: True where any rank set it
    mean_loss: float = math.nan  # the loss averaged over ranks (the same number on every rank)
    shared: list[float] = field(default_factory=list)  # step(shared=...) averaged over ranks


class JointOptimizer:
    """One optimizer over the backbone (a torch.optim optimizer) and a row-updated head such as Partial FC (``head=None``:
    the backbone optimizer alone, e.g. with a replicated softmax head whose parameters it holds).

    Per step: ``set_lr(lr)``, ``step(loss=...)``, ``zero_grad()``. ``scaler`` (a
    torch.amp.GradScaler; disabled or None for fp32 / bf16) unscales the backbone through its own API
    and the head's rows by the same factor; ``clip_grad_norm`` > 0 clips the backbone's gradient norm.
    The step is skipped on every rank when the loss or any gradient on any rank is not finite (one
    all-reduce); a skipped fp16 step backs the scale off, like GradScaler does for its own optimizers.
    ``param_groups`` are the backbone's groups plus one for the head (only its ``lr`` is used).
    The head's rows and their optimizer state are checkpointed by ``head.full_state_dict()``
    (world-size independent); ``state_dict()`` here holds the backbone optimizer and the head's lr.
    """

    def __init__(self, backbone_optimizer: torch.optim.Optimizer, head: "RowUpdatedHead | None",
                 scaler: torch.amp.GradScaler | None = None, clip_grad_norm: float = 0.0):
        if head is not None and head.row_optimizer is None:
            raise PartialFCError("JointOptimizer: call head.configure_optimizer() first (or use build_joint_optimizer)")
        if not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm >= 0):
            raise PartialFCError(f"JointOptimizer: clip_grad_norm={clip_grad_norm!r}: expected a number >= 0 "
                                 f"(0 = off; config key 'clip_grad_norm')")
        self.backbone_optimizer, self.head = backbone_optimizer, head
        # Where the finite-check flags live: the head's device, else the first parameter's (NCCL needs CUDA).
        first = next((param for group in backbone_optimizer.param_groups for param in group["params"]), None)
        self.device = head.weight.device if head is not None else (first.device if first is not None else
                                                                   torch.device("cpu"))
        self.scaler = scaler if scaler is not None else compat.grad_scaler(self.device.type, enabled=False)
        self.clip_grad_norm = float(clip_grad_norm)
        lr = backbone_optimizer.param_groups[0]["lr"]
        # Each backbone group's lr relative to the schedule's (a group's "lr_scale" key; config key
        # backbone_lr_scale). Kept here, not read back from a loaded state: the config decides on resume.
        self.lr_scales = [float(group.get("lr_scale", 1.0)) for group in backbone_optimizer.param_groups]
        self.head_group: dict[str, Any] | None = None
        if head is not None:
            self.head_group = {"params": [], "lr": lr, "name": "partial_fc", "optimizer": head.row_optimizer.name,
                               **head.row_optimizer.hyper}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The backbone optimizer's groups, then the head's (when there is a Partial FC head)."""
        return list(self.backbone_optimizer.param_groups) + ([] if self.head_group is None else [self.head_group])

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group: ``lr`` times the group's scale (backbone groups built with an
        ``lr_scale``; the head's is 1)."""
        for group, scale in zip(self.backbone_optimizer.param_groups, self.lr_scales):
            group["lr"] = lr * scale
        if self.head_group is not None:
            self.head_group["lr"] = lr

    def _backbone_params(self) -> list[torch.Tensor]:
        return [param for group in self.backbone_optimizer.param_groups for param in group["params"]
                if param.grad is not None]

    def step(self, loss: float | torch.Tensor = 0.0, flags: Sequence[float] = (),
             shared: Sequence[torch.Tensor] = ()) -> StepOutcome:
        """Unscale, clip, decide on every rank together, then step both (or skip both).

        ``loss`` may be a tensor (this step's loss, not yet read on the host). ``flags``: the caller's own
        per-rank conditions (e.g. "stop requested"), agreed on in the same all-reduce (max over ranks) and
        returned in ``StepOutcome.flags``. ``shared``: per-rank device scalars (e.g. the divergence detectors'
        inputs) averaged over ranks in the same all-reduce (``StepOutcome.shared``; the loss's average is
        ``mean_loss``), so every rank judges the same numbers. One small all-reduce and one device-to-host read
        per call: the decision, the loss and the gradient norm come back together.
        """
        scaler, head = self.scaler, self.head
        params = self._backbone_params()  # none while the backbone is frozen (fine-tuning's head-only epochs)
        if scaler.is_enabled():
            if params:  # GradScaler records no inf check for an optimizer without gradients
                scaler.unscale_(self.backbone_optimizer)
            if head is not None:
                head.unscale_(devices.loss_scale(scaler, self.device).reciprocal())  # a power of 2: exact
        if self.clip_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        else:  # the norm only (it is the backbone's finite check); nothing to scale
            grad_norm = compat.total_norm([param.grad for param in params])
        grad_norm = grad_norm.detach().float().to(self.device).reshape(1)
        loss = (loss.detach().float().to(self.device) if isinstance(loss, torch.Tensor)
                else torch.full((), float(loss), device=self.device)).reshape(1)
        grads_bad = ~torch.isfinite(grad_norm)
        head_finite = True if head is None else head.grads_finite()
        if isinstance(head_finite, torch.Tensor):
            grads_bad |= ~head_finite.to(self.device)
        elif not head_finite:  # a host bool (a head without device-side checks): no copy to the device needed
            grads_bad = torch.ones_like(grads_bad)
        found_inf = devices.scaler_found_inf(scaler, self.backbone_optimizer)  # torch_npu: its overflow flags
        if found_inf is not None:
            grads_bad |= found_inf.to(self.device).reshape(1) > 0
        # Sum over ranks of "something is wrong" (> 0: on some rank), so every rank takes the same decision; the
        # same sum carries the loss and the shared values, which come back as averages.
        decision = torch.cat([~torch.isfinite(loss), grads_bad, devices.flags_tensor(flags, self.device) > 0]).float()
        means = [loss] + [value.detach().float().to(self.device).reshape(1) for value in shared]
        reduced = dist_utils.all_reduce_(torch.cat([decision] + means), "sum")
        values = torch.cat([reduced, grad_norm, loss]).tolist()  # the step's one host read
        count, world = len(decision), dist_utils.get_world_size()
        averages = [value / world for value in values[count:count + len(means)]]
        loss_bad, grads_bad, agreed = values[0] > 0, values[1] > 0, [value > 0 for value in values[2:count]]
        stepped = not loss_bad and not grads_bad
        if stepped:
            # Every gradient is finite on every rank, the scaler's own flags included: GradScaler.step would only
            # read them on the host once more (it still does where they could not be seen above).
            if not params:
                pass  # nothing of the backbone's to move, and no optimizer state made for it
            elif found_inf is None and scaler.is_enabled():
                scaler.step(self.backbone_optimizer)
            else:
                self.backbone_optimizer.step()
            if head is not None:
                head.step(self.head_group["lr"])
            if params or not scaler.is_enabled():
                scaler.update()
            else:  # no inf check was recorded (update() would assert): the scale stays as it is
                scaler.update(devices.loss_scale(scaler, self.device))
        elif scaler.is_enabled():
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        return StepOutcome(stepped, not loss_bad, not grads_bad, values[-2], values[-1], agreed, averages[0],
                           averages[1:])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the backbone's and the head's gradients."""
        self.backbone_optimizer.zero_grad(set_to_none=set_to_none)
        if self.head is not None:
            self.head.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        """The backbone optimizer's state and the head group's settings (the head's rows: full_state_dict)."""
        head = {} if self.head_group is None else {key: value for key, value in self.head_group.items() if key != "params"}
        return {"backbone": self.backbone_optimizer.state_dict(), "head": head}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a ``state_dict()``; a plain torch optimizer state (older checkpoints) loads the backbone.
        The backbone optimizer's state is matched to this run's groups by parameter name (pfc/optim_state.py):
        another grouping (``backbone_lr_scale``, ``freeze_stages``) keeps every parameter's momentum."""
        if isinstance(state, Mapping) and "param_groups" in state and "state" in state:
            self._load_backbone(state)
            return
        if not isinstance(state, Mapping) or not isinstance(state.get("backbone"), Mapping):
            raise PartialFCError("JointOptimizer: not an optimizer state (expected a JointOptimizer.state_dict() "
                                 "or a torch optimizer state_dict)")
        head = state.get("head") or {}
        mine = None if self.head_group is None else self.head_group["optimizer"]
        if mine is not None and head.get("optimizer", mine) != mine:
            raise PartialFCError(f"JointOptimizer: checkpoint optimizer is {head['optimizer']!r}, this run uses "
                                 f"{mine!r} (config key 'optimizer')")
        self._load_backbone(state["backbone"])
        if self.head_group is not None and "lr" in head:
            self.head_group["lr"] = head["lr"]

    def _load_backbone(self, saved: Mapping[str, Any]) -> None:
        from pfc.optim_state import remap_state

        remapped, notes = remap_state(saved, self.backbone_optimizer)
        self.backbone_optimizer.load_state_dict(remapped)
        for note in notes:
            logger.info("optimizer state: %s", note)


def _trainable(group: dict) -> dict:
    """``group`` without the parameters that do not require grad (and without their names)."""
    keep = [param.requires_grad for param in group["params"]]
    trimmed = {**group, "params": [param for param, kept in zip(group["params"], keep) if kept]}
    if "param_names" in group:
        trimmed["param_names"] = [name for name, kept in zip(group["param_names"], keep) if kept]
    return trimmed


TORCH_OPTIMIZERS = {
    "sgd": lambda params, lr, h: torch.optim.SGD(params, lr=lr, momentum=h["momentum"], weight_decay=h["weight_decay"]),
    "adam": lambda params, lr, h: torch.optim.Adam(params, lr=lr, betas=h["betas"], eps=h["eps"],
                                                   weight_decay=h["weight_decay"]),
    "adamw": lambda params, lr, h: torch.optim.AdamW(params, lr=lr, betas=h["betas"], eps=h["eps"],
                                                     weight_decay=h["weight_decay"]),
}


def build_joint_optimizer(name: str, backbone_params: Iterable[torch.Tensor] | Iterable[dict], head: "RowUpdatedHead | None", lr: float,
                          momentum: float = 0.9, weight_decay: float = 5e-4,
                          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                          clip_grad_norm: float = 0.0, scaler: torch.amp.GradScaler | None = None) -> JointOptimizer:
    """The backbone's torch optimizer and the head's row optimizer with the same settings, as one
    ``JointOptimizer``; the optimizer name and settings are checked here, once (by ``RowOptimizer``).
    ``head=None``: the backbone optimizer alone (its parameters may include a replicated head's).
    ``backbone_params``: tensors, or param groups (dicts with ``params``, an ``lr_scale`` relative to the
    lr ``set_lr`` gives and optionally ``param_names``, by which a resume finds each parameter's saved state);
    parameters that do not require grad (frozen stages) are left out."""
    if head is not None:
        head.configure_optimizer(name, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps)
        hyper = head.row_optimizer.hyper
    else:
        hyper = RowOptimizer(name, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps).hyper
    given = list(backbone_params)
    groups = given if given and isinstance(given[0], dict) else [{"params": given}]
    groups = [_trainable(group) for group in groups]
    groups = [group for group in groups if group["params"]] or groups[:1]
    params = groups if len(groups) > 1 or "lr_scale" in groups[0] else groups[0]["params"]
    backbone = TORCH_OPTIMIZERS[name](params, lr, hyper)
    return JointOptimizer(backbone, head, scaler=scaler, clip_grad_norm=clip_grad_norm)
