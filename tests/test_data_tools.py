"""tools/pack_rec.py, shuffle_rec.py, rec_info.py, make_synthetic.py on tiny inputs."""
import hashlib
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from utils.data.datasets import RecordDataset
from tools import make_synthetic, pack_rec, rec_info, shuffle_rec
from utils.data import recordio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_folder(root, counts=(3, 2, 4)):
    for identity, count in enumerate(counts):
        os.makedirs(root / f"id{identity}")
        for i in range(count):
            image = np.full((112, 112, 3), 20 * identity + 5 * i, np.uint8)
            cv2.imwrite(str(root / f"id{identity}" / f"{i}.jpg"), image)
    return root


def test_pack_folder_header_layout(tmp_path, capsys):
    src = _image_folder(tmp_path / "src")
    assert pack_rec.main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert capsys.readouterr().out == (f"wrote {tmp_path / 'out' / 'train.rec'}, train.idx, property: num_images=9 "
                                       f"num_classes=3 layout=header\n")
    data = RecordDataset(str(tmp_path / "out"), flip=False)
    assert (data.layout, data.num_classes, data.num_image) == ("header", 3, 9)
    assert [data[i][1] for i in range(9)] == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    # 112x112 JPEGs are stored byte for byte.
    _, img, _ = data.read_record(0)
    assert img == open(src / "id0" / "0.jpg", "rb").read()
    reader = data.reader
    header, _ = recordio.unpack(reader.read_idx(0))
    assert header.label.tolist() == [10.0, 13.0] and header.id2 == 1
    assert recordio.unpack(reader.read_idx(11))[0].label.tolist() == [4.0, 6.0]
    assert open(tmp_path / "out" / "property").read() == "3,112,112\n"


def test_pack_list_file_plain_with_resize_in_parallel(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"im{i}.png"
        cv2.imwrite(str(path), np.full((64, 80, 3), 30 * i, np.uint8))
        paths.append(path)
    (tmp_path / "list.txt").write_text("".join(f"{p.name}\t{i % 2}\n" for i, p in enumerate(paths)))
    assert pack_rec.main([str(tmp_path / "list.txt"), str(tmp_path / "out"), "--plain", "--workers", "2"]) == 0
    data = RecordDataset(str(tmp_path / "out"), flip=False)
    assert (data.layout, data.num_classes, data.num_image) == ("plain", 2, 6)
    assert data.image_keys.tolist() == list(range(6))
    assert tuple(data[0][0].shape) == (3, 112, 112)


def test_pack_refuses_overwrite_and_bad_inputs(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", counts=(1,))
    assert pack_rec.main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert pack_rec.main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    assert "already holds train.rec, train.idx, property; pass --force" in capsys.readouterr().err
    assert pack_rec.main([str(src), str(tmp_path / "out"), "--workers", "1", "--force"]) == 0
    (tmp_path / "bad.txt").write_text("a.jpg 3\n")
    with pytest.raises(pack_rec.PackError, match=r"bad\.txt: line 1: expected 'path<TAB>label'"):
        pack_rec.read_list_file(str(tmp_path / "bad.txt"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(pack_rec.PackError, match=r"broken\.jpg: cannot decode the image"):
        pack_rec.encode_file((str(tmp_path / "broken.jpg"), 112, 112, 95))
    os.makedirs(tmp_path / "empty" / "x")
    assert pack_rec.main([str(tmp_path / "empty"), str(tmp_path / "o2")]) == 2
    assert "no images found" in capsys.readouterr().err


def _rec_content(out_dir):
    """(label, image bytes) per image record of a plain set, read with utils.data.recordio."""
    reader = recordio.MXIndexedRecordIO(str(out_dir / "train.idx"), str(out_dir / "train.rec"), "r")
    content = []
    for key in reader.keys:
        header, img = recordio.unpack(reader.read_idx(key))
        content.append((int(header.label), img))
    reader.close()
    return content


def test_interrupted_pack_leaves_no_set_and_keeps_the_old_one(tmp_path, monkeypatch):
    src = _image_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert pack_rec.main([str(src), str(out), "--workers", "1"]) == 0
    before = {name: (out / name).read_bytes() for name in ("train.rec", "train.idx", "property")}
    calls = []
    real = pack_rec.try_encode

    def interrupted(job):
        calls.append(job)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the images
        return real(job)

    monkeypatch.setattr(pack_rec, "try_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_rec.main([str(src), str(out), "--workers", "1", "--force", "--quality", "50"])
    assert len(calls) == 4
    assert {name: (out / name).read_bytes() for name in before} == before  # the old set is untouched
    assert sorted(os.listdir(out)) == ["property", "train.idx", "train.rec"]  # no temporary files left


def test_killed_pack_leaves_no_train_rec_and_a_rerun_needs_no_force(tmp_path):
    src = _image_folder(tmp_path / "src")
    out = tmp_path / "out"
    script = ("import os, signal, sys; from tools import pack_rec; real = pack_rec.try_encode; seen = []\n"
              "def dying(job):\n"
              "    seen.append(job)\n"
              "    if len(seen) == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(job)\n"
              "pack_rec.try_encode = dying\n"
              f"sys.exit(pack_rec.main([{str(src)!r}, {str(out)!r}, '--workers', '1']))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == -9
    assert not (out / "train.rec").exists() and not (out / "train.idx").exists()
    assert pack_rec.main([str(src), str(out), "--workers", "1"]) == 0  # no "pass --force"
    assert sorted(os.listdir(out)) == ["property", "train.idx", "train.rec"]  # leftovers overwritten, renamed


def test_bad_images_are_all_listed_then_stop_or_skip(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", counts=(3, 2, 2))
    (src / "id0" / "1.jpg").write_bytes(b"not a jpeg")
    (src / "id2" / "0.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert pack_rec.main([str(src), str(out), "--workers", "2"]) == 2
    # What it checked, then what it did (or did not) write: never "packed 7/7" before "nothing written".
    checked, err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert re.fullmatch(r"checked 7/7 images: 2 unusable \(\d+ img/s\)", checked), checked
    assert err.startswith("pack_rec: error: 2 of 7 images unusable: ")
    assert err.endswith(f"; all listed in {out / 'bad_images.txt'}; no set written (no train.rec, train.idx, property; "
                        "--on-error skip packs the rest)")
    assert sorted(os.listdir(out)) == ["bad_images.txt"]
    listed = (out / "bad_images.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(src / "id0" / "1.jpg"), str(src / "id2" / "0.jpg")]
    assert all("cannot decode the image" in line for line in listed)
    assert pack_rec.main([str(src), str(out), "--workers", "1", "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert re.fullmatch(r"checked 7/7 images: 2 unusable \(\d+ img/s\)", captured.err.strip()), captured.err
    assert captured.out.splitlines() == [f"wrote {out / 'train.rec'}, train.idx, property: num_images=5 num_classes=3 "
                                         f"layout=header; 2 unusable images skipped, listed in {out / 'bad_images.txt'}"]
    data = RecordDataset(str(out), flip=False)
    assert [data[i][1] for i in range(5)] == [0, 0, 1, 1, 2]  # class ids unchanged by the skips
    _, img, _ = data.read_record(1)
    assert img == (src / "id0" / "2.jpg").read_bytes()
    assert len((out / "bad_images.txt").read_text().splitlines()) == 2
    # A class whose every image is bad cannot keep its id: stop, even with skip.
    (src / "id1" / "0.jpg").write_bytes(b"x")
    (src / "id1" / "1.jpg").write_bytes(b"x")
    assert pack_rec.main([str(src), str(tmp_path / "o2"), "--workers", "1", "--on-error", "skip"]) == 2
    assert "class 1 has no usable image left" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "train.rec").exists()


def test_pack_gives_the_class_ids_training_on_the_folder_gives(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", counts=(1, 2))
    os.makedirs(src / ".ipynb_checkpoints")  # hidden: not an identity when training on the folder either
    cv2.imwrite(str(src / ".ipynb_checkpoints" / "0.jpg"), np.zeros((112, 112, 3), np.uint8))
    assert pack_rec.main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert "num_images=3 num_classes=2 layout=header" in capsys.readouterr().out
    packed = RecordDataset(str(tmp_path / "out"), (112, 112), flip=False)
    assert packed.labels().tolist() == [0, 1, 1]


def test_empty_identity_folder_stops_instead_of_shifting_ids(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", counts=(1, 1))
    os.makedirs(src / "id0b_empty")  # sorts between id0 and id1
    assert pack_rec.main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'id0b_empty'}: identity folder holds no image file" in err
    assert "1 of 3 identity folders are empty: class ids follow the sorted folder names" in err
    assert not (tmp_path / "out" / "train.rec").exists()


def test_im2rec_lst_round_trip(tmp_path, capsys):
    images = tmp_path / "images"
    os.makedirs(images / "sub")
    rows = []
    for index in range(5):
        name = f"sub/f{index}.jpg"
        cv2.imwrite(str(images / name), np.full((112, 112, 3), 40 * index, np.uint8))
        rows.append(f"{index}\t{float(index % 3):f}\t{name}\n")  # im2rec writes labels as 2.000000
    (tmp_path / "train.lst").write_text("".join(rows))
    out = tmp_path / "out"
    assert pack_rec.main([str(tmp_path / "train.lst"), str(out), "--image-root", str(images), "--plain",
                          "--workers", "1"]) == 0
    assert "num_images=5 num_classes=3 layout=plain" in capsys.readouterr().out
    expected = sorted(((index % 3, (images / f"sub/f{index}.jpg").read_bytes()) for index in range(5)),
                      key=lambda item: item[0])
    assert _rec_content(out) == expected  # grouped by class, bytes unchanged
    (tmp_path / "bad.lst").write_text("0\t1.5\tsub/f0.jpg\n")
    assert pack_rec.main([str(tmp_path / "bad.lst"), str(tmp_path / "o2")]) == 2
    assert "bad.lst: line 1: label '1.5' is not a whole number" in capsys.readouterr().err


def test_output_under_a_file_is_a_one_line_error(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", counts=(1,))
    (tmp_path / "file").write_text("")
    assert pack_rec.main([str(src), str(tmp_path / "file" / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'file'} is a file, not a folder" in err


def test_shuffle_to_plain_keeps_every_image(insightface_fixtures, tmp_path, capsys):
    source = os.path.join(insightface_fixtures, "D")
    assert shuffle_rec.main([source, str(tmp_path / "out"), "--seed", "1"]) == 0
    original = RecordDataset(source, flip=False)
    shuffled = RecordDataset(str(tmp_path / "out"), flip=False)
    assert (shuffled.layout, shuffled.num_classes, shuffled.num_image) == ("plain", 3, 12)
    assert shuffled.image_keys.tolist() == list(range(12))

    def content(data):
        out = []
        for i in range(len(data)):
            header, img, _ = data.read_record(i)
            out.append((recordio.class_of(header), hashlib.sha256(img).hexdigest()))
        return out

    assert sorted(content(shuffled)) == sorted(content(original))
    assert content(shuffled) != content(original)
    assert shuffle_rec.main([source, str(tmp_path / "out")]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_rec_info_and_verify(insightface_fixtures, tmp_path, capsys):
    assert rec_info.main([os.path.join(insightface_fixtures, "A"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "num_images=480 num_classes=40 layout=header"
    assert "10-19  40" in out and "verify: all 480 images in " in out
    # A plain set with one undecodable record.
    writer = recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    good = cv2.imencode(".jpg", np.zeros((112, 112, 3), np.uint8))[1].tobytes()
    for key, img in enumerate([good, b"broken", good]):
        writer.write_idx(key, recordio.pack(recordio.IRHeader(0, float(key % 2), key, 0), img))
    writer.close()
    assert rec_info.main([str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "num_images=3 num_classes=2 layout=plain"
    assert f"verify: 1 bad records in {tmp_path / 'train.rec'}, keys: 1" in out
    assert f"\n  {tmp_path / 'train.rec'}: key 1 offset " in out
    assert rec_info.main([str(tmp_path / "missing")]) == 2
    assert "missing/train.rec: record file not found" in capsys.readouterr().err


def test_make_synthetic_cli(tmp_path, capsys):
    out = str(tmp_path / "syn")
    args = [out, "--identities", "4", "--images-per-identity", "3", "--val-identities", "3", "--val-pairs", "6"]
    assert make_synthetic.main(args) == 0
    assert "num_images=12 num_classes=4" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["property", "synthetic.json", "synthetic_heldout.bin",
                                       "synthetic_unseen.bin", "train.idx", "train.rec"]
    assert make_synthetic.main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert make_synthetic.main(args + ["--force"]) == 0


@pytest.mark.parametrize("tool", ["pack_rec", "shuffle_rec", "rec_info", "make_synthetic"])
def test_cli_help_runs_as_script_and_module(tool):
    for command in ([sys.executable, os.path.join("tools", f"{tool}.py"), "--help"],
                    [sys.executable, "-m", f"tools.{tool}", "--help"]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


# ---------------------------------------------------------------- shards: pack_rec --shards, shuffle_rec, rec_info

def _sharded(tmp_path, counts, *extra):
    src = _image_folder(tmp_path / "src", counts)
    assert pack_rec.main([str(src), str(tmp_path / "shards"), "--workers", "3", *extra]) == 0
    original = RecordDataset  # the folder packed as one pack: the class ids a shard list must give back
    assert pack_rec.main([str(src), str(tmp_path / "one"), "--workers", "1"]) == 0
    return tmp_path / "shards", original(str(tmp_path / "one"), flip=False).labels()


def test_pack_shards_keep_identities_whole_and_read_back_as_the_one_pack(tmp_path, capsys):
    from utils.data.sources import build_sources

    shards, labels = _sharded(tmp_path, (3, 2, 4, 1, 5, 2, 3), "--shards", "3")
    out = capsys.readouterr().out
    assert out.count("wrote ") == 4 and "train_2.rec" in out
    parts = [RecordDataset(str(shards), flip=False, name=f"train_{i}") for i in range(3)]
    assert all(p.layout == "header" for p in parts)  # insightface layout: header0, identity records
    # whole identities, each cut at the class boundary nearest i/3 of the 20 images (6.7 -> 5, 13.3 -> 15)
    assert [len(p) for p in parts] == [5, 10, 5]
    for part in parts:
        assert open(part.property_path).read() == f"{part.num_classes},112,112\n"
    assert open(shards / "property").read() == "7,112,112\n"
    union = build_sources([str(shards)], (112, 112), False)
    assert union.num_classes == 7 and np.array_equal(union.labels(), labels)
    assert rec_info.main([str(shards), "--verify"]) == 0 and "0 bad of" in capsys.readouterr().out
    assert rec_info.main([str(shards / "train_1.rec"), "--verify"]) == 0  # one shard on its own
    one = capsys.readouterr().out.splitlines()
    assert one[1].split()[1:4] == ["recordio", "10", "3"] and one[-1].endswith("train_1.rec: 0 bad of 14 entries")
    with pytest.raises(pack_rec.PackError, match="more shards than the 7 identities"):
        pack_rec.shard_plan(labels.tolist(), 8)


def test_pack_shards_split_identities_with_a_map_that_merges_them(tmp_path):
    from utils.data.sources import build_sources

    shards, labels = _sharded(tmp_path, (3, 3, 3), "--shards", "2", "--split-identities")
    assert [len(RecordDataset(str(shards), flip=False, name=f"train_{i}")) for i in range(2)] == [5, 4]
    rows = (shards / "identity_map.csv").read_text().splitlines()
    assert rows == ["source,label,global_id", f"{shards.resolve()},1,1", f"{shards.resolve()},2,1"]
    merged = build_sources([str(shards)], (112, 112), False, str(shards / "identity_map.csv"))
    assert merged.num_classes == 3 and np.array_equal(merged.labels(), labels)
    assert build_sources([str(shards)], (112, 112), False).num_classes == 4  # without the map: 2 + 2


def test_pack_shards_with_a_bad_image_keep_no_shard(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", (3, 2, 4))
    (src / "id2" / "0.jpg").write_bytes(b"not an image")
    assert pack_rec.main([str(src), str(tmp_path / "shards"), "--shards", "2", "--workers", "2"]) == 2
    assert "shard train_1" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path / "shards") if n.endswith((".rec", ".idx", ".property"))]


def test_shuffle_rec_per_shard_and_on_the_whole_list(tmp_path, insightface_fixtures):
    from utils.data.sources import build_sources

    shards, labels = _sharded(tmp_path, (3, 2, 4, 1), "--shards", "2")
    assert shuffle_rec.main([str(shards), str(tmp_path / "shuffled"), "--seed", "2"]) == 0
    shuffled = build_sources([str(tmp_path / "shuffled")], (112, 112), False)
    assert len(shuffled.parts) == 2 and all(p.layout == "plain" for p in shuffled.parts)
    assert sorted(shuffled.labels()) == sorted(labels) and not np.array_equal(shuffled.labels(), labels)
    a, d = os.path.join(insightface_fixtures, "A"), os.path.join(insightface_fixtures, "D")
    assert shuffle_rec.main([a, d, str(tmp_path / "union")]) == 0
    union = RecordDataset(str(tmp_path / "union"), flip=False)
    assert (union.layout, union.num_classes, len(union)) == ("plain", 43, 492)
    assert np.array_equal(np.bincount(union.labels()), np.bincount(build_sources([a, d], (112, 112), False).labels()))
