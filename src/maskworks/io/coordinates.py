"""Read tables of patch centres (x, y, z voxel coordinates) written by people and by IMOD."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .volumes import InputError

# A comma or a semicolon (with any spaces around it) or a run of whitespace separates values.
_SEPARATOR = re.compile(r"\s*[,;]\s*|\s+")
_AXES = ("x", "y", "z")


def _tokens(line: str) -> list[str]:
    tokens = [t.strip().strip("\"'") for t in _SEPARATOR.split(line.strip())]
    while tokens and tokens[-1] == "":  # a trailing separator, as some spreadsheets write
        tokens.pop()
    return tokens


def _numbers(tokens: list[str]) -> list[float] | None:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        return None


def read_centres(path: str | Path) -> np.ndarray:
    """Read patch centres from a CSV or whitespace-separated text file.

    Parameters
    ----------
    path : str or Path
        Text file with one centre a line.  Values may be separated by commas,
        semicolons, tabs or spaces and may be floats.  Empty lines and lines
        starting with ``#`` are skipped.  The first line may be a header: if it
        names columns ``x``, ``y`` and ``z`` (any case, other columns allowed)
        those columns are read; a napari points layer saved as CSV
        (``index,axis-0,axis-1,axis-2``: the layer's z, y, x) is read with
        ``axis-2`` as x, ``axis-1`` as y, ``axis-0`` as z (with more axes, the
        last three); otherwise the header must have exactly three names.
        Without a header every line holds exactly three numbers ``x y z``
        (IMOD ``model2point`` output, MemBrain-seg coordinate files).

    Returns
    -------
    ndarray of float64, shape (n, 3)
        The centres as ``x, y, z`` voxel coordinates (MRC X/Y/Z as IMOD shows
        them), in file order.

    Raises
    ------
    InputError
        For a missing or empty file, or a line that is not three finite
        numbers; the message names the file, the line number and its text.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a CSV of patch centres x,y,z)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a text file ({exc}); expected a CSV of patch centres x,y,z") from None
    columns, width = [0, 1, 2], 3  # where x, y, z are and how many values a row has
    what = "three numbers x,y,z (voxel coordinates; comma, semicolon or space separated)"
    header_allowed = True
    rows: list[list[float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens = _tokens(line)
        values = _numbers(tokens)
        if values is None and header_allowed:
            columns, width = _header_columns(path, number, line, tokens)
            what = f"{width} numbers with x, y, z in columns {[c + 1 for c in columns]}, as the header says"
            header_allowed = False
            continue
        header_allowed = False
        if values is None or len(values) != width:
            raise InputError(f"{path}, line {number}: {line.strip()!r} is not {what}")
        xyz = [values[c] for c in columns]
        if not all(np.isfinite(xyz)):
            raise InputError(f"{path}, line {number}: {line.strip()!r} holds a non-finite coordinate")
        rows.append(xyz)
    if not rows:
        raise InputError(f"{path}: holds no centres (expected lines of x,y,z voxel coordinates)")
    return np.asarray(rows, dtype=np.float64)


def _header_columns(path: Path, number: int, line: str, tokens: list[str]) -> tuple[list[int], int]:
    names = [t.lower() for t in tokens]
    if any(_numbers([t]) is not None for t in tokens):  # a data row with a typo, not a header
        raise InputError(f"{path}, line {number}: {line.strip()!r} is not three numbers x,y,z")
    if all(a in names for a in _AXES):
        return [names.index(a) for a in _AXES], len(tokens)
    napari = sorted((int(n[5:]), i) for i, n in enumerate(names) if re.fullmatch(r"axis-\d+", n))
    if len(napari) >= 3 and [k for k, _ in napari] == list(range(len(napari))):
        # a napari points layer saved as CSV: axis-0..axis-(k-1) in the layer's (..., z, y, x) order
        return [napari[-1][1], napari[-2][1], napari[-3][1]], len(tokens)
    if len(tokens) == 3:
        return [0, 1, 2], 3
    raise InputError(
        f"{path}, line {number}: {line.strip()!r} is neither three numbers x,y,z nor a header "
        "naming columns x, y and z"
    )
