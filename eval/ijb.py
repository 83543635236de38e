"""IJB-B / IJB-C evaluation: 1:1 verification (TAR@FAR) and 1:N identification (rank-k, TPIR@FPIR).

Layout (insightface's ``eval_ijbc.py`` layout; ``--image-path`` is the ``IJBC`` or ``IJBB`` folder)::

    IJBC/meta/ijbc_face_tid_mid.txt         "<image> <template_id> <media_id>" per face
    IJBC/meta/ijbc_name_5pts_score.txt      "<image> x1 y1 ... x5 y5 <faceness score>", same order
    IJBC/meta/ijbc_template_pair_label.txt  "<template1> <template2> <label 0|1>"
    IJBC/loose_crop/<image>
    IJBC/meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ..._probe_mixed.csv   (1:N only; CSV with a header
        holding TEMPLATE_ID and SUBJECT_ID; templates are the ones of ijbc_face_tid_mid.txt)

Standard protocol: every face is aligned with its 5 landmarks, embedded with its mirror image
(embeddings summed), multiplied by the faceness score, averaged per media inside a template,
summed over the template's media and L2-normalised; a pair's score is the cosine similarity.

    python -m eval.ijb --model model.pt --network r100 --image-path IJBC --target IJBC --result-dir out
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.embed import Progress, embed_images, gather_shards  # noqa: E402
from utils.face_align import as_landmarks, norm_crop  # noqa: E402
from utils.distributed import get_rank, get_world_size, shard_bounds  # noqa: E402

logger = logging.getLogger(__name__)

FAR_LABELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_LABELS = (1e-2, 1e-1)


class IJBError(ValueError):
    """Missing or inconsistent IJB files; the message names the file (and line) and is one line."""


# ----------------------------------------------------------------------------- reading the protocol

def meta_path(image_path: str, target: str, suffix: str) -> str:
    """Path of an IJB meta file (``<image_path>/meta/<target>_<suffix>``)."""
    return os.path.join(image_path, "meta", f"{target.lower()}_{suffix}")


def _read_rows(path: str, num_fields: int | None, what: str) -> list[tuple[int, list[str]]]:
    if not os.path.isfile(path):
        raise IJBError(f"{path}: {what} file not found")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            if num_fields is not None and len(fields) != num_fields:
                raise IJBError(f"{path} line {line_number}: expected {num_fields} fields ({what}), got {len(fields)}")
            rows.append((line_number, fields))
    if not rows:
        raise IJBError(f"{path}: empty {what} file")
    return rows


def _ints(path: str, line_number: int, values: list[str]) -> list[int]:
    try:
        return [int(value) for value in values]
    except ValueError:
        raise IJBError(f"{path} line {line_number}: expected integers, got {' '.join(values)}") from None


@dataclass
class FaceList:
    """One row per face image: name, template, media, landmarks [5, 2], faceness score."""

    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray


def read_faces(image_path: str, target: str) -> FaceList:
    """``*_face_tid_mid.txt`` and ``*_name_5pts_score.txt`` (same order, checked line by line)."""
    tid_path = meta_path(image_path, target, "face_tid_mid.txt")
    landmark_path = meta_path(image_path, target, "name_5pts_score.txt")
    tid_rows = _read_rows(tid_path, 3, "image template_id media_id")
    landmark_rows = _read_rows(landmark_path, None, "image x1 y1 ... x5 y5 score")
    if len(tid_rows) != len(landmark_rows):
        raise IJBError(f"{landmark_path}: {len(landmark_rows)} faces but {tid_path} lists {len(tid_rows)}")
    names, templates, medias, landmarks, scores = [], [], [], [], []
    for (tid_line, tid_fields), (lm_line, lm_fields) in zip(tid_rows, landmark_rows):
        if len(lm_fields) != 12:
            raise IJBError(f"{landmark_path} line {lm_line}: expected an image name, 10 landmark values and a "
                           f"score, got {len(lm_fields) - 1} values")
        if lm_fields[0] != tid_fields[0]:
            raise IJBError(f"{landmark_path} line {lm_line}: image {lm_fields[0]} but {tid_path} line {tid_line} "
                           f"has {tid_fields[0]} (the files must list faces in the same order)")
        template, media = _ints(tid_path, tid_line, tid_fields[1:])
        try:
            values = [float(value) for value in lm_fields[1:]]
        except ValueError:
            raise IJBError(f"{landmark_path} line {lm_line}: landmarks and score must be numbers") from None
        names.append(tid_fields[0])
        templates.append(template)
        medias.append(media)
        landmarks.append(as_landmarks(values[:10], f"{landmark_path} line {lm_line}"))
        scores.append(values[10])
    return FaceList(names, np.array(templates, dtype=np.int64), np.array(medias, dtype=np.int64),
                    np.array(landmarks, dtype=np.float32), np.array(scores, dtype=np.float32))


def read_pairs(image_path: str, target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template1, template2, label) arrays of ``*_template_pair_label.txt``."""
    path = meta_path(image_path, target, "template_pair_label.txt")
    rows = _read_rows(path, 3, "template1 template2 label")
    values = np.array([_ints(path, line, fields) for line, fields in rows], dtype=np.int64)
    bad = np.nonzero((values[:, 2] != 0) & (values[:, 2] != 1))[0]
    if len(bad):
        raise IJBError(f"{path} line {rows[bad[0]][0]}: label must be 0 or 1, got {values[bad[0], 2]}")
    return values[:, 0], values[:, 1], values[:, 2]


def read_identification_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids), one per template, from an IJB 1:N CSV (TEMPLATE_ID, SUBJECT_ID columns)."""
    if not os.path.isfile(path):
        raise IJBError(f"{path}: 1:N protocol file not found")
    templates: dict[int, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"TEMPLATE_ID", "SUBJECT_ID"} - set(reader.fieldnames or [])
        if missing:
            raise IJBError(f"{path}: header lacks column(s) {', '.join(sorted(missing))}")
        for line_number, row in enumerate(reader, 2):
            template, subject = _ints(path, line_number, [row["TEMPLATE_ID"], row["SUBJECT_ID"]])
            if templates.setdefault(template, subject) != subject:
                raise IJBError(f"{path} line {line_number}: template {template} has subjects "
                               f"{templates[template]} and {subject}")
    if not templates:
        raise IJBError(f"{path}: no templates")
    ids = np.array(sorted(templates), dtype=np.int64)
    return ids, np.array([templates[t] for t in ids], dtype=np.int64)


# ----------------------------------------------------------------------------- embedding

def align_faces(image_path: str, faces: FaceList, indices, image_size: int = 112) -> torch.Tensor:
    """Aligned RGB uint8 [len(indices), 3, S, S] crops of ``loose_crop/<name>``."""
    import cv2

    crops = torch.empty((len(indices), 3, image_size, image_size), dtype=torch.uint8)
    for position, index in enumerate(indices):
        path = os.path.join(image_path, "loose_crop", faces.names[index])
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            kind = "image not found" if not os.path.isfile(path) else "not a readable image"
            raise IJBError(f"{path}: {kind} (face {index + 1} of the landmark list)")
        aligned = cv2.cvtColor(norm_crop(image, faces.landmarks[index], image_size), cv2.COLOR_BGR2RGB)
        crops[position] = torch.from_numpy(np.ascontiguousarray(aligned.transpose(2, 0, 1)))
    return crops


def alignment_size(model) -> int:
    """Crop size for ``model``: its input size when the ArcFace template scales to it (square, a multiple of
    112 or 128), else 112 and embed_images resizes the crops (e.g. 160 for inception_resnet_v1, one log line)."""
    from backbones.common import input_spec

    height, width = input_spec(model).image_size
    return height if height == width and (height % 112 == 0 or height % 128 == 0) else 112


@torch.no_grad()
def embed_faces(model, image_path: str, faces: FaceList, device: torch.device, batch_size: int = 128,
                chunk: int = 4096, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, flipped-image embeddings) float64 [N, D]; sharded over ranks, gathered on all."""
    rank, world_size = get_rank(), get_world_size()
    start, end = shard_bounds(len(faces.names), world_size)[rank]
    progress = Progress(end - start, "IJB faces", show_progress and rank == 0)
    size = alignment_size(model)
    plain, flipped = [], []
    for chunk_start in range(start, end, chunk):  # bounded memory: align a chunk, embed it, drop the pixels
        crops = align_faces(image_path, faces, range(chunk_start, min(chunk_start + chunk, end)), size)
        embeddings, mirrored = embed_images(model, crops, device, batch_size, True, progress)
        plain.append(embeddings)
        flipped.append(mirrored)
    local_plain, local_flipped = torch.cat(plain), torch.cat(flipped)
    return (gather_shards(local_plain, len(faces.names), device).double().numpy(),
            gather_shards(local_flipped, len(faces.names), device).double().numpy())


# ----------------------------------------------------------------------------- aggregation and scoring

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
    """Per-face features: image (+ flip), unit length unless the norm is the quality, times the detector score when
    asked.
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
    """TAR at each FAR from sklearn's ROC, picking the ROC point nearest each FAR (largest TAR on ties),
    as insightface's table does."""
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
    return IdentificationResult(rank1, rank5, tpir, int(mated.sum()), int((~mated).sum()))


# ----------------------------------------------------------------------------- driver and CLI

def evaluate_ijb(model, image_path: str, target: str, device: torch.device, protocol: Protocol,
                 batch_size: int = 128, result_dir: str | None = None, name: str = "model",
                 identify: bool = False, plot: bool = False, show_progress: bool = False,
                 pair_chunk: int = 8192) -> dict:
    """Run the whole 1:1 (and optionally 1:N) evaluation; collective under torch.distributed."""
    rank = get_rank()
    faces = read_faces(image_path, target)
    template1, template2, labels = read_pairs(image_path, target)
    pair_source = meta_path(image_path, target, "template_pair_label.txt")
    known = np.unique(faces.templates)
    template_rows(known, template1, pair_source)
    template_rows(known, template2, pair_source)
    start = time.perf_counter()
    embeddings, flipped = embed_faces(model, image_path, faces, device, batch_size, show_progress=show_progress)
    embed_seconds = time.perf_counter() - start
    features = face_features(embeddings, flipped, faces.scores, protocol)
    template_feats, unique_templates = template_features(features, faces.templates, faces.medias)
    start = time.perf_counter()
    scores = pair_scores(template_feats, unique_templates, template1, template2, pair_chunk, pair_source)
    score_seconds = time.perf_counter() - start
    tar = tar_at_far(labels, scores)
    report = {"target": target, "protocol": protocol.describe(), "faces": len(faces.names),
              "templates": len(unique_templates), "pairs": len(labels), "tar_at_far": tar,
              "embed_seconds": embed_seconds, "score_seconds": score_seconds}
    if identify:
        gallery_g1 = read_identification_csv(meta_path(image_path, target, "1N_gallery_G1.csv"))
        gallery_g2 = read_identification_csv(meta_path(image_path, target, "1N_gallery_G2.csv"))
        probes = read_identification_csv(meta_path(image_path, target, "1N_probe_mixed.csv"))
        report["identification"] = {}
        for gallery_name, (gallery_templates, gallery_subjects) in (("G1", gallery_g1), ("G2", gallery_g2)):
            result = identification(template_feats, unique_templates, gallery_templates, gallery_subjects,
                                    probes[0], probes[1], source=f"{target} 1:N {gallery_name}")
            report["identification"][gallery_name] = result
    if rank == 0 and result_dir:
        os.makedirs(result_dir, exist_ok=True)
        np.save(os.path.join(result_dir, f"{target.lower()}_scores.npy"), scores)
        np.save(os.path.join(result_dir, f"{target.lower()}_labels.npy"), labels)
        with open(os.path.join(result_dir, f"{target.lower()}_result.json"), "w") as handle:
            json.dump(_jsonable(report), handle, indent=2)
        if plot:
            _plot_roc(labels, scores, name, os.path.join(result_dir, f"{target.lower()}_roc.png"))
    return report


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, IdentificationResult):
        return _jsonable(value.__dict__)
    return value


def _plot_roc(labels: np.ndarray, scores: np.ndarray, name: str, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping the ROC plot %s", path)
        return
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    figure = plt.figure()
    plt.plot(fpr, tpr, label=name)
    plt.xscale("log")
    plt.xlim(1e-6, 1)
    plt.xlabel("False Positive Rate")
    plt.ylabel("True Positive Rate")
    plt.grid(linestyle="--", linewidth=1)
    plt.legend(loc="lower right")
    figure.savefig(path)
    plt.close(figure)


def format_report(report: dict, name: str) -> str:
    """The printed IJB report (TAR@FAR table and, when run, 1:N figures)."""
    fars = list(report["tar_at_far"])
    lines = [f"{report['target']}: {report['faces']} faces, {report['templates']} templates, {report['pairs']} pairs; "
             f"protocol: {report['protocol']}",
             "| Methods | " + " | ".join(f"{far:.0e}" for far in fars) + " |",
             "|" + "---|" * (len(fars) + 1),
             f"| {name} | " + " | ".join(f"{100 * report['tar_at_far'][far]:.2f}" for far in fars) + " |"]
    for gallery, result in report.get("identification", {}).items():
        tpir = ", ".join(f"TPIR@FPIR={fpir:g}: {100 * value:.2f}" for fpir, value in result.tpir.items())
        lines.append(f"1:N {gallery}: rank-1 {100 * result.rank1:.2f}, rank-5 {100 * result.rank5:.2f}, {tpir} "
                     f"({result.num_mated} mated / {result.num_nonmated} non-mated probes)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m eval.ijb``: evaluate a model on IJB-B/C; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m eval.ijb", description="IJB-B / IJB-C 1:1 and 1:N evaluation.")
    parser.add_argument("--model", "--model-prefix", dest="model", required=True,
                        help="model.pt, a training checkpoint, or an .onnx file")
    parser.add_argument("--network", default=None,
                        help="backbone name; default: read from the file (not needed for .onnx)")
    parser.add_argument("--embedding-size", type=int, default=None, help="default: read from the file")
    parser.add_argument("--image-path", required=True, help="the IJBC (or IJBB) folder holding meta/ and loose_crop/")
    parser.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    parser.add_argument("--result-dir", default="ijb_results", help="where scores .npy / result .json go")
    parser.add_argument("--job", default="model", help="row name in the table")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-flip", action="store_true", help="do not add the mirror image's embedding")
    parser.add_argument("--no-norm-score", action="store_true", help="L2-normalise each face (norm not a quality)")
    parser.add_argument("--no-detector-score", action="store_true", help="ignore the faceness scores")
    parser.add_argument("--identification", action="store_true", help="also run 1:N with the G1/G2/probe CSVs")
    parser.add_argument("--plot", action="store_true", help="save a ROC plot (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from eval.verification import load_model
    from utils import device as devices
    protocol = Protocol(not args.no_flip, not args.no_norm_score, not args.no_detector_score)
    try:
        ctx = devices.setup(args.device)
        if ctx.is_main:
            print(f"protocol: {protocol.describe()}", flush=True)
        model = load_model(args.model, args.network, ctx.device, args.embedding_size)
        report = evaluate_ijb(model, args.image_path, args.target, ctx.device, protocol, args.batch_size,
                              args.result_dir, args.job, args.identification, args.plot, not args.no_progress)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ctx.is_main:
        print(format_report(report, args.job))
        print(f"scores: {os.path.join(args.result_dir, args.target.lower() + '_scores.npy')}")
    devices.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
