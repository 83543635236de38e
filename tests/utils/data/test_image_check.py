"""utils/image_check.py: damaged JPEGs that libjpeg would still decode are recognised."""
import glob
import io
import json
import os

import cv2
import numpy as np
import pytest

from utils.data import recordio
from utils.data.image_check import ZERO_RUN_LIMIT, decode_with_warnings, jpeg_problem


@pytest.fixture(scope="module")
def fixture_jpegs(insightface_fixtures):
    folder = os.path.join(insightface_fixtures, "A")
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    reader = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "r")
    return [recordio.unpack(reader.read_idx(key))[1] for key in manifest["image_keys"]]


def _decode_warnings(data: bytes) -> list:
    return decode_with_warnings(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))[1]


def test_clean_images_pass_both_checks(fixture_jpegs, facenet_fixtures):
    for data in fixture_jpegs:
        assert jpeg_problem(data) is None and jpeg_problem(data, thorough=True) is None
    assert all(not _decode_warnings(data) for data in fixture_jpegs[:50])
    # Real photos, re-encoded with standard, optimised (long zero runs are legal there) and progressive tables.
    for path in sorted(glob.glob(os.path.join(facenet_fixtures, "**", "*.png"), recursive=True))[:12]:
        image = cv2.imread(path)
        for params in ([], [cv2.IMWRITE_JPEG_OPTIMIZE, 1], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):
            encoded = cv2.imencode(".jpg", image, params)[1].tobytes()
            assert jpeg_problem(encoded, thorough=True) is None, (path, params)


def test_wiped_scan_data_is_found_where_libjpeg_stays_silent(fixture_jpegs):
    found_by_libjpeg = 0
    for data in fixture_jpegs[:40]:
        middle = len(data) // 2
        zeroed = data[:middle] + bytes(64) + data[middle + 64:]
        assert cv2.imdecode(np.frombuffer(zeroed, np.uint8), cv2.IMREAD_COLOR) is not None  # "decodes"
        assert jpeg_problem(zeroed).startswith("64 bytes of 0x00 in a row at byte ")
        found_by_libjpeg += bool(_decode_warnings(zeroed))
        filled = data[:middle] + b"\x55" * 40 + data[middle + 40:]
        assert jpeg_problem(filled, thorough=True).startswith("40 bytes of 0x55 in a row")
    assert found_by_libjpeg < 30  # why the check exists: libjpeg misses most of these
    middle = len(fixture_jpegs[0]) // 2
    short = fixture_jpegs[0][:middle] + bytes(ZERO_RUN_LIMIT - 1) + fixture_jpegs[0][middle + ZERO_RUN_LIMIT - 1:]
    assert jpeg_problem(short) is None  # 15 zero bytes: below the limit


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[: len(d) // 2], "no end-of-image marker after the scan data (truncated)"),
    (lambda d: d[:100], "segment 0xFFDB at byte 89 claims 67 bytes, past the end (100)"),
    (lambda d: b"\x00" + d[1:], None),  # not a JPEG: left to the decoder
    (lambda d: d[:2] + b"\x12\x34" + d[4:], "expected a marker at byte 2, found 0x12"),
    (lambda d: d[:-2] + b"\x00\x00", "no end-of-image marker after the scan data (truncated)"),
])
def test_structure_problems(fixture_jpegs, damage, message):
    data = fixture_jpegs[3]
    assert jpeg_problem(data) is None
    assert jpeg_problem(damage(data), thorough=True) == message


def test_decoder_warnings_are_captured_and_other_output_passes_through(fixture_jpegs, capfd):
    data = fixture_jpegs[8]  # key 9: 16 varied bytes mid-scan make libjpeg warn, then "decode"
    middle = len(data) // 2
    damaged = data[:middle] + bytes([0x12, 0x34]) * 8 + data[middle + 16:]
    assert jpeg_problem(damaged, thorough=True) is None  # only the decoder can tell
    image, messages = decode_with_warnings(lambda: cv2.imdecode(np.frombuffer(damaged, np.uint8), 1))
    assert image is not None and image.shape == (112, 112, 3)
    assert messages == ["Corrupt JPEG data: 27 extraneous bytes before marker 0xd9"]

    def noisy():
        os.write(2, b"unrelated line\n")
        return 7

    assert decode_with_warnings(noisy) == (7, [])
    err = capfd.readouterr().err
    assert "unrelated line" in err and "Corrupt JPEG" not in err
    assert decode_with_warnings(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), 1))[1] == []


def test_png_and_other_formats_are_not_judged(tmp_path):
    ok, png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert jpeg_problem(png.tobytes()) is None and jpeg_problem(io.BytesIO(b"GIF89a").getvalue()) is None
