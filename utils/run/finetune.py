"""Fine-tuning's phases of a run: frozen stages and frozen BatchNorm (``freeze_stages``, ``freeze_bn``: the
whole run), and the head-only epochs (``head_only_epochs``: the backbone frozen, then unfrozen at an epoch
boundary).

Frozen means two things here: no gradient (the weights never move and the optimizer keeps no state for
them) and eval mode (BatchNorm's running statistics never change). The marks live on the modules, so the
training step needs only :func:`train_mode` and :func:`embed`; the phase is a function of the epoch, so a
resume inside or after the head-only phase is in the right phase with nothing recorded in the checkpoint.

Under DDP the head-only phase runs the backbone's own module (not the DDP wrapper) without autograd: DDP
then prepares no gradient reduction that would never come (its "expected to have finished reduction"
error) and its bucket layout, built over every trainable parameter at wrap time, serves the unfrozen
epochs unchanged.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from utils.config.rules import ConfigError

logger = logging.getLogger(__name__)

KEEP_EVAL = "arcscale_keep_eval"  # a module attribute: stays in eval mode when the model trains
HEAD_ONLY = "arcscale_head_only"  # a backbone attribute: this epoch trains the head alone


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone inside a DDP wrapper (``model`` itself without one)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def stage_modules(backbone: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """The modules of the backbone's first ``count`` stages, as the network states them (``finetune_stages``);
    a ConfigError naming ``freeze_stages`` when the network states none or fewer."""
    stages_of = getattr(backbone, "finetune_stages", None)
    name = getattr(backbone, "name", type(backbone).__name__)
    if stages_of is None:
        raise ConfigError(f"config key 'freeze_stages' is {count} but network '{name}' states no stages; "
                          f"expected freeze_stages=0 (iresnet*, mbf*, inception_resnet_v1 and tiny have stages)")
    stages = stages_of()
    if count > len(stages):
        raise ConfigError(f"config key 'freeze_stages' is {count} but network '{name}' has {len(stages)} stages; "
                          f"expected 0 to {len(stages)}")
    return [module for stage in stages[:count] for module in stage]


def prepare_backbone(backbone: torch.nn.Module, cfg: Any) -> None:
    """Apply ``freeze_stages`` (no gradients, eval mode) and ``freeze_bn`` (every BatchNorm in eval mode) for
    the whole run. Called before the optimizer is built (frozen stages get no optimizer state) and before DDP
    (which leaves parameters without gradients out of its buckets)."""
    count = int(getattr(cfg, "freeze_stages", 0) or 0)
    frozen = stage_modules(backbone, count) if count else []
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
        for inner in module.modules():
            setattr(inner, KEEP_EVAL, True)
    batchnorms = 0
    if getattr(cfg, "freeze_bn", False):
        for module in backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                setattr(module, KEEP_EVAL, True)
                batchnorms += 1
    if count or batchnorms:
        trainable = sum(param.numel() for param in backbone.parameters() if param.requires_grad)
        logger.info("fine-tuning: %d stage(s) frozen, %d BatchNorm layer(s) in eval mode; %d backbone parameters "
                    "train", count, batchnorms, trainable)


def enter_epoch(model: torch.nn.Module, cfg: Any, epoch: int) -> None:
    """Set the phase of ``epoch``: head only while ``epoch < head_only_epochs``, else the backbone trains too."""
    backbone = unwrap(model)
    head_only = epoch < int(getattr(cfg, "head_only_epochs", 0) or 0)
    if bool(getattr(backbone, HEAD_ONLY, False)) != head_only or (head_only and epoch == 0):
        logger.info("epoch %d: %s", epoch, f"head only (backbone frozen until epoch {cfg.head_only_epochs})"
                    if head_only else "backbone unfrozen: backbone and head train")
    setattr(backbone, HEAD_ONLY, head_only)


def head_only(model: torch.nn.Module) -> bool:
    """Whether the current epoch trains the head alone."""
    return bool(getattr(unwrap(model), HEAD_ONLY, False))


def train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, then eval mode where fine-tuning keeps it: the whole backbone in the head-only
    phase, frozen stages and (``freeze_bn``) BatchNorm layers always."""
    model.train()
    backbone = unwrap(model)
    if head_only(backbone):
        backbone.eval()
        return
    for module in backbone.modules():
        if getattr(module, KEEP_EVAL, False):
            module.eval()


def embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's embeddings of ``images``; in the head-only phase computed without autograd by the module
    itself (not through DDP) and returned as a leaf that requires grad, so the head's backward runs as usual."""
    if not head_only(model):
        return model(images)
    with torch.no_grad():
        embeddings = unwrap(model)(images)
    return embeddings.detach().requires_grad_(True)
