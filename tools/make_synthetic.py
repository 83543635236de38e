"""Write a synthetic identity training set plus verification pairs.

    python tools/make_synthetic.py OUT_DIR --identities 200 --images-per-identity 24 \\
        --val-identities 60 --val-pairs 600 [--seed 0] [--image-size 112] [--force]

OUT_DIR gets train.rec/train.idx/property (InsightFace layout), synthetic_heldout.bin (new samples of
training identities) and synthetic_unseen.bin (identities never trained on), each a pickle of
(list of JPEG bytes, issame list) with pair i = images 2i and 2i+1, half genuine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.config.paths import OutputPathError, ensure_output_dir  # noqa: E402
from utils.data.synthetic import SyntheticDataError, make_identity_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Write a generated identity set to ``out_dir``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--identities", type=int, default=200, help="training identities")
    parser.add_argument("--images-per-identity", type=int, default=24)
    parser.add_argument("--val-identities", type=int, default=60, help="unseen identities for synthetic_unseen.bin")
    parser.add_argument("--val-pairs", type=int, default=600, help="pairs in each .bin (0 = no .bin files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    try:
        # Refuses a path under a regular file or in a read-only folder before anything is deleted.
        ensure_output_dir(args.out_dir, "OUT_DIR", create=False)
    except OutputPathError as exc:
        print(f"make_synthetic: error: {exc}", file=sys.stderr)
        return 2
    if os.path.exists(args.out_dir):
        if not args.force:
            print(f"make_synthetic: error: {args.out_dir}: already exists; pass --force to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(args.out_dir)
    start = time.time()
    try:
        make_identity_set(args.out_dir, args.identities, args.images_per_identity, args.val_identities,
                          args.val_pairs, seed=args.seed, image_size=args.image_size)
    except SyntheticDataError as exc:
        print(f"make_synthetic: error: {exc}", file=sys.stderr)
        return 2
    print(f"num_images={args.identities * args.images_per_identity} num_classes={args.identities} layout=header "
          f"val_pairs={args.val_pairs} out={args.out_dir} seconds={time.time() - start:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
