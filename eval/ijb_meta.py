"""IJB-B / IJB-C protocol files: the face list with landmarks, the 1:1 pair list and the 1:N CSVs.

Layout (insightface's ``eval_ijbc.py`` layout; ``image_path`` is the ``IJBC`` or ``IJBB`` folder)::

    IJBC/meta/ijbc_face_tid_mid.txt         "<image> <template_id> <media_id>" per face
    IJBC/meta/ijbc_name_5pts_score.txt      "<image> x1 y1 ... x5 y5 <faceness score>", same order
    IJBC/meta/ijbc_template_pair_label.txt  "<template1> <template2> <label 0|1>"
    IJBC/loose_crop/<image>
    IJBC/meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ..._probe_mixed.csv   (1:N only; CSV with a header
        holding TEMPLATE_ID and SUBJECT_ID; templates are the ones of ijbc_face_tid_mid.txt)
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from utils.faces.align import as_landmarks
from utils.data.text_fields import read_fields


class IJBError(ValueError):
    """Missing or inconsistent IJB files; the message names the file (and line) and is one line."""


def meta_path(image_path: str, target: str, suffix: str) -> str:
    """Path of an IJB meta file (``<image_path>/meta/<target>_<suffix>``)."""
    return os.path.join(image_path, "meta", f"{target.lower()}_{suffix}")


def _read_rows(path: str, num_fields: int | None, what: str) -> list[tuple[int, list[str]]]:
    rows = read_fields(path, what, IJBError)
    for line_number, fields in rows:
        if num_fields is not None and len(fields) != num_fields:
            raise IJBError(f"{path} line {line_number}: expected {num_fields} fields ({what}), got {len(fields)}")
    if not rows:
        raise IJBError(f"{path}: empty {what} file")
    return rows


def _ints(path: str, line_number: int, values: list[str]) -> list[int]:
    try:
        return [int(value) for value in values]
    except ValueError:
        raise IJBError(f"{path} line {line_number}: expected integers, got {' '.join(values)}") from None


@dataclass
class FaceList:
    """One row per face image: name, template, media, landmarks [5, 2], faceness score."""

    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray


def read_faces(image_path: str, target: str) -> FaceList:
    """``*_face_tid_mid.txt`` and ``*_name_5pts_score.txt`` (same order, checked line by line)."""
    tid_path = meta_path(image_path, target, "face_tid_mid.txt")
    landmark_path = meta_path(image_path, target, "name_5pts_score.txt")
    tid_rows = _read_rows(tid_path, 3, "image template_id media_id")
    landmark_rows = _read_rows(landmark_path, None, "image x1 y1 ... x5 y5 score")
    if len(tid_rows) != len(landmark_rows):
        raise IJBError(f"{landmark_path}: {len(landmark_rows)} faces but {tid_path} lists {len(tid_rows)}")
    names, templates, medias, landmarks, scores = [], [], [], [], []
    for (tid_line, tid_fields), (lm_line, lm_fields) in zip(tid_rows, landmark_rows):
        if len(lm_fields) != 12:
            raise IJBError(f"{landmark_path} line {lm_line}: expected an image name, 10 landmark values and a "
                           f"score, got {len(lm_fields) - 1} values")
        if lm_fields[0] != tid_fields[0]:
            raise IJBError(f"{landmark_path} line {lm_line}: image {lm_fields[0]} but {tid_path} line {tid_line} "
                           f"has {tid_fields[0]} (the files must list faces in the same order)")
        template, media = _ints(tid_path, tid_line, tid_fields[1:])
        try:
            values = [float(value) for value in lm_fields[1:]]
        except ValueError:
            raise IJBError(f"{landmark_path} line {lm_line}: landmarks and score must be numbers") from None
        names.append(tid_fields[0])
        templates.append(template)
        medias.append(media)
        landmarks.append(as_landmarks(values[:10], f"{landmark_path} line {lm_line}"))
        scores.append(values[10])
    return FaceList(names, np.array(templates, dtype=np.int64), np.array(medias, dtype=np.int64),
                    np.array(landmarks, dtype=np.float32), np.array(scores, dtype=np.float32))


def read_pairs(image_path: str, target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template1, template2, label) arrays of ``*_template_pair_label.txt``."""
    path = meta_path(image_path, target, "template_pair_label.txt")
    rows = _read_rows(path, 3, "template1 template2 label")
    values = np.array([_ints(path, line, fields) for line, fields in rows], dtype=np.int64)
    bad = np.nonzero((values[:, 2] != 0) & (values[:, 2] != 1))[0]
    if len(bad):
        raise IJBError(f"{path} line {rows[bad[0]][0]}: label must be 0 or 1, got {values[bad[0], 2]}")
    return values[:, 0], values[:, 1], values[:, 2]


def read_identification_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids), one per template, from an IJB 1:N CSV (TEMPLATE_ID, SUBJECT_ID columns)."""
    if not os.path.isfile(path):
        raise IJBError(f"{path}: 1:N protocol file not found")
    templates: dict[int, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"TEMPLATE_ID", "SUBJECT_ID"} - set(reader.fieldnames or [])
        if missing:
            raise IJBError(f"{path}: header lacks column(s) {', '.join(sorted(missing))}")
        for line_number, row in enumerate(reader, 2):
            template, subject = _ints(path, line_number, [row["TEMPLATE_ID"], row["SUBJECT_ID"]])
            if templates.setdefault(template, subject) != subject:
                raise IJBError(f"{path} line {line_number}: template {template} has subjects "
                               f"{templates[template]} and {subject}")
    if not templates:
        raise IJBError(f"{path}: no templates")
    ids = np.array(sorted(templates), dtype=np.int64)
    return ids, np.array([templates[t] for t in ids], dtype=np.int64)
