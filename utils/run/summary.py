"""What a run tells its user: the periodic status line, TensorBoard / wandb scalars, the end summary."""
from __future__ import annotations

import logging
import os
from typing import Any

from utils.devices import device as devices
from utils.config.load import to_plain
from utils.config.rules import ConfigError
from utils.run.log import format_eta

logger = logging.getLogger("arcscale.train")


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


def log_run_header(config_name: str, data: Any, plan: Any) -> None:
    """The line that says what this run trains on and how long: data, sizes, the global batch, the steps."""
    logger.info("%s: %s, %d images, %d classes, world size %d, global batch %d (%d x %d ranks x %d acc), "
                "%d steps/epoch, %d steps", config_name, data.source, data.num_images, data.num_classes,
                plan.world_size, plan.global_batch, plan.batch_size, plan.world_size, plan.accumulation,
                plan.steps_per_epoch, plan.total_steps)


def log_scalars(writer: Any, run: Any, scalars: dict[str, float], step: int) -> None:
    """Write scalars to TensorBoard and wandb when they are open; ``step`` is the x-axis (the trainer passes
    samples seen, ``RunPlan.samples_seen``, which a resume on another world size keeps monotonic)."""
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
    if run is not None:
        run.log(scalars, step=step)


def log_verification(writer: Any, run: Any, verification: Any, results: dict[str, float], step: int) -> None:
    """A verification's scalars (``log_scalars``) and, in TensorBoard, each target's genuine and impostor score
    histograms (``<target>/scores_genuine``, ``<target>/scores_impostor``: cosine similarities of the pairs)
    from the callback's ``score_histograms``."""
    log_scalars(writer, run, results, step)
    if writer is None:
        return
    for name, (scores, genuine) in getattr(verification, "score_histograms", {}).items():
        if scores is None:
            continue
        for kind, chosen in (("genuine", genuine), ("impostor", ~genuine)):
            if chosen.any():
                writer.add_histogram(f"{name}/scores_{kind}", scores[chosen], step)


def log_progress(cfg, ctx, writer, wandb_run, loss_meter, timer, scaler, step, plan, epoch, lr, start_step,
                 triplet_stats=None, samples_seen=None, kd_term=None) -> None:
    """The periodic status line (a window without a finite step shows no loss, never 0); with distillation
    the window's mean unweighted distillation term (``kd``, part of the loss); with the triplet
    loss also the active-triplet fraction and the mean anchor-positive / anchor-negative distances."""
    stats = timer.report(step, plan.last_step, start_step)
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    loss_text = f"{loss_meter.mean:.4f}" if loss_meter.count else "n/a (all steps skipped)"
    kd_text = "" if kd_term is None else f" | kd {kd_term:.4f}"
    logger.info("step %d/%d epoch %d | loss %s | lr %.6g%s | %.1f samples/s | data wait %.0f%% | scale %.0f | "
                "mem %.2f GiB | ETA %s", step, plan.last_step, epoch, loss_text, lr, kd_text, stats["samples_per_s"],
                100 * stats["data_wait"], scale, devices.memory_gib(ctx), format_eta(stats["eta_s"]))
    scalars = {"train/lr": lr, "train/samples_per_s": stats["samples_per_s"], "train/data_wait": stats["data_wait"]}
    if loss_meter.count:
        scalars["train/loss"] = loss_meter.mean
    if kd_term is not None:
        scalars["train/kd"] = kd_term
    if triplet_stats:
        logger.info("step %d triplets | active %.3f | d(a,p) %.4f | d(a,n) %.4f", step,
                    triplet_stats.get("active_fraction", float("nan")), triplet_stats.get("mean_ap", float("nan")),
                    triplet_stats.get("mean_an", float("nan")))
        scalars.update({f"triplet/{key}": value for key, value in triplet_stats.items()})
    log_scalars(writer, wandb_run, scalars, step if samples_seen is None else samples_seen)
    loss_meter.reset()


def print_summary(cfg: Any, results: dict[str, float], checkpoint: str | None = None,
                  step: int | None = None) -> None:
    """Final verification table and where every output went: the run's final ``checkpoint`` (at ``step``)
    and the model.pt written with it, by name (the trainer prints this only once both are on disk)."""
    lines = ["", "Final verification:" if results else "Training finished (no val_targets configured)."]
    for key in sorted(results):
        lines.append(f"  {key:<40s} {results[key]:.5f}")
    output = os.path.abspath(cfg.output)
    at_step = f"step {step}: " if step is not None else ""
    lines.append(f"outputs in {output}:")
    lines.append(f"  training.log     {os.path.join(output, 'training.log')}")
    if cfg.tensorboard:
        lines.append(f"  tensorboard/     {os.path.join(output, 'tensorboard')}  (tensorboard --logdir ...)")
    final = os.path.abspath(checkpoint) if checkpoint else os.path.join(output, "checkpoint_step*.pt")
    lines.append(f"  checkpoint       {final}  ({at_step}resume=True continues)")
    lines.append(f"  model.pt         {os.path.join(output, 'model.pt')}  ({at_step}backbone state_dict)")
    logger.info("\n".join(lines))
