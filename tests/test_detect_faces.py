"""tools/detect_faces.py on a small VGGFace2-style folder built from the fixture photos (half size): faces,
the detections TSV, failures, resume, both modes, the split layout with 2 processes, and --pack."""
import os

import cv2
import numpy as np
import pytest

from tools import detect_faces
from utils.faces.align import norm_crop
from utils.faces.mtcnn import MTCNN

LAYOUT = {  # output name -> (fixture photo, scale); None = an unreadable file
    "alice/a1.jpg": ("angelina_jolie", 0.5), "alice/a2.png": ("kate_siegel", 0.5),
    "bob/b1.jpg": ("paul_rudd", 0.5), "bob/group.jpg": ("multiface", 0.5),
    "carol/blank.png": ("blank", 1.0), "carol/broken.jpg": None, "carol/c1.jpg": ("shea_whigham", 0.5),
}


def write_photo(facenet_fixtures: str, target: str, spec) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if spec is None:
        with open(target, "wb") as handle:
            handle.write(b"\xff\xd8 this is no JPEG")
        return
    name, scale = spec
    image = cv2.imread(os.path.join(facenet_fixtures, "images", f"{name}.png"))
    cv2.imwrite(target, cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, facenet_fixtures) -> str:
    root = str(tmp_path_factory.mktemp("raw"))
    for relative, spec in LAYOUT.items():
        write_photo(facenet_fixtures, os.path.join(root, relative), spec)
    return root


@pytest.fixture(scope="module")
def detector(one_thread):
    return MTCNN()


def read_tsv(path: str) -> dict:
    with open(path) as handle:
        lines = [line.rstrip("\n").split("\t") for line in handle]
    assert lines[0] == detect_faces.COLUMNS
    return {fields[0]: fields for fields in lines[1:]}


def test_arcface_mode_aligns_the_largest_face_lists_failures_and_packs(raw_dir, tmp_path, detector, capsys):
    out = str(tmp_path / "out")
    assert detect_faces.main([raw_dir, out, "--mode", "arcface", "--pack"]) == 0
    printed = capsys.readouterr().out
    assert "7 photos (0 finished before): 5 faces written (photos with several faces: 1, the largest kept), " \
           "1 without a face, 1 unreadable" in printed
    assert "packed 5 faces of 3 identities" in printed
    rows = read_tsv(os.path.join(out, detect_faces.DETECTIONS))
    assert sorted(rows) == sorted(LAYOUT)
    assert [rows[path][1] for path in sorted(LAYOUT)] == ["ok", "ok", "ok", "ok", "no_face", "unreadable", "ok"]
    assert rows["bob/group.jpg"][2] == "6"
    with open(os.path.join(out, detect_faces.FAILED)) as handle:
        assert handle.read() == "carol/blank.png\tno_face\ncarol/broken.jpg\tunreadable\n"
    assert not os.path.exists(os.path.join(out, "carol", "blank.png"))
    for relative in ("alice/a1.jpg", "alice/a2.png", "bob/group.jpg"):
        image = cv2.imread(os.path.join(raw_dir, relative))
        boxes, probs, landmarks = detector.detect(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        numbers = np.array(rows[relative][3:], dtype=np.float64)
        np.testing.assert_allclose(numbers[:4], boxes[0], atol=2e-3)  # the largest face, as printed (3 decimals)
        np.testing.assert_allclose(numbers[4], probs[0], atol=1e-6)
        np.testing.assert_allclose(numbers[5:].reshape(5, 2), landmarks[0], atol=2e-3)
        written = cv2.imread(os.path.join(out, relative))
        assert written.shape == (112, 112, 3)
        expected = norm_crop(image, landmarks[0], 112)
        tolerance = 0.0 if relative.endswith(".png") else 3.0  # JPEG quality 95 of the aligned face
        assert np.abs(written.astype(np.float64) - expected).mean() <= tolerance
    # --pack: train.rec holds the 5 faces, labels by sorted identity, readable by the training reader
    from utils.data.datasets import RecordDataset

    data = RecordDataset(out, image_size=(112, 112), flip=False)
    assert len(data) == 5 and data.num_classes == 3
    assert data.labels().tolist() == [0, 0, 1, 1, 2]
    first, label = data[0]
    assert label == 0
    expected_first = cv2.cvtColor(cv2.imread(os.path.join(out, "alice", "a1.jpg")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(first.numpy().transpose(1, 2, 0), expected_first)  # the same JPEG bytes


def test_facenet_mode_resumes_and_redoes_only_what_is_missing(raw_dir, tmp_path, detector, monkeypatch):
    out = str(tmp_path / "out")
    first = detect_faces.detect_folder(raw_dir, out, "facenet", margin=32)
    assert (first["photos"], first["processed"], first["faces"], first["no_face"], first["unreadable"]) == (7, 7, 5, 1, 1)
    image = cv2.imread(os.path.join(raw_dir, "bob", "b1.jpg"))
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    crop = detector.crop(rgb, detector.detect(rgb)[0][0], 160, 32)
    written = cv2.cvtColor(cv2.imread(os.path.join(out, "bob", "b1.jpg")), cv2.COLOR_BGR2RGB)
    assert written.shape == (160, 160, 3)
    assert np.abs(written.astype(np.float64) - crop).mean() <= 3.0
    before = open(os.path.join(out, detect_faces.DETECTIONS)).read()

    # an interrupted run: one face file missing, the journal's last line cut short
    os.remove(os.path.join(out, "bob", "b1.jpg"))
    journal = os.path.join(out, detect_faces.JOURNAL)
    lines = open(journal).read().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("carol/c1.jpg"))
    with open(journal, "w") as handle:
        handle.writelines(lines[:cut] + lines[cut + 1:] + [lines[cut][:20]])
    seen = []
    original = detect_faces.process_photos
    monkeypatch.setattr(detect_faces, "process_photos", lambda relatives: seen.extend(relatives) or original(relatives))
    again = detect_faces.detect_folder(raw_dir, out, "facenet", margin=32)
    assert sorted(seen) == ["bob/b1.jpg", "carol/c1.jpg"]
    assert (again["processed"], again["resumed"], again["faces"]) == (2, 5, 5)
    assert open(os.path.join(out, detect_faces.DETECTIONS)).read() == before
    assert np.abs(cv2.cvtColor(cv2.imread(os.path.join(out, "bob", "b1.jpg")), cv2.COLOR_BGR2RGB).astype(float)
                  - crop).mean() <= 3.0
    with pytest.raises(detect_faces.DetectFacesError, match="already holds faces made with mode=facenet "
                                                            "image_size=160 margin=32"):
        detect_faces.detect_folder(raw_dir, out, "facenet", margin=0)


@pytest.mark.timeout(120)
def test_split_layout_with_two_processes_packs_the_train_split(tmp_path, facenet_fixtures):
    raw = tmp_path / "raw"
    for relative, spec in {"train/ann/1.jpg": ("angelina_jolie", 0.25), "train/paul/1.jpg": ("paul_rudd", 0.25),
                           "train/paul/2.jpg": ("shea_whigham", 0.25), "test/kate/1.jpg": ("kate_siegel", 0.25)}.items():
        write_photo(facenet_fixtures, str(raw / relative), spec)
    out = str(tmp_path / "out")
    assert detect_faces.main([str(raw), out, "--mode", "arcface", "--workers", "2", "--pack"]) == 0
    rows = read_tsv(os.path.join(out, detect_faces.DETECTIONS))
    assert sorted(rows) == ["test/kate/1.jpg", "train/ann/1.jpg", "train/paul/1.jpg", "train/paul/2.jpg"]
    assert all(row[1] == "ok" for row in rows.values())
    assert os.path.isfile(os.path.join(out, "test", "kate", "1.jpg"))
    from utils.data import recordio

    reader = recordio.MXIndexedRecordIO(os.path.join(out, "train.idx"), os.path.join(out, "train.rec"), "r")
    header0, _ = recordio.unpack(reader.read_idx(0))
    labels = [recordio.class_of(recordio.unpack(reader.read_idx(key))[0]) for key in range(1, int(header0.label[0]))]
    assert labels == [0, 1, 1]  # train/ann, train/paul x2; the test split is not packed


@pytest.mark.parametrize("case, message", [
    ("under_a_file", "OUT_DIR: cannot create {out}: {blocker} is a file, not a folder"),
    ("inside_raw", "OUT_DIR {out} is inside RAW_DIR {raw}: its faces would be read as photos"),
    ("loose_photo", "{raw}/loose.jpg: photo outside an identity folder (expected RAW_DIR/<identity>/<photo> or "
                    "RAW_DIR/<split>/<identity>/<photo>; --flat takes loose photos as one identity each)"),
    ("arcface_margin", "--margin 10: only for --mode facenet (arcface aligns to the template)"),
    ("bad_size", "--image-size 100: image_size 100 is not a multiple of 112 or 128 (the ArcFace template)"),
])
def test_bad_folders_and_options_are_one_line_errors(tmp_path, facenet_fixtures, capsys, case, message):
    raw = tmp_path / "raw"
    write_photo(facenet_fixtures, str(raw / "ann" / "1.jpg"), ("blank", 0.25))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = {"under_a_file": blocker / "out", "inside_raw": raw / "faces"}.get(case, tmp_path / "out")
    extra = {"arcface_margin": ["--margin", "10"], "bad_size": ["--image-size", "100"]}.get(case, [])
    if case == "loose_photo":
        write_photo(facenet_fixtures, str(raw / "loose.jpg"), ("blank", 0.25))
    assert detect_faces.main([str(raw), str(out), "--mode", "arcface"] + extra) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == "detect_faces: error: " + message.format(out=out, raw=raw, blocker=blocker)


# ------------------------------------------------------------------------------------------- tools/inference.py --detect


def test_inference_detect_aligns_or_crops_by_the_model_convention(raw_dir, detector, tmp_path, capsys):
    import torch

    from backbones import get_model
    from tools import inference

    path = os.path.join(raw_dir, "bob", "b1.jpg")
    rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    boxes, _, landmarks = detector.detect(rgb)
    aligned = inference.read_detected_face(path, (112, 112), detector)
    assert aligned.shape == (1, 3, 112, 112) and aligned.dtype == torch.uint8
    np.testing.assert_array_equal(aligned[0].numpy().transpose(1, 2, 0), norm_crop(rgb, landmarks[0], 112))
    cropped = inference.read_detected_face(path, (160, 160), detector, margin=32)
    np.testing.assert_array_equal(cropped[0].numpy().transpose(1, 2, 0), detector.crop(rgb, boxes[0], 160, 32))
    with pytest.raises(inference.InferenceError, match=r"blank\.png: MTCNN found no face"):
        inference.read_detected_face(os.path.join(raw_dir, "carol", "blank.png"), (112, 112), detector)

    torch.manual_seed(0)
    model = get_model("mbf").eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = os.path.join(raw_dir, "alice", "a1.jpg")
    assert inference.main(["--model", str(tmp_path / "model.pt"), "--network", "mbf", "--img", path, "--img2", other,
                           "--detect"]) == 0
    printed = float(capsys.readouterr().out.split("cosine similarity: ")[1].split()[0])
    features = [inference.embed(model, inference.read_detected_face(p, (112, 112), detector), torch.device("cpu"))
                for p in (path, other)]
    assert printed == pytest.approx(inference.cosine(*features), abs=1e-5)


def test_an_unwritable_output_is_a_one_line_error(raw_dir, tmp_path, capsys, monkeypatch):
    def refuse(path, image, quality):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(detect_faces, "_write_atomic_image", refuse)
    out = tmp_path / "out"
    assert detect_faces.main([raw_dir, str(out), "--mode", "arcface"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"detect_faces: error: {out}/alice/a1.jpg: cannot write the face (Permission denied)"


# ------------------------------------------------------------------------------------------- folder scale


def test_a_flat_folder_webp_and_files_that_do_not_decode_are_all_accounted_for(tmp_path, facenet_fixtures, capsys):
    flat = tmp_path / "flat"
    write_photo(facenet_fixtures, str(flat / "ann.jpg"), ("angelina_jolie", 0.5))
    write_photo(facenet_fixtures, str(flat / "paul.webp"), ("paul_rudd", 0.5))
    write_photo(facenet_fixtures, str(flat / "empty.png"), ("blank", 0.5))
    (flat / "notes.txt").write_text("not a photo")
    (flat / "scan.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    out = tmp_path / "out"
    assert detect_faces.main([str(flat), str(out), "--mode", "arcface", "--pack", "--batch", "3"]) == 0
    printed = capsys.readouterr().out
    assert "5 photos (0 finished before): 2 faces written" in printed and "1 without a face, 2 unreadable" in printed
    assert "packed 2 faces of 2 identities" in printed  # a flat folder: one identity per photo
    assert (out / "failed.txt").read_text() == "empty.png\tno_face\nnotes.txt\tunreadable\nscan.heic\tunreadable\n"
    assert cv2.imread(str(out / "paul.webp")).shape == (112, 112, 3) and (out / "ann.jpg").is_file()

    # loose photos beside identity folders: refused naming --flat; with --flat each is an identity of its own
    mixed = tmp_path / "mixed"
    write_photo(facenet_fixtures, str(mixed / "kate" / "1.jpg"), ("kate_siegel", 0.5))
    write_photo(facenet_fixtures, str(mixed / "kate" / "2.jpg"), ("kate_siegel", 0.4))
    write_photo(facenet_fixtures, str(mixed / "shea.jpg"), ("shea_whigham", 0.5))
    assert detect_faces.main([str(mixed), str(tmp_path / "m1"), "--mode", "arcface"]) == 2
    assert "--flat takes loose photos" in capsys.readouterr().err
    assert detect_faces.main([str(mixed), str(tmp_path / "m2"), "--mode", "arcface", "--flat", "--pack"]) == 0
    assert "packed 3 faces of 2 identities" in capsys.readouterr().out


def test_ctrl_c_stops_the_workers_with_one_line_and_the_next_run_resumes(tmp_path, facenet_fixtures):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    raw = tmp_path / "raw"
    for index in range(40):
        write_photo(facenet_fixtures, str(raw / f"p{index:02d}" / "1.jpg"), ("multiface", 0.9 + index / 400))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "tools/detect_faces.py", str(raw), str(out), "--mode", "arcface",
                                "--workers", "2", "--batch", "2"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"),
                               # as from a terminal: a shell without job control (CI, `cmd &`) starts its
                               # background commands with SIGINT ignored, and Python keeps an ignored SIGINT
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    journal = out / detect_faces.JOURNAL
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if journal.is_file() and len(journal.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    # the start line, the progress line, then one line for the stop: no worker writes anything
    lines = [line.split("\r")[-1] for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 3 and lines[0].endswith("40 to process with 2 worker(s)") and "/40 photos (" in lines[1], stderr
    assert lines[2].startswith("detect_faces: interrupted after ") and lines[2].endswith("resumes from there")
    finished = len(journal.read_text().splitlines())
    assert 2 <= finished < 40
    summary = detect_faces.detect_folder(str(raw), str(out), "arcface", workers=2, batch=4)
    assert summary["resumed"] == finished and summary["processed"] == 40 - finished and summary["faces"] == 40
