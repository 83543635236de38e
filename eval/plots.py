"""Pictures of an evaluation, as PNG files: the ROC (TAR against log-scale FAR, one curve per model), the
genuine/impostor score histograms with the chosen thresholds marked, and the CMC of 1:N identification.

matplotlib is an optional dependency, imported only here and only when a picture is asked for: without it
:func:`pyplot` says once how to install it and returns None, and the callers still write their numbers.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

INSTALL_HINT = "matplotlib is not installed, so no pictures were drawn (pip install matplotlib); the numbers are written"
_HINTED: list[bool] = []


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None (with the one-line hint, once) when missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _HINTED:
            _HINTED.append(True)
            logger.warning(INSTALL_HINT)
        return None
    return plt


def _save(plt: Any, figure: Any, path: str) -> str:
    figure.tight_layout()
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def plot_roc(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC") -> str | None:
    """TAR against FAR (log scale, down to the smallest FAR measured), one curve per name; the path or None."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6, 4.5))
    smallest = 1.0
    for name, (far, tar) in curves.items():
        far, tar = np.asarray(far, float), np.asarray(tar, float)
        positive = far > 0
        if positive.any():
            smallest = min(smallest, float(far[positive].min()))
        axis.step(np.clip(far, 1e-12, None), tar, where="post", label=name)  # log axis: FAR 0 drawn at the edge
    axis.set_xscale("log")
    axis.set_xlim(max(min(smallest, 1e-1) / 2, 1e-7), 1.0)
    axis.set_ylim(0.0, 1.01)
    axis.set_xlabel("FAR (false accept rate, log scale)")
    axis.set_ylabel("TAR (true accept rate)")
    axis.set_title(title)
    axis.grid(True, which="both", linestyle="--", linewidth=0.5)
    axis.legend(loc="lower right")
    return _save(plt, figure, path)


def plot_histograms(path: str, scores: np.ndarray, genuine: np.ndarray, thresholds: dict[str, float],
                    title: str = "scores") -> str | None:
    """Genuine and impostor score histograms (densities) with a vertical line per named threshold."""
    plt = pyplot()
    if plt is None:
        return None
    scores, genuine = np.asarray(scores, float), np.asarray(genuine, bool)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    low, high = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    bins = np.linspace(low, max(high, low + 1e-6), 61)  # the scores' own range: they often crowd near 1
    axis.hist(scores[~genuine], bins=bins, density=True, alpha=0.55, label=f"impostor ({int((~genuine).sum())})")
    axis.hist(scores[genuine], bins=bins, density=True, alpha=0.55, label=f"genuine ({int(genuine.sum())})")
    for index, (name, value) in enumerate(thresholds.items()):
        axis.axvline(value, color=f"C{index + 2}", linestyle="--", linewidth=1, label=f"{name}: {value:.3f}")
    axis.set_xlabel("cosine similarity")
    axis.set_ylabel("density")
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize="small")
    return _save(plt, figure, path)


def plot_cmc(path: str, curves: dict[str, Sequence[float]], title: str = "CMC") -> str | None:
    """Identification rate against rank, one curve per name."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for name, rates in curves.items():
        axis.plot(np.arange(1, len(rates) + 1), rates, marker="o", markersize=3, label=name)
    axis.set_xlabel("rank")
    axis.set_ylabel("identification rate")
    axis.set_ylim(0.0, 1.01)
    axis.set_title(title)
    axis.grid(True, linestyle="--", linewidth=0.5)
    axis.legend(loc="lower right")
    return _save(plt, figure, path)


def marked_thresholds(one_to_one: dict, fars: Sequence[float] = (1e-2, 1e-3, 1e-4)) -> dict[str, float]:
    """The thresholds worth drawing from an ``eval.roc.one_to_one`` report: measurable FAR rows, the EER."""
    marks = {f"FAR {row['far']:g}": row["threshold"] for row in one_to_one["tar_at_far"]
             if row["far"] in fars and row["measurable"] and row["threshold"] is not None}
    if one_to_one["eer"]["threshold"] is not None:
        marks["EER"] = one_to_one["eer"]["threshold"]
    return marks


def pair_pictures(out_dir: str, stem: str, scores: np.ndarray, genuine: np.ndarray, title: str) -> list[str]:
    """ROC and histogram of one pair list (a .bin target, an IJB protocol): ``<stem>_roc.png``,
    ``<stem>_scores.png`` in ``out_dir``; the paths written (none without matplotlib)."""
    from eval.roc import one_to_one, roc_curve

    if pyplot() is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    roc = roc_curve(scores, genuine)
    written = [plot_roc(os.path.join(out_dir, f"{stem}_roc.png"), {title: (roc.far, roc.tar)}, f"ROC: {title}"),
               plot_histograms(os.path.join(out_dir, f"{stem}_scores.png"), scores, genuine,
                               marked_thresholds(one_to_one(scores, genuine)), f"scores: {title}")]
    return [path for path in written if path]
