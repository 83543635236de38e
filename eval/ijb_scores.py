"""IJB scoring: per-face features, template aggregation, 1:1 TAR@FAR and 1:N rank-k / TPIR@FPIR.

Standard protocol: every face is aligned with its 5 landmarks, embedded with its mirror image
(embeddings summed), multiplied by the faceness score, averaged per media inside a template,
summed over the template's media and L2-normalised; a pair's score is the cosine similarity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eval.ijb_meta import IJBError

FAR_LABELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_LABELS = (1e-2, 1e-1)


# ----------------------------------------------------------------------------- aggregation and 1:1 scoring

@dataclass
class Protocol:
    """The three switches of insightface's IJB evaluation (all on = the published numbers)."""

    flip: bool = True            # add the mirror image's embedding
    norm_score: bool = True      # keep the embedding norm as a quality weight (off: L2-normalise each face)
    detector_score: bool = True  # multiply by the faceness score

    def describe(self) -> str:
        """The protocol switches, as one line for the report."""
        return (f"flip={'on' if self.flip else 'off'}, norm-as-quality={'on' if self.norm_score else 'off'}, "
                f"detector-score={'on' if self.detector_score else 'off'}")


def face_features(embeddings: np.ndarray, flipped: np.ndarray, scores: np.ndarray, protocol: Protocol) -> np.ndarray:
    """Per-face features: image (+ flip), unit length unless the norm is the quality, times the faceness score.

    Each step follows ``protocol``'s switch of the same name.
    """
    features = embeddings + flipped if protocol.flip else embeddings.copy()
    if not protocol.norm_score:
        features = features / np.sqrt(np.sum(features ** 2, -1, keepdims=True))
    if protocol.detector_score:
        features = features * scores.astype(np.float32)[:, np.newaxis]
    return features


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised template features, sorted unique template ids): media means summed per template."""
    unique_templates, template_index = np.unique(templates, return_inverse=True)
    # mean over the faces of each (template, media), then the sum of those means per template
    keys = np.stack([template_index, medias], 1)
    unique_keys, key_index, key_counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    key_index = key_index.reshape(-1)
    media_sums = np.zeros((len(unique_keys), features.shape[1]))
    np.add.at(media_sums, key_index, features)
    media_means = media_sums / key_counts[:, None]
    template_sums = np.zeros((len(unique_templates), features.shape[1]))
    np.add.at(template_sums, unique_keys[:, 0], media_means)
    norms = np.sqrt(np.einsum("ij,ij->i", template_sums, template_sums))
    norms[norms == 0] = 1.0
    return template_sums / norms[:, None], unique_templates


def template_rows(unique_templates: np.ndarray, wanted: np.ndarray, source: str) -> np.ndarray:
    """Row of each ``wanted`` template in ``unique_templates``; an unknown id is an error naming ``source``."""
    rows = np.searchsorted(unique_templates, wanted)
    rows = np.minimum(rows, len(unique_templates) - 1)
    unknown = np.nonzero(unique_templates[rows] != wanted)[0]
    if len(unknown):
        raise IJBError(f"{source}: template {wanted[unknown[0]]} (entry {unknown[0] + 1}) has no faces in the "
                       "face_tid_mid list")
    return rows


def pair_scores(template_feats: np.ndarray, unique_templates: np.ndarray, template1: np.ndarray,
                template2: np.ndarray, chunk_size: int = 8192, source: str = "pairs") -> np.ndarray:
    """Cosine score per pair, computed ``chunk_size`` pairs at a time (memory ~ 2 x chunk x D floats)."""
    rows1 = template_rows(unique_templates, np.asarray(template1), source)
    rows2 = template_rows(unique_templates, np.asarray(template2), source)
    scores = np.empty(len(rows1))
    for start in range(0, len(rows1), chunk_size):
        end = start + chunk_size
        scores[start:end] = np.einsum("ij,ij->i", template_feats[rows1[start:end]], template_feats[rows2[start:end]])
    return scores


def tar_at_far(labels: np.ndarray, scores: np.ndarray, far_labels=FAR_LABELS) -> dict[float, float]:
    """TAR at each FAR: the ROC point nearest each FAR (largest TAR on ties), as insightface's table does."""
    from sklearn.metrics import roc_curve

    if labels.min() == labels.max():
        raise IJBError("the pair list needs both genuine (1) and impostor (0) pairs")
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {far: float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in far_labels}


# ----------------------------------------------------------------------------- 1:N identification

@dataclass
class IdentificationResult:
    """1:N figures: rank-1/rank-5 hit rates and TPIR at each FPIR."""

    rank1: float
    rank5: float
    tpir: dict[float, float]
    num_mated: int
    num_nonmated: int
    cmc: list[float] = field(default_factory=list)  # hit rate at rank 1, 2, ... (up to 20 or the subjects)


def identification(template_feats: np.ndarray, unique_templates: np.ndarray, gallery_templates: np.ndarray,
                   gallery_subjects: np.ndarray, probe_templates: np.ndarray, probe_subjects: np.ndarray,
                   fpir_labels=FPIR_LABELS, chunk_size: int = 4096, source: str = "1:N") -> IdentificationResult:
    """Closed-set rank-1/5 over mated probes; open-set TPIR at each FPIR.

    A subject's score is its best gallery template's cosine. Rank = 1 + #subjects scoring strictly
    higher than the true one. At FPIR f the threshold t is the (floor(f * N_nonmated) + 1)-th largest
    top-1 score of the non-mated probes, so at most f * N of them score > t; TPIR is the fraction of
    mated probes ranked first with a score > t.
    """
    gallery = template_feats[template_rows(unique_templates, gallery_templates, f"{source} gallery")]
    probes = template_feats[template_rows(unique_templates, probe_templates, f"{source} probes")]
    subjects, subject_index = np.unique(gallery_subjects, return_inverse=True)
    mated = np.isin(probe_subjects, subjects)
    true_column = np.searchsorted(subjects, probe_subjects)
    ranks, top_scores, true_scores = [], [], []
    for start in range(0, len(probes), chunk_size):
        scores = probes[start:start + chunk_size] @ gallery.T
        per_subject = np.full((scores.shape[0], len(subjects)), -np.inf)
        np.maximum.at(per_subject.T, subject_index, scores.T)
        columns = np.minimum(true_column[start:start + chunk_size], len(subjects) - 1)
        true = per_subject[np.arange(len(columns)), columns]
        ranks.append(1 + np.sum(per_subject > true[:, None], 1))
        top_scores.append(per_subject.max(1))
        true_scores.append(true)
    ranks, top_scores, true_scores = np.concatenate(ranks), np.concatenate(top_scores), np.concatenate(true_scores)
    if not mated.any():
        raise IJBError(f"{source}: no probe subject appears in the gallery")
    mated_ranks = ranks[mated]
    rank1, rank5 = float(np.mean(mated_ranks <= 1)), float(np.mean(mated_ranks <= 5))
    nonmated_top = np.sort(top_scores[~mated])[::-1]
    tpir = {}
    for fpir in fpir_labels:
        allowed = int(np.floor(fpir * len(nonmated_top)))
        if len(nonmated_top) == 0 or allowed >= len(nonmated_top):
            tpir[fpir] = float("nan")
            continue
        threshold = nonmated_top[allowed]
        hits = (mated_ranks <= 1) & (true_scores[mated] > threshold)
        tpir[fpir] = float(np.mean(hits))
    cmc = [float(np.mean(mated_ranks <= rank)) for rank in range(1, min(20, len(subjects)) + 1)]
    return IdentificationResult(rank1, rank5, tpir, int(mated.sum()), int((~mated).sum()), cmc)
