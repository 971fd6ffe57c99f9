"""Pair whole-cell and nuclear masks: the CellSegmentationEvaluator matcher ("repair" mode), vectorised."""

from __future__ import annotations

import numpy as np

from maskworks.io import InputError

# The greedy pass resolves cells in vectorised rounds while a round settles at least
# this fraction of the cells still waiting; the rest are resolved one by one.
_MIN_ROUND_PROGRESS = 0.125
# Whole-image passes run over bands of about this many pixels (rows, or planes in 3-D),
# so that temporaries stay small and in cache; a patch is a single band.
BAND_PIXELS = 1 << 20


def boundaries(labels) -> np.ndarray:
    """Inner boundaries of a label image: ``find_boundaries(labels, mode="inner")``.

    Parameters
    ----------
    labels : array-like of int, any number of axes
        Instance labels, 0 = background.

    Returns
    -------
    ndarray of bool
        True on every labelled pixel that has a face neighbour (4-connected in
        2-D, 6-connected in 3-D) *inside the array* carrying a different label,
        background or another object.  The array border itself is not a
        boundary.  ``labels * boundaries(labels)`` gives the boundaries with
        their ids.

    Notes
    -----
    Equals :func:`skimage.segmentation.find_boundaries` with ``mode="inner"`` and
    the default ``connectivity=1`` (grey dilation != grey erosion over the cross
    footprint, with scipy's "reflect" edge mode, restricted to the foreground),
    computed with shifted comparisons instead of two morphological filters.
    """
    lab = np.asarray(labels)
    out = np.zeros(lab.shape, dtype=bool)
    for axis in range(lab.ndim):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(lab.ndim))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(lab.ndim))
        differ = lab[lo] != lab[hi]
        out[lo] |= differ
        out[hi] |= differ
    out &= lab != 0
    return out


def repair_masks(cells, nuclei) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Keep the cells that pair with a nucleus, trim each nucleus to its cell's interior.

    Parameters
    ----------
    cells, nuclei : array-like of int, shape (y, x)
        Whole-cell and nuclear instance labels of the same image (0 =
        background).  Ids need not be consecutive; any integer dtype.  3-D
        (z, y, x) label volumes work the same way, with 6-connected membranes.

    Returns
    -------
    cell, nucleus, cytoplasm : ndarray
        Label images with ids 1..M: cell ``k`` pairs with nucleus ``k``, the
        nucleus lies in the cell's interior, cytoplasm ``k`` is cell ``k`` minus
        nucleus ``k``.  Cells keep their input order (cell ``k`` is the ``k``-th
        matched cell in ascending input id).  dtype: the smallest unsigned
        integer type that holds M.
    metrics : dict
        ``cells_in`` (C), ``nuclei_in`` (N), ``matched`` (M),
        ``matched_fraction`` = M / (C + N - M) (matched pairs over all distinct
        objects; 0.0 when there are none), ``cells_unmatched``,
        ``nuclei_unmatched``, ``nuclei_trimmed`` (matched nuclei that lost
        pixels) and ``nucleus_trimmed_fraction`` (pixels cut from the matched
        nuclei over their pixels before trimming; 0.0 when nothing matched).

    Raises
    ------
    InputError
        Different shapes, a non-integer dtype, negative labels, or not 2-D/3-D.

    Notes
    -----
    Matches the CellSegmentationEvaluator matcher as Aegle uses it
    (``do_mismatch_repair=True``):

    1. both images are relabelled to consecutive ids in ascending order, so
       gaps in the ids change nothing;
    2. a cell's membrane is its one-pixel inner boundary, :func:`boundaries`
       (``find_boundaries(mode="inner")``: a cell pixel with a 4-neighbour
       inside the image that is background or another cell); its interior is
       the cell minus its membrane;
    3. cells are visited in ascending id.  A cell's candidates are the nuclei
       not taken by an earlier cell that overlap any of its pixels; a
       candidate's mismatch is (nucleus pixels outside the cell interior) /
       (nucleus pixels) and it is acceptable when the mismatch is below 1.  The
       lowest mismatch wins, ties going to the smaller nucleus id, and the
       winner is taken;
    4. the matched nucleus is trimmed to the cell interior, the cell is kept
       whole; unmatched cells and nuclei are dropped.

    A nucleus that touches a cell only on its membrane has mismatch 1, so the
    candidates that matter are exactly the nuclei meeting the interior: one
    histogram of (cell interior, nucleus) pixel pairs (a bincount, and a sort
    for the few nuclei that meet several cells) gives every mismatch.  The
    greedy pass settles, in vectorised rounds, every cell whose best remaining
    candidate is wanted by no earlier unsettled cell (that cell gets it in the
    sequential order too); the cells left when rounds stop paying off are
    settled one by one, in order.  Painting is by lookup table.  The image
    passes run band by band (``BAND_PIXELS``), so memory beyond the inputs and
    outputs is a few bands' worth.
    The result is order-dependent by definition (an earlier cell takes a
    shared nucleus first), so permuting the input ids can change which pairs
    survive when cells compete for a nucleus.
    """
    cells, nuclei = check_labels(cells, nuclei)
    cell_img, cell_id, _ = _index_image(cells)
    nuc_img, nuc_id, nuc_area = _index_image(nuclei)
    bands = _bands(cells.shape)
    found = [_band_pairs(cell_img, nuc_img[band], band, cell_id, nuc_id) for band in bands]
    m = _Matching(found, cell_id, nuc_id, nuc_area)
    out = [np.empty(cells.shape, dtype=m.dtype) for _ in range(3)] if len(bands) > 1 else None
    for band in bands:
        pieces = m.paint(cell_img, nuc_img[band], band)
        if out is None:
            out = pieces
        else:
            for whole, piece in zip(out, pieces):
                whole[band] = piece
    cell, nucleus, cytoplasm = out
    return cell, nucleus, cytoplasm, m.metrics()


def repair_label_stores(cells, nuclei, cell_out, nucleus_out, *, band_rows) -> dict:
    """:func:`repair_masks` of two 2-D label images too large for memory, read and written by row bands.

    Parameters
    ----------
    cells, nuclei : array-like of int, shape (y, x)
        Whole-cell and nuclear labels (e.g. Zarr arrays), read ``band_rows``
        rows at a time (and one row of context on each side); ids at most a
        few times the pixel count per band apart (as stitched labels, 1..n).
    cell_out, nucleus_out : array-like, shape (y, x)
        Written band by band with the repaired cell and nucleus labels.
    band_rows : int
        Rows per band.

    Returns
    -------
    dict
        The metrics of :func:`repair_masks`; the labels written are exactly
        those :func:`repair_masks` returns for the whole images.
    """
    h = cells.shape[0]
    if tuple(cells.shape) != tuple(nuclei.shape) or len(cells.shape) != 2:
        raise InputError(f"cells {tuple(cells.shape)} and nuclei {tuple(nuclei.shape)}: expected two 2-D label "
                         "images of one shape")
    rows = max(1, int(band_rows))
    bands = [slice(y, min(y + rows, h)) for y in range(0, h, rows)]
    areas = []
    for name, labels in (("cells", cells), ("nuclei", nuclei)):
        area = np.zeros(1, np.int64)
        for band in bands:
            block = np.asarray(labels[band])
            check_labels(block, block, names=(name, name))
            counts = np.bincount(block.reshape(-1))
            if counts.size > area.size:
                area = np.concatenate([area, np.zeros(counts.size - area.size, np.int64)])
            area[:counts.size] += counts
        areas.append(area)
    cell_area, nuc_area = areas
    cell_id, nuc_id = _consecutive(cell_area), _consecutive(nuc_area)
    found = []
    for band in bands:
        block, lo = _with_context(cells, band, h)
        found.append(_band_pairs(block, np.asarray(nuclei[band]), slice(band.start - lo, band.stop - lo),
                                 cell_id, nuc_id))
    m = _Matching(found, cell_id, nuc_id, nuc_area)
    for band in bands:
        block, lo = _with_context(cells, band, h)
        c, n, _ = m.paint(block, np.asarray(nuclei[band]), slice(band.start - lo, band.stop - lo))
        cell_out[band] = c
        nucleus_out[band] = n
    return m.metrics()


def _with_context(labels, band, h):
    """The rows of ``band`` with one row of context on each side (inside the image), and its first row."""
    lo = max(band.start - 1, 0)
    return np.asarray(labels[lo:min(band.stop + 1, h)]), lo


def _consecutive(area) -> np.ndarray:
    present = area > 0
    present[0] = False
    consecutive = np.cumsum(present, dtype=np.int64)
    consecutive[~present] = 0
    return consecutive


def _band_pairs(cell_img, nuc_band, band, cell_id, nuc_id):
    """(cell, nucleus, pixels) of the nucleus pixels in a cell's interior within ``band`` of ``cell_img``."""
    where = np.flatnonzero(_interior(cell_img, band) & (nuc_band != 0))
    return _pair_counts(cell_id[np.take(cell_img[band], where)], nuc_id[np.take(nuc_band, where)],
                        int(nuc_id.max(initial=0)))


class _Matching:
    """The greedy matching of all (cell, nucleus) pairs, its lookup tables and its metrics."""

    def __init__(self, found, cell_id, nuc_id, nuc_area):
        self.n_cells, self.n_nuclei = int(cell_id.max(initial=0)), int(nuc_id.max(initial=0))
        nucleus_area = np.concatenate([[0], nuc_area[nuc_id > 0]]).astype(np.int64)  # by consecutive id
        pair_cell, pair_nuc, inside = _merge_pairs(found, self.n_nuclei)
        area = nucleus_area[pair_nuc]
        order = np.lexsort((pair_nuc, (area - inside) / area, pair_cell))  # each cell's candidates, best first
        pair_cell, pair_nuc, inside = pair_cell[order], pair_nuc[order], inside[order]
        match = _greedy_match(pair_cell, pair_nuc, self.n_cells, self.n_nuclei)
        matched_cells = np.flatnonzero(match)
        self.matched_nuclei = match[matched_cells]
        self.m = m = int(matched_cells.size)
        self.dtype = dtype = np.min_scalar_type(m) if m > 0 else np.dtype(np.uint8)
        new_cell = np.zeros(self.n_cells + 1, dtype=dtype)
        new_cell[matched_cells] = np.arange(1, m + 1)
        new_nuc = np.zeros(self.n_nuclei + 1, dtype=dtype)
        new_nuc[self.matched_nuclei] = np.arange(1, m + 1)
        self.cell_lut, self.nuc_lut = new_cell[cell_id], new_nuc[nuc_id]
        self.area_before = nucleus_area[self.matched_nuclei]
        self.kept = inside[match[pair_cell] == pair_nuc]  # one pair per matched cell, in ascending cell order

    def paint(self, cell_img, nuc_band, band):
        """Repaired cell, nucleus and cytoplasm of ``band`` of ``cell_img`` (``nuc_band``: its nuclei)."""
        # ids index their lookup tables by construction: mode="clip" skips the bounds check
        c = np.take(self.cell_lut, cell_img[band], mode="clip")
        n = np.take(self.nuc_lut, nuc_band, mode="clip")
        keep = n == c  # matched nucleus k on cell k (or 0 on 0) ...
        keep &= _interior(cell_img, band)  # ... in its interior
        n = np.where(keep, n, self.dtype.type(0))
        return c, n, c - n

    def metrics(self) -> dict:
        m, n_cells, n_nuclei = self.m, self.n_cells, self.n_nuclei
        trimmed = int(self.area_before.sum() - self.kept.sum())
        total = n_cells + n_nuclei - m
        return {
            "cells_in": int(n_cells),
            "nuclei_in": int(n_nuclei),
            "matched": m,
            "matched_fraction": m / total if total else 0.0,
            "cells_unmatched": int(n_cells - m),
            "nuclei_unmatched": int(n_nuclei - m),
            "nuclei_trimmed": int(np.count_nonzero(self.kept < self.area_before)),
            "nucleus_trimmed_fraction": trimmed / int(self.area_before.sum()) if m else 0.0,
        }


def check_labels(cells, nuclei, *, names=("cells", "nuclei")):
    """``cells`` and ``nuclei`` as arrays, or :class:`InputError` naming ``names`` if they are not
    two non-negative integer label images of one shape (2-D, or 3-D)."""
    cells, nuclei = np.asarray(cells), np.asarray(nuclei)
    for what, a in zip(names, (cells, nuclei)):
        if a.dtype.kind not in "iu":
            raise InputError(
                f"{what}: label image has dtype {a.dtype} but integer instance labels are needed "
                "(0 = background, one id per object); convert the mask to an integer type first"
            )
        if a.ndim not in (2, 3):
            raise InputError(f"{what}: label image has shape {a.shape} ({a.ndim}-D) but a 2-D (y, x) image "
                             "(or a 3-D volume) is needed")
        if a.dtype.kind == "i" and a.size and a.min() < 0:
            raise InputError(f"{what}: label image has negative labels (min {a.min()}); ids must be >= 0 (0 = background)")
    if cells.shape != nuclei.shape:
        raise InputError(
            f"{names[0]} has shape {cells.shape} but {names[1]} has shape {nuclei.shape}; "
            "cell and nucleus masks must come from the same image"
        )
    return cells, nuclei


def _index_image(labels):
    """``(image, consecutive, area)`` for a label image.

    ``image`` holds the labels themselves, or their ranks among the distinct
    labels when the ids are too large for a lookup table; ``consecutive`` maps
    each value of ``image`` to its consecutive id (1..n in ascending order of the
    input ids, 0 for background and absent values) and ``area`` gives each
    value's pixel count.
    """
    hi = int(labels.max()) if labels.size else 0
    if hi < labels.size + (1 << 16):  # a lookup table no larger than the image
        image = labels.astype(np.int64) if labels.dtype == np.uint64 else labels  # bincount/take want intp
        area = np.zeros(hi + 1, dtype=np.int64)
        for band in _bands(image.shape, max(BAND_PIXELS, hi + 1)):  # adding up counts costs hi per band
            counts = np.bincount(image[band].reshape(-1))
            area[: counts.size] += counts
    else:
        ids, inverse = np.unique(labels, return_inverse=True)
        image = inverse.reshape(labels.shape) + (ids[0] != 0)
        area = np.bincount(image.reshape(-1), minlength=1)
    return image, _consecutive(area), area


def _bands(shape, pixels=None):
    """Slices of the first axis covering an array in pieces of about ``pixels`` (``BAND_PIXELS``)."""
    rows = max(1, (pixels or BAND_PIXELS) // max(1, int(np.prod(shape[1:]))))
    return [slice(y, min(y + rows, shape[0])) for y in range(0, shape[0], rows)]


def _interior(cell_img, band):
    """``(cell_img[band] != 0) & ~boundaries(cell_img)[band]``: cell pixels whose face neighbours
    inside the array all carry the same label (one row of context read on each side)."""
    lo, hi = max(band.start - 1, 0), min(band.stop + 1, cell_img.shape[0])
    block = cell_img[lo:hi]
    inner = block != 0
    for axis in range(block.ndim):
        a = tuple(slice(None, -1) if i == axis else slice(None) for i in range(block.ndim))
        b = tuple(slice(1, None) if i == axis else slice(None) for i in range(block.ndim))
        same = block[a] == block[b]
        inner[a] &= same
        inner[b] &= same
    return inner[band.start - lo: band.stop - lo]


def _pair_counts(pix_cell, pix_nuc, n_nuclei):
    """The distinct (cell, nucleus) pairs among the given pixels and their pixel counts.

    Most nuclei meet one cell interior only: their pixels are counted with a
    bincount against the nucleus's lowest cell, and only the pixels in other
    cells (nuclei crossing a border) need a sort.
    """
    lowest = np.full(n_nuclei + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(lowest, pix_nuc, pix_cell)
    first = pix_cell == lowest[pix_nuc]
    counts = np.bincount(pix_nuc[first], minlength=n_nuclei + 1)
    nuc = np.flatnonzero(counts)
    keys, other_counts = np.unique(pix_cell[~first] * (n_nuclei + 1) + pix_nuc[~first], return_counts=True)
    return (np.concatenate([lowest[nuc], keys // (n_nuclei + 1)]),
            np.concatenate([nuc, keys % (n_nuclei + 1)]),
            np.concatenate([counts[nuc], other_counts]).astype(np.int64))


def _merge_pairs(found, n_nuclei):
    """One (cell, nucleus, count) list from the bands' lists, counts of a pair summed."""
    cell, nuc, count = (np.concatenate([f[i] for f in found]) if found else np.zeros(0, np.int64)
                        for i in range(3))
    if len(found) < 2 or not len(cell):  # one band, or no cell meets a nucleus at all
        return cell, nuc, count
    keys = cell * (n_nuclei + 1) + nuc
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return cell[order][starts], nuc[order][starts], np.add.reduceat(count[order], starts)


def _greedy_match(pair_cell, pair_nuc, n_cells, n_nuclei) -> np.ndarray:
    """Nucleus matched to each cell (0: none) by the sequential greedy rule.

    ``pair_cell``/``pair_nuc``: every acceptable (cell, nucleus) pair, grouped
    by ascending cell and, within a cell, in order of preference.  Visiting
    cells in ascending order, each takes its most preferred nucleus that no
    earlier cell took.

    A round settles, all at once, every cell whose best remaining nucleus is not
    a remaining candidate of any smaller unsettled cell: no earlier cell can take
    that nucleus any more, and the nuclei it prefers were taken (by smaller
    cells, since a smaller cell still wanting a nucleus blocks larger ones), so
    the sequential rule gives it the same.  The smallest unsettled cell always
    settles, so rounds end; once they settle too few cells, the rest go one by one.
    """
    match = np.zeros(n_cells + 1, dtype=np.int64)
    taken = np.zeros(n_nuclei + 1, dtype=bool)
    settled = np.zeros(n_cells + 1, dtype=bool)
    c, n = pair_cell, pair_nuc
    while c.size:
        head = np.ones(c.size, dtype=bool)
        head[1:] = c[1:] != c[:-1]
        best_cell, best_nuc = c[head], n[head]
        first_claim = np.full(n_nuclei + 1, n_cells + 1, dtype=np.int64)
        np.minimum.at(first_claim, n, c)
        win = first_claim[best_nuc] == best_cell
        match[best_cell[win]] = best_nuc[win]
        taken[best_nuc[win]] = True
        settled[best_cell[win]] = True
        keep = ~(settled[c] | taken[n])
        c, n = c[keep], n[keep]
        if np.count_nonzero(win) < _MIN_ROUND_PROGRESS * best_cell.size:
            break
    _sequential(c, n, match, taken)
    return match


def _sequential(c, n, match, taken) -> None:
    """The greedy rule one cell at a time over the remaining pairs (grouped by cell, best first)."""
    if not c.size:
        return
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]]).tolist()
    ends = starts[1:] + [c.size]
    cl, nl, tk = c.tolist(), n.tolist(), taken.tolist()
    got_cell, got_nuc = [], []
    for s, e in zip(starts, ends):
        for k in range(s, e):
            if not tk[nl[k]]:
                tk[nl[k]] = True
                got_cell.append(cl[s])
                got_nuc.append(nl[k])
                break
    match[got_cell] = got_nuc
    taken[got_nuc] = True
