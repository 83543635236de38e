"""Released weights by name, and what any weights file is.

    python tools/weights.py list                   # every registered name: network, file, where, accuracy, cached?
    python tools/weights.py fetch facenet:vggface2 # into the cache ($ARCSCALE_CACHE, default ~/.cache/arcscale)
    python tools/weights.py info facenet:vggface2  # the registry's entry and its cache path
    python tools/weights.py info model.pt          # network, embedding size, input size, classifier, trained?

The names work wherever weights are given: ``init_backbone="facenet:vggface2"`` in a config, ``--model
facenet:vggface2`` in tools/inference.py, eval.verification and eval.ijb, the checkpoint of
tools/torch2onnx.py. insightface's model zoo cannot be fetched by a script: ``info NAME`` prints the page and
the exact path to place the file at. docs/weights.md lists them all with their published accuracy.
Exit status: 0, or 2 with one ``error:`` line.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.run.checkpoint import CheckpointError  # noqa: E402
from utils.weights import fetch as fetching  # noqa: E402
from utils.weights.registry import REGISTRY, Released, lookup  # noqa: E402


def list_lines() -> list[str]:
    """One line per registered name."""
    lines = []
    for entry in REGISTRY.values():
        where = "download" if entry.downloadable else "by hand"
        cached = "cached" if os.path.isfile(fetching.cached_path(entry)) else "not cached"
        lines.append(f"{entry.name:28} {entry.network:21} {entry.file_name:33} {where:8} {cached:10} {entry.accuracy}")
    return lines


def entry_lines(entry: Released) -> list[str]:
    """The registry's entry for one name, with its cache path."""
    path = fetching.cached_path(entry)
    state = "cached" if os.path.isfile(path) else "not cached"
    return [f"{entry.name}: network '{entry.network}', embedding size {entry.embedding_size}",
            f"  input: {entry.input}", f"  classes: {entry.classes}", f"  licence: {entry.licence}",
            f"  published: {entry.url or entry.page}", f"  accuracy: {entry.accuracy}",
            f"  sha256: {entry.sha256 or 'not published (recorded beside the file at its first download)'}",
            f"  file: {path} ({state})"]


def file_lines(path: str) -> list[str]:
    """What a weights file is: network, embedding size, input size, classifier, whether it looks trained."""
    from backbones import get_model, input_spec
    from utils.weights.inspect import batchnorm_at_init
    from utils.weights.load import describe_backbone_file, read_backbone_state

    state, config = read_backbone_state(path)
    network, embedding_size = describe_backbone_file(path)
    lines = [f"{path}: network '{network or 'unknown'}'" + (" (from its training config)" if config else
                                                            " (matched by keys and shapes)" if network else
                                                            " (no registered network has its keys and shapes)"),
             f"  embedding size: {embedding_size}"]
    if network:
        spec = input_spec(get_model(network, num_features=embedding_size))
        lines.append(f"  input: {spec.image_size[0]}x{spec.image_size[1]} RGB, (x - {spec.mean:g}) / {spec.std:g}")
    classifier = state.get("logits.weight")
    lines.append(f"  classifier: {classifier.shape[0]} classes (logits.*)" if classifier is not None else
                 "  classifier: none (backbone only)")
    at_init, total = batchnorm_at_init(state)
    if total:
        lines.append(f"  BatchNorm: {total - at_init} of {total} layers moved from their initial statistics"
                     + (" (untrained)" if at_init == total else ""))
    lines.append(f"  sha256: {fetching.file_sha256(path)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``list`` | ``fetch NAME`` | ``info NAME_OR_FILE``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every registered name")
    commands.add_parser("fetch", help="into the cache").add_argument("name")
    commands.add_parser("info", help="a registered name or any weights file").add_argument("target")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(list_lines()))
        elif args.command == "fetch":
            entry = lookup(args.name)
            if entry is None:
                raise CheckpointError(f"{args.name!r} is not a registered name (python tools/weights.py list)")
            print(fetching.fetch(entry))
        elif lookup(args.target) is not None:
            print("\n".join(entry_lines(lookup(args.target))))
        else:
            print("\n".join(file_lines(args.target)))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
