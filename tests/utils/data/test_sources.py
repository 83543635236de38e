"""utils/data/sources.py: several sources read as one dataset (rec as a list), on the mxnet-written packs of
tests/fixtures/insightface (A: 40 identities x 12 images, D: 3 x 4), combined as folders, as numbered shards and
as a glob; the identity map; and every bad input as one DatasetError line."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from easydict import EasyDict

from dataset import build_dataset, describe_data, get_dataloader
from utils.data.datasets import RecordDataset
from utils.data.errors import DatasetError
from utils.data.sources import source_table

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "insightface"
A, D = str(FIXTURES / "A"), str(FIXTURES / "D")


def cfg(rec, **keys) -> EasyDict:
    base = dict(rec=rec, image_size=(112, 112), skip_bad_records=True, seed=0, num_classes=None, num_image=None,
                rec_weights=None, rec_identity_map=None, sampler="random", batch_size=8, num_workers=0)
    base.update(keys)
    return EasyDict(base)


def shard_folder(folder: Path, packs: list[str], stem: str = "train") -> Path:
    """A sharded pack: pack i's train.rec/.idx copied to folder/<stem>_<i>.rec/.idx (its property beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, pack in enumerate(packs):
        for ext in ("rec", "idx"):
            shutil.copy(Path(pack) / f"train.{ext}", folder / f"{stem}_{number}.{ext}")
        shutil.copy(Path(pack) / "property", folder / f"{stem}_{number}.property")
    return folder


def test_two_packs_are_one_dataset_with_offset_labels():
    dataset = build_dataset(cfg([A, D]))
    single_a, single_d = RecordDataset(A, flip=False), RecordDataset(D, flip=False)
    assert (len(dataset), dataset.num_classes) == (480 + 12, 40 + 3)
    labels = dataset.labels()
    assert np.array_equal(labels[:480], single_a.labels()) and np.array_equal(labels[480:], single_d.labels() + 40)
    dataset.flip = single_d.flip = False
    image, label = dataset[480 + 5]
    expected, expected_label = single_d[5]
    assert label == expected_label + 40 and np.array_equal(image.numpy(), expected.numpy())
    table = source_table(dataset)
    assert table[1].split()[-2:] == ["0..39", f"{480 / 492:.2%}"] and table[2].split()[-2:] == ["40..42", f"{12 / 492:.2%}"]
    info = describe_data(cfg([A, D]), dataset, [A, D])
    assert info.num_classes == 43 and [s["num_images"] for s in info.fingerprint["sources"]] == [480, 12]
    assert all(len(s["index_sha256"]) == 64 for s in info.fingerprint["sources"])


def test_a_loader_over_two_sources_yields_labels_of_both():
    loader = get_dataloader(cfg([D, A], batch_size=16), 0, 1)
    seen = np.concatenate([labels.numpy() for _, labels in loader])
    assert len(seen) == 492 // 16 * 16 and seen.max() == 42 and (seen < 3).sum() > 0  # D first: labels 0..2


def test_numbered_shards_and_a_glob_read_as_one_source(tmp_path):
    folder = shard_folder(tmp_path / "wf", [D, A, D])
    as_folder = build_dataset(cfg([str(folder)]))
    as_glob = build_dataset(cfg(str(folder / "train_*.rec")))
    for dataset in (as_folder, as_glob):
        assert (len(dataset), dataset.num_classes, len(dataset.sources[0].parts)) == (12 + 480 + 12, 46, 3)
        labels = dataset.labels()
        assert labels[:12].max() == 2 and labels[12:492].min() == 3 and labels[492:].min() == 43
    assert as_folder.index_sha256() == as_glob.index_sha256()
    # train_10 sorts after train_9 (numbers, not text)
    many = shard_folder(tmp_path / "many", [D] * 11)
    assert [Path(p).name for p in build_dataset(cfg(str(many))).sources[0].paths][-2:] == ["train_9.rec",
                                                                                           "train_10.rec"]


def test_identity_map_merges_identities_and_bad_maps_are_one_line(tmp_path):
    path = tmp_path / "map.csv"
    path.write_text(f"source,label,global_id\n{A},0,7\n1,2,7\n{A},5,9\n")  # D's label 2 is A's label 0
    dataset = build_dataset(cfg([A, D], rec_identity_map=str(path)))
    assert dataset.num_classes == 42
    labels = dataset.labels()
    single_d = RecordDataset(D, flip=False).labels()
    assert np.array_equal(labels[480:][single_d == 2], np.zeros((single_d == 2).sum()))
    assert labels[480:].max() == 41 and set(labels[480:]) == {40, 41, 0}
    for text, needle in ((f"{D},3,1\n", "has no label 3"), ("2,0,1\n", "not in `rec`"),
                         (f"{A},1,4\n{A},1,5\n", "mapped to global id 4 and to 5"),
                         (f"{A},x,1\n", "expected integers")):
        path.write_text(text)
        with pytest.raises(DatasetError, match=needle) as caught:
            build_dataset(cfg([A, D], rec_identity_map=str(path)))
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_bad_sources_are_one_line_each(tmp_path):
    def refused(rec, *needles, **keys):
        with pytest.raises(DatasetError) as caught:
            build_dataset(cfg(rec, **keys))
        assert "\n" not in str(caught.value)
        for needle in needles:
            assert needle in str(caught.value), (needle, str(caught.value))

    # a missing shard (a gap in the numbers, or a .rec without its .idx)
    gap = shard_folder(tmp_path / "gap", [D, D, D])
    for ext in ("rec", "idx"):
        (gap / f"train_1.{ext}").unlink()
    refused([A, str(gap)], "train_1.rec is missing", "train_0..train_2")
    half = shard_folder(tmp_path / "half", [D, D])
    (half / "train_1.idx").unlink()
    refused([str(half)], "train_1.idx is missing")
    # a shard whose property disagrees with its records; a pack property that disagrees with its shards
    wrong = shard_folder(tmp_path / "wrong", [D, A])
    (wrong / "train_1.property").write_text("30,112,112\n")
    refused([str(wrong)], "train_1.property", "30 classes", "40")
    total = shard_folder(tmp_path / "total", [D, D])
    (total / "property").write_text("5,112,112\n")
    refused([str(total)], "says 5 classes", "hold 6")
    # images of another size in an image folder
    small = tmp_path / "small"
    for identity in ("x", "y"):
        (small / identity).mkdir(parents=True)
        cv2.imwrite(str(small / identity / "0.jpg"), np.full((96, 80, 3), 128, np.uint8))
    refused([A, str(small)], "are 96x80", "112x112")
    # a label outside the classes its property declares (a plain pack: every .idx key an image)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(Path(A) / "train.rec", plain / "train.rec")
    lines = (Path(A) / "train.idx").read_text().splitlines()
    (plain / "train.idx").write_text("\n".join(l for l in lines if 1 <= int(l.split("\t")[0]) <= 480) + "\n")
    (plain / "property").write_text("39,112,112\n")
    refused([D, str(plain)], "has label 39", "outside the 39 classes")
    # rec / rec_weights themselves
    refused([A, str(tmp_path / "nowhere")], "nowhere is not a folder")
    refused(str(tmp_path / "none_*.rec"), "matches no file")
    refused([A, D], "2 sources", "1 weights", rec_weights=[1.0])


def test_a_label_outside_its_range_met_while_training_stops_the_run():
    dataset = build_dataset(cfg([D, A]))
    part = dataset.parts[1]
    part.num_classes = 39  # as if its property had said so and the start-up sample had missed it
    index = 12 + int(np.flatnonzero(RecordDataset(A, flip=False).labels() == 39)[0])
    with pytest.raises(DatasetError, match="label 39 out of range"):
        dataset[index]  # not skipped like a corrupt record: it would land on another source's identity


def open_rec_files() -> list[str]:
    """The .rec files this process holds a descriptor of."""
    import os

    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(".rec"):
            found.append(target)
    return found


def test_a_process_opens_only_the_shards_it_reads(tmp_path):
    folder = shard_folder(tmp_path / "many", [D] * 6)
    dataset = build_dataset(cfg([str(folder), A]))
    assert not [p for p in open_rec_files() if "many" in p or p.startswith(A)]  # none of the 7 parts held open
    dataset[0], dataset[1], dataset[13]  # shard 0 twice, shard 1 once
    opened = [p for p in open_rec_files() if "many" in p or p.startswith(A)]
    assert sorted(Path(p).name for p in opened) == ["train_0.rec", "train_1.rec"], opened


def test_an_image_folder_joins_a_pack_and_the_pk_sampler_runs_over_the_union(tmp_path):
    folder = tmp_path / "faces"
    for identity in ("p", "q"):
        (folder / identity).mkdir(parents=True)
        for number in range(4):
            cv2.imwrite(str(folder / identity / f"{number}.jpg"), np.full((112, 112, 3), 40 * number, np.uint8))
    loader = get_dataloader(cfg([D, str(folder)], sampler="pk", images_per_identity=4, batch_size=8), 0, 1)
    assert (loader.dataset.num_classes, len(loader.dataset)) == (5, 20)
    assert np.array_equal(loader.dataset.labels()[12:], [3] * 4 + [4] * 4)  # folder identities after D's 3
    loader.sampler.set_epoch(0)
    for _, labels in loader:  # P=2 identities x K=4 images, from either source
        assert sorted(np.bincount(labels.numpy()).tolist())[-2:] == [4, 4]
