"""utils/synthetic.py: deterministic, well-formed identity sets and the cache."""
import os
import pickle

import numpy as np
import pytest
from easydict import EasyDict

from utils.data.datasets import RecordDataset
from utils.data import synthetic
from utils.data.synthetic import SyntheticDataError, ensure_identity_set, make_identity_set


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_same_seed_same_bytes_and_layout(tmp_path):
    first = make_identity_set(str(tmp_path / "a"), 6, 4, 4, 20, seed=1)
    second = make_identity_set(str(tmp_path / "b"), 6, 4, 4, 20, seed=1)
    other = make_identity_set(str(tmp_path / "c"), 6, 4, 4, 20, seed=2)
    files = _files(first)
    assert set(files) == {"train.rec", "train.idx", "property", "synthetic_heldout.bin", "synthetic_unseen.bin",
                          "synthetic.json"}
    assert files == _files(second)
    assert files["train.rec"] != _files(other)["train.rec"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    data = RecordDataset(first, flip=False)
    assert (data.layout, data.num_classes, data.num_image) == ("header", 6, 24)
    assert [data[i][1] for i in range(0, 24, 4)] == [0, 1, 2, 3, 4, 5]
    assert files["property"] == b"6,112,112\n"


def test_verification_files(tmp_path):
    folder = make_identity_set(str(tmp_path / "s"), 5, 2, 3, 10, seed=0)
    for name in ("synthetic_heldout.bin", "synthetic_unseen.bin"):
        with open(os.path.join(folder, name), "rb") as handle:
            bins, issame = pickle.load(handle)
        assert len(bins) == 20 and len(issame) == 10 and sum(issame) == 5
        assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in bins)
        assert len(set(bins)) == 20  # every image is a distinct sample


def test_identities_differ_more_than_samples():
    # Canonical faces of two identities differ far more than the same face does from itself.
    face_a = synthetic.render_identity(synthetic._identity_params(0, 0, 0))
    face_b = synthetic.render_identity(synthetic._identity_params(0, 0, 1))
    assert np.abs(face_a[0] - face_b[0]).mean() > 20
    rng = np.random.default_rng(0)
    sample = synthetic.render_sample(face_a, rng)
    assert sample.dtype == np.uint8 and sample.shape == (112, 112, 3)


def test_bad_parameters(tmp_path):
    with pytest.raises(SyntheticDataError, match=r"num_identities=0 images_per_identity=3: expected both >= 1"):
        make_identity_set(str(tmp_path / "x"), 0, 3, 2, 10)
    with pytest.raises(SyntheticDataError, match=r"num_val_identities=1: need at least 2 unseen identities"):
        make_identity_set(str(tmp_path / "x"), 2, 3, 1, 10)
    with pytest.raises(SyntheticDataError, match=r"image_size=\(112, 96\): the generator makes square images"):
        make_identity_set(str(tmp_path / "x"), 2, 3, 2, 10, image_size=(112, 96))
    os.makedirs(tmp_path / "exists")
    with pytest.raises(SyntheticDataError, match=r"exists: already exists"):
        make_identity_set(str(tmp_path / "exists"), 2, 3, 2, 10)


def test_ensure_identity_set_caches(tmp_path):
    cfg = EasyDict(seed=0, image_size=(112, 112),
                   synthetic=EasyDict(num_identities=3, images_per_identity=2, num_val_identities=2,
                                      num_val_pairs=4, cache_dir=str(tmp_path)))
    folder = ensure_identity_set(cfg)
    assert os.path.basename(folder).startswith("synthetic_") and os.path.dirname(folder) == str(tmp_path)
    stamp = os.path.getmtime(os.path.join(folder, "train.rec"))
    assert ensure_identity_set(cfg) == folder
    assert os.path.getmtime(os.path.join(folder, "train.rec")) == stamp
    cfg.synthetic.num_identities = 4
    assert ensure_identity_set(cfg) != folder
