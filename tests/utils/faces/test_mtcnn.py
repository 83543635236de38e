"""utils/mtcnn.py against facenet-pytorch's own outputs on real photos (tests/fixtures/facenet/expected.json),
plus the pieces it is built from (area resampling, NMS) against straightforward references."""
import hashlib
import json
import os

import cv2
import numpy as np
import pytest
import torch

from utils.faces import mtcnn
from utils.faces.mtcnn import MTCNN, MTCNNError

PHOTOS = ["angelina_jolie", "kate_siegel", "paul_rudd", "shea_whigham", "multiface", "blank"]


@pytest.fixture(scope="module")
def expected(facenet_fixtures):
    with open(os.path.join(facenet_fixtures, "expected.json")) as handle:
        return json.load(handle)["mtcnn"]


@pytest.fixture(scope="module")
def detector(one_thread):
    return MTCNN()


def read_rgb(path: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photos(facenet_fixtures):
    return {name: read_rgb(os.path.join(facenet_fixtures, "images", f"{name}.png")) for name in PHOTOS}


def test_shipped_weights_are_the_fixture_weights_and_load_without_pickled_code(facenet_fixtures):
    for name in ("pnet", "rnet", "onet"):
        shipped = os.path.join(mtcnn.WEIGHTS_DIR, f"{name}.pt")
        with open(shipped, "rb") as mine, open(os.path.join(facenet_fixtures, "mtcnn", f"{name}.pt"), "rb") as ref:
            assert hashlib.md5(mine.read()).digest() == hashlib.md5(ref.read()).digest(), name
        net = mtcnn.load_net(name)
        assert not net.training
    assert os.path.isfile(os.path.join(mtcnn.WEIGHTS_DIR, "LICENSE"))
    assert sum(p.numel() for p in mtcnn.load_net("onet").parameters()) == 389040


def test_settings_match_the_fixture(expected):
    settings = expected["settings"]
    detector_defaults = MTCNN.__init__.__defaults__
    assert detector_defaults[:3] == (settings["min_face_size"], tuple(settings["thresholds"]), settings["factor"])


@pytest.mark.parametrize("name", PHOTOS)
def test_detect_equals_facenet_pytorch(detector, photos, expected, facenet_fixtures, name):
    want = expected["images"][name]
    image = photos[name]
    assert image.shape == (want["height"], want["width"], 3)
    boxes, probs, landmarks = detector.detect(image)
    faces = want["faces"]
    assert boxes.shape == (len(faces), 4) and probs.shape == (len(faces),) and landmarks.shape == (len(faces), 5, 2)
    assert boxes.dtype == probs.dtype == landmarks.dtype == np.float32
    if not faces:
        return
    np.testing.assert_allclose(boxes, [face["box"] for face in faces], atol=0.5, rtol=0)
    np.testing.assert_allclose(probs, [face["prob"] for face in faces], atol=1e-4, rtol=0)
    np.testing.assert_allclose(landmarks, [face["landmarks"] for face in faces], atol=0.5, rtol=0)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert np.all(np.diff(areas) <= 0)  # largest first
    for index, face in enumerate(faces):
        for key, path in face["crops"].items():
            size, margin = (int(part[1:]) for part in key.split("_"))
            crop = detector.crop(image, boxes[index], image_size=size, margin=margin)
            reference = read_rgb(os.path.join(facenet_fixtures, path))
            assert crop.shape == reference.shape == (size, size, 3) and crop.dtype == np.uint8
            difference = np.abs(crop.astype(np.float64) - reference).mean()
            assert difference <= 1.0, (name, index, key, difference)


def test_multiface_has_six_faces_and_blank_none(detector, photos):
    assert len(detector.detect(photos["multiface"])[0]) == 6
    boxes, probs, landmarks = detector.detect(photos["blank"])
    assert boxes.shape == (0, 4) and probs.shape == (0,) and landmarks.shape == (0, 5, 2)


def test_detect_batch_equals_one_by_one(detector, photos):
    portrait = photos["paul_rudd"]
    mirrored = np.ascontiguousarray(portrait[:, ::-1])
    images = [portrait, photos["blank"], mirrored, photos["shea_whigham"]]  # two of one size, batched together
    batched = detector.detect_batch(images)
    assert len(batched) == 4
    for image, (boxes, probs, landmarks) in zip(images, batched):
        single = detector.detect(image)
        np.testing.assert_allclose(boxes, single[0], atol=1e-3)
        np.testing.assert_allclose(probs, single[1], atol=1e-5)
        np.testing.assert_allclose(landmarks, single[2], atol=1e-3)
    # the mirrored portrait's face is the mirror of the original's (MTCNN is not exactly mirror-symmetric: 3%)
    width, box = portrait.shape[1], batched[0][0][0]
    np.testing.assert_allclose(batched[2][0][0, [2, 0]], width - box[[0, 2]], atol=0.03 * (box[2] - box[0]))


def test_grey_rgba_and_16_bit_inputs_are_converted(detector, photos):
    rgb = photos["shea_whigham"]
    reference = detector.detect(rgb)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    sixteen = rgb.astype(np.uint16) * 257
    for image in (rgba, sixteen):
        boxes, probs, _ = detector.detect(image)
        np.testing.assert_array_equal(boxes, reference[0])
        np.testing.assert_array_equal(probs, reference[1])
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    from_grey = detector.detect(grey)
    np.testing.assert_array_equal(from_grey[0], detector.detect(np.dstack([grey] * 3))[0])
    np.testing.assert_array_equal(from_grey[0], detector.detect(grey[:, :, None])[0])
    assert len(from_grey[0]) == 1
    np.testing.assert_allclose(from_grey[0][0], reference[0][0], atol=6.0)  # same face without colour


@pytest.mark.parametrize("shape", [(10, 10, 3), (19, 400, 3), (1, 1, 3)])
def test_images_smaller_than_the_minimum_face_give_no_face(detector, shape):
    boxes, probs, landmarks = detector.detect(np.full(shape, 128, np.uint8))
    assert boxes.shape == (0, 4) and probs.shape == (0,) and landmarks.shape == (0, 5, 2)


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), np.float32), "image 0: dtype float32 is not supported (expected uint8 or uint16 pixels)"),
    (np.zeros((32, 32, 2), np.uint8), "image 0: shape (32, 32, 2) is not an image (expected HxW, HxWx1, HxWx3 or "
                                      "HxWx4)"),
    (np.zeros((0, 32, 3), np.uint8), "image 0: shape (0, 32, 3) is not an image (expected HxW, HxWx1, HxWx3 or "
                                     "HxWx4)"),
    ([[1, 2], [3, 4]], "image 0: expected an HxWx3 uint8 numpy array (RGB), got list"),
])
def test_bad_input_is_a_one_line_error(detector, image, message):
    with pytest.raises(MTCNNError) as exc:
        detector.detect(image)
    assert str(exc.value) == message


def test_bad_crop_and_settings_are_one_line_errors(detector, photos, tmp_path):
    image = photos["blank"]
    with pytest.raises(MTCNNError, match=r"^image_size 160, margin 160: expected"):
        detector.crop(image, [10, 10, 50, 50], image_size=160, margin=160)
    with pytest.raises(MTCNNError, match=r"^box \[300.0, 300.0, 400.0, 400.0\]: no pixels of the 256x256 image"):
        detector.crop(image, [300, 300, 400, 400])
    with pytest.raises(MTCNNError, match=r"^box \[1.0, 2.0, 3.0\]: expected 4 finite numbers"):
        detector.crop(image, [1, 2, 3])
    with pytest.raises(MTCNNError, match=r"^factor 1.5: expected"):
        MTCNN(factor=1.5)
    with pytest.raises(MTCNNError, match=r"^thresholds \(0.6, 0.7\): expected three"):
        MTCNN(thresholds=(0.6, 0.7))
    with pytest.raises(MTCNNError, match=r"pnet.pt: MTCNN weight file not found"):
        MTCNN(weights_dir=str(tmp_path))
    (tmp_path / "pnet.pt").write_bytes(b"not a state dict")
    with pytest.raises(MTCNNError, match=r"pnet.pt: not a valid pnet state_dict"):
        MTCNN(weights_dir=str(tmp_path))


def test_crop_clips_at_the_image_border(detector):
    image = np.arange(64 * 48 * 3, dtype=np.uint32).reshape(48, 64, 3).astype(np.uint8)
    crop = detector.crop(image, [-10.7, 20.2, 30.9, 90.0], image_size=8)
    np.testing.assert_array_equal(crop, cv2.resize(image[20:48, 0:30], (8, 8), interpolation=cv2.INTER_AREA))


# ------------------------------------------------------------------------------------------- building blocks


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float, mode: str) -> list:
    """Textbook greedy NMS, one box at a time (the definition the vectorised version must reproduce)."""
    plus = 1.0 if mode == "min" else 0.0
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    area = (boxes[:, 2] - boxes[:, 0] + plus) * (boxes[:, 3] - boxes[:, 1] + plus)
    kept = []
    for i in order:
        suppressed = False
        for j in kept:
            if groups[i] != groups[j]:
                continue
            w = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]) + plus)
            h = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]) + plus)
            inter = w * h
            overlap = inter / min(area[i], area[j]) if mode == "min" else inter / (area[i] + area[j] - inter)
            if overlap > threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return kept


@pytest.mark.parametrize("mode, threshold, block", [("union", 0.5, 1024), ("union", 0.7, 16), ("min", 0.7, 16)])
def test_nms_equals_one_box_at_a_time_greedy(monkeypatch, mode, threshold, block):
    monkeypatch.setattr(mtcnn, "_NMS_BLOCK", block)  # small blocks exercise the across-block suppression
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 30, (300, 2))
    sizes = rng.uniform(5, 40, (300, 2))
    boxes = np.hstack([corners, corners + sizes]).astype(np.float64)
    scores = np.round(rng.uniform(0, 1, 300), 2)  # ties on purpose: the order among equal scores is the input order
    groups = rng.integers(0, 3, 300)
    kept = mtcnn.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold, torch.from_numpy(groups), mode)
    assert kept.tolist() == greedy_nms(boxes, scores, groups, threshold, mode)
    assert 20 < len(kept) < 280  # the case is neither trivial nor all-suppressed
    assert mtcnn.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_candidates_entirely_outside_the_image_are_dropped_not_an_error(detector, photos, monkeypatch):
    # PNet's regression can push a candidate off the image; the reference would misalign its crops there
    outside = np.array([[900.0, 900.0, 940.0, 940.0, 0.99]], np.float32)
    monkeypatch.setattr(detector, "_proposals", lambda table: (outside, np.array([0])))
    boxes, probs, landmarks = detector.detect(photos["blank"])
    assert boxes.shape == (0, 4) and probs.shape == (0,) and landmarks.shape == (0, 5, 2)



def test_detect_batch_over_mixed_sizes_gives_an_empty_result_for_a_photo_without_a_face(detector, photos):
    # a folder's worth: photos of four sizes, one without a face, one smaller than the smallest face, a grey one
    grey = cv2.cvtColor(photos["kate_siegel"], cv2.COLOR_RGB2GRAY)
    images = [photos["blank"], photos["paul_rudd"], np.zeros((9, 14, 3), np.uint8), photos["multiface"],
              grey, cv2.resize(photos["paul_rudd"], None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)]
    results = detector.detect_batch(images)
    assert [len(boxes) for boxes, _, _ in results] == [0, 1, 0, 6, 1, 1]
    for boxes, probs, landmarks in (results[0], results[2]):
        assert boxes.shape == (0, 4) and probs.shape == (0,) and landmarks.shape == (0, 5, 2)
    for image, result in zip(images, results):
        np.testing.assert_allclose(result[0], detector.detect(image)[0], atol=1e-3)
    assert detector.detect_batch([]) == []


def test_detect_batch_on_worker_threads_gives_the_same_results_and_leaves_the_thread_count(detector, photos):
    import threading

    grey = cv2.cvtColor(photos["kate_siegel"], cv2.COLOR_RGB2GRAY)
    images = [photos["blank"], photos["paul_rudd"], photos["multiface"], grey, photos["shea_whigham"],
              np.ascontiguousarray(photos["paul_rudd"][:, ::-1])]
    one_by_one = detector.detect_batch(images)  # one torch thread (the module's fixture), sequential
    seen, run = set(), detector._detect_equal

    def spy(arrays):
        seen.add((threading.current_thread().name.split("_")[0], torch.get_num_threads()))
        return run(arrays)

    torch.set_num_threads(2)
    try:
        detector._detect_equal = spy
        threaded = detector.detect_batch(images, workers=3)
        assert torch.get_num_threads() == 2  # the caller's count, and the default of threads started later:
        started = []
        worker = threading.Thread(target=lambda: started.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        assert started == [2]
    finally:
        del detector._detect_equal
        torch.set_num_threads(1)
    assert seen == {("mtcnn", 1)}  # every photo on a worker thread with one intra-op thread
    for (boxes, probs, points), (boxes1, probs1, points1) in zip(threaded, one_by_one):
        np.testing.assert_array_equal(boxes, boxes1)  # one thread each: the same kernels, the same numbers
        np.testing.assert_array_equal(probs, probs1)
        np.testing.assert_array_equal(points, points1)
    assert [len(r[0]) for r in threaded] == [0, 1, 6, 1, 1, 1]
    assert detector.detect_batch([photos["blank"]], workers=4)[0][0].shape == (0, 4)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_detect_batch_rejects_a_bad_worker_count_in_one_line(detector, photos, workers):
    with pytest.raises(MTCNNError, match=r"^workers .*: expected a whole number of threads >= 1$"):
        detector.detect_batch([photos["blank"]], workers=workers)


def test_detect_batch_on_worker_threads_raises_a_workers_error_in_the_caller(detector, photos):
    def broken(arrays):
        raise MTCNNError("network failed")

    detector._detect_equal = broken
    try:
        with pytest.raises(MTCNNError, match="^network failed$"):
            detector.detect_batch([photos["blank"], photos["paul_rudd"]], workers=2)
    finally:
        del detector._detect_equal
    assert torch.get_num_threads() == 1
