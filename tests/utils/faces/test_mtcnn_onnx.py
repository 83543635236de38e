"""MTCNN under onnxruntime (utils/faces/mtcnn_onnx.py, exported by tools/mtcnn2onnx.py): the three networks'
dynamic sizes, and the detector's boxes and landmarks against the torch detector and facenet-pytorch's own
outputs on the fixture photos, one by one and batched; the ONNX detector in tools/detect_faces.py --onnx."""
import json
import os
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch

from tools import detect_faces, mtcnn2onnx
from utils.faces import mtcnn_onnx
from utils.faces.mtcnn import MTCNN, MTCNNError
from utils.faces.mtcnn_nets import load_net

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

PHOTOS = ["angelina_jolie", "kate_siegel", "paul_rudd", "shea_whigham", "multiface", "blank"]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, one_thread) -> str:
    out = str(tmp_path_factory.mktemp("mtcnn_onnx"))
    assert mtcnn2onnx.main([out]) == 0  # exports and verifies (PNet at 4 sizes, RNet/ONet at 2 batches)
    return out


@pytest.fixture(scope="module")
def detectors(onnx_dir):
    return MTCNN(), MTCNN.from_onnx(onnx_dir, threads=1)


@pytest.fixture(scope="module")
def photos(facenet_fixtures):
    return {name: cv2.cvtColor(cv2.imread(os.path.join(facenet_fixtures, "images", f"{name}.png")), cv2.COLOR_BGR2RGB)
            for name in PHOTOS}


def assert_same_faces(torch_result, onnx_result) -> None:
    (boxes, probs, points), (onnx_boxes, onnx_probs, onnx_points) = torch_result, onnx_result
    assert onnx_boxes.shape == boxes.shape and onnx_points.shape == points.shape  # the same number of faces
    np.testing.assert_allclose(onnx_boxes, boxes, atol=0.5, rtol=0)
    np.testing.assert_allclose(onnx_points, points, atol=0.5, rtol=0)
    np.testing.assert_allclose(onnx_probs, probs, atol=1e-4, rtol=0)


def test_the_files_take_dynamic_sizes_and_match_torch(onnx_dir, one_thread):
    import onnxruntime

    pnet_session = onnxruntime.InferenceSession(os.path.join(onnx_dir, "pnet.onnx"), providers=["CPUExecutionProvider"])
    assert [str(d) for d in pnet_session.get_inputs()[0].shape[1:]] == ["3", "height", "width"]
    pnet, rnet, onet = mtcnn_onnx.load_onnx_nets(onnx_dir, threads=1)
    torch_pnet = load_net("pnet")
    for shape in [(1, 3, 12, 13), (2, 3, 75, 41), (1, 3, 300, 201)]:  # none of them the export's sample size
        x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[2])) * 2 - 1
        got = pnet.heads(x)
        with torch.no_grad():
            want = torch_pnet.heads(x)
        assert got.shape == want.shape == (shape[0], (shape[2] - 1) // 2 - 4, (shape[3] - 1) // 2 - 4, 6)
        assert float((got - want).abs().max()) < 1e-4
    for runner, name, size in [(rnet, "rnet", 24), (onet, "onet", 48)]:
        x = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
        with torch.no_grad():
            want = load_net(name)(x)
        got = runner(x)
        assert len(got) == len(want)
        for have, expected in zip(got, want):
            assert have.shape == expected.shape and float((have - expected).abs().max()) < 1e-5


@pytest.mark.parametrize("name", PHOTOS)
def test_onnx_detector_equals_torch_and_facenet_pytorch(detectors, photos, facenet_fixtures, name):
    torch_detector, onnx_detector = detectors
    assert onnx_detector.pnet.packs is False and torch_detector.pnet.packs is True
    result = onnx_detector.detect(photos[name])
    assert_same_faces(torch_detector.detect(photos[name]), result)
    with open(os.path.join(facenet_fixtures, "expected.json")) as handle:
        faces = json.load(handle)["mtcnn"]["images"][name]["faces"]
    assert len(result[0]) == len(faces)
    if faces:
        np.testing.assert_allclose(result[0], [face["box"] for face in faces], atol=0.5, rtol=0)
        np.testing.assert_allclose(result[2], [face["landmarks"] for face in faces], atol=0.5, rtol=0)


def test_onnx_detect_batch_equals_torch(detectors, photos):
    torch_detector, onnx_detector = detectors
    portrait = photos["paul_rudd"]
    images = [portrait, photos["blank"], np.ascontiguousarray(portrait[:, ::-1]), photos["multiface"]]
    batched = onnx_detector.detect_batch(images)
    assert len(batched) == 4 and [len(result[0]) for result in batched] == [1, 0, 1, 6]
    for mine, theirs in zip(batched, torch_detector.detect_batch(images)):
        assert_same_faces(theirs, mine)


def test_missing_onnxruntime_files_and_wrong_files_are_one_line_errors(onnx_dir, tmp_path, monkeypatch):
    with pytest.raises(MTCNNError, match=r"rnet\.onnx: ONNX file not found"):
        partial = tmp_path / "partial"
        partial.mkdir()
        shutil.copy(os.path.join(onnx_dir, "pnet.onnx"), partial / "pnet.onnx")
        MTCNN.from_onnx(str(partial))
    swapped = tmp_path / "swapped"
    shutil.copytree(onnx_dir, swapped)
    shutil.copy(os.path.join(onnx_dir, "rnet.onnx"), swapped / "onet.onnx")
    with pytest.raises(MTCNNError, match=r"onet\.onnx: inputs \['data'\] and outputs \['reg', 'prob'\] are not MTCNN's onet"):
        MTCNN.from_onnx(str(swapped))
    (tmp_path / "garbage" / "x").mkdir(parents=True)
    (tmp_path / "garbage" / "pnet.onnx").write_bytes(b"not a model")
    with pytest.raises(MTCNNError, match=r"pnet\.onnx: onnxruntime cannot load it"):
        MTCNN.from_onnx(str(tmp_path / "garbage"))
    with pytest.raises(MTCNNError, match="device cuda"):
        MTCNN.from_onnx(onnx_dir, device="cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(MTCNNError, match=r"^MTCNN under onnxruntime needs the optional extra onnxruntime \(pip"):
        MTCNN.from_onnx(onnx_dir)


def test_export_tool_refuses_a_file_as_output_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert mtcnn2onnx.main([str(target)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {target}: exists and is not a folder "
                                                            f"(expected the output folder)"]


def test_detect_faces_onnx_writes_the_torch_detectors_faces(onnx_dir, photos, tmp_path, capsys):
    raw = tmp_path / "raw"
    for name, identity in [("paul_rudd", "paul"), ("multiface", "group"), ("blank", "blank")]:
        (raw / identity).mkdir(parents=True)
        cv2.imwrite(str(raw / identity / "1.png"), cv2.cvtColor(photos[name], cv2.COLOR_RGB2BGR))
    outputs = {}
    for backend, extra in [("torch", []), ("onnx", ["--onnx", onnx_dir])]:
        out = tmp_path / backend
        assert detect_faces.main([str(raw), str(out), "--mode", "arcface"] + extra) == 0
        assert "3 photos (0 finished before): 2 faces written" in capsys.readouterr().out
        outputs[backend] = out
    for relative in ("paul/1.png", "group/1.png"):
        torch_face = cv2.imread(str(outputs["torch"] / relative)).astype(np.float64)
        onnx_face = cv2.imread(str(outputs["onnx"] / relative)).astype(np.float64)
        assert np.abs(torch_face - onnx_face).mean() < 0.5
    assert detect_faces.main([str(raw), str(tmp_path / "bad"), "--mode", "arcface", "--onnx", str(tmp_path / "no")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"detect_faces: error: {tmp_path / 'no' / 'pnet.onnx'}: ONNX file not found (expected pnet.onnx, written by "
        f"tools/mtcnn2onnx.py)"]
