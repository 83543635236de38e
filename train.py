"""ArcScale trainer.

    python train.py configs/ms1mv3_r50.py [--set key=value ...]
    torchrun --nproc_per_node=8 [--nnodes=N --node_rank=R --master_addr=H --master_port=P] train.py CONFIG
    python -m torch.distributed.launch --nproc_per_node=8 train.py CONFIG      (legacy launcher)

Reads top to bottom: config -> device/process group -> output folder and resume decision -> data
-> run plan (steps and LR from progress in samples) -> backbone (DDP) + head -> optimizer -> resume
-> the loop (fetch a step's batches, agree on all ranks to go on, micro-steps with AMP, one optimizer
step, logging, verification, checkpoints) -> final model.pt and verification table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from backbones import get_model, input_spec, normalize
from dataset import DatasetError, bad_record_count, check_bad_records, get_dataloader
from losses import build_margin_loss
from partial_fc import PartialFC
from pfc.optim import JointOptimizer, build_joint_optimizer
from utils import device as devices
from utils.checkpoint import (atomic_save, build_checkpoint, capture_rng_state, checkpoint_path, clean_partial_writes,
                              newest_loadable, previous_run_files, prune_checkpoints, restore_rng_state)
from utils.config import ConfigError, load_config, to_plain
from utils.logging_utils import RunningMean, StepTimer, format_eta, setup_logging
from utils.paths import ensure_output_dir
from utils.run_plan import make_plan, make_schedule, resume_position
from utils.stop import StopRequest, stop_signals_blocked
from utils.weights import load_backbone

logger = logging.getLogger("arcscale.train")

# Errors raised by our own modules are user-facing: print one line, exit 2, no traceback.
OUR_PACKAGES = {"__main__", "train", "dataset", "losses", "metric_losses", "partial_fc", "pfc", "softmax_head",
                "backbones", "utils", "eval"}


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss stayed non-finite); the message says why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: the config file, ``--set key=value`` overrides, the legacy launcher's --local_rank."""
    parser = argparse.ArgumentParser(description="Train a face-recognition model from a config file.")
    parser.add_argument("config", help="path to a config file, e.g. configs/ms1mv3_r50.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (Python literal syntax), e.g. --set lr=0.2 --set fp16=True")
    # torch.distributed.launch (legacy) passes the local rank as an argument instead of LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def all_ranks_min(values: list[float], ctx: devices.DeviceContext) -> list[float]:
    """Element-wise minimum over ranks, so every rank takes the same skip/stop decision."""
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.kind != "cpu" else "cpu")
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def rank0_decides(value: float, ctx: devices.DeviceContext) -> float:
    """Rank 0's ``value`` on every rank (decisions about the output folder are rank 0's to make)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.kind != "cpu" else "cpu")
    if ctx.distributed:
        dist.broadcast(tensor, src=0)
    return float(tensor.item())


def prepare_output(cfg: Any, ctx: devices.DeviceContext) -> tuple[str | None, dict | None]:
    """Clean interrupted writes, refuse to clobber a previous run, find the checkpoint to resume from."""
    if ctx.is_main:
        ensure_output_dir(cfg.output, "config key 'output'")
        clean_partial_writes(cfg.output)
    resume = cfg.resume
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts and not resume:  # torchrun --max-restarts restarted us: the folder holds this very run
        logger.warning("elastic restart %d: continuing from the newest checkpoint (as resume=\"auto\")", restarts)
        resume = "auto"
    path, state = newest_loadable(cfg.output) if resume else (None, None)
    found = rank0_decides(float(path is not None), ctx)
    if resume is True and not found:
        raise ConfigError(f"resume=True but {cfg.output} holds no usable checkpoint; use resume=\"auto\" to start "
                          f"fresh when there is none, or check `output`")
    if resume == "auto" and not found:
        logger.info("resume=\"auto\": no checkpoint in %s, starting fresh", cfg.output)
    if not resume:
        existing = previous_run_files(cfg.output) if ctx.is_main else []
        if rank0_decides(float(bool(existing)), ctx) and not cfg.overwrite:
            raise ConfigError(f"output folder {cfg.output} already holds a run ({len(existing) or 'some'} checkpoint/"
                              f"model files); continue it with resume=True (or \"auto\"), choose another `output`, "
                              f"or set overwrite=True to delete them")
        if ctx.is_main and existing:
            for old in existing:
                os.remove(old)
            logger.warning("overwrite=True: deleted %d file(s) of the previous run in %s", len(existing), cfg.output)
    return (path, state) if found else (None, None)


def resolve_data(cfg: Any, ctx: devices.DeviceContext) -> str:
    """The data source to train on: an explicit ``rec`` always wins; otherwise the generated identity
    set when the config describes one (local rank 0 of each node builds it once, others wait)."""
    if cfg.rec != "synthetic" or not cfg.synthetic.num_identities:
        return cfg.rec
    from utils.synthetic import ensure_identity_set

    source = ensure_identity_set(cfg) if ctx.local_rank == 0 else None
    if ctx.distributed:
        dist.barrier()
    return source or ensure_identity_set(cfg)


def build_backbone(cfg: Any, ctx: devices.DeviceContext) -> tuple[torch.nn.Module, dict | None]:
    """The configured network on the training device, optionally initialised from ``init_backbone``;
    also the file's ``logits`` classifier when it has one (facenet-pytorch's releases)."""
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, dropout=cfg.dropout,
                         gradient_checkpointing=cfg.gradient_checkpointing)
    spec = input_spec(backbone)
    if tuple(cfg.image_size) != tuple(spec.image_size):
        raise ConfigError(f"config key 'image_size' is {tuple(cfg.image_size)} but network '{cfg.network}' takes "
                          f"{spec.describe()}; set image_size={tuple(spec.image_size)}")
    classifier = None
    if cfg.init_backbone:
        _, classifier = load_backbone(cfg.init_backbone, model=backbone, return_classifier=True)
        logger.info("initialised backbone from %s", cfg.init_backbone)
    backbone = backbone.to(ctx.device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone, classifier


def build_head(cfg: Any, num_classes: int, classifier: dict | None, ctx: devices.DeviceContext) -> torch.nn.Module:
    """The training objective on top of the embeddings: Partial FC with a margin loss (default), a
    replicated softmax classifier (``head="softmax"``), or the triplet loss (``loss="triplet"``)."""
    if cfg.loss == "triplet":
        from losses import build_triplet_loss

        return build_triplet_loss(cfg)
    if cfg.head == "softmax":
        from softmax_head import SoftmaxHead

        head = SoftmaxHead(cfg.embedding_size, num_classes)
        if classifier is not None:
            head.load_logits(classifier, cfg.init_backbone)
        return head.to(ctx.device)
    if classifier is not None:
        logger.info("%s: its %s-class logits layer is not used by head=%r (dropped)", cfg.init_backbone,
                    tuple(classifier["weight"].shape)[0], cfg.head)
    return PartialFC(build_margin_loss(cfg), cfg.embedding_size, num_classes, sample_rate=cfg.sample_rate,
                     pfc_update=cfg.pfc_update, weight_dtype=cfg.pfc_weight_dtype, state_dtype=cfg.pfc_state_dtype,
                     seed=cfg.seed).to(ctx.device)


def head_state_dict(head: torch.nn.Module) -> dict:
    """Collective for Partial FC (shards gathered, world-size independent); replicated heads as they are."""
    return head.full_state_dict() if isinstance(head, PartialFC) else head.state_dict()


def load_head_state(head: torch.nn.Module, state: dict) -> None:
    """Inverse of :func:`head_state_dict` (Partial FC re-splits the shards for this world size)."""
    if isinstance(head, PartialFC):
        head.load_full_state_dict(state)
    else:
        head.load_state_dict(state)


def sum_replicated_grads(head: torch.nn.Module, ctx: devices.DeviceContext) -> None:
    """A replicated head outside DDP: SUM its gradients over ranks, as the backbone's DDP hook does
    (its loss gives each rank its share of the global-mean gradient)."""
    if not ctx.distributed or isinstance(head, PartialFC):
        return
    for param in head.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)


def build_optimizer(cfg: Any, backbone: torch.nn.Module, head: torch.nn.Module, scaler: Any,
                    lr: float) -> JointOptimizer:
    """SGD (arcface_torch), AdamW (ViTs) or Adam (facenet-pytorch) over the backbone, a replicated head's
    parameters and Partial FC's rows, as one optimizer that also owns AMP unscaling, clipping and the
    all-rank finite check."""
    partial_fc = head if isinstance(head, PartialFC) else None
    params = list(backbone.parameters()) + ([] if partial_fc is not None else list(head.parameters()))
    return build_joint_optimizer(cfg.optimizer, params, partial_fc, lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                 clip_grad_norm=cfg.clip_grad_norm, scaler=scaler)


def wrap_ddp(backbone: torch.nn.Module, cfg: Any, ctx: devices.DeviceContext) -> torch.nn.Module:
    """DDP with summed (not averaged) gradients; the backbone itself without a process group."""
    if not ctx.distributed:
        return backbone
    # BatchNorm statistics stay per rank between steps (arcface_torch's broadcast_buffers=False); newer
    # torch spells it forward_sync_buffers and warns about the old name.
    import inspect

    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    model = DistributedDataParallel(backbone, device_ids=[ctx.local_rank] if ctx.kind != "cpu" else None,
                                    static_graph=bool(cfg.static_graph), **no_buffer_sync)
    model.register_comm_hook(None, devices.sum_allreduce_hook(cfg.fp16_grad_compression and ctx.kind == "cuda"))
    return model


def gather_rng_states(ctx: devices.DeviceContext) -> list:
    """Every rank's RNG state (rank 0 writes them all into the checkpoint)."""
    state = capture_rng_state()
    if not ctx.distributed:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(cfg, ctx, plan, parts, step, epoch, samples_in_epoch, bad_records, source) -> None:
    """Collective: every rank takes part (head shards are gathered); rank 0 writes atomically.

    A failed write (disk full, permissions) leaves the previous checkpoint intact and, with
    ``on_save_error="stop"``, stops every rank with one line naming the path.
    """
    backbone, head, optimizer, scaler, sampler = parts
    head_state = head_state_dict(head)
    rng_states = gather_rng_states(ctx)
    path, error = checkpoint_path(cfg.output, step), ""
    if ctx.is_main:
        state = build_checkpoint(
            step=step, epoch=epoch, samples_in_epoch=samples_in_epoch, global_batch=plan.global_batch,
            world_size=ctx.world_size, rng=rng_states, config=to_plain(cfg),
            data={"source": str(source), "num_images": plan.num_images, "bad_records": bad_records},
            states={"backbone": backbone.state_dict(), "head": head_state, "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "sampler": sampler.state_dict()})
        try:
            atomic_save(state, path)
            prune_checkpoints(cfg.output, cfg.keep_checkpoints, protect=path)
            atomic_save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
            logger.info("saved checkpoint %s (step %d, epoch %d)", path, step, epoch)
        except OSError as exc:
            error = f"cannot write checkpoint {path}: {exc.strerror or exc} (the previous checkpoint is intact)"
    saved = all_ranks_min([0.0 if error else 1.0], ctx)[0]
    if not saved:
        error = error or f"cannot write checkpoint {path} on rank 0 (see its log)"
        if cfg.on_save_error == "warn":
            logger.warning("%s; training goes on (on_save_error=\"warn\")", error)
        else:
            raise TrainingError(f"{error}; stopping (on_save_error=\"stop\"; \"warn\" trains on)")


def restore_checkpoint(path, state, ctx, plan, parts) -> tuple[int, int]:
    """Load every part of a training checkpoint; returns (step, epoch) converted to the current plan."""
    backbone, head, optimizer, scaler, sampler = parts
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise TrainingError(f"{path}: backbone does not match the config's network "
                            f"({str(exc).splitlines()[0]})") from None
    load_head_state(head, state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    step, epoch, samples = resume_position(state["progress"], plan)
    if state["world_size"] == ctx.world_size:
        restore_rng_state(state["rng"][ctx.rank])
    else:
        logger.info("resuming %d-rank checkpoint on %d ranks: head shards re-split, RNG reseeded",
                    state["world_size"], ctx.world_size)
    logger.info("resumed from %s at step %d of %d (epoch %d, %d samples into it)", path, step, plan.total_steps,
                epoch, samples)
    return step, epoch


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
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
    """Write scalars to TensorBoard and wandb when they are open."""
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
    if run is not None:
        run.log(scalars, step=step)


def build_verification(cfg: Any, source: str) -> Any:
    """The verification callback over the ``val_targets`` that exist; a missing one is a warning."""
    if not cfg.val_targets:
        return None
    from eval.verification import VerificationCallback, target_path

    data_dir = cfg.val_data_dir or (source if os.path.isdir(str(source)) else ".")
    targets = []
    for name in cfg.val_targets:
        if os.path.isfile(target_path(data_dir, name)):
            targets.append(name)
        else:
            logger.warning("verification target %r: %s not found; training goes on without it", name,
                           target_path(data_dir, name))
    if not targets:
        return None
    return VerificationCallback(targets, data_dir, batch_size=cfg.val_batch_size, image_size=tuple(cfg.image_size))


def check_data_health(loader: Any, cfg: Any, ctx: devices.DeviceContext) -> None:
    """Stop every rank with one line once skipped corrupt samples pass ``max_bad_records`` anywhere."""
    error = ""
    try:
        check_bad_records(loader, float(cfg.max_bad_records))
    except DatasetError as exc:
        error = str(exc)
    if not all_ranks_min([0.0 if error else 1.0], ctx)[0]:
        raise DatasetError(error or "corrupt samples above max_bad_records on another rank (see its log)")


def fetch_step(batches: Any, accumulation: int) -> tuple[list | None, str]:
    """The micro-batches of one optimizer step, or (None, why) when a DataLoader worker died."""
    try:
        return [next(batches) for _ in range(accumulation)], ""
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc):
            raise
        return None, str(exc).splitlines()[0]


def forward_backward(model, head, scaler, autocast, micro_batches, cfg, ctx) -> float:
    """Micro-steps of one optimizer step; returns the step's mean loss (DDP syncs only on the last)."""
    model.train()
    loss_sum, accumulation, spec = 0.0, len(micro_batches), input_spec(model)
    for micro_step, (images, labels) in enumerate(micro_batches):
        images = normalize(images.to(ctx.device, non_blocking=True), spec)
        labels = labels.to(ctx.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sync = model.no_sync() if ctx.distributed and micro_step < accumulation - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                embeddings = model(images)
            loss = head(embeddings.float(), labels)
            scaler.scale(loss / accumulation).backward()
        loss_sum += loss.item() / accumulation
    return loss_sum


def train(cfg: Any, ctx: devices.DeviceContext, stop: StopRequest) -> dict[str, float]:
    """Train ``cfg`` on this rank; returns the last verification results (empty without val_targets)."""
    seed_everything(cfg.seed + ctx.rank)
    resume_path, resume_state = prepare_output(cfg, ctx)
    logger.info("config %s: %s", cfg.config_path, json.dumps(to_plain(cfg), sort_keys=True, default=str))
    source = resolve_data(cfg, ctx)
    loader = get_dataloader(cfg, ctx.rank, ctx.world_size, pin_memory=devices.pin_memory(ctx), source=source)
    sampler, data = loader.sampler, loader.data_info
    plan = make_plan(cfg, data.num_images, ctx.world_size)
    schedule = make_schedule(cfg, plan)
    logger.info("%s: %s, %d images, %d classes, world size %d, global batch %d (%d x %d ranks x %d acc), "
                "%d steps/epoch, %d steps", cfg.config_name, data.source, data.num_images, data.num_classes,
                ctx.world_size, plan.global_batch, cfg.batch_size, ctx.world_size, plan.accumulation,
                plan.steps_per_epoch, plan.total_steps)

    # ---- model, head, optimizers
    fp16, bf16 = devices.resolve_precision(ctx, bool(cfg.fp16), bool(cfg.bf16))
    backbone, classifier = build_backbone(cfg, ctx)
    head = build_head(cfg, data.num_classes, classifier, ctx)
    scaler = devices.grad_scaler(ctx, fp16)
    optimizer = build_optimizer(cfg, backbone, head, scaler, schedule.lr(0))
    parts = (backbone, head, optimizer, scaler, sampler)

    step, epoch = 0, 0
    if resume_path:
        step, epoch = restore_checkpoint(resume_path, resume_state, ctx, plan, parts)
        del resume_state
    model = wrap_ddp(backbone, cfg, ctx)
    verification = build_verification(cfg, source)
    writer, wandb_run = open_summary_writers(cfg, ctx)
    autocast = devices.autocast(ctx, fp16, bf16)
    loss_meter, timer = RunningMean(), StepTimer()
    start_step, nonfinite_in_a_row, results, saved_at, ended = step, 0, {}, None, ""

    def checkpoint() -> None:
        nonlocal saved_at
        if saved_at != (step, epoch):  # an epoch end right after an interval save is saved again, as epoch + 1
            samples = sampler.consumed if sampler.epoch == epoch else 0
            save_checkpoint(cfg, ctx, plan, parts, step, epoch, samples, bad_record_count(loader), source)
            saved_at = (step, epoch)

    if verification is not None and cfg.verify_at_start and step == 0:
        log_scalars(writer, wandb_run, verification(0, backbone, ctx.device), 0)

    # ---- the loop: one iteration = one optimizer step of `accumulation` micro-batches
    while epoch < plan.num_epoch and step < plan.total_steps and not ended:
        sampler.set_epoch(epoch)
        with stop_signals_blocked():  # workers start with stop signals blocked (see utils/stop.py)
            batches = iter(loader)
        steps_this_epoch = len(loader) // plan.accumulation
        steps_to_run = min(steps_this_epoch, plan.total_steps - step)
        for _ in range(steps_to_run):
            wait_start = time.perf_counter()
            micro_batches, fetch_error = fetch_step(batches, plan.accumulation)
            data_wait = time.perf_counter() - wait_start
            # Every rank trains this step, or none does: a stop or a dead worker anywhere abandons it everywhere.
            have_data, no_stop = all_ranks_min([float(micro_batches is not None), float(not stop.requested)], ctx)
            if not (have_data and no_stop):
                ended = "stop" if not no_stop else "data"
                break
            current_lr = schedule.lr(plan.position(epoch, sampler.consumed))
            optimizer.set_lr(current_lr)
            loss = forward_backward(model, head, scaler, autocast, micro_batches, cfg, ctx)
            sum_replicated_grads(head, ctx)
            outcome = optimizer.step(loss=loss)
            optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row = 0 if outcome.loss_finite else nonfinite_in_a_row + 1
            if outcome.stepped:
                loss_meter.update(loss)
            elif not outcome.loss_finite:
                logger.warning("step %d: non-finite loss (%s); step skipped (%d in a row)", step, loss, nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    raise TrainingError(f"loss was non-finite for {nonfinite_in_a_row} optimizer steps in a row "
                                        f"(max_nonfinite_steps={cfg.max_nonfinite_steps}, last at step {step}); "
                                        f"lower lr, use bf16, or check the data")
            sampler.advance(plan.global_batch)
            step += 1
            timer.add(plan.global_batch, data_wait)
            if step % cfg.frequent == 0 or step == plan.total_steps:
                check_data_health(loader, cfg, ctx)
                log_progress(cfg, ctx, writer, wandb_run, loss_meter, timer, scaler, step, plan, epoch, current_lr,
                             start_step, getattr(head, "last_stats", None))
            if verification is not None and cfg.verbose > 0 and step % cfg.verbose == 0 and step < plan.total_steps:
                results = verification(step, backbone, ctx.device)
                log_scalars(writer, wandb_run, results, step)
            if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                checkpoint()
        else:
            if steps_to_run == steps_this_epoch:
                epoch += 1  # the epoch ran to its end
            checkpoint()

    checkpoint()
    if ended:
        why = (f"{stop.signal_name or 'a signal'} received" if stop.requested else "stop requested on another rank") \
            if ended == "stop" else (fetch_error or "a DataLoader worker died on another rank")
        if ended == "data":
            raise TrainingError(f"{why}; checkpoint saved at step {step}: continue with resume=True")
        logger.warning("%s: checkpoint saved at step %d; continue with --set resume=True", why, step)
        return results
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


def log_progress(cfg, ctx, writer, wandb_run, loss_meter, timer, scaler, step, plan, epoch, lr, start_step,
                 triplet_stats=None) -> None:
    """The periodic status line (a window without a finite step shows no loss, never 0); with the triplet
    loss also the active-triplet fraction and the mean anchor-positive / anchor-negative distances."""
    stats = timer.report(step, plan.total_steps, start_step)
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    loss_text = f"{loss_meter.mean:.4f}" if loss_meter.count else "n/a (all steps skipped)"
    logger.info("step %d/%d epoch %d | loss %s | lr %.6g | %.1f samples/s | data wait %.0f%% | scale %.0f | "
                "mem %.2f GiB | ETA %s", step, plan.total_steps, epoch, loss_text, lr, stats["samples_per_s"],
                100 * stats["data_wait"], scale, devices.memory_gib(ctx), format_eta(stats["eta_s"]))
    scalars = {"train/lr": lr, "train/samples_per_s": stats["samples_per_s"], "train/data_wait": stats["data_wait"]}
    if loss_meter.count:
        scalars["train/loss"] = loss_meter.mean
    if triplet_stats:
        logger.info("step %d triplets | active %.3f | d(a,p) %.4f | d(a,n) %.4f", step,
                    triplet_stats.get("active_fraction", float("nan")), triplet_stats.get("mean_ap", float("nan")),
                    triplet_stats.get("mean_an", float("nan")))
        scalars.update({f"triplet/{key}": value for key, value in triplet_stats.items()})
    log_scalars(writer, wandb_run, scalars, step)
    loss_meter.reset()


def print_summary(cfg: Any, results: dict[str, float]) -> None:
    """Final verification table and where every output went."""
    lines = ["", "Final verification:" if results else "Training finished (no val_targets configured)."]
    for key in sorted(results):
        lines.append(f"  {key:<40s} {results[key]:.5f}")
    output = os.path.abspath(cfg.output)
    lines.append(f"outputs in {output}:")
    lines.append(f"  training.log     {os.path.join(output, 'training.log')}")
    if cfg.tensorboard:
        lines.append(f"  tensorboard/     {os.path.join(output, 'tensorboard')}  (tensorboard --logdir ...)")
    lines.append(f"  checkpoints      {os.path.join(output, 'checkpoint_step*.pt')}  (resume=True continues)")
    lines.append(f"  model.pt         {os.path.join(output, 'model.pt')}  (backbone state_dict)")
    logger.info("\n".join(lines))


def one_line(exc: BaseException) -> str:
    """A user-facing one-liner: worker exceptions carry a whole traceback in their text; keep its last line."""
    text = str(exc).strip()
    if "Original Traceback" in text or "\n" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else type(exc).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 also for a graceful stop, 2 for user-facing errors)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        ctx = devices.setup(cfg.device, args.local_rank)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in OUR_PACKAGES:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    setup_logging(ctx.rank, cfg.output, cfg.log_level)
    try:
        with StopRequest() as stop:
            train(cfg, ctx, stop)
        return 0
    except Exception as exc:
        worker_died = isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)
        if type(exc).__module__.split(".")[0] not in OUR_PACKAGES and not worker_died:
            raise
        logger.error("error: %s", one_line(exc))
        return 2
    finally:
        devices.teardown()


if __name__ == "__main__":
    sys.exit(main())
