"""Similarity-transform alignment and the align_faces tool."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tools.align_faces import align_folder
from utils.faces.align import ARCFACE_TEMPLATE, AlignmentError, estimate_norm, norm_crop, template_for, umeyama

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def similarity(points, angle, scale, shift):
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T * scale + shift


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_recovers_exact_similarity():
    landmarks = similarity(ARCFACE_TEMPLATE - 56, 0.4, 1.7, np.array([200.0, 150.0]))
    matrix = estimate_norm(landmarks)
    assert np.allclose(apply(matrix, landmarks), ARCFACE_TEMPLATE, atol=1e-9)


def test_least_squares_on_noisy_points():
    """Umeyama's answer equals the linear least-squares similarity [[a, -b], [b, a]] + t."""
    rng = np.random.default_rng(0)
    source = similarity(ARCFACE_TEMPLATE, -0.2, 0.8, np.array([10.0, 5.0])) + rng.normal(0, 2.0, (5, 2))
    rows, values = [], []
    for (x, y), (u, v) in zip(source, ARCFACE_TEMPLATE):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        values += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(values), rcond=None)[0]
    expected = np.array([[a, -b, tx], [b, a, ty]])
    assert np.allclose(umeyama(source, ARCFACE_TEMPLATE), expected, atol=1e-9)


def test_norm_crop_moves_landmark_pixels_to_template():
    image = np.zeros((300, 400, 3), np.uint8)
    landmarks = similarity(ARCFACE_TEMPLATE - 56, 0.3, 2.0, np.array([220.0, 160.0]))
    for x, y in landmarks:
        cv2.circle(image, (int(round(x)), int(round(y))), 4, (255, 255, 255), -1)
    crop = norm_crop(image, landmarks)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE:
        assert crop[int(round(y)), int(round(x))].min() > 200
    assert norm_crop(image, landmarks, 224).shape == (224, 224, 3)
    assert np.allclose(template_for(128)[0], [46.2946, 51.6963])


def test_bad_landmarks():
    with pytest.raises(AlignmentError, match=r"landmarks: expected 5 landmarks \(10 numbers\), got 8 numbers"):
        estimate_norm(np.zeros((4, 2)))
    with pytest.raises(AlignmentError, match=r"landmarks are degenerate"):
        estimate_norm(np.ones((5, 2)))
    with pytest.raises(AlignmentError, match=r"image_size 100 is not a multiple of 112 or 128"):
        template_for(100)


def _write_raw(tmp_path):
    raw = tmp_path / "raw" / "id0"
    raw.mkdir(parents=True)
    landmarks = similarity(ARCFACE_TEMPLATE - 56, 0.1, 1.5, np.array([120.0, 110.0]))
    cv2.imwrite(str(raw / "a.png"), np.full((240, 260, 3), 90, np.uint8))
    return landmarks


def test_align_folder_and_bad_lines(tmp_path):
    landmarks = _write_raw(tmp_path)
    numbers = " ".join(f"{v:.3f}" for v in landmarks.ravel())
    good = tmp_path / "good.txt"
    good.write_text(f"# comment\nid0/a.png {numbers}\n")
    assert align_folder(str(tmp_path / "raw"), str(good), str(tmp_path / "out")) == 1
    assert cv2.imread(str(tmp_path / "out" / "id0" / "a.jpg")).shape == (112, 112, 3)

    cases = {
        "id0/a.png 1 2 3 4 5 6 7": r"short\.txt line 1: expected an image path and 10 numbers \(5 x,y landmarks\), got 7 values",
        f"id0/missing.png {numbers}": r"missing\.txt line 1: image not found: .*id0/missing\.png",
        "id0/a.png 1 2 3 4 5 6 7 8 9 x": r"nan\.txt line 1: landmark values must be numbers",
    }
    for (line, message), name in zip(cases.items(), ("short", "missing", "nan")):
        path = tmp_path / f"{name}.txt"
        path.write_text(line + "\n")
        with pytest.raises(AlignmentError, match=message):
            align_folder(str(tmp_path / "raw"), str(path), str(tmp_path / "out2"))
    (tmp_path / "raw" / "id0" / "bad.jpg").write_bytes(b"not an image")
    path = tmp_path / "bad.txt"
    path.write_text(f"\nid0/bad.jpg {numbers}\n")
    with pytest.raises(AlignmentError, match=r"bad\.txt line 2: not a readable image"):
        align_folder(str(tmp_path / "raw"), str(path), str(tmp_path / "out3"))


def test_cli(tmp_path):
    landmarks = _write_raw(tmp_path)
    (tmp_path / "lm.txt").write_text("id0/a.png " + " ".join(map(str, landmarks.ravel())) + "\n")
    for command in ([sys.executable, "tools/align_faces.py"], [sys.executable, "-m", "tools.align_faces"]):
        done = subprocess.run(command + ["--input-dir", str(tmp_path / "raw"), "--landmarks", str(tmp_path / "lm.txt"),
                                         "--output-dir", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "aligned 1 images" in done.stdout
    done = subprocess.run([sys.executable, "tools/align_faces.py", "--input-dir", ".", "--landmarks", "nope.txt",
                           "--output-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "error: nope.txt: landmarks file not found"
