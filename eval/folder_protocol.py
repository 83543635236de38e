"""The protocols of eval/folders.py on embeddings of identity folders: the pair list (every genuine pair, all or
a seeded sample of impostor pairs, in one seeded order so every fold mixes both), its 1:1 figures, the .bin
protocol's 10-fold accuracy on the same pairs, and 1:N identification with a gallery of K photos per identity.
"""
from __future__ import annotations

import numpy as np

from eval.ijb_meta import IJBError
from eval.ijb_scores import identification
from eval.metrics import FAR_TARGET, ROC_THRESHOLDS, VAL_THRESHOLDS, calculate_roc, calculate_val, kfold_splits
from eval.metrics import l2_normalize
from eval.roc import one_to_one

MIN_GENUINE_PAIRS = 100  # fewer: TAR at any FAR moves by >= 1 point per pair; said as a warning
FPIRS = (1e-3, 1e-2, 1e-1)
FOLDS = 10


ENUMERATE_PAIRS = 20_000_000  # up to this many pairs in all, impostor samples are drawn from the full list


def _impostor_sample(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct impostor pairs (i < j) drawn uniformly without listing every pair (a large folder)."""
    n = len(labels)
    codes = np.zeros(0, np.int64)
    while len(codes) < count:
        first, second = rng.integers(n, size=(2, 2 * (count - len(codes)) + 16))
        keep = labels[first] != labels[second]
        low, high = np.minimum(first, second)[keep], np.maximum(first, second)[keep]
        codes = np.concatenate([codes, low.astype(np.int64) * n + high])
        _, first_seen = np.unique(codes, return_index=True)
        codes = codes[np.sort(first_seen)]  # distinct, in the order drawn (seeded, so repeatable)
    codes = np.sort(codes[:count])
    return np.stack([codes // n, codes % n], 1)


def make_pairs(labels: np.ndarray, max_impostors: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [P, 2] of row indices, genuine [P] bool): every same-identity pair, every other pair or a seeded
    sample of ``max_impostors`` of them, shuffled with ``seed`` (contiguous folds then hold both kinds)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = [np.zeros((0, 2), np.int64)]
    for label in np.unique(labels):
        rows = np.nonzero(labels == label)[0]
        first, second = np.triu_indices(len(rows), k=1)
        parts.append(np.stack([rows[first], rows[second]], 1))
    genuine = np.concatenate(parts)
    num_pairs = len(labels) * (len(labels) - 1) // 2
    num_impostors = num_pairs - len(genuine)
    if max_impostors is not None and max_impostors < num_impostors and num_pairs > ENUMERATE_PAIRS:
        impostors = _impostor_sample(labels, max_impostors, rng)
    else:
        first, second = np.triu_indices(len(labels), k=1)
        different = labels[first] != labels[second]
        impostors = np.stack([first[different], second[different]], 1)
        if max_impostors is not None and max_impostors < num_impostors:
            impostors = impostors[np.sort(rng.choice(num_impostors, size=max_impostors, replace=False))]
    pairs = np.concatenate([genuine, impostors]).astype(np.int64).reshape(-1, 2)
    is_genuine = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostors), bool)]
    order = rng.permutation(len(pairs))
    return pairs[order], is_genuine[order]


def pair_distances(normalized: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Squared L2 distance of each pair's L2-normalised rows: the .bin protocol's distance (cosine = 1 - d/2)."""
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        out[start:start + chunk] = np.sum(np.square(np.subtract(normalized[part[:, 0]], normalized[part[:, 1]])), 1)
    return out


def ten_fold(plain: np.ndarray, flipped: np.ndarray, pairs: np.ndarray, genuine: np.ndarray) -> tuple[dict, list[str]]:
    """The .bin protocol (eval/metrics.py) on these pairs in this order: Accuracy, Accuracy-Flip, VAL@FAR=1e-3;
    and warnings (a fold without genuine or impostor pairs)."""
    if len(pairs) < FOLDS:
        return {}, [f"only {len(pairs)} pairs: the {FOLDS}-fold accuracy needs at least {FOLDS}; not computed"]
    warnings = []
    for fold, (_, test) in enumerate(kfold_splits(len(pairs), FOLDS)):
        if not genuine[test].any() or genuine[test].all():
            warnings.append(f"10-fold: fold {fold + 1} has no {'genuine' if not genuine[test].any() else 'impostor'} "
                            f"pair: its threshold and accuracy mean little (add photos)")
    result = {"folds": FOLDS}
    for name, embeddings in (("", plain), ("_flip", plain + flipped)):
        dist = pair_distances(l2_normalize(embeddings), pairs)
        _, _, accuracy, thresholds = calculate_roc(dist, genuine, ROC_THRESHOLDS, FOLDS)
        result[f"accuracy{name}"] = float(np.mean(accuracy))
        result[f"accuracy{name}_std"] = float(np.std(accuracy))
        result[f"fold_thresholds{name}"] = [float(1 - t / 2) for t in thresholds]  # as cosine similarities
        if name:
            val, val_std, far = calculate_val(dist, genuine, VAL_THRESHOLDS, FAR_TARGET, FOLDS)
            result.update({"val_flip": val, "val_flip_std": val_std, "far_flip": far})
    return result, warnings


def verification(plain: np.ndarray, flipped: np.ndarray, labels: np.ndarray, max_impostors: int | None, seed: int,
                 flip: bool = True) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(1:1 report, pairs, genuine flags, cosine scores, warnings) of one model's embeddings."""
    pairs, genuine = make_pairs(labels, max_impostors, seed)
    warnings = []
    num_genuine = int(genuine.sum())
    if num_genuine < MIN_GENUINE_PAIRS:
        warnings.append(f"only {num_genuine} genuine pairs (fewer than {MIN_GENUINE_PAIRS}): each one moves TAR by "
                        f"{100 / max(num_genuine, 1):.1f} points; add photos per identity for numbers to trust")
    if num_genuine == 0 or num_genuine == len(pairs):
        raise IJBError(f"the folder gives {num_genuine} genuine and {len(pairs) - num_genuine} impostor pairs; "
                       f"1:1 needs both (two identities, one with two photos with a face)")
    features = plain + flipped if flip else plain
    scores = 1.0 - pair_distances(l2_normalize(features), pairs) / 2.0
    report = one_to_one(scores, genuine)
    folds, fold_warnings = ten_fold(plain, flipped, pairs, genuine)
    report["ten_fold"] = folds
    return report, pairs, genuine, scores, warnings + fold_warnings


def gallery_split(labels: np.ndarray, gallery_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gallery rows, probe rows): ``gallery_size`` seeded photos per identity; identities with no more photos
    than that are in the gallery only."""
    rng = np.random.default_rng(seed)
    gallery, probes = [], []
    for label in np.unique(labels):
        rows = np.nonzero(labels == label)[0]
        chosen = np.sort(rng.permutation(rows)[:gallery_size])
        gallery.extend(chosen.tolist())
        probes.extend(sorted(set(rows.tolist()) - set(chosen.tolist())))
    return np.array(gallery, np.int64), np.array(probes, np.int64)


def one_to_n(features: np.ndarray, labels: np.ndarray, gallery_size: int, seed: int,
             unknown: np.ndarray | None = None) -> tuple[dict, list[str]]:
    """Closed-set rank-1/rank-5 and CMC; with ``unknown`` embeddings (people not enrolled), the open-set
    DIR (detection and identification rate, TPIR) at each FPIR."""
    normalized = l2_normalize(features)
    gallery, probes = gallery_split(labels, gallery_size, seed)
    probe_labels = labels[probes]
    features_all, probe_rows = normalized, probes
    if unknown is not None and len(unknown):
        features_all = np.concatenate([normalized, l2_normalize(unknown)])
        probe_rows = np.r_[probes, len(normalized) + np.arange(len(unknown))]
        probe_labels = np.r_[probe_labels, np.full(len(unknown), -1)]  # -1: a subject no gallery holds
    if not len(probes):
        return {}, [f"1:N not computed: no identity has more than {gallery_size} photo(s) with a face, so there is "
                    f"no probe (lower --gallery or add photos)"]
    try:
        result = identification(features_all, np.arange(len(features_all)), gallery, labels[gallery], probe_rows,
                                probe_labels, FPIRS, source="1:N")
    except IJBError as exc:
        return {}, [f"1:N not computed: {exc}"]
    report = {"gallery_per_identity": gallery_size, "gallery_images": len(gallery),
              "identities": int(len(np.unique(labels))), "mated_probes": result.num_mated,
              "rank1": result.rank1, "rank5": result.rank5, "cmc": result.cmc}
    warnings = []
    if result.num_nonmated:
        report["unknown_probes"] = result.num_nonmated
        report["dir_at_fpir"] = [{"fpir": fpir, "dir": None if np.isnan(value) else value,
                                  "measurable": bool(fpir * result.num_nonmated >= 1)}
                                 for fpir, value in result.tpir.items()]
    return report, warnings
