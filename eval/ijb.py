"""IJB-B / IJB-C evaluation driver and CLI: embed every face, score the protocol, write and print the report.

The protocol files are read by ``eval.ijb_meta`` and scored by ``eval.ijb_scores`` (their names are
re-exported here); ``--image-path`` is the ``IJBC`` or ``IJBB`` folder holding ``meta/`` and ``loose_crop/``.

    python -m eval.ijb --model model.pt --network r100 --image-path IJBC --target IJBC --result-dir out
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.embed import Progress, embed_images, gather_shards  # noqa: E402
from eval.ijb_meta import (FaceList, IJBError, meta_path, read_faces, read_identification_csv,  # noqa: E402
                           read_pairs)
from eval.ijb_scores import (FAR_LABELS, FPIR_LABELS, IdentificationResult, Protocol, face_features,  # noqa: E402
                             identification, pair_scores, tar_at_far, template_features, template_rows)
from utils.devices.distributed import get_rank, get_world_size, shard_bounds  # noqa: E402
from utils.faces.align import norm_crop  # noqa: E402

__all__ = ["FAR_LABELS", "FPIR_LABELS", "FaceList", "IJBError", "IdentificationResult", "Protocol", "align_faces",
           "alignment_size", "embed_faces", "evaluate_ijb", "face_features", "format_report", "identification",
           "main", "meta_path", "pair_scores", "read_faces", "read_identification_csv", "read_pairs", "tar_at_far",
           "template_features", "template_rows"]

logger = logging.getLogger(__name__)

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
    """Crop size for ``model``: its input size when the ArcFace template scales to it, else 112.

    The template scales to square sizes that are multiples of 112 or 128; otherwise embed_images resizes the
    112 crops (e.g. 160 for inception_resnet_v1, one log line).
    """
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
            from eval.plots import pair_pictures
            pair_pictures(result_dir, target.lower(), scores, np.asarray(labels).astype(bool), name)
    return report


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, IdentificationResult):
        return _jsonable(value.__dict__)
    return value


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
                        help="model.pt, a training checkpoint, an .onnx file, or a released name (facenet:vggface2)")
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
    parser.add_argument("--plot", action="store_true",
                        help="save <target>_roc.png and <target>_scores.png in --result-dir (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from eval.model_info import load_model
    from utils.devices import device as devices
    protocol = Protocol(not args.no_flip, not args.no_norm_score, not args.no_detector_score)
    try:
        ctx = devices.setup(args.device)
        if ctx.is_main:
            print(f"protocol: {protocol.describe()}", flush=True)
        loaded = load_model(args.model, args.network, ctx.device, args.embedding_size)
        if ctx.is_main:
            loaded.announce()
        report = evaluate_ijb(loaded.model, args.image_path, args.target, ctx.device, protocol, args.batch_size,
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
