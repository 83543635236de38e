"""How well does a model work on *your* people, and at which threshold? Evaluation on identity folders.

    python -m eval.folders ROOT --model model.pt --out DIR                   # raw photos: detected, aligned
    python -m eval.folders ROOT --model model.pt --out DIR --crops           # ready aligned crops
    python -m eval.folders ROOT --model a.pt --model b.onnx --out DIR --unknown STRANGERS --max-impostors 1000000

ROOT holds ``<identity>/<photo>``. Each photo's largest face is found by MTCNN and prepared by the model's
convention (5-point alignment for 112-px ArcFace-style models, facenet's box crop plus ``--margin`` for
160-px InceptionResnetV1: utils/faces/prepare.py); ``--crops`` takes the files as crops. Embeddings (face and
mirror image) are cached per (photo content, model file, preparation) in DIR/cache (``--cache-dir``), so a
second run costs no detection and no embedding.

1:1: every genuine pair and every (or ``--max-impostors`` seeded) impostor pair, scored by the cosine of the
flip-summed embeddings: TAR at FAR 1e-1..1e-6 with the FAR reached and the threshold, EER, AUC, best accuracy and
its threshold, and the .bin protocol's 10-fold accuracy on the same pairs (DIR/pairs.csv holds them in order:
``tools/make_bin.py DIR/pairs.csv ROOT x.bin`` on crops gives a .bin eval.verification scores the same).
1:N: ``--gallery`` photos per identity enrolled, the rest probe; rank-1/rank-5, CMC, and with ``--unknown``
(people not enrolled, ``<identity>/<photo>``) the open-set DIR at each FPIR.
DIR gets report.json (every number), report.md (the tables), faceless.txt (photos without a usable face,
with the reason) and, with matplotlib installed, the pictures.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.folder_faces import EmbeddingCache, FacePreparer, FolderError, embed_photos, file_sha256, scan  # noqa: E402
from eval.folder_protocol import one_to_n, verification  # noqa: E402
from eval.folder_report import format_markdown, write_text_atomic  # noqa: E402

logger = logging.getLogger(__name__)

FACELESS, PAIRS, REPORT_JSON, REPORT_MD = "faceless.txt", "pairs.csv", "report.json", "report.md"


def model_labels(paths: list[str]) -> list[str]:
    """Short unique names of the models (file names; a clash gets the index)."""
    names = [os.path.basename(path) for path in paths]
    return [name if names.count(name) == 1 else f"{index}:{name}" for index, name in enumerate(names)]


def evaluate_model(model: Any, model_path: str, root: str, photos, unknown_photos, args, preparer: FacePreparer,
                   device) -> tuple[dict, dict]:
    """(report of one model, curve data for the pictures)."""
    from backbones.common import input_spec

    image_size = tuple(input_spec(model).image_size)
    convention = preparer.convention(image_size)
    model_sha = file_sha256(model_path)
    cache = EmbeddingCache(args.cache_dir, model_sha, convention)
    known = embed_photos(model, root, photos, preparer, cache, image_size, device, args.batch_size)
    report: dict[str, Any] = {"path": os.path.abspath(model_path), "sha256": model_sha, "face_preparation": convention,
                              "embedded_now": known.embedded_now, "from_cache": known.from_cache,
                              "photos_with_face": len(known.rows), "warnings": []}
    failed = dict(known.failed)
    unknown = None
    if unknown_photos:
        strangers = embed_photos(model, args.unknown, unknown_photos, preparer, cache, image_size, device,
                                 args.batch_size)
        report["embedded_now"] += strangers.embedded_now
        report["from_cache"] += strangers.from_cache
        failed.update({os.path.join("<unknown>", path): why for path, why in strangers.failed.items()})
        if strangers.plain is not None:
            unknown = strangers.plain + strangers.flipped if args.flip else strangers.plain
    usable = [photo for photo in photos if photo.relative in known.rows]
    if known.plain is None:
        raise FolderError(f"{root}: no photo with a usable face for {os.path.basename(model_path)} (see {FACELESS})")
    identities = sorted({photo.identity for photo in usable})
    labels = np.array([identities.index(photo.identity) for photo in usable])
    one, pairs, genuine, scores, warnings = verification(known.plain, known.flipped, labels, args.max_impostors,
                                                         args.seed, args.flip)
    report["one_to_one"] = one
    features = known.plain + known.flipped if args.flip else known.plain
    report["one_to_n"], n_warnings = one_to_n(features, labels, args.gallery, args.seed, unknown)
    report["warnings"] = warnings + n_warnings
    curves = {"scores": scores, "genuine": genuine, "cmc": report["one_to_n"].get("cmc", []),
              "pairs": [(usable[i].relative, usable[j].relative) for i, j in pairs], "failed": failed}
    return report, curves


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN): a figure that could not be
    measured (a fold without genuine pairs) reads null, never a made-up number."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def write_pairs(path: str, pairs: list[tuple[str, str]], genuine: np.ndarray) -> None:
    """The pair list in evaluation order, as tools/make_bin.py's csv (path1,path2,same; relative to ROOT)."""
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path1", "path2", "same"])
        writer.writerows((first, second, int(same)) for (first, second), same in zip(pairs, genuine))
    os.replace(path + ".tmp", path)


def folder_warnings(photos, loose: list[str], failed: dict[str, str], root: str, faceless_path: str) -> list[str]:
    """Warnings about the folder itself: identities with one photo, photos without a face, loose files."""
    warnings = []
    counts: dict[str, int] = {}
    for photo in photos:
        if photo.relative not in failed:
            counts[photo.identity] = counts.get(photo.identity, 0) + 1
    single = sorted(name for name in {photo.identity for photo in photos} if counts.get(name, 0) <= 1)
    if single:
        shown = ", ".join(single[:5]) + (f", ... {len(single) - 5} more" if len(single) > 5 else "")
        warnings.append(f"{len(single)} identit{'y has' if len(single) == 1 else 'ies have'} at most one photo with a "
                        f"face ({shown}): no genuine pair, impostor pairs and gallery only")
    if failed:
        kinds = {why: sum(1 for value in failed.values() if value == why) for why in sorted(set(failed.values()))}
        warnings.append(f"{len(failed)} photo(s) without a usable face ("
                        + ", ".join(f"{count} {why}" for why, count in kinds.items()) + f"): listed in {faceless_path}")
    if loose:
        warnings.append(f"{len(loose)} file(s) directly in {root} belong to no identity and are not used "
                        f"({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}): move them into a folder")
    return warnings


def run(args: argparse.Namespace) -> dict:
    """Evaluate every model on the folder and write DIR; returns the report."""
    from eval.model_info import load_model
    from utils.config.paths import ensure_output_dir
    from utils.devices import device as devices

    out = ensure_output_dir(args.out, "--out")
    args.cache_dir = args.cache_dir or os.path.join(out, "cache")
    photos, loose = scan(args.root)
    unknown_photos = scan(args.unknown, "--unknown")[0] if args.unknown else []
    device = devices.setup(args.device).device
    preparer = FacePreparer(args.crops, args.margin, args.min_face_size)
    report: dict[str, Any] = {"root": os.path.abspath(args.root), "photos": len(photos),
                              "identities": len({photo.identity for photo in photos}),
                              "settings": {"crops": args.crops, "margin": args.margin, "flip": args.flip,
                                           "max_impostors": args.max_impostors, "seed": args.seed,
                                           "gallery": args.gallery, "unknown": args.unknown},
                              "models": {}, "warnings": []}
    curves = {}
    failed: dict[str, str] = {}
    for path, label in zip(args.model, model_labels(args.model)):
        loaded = load_model(path, args.network, device, args.embedding_size)
        loaded.announce(label)
        report["models"][label], curves[label] = evaluate_model(loaded.model, loaded.path, args.root, photos,
                                                                unknown_photos, args, preparer, device)
        report["models"][label].update(model=loaded.line, weights_warnings=loaded.warnings)
        failed.update(curves[label]["failed"])
    first = curves[next(iter(curves))]
    write_pairs(os.path.join(out, PAIRS), first["pairs"], first["genuine"])
    faceless_path = os.path.join(out, FACELESS)
    write_text_atomic(faceless_path, "".join(f"{path}\t{why}\n" for path, why in sorted(failed.items())))
    report["faceless"] = len(failed)
    report["warnings"] = folder_warnings(photos, loose, failed, args.root, faceless_path)
    report["pictures"] = draw_pictures(out, report, curves) if args.plot else []
    report = finite(report)
    with open(os.path.join(out, REPORT_JSON + ".tmp"), "w") as handle:
        json.dump(report, handle, indent=2, allow_nan=False)
    os.replace(os.path.join(out, REPORT_JSON + ".tmp"), os.path.join(out, REPORT_JSON))
    write_text_atomic(os.path.join(out, REPORT_MD), format_markdown(report))
    return report


def draw_pictures(out: str, report: dict, curves: dict) -> list[str]:
    """roc.png (a curve per model), scores_<model>.png (histograms, thresholds marked), cmc.png: the file
    names written in ``out`` (none, with a one-line hint, when matplotlib is missing)."""
    from eval.plots import marked_thresholds, plot_cmc, plot_histograms, plot_roc, pyplot
    from eval.roc import roc_curve

    if pyplot() is None:
        return []
    rocs = {label: roc_curve(data["scores"], data["genuine"]) for label, data in curves.items()}
    written = [plot_roc(os.path.join(out, "roc.png"), {label: (roc.far, roc.tar) for label, roc in rocs.items()},
                        f"ROC on {os.path.basename(os.path.normpath(report['root']))}")]
    for index, (label, data) in enumerate(curves.items()):
        name = "scores.png" if len(curves) == 1 else f"scores_{index}.png"
        written.append(plot_histograms(os.path.join(out, name), data["scores"], data["genuine"],
                                       marked_thresholds(report["models"][label]["one_to_one"]), f"scores: {label}"))
    cmcs = {label: data["cmc"] for label, data in curves.items() if data["cmc"]}
    if cmcs:
        written.append(plot_cmc(os.path.join(out, "cmc.png"), cmcs, "CMC (closed-set identification)"))
    return [os.path.basename(path) for path in written if path]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.folders``."""
    parser = argparse.ArgumentParser(prog="python -m eval.folders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="ROOT/<identity>/<photo>")
    parser.add_argument("--model", action="append", required=True,
                        help="model.pt, a training checkpoint, an .onnx file or a released name (facenet:vggface2); "
                             "repeat to compare models")
    parser.add_argument("--out", required=True, help="output folder (report.json, report.md, faceless.txt, ...)")
    parser.add_argument("--network", default=None, help="backbone name; default: read from the file")
    parser.add_argument("--embedding-size", type=int, default=None, help="default: read from the file")
    parser.add_argument("--crops", action="store_true", help="the photos are aligned crops: no detection")
    parser.add_argument("--margin", type=int, default=0, help="facenet (160-px) crops: margin in output pixels")
    parser.add_argument("--min-face-size", type=float, default=20, help="smallest face MTCNN looks for, pixels")
    parser.add_argument("--max-impostors", type=int, default=None,
                        help="score a seeded sample of this many impostor pairs (default: all of them)")
    parser.add_argument("--gallery", type=int, default=1, help="1:N: photos enrolled per identity (default 1)")
    parser.add_argument("--unknown", default=None, help="1:N open set: folder of people not enrolled, <identity>/<photo>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the impostor sample, pair order and gallery")
    parser.add_argument("--no-flip", dest="flip", action="store_false",
                        help="score the faces alone (default: face + mirror image embeddings summed)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write no pictures")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/cache)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | npu (one process)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Options that cannot work, refused before any photo is read."""
    if args.max_impostors is not None and args.max_impostors < 1:
        raise FolderError(f"--max-impostors {args.max_impostors}: expected a positive number of pairs")
    if args.gallery < 1:
        raise FolderError(f"--gallery {args.gallery}: expected at least 1 photo per identity")
    if args.batch_size < 1:
        raise FolderError(f"--batch-size {args.batch_size}: expected a positive number")
    if not 0 <= args.margin:
        raise FolderError(f"--margin {args.margin}: expected a non-negative number of pixels")
    if args.unknown and not os.path.isdir(args.unknown):
        raise FolderError(f"--unknown {args.unknown}: no such folder")


def main(argv: list[str] | None = None) -> int:
    """Evaluate and print where the report went; returns the exit code (2 with one ``error:`` line)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_args(args)
        report = run(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from utils.devices import device as devices
        devices.teardown()
    for warning in report["warnings"] + [f"{label}: {text}" for label, model in report["models"].items()
                                         for text in model["warnings"]]:
        print(f"warning: {warning}", file=sys.stderr)
    with open(os.path.join(args.out, REPORT_MD)) as handle:
        print(handle.read(), end="")
    print(f"report: {os.path.join(args.out, REPORT_JSON)}, {os.path.join(args.out, REPORT_MD)}; "
          f"photos without a usable face: {report['faceless']} ({os.path.join(args.out, FACELESS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
