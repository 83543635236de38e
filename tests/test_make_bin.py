"""tools/make_bin.py: LFW pairs.txt / CSV pairs -> lfw.bin format, read back and evaluated by eval.verification."""
import os

import cv2
import numpy as np
import pytest
import torch

from eval.verification import read_bin
from tools import make_bin
from utils.faces.align import norm_crop

NUM_PAIRS = 20


@pytest.fixture(scope="module")
def lfw_layout(tmp_path_factory, insightface_fixtures):
    """The first 20 pairs of the mxnet-written pairs.bin laid out as LFW: root/name/name_000N.jpg + pairs.txt."""
    root = tmp_path_factory.mktemp("lfw")
    encoded, issame = read_bin(os.path.join(insightface_fixtures, "pairs.bin"))
    lines = [f"1 {NUM_PAIRS}"]
    for pair in range(NUM_PAIRS):
        if issame[pair]:
            names = [(f"Person_{pair:02d}", 1), (f"Person_{pair:02d}", 2)]
            lines.append(f"Person_{pair:02d} 1 2")
        else:
            names = [(f"First_{pair:02d}", 1), (f"Second_{pair:02d}", 3)]
            lines.append(f"First_{pair:02d} 1 Second_{pair:02d} 3")
        for (name, number), data in zip(names, encoded[2 * pair: 2 * pair + 2]):
            os.makedirs(root / "images" / name, exist_ok=True)
            (root / "images" / name / f"{name}_{number:04d}.jpg").write_bytes(data)
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root, encoded[: 2 * NUM_PAIRS], issame[:NUM_PAIRS]


def test_lfw_pairs_round_trip_through_verification(lfw_layout, insightface_fixtures, tmp_path, capsys):
    root, encoded, issame = lfw_layout
    assert make_bin.main([str(root / "pairs.txt"), str(root / "images"), str(tmp_path / "mine.bin")]) == 0
    assert f"{NUM_PAIRS} pairs ({int(issame.sum())} same" in capsys.readouterr().out
    bins, got_issame = read_bin(str(tmp_path / "mine.bin"))
    assert bins == encoded  # 112x112 JPEGs are stored byte for byte
    assert got_issame.tolist() == issame.tolist()
    # The same model on our .bin and on the mxnet-written original gives the same numbers.
    os.symlink(os.path.join(insightface_fixtures, "pairs_py2.bin"), tmp_path / "original.bin")
    from backbones import get_model
    from eval.verification import main
    torch.manual_seed(0)
    torch.save(get_model("tiny", num_features=16).state_dict(), tmp_path / "model.pt")
    assert main(["--model", str(tmp_path / "model.pt"), "--network", "tiny", "--data-dir", str(tmp_path),
                 "--targets", "mine,original", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    ours = [line.split("]", 1)[1] for line in out.splitlines() if line.startswith("[mine]")]
    theirs = [line.split("]", 1)[1] for line in out.splitlines() if line.startswith("[original]")]
    assert len(ours) == 3 and ours == theirs


def test_csv_pairs_resize_and_header(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    (tmp_path / "pairs.csv").write_text("path1,path2,same\na.png,b.png,1\na.png,c.png,false\nb.png, c.png ,no\n")
    assert make_bin.main([str(tmp_path / "pairs.csv"), str(tmp_path), str(tmp_path / "out" / "p.bin"),
                          "--image-size", "96"]) == 0
    assert "3 pairs (1 same, 2 different), 3 distinct images" in capsys.readouterr().out
    bins, issame = read_bin(str(tmp_path / "out" / "p.bin"))
    assert issame.tolist() == [True, False, False]
    first = cv2.imdecode(np.frombuffer(bins[0], np.uint8), cv2.IMREAD_COLOR)
    assert first.shape == (96, 96, 3)
    assert bins[0] == bins[2]  # "a.png" is encoded once and reused


def test_landmarks_align_each_image(tmp_path):
    rng = np.random.default_rng(1)
    photo = cv2.GaussianBlur(rng.integers(0, 255, (200, 180, 3), dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(tmp_path / "x.png"), photo)
    points = [70, 90, 110, 92, 90, 115, 74, 140, 106, 141]
    (tmp_path / "landmarks.txt").write_text("x.png " + " ".join(map(str, points)) + "\n")
    (tmp_path / "pairs.csv").write_text("x.png,x.png,1\n")
    assert make_bin.main([str(tmp_path / "pairs.csv"), str(tmp_path), str(tmp_path / "a.bin"),
                          "--landmarks", str(tmp_path / "landmarks.txt"), "--quality", "100"]) == 0
    bins, _ = read_bin(str(tmp_path / "a.bin"))
    stored = cv2.imdecode(np.frombuffer(bins[0], np.uint8), cv2.IMREAD_COLOR).astype(np.float64)
    expected = norm_crop(photo, np.asarray(points, np.float64).reshape(5, 2), 112).astype(np.float64)
    assert np.abs(stored - expected).mean() < 1.5  # JPEG quality 100 round-off only


def test_errors_are_one_line_and_leave_no_file(lfw_layout, tmp_path, capsys):
    root, _, _ = lfw_layout
    (tmp_path / "pairs.txt").write_text("10 300\nPerson_00 1 2\nNobody 1 Noone 2\nGhost 4 5\n")
    assert make_bin.main([str(tmp_path / "pairs.txt"), str(root / "images"), str(tmp_path / "x.bin")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_bin: error: 4 image(s) unusable: ")
    assert f"{root / 'images' / 'Nobody' / 'Nobody_0001.jpg'} (not found)" in err and "1 more" in err
    assert not (tmp_path / "x.bin").exists()
    (tmp_path / "bad.txt").write_text("Person_00 1\n")
    assert make_bin.main([str(tmp_path / "bad.txt"), str(root / "images"), str(tmp_path / "x.bin")]) == 2
    assert "bad.txt line 1: expected 'name n1 n2' (same) or 'name1 n1 name2 n2' (different)" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert make_bin.main([str(root / "pairs.txt"), str(root / "images"), str(tmp_path / "file" / "x.bin")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'file'} exists and is not a folder" in err
    (tmp_path / "broken.csv").write_text("a.png,b.png,maybe\nc.png,d.png,1\n")
    assert make_bin.main([str(tmp_path / "broken.csv"), str(tmp_path), str(tmp_path / "y.bin")]) == 2
    assert "broken.csv line 1" not in capsys.readouterr().err  # first row that is no pair = header
    (tmp_path / "broken.csv").write_text("c.png,d.png,1\na.png,b.png,maybe\n")
    assert make_bin.main([str(tmp_path / "broken.csv"), str(tmp_path), str(tmp_path / "y.bin")]) == 2
    assert "broken.csv line 2: same='maybe', expected 1/0" in capsys.readouterr().err


def test_cli_help_runs_as_script_and_module():
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for command in ([sys.executable, os.path.join("tools", "make_bin.py"), "--help"],
                    [sys.executable, "-m", "tools.make_bin", "--help"]):
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "LFW pairs.txt" in result.stdout, result.stderr
