"""tools/rec_info.py --verify on corrupted copies of the mxnet-written fixture pack A."""
import json
import os
import shutil
import struct

import pytest

from tools import rec_info


def _copy_pack(insightface_fixtures, tmp_path):
    src = os.path.join(insightface_fixtures, "A")
    dst = tmp_path / "A"
    dst.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(os.path.join(src, name), dst / name)
    manifest = json.load(open(os.path.join(src, "manifest.json")))
    return dst, {record["key"]: record for record in manifest["records"]}


def _patch(path, offset, data):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _run(folder, capsys, *extra):
    code = rec_info.main([str(folder), "--verify", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clean_pack_verifies(insightface_fixtures, capsys):
    code, out, _ = _run(os.path.join(insightface_fixtures, "A"), capsys)
    assert code == 0 and out.splitlines()[0] == "num_images=480 num_classes=40 layout=header"
    rec = os.path.join(insightface_fixtures, "A", "train.rec")
    assert out.splitlines()[-1] == (f"verify: all 480 images in {rec} decode cleanly; all 521 index entries, labels "
                                    "and header0 are consistent")
    code, out, _ = _run(os.path.join(insightface_fixtures, "A"), capsys, "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] is True and result["bad"] == [] and result["num_entries"] == 521
    assert result["images_per_identity"] == {"min": 12, "median": 12.0, "max": 12}


def test_extra_index_entry_past_the_end(insightface_fixtures, tmp_path, capsys):
    folder, _ = _copy_pack(insightface_fixtures, tmp_path)
    size = os.path.getsize(folder / "train.rec")
    with open(folder / "train.idx", "a") as handle:
        handle.write(f"521\t{size + 64}\n")
    code, out, err = _run(folder, capsys)
    assert code == 1
    assert f"key 521 at offset {size + 64}" in err  # the summary refuses the pair in one line
    assert "keys: 521 521" not in out
    lines = out.splitlines()
    assert lines[0] == f"verify: 1 bad records in {folder / 'train.rec'}, keys: 521"
    assert lines[1] == (f"  {folder / 'train.rec'}: key 521 offset {size + 64}: offset {size + 64} is past the end of "
                        f"{folder / 'train.rec'} ({size} bytes); the key is outside the keys 0..520 that "
                        f"header0 describes (an entry of another pack?)")
    code, out, _ = _run(folder, capsys, "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False
    assert [(bad["key"], bad["offset"], bad["file"]) for bad in result["bad"]] == [(521, size + 64,
                                                                                   str(folder / "train.rec"))]


def test_zeroed_jpeg_and_bad_labels_and_framing(insightface_fixtures, tmp_path, capsys):
    folder, records = _copy_pack(insightface_fixtures, tmp_path)
    rec = folder / "train.rec"
    # key 7: 64 zero bytes in the middle of its JPEG (libjpeg decodes this without a word)
    jpeg_start = records[7]["offset"] + 8 + 24
    _patch(rec, jpeg_start + records[7]["jpeg_len"] // 2, bytes(64))
    # key 20: label 99 (only 40 classes); key 30: label 5 while its identity record says class 2
    _patch(rec, records[20]["offset"] + 8 + 4, struct.pack("<f", 99.0))
    _patch(rec, records[30]["offset"] + 8 + 4, struct.pack("<f", 5.0))
    # key 40: a part header claiming more bytes than the file holds
    _patch(rec, records[40]["offset"] + 4, struct.pack("<I", (1 << 29) - 1))
    code, out, _ = _run(folder, capsys)
    assert code == 1
    lines = out.splitlines()
    start = lines.index(f"verify: 4 bad records in {rec}, keys: 7 20 30 40")
    assert lines[start + 1].startswith(f"  {rec}: key 7 offset {records[7]['offset']}: corrupt JPEG: 64 bytes of 0x00 in a row")
    assert lines[start + 2] == (f"  {rec}: key 20 offset {records[20]['offset']}: label 99 out of range, expected "
                                f"0 <= label < num_classes=40")
    assert lines[start + 3] == (f"  {rec}: key 30 offset {records[30]['offset']}: label 5 disagrees with its identity "
                                f"record (class 2)")
    assert lines[start + 4].startswith(f"  {rec}: key 40 offset {records[40]['offset']}: truncated record: expected "
                                       f"{(1 << 29) - 1} payload bytes")


def test_parallel_verify_finds_the_same(insightface_fixtures, tmp_path, capsys):
    folder, records = _copy_pack(insightface_fixtures, tmp_path)
    for key in (3, 250, 470):  # spread over the file, so each worker's part holds one
        _patch(folder / "train.rec", records[key]["offset"] + 8 + 24 + records[key]["jpeg_len"] // 2, bytes(32))
    _patch(folder / "train.rec", records[100]["offset"] + 8 + 4, struct.pack("<f", -1.0))
    code, out, _ = _run(folder, capsys, "--json")
    single = json.loads(out)
    code2, out2, _ = _run(folder, capsys, "--json", "--workers", "3")
    assert code == code2 == 1 and json.loads(out2) == single
    assert [bad["key"] for bad in single["bad"]] == [3, 100, 250, 470]
    assert single["bad"][1]["reason"] == "label -1 out of range, expected 0 <= label < num_classes=40"


def test_libjpeg_warning_counts_as_corrupt(insightface_fixtures, tmp_path, capsys):
    folder, records = _copy_pack(insightface_fixtures, tmp_path)
    jpeg_start = records[9]["offset"] + 8 + 24
    # 16 varied bytes mid-scan: no run of equal bytes, but libjpeg warns and returns an image anyway
    _patch(folder / "train.rec", jpeg_start + records[9]["jpeg_len"] // 2, bytes([0x12, 0x34]) * 8)
    code, out, _ = _run(folder, capsys)
    assert code == 1 and f"verify: 1 bad records in {folder / 'train.rec'}, keys: 9" in out
    assert (f"  {folder / 'train.rec'}: key 9 offset {records[9]['offset']}: corrupt image data: the decoder reported Corrupt JPEG data: "
            f"27 extraneous bytes before marker 0xd9") in out


def test_wrong_offset_and_foreign_property(insightface_fixtures, tmp_path, capsys):
    folder, records = _copy_pack(insightface_fixtures, tmp_path)
    idx = (folder / "train.idx").read_text().replace(f"12\t{records[12]['offset']}\n",
                                                       f"12\t{records[12]['offset'] + 8}\n")
    (folder / "train.idx").write_text(idx)
    (folder / "property").write_text("41,112,112\n")
    code, out, err = _run(folder, capsys)
    assert code == 1 and "property: says 41 classes, but header0" in err
    rec = folder / "train.rec"
    assert f"verify: 2 bad records in {rec}, keys: 0 12" in out or f"verify: 2 bad records in {rec}, keys: 12 0" in out
    # Every line names the file (the issue: "key 12 offset 3032: bad magic ..." named none).
    assert f"\n  {rec}: key 12 offset {records[12]['offset'] + 8}: bad magic 0x" in out
    assert "property says 41 classes, header0 describes 40" in out


def test_unusable_input_exits_2(tmp_path, capsys):
    assert rec_info.main([str(tmp_path), "--verify"]) == 2
    assert "train.rec: record file not found" in capsys.readouterr().err
    (tmp_path / "train.rec").write_bytes(b"")
    (tmp_path / "train.idx").write_text("0\tx\n")
    assert rec_info.main([str(tmp_path), "--verify", "--json"]) == 2
    out, err = capsys.readouterr()
    assert "line 1 is '0\\tx', expected 'key<TAB>offset' integers" in json.loads(out)["error"]
    assert err.count("\n") == 1


@pytest.mark.parametrize("pack", ["D"])
def test_split_records_verify(insightface_fixtures, pack, capsys):
    code, out, _ = _run(os.path.join(insightface_fixtures, pack), capsys)
    assert code == 0 and "verify: all 12 images in " in out and " decode cleanly; all 16 index entries" in out


def test_a_list_of_sources_is_summarised_and_verified_per_shard(insightface_fixtures, tmp_path, capsys):
    a, d = os.path.join(insightface_fixtures, "A"), os.path.join(insightface_fixtures, "D")
    assert rec_info.main([a, d, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["num_images"], summary["num_classes"]) == (492, 43)
    assert [(s["path"], s["num_images"], s["num_classes"], s["labels"]) for s in summary["sources"]] == [
        (a, 480, 40, [0, 39]), (d, 12, 3, [40, 42])]
    assert rec_info.main([a, d]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["source", "kind", "images", "classes", "labels", "share"]
    assert table[-1].split() == ["union", "492", "43", "0..42", "100.00%"]
    # a sharded pack (D as shard 0, a copy of A with one broken image as shard 1): verified shard by shard
    shards = tmp_path / "shards"
    shards.mkdir()
    for number, src in enumerate((d, a)):
        for ext in ("rec", "idx"):
            shutil.copy(os.path.join(src, f"train.{ext}"), shards / f"train_{number}.{ext}")
    manifest = json.load(open(os.path.join(a, "manifest.json")))
    record = next(r for r in manifest["records"] if r["key"] == 7)
    _patch(shards / "train_1.rec", record["offset"] + 8 + 24 + 2, b"\x00" * 64)  # inside the JPEG: undecodable
    assert rec_info.main([str(shards), "--verify", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert [(b["key"], b["file"]) for b in result["bad"]] == [(7, str(shards / "train_1.rec"))]
    assert result["num_images"] == 492 and result["sources"][0]["parts"] == 2
    assert rec_info.main([a, str(tmp_path / "missing")]) == 2
    assert "missing is not a folder" in capsys.readouterr().err
