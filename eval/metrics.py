"""Verification metrics computed exactly as insightface's ``eval/verification.py`` computes them.

Distances are squared L2 between L2-normalised embeddings of pair members (images 2i and
2i+1). 10 contiguous folds (``KFold(10, shuffle=False)``); for each test fold the threshold
in ``arange(0, 4, 0.01)`` with the best accuracy on the other nine folds (first one on ties)
is applied to the test fold. VAL@FAR uses ``arange(0, 4, 0.001)`` and the piecewise-linear
interpolation of threshold against train-fold FAR that scipy<=1.8's ``interp1d(kind='slinear')``
performed (newer scipy refuses the duplicated FAR values; the arithmetic is reproduced here).

Counting is vectorised with sorted distances (``searchsorted`` gives ``#(dist < threshold)``
for every threshold at once), so the integers, and therefore the accuracies, are identical to
the per-threshold loop while a 6,000-pair set takes milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ROC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def kfold_splits(num_items: int, num_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous (train, test) index splits; the first ``n % k`` folds get one extra item.

    Same partition as ``sklearn.model_selection.KFold(num_folds, shuffle=False)``; one fold means
    train == test (insightface's ``LFold``).
    """
    indices = np.arange(num_items)
    if num_folds <= 1:
        return [(indices, indices)]
    if num_items < num_folds:
        raise ValueError(f"cannot split {num_items} pairs into {num_folds} folds")
    sizes = np.full(num_folds, num_items // num_folds, dtype=np.int64)
    sizes[: num_items % num_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    splits = []
    for fold in range(num_folds):
        test = indices[bounds[fold]:bounds[fold + 1]]
        train = np.concatenate([indices[:bounds[fold]], indices[bounds[fold + 1]:]])
        splits.append((train, test))
    return splits


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation with the same operations as ``sklearn.preprocessing.normalize``."""
    embeddings = np.array(embeddings, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings))
    norms[norms == 0.0] = 1.0  # zero rows stay zero, like sklearn
    embeddings /= norms[:, np.newaxis]
    return embeddings


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance between rows 2i and 2i+1 (float64)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    diff = np.subtract(embeddings[0::2], embeddings[1::2])
    return np.sum(np.square(diff), 1)


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``#(value < t)`` for every threshold t."""
    return np.searchsorted(sorted_values, thresholds, side="left").astype(np.int64)


def _fold_counts(dist: np.ndarray, issame: np.ndarray, splits, thresholds: np.ndarray):
    """Per fold: (#same with dist<t, #diff with dist<t, #same, #diff) over the fold's test items."""
    same_below, diff_below, n_same, n_diff = [], [], [], []
    for _, test in splits:
        fold_dist, fold_same = dist[test], issame[test]
        same_below.append(_count_below(np.sort(fold_dist[fold_same]), thresholds))
        diff_below.append(_count_below(np.sort(fold_dist[~fold_same]), thresholds))
        n_same.append(int(fold_same.sum()))
        n_diff.append(int((~fold_same).sum()))
    return np.stack(same_below), np.stack(diff_below), np.array(n_same), np.array(n_diff)


def calculate_roc(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = ROC_THRESHOLDS,
                  num_folds: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean tpr per threshold, mean fpr per threshold, accuracy per fold, chosen threshold per fold)."""
    issame = np.asarray(issame, dtype=bool)
    splits = kfold_splits(len(dist), num_folds)
    same_below, diff_below, n_same, n_diff = _fold_counts(dist, issame, splits, thresholds)
    # With one fold, train == test, so the "rest" is the fold itself.
    if len(splits) == 1:
        train_same_below, train_diff_below, train_n_diff = same_below, diff_below, n_diff
    else:
        train_same_below = same_below.sum(0) - same_below
        train_diff_below = diff_below.sum(0) - diff_below
        train_n_diff = n_diff.sum() - n_diff
    accuracy = np.zeros(len(splits))
    best_thresholds = np.zeros(len(splits))
    tprs = np.zeros((len(splits), len(thresholds)))
    fprs = np.zeros((len(splits), len(thresholds)))
    for fold, (train, test) in enumerate(splits):
        # tp + tn on the train folds; the denominator is constant so the integer argmax
        # (first maximum) equals the argmax of insightface's float accuracies.
        train_correct = train_same_below[fold] + (train_n_diff[fold] - train_diff_below[fold])
        best = int(np.argmax(train_correct))
        best_thresholds[fold] = thresholds[best]
        tp, fp = same_below[fold], diff_below[fold]
        fn, tn = n_same[fold] - tp, n_diff[fold] - fp
        tprs[fold] = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
        fprs[fold] = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
        accuracy[fold] = float(tp[best] + tn[best]) / len(test)
    return tprs.mean(0), fprs.mean(0), accuracy, best_thresholds


def slinear_interpolate(x_values: np.ndarray, y_values: np.ndarray, x: float) -> float:
    """Evaluate scipy<=1.8 ``interp1d(x_values, y_values, kind='slinear')(x)`` for non-decreasing x_values.

    That spline is a degree-1 B-spline with knots ``[x0, x..., x_last]`` and coefficients y; on
    duplicated x it uses the interval between the last x <= target and the next larger x. The
    arithmetic follows the Cox-de Boor evaluation so results match bit for bit.
    """
    x_values = np.asarray(x_values, dtype=np.float64)
    y_values = np.asarray(y_values, dtype=np.float64)
    if not (x_values[0] <= x <= x_values[-1]):
        raise ValueError(f"interpolation target {x} outside [{x_values[0]}, {x_values[-1]}]")
    left = int(np.searchsorted(x_values, x, side="right")) - 1
    if left >= len(x_values) - 1:
        # x equals the largest value: scipy evaluates the last knot interval, which is
        # degenerate (both basis functions 0, result 0.0) when that value is duplicated.
        left = len(x_values) - 2
        if left < 0 or x_values[left] == x_values[-1]:
            return 0.0 if left >= 0 else float(y_values[0])
    right = left + 1
    x_left, x_right = x_values[left], x_values[right]
    weight = 1.0 / (x_right - x_left)
    basis_left = weight * (x_right - x)
    basis_right = weight * (x - x_left)
    return float(y_values[left] * basis_left + y_values[right] * basis_right)


def calculate_val(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = VAL_THRESHOLDS,
                  far_target: float = FAR_TARGET, num_folds: int = 10) -> tuple[float, float, float]:
    """(VAL mean, VAL std, FAR mean) at ``far_target``, thresholds fitted on the train folds."""
    issame = np.asarray(issame, dtype=bool)
    splits = kfold_splits(len(dist), num_folds)
    val = np.zeros(len(splits))
    far = np.zeros(len(splits))
    for fold, (train, test) in enumerate(splits):
        train_dist, train_same = dist[train], issame[train]
        train_n_diff = int((~train_same).sum())
        false_accepts = _count_below(np.sort(train_dist[~train_same]), thresholds)
        far_train = false_accepts / float(train_n_diff) if train_n_diff else np.full(len(thresholds), np.nan)
        if np.max(far_train) >= far_target:
            threshold = slinear_interpolate(far_train, thresholds, far_target)
        else:
            threshold = 0.0
        test_dist, test_same = dist[test], issame[test]
        accepted = np.less(test_dist, threshold)
        n_same, n_diff = int(test_same.sum()), int((~test_same).sum())
        val[fold] = float(np.sum(accepted & test_same)) / n_same if n_same else float("nan")
        far[fold] = float(np.sum(accepted & ~test_same)) / n_diff if n_diff else float("nan")
    return float(np.mean(val)), float(np.std(val)), float(np.mean(far))


@dataclass
class PairMetrics:
    """Metrics of one embedding set (normalised inside) on a pair list."""

    accuracy: float        # mean over folds
    accuracy_std: float
    fold_accuracy: np.ndarray
    best_thresholds: np.ndarray
    val: float             # TAR at FAR_TARGET
    val_std: float
    far: float
    tpr: np.ndarray
    fpr: np.ndarray


def evaluate(embeddings: np.ndarray, issame, num_folds: int = 10) -> PairMetrics:
    """insightface's ``evaluate``: normalise, pair distances, 10-fold accuracy and VAL@FAR=1e-3."""
    issame = np.asarray(issame, dtype=bool)
    dist = pair_distances(l2_normalize(embeddings))
    if len(dist) != len(issame):
        raise ValueError(f"{len(embeddings)} embeddings give {len(dist)} pairs but issame has {len(issame)} entries")
    tpr, fpr, accuracy, best_thresholds = calculate_roc(dist, issame, ROC_THRESHOLDS, num_folds)
    val, val_std, far = calculate_val(dist, issame, VAL_THRESHOLDS, FAR_TARGET, num_folds)
    return PairMetrics(float(np.mean(accuracy)), float(np.std(accuracy)), accuracy, best_thresholds,
                       val, val_std, far, tpr, fpr)


@dataclass
class VerificationResult:
    """What insightface prints for a target: XNorm, Accuracy (no flip) and Accuracy-Flip."""

    xnorm: float
    plain: PairMetrics     # embeddings of the images only
    flip: PairMetrics      # embedding(image) + embedding(flipped image)
    # cosine similarity of each pair's flip-summed embeddings (1 - d/2 of the distances above): for pictures
    pair_scores: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, float]:
        """Flat float dict (for logs, TensorBoard and JSON)."""
        return {"xnorm": self.xnorm, "accuracy": self.plain.accuracy, "accuracy_std": self.plain.accuracy_std,
                "accuracy_flip": self.flip.accuracy, "accuracy_flip_std": self.flip.accuracy_std,
                "val_flip": self.flip.val, "val_flip_std": self.flip.val_std, "far_flip": self.flip.far}


def verification_metrics(embeddings: np.ndarray, flipped_embeddings: np.ndarray, issame,
                         num_folds: int = 10) -> VerificationResult:
    """Metrics from raw (unnormalised) embeddings of the images and of their horizontal flips."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    flipped_embeddings = np.asarray(flipped_embeddings, dtype=np.float64)
    # XNorm: mean L2 norm over every raw embedding, both views (insightface's _xnorm).
    norms = np.concatenate([np.linalg.norm(embeddings, axis=1), np.linalg.norm(flipped_embeddings, axis=1)])
    xnorm = float(np.mean(norms))
    plain = evaluate(embeddings, issame, num_folds)
    flip = evaluate(embeddings + flipped_embeddings, issame, num_folds)
    scores = 1.0 - pair_distances(l2_normalize(embeddings + flipped_embeddings)) / 2.0
    return VerificationResult(xnorm, plain, flip, scores)
