"""ArcScale trainer.

    python train.py configs/ms1mv3_r50.py [--set key=value ...]
    torchrun --nproc_per_node=8 [--nnodes=N --node_rank=R --master_addr=H --master_port=P] train.py CONFIG
    python -m torch.distributed.launch --nproc_per_node=8 train.py CONFIG      (legacy launcher)

Reads top to bottom: config -> device/process group -> output folder and resume decision -> data
-> run plan (steps and LR from progress in samples) -> backbone (DDP) + head -> optimizer -> resume
-> the loop (micro-steps with AMP, the next step's batches fetched, one optimizer step whose
all-reduce also agrees on going on, logging, verification, checkpoints) -> final model.pt and verification table.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from backbones import MODEL_NAMES, get_model, input_spec, normalize
from distill import Distiller, build_distiller, check_teacher
from dataset import bad_record_count, check_bad_records, get_dataloader
from losses import build_margin_loss
from partial_fc import PartialFC
from pfc.optim import JointOptimizer, build_joint_optimizer
from utils.devices import device as devices
from utils.devices import ddp
from utils.config.load import load_config, to_plain
from utils.config.rules import ConfigError, ignored_keys_warning
from utils.data.errors import DatasetError
from utils.data.workers import start_logged
from utils.run.divergence import DivergenceGuard, embedding_similarity
from utils.run.exit import leave, say_error, wait_for_peers
from utils.run.lock import release_output
from utils.run.log import RunningMean, StepTimer, attach_log_file, setup_logging
from utils.run.plan import make_plan, make_schedule
from utils.run.resume_review import review_resume
from utils.run.saving import CheckpointSaver
from utils.run.state import TrainingError, all_ranks_min, prepare_output, restore_checkpoint, unseen_on_some_rank
from utils.run.steps import fetch_step
from utils.run.summary import log_progress, log_run_header, log_verification, open_summary_writers, print_summary
from utils.run.failures import failure_line
from utils.run import finetune
from utils.run.stop import StopRequest, WorkerDeaths
from utils.run.watchdog import StepWatch, process_group_timeout_s
from utils.weights.load import load_backbone
from utils.weights.resolve import resolve_init_backbone, resolve_weights

logger = logging.getLogger("arcscale.train")

# Errors raised by our own modules are user-facing: print one line, exit 2, no traceback.
OUR_PACKAGES = {"__main__", "train", "dataset", "losses", "metric_losses", "partial_fc", "pfc", "softmax_head",
                "backbones", "utils", "eval"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: the config file, ``--set key=value`` overrides, the legacy launcher's --local_rank."""
    parser = argparse.ArgumentParser(description="Train a face-recognition model from a config file.")
    parser.add_argument("config", help="path to a config file, e.g. configs/ms1mv3_r50.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (Python literal syntax), e.g. --set lr=0.2 --set fp16=True")
    # torch.distributed.launch (legacy) passes the local rank as an argument instead of LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_data(cfg: Any, ctx: devices.DeviceContext) -> str:
    """The data source to train on: an explicit ``rec`` always wins; otherwise the generated identity
    set when the config describes one (local rank 0 of each node builds it once, others wait)."""
    if cfg.rec != "synthetic" or not cfg.synthetic.num_identities:
        return cfg.rec
    from utils.data.synthetic import ensure_identity_set

    source = ensure_identity_set(cfg) if ctx.local_rank == 0 else None
    if ctx.distributed:
        dist.barrier()
    return source or ensure_identity_set(cfg)


def build_backbone(cfg: Any, ctx: devices.DeviceContext) -> tuple[torch.nn.Module, dict | None]:
    """The configured network on the training device, optionally initialised from ``init_backbone``, with its
    fine-tuning freezes applied; also the file's ``logits`` classifier when it has one (facenet-pytorch's releases)."""
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, dropout=cfg.dropout,
                         gradient_checkpointing=cfg.gradient_checkpointing)
    spec = input_spec(backbone)
    if tuple(cfg.image_size) != tuple(spec.image_size):
        raise ConfigError(f"config key 'image_size' is {tuple(cfg.image_size)} but network '{cfg.network}' takes "
                          f"{spec.describe()}; set image_size={tuple(spec.image_size)}")
    classifier = None
    if cfg.init_backbone:
        path = resolve_weights(cfg.init_backbone)
        _, classifier = load_backbone(path, model=backbone, return_classifier=True)
        logger.info("initialised backbone from %s%s", cfg.init_backbone, "" if path == cfg.init_backbone else f" ({path})")
    finetune.prepare_backbone(backbone, cfg)  # freeze_stages, freeze_bn: before the optimizer and DDP see it
    backbone = backbone.to(ctx.device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone, classifier


def build_head(cfg: Any, num_classes: int, classifier: dict | None, ctx: devices.DeviceContext) -> torch.nn.Module:
    """The training objective on top of the embeddings: Partial FC with a margin loss (default), a
    replicated softmax classifier (``head="softmax"``), or the triplet loss (``loss="triplet"``)."""
    # The loader drops partial batches (every rank's batch is batch_size) and the datasets check each label
    # as they read it: the heads skip the per-forward size exchange and range check (host syncs).
    if cfg.loss == "triplet":
        from metric_losses import build_triplet_loss

        triplet = build_triplet_loss(cfg)
        triplet.equal_batches = True
        return triplet
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
                     seed=cfg.seed, equal_batches=True, check_labels=False).to(ctx.device)


def sum_replicated_grads(head: torch.nn.Module, ctx: devices.DeviceContext) -> None:
    """A replicated head outside DDP: SUM its gradients over ranks, as the backbone's DDP hook does
    (its loss gives each rank its share of the global-mean gradient)."""
    if not ctx.distributed or isinstance(head, PartialFC):
        return
    for param in head.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)


def build_optimizer(cfg: Any, backbone: torch.nn.Module, head: torch.nn.Module, scaler: Any,
                    lr: float, distill: Distiller | None = None) -> JointOptimizer:
    """SGD (arcface_torch), AdamW (ViTs) or Adam (facenet-pytorch) over the backbone, a replicated head's
    parameters, the distillation projection and Partial FC's rows, as one optimizer that also owns AMP
    unscaling, clipping and the all-rank finite check. The backbone's group learns at ``backbone_lr_scale``
    times the head's lr."""
    partial_fc = head if isinstance(head, PartialFC) else None
    # The same named groups whatever the scales: a resume with another backbone_lr_scale or freeze_stages
    # finds each parameter's saved momentum by its name (pfc/optim_state.py).
    modules = [("backbone", backbone, float(cfg.backbone_lr_scale))] + ([("head", head, 1.0)] if partial_fc is None
                                                                       else [])
    if distill is not None:  # the projection: the head's lr, whatever backbone_lr_scale says
        modules.append(("distill", distill, 1.0))
    params = [{"params": [param for _, param in module.named_parameters()], "lr_scale": scale, "name": name,
               "param_names": [f"{name}.{key}" for key, _ in module.named_parameters()]}
              for name, module, scale in modules]
    groups = [(name, scale) for name, _, scale in modules] + ([("partial_fc", 1.0)] if partial_fc is not None else [])
    logger.info("optimizer %s: %s", cfg.optimizer, ", ".join(f"{name} at {scale:g} x the lr" for name, scale in groups))
    return build_joint_optimizer(cfg.optimizer, params, partial_fc, lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                 clip_grad_norm=cfg.clip_grad_norm, scaler=scaler)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_verification(cfg: Any, source: str, ctx: devices.DeviceContext) -> Any:
    """The verification callback over the ``val_targets`` that every rank sees; a missing one is a warning.
    All ranks decide together: verification is sharded over them, so a target one node lacks is left out
    everywhere (else the others would wait in its all-gathers)."""
    if not cfg.val_targets:
        return None
    from eval.verification import VerificationCallback, target_path

    first = source[0] if isinstance(source, (list, tuple)) else source  # several sources: the first one's folder
    data_dir = cfg.val_data_dir or (first if os.path.isdir(str(first)) else ".")
    paths = [target_path(data_dir, name) for name in cfg.val_targets]
    targets = []
    for name, path, unseen in zip(cfg.val_targets, paths, unseen_on_some_rank(paths, ctx)):
        if not unseen:
            targets.append(name)
        elif len(unseen) == ctx.world_size:
            logger.warning("verification target %r: %s not found; training goes on without it", name, path)
        else:
            logger.warning("verification target %r: %s is not visible on rank(s) %s (node(s) %s); training goes on "
                           "without it: val_data_dir must be on a filesystem every node sees", name, path,
                           ", ".join(str(rank) for rank, _ in unseen), ", ".join(sorted({str(n) for _, n in unseen})))
    if not targets:
        return None
    return VerificationCallback(targets, data_dir, batch_size=cfg.val_batch_size, image_size=tuple(cfg.image_size))


def check_data_health(loader: Any, cfg: Any, ctx: devices.DeviceContext) -> None:
    """Stop every rank with one line once skipped corrupt samples pass ``max_bad_records`` anywhere."""
    error = ""
    try:
        check_bad_records(loader, cfg.max_bad_records)
    except DatasetError as exc:
        error = str(exc)
    if not all_ranks_min([0.0 if error else 1.0], ctx)[0]:
        raise DatasetError(error or "corrupt samples above max_bad_records on another rank (see its log)")


def forward_backward(model, head, scaler, autocast, micro_batches, cfg, ctx,
                     distill=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-steps of one optimizer step (DDP syncs only on the last), then a replicated head's (and the
    distillation projection's) gradient sum; returns the step's mean loss and its first micro-batch's embedding
    similarity (the collapse detector's input) as tensors, not read on the host."""
    finetune.train_mode(model)  # frozen BatchNorm / stages / a head-only epoch's backbone stay in eval mode
    loss_sum, accumulation, spec, similarity = 0.0, len(micro_batches), input_spec(model), None
    step_samples = sum(len(labels) for _, labels in micro_batches)
    for micro_step, (images, labels) in enumerate(micro_batches):
        share = step_samples / len(labels)  # = accumulation, unless a short last step has a smaller micro-batch
        raw = images.to(ctx.device, non_blocking=True)  # uint8: the teacher converts it to its own convention
        images = normalize(raw, spec)
        labels = labels.to(ctx.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sync = model.no_sync() if ctx.distributed and micro_step < accumulation - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                embeddings = finetune.embed(model, images)
            kd = distill(raw, embeddings, autocast) if distill is not None else 0.0  # kd_weight x term, or nothing
            loss = head(embeddings.float(), labels) + kd
            similarity = embedding_similarity(embeddings) if similarity is None else similarity
            scaler.scale(loss / share).backward()
        loss_sum = loss_sum + loss.detach() / share
    sum_replicated_grads(head, ctx)
    if distill is not None:
        distill.sum_grads()
    return loss_sum, similarity


def finish_run(cfg: Any, ctx: devices.DeviceContext, results: dict, deaths: WorkerDeaths, skipped: int,
               saver: CheckpointSaver, writer: Any, wandb_run: Any) -> None:
    """A completed run's last words: late worker deaths and skipped records said, the summary table printed
    (rank 0), TensorBoard and wandb closed."""
    if deaths.failure:  # after the last batch was delivered: nothing is missing from the result
        logger.warning("%s after the last batch it was needed for; the run's outputs are complete", deaths.failure)
    if skipped:
        logger.warning("%d corrupt record(s) were skipped during training", skipped)
    if ctx.is_main:
        print_summary(cfg, results, *saver.final_files())
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()


def train(cfg: Any, ctx: devices.DeviceContext, stop: StopRequest, deaths: WorkerDeaths,
          watch: StepWatch) -> dict[str, float]:
    """Train ``cfg`` on this rank; returns the last verification results (empty without val_targets).
    ``stop`` and ``deaths`` carry the signals (stop requests, dead DataLoader workers) read between steps;
    ``watch`` follows the steps (error lines, first-step memory, the stalled-rank watchdog)."""
    seed_everything(cfg.seed + ctx.rank)
    resume_path, resume_state = prepare_output(cfg, ctx)
    attach_log_file(ctx.rank, cfg.output)
    logger.info("config %s: %s", cfg.config_path, json.dumps(to_plain(cfg), sort_keys=True, default=str))
    source = resolve_data(cfg, ctx)
    loader = get_dataloader(cfg, ctx.rank, ctx.world_size, pin_memory=devices.pin_memory(ctx), source=source)
    sampler, data = loader.sampler, loader.data_info
    plan = make_plan(cfg, data.num_images, ctx.world_size, warn=ctx.is_main)
    schedule = make_schedule(cfg, plan)
    log_run_header(cfg.config_name, data, plan)

    # ---- model, head, optimizers
    fp16, bf16 = devices.resolve_precision(ctx, bool(cfg.fp16), bool(cfg.bf16))
    backbone, classifier = build_backbone(cfg, ctx)
    head = build_head(cfg, data.num_classes, classifier, ctx)
    scaler, distill = devices.grad_scaler(ctx, fp16), build_distiller(cfg, ctx.device, ctx.world_size)
    optimizer = build_optimizer(cfg, backbone, head, scaler, schedule.lr(0), distill)
    parts = (backbone, head, optimizer, scaler, sampler, distill)

    step, epoch, guard = 0, 0, DivergenceGuard(cfg, parts)  # on_divergence: detectors, snapshot, rollback
    if resume_path:
        if review_resume(cfg, resume_path, resume_state, plan, schedule, ctx):
            return {}  # the checkpoint is the run's end: nothing to train, verify or write again
        step, epoch, plan = restore_checkpoint(resume_path, resume_state, ctx, plan, parts, data.fingerprint,
                                               cfg.resume_data_changed, cfg)
        guard.load_state_dict(resume_state.get("divergence"))
        del resume_state
    saver = CheckpointSaver(cfg, ctx, plan, parts, data.fingerprint, resume_path, step, guard.state_dict)
    model = ddp.wrap_ddp(backbone, ctx, cfg.static_graph, plan.accumulation, cfg.fp16_grad_compression)
    verification = build_verification(cfg, source, ctx)
    writer, wandb_run = open_summary_writers(cfg, ctx)
    autocast = devices.autocast(ctx, fp16, bf16)
    loss_meter, timer, start_step, results, ended = RunningMean(), StepTimer(), step, {}, ""
    guard.begin(step, plan.samples_seen(epoch, sampler), writer,  # the fraction of the run done: a rollback's rewind
                lambda: plan.position(epoch, sampler.consumed) / plan.total_steps)

    def checkpoint() -> None:  # the loop's end and a stop both call this; the saver writes each state once
        saver.save(step, epoch, sampler.consumed if sampler.epoch == epoch else 0, bad_record_count(loader))

    if verification is not None and cfg.verify_at_start and step == 0:
        log_verification(writer, wandb_run, verification, verification(0, backbone, ctx.device), 0)

    # ---- the loop: one iteration = one optimizer step of `accumulation` micro-batches. Ranks agree before an
    # epoch's first step; each step fetches the next step's batches before its optimizer step, whose one
    # all-reduce also carries "stop requested" and "no batches" (see docs/training.md, host syncs).
    while epoch < plan.num_epoch and step < plan.last_step and not ended:
        sampler.set_epoch(epoch)
        finetune.enter_epoch(model, cfg, epoch)  # head_only_epochs: the backbone frozen, or unfrozen from here
        batches = start_logged(loader, deaths.start)  # workers start with signals blocked (utils/run/stop.py)
        shape = sampler.epoch_shape()  # whole global batches, and a short last step when resumed off their grid
        steps_to_run = min(shape.steps, plan.last_step - step)
        micro_batches, fetch_error, data_wait = fetch_step(batches, shape.micro_batches(0), deaths, watch, step + 1,
                                                          steps_to_run > 0)
        have_data, no_stop = all_ranks_min([float(micro_batches is not None), float(not stop.requested)], ctx)
        ended = "" if have_data and no_stop else "stop" if not no_stop else "data"
        if ended:
            break
        for index in range(steps_to_run):
            current_lr = guard.lr(schedule, plan.position(epoch, sampler.consumed), plan.total_steps)  # x LR factor
            optimizer.set_lr(current_lr)
            loss, similarity = forward_backward(model, head, scaler, autocast, micro_batches, cfg, ctx, distill)
            micro_batches, fetch_error, next_wait = fetch_step(batches, shape.micro_batches(index + 1), deaths, watch,
                                                               step + 2, index + 1 < steps_to_run)
            # Every rank applies this step or skips it; a stop or a dead worker anywhere ends the run after it.
            outcome = optimizer.step(loss=loss, flags=(stop.requested, micro_batches is None),
                                     shared=guard.shared(similarity))
            optimizer.zero_grad(set_to_none=True)
            if outcome.stepped:
                loss_meter.update(outcome.loss)
            sampler.advance(shape.step_samples(index) * ctx.world_size)
            step += 1
            guard.after_step(step, outcome, plan.samples_seen(epoch, sampler))  # may roll back or stop (on_divergence)
            timer.add(shape.step_samples(index) * ctx.world_size, data_wait)
            data_wait = next_wait
            if step % cfg.frequent == 0 or step == plan.last_step:
                check_data_health(loader, cfg, ctx)
                log_progress(cfg, ctx, writer, wandb_run, loss_meter, timer, scaler, step, plan, epoch, current_lr,
                             start_step, getattr(head, "last_stats", None), plan.samples_seen(epoch, sampler),
                             distill.take_mean() if distill is not None else None)
            if any(outcome.flags) and step < plan.last_step:  # after the last step the run is complete anyway
                ended = "stop" if outcome.flags[0] else "data"
                if index + 1 < steps_to_run:
                    break
                continue  # the epoch's last step: its end is counted and saved as in an uninterrupted run
            if verification is not None and cfg.verbose > 0 and step % cfg.verbose == 0 and step < plan.last_step:
                results = verification(step, backbone, ctx.device)
                log_verification(writer, wandb_run, verification, results, plan.samples_seen(epoch, sampler))
            # not on the epoch's last step: the save after the loop below holds the later state (epoch + 1)
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and index < steps_to_run - 1:
                checkpoint()
        else:
            epoch += int(steps_to_run == shape.steps)  # the epoch ran to its end
            checkpoint()

    checkpoint()
    saver.require_saved(step)  # a final state that is not on disk is no success, whatever on_save_error says
    if ended:
        why = (f"{stop.signal_name or 'a signal'} received" if stop.requested else "stop requested on another rank") \
            if ended == "stop" else (fetch_error or "a DataLoader worker died on another rank")
        if ended == "data":
            raise TrainingError(f"{why}; checkpoint saved at step {step}: continue with resume=True")
        logger.warning("%s: checkpoint saved at step %d; continue with --set resume=True", why, step)
        return results
    if verification is not None:
        results = verification(step, backbone, ctx.device)
        log_verification(writer, wandb_run, verification, results, plan.samples_seen(epoch, sampler))
    finish_run(cfg, ctx, results, deaths, bad_record_count(loader), saver, writer, wandb_run)
    return results


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
        cfg = load_config(args.config, args.overrides, known_values={"network": MODEL_NAMES})  # typos before any data
        if cfg.init_backbone:
            resolve_init_backbone(cfg.init_backbone, cfg.network)  # fetched, or a missing file said, before any data
        check_teacher(cfg, MODEL_NAMES)  # the teacher's network and file, before any data
        ctx = devices.setup(cfg.device, args.local_rank, process_group_timeout_s(cfg.collective_timeout_s))
        devices.apply_speed_settings(ctx, cfg.cudnn_benchmark, cfg.allow_tf32)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in OUR_PACKAGES:
            raise
        say_error(one_line(exc))
        return 2
    setup_logging(ctx.rank, None, cfg.log_level)  # training.log joins once the output folder is accepted
    ignored = ignored_keys_warning(cfg.ignored_keys, cfg.config_path)
    if ignored and ctx.is_main:
        logger.warning(ignored)
    devices.log_choice(ctx)  # device, backend, world size and why (auto)
    finished, watch = False, StepWatch(ctx, cfg.collective_timeout_s)
    try:
        with StopRequest() as stop, WorkerDeaths() as deaths, watch:
            train(cfg, ctx, stop, deaths, watch)
        finished = True
        return 0
    except Exception as exc:
        message = failure_line(exc, cfg, watch)  # out of memory, failed collectives: torch's, said in one line
        worker_died = isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)
        if message is None and type(exc).__module__.split(".")[0] not in OUR_PACKAGES and not worker_died:
            raise
        if watch.exiting.is_set():
            return 2  # the watchdog has said it (missing ranks) and is ending the process
        message = message or one_line(exc)
        logger.error("error: %s", message, extra={"console": False})  # training.log; the console gets stderr
        say_error(message)
        wait_for_peers(ctx)  # an error every rank reached: each says its line before torchrun stops the rest
        return 2
    finally:
        release_output(cfg.output)  # the folder's lock (a later run in this process or another may take it)
        devices.teardown(together=finished)


if __name__ == "__main__":
    # A rank that dies in C++ (std::terminate, a segfault: SIGABRT/SIGSEGV) prints every thread's Python stack
    # first, so a crash in a backend's teardown names where it happened instead of one bare line.
    faulthandler.enable()
    # After main() returns (done, stopped, or a one-line error) nothing is left to run: leave without the
    # interpreter's finalization, where a backend thread running DDP's Python hook can abort the process.
    leave(main())
