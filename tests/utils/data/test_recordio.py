"""utils/recordio.py against the mxnet-written fixtures, plus writer byte-compatibility and bad files."""
import hashlib
import json
import multiprocessing
import os
import struct

import numpy as np
import pytest

from utils.data import recordio


def _manifest(fixtures, name):
    with open(os.path.join(fixtures, name, "manifest.json")) as handle:
        return json.load(handle)


def _reader(fixtures, name):
    folder = os.path.join(fixtures, name)
    return recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "r")


@pytest.mark.parametrize("name", ["A", "D"])
def test_reads_fixture_record_for_record(insightface_fixtures, name):
    manifest = _manifest(insightface_fixtures, name)
    reader = _reader(insightface_fixtures, name)
    assert reader.keys == [r["key"] for r in manifest["records"]]
    assert reader.idx == {r["key"]: r["offset"] for r in manifest["records"]}
    for record in manifest["records"]:
        payload = reader.read_idx(record["key"])
        assert len(payload) == record["payload_len"]
        header, img = recordio.unpack(payload)
        assert (header.flag, header.id, header.id2) == (record["flag"], record["id"], record["id2"])
        if record["flag"]:
            assert header.label.dtype == np.float32 and header.label.tolist() == record["label"]
        else:
            assert header.label == record["label"]
        assert len(img) == record["jpeg_len"]
        if record["kind"] == "image":
            assert recordio.class_of(header) == record["class"]
            assert hashlib.sha256(img).hexdigest() == record["jpeg_sha256"]
            rgb = recordio.decode_image(img)
            assert list(rgb.shape) == record["shape"]
            assert hashlib.sha256(rgb.tobytes()).hexdigest() == record["mx_decoded_rgb_sha256"]
    reader.close()


def test_fixture_d_has_split_records_and_sequential_reader_joins_them(insightface_fixtures):
    manifest = _manifest(insightface_fixtures, "D")
    split = [r for r in manifest["records"] if r["n_parts"] > 1]
    assert len(split) == 4 and {r["n_parts"] for r in split} == {2, 3, 4}
    reader = _reader(insightface_fixtures, "D")
    sequential = recordio.MXRecordIO(os.path.join(insightface_fixtures, "D", "train.rec"), "r")
    payloads = list(sequential)
    assert payloads == [reader.read_idx(key) for key in reader.keys]
    assert sequential.read() is None


@pytest.mark.parametrize("name", ["A", "D"])
def test_writer_repacking_reproduces_fixture_bytes(insightface_fixtures, tmp_path, name):
    reader = _reader(insightface_fixtures, name)
    writer = recordio.MXIndexedRecordIO(str(tmp_path / "t.idx"), str(tmp_path / "t.rec"), "w")
    for key in reader.keys:
        writer.write_idx(key, reader.read_idx(key))
    writer.close()
    folder = os.path.join(insightface_fixtures, name)
    for ours, theirs in (("t.rec", "train.rec"), ("t.idx", "train.idx")):
        assert (tmp_path / ours).read_bytes() == open(os.path.join(folder, theirs), "rb").read()


def test_pack_reproduces_fixture_payloads(insightface_fixtures):
    manifest = _manifest(insightface_fixtures, "A")
    reader = _reader(insightface_fixtures, "A")
    for record in manifest["records"][:5] + manifest["records"][-3:]:
        payload = reader.read_idx(record["key"])
        _, img = recordio.unpack(payload)
        rebuilt = recordio.pack(recordio.IRHeader(0, record["label"], record["id"], record["id2"]), img)
        assert rebuilt == payload


def test_split_at_aligned_magic_and_rejoin(tmp_path):
    magic = recordio.MAGIC_BYTES
    payloads = [
        b"abcd" + magic + b"efgh",           # one aligned magic: 2 parts
        magic + b"xy",                        # magic first: empty first part
        b"1234" + magic + magic + b"z",       # two in a row: empty middle part
        b"12345678" + magic,                  # trailing magic: empty last part
        b"a" + magic + b"bcde",               # unaligned magic: no split
        b"",                                  # empty record
    ]
    path = str(tmp_path / "m.rec")
    writer = recordio.MXRecordIO(path, "w")
    for payload in payloads:
        writer.write(payload)
    writer.close()
    data = open(path, "rb").read()
    # First record: [magic][cflag 1, len 4]abcd [magic][cflag 3, len 4]efgh
    assert data[:24] == (magic + struct.pack("<I", (1 << 29) | 4) + b"abcd"
                         + magic + struct.pack("<I", (3 << 29) | 4) + b"efgh")
    assert len(data) % 4 == 0
    assert list(recordio.MXRecordIO(path, "r")) == payloads
    # The unaligned one is a single part of 9 bytes, padded to 12.
    assert recordio.encode_record(payloads[4]) == magic + struct.pack("<I", 9) + payloads[4] + b"\0\0\0"


def test_pack_unpack_array_label_and_img_roundtrip():
    import cv2

    payload = recordio.pack(recordio.IRHeader(0, [3.0, 7.0], 5, 0), b"img")
    header, img = recordio.unpack(payload)
    assert header.flag == 2 and header.label.tolist() == [3.0, 7.0] and img == b"img"
    assert recordio.class_of(header) == 3
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :, 2] = 200  # red in BGR
    header, decoded = recordio.unpack_img(recordio.pack_img(recordio.IRHeader(0, 4, 1, 0), image, img_fmt=".png"))
    assert header.label == 4.0 and np.array_equal(decoded, image)
    assert recordio.decode_image(cv2.imencode(".png", image)[1].tobytes())[0, 0].tolist() == [200, 0, 0]


def test_large_label_warns(caplog, monkeypatch):
    from utils.data import recordio_header

    monkeypatch.setattr(recordio_header, "_warned_float32", False)  # the warning is once per process
    with caplog.at_level("WARNING"):
        recordio.pack(recordio.IRHeader(0, float(2**24 + 2), 1, 0), b"")
    assert "2^24" in caplog.text


def _read_in_child(args):
    reader, key = args
    return hashlib.sha256(reader.read_idx(key)).hexdigest()


def test_reader_shared_with_forked_workers(insightface_fixtures):
    reader = _reader(insightface_fixtures, "A")
    keys = reader.keys[:40]
    expected = [hashlib.sha256(reader.read_idx(k)).hexdigest() for k in keys]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(_read_in_child, [(reader, k) for k in keys])
    assert got == expected


# ------------------------------------------------------------------ bad files

def _small_set(tmp_path, records=3):
    writer = recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for key in range(records):
        writer.write_idx(key, recordio.pack(recordio.IRHeader(0, key, key, 0), b"x" * 40))
    writer.close()
    return str(tmp_path / "train.idx"), str(tmp_path / "train.rec")


def test_missing_idx(tmp_path):
    _, rec = _small_set(tmp_path)
    with pytest.raises(recordio.RecordIOError, match=r"nothere\.idx: index file not found"):
        recordio.MXIndexedRecordIO(str(tmp_path / "nothere.idx"), rec, "r")


def test_empty_idx(tmp_path):
    idx, rec = _small_set(tmp_path)
    open(idx, "w").close()
    with pytest.raises(recordio.RecordIOError, match=r"train\.idx: the index file is empty, expected one 'key<TAB>offset'"):
        recordio.MXIndexedRecordIO(idx, rec, "r")


def test_malformed_idx_line(tmp_path):
    idx, rec = _small_set(tmp_path)
    with open(idx, "a") as handle:
        handle.write("7 oops\n")
    with pytest.raises(recordio.RecordIOError, match=r"train\.idx: line 4 is '7 oops', expected 'key<TAB>offset'"):
        recordio.MXIndexedRecordIO(idx, rec, "r")


def test_offset_past_end(tmp_path):
    idx, rec = _small_set(tmp_path)
    with open(idx, "a") as handle:
        handle.write("9\t999999\n")
    reader = recordio.MXIndexedRecordIO(idx, rec, "r")
    with pytest.raises(recordio.BadRecordError, match=r"train\.rec: key 9: offset 999999 .* past the end of the file \(216 bytes\)"):
        reader.read_idx(9)


def test_bad_magic(tmp_path):
    idx, rec = _small_set(tmp_path)
    with open(idx, "a") as handle:
        handle.write("9\t12\n")  # points inside record 0's payload
    reader = recordio.MXIndexedRecordIO(idx, rec, "r")
    with pytest.raises(recordio.BadRecordError, match=r"train\.rec: key 9 at offset 12: bad magic 0x[0-9a-f]{8} .*expected 0xced7230a"):
        reader.read_idx(9)


def test_truncated_record(tmp_path):
    idx, rec = _small_set(tmp_path)
    data = open(rec, "rb").read()
    open(rec, "wb").write(data[:-20])
    reader = recordio.MXIndexedRecordIO(idx, rec, "r")
    with pytest.raises(recordio.BadRecordError, match=r"train\.rec: key 2 at offset 144: truncated record: expected 64 payload bytes"):
        reader.read_idx(2)


def test_undecodable_image():
    with pytest.raises(recordio.BadRecordError, match=r"key 5: cannot decode the 6 image bytes, expected a JPEG/PNG"):
        recordio.decode_image(b"notjpg", "train.rec: key 5")


def test_short_payload():
    with pytest.raises(recordio.BadRecordError, match=r"train\.rec: key 1: record payload has 3 bytes, expected at least"):
        recordio.unpack(b"abc", "train.rec: key 1")


def test_unreadable_rec(tmp_path):
    idx, _ = _small_set(tmp_path)
    os.mkdir(tmp_path / "dir.rec")
    with pytest.raises(recordio.RecordIOError, match=r"dir\.rec: is a directory, expected a record file"):
        recordio.MXIndexedRecordIO(idx, str(tmp_path / "dir.rec"), "r")


def test_missing_key(tmp_path):
    idx, rec = _small_set(tmp_path)
    with pytest.raises(KeyError, match=r"key 17 is not in the index"):
        recordio.MXIndexedRecordIO(idx, rec, "r").read_idx(17)


def test_decode_image_refuses_data_libjpeg_would_decode_into_garbage(insightface_fixtures):
    reader = recordio.MXIndexedRecordIO(os.path.join(insightface_fixtures, "A", "train.idx"),
                                        os.path.join(insightface_fixtures, "A", "train.rec"), "r")
    jpeg = recordio.unpack(reader.read_idx(9))[1]
    clean = recordio.decode_image(jpeg, "k9", strict=True)
    assert np.array_equal(clean, recordio.decode_image(jpeg, "k9", check=False))
    middle = len(jpeg) // 2
    wiped = jpeg[:middle] + bytes(64) + jpeg[middle + 64:]
    assert recordio.decode_image(wiped, check=False).shape == (112, 112, 3)  # garbage, silently
    for strict in (False, True):
        with pytest.raises(recordio.BadRecordError, match=r"^train.rec: key 9: corrupt JPEG: 64 bytes of 0x00 in a "
                                                          r"row at byte \d+ of the scan data"):
            recordio.decode_image(wiped, "train.rec: key 9", strict=strict)
    with pytest.raises(recordio.BadRecordError, match=r"^k: corrupt JPEG: no end-of-image marker"):
        recordio.decode_image(jpeg[:-40], "k")
    warned = jpeg[:middle] + bytes([0x12, 0x34]) * 8 + jpeg[middle + 16:]
    assert recordio.decode_image(warned).shape == (112, 112, 3)  # the default check cannot see this one
    with pytest.raises(recordio.BadRecordError, match=r"^k: corrupt image data: the decoder reported Corrupt JPEG "
                                                      r"data: 27 extraneous bytes before marker 0xd9$"):
        recordio.decode_image(warned, "k", strict=True)
