"""Detect corrupt encoded images that OpenCV would still "decode" into garbage.

libjpeg recovers from damaged entropy-coded data: it prints ``Corrupt JPEG data: ...`` to the
process's stderr (fd 2) and returns an image, so ``cv2.imdecode`` alone cannot tell. Two checks:

* ``jpeg_problem(data)``: the JPEG structure (SOI, segment lengths, a scan, EOI) and, for baseline
  files coded with the standard Huffman tables (what cv2/mxnet packers write), runs of 16+ equal
  bytes in the scan data (zeros always; any value when ``thorough``). Those tables code no real
  image that way (the fixtures' and re-encoded photos' longest zero run is 3 bytes, of any other
  value 0), while wiped or overwritten data is exactly that; libjpeg itself notices only ~20-40%
  of such damage. Optimised or progressive tables legitimately hold long zero runs: not checked.
* ``decode_with_warnings(decode)``: runs a decode with fd 2 redirected to a temp file and returns
  libjpeg's corruption messages; unrelated stderr text written meanwhile is passed through.

Damage that neither notices (e.g. a few flipped bits) still decodes to a plausible image.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from typing import Any, Callable

ZERO_RUN_LIMIT = 16  # zero bytes in a row inside standard-table scan data that mean "wiped"
_SOI, _EOI, _SOS, _DHT = 0xD8, 0xD9, 0xDA, 0xC4
_BASELINE_SOF = (0xC0, 0xC1)
_STANDALONE = set(range(0xD0, 0xD8)) | {0x01}
_CORRUPTION = re.compile(rb"(Corrupt JPEG data[^\n]*|Premature end of JPEG file|Invalid JPEG file structure[^\n]*"
                         rb"|Bogus [^\n]*|Huffman table [^\n]*|libpng error[^\n]*)")

_dht_cache: dict[bytes, tuple[str | None, frozenset]] = {}
_last_header = b""           # bytes up to the scan data of the last single-scan JPEG walked
_last_wipe_check = False     # whether the zero-run check applies to that header
_WIPED = b"\x00" * ZERO_RUN_LIMIT
_standard_tables: frozenset | None = None
_capture_lock = threading.Lock()
_capture_file: Any = None
_capture_fd: int | None = None


def _huffman_tables(data: bytes, start: int, length: int, into: set) -> str | None:
    """Add (class, counts, values) of every table in one DHT segment to ``into``."""
    pos, end = start, start + length
    while pos < end:
        if pos + 17 > end:
            return "DHT segment ends inside a table header"
        table_class = data[pos] >> 4
        counts = bytes(data[pos + 1:pos + 17])
        total = sum(counts)
        if pos + 17 + total > end:
            return "DHT segment ends inside a table"
        into.add((table_class, counts, bytes(data[pos + 17:pos + 17 + total])))
        pos += 17 + total
    return None


def _standard() -> frozenset:
    """The Annex K tables, taken from what this OpenCV's libjpeg writes by default (once per process)."""
    global _standard_tables
    if _standard_tables is None:
        import cv2
        import numpy as np

        pattern = np.indices((16, 16, 3)).sum(axis=0).astype(np.uint8) * 7  # colour: all four tables
        ok, encoded = cv2.imencode(".jpg", pattern, [cv2.IMWRITE_JPEG_QUALITY, 90])
        tables: set = set()
        _walk(encoded.tobytes(), tables)
        _standard_tables = frozenset(tables)
    return _standard_tables


def _walk(data: bytes, tables: set) -> tuple[str | None, list[tuple[int, int]], bool]:
    """Parse markers; returns (problem, [(scan start, scan end)], baseline)."""
    if data[:2] != b"\xff\xd8":
        return "does not start with the JPEG SOI marker", [], False
    pos, size, scans, baseline = 2, len(data), [], False
    while True:
        if pos + 2 > size or data[pos] != 0xFF:
            return f"expected a marker at byte {pos}, found {'the end of the data' if pos >= size else hex(data[pos])}", \
                scans, baseline
        while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = data[pos + 1]
        pos += 2
        if marker == _EOI:
            return (None if scans else "no scan (SOS) before the end-of-image marker"), scans, baseline
        if marker in _STANDALONE:
            continue
        if pos + 2 > size:
            return f"segment 0xFF{marker:02X} at byte {pos - 2} is cut off", scans, baseline
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > size:
            return f"segment 0xFF{marker:02X} at byte {pos - 2} claims {length} bytes, past the end ({size})", \
                scans, baseline
        if marker == _DHT:
            segment = data[pos + 2:pos + length]
            parsed = _dht_cache.get(segment)
            if parsed is None:  # packs repeat the same few tables: parse each distinct segment once
                found: set = set()
                parsed = (_huffman_tables(segment, 0, len(segment), found), frozenset(found))
                if len(_dht_cache) < 256:
                    _dht_cache[segment] = parsed
            if parsed[0]:
                return f"{parsed[0]} at byte {pos - 2}", scans, baseline
            tables.update(parsed[1])
        elif marker in _BASELINE_SOF:
            baseline = True
        pos += length
        if marker == _SOS:
            start = pos
            while True:  # entropy-coded data: FF00 (stuffed) and RSTn continue it, any other marker ends it
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= size:
                    scans.append((start, size))
                    return "no end-of-image marker after the scan data (truncated)", scans, baseline
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                    continue
                if following != 0xFF:
                    scans.append((start, pos))
                    break
                pos += 1  # fill byte before the marker


def _wiped_run_problem(data: bytes, start: int, end: int, any_byte: bool) -> str | None:
    """A run of ZERO_RUN_LIMIT+ zero bytes (or, with ``any_byte``, of any one byte value) in scan data."""
    if any_byte:
        import numpy as np

        # Equal neighbours -> b"\x01"; a C-speed find of 15 of them in a row (a regex is ~20x slower).
        scan = np.frombuffer(data, np.uint8, end - start, start)
        same = (scan[1:] == scan[:-1]).tobytes()
        at = same.find(b"\x01" * (ZERO_RUN_LIMIT - 1))
        if at < 0:
            return None
        run = ZERO_RUN_LIMIT + len(same[at + ZERO_RUN_LIMIT - 1:]) - len(same[at + ZERO_RUN_LIMIT - 1:].lstrip(b"\x01"))
        at, value = start + at, data[start + at]
    else:
        at = data.find(_WIPED, start, end)
        if at < 0:
            return None
        run, value = len(data[at:end]) - len(data[at:end].lstrip(b"\x00")), 0
    return (f"{run} bytes of 0x{value:02X} in a row at byte {at} of the scan data (standard Huffman tables "
            f"never code {ZERO_RUN_LIMIT}+ equal bytes; the data was wiped or overwritten)")


def jpeg_problem(data: bytes | memoryview, thorough: bool = False) -> str | None:
    """Why ``data`` is a damaged JPEG (structure or wiped scan data), or None; non-JPEG data gives None.

    ``thorough`` always walks every marker; otherwise an image whose header equals the previous
    one's skips the walk (~1 us instead of ~6): a stray marker inside its scan data is then left to
    libjpeg, which warns about it (see ``decode_with_warnings``).
    """
    data = bytes(data)
    if data[:2] != b"\xff\xd8":
        return None  # PNG/BMP/...: left to the decoder
    global _last_header, _last_wipe_check
    header_end = len(_last_header)
    if not thorough and header_end and data.startswith(_last_header) and data.endswith(b"\xff\xd9"):
        return _wiped_run_problem(data, header_end, len(data) - 2, False) if _last_wipe_check else None
    tables: set = set()
    problem, scans, baseline = _walk(data, tables)
    if problem:
        return problem
    wipe_check = bool(baseline and tables and tables <= _standard())
    if len(scans) == 1:
        _last_header, _last_wipe_check = data[:scans[0][0]], wipe_check
    if wipe_check:
        for start, end in scans:
            problem = _wiped_run_problem(data, start, end, thorough)
            if problem:
                return problem
    return None


def _reset_after_fork() -> None:
    global _capture_fd, _capture_lock
    _capture_fd = None  # the parent's temp file is shared after fork: each process needs its own
    _capture_lock = threading.Lock()  # another parent thread may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def decode_with_warnings(decode: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``decode()`` with fd 2 captured: (its result, libjpeg/libpng corruption messages)."""
    global _capture_fd, _capture_file
    with _capture_lock:  # fd 2 is process-wide: one capture at a time
        if _capture_fd is None:
            _capture_file = tempfile.TemporaryFile(prefix="arcscale_decode_")
            _capture_fd = _capture_file.fileno()
        fd = _capture_fd
        saved = os.dup(2)  # taken per call: whoever owns fd 2 now (a test's capture, a log file) gets it back
        try:
            os.dup2(fd, 2)
            try:
                result = decode()
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        if not os.lseek(fd, 0, os.SEEK_CUR):  # nothing written: the common case, one cheap syscall
            return result, []
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16)
        os.ftruncate(fd, 0)
    messages = [m.decode("utf-8", "replace").strip() for m in _CORRUPTION.findall(text)]
    rest = _CORRUPTION.sub(b"", text).strip()
    if rest:  # someone else's stderr output during the window (another thread's log line)
        os.write(2, rest + b"\n")
    return result, messages
