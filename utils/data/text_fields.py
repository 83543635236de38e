"""Reading whitespace-separated text tables (landmark lists, IJB meta files) with their line numbers."""
from __future__ import annotations

import os


def read_fields(path: str, what: str, error: type[Exception] = ValueError,
                comment: str | None = None) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line; lines starting with ``comment`` are skipped.

    A missing file raises ``error("<path>: <what> file not found")``; an empty result is the caller's to judge.
    """
    if not os.path.isfile(path):
        raise error(f"{path}: {what} file not found")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if fields and not (comment and fields[0].startswith(comment)):
                rows.append((line_number, fields))
    return rows
