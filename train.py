"""ArcScale trainer.

    python train.py configs/ms1mv3_r50.py [--set key=value ...]
    torchrun --nproc_per_node=8 [--nnodes=N --node_rank=R --master_addr=H --master_port=P] train.py CONFIG
    python -m torch.distributed.launch --nproc_per_node=8 train.py CONFIG      (legacy launcher)

Reads top to bottom: config -> device/process group -> data -> backbone (DDP) + Partial FC head
-> optimizer/schedule -> optional resume -> the loop (micro-steps, AMP, clipping, one optimizer
step, logging, verification, checkpoints) -> final model.pt and verification table.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from backbones import get_model
from dataset import bad_record_count, get_dataloader, normalize_batch
from losses import build_margin_loss
from partial_fc import PartialFC
from utils import device as devices
from utils.checkpoint import load_backbone
from utils.config import ConfigError, load_config, to_plain
from utils.logging_utils import RunningMean, StepTimer, format_eta, setup_logging
from utils.lr_scheduler import PolyWarmupLR
from utils.resume import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save, capture_rng_state, checkpoint_path,
                          latest_checkpoint, load_checkpoint, prune_checkpoints, restore_rng_state)

logger = logging.getLogger("arcscale.train")

# Errors raised by our own modules are user-facing: print one line, exit 2, no traceback.
OUR_PACKAGES = {"__main__", "train", "dataset", "losses", "partial_fc", "backbones", "utils", "eval"}


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss stayed non-finite); the message says why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a face-recognition model from a config file.")
    parser.add_argument("config", help="path to a config file, e.g. configs/ms1mv3_r50.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (Python literal syntax), e.g. --set lr=0.2 --set fp16=True")
    # torch.distributed.launch (legacy) passes the local rank as an argument instead of LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits 0 (preemptible clusters)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # Give the previous handlers back (matters when train() runs inside another program).
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once


def all_ranks_min(values: list[float], ctx: devices.DeviceContext) -> list[float]:
    """Element-wise minimum over ranks, so every rank takes the same skip/stop decision."""
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.kind != "cpu" else "cpu")
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def resolve_data(cfg: Any, ctx: devices.DeviceContext) -> None:
    """Generate the synthetic identity set once (local rank 0 of each node builds, others wait)."""
    if not cfg.synthetic.num_identities:
        return
    from utils.synthetic import ensure_identity_set

    if ctx.local_rank == 0:
        cfg.rec = ensure_identity_set(cfg)
    if ctx.distributed:
        dist.barrier()
    if ctx.local_rank != 0:
        cfg.rec = ensure_identity_set(cfg)


def build_backbone(cfg: Any, ctx: devices.DeviceContext) -> torch.nn.Module:
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, dropout=cfg.dropout,
                         gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.init_backbone:
        load_backbone(cfg.init_backbone, model=backbone)
        logger.info("initialised backbone from %s", cfg.init_backbone)
    backbone = backbone.to(ctx.device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def build_optimizer(cfg: Any, backbone: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in backbone.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    raise ConfigError(f"config key 'optimizer': expected 'sgd' or 'adamw', got {cfg.optimizer!r}")


def wrap_ddp(backbone: torch.nn.Module, cfg: Any, ctx: devices.DeviceContext) -> torch.nn.Module:
    if not ctx.distributed:
        return backbone
    model = DistributedDataParallel(backbone, device_ids=[ctx.local_rank] if ctx.kind != "cpu" else None,
                                    broadcast_buffers=False, static_graph=bool(cfg.static_graph))
    model.register_comm_hook(None, devices.sum_allreduce_hook(cfg.fp16_grad_compression and ctx.kind == "cuda"))
    return model


def gather_rng_states(ctx: devices.DeviceContext) -> list:
    state = capture_rng_state()
    if not ctx.distributed:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(cfg, ctx, backbone, head, optimizer, scaler, scheduler, sampler, step, epoch) -> None:
    """Collective: every rank takes part (head shards are gathered); rank 0 writes atomically."""
    head_state = head.full_state_dict()
    rng_states = gather_rng_states(ctx)
    if ctx.is_main:
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "step": step, "epoch": epoch, "world_size": ctx.world_size,
            "backbone": backbone.state_dict(), "head": head_state,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
            "rng": rng_states, "config": to_plain(cfg),
        }
        path = checkpoint_path(cfg.output, step)
        atomic_save(state, path)
        prune_checkpoints(cfg.output, cfg.keep_checkpoints)
        atomic_save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
        logger.info("saved checkpoint %s (step %d, epoch %d)", path, step, epoch)
    if ctx.distributed:
        dist.barrier()


def restore_checkpoint(path, ctx, backbone, head, optimizer, scaler, sampler) -> tuple[int, int]:
    state = load_checkpoint(path)
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise TrainingError(f"{path}: backbone does not match the config's network "
                            f"({str(exc).splitlines()[0]})") from None
    head.load_full_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    if state["world_size"] == ctx.world_size:
        restore_rng_state(state["rng"][ctx.rank])
    else:
        logger.info("resuming %d-rank checkpoint on %d ranks: head shards re-split, RNG reseeded",
                    state["world_size"], ctx.world_size)
    logger.info("resumed from %s at step %d (epoch %d)", path, state["step"], state["epoch"])
    return state["step"], state["epoch"]


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_summary_writers(cfg: Any, ctx: devices.DeviceContext) -> tuple[Any, Any]:
    """TensorBoard (rank 0) and, when asked, wandb (lazy import; key from WANDB_API_KEY)."""
    if not ctx.is_main:
        return None, None
    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.output, "tensorboard"))
    run = None
    if cfg.using_wandb:
        try:
            import wandb
        except ImportError:
            raise ConfigError("config key 'using_wandb' is True but wandb is not installed (pip install wandb)") from None
        run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_run_name,
                         config=to_plain(cfg), dir=cfg.output)
    return writer, run


def log_scalars(writer: Any, run: Any, scalars: dict[str, float], step: int) -> None:
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
    if run is not None:
        run.log(scalars, step=step)


def train(cfg: Any, ctx: devices.DeviceContext, stop: StopRequest) -> dict[str, float]:
    seed_everything(cfg.seed + ctx.rank)
    resolve_data(cfg, ctx)
    loader = get_dataloader(cfg, ctx.rank, ctx.world_size, pin_memory=devices.pin_memory(ctx))
    sampler = loader.sampler

    # ---- sizes and learning rate
    accumulation = int(cfg.gradient_acc)
    if accumulation < 1:
        raise ConfigError(f"config key 'gradient_acc': expected an integer >= 1, got {cfg.gradient_acc!r}")
    global_batch = cfg.batch_size * ctx.world_size * accumulation
    lr = cfg.lr_per_512 * global_batch / 512 if cfg.lr_per_512 else cfg.lr
    steps_per_epoch = cfg.num_image // (cfg.batch_size * ctx.world_size) // accumulation
    if steps_per_epoch < 1:
        raise ConfigError(f"num_image={cfg.num_image} is smaller than one global batch ({global_batch} = "
                          f"batch_size {cfg.batch_size} x {ctx.world_size} ranks x gradient_acc {accumulation})")
    total_steps = steps_per_epoch * cfg.num_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, int(cfg.max_steps))
    warmup_steps = int(steps_per_epoch * cfg.warmup_epoch)
    if warmup_steps >= total_steps:  # e.g. a short max_steps performance run
        logger.warning("warmup of %d steps is longer than the run (%d steps); using %d", warmup_steps,
                       total_steps, total_steps - 1)
        warmup_steps = total_steps - 1
    scheduler = PolyWarmupLR(lr, total_steps, warmup_steps, cfg.lr_power)
    logger.info("%s: %d images, %d classes, world size %d, global batch %d (%d x %d ranks x %d acc), lr %.5g, "
                "%d steps/epoch, %d steps", cfg.config_name, cfg.num_image, cfg.num_classes, ctx.world_size,
                global_batch, cfg.batch_size, ctx.world_size, accumulation, lr, steps_per_epoch, total_steps)

    # ---- model, head, optimizers
    backbone = build_backbone(cfg, ctx)
    head = PartialFC(build_margin_loss(cfg), cfg.embedding_size, cfg.num_classes,
                     sample_rate=cfg.sample_rate, pfc_update=cfg.pfc_update, weight_dtype=cfg.pfc_weight_dtype,
                     state_dtype=cfg.pfc_state_dtype, seed=cfg.seed).to(ctx.device)
    head.configure_optimizer(cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    optimizer = build_optimizer(cfg, backbone, lr)
    scaler = devices.grad_scaler(ctx, cfg.fp16)

    step, epoch = 0, 0
    if cfg.resume:
        path = latest_checkpoint(cfg.output)
        if path:
            step, epoch = restore_checkpoint(path, ctx, backbone, head, optimizer, scaler, sampler)
        else:
            logger.warning("resume=True but %s holds no checkpoint; starting from scratch", cfg.output)
    model = wrap_ddp(backbone, cfg, ctx)

    verification = None
    if cfg.val_targets:
        from eval.verification import VerificationCallback

        data_dir = cfg.val_data_dir or (cfg.rec if os.path.isdir(str(cfg.rec)) else ".")
        verification = VerificationCallback(list(cfg.val_targets), data_dir, batch_size=cfg.val_batch_size,
                                            image_size=tuple(cfg.image_size))
    writer, wandb_run = open_summary_writers(cfg, ctx)
    autocast = devices.autocast(ctx, cfg.fp16, cfg.bf16)
    loss_meter, timer = RunningMean(), StepTimer()
    start_step, nonfinite_in_a_row, results = step, 0, {}
    saved_at_step = -1

    def checkpoint() -> None:
        nonlocal saved_at_step
        if saved_at_step != step:
            save_checkpoint(cfg, ctx, backbone, head, optimizer, scaler, scheduler, sampler, step, epoch)
            saved_at_step = step

    if verification is not None and cfg.verify_at_start and step == 0:
        log_scalars(writer, wandb_run, verification(0, backbone, ctx.device), 0)

    # ---- the loop: one iteration = one optimizer step of `accumulation` micro-batches
    while epoch < cfg.num_epoch and step < total_steps and not stop.requested:
        sampler.set_epoch(epoch)
        batches = iter(loader)
        steps_this_epoch = len(loader) // accumulation
        steps_to_run = min(steps_this_epoch, total_steps - step)
        for _ in range(steps_to_run):
            model.train()
            loss_sum, data_wait = 0.0, 0.0
            for micro_step in range(accumulation):
                wait_start = time.perf_counter()
                images, labels = next(batches)
                data_wait += time.perf_counter() - wait_start
                images = normalize_batch(images.to(ctx.device, non_blocking=True))
                labels = labels.to(ctx.device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # Only the last micro-step all-reduces backbone gradients.
                sync = model.no_sync() if ctx.distributed and micro_step < accumulation - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        embeddings = model(images)
                    loss = head(embeddings.float(), labels)
                    scaler.scale(loss / accumulation).backward()
                sampler.advance(cfg.batch_size * ctx.world_size)
                loss_sum += loss.item() / accumulation

            current_lr = scheduler.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
                head.unscale_(1.0 / scaler.get_scale())
            grad_norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else float("inf"))
            loss_finite, grads_finite, keep_going = all_ranks_min(
                [float(math.isfinite(loss_sum)), float(head.grads_finite() and bool(torch.isfinite(grad_norm))),
                 float(not stop.requested)], ctx)
            if not loss_finite:
                nonfinite_in_a_row += 1
                logger.warning("step %d: non-finite loss (%s); step skipped (%d in a row)", step, loss_sum, nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    raise TrainingError(f"loss was non-finite for {nonfinite_in_a_row} optimizer steps in a row "
                                        f"(max_nonfinite_steps={cfg.max_nonfinite_steps}, last at step {step}); "
                                        f"lower lr, use bf16, or check the data")
                if scaler.is_enabled():
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            elif not grads_finite:
                # fp16 overflow: the scaler backs off, nothing moves (the normal GradScaler contract).
                nonfinite_in_a_row = 0
                if scaler.is_enabled():
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                logger.debug("step %d: non-finite gradients, step skipped", step)
            else:
                nonfinite_in_a_row = 0
                scaler.step(optimizer)
                head.step(current_lr)
                scaler.update()
                loss_meter.update(loss_sum)
            optimizer.zero_grad(set_to_none=True)
            head.zero_grad()
            step += 1
            timer.add(global_batch, data_wait)

            if step % cfg.frequent == 0 or step == total_steps:
                stats = timer.report(step, total_steps, start_step)
                scale = scaler.get_scale() if scaler.is_enabled() else 1.0
                logger.info("step %d/%d epoch %d | loss %.4f | lr %.5g | %.1f samples/s | data wait %.0f%% | "
                            "scale %.0f | mem %.2f GiB | ETA %s", step, total_steps, epoch, loss_meter.mean, current_lr,
                            stats["samples_per_s"], 100 * stats["data_wait"], scale, devices.memory_gib(ctx),
                            format_eta(stats["eta_s"]))
                log_scalars(writer, wandb_run, {"train/loss": loss_meter.mean, "train/lr": current_lr,
                                                "train/samples_per_s": stats["samples_per_s"],
                                                "train/data_wait": stats["data_wait"]}, step)
                loss_meter.reset()
            if verification is not None and cfg.verbose > 0 and step % cfg.verbose == 0 and step < total_steps:
                results = verification(step, backbone, ctx.device)
                log_scalars(writer, wandb_run, results, step)
            if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                checkpoint()
            if not keep_going:
                stop.requested = True
                break
        else:
            if steps_to_run == steps_this_epoch:
                epoch += 1  # the epoch ran to its end
            checkpoint()
            continue
        break

    if stop.requested:
        logger.warning("stop requested: saving a checkpoint at step %d and exiting", step)
        checkpoint()
        return results
    checkpoint()
    if verification is not None:
        results = verification(step, backbone, ctx.device)
        log_scalars(writer, wandb_run, results, step)
    skipped = bad_record_count(loader)
    if skipped:
        logger.warning("%d corrupt record(s) were skipped during training", skipped)
    if ctx.is_main:
        print_summary(cfg, results)
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    return results


def print_summary(cfg: Any, results: dict[str, float]) -> None:
    lines = ["", "Final verification:" if results else "Training finished (no val_targets configured)."]
    for key in sorted(results):
        lines.append(f"  {key:<40s} {results[key]:.5f}")
    lines.append(f"model.pt: {os.path.abspath(os.path.join(cfg.output, 'model.pt'))}")
    logger.info("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        ctx = devices.setup(cfg.device, args.local_rank)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in OUR_PACKAGES:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(ctx.rank, cfg.output, cfg.log_level)
    try:
        with StopRequest() as stop:
            train(cfg, ctx, stop)
        return 0
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in OUR_PACKAGES:
            raise
        logger.error("error: %s", exc)
        return 2
    finally:
        devices.teardown()


if __name__ == "__main__":
    sys.exit(main())
