"""dmlc RecordIO (the ``.rec``/``.idx`` files of InsightFace training sets) without mxnet.

The API mirrors ``mxnet.recordio`` so existing scripts port by changing one import::

    from utils.data import recordio            # instead of: from mxnet import recordio
    rec = recordio.MXIndexedRecordIO("train.idx", "train.rec", "r")
    header, img_bytes = recordio.unpack(rec.read_idx(0))

Byte layout: every record part is ``uint32 magic 0xCED7230A``, ``uint32 (cflag << 29) | length``,
``length`` payload bytes, zero padding to 4 bytes. The writer splits a payload wherever it holds
the magic at a 4-byte-aligned offset (cflag 1 first, 2 middle, 3 last; the magic itself is dropped)
and the reader re-joins the parts, re-inserting the magic. The InsightFace payload is a ``<IfQQ``
header (flag, float32 label, id, id2); ``flag > 0`` means ``flag`` float32 labels follow it.

Indexed reads use ``os.pread`` on a descriptor opened lazily per process, so one reader object
can be handed to many forked DataLoader workers: nothing shares a file position.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Iterator

import numpy as np

# The payload side (header, labels, image codec, errors) lives in recordio_header; re-exported here so
# that ``from utils import recordio`` mirrors ``mxnet.recordio``.
from utils.data.recordio_header import (FLOAT32_EXACT_LIMIT, BadRecordError, IRHeader, RecordIOError,  # noqa: F401
                                   class_of, decode_image, pack, pack_img, unpack, unpack_img, warn_float32)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEADER = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
MAX_RECORD_BYTES = 1 << 29
# One pread covers a whole record when the gap to the next record is at most this big.
_SINGLE_READ_LIMIT = 4 << 20


# ------------------------------------------------------------------ framing

def encode_record(payload: bytes) -> bytes:
    """Frame ``payload`` exactly as dmlc's RecordIOWriter does (split at aligned magic, pad to 4)."""
    length = len(payload)
    if length >= MAX_RECORD_BYTES:
        raise RecordIOError(f"record of {length} bytes is too large: RecordIO holds at most 2^29 - 1 bytes")
    view = memoryview(payload)
    parts = []
    start = 0
    # Only 4-byte-aligned occurrences count; find() locates candidates without a Python byte loop.
    position = payload.find(MAGIC_BYTES)
    while position != -1 and position + 4 <= length:
        if position % 4 == 0:
            cflag = 1 if start == 0 else 2
            parts.append(_PART_HEADER.pack(MAGIC, (cflag << 29) | (position - start)))
            parts.append(view[start:position])
            start = position + 4
            position = payload.find(MAGIC_BYTES, start)
        else:
            position = payload.find(MAGIC_BYTES, position + 1)
    cflag = 3 if start != 0 else 0
    parts.append(_PART_HEADER.pack(MAGIC, (cflag << 29) | (length - start)))
    parts.append(view[start:])
    parts.append(b"\x00" * (-length % 4))
    return b"".join(parts)


def _decode_parts(buf: bytes | memoryview, pos: int, read_more, where: str) -> tuple[bytes, int]:
    """Join the parts of one record starting at ``buf[pos]``; returns (payload, end position).

    ``read_more(n)`` must return ``buf`` extended by at least ``n`` bytes (or shorter at EOF).
    """
    pieces: list[bytes] = []
    while True:
        if len(buf) - pos < 8:
            buf = read_more(pos + 8 - len(buf))
            if len(buf) - pos < 8:
                raise BadRecordError(f"{where}: truncated record: expected an 8-byte part header, "
                                     f"the file ends after {len(buf) - pos} bytes")
        magic, lrec = _PART_HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise BadRecordError(f"{where}: bad magic 0x{magic:08x} at byte {pos}, expected 0x{MAGIC:08x} "
                                 f"(wrong offset in the .idx or a corrupt .rec)")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        end = pos + 8 + length
        if len(buf) < end:
            buf = read_more(end - len(buf))
            if len(buf) < end:
                raise BadRecordError(f"{where}: truncated record: expected {length} payload bytes, "
                                     f"the file ends after {len(buf) - pos - 8}")
        if cflag == 0 and not pieces:
            return bytes(buf[pos + 8:end]), end + (-length % 4)
        pieces.append(bytes(buf[pos + 8:end]))
        pos = end + (-length % 4)
        if cflag == 0 or cflag == 3:
            return MAGIC_BYTES.join(pieces), pos
        if cflag not in (1, 2):  # pragma: no cover - 2 bits can only hold 0..3
            raise BadRecordError(f"{where}: invalid continuation flag {cflag}")


# ------------------------------------------------------------------ sequential reader/writer

class MXRecordIO:
    """Sequential RecordIO file, ``flag`` 'r' or 'w' (``mxnet.recordio.MXRecordIO``)."""

    def __init__(self, uri: str, flag: str) -> None:
        if flag not in ("r", "w"):
            raise RecordIOError(f"{uri}: flag must be 'r' or 'w', got {flag!r}")
        self.uri = os.fspath(uri)
        self.flag = flag
        self.writable = flag == "w"
        self._file = None
        self._pid = None
        self.open()

    def open(self) -> None:
        """Open the file (truncating it when writing)."""
        if self.writable:
            try:
                self._file = open(self.uri, "wb")
            except OSError as exc:
                raise RecordIOError(f"{self.uri}: cannot open for writing: {exc.strerror}") from exc
        else:
            _check_readable(self.uri, "record file")
            self._file = None  # opened lazily (per process) by _handle()
        self._pid = os.getpid()
        self.is_open = True

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = open(self.uri, "rb")
            except OSError as exc:
                raise RecordIOError(f"{self.uri}: cannot open: {exc.strerror}") from exc
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        """Close the file (only in the process that opened it)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self.is_open = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        if self.writable:
            raise RecordIOError(f"{self.uri}: a RecordIO writer cannot be pickled")
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def reset(self) -> None:
        """Back to the first record (a writer starts the file again)."""
        if self.writable:
            self.close()
            self.open()
        else:
            self._handle().seek(0)

    def tell(self) -> int:
        """Current byte offset."""
        return self._handle().tell() if not self.writable else self._file.tell()

    def write(self, buf: bytes) -> None:
        """Append one record."""
        if not self.writable:
            raise RecordIOError(f"{self.uri}: opened for reading, cannot write")
        self._file.write(encode_record(buf))

    def read(self) -> bytes | None:
        """Next record payload, or None at the end of the file."""
        if self.writable:
            raise RecordIOError(f"{self.uri}: opened for writing, cannot read")
        handle = self._handle()
        start = handle.tell()
        head = handle.read(8)
        if not head:
            return None
        chunks = [head]

        def read_more(count: int) -> bytes:
            chunks.append(handle.read(max(count, 0)))
            return b"".join(chunks)

        payload, end = _decode_parts(head, 0, read_more, f"{self.uri}: record at offset {start}")
        handle.seek(start + end)
        return payload

    def __iter__(self) -> Iterator[bytes]:
        while True:
            record = self.read()
            if record is None:
                return
            yield record


def _check_readable(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise RecordIOError(f"{path}: {what} not found")
    if os.path.isdir(path):
        raise RecordIOError(f"{path}: is a directory, expected a {what}")
    if not os.access(path, os.R_OK):
        raise RecordIOError(f"{path}: cannot read the {what} (permission denied)")


def read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``key<TAB>offset`` .idx file into (keys, offsets) int64 arrays in file order."""
    _check_readable(idx_path, "index file")
    with open(idx_path, "rb") as handle:
        data = handle.read()
    text = data.strip()
    if not text:
        raise RecordIOError(f"{idx_path}: the index file is empty, expected one 'key<TAB>offset' line per record")
    lines = text.count(b"\n") + 1
    tokens = text.split()
    if len(tokens) == 2 * lines:
        try:
            values = np.array(tokens).astype(np.int64).reshape(-1, 2)
        except ValueError:
            values = None
    else:
        values = None
    if values is None:  # find the first bad line for the message
        for number, line in enumerate(text.split(b"\n"), 1):
            fields = line.split()
            if len(fields) != 2 or not all(f.lstrip(b"-").isdigit() for f in fields):
                shown = line.decode("utf-8", "replace")[:60]
                raise RecordIOError(f"{idx_path}: line {number} is {shown!r}, expected 'key<TAB>offset' integers")
        raise RecordIOError(f"{idx_path}: cannot parse the index")  # pragma: no cover
    keys, offsets = values[:, 0].copy(), values[:, 1].copy()
    if (offsets < 0).any():
        line = int(np.argmax(offsets < 0)) + 1
        raise RecordIOError(f"{idx_path}: line {line}: negative offset {offsets[line - 1]}")
    return keys, offsets


class MXIndexedRecordIO(MXRecordIO):
    """Random-access RecordIO with a ``.idx`` file (``mxnet.recordio.MXIndexedRecordIO``).

    ``keys`` lists the keys in .idx order; ``read_idx(key)`` costs one ``os.pread`` for an unsplit
    record. Safe to use from forked DataLoader workers (the descriptor is reopened per process).
    """

    def __init__(self, idx_path: str, uri: str, flag: str, key_type: type = int) -> None:
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        self._keys_list: list | None = None
        self._idx_dict: dict | None = None
        self._fd: int | None = None
        super().__init__(uri, flag)

    # -- opening
    def open(self) -> None:
        """Open the record file and read (or start) the index."""
        if self.flag == "w":
            super().open()
            try:
                self._fidx = open(self.idx_path, "w")
            except OSError as exc:
                raise RecordIOError(f"{self.idx_path}: cannot open for writing: {exc.strerror}") from exc
            self._key_array_list: list[int] = []
            self._offset_list: list[int] = []
            self.is_open = True
            return
        _check_readable(self.uri, "record file")
        self.key_array, self.offset_array = read_index(self.idx_path)
        self.file_size = os.path.getsize(self.uri)
        self._build_lookup()
        self._fd = None
        self._pid = os.getpid()
        self.is_open = True

    def _build_lookup(self) -> None:
        keys, offsets = self.key_array, self.offset_array
        if len(np.unique(keys)) != len(keys):
            values, counts = np.unique(keys, return_counts=True)
            raise RecordIOError(f"{self.idx_path}: key {int(values[counts > 1][0])} appears more than once")
        min_key, max_key = int(keys.min()), int(keys.max())
        if max_key >= FLOAT32_EXACT_LIMIT:
            warn_float32("key", max_key)
        # Dense key -> offset table when keys are (nearly) contiguous: O(1) lookups, no dict of millions.
        if min_key >= 0 and max_key <= 4 * len(keys) + 1024:
            self._dense = np.full(max_key + 1, -1, dtype=np.int64)
            self._dense[keys] = offsets
            self._sparse = None
        else:
            self._dense = None
            self._sparse = dict(zip(keys.tolist(), offsets.tolist()))
        # Bytes until the next record start: lets one pread fetch a whole record.
        sorted_offsets = np.unique(np.append(offsets, self.file_size))
        position = np.searchsorted(sorted_offsets, offsets)
        following = sorted_offsets[np.minimum(position + 1, len(sorted_offsets) - 1)]
        self._span = np.where(following > offsets, following - offsets, 8)
        if self._dense is not None:
            self._span_by_key = np.zeros(max_key + 1, dtype=np.int64)
            self._span_by_key[keys] = self._span
        else:
            self._span_by_key = dict(zip(keys.tolist(), self._span.tolist()))

    def _fd_for_process(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd = os.open(self.uri, os.O_RDONLY)
            except OSError as exc:
                raise RecordIOError(f"{self.uri}: cannot open: {exc.strerror}") from exc
            self._pid = os.getpid()
        return self._fd

    def release_descriptor(self) -> None:
        """Close this process's read descriptor, if open; the next read opens it again. Several sources
        open each shard only in the processes that read it, not all of them in the trainer."""
        if self.flag != "w" and self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close both files; a writer flushes the index."""
        if self.flag == "w":
            if getattr(self, "_fidx", None) is not None:
                self._fidx.close()
                self._fidx = None
            super().close()
            return
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self.is_open = False

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_fd"] = None
        return state

    # -- mxnet-compatible attributes
    @property
    def keys(self) -> list:
        """Every key in the index, in file order."""
        if self._keys_list is None:
            if self.flag == "w":
                return self._key_array_list
            self._keys_list = [self.key_type(k) for k in self.key_array.tolist()]
        return self._keys_list

    @property
    def idx(self) -> dict:
        """Key -> byte offset."""
        if self.flag == "w":
            return dict(zip(self._key_array_list, self._offset_list))
        if self._idx_dict is None:
            self._idx_dict = dict(zip(self.keys, self.offset_array.tolist()))
        return self._idx_dict

    def __len__(self) -> int:
        return len(self._key_array_list) if self.flag == "w" else len(self.key_array)

    def __contains__(self, key: Any) -> bool:
        return self._lookup(int(key), missing_ok=True)[0] >= 0

    def _lookup(self, key: int, missing_ok: bool = False) -> tuple[int, int]:
        if self._dense is not None:
            offset = int(self._dense[key]) if 0 <= key < len(self._dense) else -1
            span = int(self._span_by_key[key]) if offset >= 0 else 0
        else:
            offset = self._sparse.get(key, -1)
            span = self._span_by_key.get(key, 0)
        if offset < 0 and not missing_ok:
            raise KeyError(f"{self.idx_path}: key {key} is not in the index")
        return offset, span

    def seek(self, idx: Any) -> None:
        """Position the sequential reader at key ``idx``."""
        offset, _ = self._lookup(int(idx))
        self._handle().seek(offset)

    def read_idx(self, idx: Any) -> bytes:
        """Payload of the record with key ``idx`` (parts re-joined)."""
        key = int(idx)
        offset, span = self._lookup(key)
        where = f"{self.uri}: key {key} at offset {offset}"
        if offset >= self.file_size:
            raise BadRecordError(f"{self.uri}: key {key}: offset {offset} from {self.idx_path} is past the end "
                                 f"of the file ({self.file_size} bytes)")
        fd = self._fd_for_process()
        buf = os.pread(fd, span if span <= _SINGLE_READ_LIMIT else 8, offset)
        chunks = [buf]

        def read_more(count: int) -> bytes:
            have = sum(len(c) for c in chunks)
            chunks.append(os.pread(fd, max(count, 4096), offset + have))
            return b"".join(chunks)

        payload, _ = _decode_parts(buf, 0, read_more, where)
        return payload

    def write_idx(self, idx: Any, buf: bytes) -> None:
        """Append a record and its ``key<TAB>offset`` line."""
        key = self.key_type(idx)
        position = self.tell()
        self.write(buf)
        self._fidx.write(f"{key}\t{position}\n")
        self._key_array_list.append(key)
        self._offset_list.append(position)
