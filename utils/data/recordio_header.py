"""InsightFace record payloads without mxnet: the ``<IfQQ`` image header (flag, float32 label, id, id2;
``flag > 0`` means ``flag`` float32 labels follow it), the image bytes, and the errors of the RecordIO
reader. ``utils.data.recordio`` re-exports everything here under mxnet's names (``recordio.pack`` ...).
"""
from __future__ import annotations

import logging
import numbers
import struct
from collections import namedtuple
from typing import Any

import numpy as np

from utils.data.image_check import decode_with_warnings, jpeg_problem

logger = logging.getLogger("utils.data.recordio")  # one logger name for the warnings of the whole reader

_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
FLOAT32_EXACT_LIMIT = 1 << 24  # float32 labels represent every integer only up to 2^24

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "InsightFace/mxnet image record header: flag, label (float or float32 array), id, id2."


class RecordIOError(ValueError):
    """A missing, malformed or inconsistent .rec/.idx file; the message names the file."""


class BadRecordError(RecordIOError):
    """One record cannot be used (bad framing, truncated, undecodable, bad label)."""


_warned_float32 = False


def warn_float32(what: str, value: float) -> None:
    """Warn once per process that ``value`` (a label or key above 2^24) may not survive float32 exactly."""
    global _warned_float32
    if not _warned_float32:
        _warned_float32 = True
        logger.warning("%s %s exceeds 2^24: float32 labels cannot represent every integer above it, "
                       "so InsightFace-layout labels/keys may be off by one", what, value)



# ------------------------------------------------------------------ headers

def pack(header: Any, s: bytes) -> bytes:
    """Header + image bytes -> record payload (``mxnet.recordio.pack``)."""
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
        if abs(float(header.label)) > FLOAT32_EXACT_LIMIT:
            warn_float32("label", header.label)
        prefix = b""
    else:
        label = np.asarray(header.label, dtype=np.float32).ravel()
        if label.size and float(np.abs(label).max()) > FLOAT32_EXACT_LIMIT:
            warn_float32("label", float(np.abs(label).max()))
        header = header._replace(flag=label.size, label=0.0)
        prefix = label.tobytes()
    return struct.pack(_IR_FORMAT, *header) + prefix + bytes(s)


def unpack(s: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Record payload -> (IRHeader, image bytes) (``mxnet.recordio.unpack``).

    A header with ``flag > 0`` gets ``label`` as a float32 array of ``flag`` values.
    """
    if len(s) < _IR_SIZE:
        raise BadRecordError(f"{where}: record payload has {len(s)} bytes, expected at least the "
                             f"{_IR_SIZE}-byte image header")
    header = IRHeader(*struct.unpack_from(_IR_FORMAT, s, 0))
    body_start = _IR_SIZE
    if header.flag > 0:
        body_start += 4 * header.flag
        if len(s) < body_start:
            raise BadRecordError(f"{where}: header says {header.flag} float32 labels follow, "
                                 f"but the payload has only {len(s) - _IR_SIZE} bytes after the header")
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag, _IR_SIZE))
    return header, s[body_start:]


def class_of(header: IRHeader) -> int:
    """Class id of an image header: the scalar label, or ``label[0]`` for array labels."""
    label = header.label
    value = float(label) if isinstance(label, numbers.Number) else float(label[0])
    return int(value)


def decode_image(img_bytes: bytes, where: str = "record", rgb: bool = True, check: bool = True,
                 strict: bool = False) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 HWC array (RGB by default, as mxnet.image.imdecode).

    ``check`` (default, ~3% of a decode) refuses JPEGs that are truncated, structurally broken or
    hold wiped scan data, which libjpeg would "decode" into garbage; ``strict`` (~20%, rec_info
    --verify) also walks every marker and refuses whatever libjpeg only warns about (``Corrupt JPEG
    data: ...`` on stderr). See utils/image_check.py.
    """
    import cv2

    if len(img_bytes) == 0:
        raise BadRecordError(f"{where}: holds no image bytes, expected an encoded image")
    if check or strict:
        problem = jpeg_problem(img_bytes, thorough=strict)
        if problem:
            raise BadRecordError(f"{where}: corrupt JPEG: {problem}")
    array = np.frombuffer(img_bytes, dtype=np.uint8)
    flag = cv2.IMREAD_COLOR_RGB if rgb and hasattr(cv2, "IMREAD_COLOR_RGB") else cv2.IMREAD_COLOR
    if strict:
        image, warnings = decode_with_warnings(lambda: cv2.imdecode(array, flag))
        if warnings and image is not None:
            raise BadRecordError(f"{where}: corrupt image data: the decoder reported {'; '.join(warnings)}")
    else:
        image = cv2.imdecode(array, flag)
    if image is None:
        raise BadRecordError(f"{where}: cannot decode the {len(img_bytes)} image bytes, expected a JPEG/PNG image")
    if rgb and not hasattr(cv2, "IMREAD_COLOR_RGB"):
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def unpack_img(s: bytes, iscolor: int = -1) -> tuple[IRHeader, np.ndarray]:
    """Payload -> (header, BGR image decoded by OpenCV) (``mxnet.recordio.unpack_img``)."""
    import cv2

    header, img = unpack(s)
    image = cv2.imdecode(np.frombuffer(img, dtype=np.uint8), iscolor)
    if image is None:
        raise BadRecordError(f"record id {header.id}: cannot decode the {len(img)} image bytes")
    return header, image


def pack_img(header: Any, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Header + BGR image -> payload, encoding with OpenCV (``mxnet.recordio.pack_img``)."""
    import cv2

    fmt = img_fmt.lower()
    if fmt in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    else:
        raise RecordIOError(f"pack_img: unsupported img_fmt {img_fmt!r}, expected '.jpg' or '.png'")
    ok, buf = cv2.imencode(fmt, img, params)
    if not ok:
        raise RecordIOError(f"pack_img: OpenCV could not encode an image of shape {img.shape} as {fmt}")
    return pack(header, buf.tobytes())
