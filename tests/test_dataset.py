"""dataset.py: both RecordIO layouts, image folders, the resumable sampler, the loader and bad data."""
import hashlib
import json
import logging
import os
import shutil
import time

import cv2
import numpy as np
import pytest
import torch
from easydict import EasyDict

import dataset
from dataset import bad_record_count, get_dataloader, normalize_batch
from utils.data.datasets import ImageFolderDataset, RandomTensorDataset, RecordDataset
from utils.data.samplers import ResumableDistributedSampler
from utils.data import recordio
from utils.data.errors import DatasetError


def _cfg(rec, **overrides):
    cfg = EasyDict(rec=rec, num_classes=None, num_image=None, image_size=(112, 112), num_workers=0, seed=3,
                   batch_size=16, skip_bad_records=True, dali=False)
    cfg.update(overrides)
    return cfg


def _copy_set(fixtures, name, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    for file in ("train.rec", "train.idx", "property"):
        shutil.copy(os.path.join(fixtures, name, file), folder / file)
        os.chmod(folder / file, 0o644)
    return folder


@pytest.mark.parametrize("name", ["A", "D"])
def test_record_dataset_matches_manifest(insightface_fixtures, name):
    manifest = json.load(open(os.path.join(insightface_fixtures, name, "manifest.json")))
    data = RecordDataset(os.path.join(insightface_fixtures, name), flip=False)
    assert data.layout == "header"
    assert (data.num_classes, data.num_image) == (manifest["num_classes"], manifest["num_images"])
    assert data.image_keys.tolist() == manifest["image_keys"]
    by_key = {r["key"]: r for r in manifest["records"]}
    for index in range(0, len(data), max(1, len(data) // 25)):
        image, label = data[index]
        record = by_key[int(data.image_keys[index])]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 112, 112)
        assert label == record["class"]
        hwc = image.permute(1, 2, 0).contiguous().numpy()
        assert hashlib.sha256(hwc.tobytes()).hexdigest() == record["mx_decoded_rgb_sha256"]


def _write_plain(tmp_path, keys_labels, with_property=False, num_classes=None):
    image = np.full((112, 112, 3), 90, np.uint8)
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    writer = recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for key, label in keys_labels:
        writer.write_idx(key, recordio.pack(recordio.IRHeader(0, label, key, 0), jpeg))
    writer.close()
    if with_property:
        dataset.write_property(str(tmp_path / "property"), num_classes, 112)
    return str(tmp_path)


def test_plain_layout_key0_image_with_array_label_and_sparse_keys(tmp_path):
    root = _write_plain(tmp_path, [(7, 1.0), (0, [2.0, 0.0]), (3, 0.0), (12, [4.0, 1.0])])
    data = RecordDataset(root, flip=False)
    assert data.layout == "plain"
    assert data.image_keys.tolist() == [7, 0, 3, 12]
    assert data.num_classes == 5 and data.num_image == 4  # no property: max label + 1
    assert [data[i][1] for i in range(4)] == [1, 2, 0, 4]


def test_header0_in_the_middle(insightface_fixtures, tmp_path):
    # face2rec2 order: images, header0, identity records.
    source = recordio.MXIndexedRecordIO(os.path.join(insightface_fixtures, "D", "train.idx"),
                                      os.path.join(insightface_fixtures, "D", "train.rec"), "r")
    keys = [k for k in source.keys if 1 <= k <= 12] + [0] + [k for k in source.keys if k >= 13]
    writer = recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for key in keys:
        writer.write_idx(key, source.read_idx(key))
    writer.close()
    data = RecordDataset(str(tmp_path), flip=False)
    assert (data.layout, data.num_classes, data.num_image) == ("header", 3, 12)


def test_resize_and_flip(tmp_path):
    image = np.zeros((60, 50, 3), np.uint8)
    image[:, :25] = (0, 0, 255)  # left half red (BGR)
    os.makedirs(tmp_path / "id0")
    cv2.imwrite(str(tmp_path / "id0" / "a.png"), image)
    data = ImageFolderDataset(str(tmp_path), image_size=(112, 112), flip=False)
    sample, _ = data[0]
    assert tuple(sample.shape) == (3, 112, 112)
    assert sample[0, 50, 5] == 255 and sample[0, 50, 106] == 0
    flipped = ImageFolderDataset(str(tmp_path), flip=True)
    seen = set()
    for epoch in range(40):
        flipped.flip_epoch.fill_(epoch)
        first, again = int(flipped[0][0][0, 50, 5]), int(flipped[0][0][0, 50, 5])
        assert first == again  # a pure function of (seed, epoch, index)
        seen.add(first)
    assert seen == {0, 255}


def test_image_folder_labels_by_sorted_name(tmp_path):
    for name, count in (("bob", 2), ("alice", 3), (".ipynb_checkpoints", 0)):
        os.makedirs(tmp_path / name)
        for i in range(count):
            cv2.imwrite(str(tmp_path / name / f"{i}.JPG"), np.full((112, 112, 3), 10 * i, np.uint8))
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    data = ImageFolderDataset(str(tmp_path))
    assert data.identities == ["alice", "bob"] and data.num_classes == 2 and data.num_image == 5
    assert data.labels_array.tolist() == [0, 0, 0, 1, 1]


def test_index_hashes_follow_the_data_not_its_path(insightface_fixtures, tmp_path):
    # What resume compares: a moved copy hashes the same, another file list, labels or pack does not.
    for name in ("alice", "bob"):
        os.makedirs(tmp_path / "faces" / name)
        for i in range(2):
            cv2.imwrite(str(tmp_path / "faces" / name / f"{i}.png"), np.full((8, 8, 3), i, np.uint8))
    first = ImageFolderDataset(str(tmp_path / "faces")).index_sha256()
    shutil.copytree(tmp_path / "faces", tmp_path / "moved")
    assert ImageFolderDataset(str(tmp_path / "moved")).index_sha256() == first
    os.rename(tmp_path / "moved" / "bob" / "1.png", tmp_path / "moved" / "alice" / "9.png")  # same names' count
    assert ImageFolderDataset(str(tmp_path / "moved")).index_sha256() != first
    packs = [RecordDataset(str(_copy_set(insightface_fixtures, name, tmp_path))).index_sha256() for name in "AD"]
    assert packs[0] != packs[1]
    (tmp_path / "again").mkdir()
    assert RecordDataset(str(_copy_set(insightface_fixtures, "A", tmp_path / "again"))).index_sha256() == packs[0]
    assert RandomTensorDataset(10, 2).index_sha256() != RandomTensorDataset(10, 3).index_sha256()


def test_empty_identity_folder_is_an_error_not_a_shift(tmp_path):
    # Skipping "b" would silently renumber "c" from 2 to 1: refuse instead, naming the folder.
    for name, count in (("a", 1), ("b", 0), ("c", 1)):
        os.makedirs(tmp_path / name)
        for i in range(count):
            cv2.imwrite(str(tmp_path / name / f"{i}.jpg"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "b" / "readme.txt").write_text("no image here")
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(str(tmp_path))
    assert str(info.value) == (f"{tmp_path / 'b'}: identity folder holds no image file (.jpg/.jpeg/.png/.bmp); "
                               f"1 of 3 identity folders are empty: class ids follow the sorted folder names, so "
                               f"remove the empty folders or add images")


def test_empty_image_folder(tmp_path):
    os.makedirs(tmp_path / "someone")
    with pytest.raises(DatasetError, match=r"no images found in its 1 identity folders, expected "
                                           r"root/<identity>/<image> files ending in"):
        ImageFolderDataset(str(tmp_path))
    with pytest.raises(DatasetError, match=rf"^{tmp_path / 'someone'}: no identity folders \(found none\)"):
        ImageFolderDataset(str(tmp_path / "someone"))
    cv2.imwrite(str(tmp_path / "someone" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"someone: no identity folders \(found 1 images directly in it\)"):
        ImageFolderDataset(str(tmp_path / "someone"))


def test_unreadable_image_file(tmp_path):
    os.makedirs(tmp_path / "id0" / "broken.jpg")  # a folder where a file should be
    cv2.imwrite(str(tmp_path / "id0" / "good.jpg"), np.zeros((112, 112, 3), np.uint8))
    strict = ImageFolderDataset(str(tmp_path), skip_bad_records=False)
    with pytest.raises(recordio.BadRecordError, match=r"broken\.jpg: cannot read the image file"):
        strict[0]
    lenient = ImageFolderDataset(str(tmp_path), skip_bad_records=True)
    assert lenient[0][1] == 0 and int(lenient.bad_record_counter.sum()) == 1


def test_label_out_of_range(tmp_path):
    root = _write_plain(tmp_path, [(0, 0.0), (1, 5.0)], with_property=True, num_classes=2)
    data = RecordDataset(root, skip_bad_records=False)
    with pytest.raises(recordio.BadRecordError, match=r"train\.rec: key 1: label 5 out of range, expected 0 <= label < num_classes=2"):
        data[1]


def test_undecodable_record(tmp_path):
    writer = recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    writer.write_idx(0, recordio.pack(recordio.IRHeader(0, 0.0, 0, 0), b"garbage!"))
    writer.close()
    data = RecordDataset(str(tmp_path), skip_bad_records=False)
    with pytest.raises(recordio.BadRecordError, match=r"train\.rec: key 0: cannot decode the 8 image bytes"):
        data[0]


def test_missing_rec_files_name_the_file(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"train\.idx: index file not found"):
        get_dataloader(_cfg(str(tmp_path)), 0, 1)
    with pytest.raises(DatasetError, match=r"config key 'rec': .*nowhere is not a folder"):
        get_dataloader(_cfg(str(tmp_path / "nowhere")), 0, 1)


def test_random_tensors_under_both_spellings():
    data = RandomTensorDataset(num_image=10, num_classes=4, image_size=(112, 96), seed=1)
    items = [data[index] for index in range(len(data))]
    assert all(image.dtype == torch.uint8 and tuple(image.shape) == (3, 112, 96) for image, _ in items)
    # every class is used, as evenly as 10 images over 4 classes allow, and labels() agrees with the items
    assert sorted(np.bincount([label for _, label in items], minlength=4)) == [2, 2, 3, 3]
    assert data.labels().tolist() == [label for _, label in items]
    batches = {}
    for rec in ("random", "synthetic"):  # the new name and arcface_torch's
        loader = get_dataloader(_cfg(rec, num_image=64, num_classes=8, batch_size=8), 0, 1)
        info = loader.data_info
        assert (info.source, info.kind, info.num_classes, info.num_images) == ("random tensors", "random", 8, 64)
        batches[rec] = next(iter(loader))
    assert torch.equal(batches["random"][0], batches["synthetic"][0])
    assert torch.equal(batches["random"][1], batches["synthetic"][1])
    assert batches["random"][0].shape == (8, 3, 112, 112) and batches["random"][1].dtype == torch.int64


@pytest.mark.parametrize("key", ["dali", "dali_aug"])
def test_dali_keys_are_accepted_but_true_is_an_error(key):
    with pytest.raises(DatasetError, match=rf"^config key '{key}': True is not supported by ArcScale's loader; "
                                           rf"set {key}=False"):
        get_dataloader(_cfg("random", num_image=16, num_classes=2, **{key: True}), 0, 1)


def test_normalize_batch():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize_batch(images)
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


# ------------------------------------------------------------------ sampler

def _epoch(num_samples, world_size, seed=0, epoch=0, consumed=0):
    out = []
    for rank in range(world_size):
        sampler = ResumableDistributedSampler(num_samples, rank, world_size, seed)
        sampler.load_state_dict({"epoch": epoch, "seed": seed, "consumed": consumed})
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(sampler) == len(out[-1])
    return out


def test_sampler_partitions_equally_and_reshuffles():
    parts = _epoch(103, 4)
    assert {len(p) for p in parts} == {25}
    flat = sum(parts, [])
    assert len(set(flat)) == 100 and all(0 <= i < 103 for i in flat)
    assert _epoch(103, 4, epoch=1) != parts and _epoch(103, 4) == parts


def test_sampler_resume_mid_epoch_on_another_world_size():
    seed, epoch = 5, 2
    full = ResumableDistributedSampler(96, 0, 1, seed)
    full.set_epoch(epoch)
    order = list(full)
    # Two ranks consume 3 micro-steps of batch 4 (24 global samples), then checkpoint.
    runners = [ResumableDistributedSampler(96, r, 2, seed) for r in range(2)]
    for sampler in runners:
        sampler.set_epoch(epoch)
        for _ in range(3):
            sampler.advance(4 * 2)
    state = runners[0].state_dict()
    assert state == {"epoch": epoch, "seed": seed, "consumed": 24}
    # Resume on 3 ranks: together they see exactly the not-yet-consumed samples, in order.
    resumed = []
    for rank in range(3):
        sampler = ResumableDistributedSampler(96, rank, 3, seed=999)
        sampler.load_state_dict(state)
        sampler.set_epoch(epoch)
        resumed.append(list(sampler))
        assert len(sampler) == 24
    interleaved = [resumed[i % 3][i // 3] for i in range(72)]
    assert interleaved == order[24:]
    # The next epoch starts from zero again.
    sampler.set_epoch(epoch + 1)
    assert len(sampler) == 32


def test_sampler_bad_state():
    sampler = ResumableDistributedSampler(10, 0, 1, 0)
    with pytest.raises(DatasetError, match=r"consumed=50 does not fit a dataset of 10 samples"):
        sampler.load_state_dict({"epoch": 0, "seed": 0, "consumed": 50})
    with pytest.raises(DatasetError, match=r"rank=2 world_size=2"):
        ResumableDistributedSampler(10, 2, 2, 0)


# ------------------------------------------------------------------ loader

def test_loader_fills_sizes_and_yields_exact_uint8_batches(insightface_fixtures):
    cfg = _cfg(os.path.join(insightface_fixtures, "A"), num_workers=2, batch_size=32)
    loader = get_dataloader(cfg, 1, 2)
    info = loader.data_info
    assert (info.kind, info.layout, info.num_classes, info.num_images) == ("recordio", "header", 40, 480)
    assert (cfg.num_classes, cfg.num_image) == (None, None)  # the config is input only
    assert isinstance(loader.sampler, ResumableDistributedSampler)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 240 // 32
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and tuple(images.shape) == (32, 3, 112, 112)
    assert labels.dtype == torch.int64 and int(labels.max()) < 40
    assert bad_record_count(loader) == 0


def test_loader_config_disagreement(insightface_fixtures):
    with pytest.raises(DatasetError, match=r"config key 'num_classes' is 41 but the data in .*A has 40"):
        get_dataloader(_cfg(os.path.join(insightface_fixtures, "A"), num_classes=41), 0, 1)
    with pytest.raises(DatasetError, match=r"config key 'num_image' is 7 but the data in .*A has 480"):
        get_dataloader(_cfg(os.path.join(insightface_fixtures, "A"), num_image=7), 0, 1)


def test_corrupt_records_are_skipped_and_counted(insightface_fixtures, tmp_path, caplog):
    folder = _copy_set(insightface_fixtures, "A", tmp_path)
    manifest = json.load(open(os.path.join(insightface_fixtures, "A", "manifest.json")))
    offsets = {r["key"]: r["offset"] for r in manifest["records"]}
    with open(folder / "train.rec", "r+b") as handle:
        handle.seek(offsets[10] + 8 + 24)  # JPEG SOI of key 10 -> undecodable
        handle.write(b"\0\0")
        handle.seek(offsets[200])  # magic of key 200 -> bad framing
        handle.write(b"\0\0\0\0")
        handle.seek(offsets[30] + 8 + 24 + 1500)  # 64 zero bytes mid-JPEG of key 30: libjpeg would not object
        handle.write(bytes(64))
    caplog.set_level(logging.WARNING)
    cfg = _cfg(str(folder), num_workers=2, batch_size=48)
    loader = get_dataloader(cfg, 0, 1)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        sizes = [images.shape[0] for images, _ in loader]
        assert sizes == [48] * 10
    assert bad_record_count(loader) == 6  # skip events: 3 records, each met once per epoch
    assert dataset.check_bad_records(loader, 3) == 3  # distinct records
    assert dataset.check_bad_records(loader, 0.001) == 3  # 0.1% of 480 is 0, but a fraction allows 10 at least
    with pytest.raises(DatasetError) as info:
        dataset.check_bad_records(loader, 2)
    assert str(info.value).startswith(f"3 corrupt samples skipped in {folder} (0.6250% of 480), above the limit of 2 "
                                      f"(config key 'max_bad_records'=2: a count of records); list them with")
    # The workers are spawned processes: their warnings must reach this process's handlers (training.log).
    expected = ((10, "cannot decode"), (200, "bad magic"), (30, "corrupt JPEG: 64 bytes of 0x00"))

    def skipped() -> list:
        return [r for r in caplog.records if r.getMessage().startswith("skipping bad sample")]

    def all_named() -> bool:
        return all(any(f"key {key}" in r.getMessage() and reason in r.getMessage() for r in skipped())
                   for key, reason in expected)

    deadline = time.time() + 10  # records travel through a queue and a thread: allow for the delay
    while time.time() < deadline and not all_named():
        time.sleep(0.1)
    assert all_named(), [r.getMessage() for r in skipped()]
    assert {r.process for r in skipped()} - {os.getpid()}  # logged inside the workers
    strict = RecordDataset(str(folder), skip_bad_records=False)
    with pytest.raises(recordio.BadRecordError, match=r"key 200 at offset \d+: bad magic"):
        strict[199]


def test_resumed_loader_yields_exactly_the_remaining_batches(insightface_fixtures):
    root = os.path.join(insightface_fixtures, "A")
    straight = get_dataloader(_cfg(root, batch_size=32, num_workers=0), 0, 1)
    straight.sampler.set_epoch(1)
    expected = list(straight)
    resumed = get_dataloader(_cfg(root, batch_size=32, num_workers=2), 0, 1)
    resumed.sampler.load_state_dict({"epoch": 1, "seed": 3, "consumed": 64})
    resumed.sampler.set_epoch(1)
    actual = list(resumed)
    assert len(actual) == len(expected) - 2
    for (images, labels), (want_images, want_labels) in zip(actual, expected[2:]):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)


def test_check_bad_records_counts_distinct_samples(tmp_path):
    os.makedirs(tmp_path / "id0")
    for i in range(4):
        cv2.imwrite(str(tmp_path / "id0" / f"{i}.jpg"), np.full((112, 112, 3), 40 * i, np.uint8))
    (tmp_path / "id0" / "1.jpg").write_bytes(b"\xff\xd8broken")
    loader = get_dataloader(_cfg(str(tmp_path), batch_size=2), 0, 1)
    assert dataset.check_bad_records(loader, 0.0) == 0
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        assert sum(len(labels) for _, labels in loader) == 4
    assert bad_record_count(loader) == 3 and dataset.check_bad_records(loader, 0.2) == 1  # at least 10 allowed
    with pytest.raises(DatasetError, match=r"^1 corrupt samples skipped in .* \(25\.0000% of 4\), above the limit of "
                                           r"0 \(config key 'max_bad_records'=0: none tolerated\)"):
        dataset.check_bad_records(loader, 0)
    assert dataset.check_bad_records(get_dataloader(_cfg("synthetic", num_image=10, num_classes=2), 0, 1), 0) == 0


@pytest.mark.parametrize("value, images, limit", [
    (0.001, 192, 10), (0.001, 5_000_000, 5000), (0.001, 10_000, 10), (0.01, 2000, 20),  # fractions, floor 10
    (3, 192, 3), (1, 5_000_000, 1), (1.0, 50, 1), (25, 10, 25),  # whole numbers from 1 on are counts
    (0, 192, 0), (0.0, 5_000_000, 0),  # none tolerated
])
def test_bad_record_limit_is_a_fraction_with_a_floor_or_a_count(value, images, limit):
    assert dataset.bad_record_limit(value, images) == limit


def test_a_fraction_names_its_floor_when_the_limit_is_passed(tmp_path):
    os.makedirs(tmp_path / "id0")
    for i in range(20):  # 11 broken: 20 gives the substitutes enough good images (no "33 bad in a row")
        path = tmp_path / "id0" / f"{i}.jpg"
        if i < 11:
            path.write_bytes(b"\xff\xd8broken")
        else:
            cv2.imwrite(str(path), np.full((112, 112, 3), 40, np.uint8))
    loader = get_dataloader(_cfg(str(tmp_path), batch_size=2), 0, 1)
    loader.sampler.set_epoch(0)
    for _ in loader:
        pass
    with pytest.raises(DatasetError) as info:
        dataset.check_bad_records(loader, 0.001)
    assert str(info.value).startswith(f"11 corrupt samples skipped in {tmp_path} (55.0000% of 20), above the limit "
                                      f"of 10 (config key 'max_bad_records'=0.001: max(0.1% of 20, 10)); list them")


def test_pairs_of_files_from_different_packs(insightface_fixtures, tmp_path):
    folder = _copy_set(insightface_fixtures, "A", tmp_path)
    (folder / "property").write_text("41,112,112\n")
    with pytest.raises(DatasetError, match=rf"^{folder / 'property'}: says 41 classes, but header0 of .*train.rec "
                                           r"describes 40: the files come from different packs$"):
        RecordDataset(str(folder))
    shutil.copy(os.path.join(insightface_fixtures, "A", "property"), folder / "property")
    idx = (folder / "train.idx").read_text()
    size = os.path.getsize(folder / "train.rec")
    (folder / "train.idx").write_text(idx + f"600\t{size - 8}\n")
    with pytest.raises(DatasetError, match=r"train.idx: 522 entries, 1 of them outside the keys 0..520 that header0 "
                                           r"of .* describes \(e.g. key 600\): the .idx and .rec come from different"):
        RecordDataset(str(folder))
    (folder / "train.idx").write_text(idx + f"521\t{size + 64}\n")
    with pytest.raises(DatasetError, match=rf"train.idx: 1 of 522 entries point past the end of .*train.rec "
                                           rf"\({size} bytes\), e.g. key 521 at offset {size + 64}"):
        RecordDataset(str(folder))
    # Every offset off by 12 bytes (an index of another pack): key 0 fails to read, or, once it reads,
    # the sampled offsets miss the records.
    other = tmp_path / "mixed"
    other.mkdir()
    shutil.copy(folder / "train.rec", other / "train.rec")
    lines = idx.splitlines()
    shifted = "".join(f"{line.split()[0]}\t{int(line.split()[1]) + 12}\n" for line in lines)
    (other / "train.idx").write_text(shifted)
    with pytest.raises(DatasetError):
        dataset.build_dataset(_cfg(str(other)))
    (other / "train.idx").write_text(shifted.replace(f"0\t{int(lines[-1].split()[1]) + 12}",
                                                     f"0\t{int(lines[-1].split()[1])}"))
    with pytest.raises(DatasetError, match=r"train.idx: \d+ of 64 sampled offsets do not point at a record in "
                                           r".*train.rec \(no RecordIO magic there\)"):
        RecordDataset(str(other))
