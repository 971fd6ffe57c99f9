"""A straightforward, pixel-set reference of the cell-nucleus matcher (slow on purpose).

Written from the behaviour described in issue 4 (the CellSegmentationEvaluator
matcher in "repair" mode, as Aegle uses it), one Python set of pixels per object,
so that :func:`maskworks.codex.repair.repair_masks` can be checked against it
(tests/unit/test_repair.py) and timed against it (bench/bench_repair.py).
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries


def pixel_sets(labels):
    """{consecutive id: set of flat pixel indices}, ids 1..n in ascending order of the input ids."""
    flat = np.asarray(labels).ravel()
    order = np.argsort(flat, kind="stable")
    values = flat[order]
    sets, cur, members = {}, None, []
    for index, value in zip(order.tolist(), values.tolist()):
        if value == 0:
            continue
        if value != cur:
            if cur is not None:
                sets[len(sets) + 1] = set(members)
            cur, members = value, []
        members.append(index)
    if cur is not None:
        sets[len(sets) + 1] = set(members)
    return sets


def reference_repair(cells, nuclei):
    """Matched (cell, nucleus, cytoplasm) label images, as in ``repair_masks``, and the matched pairs.

    Returns ``cell, nucleus, cytoplasm, pairs`` where ``pairs`` lists the
    (consecutive cell id, consecutive nucleus id) of each match in output order.
    """
    cells, nuclei = np.asarray(cells), np.asarray(nuclei)
    cell_sets = pixel_sets(cells)
    nucleus_sets = pixel_sets(nuclei)
    nuclear_id = {p: j for j, s in nucleus_sets.items() for p in s}
    membrane = set(np.flatnonzero(find_boundaries(cells, mode="inner")).tolist())

    taken, pairs, trimmed_nuclei = set(), [], []
    for i in sorted(cell_sets):
        cell = cell_sets[i]
        interior = cell - membrane
        candidates = sorted({nuclear_id[p] for p in cell if p in nuclear_id})
        best, best_mismatch, best_nucleus = None, 1.0, None
        for j in candidates:
            if j in taken:
                continue
            nucleus = nucleus_sets[j]
            mismatch = len(nucleus - interior) / len(nucleus)
            if mismatch < best_mismatch:
                best, best_mismatch, best_nucleus = j, mismatch, nucleus & interior
        if best is not None:
            taken.add(best)
            pairs.append((i, best))
            trimmed_nuclei.append(best_nucleus)

    dtype = np.min_scalar_type(len(pairs)) if pairs else np.uint8
    cell_out = np.zeros(cells.size, dtype=dtype)
    nucleus_out = np.zeros(cells.size, dtype=dtype)
    for k, ((i, _), nucleus) in enumerate(zip(pairs, trimmed_nuclei), start=1):
        cell_out[list(cell_sets[i])] = k
        nucleus_out[list(nucleus)] = k
    cytoplasm = np.where(nucleus_out != 0, 0, cell_out).astype(dtype)
    shape = cells.shape
    return cell_out.reshape(shape), nucleus_out.reshape(shape), cytoplasm.reshape(shape), pairs
