"""1:1 figures from pair scores: the ROC, TAR at each FAR with the FAR reached and its threshold, EER, AUC,
and the best single-threshold accuracy. A pair is accepted when its score is >= the threshold.

Scores are cosine similarities (higher = more alike). Every figure comes from the exact empirical ROC (one
point per distinct score), so a threshold read here reproduces its TAR and FAR on the same pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@dataclass
class Roc:
    """The empirical ROC: accepting scores >= thresholds[i] gives tar[i] and far[i] (thresholds descending)."""

    thresholds: np.ndarray
    tar: np.ndarray
    far: np.ndarray
    num_genuine: int
    num_impostor: int


def roc_curve(scores: np.ndarray, genuine: np.ndarray) -> Roc:
    """The ROC of ``scores`` (float) against ``genuine`` (bool); needs both kinds of pair."""
    scores, genuine = np.asarray(scores, dtype=np.float64), np.asarray(genuine, dtype=bool)
    num_genuine, num_impostor = int(genuine.sum()), int((~genuine).sum())
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"a ROC needs genuine and impostor pairs, got {num_genuine} genuine and {num_impostor} "
                         f"impostor pairs")
    order = np.argsort(-scores, kind="stable")
    ordered, labels = scores[order], genuine[order]
    # the last position of each distinct score: accepting everything >= it accepts exactly the pairs up to there
    last = np.r_[np.nonzero(np.diff(ordered))[0], len(ordered) - 1]
    true_accepts, false_accepts = np.cumsum(labels)[last], np.cumsum(~labels)[last]
    thresholds = np.r_[np.inf, ordered[last]]
    tar = np.r_[0.0, true_accepts / num_genuine]
    far = np.r_[0.0, false_accepts / num_impostor]
    return Roc(thresholds, tar, far, num_genuine, num_impostor)


def tar_at_far(roc: Roc, far: float) -> dict:
    """The highest TAR whose FAR does not exceed ``far``: its threshold, the FAR it actually reaches, and
    whether ``far`` is measurable at all (at least one impostor pair per 1/far; else the FAR-0 point is given)."""
    allowed = np.nonzero(roc.far <= far + 1e-12)[0]
    best = int(allowed[np.argmax(roc.tar[allowed])])  # tar is non-decreasing: the last allowed point
    return {"far": far, "tar": float(roc.tar[best]), "far_reached": float(roc.far[best]),
            "threshold": _finite(roc.thresholds[best]), "false_accepts": int(round(roc.far[best] * roc.num_impostor)),
            "measurable": bool(far * roc.num_impostor >= 1)}


def equal_error_rate(roc: Roc) -> dict:
    """EER: where FAR and FRR (1 - TAR) cross, read at the ROC point where they are closest (their mean)."""
    frr = 1.0 - roc.tar
    best = int(np.argmin(np.abs(roc.far - frr)))
    return {"eer": float((roc.far[best] + frr[best]) / 2), "threshold": _finite(roc.thresholds[best]),
            "far": float(roc.far[best]), "frr": float(frr[best])}


def area_under_curve(roc: Roc) -> float:
    """Area under TAR(FAR), trapezoids between the points (the curve ends at FAR 1, TAR 1)."""
    far, tar = np.r_[roc.far, 1.0], np.r_[roc.tar, 1.0]
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))


def best_accuracy(roc: Roc) -> dict:
    """The single threshold with the most correct decisions over all pairs (no folds: an optimistic figure);
    of equally good thresholds, the strictest."""
    correct = roc.tar * roc.num_genuine + (1.0 - roc.far) * roc.num_impostor
    best = int(np.argmax(correct))
    return {"accuracy": float(correct[best] / (roc.num_genuine + roc.num_impostor)),
            "threshold": _finite(roc.thresholds[best])}


def _finite(threshold: float) -> float | None:
    # the "accept nothing" point has threshold +inf, which JSON cannot hold
    return float(threshold) if np.isfinite(threshold) else None


def one_to_one(scores: np.ndarray, genuine: np.ndarray, fars=FARS) -> dict:
    """Every 1:1 figure of a pair list, as a JSON-ready dict."""
    roc = roc_curve(scores, genuine)
    return {"genuine_pairs": roc.num_genuine, "impostor_pairs": roc.num_impostor,
            "tar_at_far": [tar_at_far(roc, far) for far in fars], "eer": equal_error_rate(roc),
            "auc": area_under_curve(roc), "best_accuracy": best_accuracy(roc)}
