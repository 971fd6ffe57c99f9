"""Measure every cell: marker intensities per compartment, morphology, spatial neighbours, AnnData.

The deliverable that users of Aegle, steinbock and MCMICRO open next: a cell x marker table
(Aegle's ``cell_by_marker.csv``), a per-cell metadata table (``cell_metadata.csv``) and an
AnnData object for scanpy/squidpy with the cell centroids in ``obsm["spatial"]`` and a spatial
neighbour graph in ``obsp`` (squidpy's keys).  Everything is vectorised over cells: the label
images are read in row blocks and run-length encoded along rows, and every per-cell sum
(moments, compartment intensities) is a sum over runs (``np.add.reduceat``, ``np.bincount``);
no per-cell Python loop and no regionprops call.  Labels and channels may be lazy arrays: a
whole slide is never held, only a block of every channel and of the labels (``memory_mb``).
"""

from __future__ import annotations

import numpy as np

from ..io import InputError

STATISTICS = ("mean", "sum", "std", "median")
COMPARTMENTS = ("cell", "nucleus", "cytoplasm")
NEIGHBOURS = ("delaunay", "radius", "none")
_BLOCK_PIXELS = 2**24  # rows per intensity block: about 16 M pixels

# skimage regionprops property -> our column (Aegle's names where Aegle has the column)
MORPHOLOGY = {
    "area": "area", "perimeter": "perimeter", "area_convex": "convex_area",
    "axis_major_length": "major_axis_length", "axis_minor_length": "minor_axis_length",
    "eccentricity": "eccentricity", "solidity": "solidity", "extent": "extent", "orientation": "orientation",
}  # and centroid-0 / centroid-1 -> centroid_y / centroid_x


DEFAULT_MEMORY_MB = 256  # the block budget when none is given


def _block_rows(shape, memory_mb=None, bytes_per_pixel=64) -> int:
    """Rows per block: ``memory_mb`` (default ``DEFAULT_MEMORY_MB``) spread over ``bytes_per_pixel``
    of working memory a pixel costs (labels, their run index and temporaries)."""
    width = max(1, int(shape[1]))
    budget = DEFAULT_MEMORY_MB if memory_mb is None else float(memory_mb)
    pixels = max(width, int(budget * 2**20 / bytes_per_pixel))
    return max(1, pixels // width)


def _rows(array, y0, y1) -> np.ndarray:
    """Rows ``y0:y1`` of an in-memory or lazy (NumPy-style slicing) 2-D array."""
    return np.asarray(array[y0:y1])


def cell_ids(cell, *, memory_mb=None) -> np.ndarray:
    """The ids present in a cell label image, ascending (0 excluded); read block by block."""
    counts = np.zeros(1, np.int64)
    rows = _block_rows(cell.shape, memory_mb, 16)
    for y in range(0, cell.shape[0], rows):
        block = np.bincount(_rows(cell, y, y + rows).ravel().astype(np.intp, copy=False))
        if block.size > counts.size:
            counts = np.concatenate([counts, np.zeros(block.size - counts.size, np.int64)])
        counts[:block.size] += block
    return np.flatnonzero(counts[1:]) + 1


def _runs(blocks):
    """Row runs of constant value in every one of the 2-D ``blocks`` (same shape) at once.

    Returns the flat start of each run, its row, first and past-the-end column, and each
    block's value on the run.  A run never crosses a row, so a label's pixels are the union of
    its runs: sums over pixels become sums over runs (``np.add.reduceat`` on the flat block).
    """
    h, w = blocks[0].shape
    flats = [b.ravel() for b in blocks]
    change = np.zeros(h * w, bool)
    change[::w] = True
    for f in flats:
        np.logical_or(change[1:], f[1:] != f[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    row = starts // w
    c0 = starts - row * w
    c1 = np.append(starts[1:], h * w) - row * w
    return starts, row, c0, c1, [f[starts] for f in flats]


def compartment_sums(labels, plane, ids, *, block_rows=None):
    """Pixel count, sum and sum of squares of ``plane`` per id of ``labels`` (ids in ``ids``).

    Computed block by block with ``np.bincount`` (float64 accumulators), so memory is that of a
    block; ``labels`` and ``plane`` may be lazy arrays (NumPy-style slicing).
    """
    labels_shape = tuple(labels.shape)
    if tuple(plane.shape) != labels_shape:
        raise InputError(f"a channel has shape {tuple(plane.shape)} but the masks have {labels_shape}")
    n = int(ids[-1]) + 1 if len(ids) else 1
    count = np.zeros(n, np.float64)
    total = np.zeros(n, np.float64)
    squares = np.zeros(n, np.float64)
    rows = block_rows or max(1, _BLOCK_PIXELS // max(1, labels_shape[1]))
    for y in range(0, labels_shape[0], rows):
        lab = np.asarray(labels[y:y + rows]).ravel().astype(np.int64, copy=False)
        val = np.asarray(plane[y:y + rows], dtype=np.float64).ravel()
        keep = (lab > 0) & (lab < n)
        lab, val = lab[keep], val[keep]
        count += np.bincount(lab, minlength=n)
        total += np.bincount(lab, weights=val, minlength=n)
        squares += np.bincount(lab, weights=val * val, minlength=n)
    return count[ids], total[ids], squares[ids]


def _statistics_from_sums(count, total, squares, statistics) -> dict[str, np.ndarray]:
    """``mean``, ``sum`` and ``std`` (those in ``statistics``) from per-id pixel counts, sums
    and sums of squares; ``total`` and ``squares`` may have leading axes (e.g. markers) over
    ``count``'s.

    The tables are computed in place: ``mean`` overwrites ``total`` unless ``sum`` is wanted
    (``sum`` is ``total`` itself) and ``std`` overwrites ``squares``, so a statistic costs no
    table beyond the sums it comes from (one marker's worth of temporaries at a time).
    """
    out = {}
    empty = count == 0
    mean = total if "sum" not in statistics else np.empty_like(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in np.ndindex(total.shape[:total.ndim - count.ndim]):
            np.divide(total[i], count, out=mean[i])
            mean[i][empty] = np.nan
            if "std" in statistics:
                sq = squares[i]
                np.divide(sq, count, out=sq)
                sq -= mean[i] * mean[i]
                np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)
                sq[empty] = np.nan
    if "mean" in statistics:
        out["mean"] = mean
    if "sum" in statistics:
        out["sum"] = total
    if "std" in statistics:
        out["std"] = squares
    return out


def _medians(labels, plane, ids, count) -> np.ndarray:
    from scipy import ndimage

    h = labels.shape[0]
    lab, values = _rows(labels, 0, h), _rows(plane, 0, h).astype(np.float64, copy=False)
    med = np.asarray(ndimage.median(values, lab, index=ids), dtype=np.float64)
    return np.where(count > 0, med, np.nan)


def _compartment_medians(cell, nucleus, cytoplasm, planes, ids, count, *, memory_mb=None) -> np.ndarray:
    """The median of every plane over every compartment of every id, shape (planes, 3, ids).

    Exact (:func:`_medians` of the pixels of each id) without whole planes: the ids are taken by
    the block of rows their first row falls in, and each block is read down to the last row of
    its ids (every pixel of them), so memory follows the block (``memory_mb``) plus the tallest
    cell, and each plane is read about once.
    """
    h = cell.shape[0]
    rows = _block_rows(cell.shape, memory_mb, 96)
    labels = [lab for lab in (cell, nucleus, cytoplasm) if lab is not None]
    top, bottom = _row_extents(labels, ids, rows)
    out = np.full((len(planes), 3, len(ids)), np.nan)
    for y0 in range(0, h, rows):
        sel = np.flatnonzero((top >= y0) & (top < y0 + rows))
        if not sel.size:
            continue
        y1 = int(bottom[sel].max()) + 1
        c, n = _rows(cell, y0, y1), _rows(nucleus, y0, y1)
        y = _rows(cytoplasm, y0, y1) if cytoplasm is not None else np.where(n == 0, c, 0)
        for j, plane in enumerate(planes):
            values = _rows(plane, y0, y1)
            for k, lab in enumerate((c, n, y)):
                out[j, k, sel] = _medians(lab, values, ids[sel], count[k][sel])
    return out


def _row_extents(labels, ids, rows):
    """First and last row holding each id in any of ``labels`` (read in blocks of ``rows``)."""
    n = int(ids[-1]) + 1 if len(ids) else 1
    top = np.full(n, np.iinfo(np.int64).max)
    bottom = np.full(n, -1)
    for lab in labels:
        h, w = lab.shape
        for y0 in range(0, h, rows):
            flat = _rows(lab, y0, y0 + rows).ravel()
            for values, index, pick in ((flat, 0, np.minimum), (flat[::-1], flat.size - 1, np.maximum)):
                u, first = np.unique(values, return_index=True)
                keep = u < n
                row = y0 + np.abs(index - first[keep]) // w  # the first (last) occurrence's row
                u = u[keep]
                target = top if pick is np.minimum else bottom
                target[u] = pick(target[u], row)
    return top[ids], bottom[ids]


def intensity_statistics(labels, plane, ids, statistics=("mean",)) -> dict[str, np.ndarray]:
    """Per-id ``mean``, ``sum``, ``std`` (population) and ``median`` of ``plane`` over ``labels``.

    Ids without pixels in ``labels`` get NaN (0 for ``sum``).  ``median`` needs the whole
    plane at once (``scipy.ndimage.median``); the others stream block by block.
    """
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise InputError(f"statistics {unknown}: expected some of {', '.join(STATISTICS)}")
    count, total, squares = compartment_sums(labels, plane, ids)
    out = _statistics_from_sums(count, total, squares, statistics)
    if "median" in statistics:
        out["median"] = _medians(labels, plane, ids, count)
    return out


def _compartment_intensities(cell, nucleus, cytoplasm, planes, ids, statistics, *, threads=1, pool=None,
                             memory_mb=None, progress=None):
    """Count, sum (and sum of squares for ``std``) of every plane over the cell, nucleus and
    cytoplasm of every id, in one read of each label block and each plane block.

    A block's labels are run-length encoded once (runs of constant cell, nucleus and cytoplasm
    label along a row); for every plane a run sum (``np.add.reduceat``, which releases the
    GIL, so planes run in parallel threads) and one ``np.bincount`` over the runs' compartment
    index give all three compartments.  The default cytoplasm (cell where the nucleus is 0) is
    a property of each run, so it costs nothing extra.

    ``pool``: the executor the planes are measured on (None: this thread); ``threads``: its
    workers, which set the rows of a block.  Returns the counts, shape (3, ids), and the sums
    (and sums of squares, else None), shape (planes, 3, ids): one preallocated table each,
    accumulated in place (labels are mapped to their row in ``ids``, so no table of the largest
    id and no copy at the end).
    """
    n, m = (int(ids[-1]) + 1, len(ids)) if len(ids) else (1, 0)
    rank = np.zeros(n + 1, np.int64)  # label -> 1 + its row in ids; 0: not measured (and every label >= n)
    rank[ids] = np.arange(1, m + 1)
    h = cell.shape[0]
    count = np.zeros(3 * m)
    total = np.zeros((len(planes), 3 * m))
    squares = np.zeros((len(planes), 3 * m)) if "std" in statistics else None
    rows = _block_rows(cell.shape, memory_mb, 48 + 16 * max(1, threads))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        blocks = [_rows(cell, y0, y1), _rows(nucleus, y0, y1)]
        if cytoplasm is not None:
            blocks.append(_rows(cytoplasm, y0, y1))
        starts, _, c0, c1, values = _runs(blocks)
        comps = [rank[np.minimum(v.astype(np.int64, copy=False), n)] for v in values]
        if cytoplasm is None:  # cell where the nucleus is 0 (any nucleus id, also one past the cells')
            comps.append(np.where(values[1] == 0, comps[0], 0))
        pos = [np.flatnonzero(c) for c in comps]
        index = np.concatenate([comps[k][p] + (k * m - 1) for k, p in enumerate(pos)])
        pos = np.concatenate(pos)
        count += np.bincount(index, weights=(c1 - c0)[pos], minlength=3 * m)

        def measure(j, y0=y0, y1=y1, starts=starts, index=index, pos=pos):
            plane = np.asarray(planes[j][y0:y1]).ravel()
            sums = np.add.reduceat(plane, starts, dtype=np.float64)
            total[j] += np.bincount(index, weights=sums[pos], minlength=3 * m)
            if squares is not None:
                sq = np.add.reduceat(np.square(plane, dtype=np.float64), starts)
                squares[j] += np.bincount(index, weights=sq[pos], minlength=3 * m)

        if pool is None:
            for j in range(len(planes)):
                measure(j)
        else:
            list(pool.map(measure, range(len(planes))))
        if progress is not None:
            progress(y1, h)
    shape = (len(planes), 3, m)
    return count.reshape(3, m), total.reshape(shape), None if squares is None else squares.reshape(shape)


def morphology(cell, nucleus, ids, *, mpp=None, memory_mb=None, threads=1) -> dict[str, np.ndarray]:
    """Shape of every cell (``ids``) and of its nucleus (same id), with centroids and areas in
    pixels and, when ``mpp`` (µm per pixel) is known, in µm / µm².

    Notes
    -----
    The values are skimage's ``regionprops`` definitions, computed for all labels at once by
    :func:`region_shapes` block by block (``memory_mb``); with ``threads`` > 1 the cell and the
    nucleus labels, and their perimeters, are measured at the same time.
    """
    out: dict[str, np.ndarray] = {"cell_id": np.asarray(ids, dtype=np.int64)}
    if threads > 1:  # four balanced tasks: each image's perimeters apart from its other shapes
        from concurrent.futures import ThreadPoolExecutor

        n = int(ids[-1]) + 1 if len(ids) else 1
        workers = min(threads, 4)
        # the workers' blocks are in memory at once: each gets its share of the budget
        share = (DEFAULT_MEMORY_MB if memory_mb is None else float(memory_mb)) / workers
        with ThreadPoolExecutor(workers) as pool:
            perimeters = [pool.submit(label_perimeters, lab, n, memory_mb=share) for lab in (cell, nucleus)]
            shapes = [pool.submit(region_shapes, lab, ids, memory_mb=share, perimeters=p)
                      for lab, p in zip((cell, nucleus), perimeters)]
            shapes = [f.result() for f in shapes]
    else:
        shapes = [region_shapes(lab, ids, memory_mb=memory_mb) for lab in (cell, nucleus)]
    for prefix, table in zip(("", "nucleus_"), shapes):
        for name, col in table.items():
            out[f"{prefix}{name}"] = col
    out["nucleus_cell_area_ratio"] = np.divide(out["nucleus_area"], out["area"], out=np.zeros(len(ids)),
                                               where=out["area"] > 0)
    if mpp:
        for prefix in ("", "nucleus_"):
            out[f"{prefix}centroid_y_um"] = out[f"{prefix}centroid_y"] * mpp
            out[f"{prefix}centroid_x_um"] = out[f"{prefix}centroid_x"] * mpp
            out[f"{prefix}area_um2"] = out[f"{prefix}area"] * mpp * mpp
    return out


def _group_starts(lab) -> np.ndarray:
    return np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if len(lab) else np.zeros(0, np.intp)


def _merge_equal_rows(lab, y, x, side):
    """Points sorted by (label, y): one point per (label, y), the leftmost (``side`` 1) or
    rightmost (-1)."""
    if not len(lab):
        return lab, y, x
    new = np.r_[True, (lab[1:] != lab[:-1]) | (y[1:] != y[:-1])]
    if new.all():
        return lab, y, x
    first = np.flatnonzero(new)
    reduce = np.minimum if side > 0 else np.maximum
    return lab[first], y[first], reduce.reduceat(x, first)


def _hull_chain(lab, y, x, side, n):
    """The left (``side`` 1: convex minorant of x over y) or right (-1: concave majorant) chain
    of the convex hull of each label's points, all labels at once.

    Points come sorted by (label, y), one per (label, y).  A point on or outside the chord of
    its two neighbours is not a hull vertex whatever else is removed, so every such point is
    dropped at once; repeated until no label changes (labels that did not change leave).
    Integer coordinates: the tests are exact.
    """
    done = []
    while len(lab) >= 3:
        mid = (lab[1:-1] == lab[:-2]) & (lab[1:-1] == lab[2:])
        cross = (x[1:-1] - x[:-2]) * (y[2:] - y[:-2]) - (y[1:-1] - y[:-2]) * (x[2:] - x[:-2])
        drop = mid & (side * cross >= 0)
        changed = np.zeros(n, bool)
        changed[lab[1:-1][drop]] = True
        active = changed[lab]
        keep = np.ones(len(lab), bool)
        keep[1:-1] = ~drop
        done.append((lab[~active], y[~active], x[~active]))
        keep &= active
        lab, y, x = lab[keep], y[keep], x[keep]
    done.append((lab, y, x))
    lab, y, x = (np.concatenate(a) for a in zip(*done))
    order = np.argsort(lab, kind="stable")
    return lab[order], y[order], x[order]


def _floor_sums(n, m, a, b) -> np.ndarray:
    """sum(floor((a i + b) / m) for i in range(n)) for arrays of integers (m > 0, n >= 0), all at
    once: the Euclid-like reduction of AtCoder's ``floor_sum`` (a few rounds, no per-term loop)."""
    n, m, a, b = (np.array(v, dtype=np.int64) for v in np.broadcast_arrays(n, m, a, b))
    total = np.zeros(n.shape, np.int64)
    a2, b2 = a % m, b % m  # make a and b non-negative
    total -= n * (n - 1) // 2 * ((a2 - a) // m) + n * ((b2 - b) // m)
    a, b = a2, b2
    live = np.flatnonzero(n > 0)
    while live.size:
        nn, mm, aa, bb = n[live], m[live], a[live], b[live]
        total[live] += nn * (nn - 1) // 2 * (aa // mm) + nn * (bb // mm)
        aa, bb = aa % mm, bb % mm
        top = aa * nn + bb
        go = top >= mm
        live, top, mm, aa = live[go], top[go], mm[go], aa[go]
        n[live], b[live], m[live], a[live] = top // mm, top % mm, aa, mm
    return total


def _chain_rows(lab, y, x, side, n) -> np.ndarray:
    """Per label, the sum over pixel rows r of ceil(left(r)) (``side`` 1) or floor(right(r))
    (-1), where the chain (doubled coordinates y = 2r, x = 2c) crosses row r: per edge a floor
    sum in exact integer arithmetic (:func:`_floor_sums`), no per-row expansion."""
    edge = np.flatnonzero(lab[1:] == lab[:-1])
    ya, yb, xa, xb = y[edge], y[edge + 1], x[edge], x[edge + 1]
    first = ya + (ya & 1)  # the first even y (a pixel row) of the edge, which owns [ya, yb)
    rows = np.maximum(0, (yb - 1 - first) // 2 + 1)
    dy, dx = yb - ya, xb - xa
    start = xa * dy + (first - ya) * dx  # x(first) = start / (2 dy); each row on adds 2 dx / (2 dy)
    if side > 0:
        val = -_floor_sums(rows, 2 * dy, -2 * dx, -start)
    else:
        val = _floor_sums(rows, 2 * dy, 2 * dx, start)
    return np.bincount(lab[edge], weights=val, minlength=n)


_HULL_POINTS = 2**20  # hull-chain points whose work arrays are held at once (region_shapes)


def _label_ranges(labels, points):
    """Consecutive ranges [lo, hi) of the sorted ``labels`` holding about ``points`` entries each."""
    bounds = np.unique(np.r_[labels[::points], labels[-1] + 1]) if len(labels) else np.zeros(0, np.int64)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _label_slice(chain, lo, hi):
    i0, i1 = np.searchsorted(chain[0], [lo, hi])
    return tuple(a[i0:i1] for a in chain)


def _convex_and_box(chains, n, convex, box_area):
    """``convex`` (skimage's area_convex) and ``box_area`` of the labels of the reduced left (1) and
    right (-1) hull chains of their pixel centres, written in place."""
    hull = {}
    for side, (pl, py, px) in chains.items():
        # hull(pixels + diamond) = hull(vertices + diamond): the left chain takes the diamond's
        # top, left and bottom corners (doubled coordinates), the right chain top, right, bottom
        pl = np.repeat(pl, 3)
        py = (py[:, None] + np.array([-1, 0, 1])).ravel()
        px = (px[:, None] + np.array([0, -side, 0])).ravel()
        hull[side] = _hull_chain(*_merge_equal_rows(pl, py, px, side), side, n)
    (ll, ly, lx), (rl, _, rx) = hull[1], hull[-1]
    starts, rstarts = _group_starts(ll), _group_starts(rl)
    labels = ll[starts]
    ends = np.r_[starts[1:], len(ll)] - 1
    top, bottom = (ly[starts] + 1) // 2, (ly[ends] - 1) // 2
    left = (np.minimum.reduceat(lx, starts) + 1) // 2
    right = (np.maximum.reduceat(rx, rstarts) - 1) // 2
    height = bottom - top + 1
    box_area[labels] = height * (right - left + 1)
    convex[labels] = _chain_rows(*hull[-1], -1, n)[labels] - _chain_rows(*hull[1], 1, n)[labels] + height


def region_shapes(lab, ids, *, memory_mb=None, perimeters=None) -> dict[str, np.ndarray]:
    """regionprops' centroid, area, perimeter, convex area, axis lengths, eccentricity,
    solidity, extent and orientation of the labels ``ids`` of a 2-D label image, one row per
    id (ids without pixels: area 0, the rest NaN).

    ``lab`` may be lazy (NumPy-style row slicing): it is read in row blocks of ``memory_mb``
    (:func:`label_perimeters` reads it once more, in bands).  ``perimeters``: that function's
    result (or a future of it) when it runs elsewhere, e.g. in another thread.

    Notes
    -----
    All labels at once, from each block's row runs (:func:`_runs`): the moments are per-run
    closed forms summed with ``np.bincount``, about a reference pixel of each label (its first
    pixel) so the central moments do not cancel (integer sums, exact below 2**53); the
    bounding box and the convex area come from each label's leftmost and rightmost pixel per
    row (hull chains per block, merged across blocks).  ``convex_area`` is skimage's
    ``area_convex``: the number of pixel centres inside or on the convex hull of the corners
    of the pixels' diamonds (the mid-points of the pixel edges, as ``convex_hull_image``
    offsets its coordinates).  The hull's left and right chains are found for all labels at
    once (:func:`_hull_chain`) and the pixel centres counted per hull edge with exact integer
    arithmetic (coordinates doubled, :func:`_floor_sums`), so it is equal, not close.
    ``orientation`` follows skimage's branch where the two diagonal moments are equal
    (``b < 0``: +pi/4, else -pi/4); the moments are exact, so that branch is taken exactly
    where it holds.  Where the axis is horizontal (b is 0, a > c) skimage returns +pi/2 or
    -pi/2 by the rounding sign of its b (the same axis); this returns +pi/2, its exact value.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = int(ids[-1]) + 1 if len(ids) else 1
    h = lab.shape[0]
    rows = _block_rows(lab.shape, memory_mb)
    sums = np.zeros((6, n))  # pixels, sum dr, sum dc, sum dr^2, sum dc^2, sum dr dc
    ref = np.full((2, n), -1, np.int64)
    chains = {1: [], -1: []}
    for y0 in range(0, h, rows):
        block = _rows(lab, y0, min(h, y0 + rows))
        _, row, c0, c1, (value,) = _runs([block])
        value = value.astype(np.int64, copy=False)
        keep = (value > 0) & (value < n)
        row, c0, c1, value = row[keep] + y0, c0[keep], c1[keep], value[keep]
        if not len(value):
            continue
        # runs by (label, row): the leftmost and rightmost pixel of each label in each row, and each
        # label's first pixel (the reference of its moments when the label is new)
        order = np.argsort(value * (h + 1) + row, kind="stable")
        v, r = value[order], row[order]
        firsts = np.flatnonzero(np.r_[True, (v[1:] != v[:-1]) | (r[1:] != r[:-1])])
        lasts = np.r_[firsts[1:] - 1, len(v) - 1]
        seen = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
        new = seen[ref[0, v[seen]] < 0]
        ref[0, v[new]], ref[1, v[new]] = r[new], c0[order][new]
        dr = row - ref[0, value]
        a, b = c0 - ref[1, value], c1 - 1 - ref[1, value]
        length = c1 - c0
        s1 = (a + b) * length // 2
        s2 = (b * (b + 1) * (2 * b + 1) - (a - 1) * a * (2 * a - 1)) // 6
        for k, w in enumerate((length, dr * length, s1, dr * dr * length, s2, dr * s1)):
            sums[k] += np.bincount(value, weights=w, minlength=n)
        v, r = v[firsts], r[firsts]
        for side, col in ((1, c0[order][firsts]), (-1, c1[order][lasts] - 1)):
            chains[side].append(_hull_chain(v, 2 * r, 2 * col, side, n))
    count = sums[0]
    area = count[ids]
    present = area > 0
    nan = np.full(len(ids), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        # n mu = n sum(d d') - sum(d) sum(d'): integers, so an exact 0 (a symmetric cell) stays 0
        mu20 = (sums[3] * count - sums[1] * sums[1]) / count
        mu02 = (sums[4] * count - sums[2] * sums[2]) / count
        mu11 = (sums[5] * count - sums[1] * sums[2]) / count
        equal_diagonal = ((sums[4] - sums[3]) * count == sums[2] * sums[2] - sums[1] * sums[1])[ids]
        mean_r, mean_c = ref[0] + sums[1] / count, ref[1] + sums[2] / count
        a, b, c_ = mu02[ids] / area, -mu11[ids] / area, mu20[ids] / area  # skimage's inertia tensor
        half_trace, det = (a + c_) / 2, a * c_ - b * b
        root = np.sqrt(np.maximum(half_trace * half_trace - det, 0.0))
        l1, l2 = np.maximum(half_trace + root, 0.0), np.maximum(half_trace - root, 0.0)
        eccentricity = np.where(l1 == 0, 0.0, np.sqrt(np.maximum(1.0 - l2 / l1, 0.0)))
        orientation = np.where(equal_diagonal | (a - c_ == 0), np.where(b < 0, np.pi / 4, -np.pi / 4),
                               0.5 * np.arctan2(-2 * b, c_ - a))
    convex, box_area = np.full(n, np.nan), np.full(n, np.nan)
    if chains[1]:
        reduced = {}
        for side in (1, -1):
            pl, py, px = (np.concatenate(a) for a in zip(*chains.pop(side)))
            order = np.argsort(pl, kind="stable")  # blocks come in row order
            reduced[side] = _hull_chain(pl[order], py[order], px[order], side, n)
            del pl, py, px, order
        for lo, hi in _label_ranges(reduced[1][0], _HULL_POINTS):  # the work arrays of a few labels at a time
            _convex_and_box({side: _label_slice(reduced[side], lo, hi) for side in (1, -1)}, n, convex, box_area)
    if perimeters is None:
        perimeters = label_perimeters(lab, n, memory_mb=memory_mb)
    perimeter = (perimeters.result() if hasattr(perimeters, "result") else perimeters)[ids]
    convex = np.where(present, convex[ids], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "centroid_y": np.where(present, mean_r[ids], nan), "centroid_x": np.where(present, mean_c[ids], nan),
            "area": area, "perimeter": np.where(present, perimeter, nan), "convex_area": convex,
            "major_axis_length": np.where(present, 4 * np.sqrt(l1), nan),
            "minor_axis_length": np.where(present, 4 * np.sqrt(l2), nan),
            "eccentricity": np.where(present, eccentricity, nan), "solidity": area / convex,
            "extent": area / box_area[ids], "orientation": np.where(present, orientation, nan),
        }


# skimage's perimeter weights (neighborhood 4) by the code 1 (a border pixel) + 2 x its 4-connected and
# 10 x its diagonal border neighbours: straight runs 1, diagonal steps sqrt(2), corners (1 + sqrt(2)) / 2.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def label_perimeters(lab, n, *, memory_mb=None) -> np.ndarray:
    """``regionprops(...).perimeter`` of every label 1..n-1 of a 2-D label image, all at once.

    A label's border pixels are its pixels with a 4-neighbour of another label (or outside the
    image); each border pixel is weighted by how its 8 neighbours that are border pixels of
    the same label continue the outline, as skimage's ``perimeter(neighborhood=4)`` does on the
    label's own mask.  Row bands with a two-row halo: memory a few bands' worth; ``lab`` may be
    lazy (NumPy-style row slicing).
    """
    h, w = lab.shape
    out = np.zeros(n)
    rows = _block_rows(lab.shape, memory_mb)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        a0, a1 = max(0, r0 - 2), min(h, r1 + 2)
        block = _rows(lab, a0, a1)
        pad = np.zeros((a1 - a0 + 2, w + 2), block.dtype if block.dtype.kind in "iu" else np.int64)
        pad[1:-1, 1:-1] = block
        c = pad[1:-1, 1:-1]
        border = np.zeros(pad.shape, bool)
        border[1:-1, 1:-1] = (c > 0) & ~((c == pad[:-2, 1:-1]) & (c == pad[2:, 1:-1]) &
                                         (c == pad[1:-1, :-2]) & (c == pad[1:-1, 2:]))
        # only the band's border pixels get a code: gather their 8 neighbours from the flat pad
        first = (r0 - a0 + 1) * (w + 2)
        where = np.flatnonzero(border[r0 - a0 + 1:r1 - a0 + 1]) + first
        flat, flat_border = pad.ravel(), border.ravel()
        centre = flat[where]
        code = np.ones(where.size, np.uint8)
        for dy, dx, weight in ((-1, 0, 2), (1, 0, 2), (0, -1, 2), (0, 1, 2),
                               (-1, -1, 10), (-1, 1, 10), (1, -1, 10), (1, 1, 10)):
            other = where + (dy * (w + 2) + dx)
            code += np.uint8(weight) * (flat_border[other] & (flat[other] == centre))
        keep = centre < n
        out += np.bincount(centre[keep].astype(np.intp, copy=False), weights=_PERIMETER_WEIGHTS[code[keep]],
                           minlength=n)
    return out


def spatial_neighbours(xy, *, method="delaunay", radius=None):
    """Neighbour graph of points ``xy`` (n, 2): squidpy's connectivities (0/1) and distances.

    ``delaunay``: the edges of the Delaunay triangulation (``radius``, when given, drops
    longer ones); ``radius``: every pair closer than ``radius``.  Returns two symmetric CSR
    matrices with an empty diagonal.
    """
    from scipy import sparse

    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if method not in NEIGHBOURS:
        raise InputError(f"neighbours={method!r}: expected one of {', '.join(NEIGHBOURS)}")
    if radius is not None and not (np.isfinite(radius) and radius > 0):
        raise InputError(f"neighbour_radius={radius!r}: expected a positive distance (µm)")
    if method == "radius" and radius is None:
        raise InputError("neighbours='radius' needs neighbour_radius (µm)")
    pairs = np.zeros((0, 2), np.int64)
    if method == "delaunay" and n >= 3:
        from scipy.spatial import Delaunay, QhullError

        try:
            tri = Delaunay(xy)
            s = tri.simplices
            pairs = np.concatenate([s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]])
        except QhullError:  # all points on a line: no triangles
            pairs = np.zeros((0, 2), np.int64)
    elif method == "delaunay" and n == 2:
        pairs = np.array([[0, 1]])
    elif method == "radius" and n >= 2:
        from scipy.spatial import cKDTree

        pairs = cKDTree(xy).query_pairs(float(radius), output_type="ndarray")
    if len(pairs):
        pairs = np.sort(pairs, axis=1).astype(np.int64, copy=False)
        key = np.unique(pairs[:, 0] * n + pairs[:, 1])  # row-sorted unique pairs, without unique(axis=0)'s cost
        pairs = np.column_stack([key // n, key % n])
        d = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
        if radius is not None:
            pairs, d = pairs[d <= radius], d[d <= radius]
    else:
        d = np.zeros(0)
    i = np.concatenate([pairs[:, 0], pairs[:, 1]]) if len(pairs) else np.zeros(0, np.int64)
    j = np.concatenate([pairs[:, 1], pairs[:, 0]]) if len(pairs) else np.zeros(0, np.int64)
    dist = sparse.csr_matrix((np.concatenate([d, d]), (i, j)), shape=(n, n))
    conn = sparse.csr_matrix((np.ones(len(i), np.float32), (i, j)), shape=(n, n))
    return conn, dist


def repair_flags(cell, nucleus, cell_original, nucleus_original, ids, *, memory_mb=None) -> dict:
    """Aegle's per-cell repair QC, from the stitched masks before and after repair.

    The repair keeps a cell whole and trims its nucleus to the cell interior, so
    repaired cell ``k`` lies inside one original cell and nucleus ``k`` inside
    one original nucleus: the object it came from is the original label under
    its pixels (not the one with the same id, which the repair renumbers).

    Returns
    -------
    dict of ndarray, per id in ``ids``
        ``cell_area_before``, ``cell_retained_fraction``, ``nucleus_area_before``,
        ``nucleus_retained_fraction`` (area after / area before; 0 without a
        nucleus) and ``nucleus_was_trimmed`` (retained fraction below 0.99, as
        Aegle flags it).  The labels are read in row blocks of ``memory_mb``.
    """
    ids = np.asarray(ids, np.int64)
    out = {}
    for name, after, before in (("cell", cell, cell_original), ("nucleus", nucleus, nucleus_original)):
        if tuple(after.shape) != tuple(before.shape):
            raise InputError(f"repair_flags: {name} is {tuple(after.shape)} but {name}_original is "
                             f"{tuple(before.shape)}")
        n = int(ids.max(initial=0)) + 1
        source = np.zeros(n, np.int64)
        area_after = np.zeros(n, np.int64)
        area_before = np.zeros(1, np.int64)
        rows = _block_rows(after.shape, memory_mb, 56)
        for band in range(0, int(after.shape[0]), rows):  # row bands: labels may be lazy arrays
            a = np.asarray(after[band:band + rows]).ravel().astype(np.int64, copy=False)
            b = np.asarray(before[band:band + rows]).ravel().astype(np.int64, copy=False)
            counts = np.bincount(b)
            if counts.size > area_before.size:
                area_before = np.concatenate([area_before, np.zeros(counts.size - area_before.size, np.int64)])
            area_before[:counts.size] += counts
            m = (a > 0) & (a < n)
            area_after += np.bincount(a[m], minlength=n)
            m &= b > 0
            source[a[m]] = b[m]
        src = source[ids]
        before_area = np.where(src > 0, area_before[np.minimum(src, area_before.size - 1)], 0)
        out[f"{name}_area_before"] = before_area
        out[f"{name}_retained_fraction"] = np.divide(area_after[ids], before_area, out=np.zeros(ids.size),
                                                     where=before_area > 0)
    out["nucleus_was_trimmed"] = (out["nucleus_retained_fraction"] < 0.99) & (out["nucleus_area_before"] > 0)
    return out


def quantify_cells(cell, nucleus, channels, *, cytoplasm=None, statistics=("mean",), image_mpp=None,
                   neighbours="delaunay", neighbour_radius=None, threads=1, memory_mb=None, progress=None):
    """Measure every cell of a stitched slide.

    Parameters
    ----------
    cell, nucleus : array-like of int, shape (y, x)
        Whole-slide labels, cell ``k`` paired with nucleus ``k`` (as ``stitch`` writes them).
        NumPy arrays or lazy arrays (``.shape``, ``.dtype`` and NumPy-style row slicing, e.g. a
        Zarr array): they are read in row blocks, never whole.
    channels : iterable of (str, array-like)
        ``(marker name, plane)`` pairs; planes may be lazy arrays too (read in the same row blocks).
    cytoplasm : array-like, optional
        Cytoplasm labels; default ``cell`` where ``nucleus`` is 0.
    statistics : sequence of str
        Of ``mean`` (always computed for the cell compartment), ``sum``, ``std``, ``median``.
        ``median`` is exact (``scipy.ndimage.median`` of each cell's pixels) and read by blocks
        of rows that hold their cells whole (:func:`_compartment_medians`), but it sorts every
        pixel of every marker three times (one pass per compartment), so it costs several
        times the other statistics together; it is off by default.
    image_mpp : float, optional
        µm per pixel: adds µm/µm² columns; the spatial graph is in µm (else in pixels).
    neighbours : {"delaunay", "radius", "none"}
        The spatial neighbour graph of the cell centroids.
    neighbour_radius : float, optional
        µm (pixels without ``image_mpp``): the radius graph's distance, or the longest
        Delaunay edge kept.
    threads : int
        Markers measured in parallel (and cell and nucleus shapes at the same time); one pool of
        ``threads`` workers, one of which builds the neighbour graph while the others measure.
    memory_mb : float, optional
        The working memory to aim for: sets the rows per block (default ``DEFAULT_MEMORY_MB``,
        256 MB).  Besides it: the per-cell tables (and, with ``median``, the tallest cell's rows).
    progress : callable, optional
        Called as ``progress(rows_done, rows)`` after each block of the intensity pass.

    Returns
    -------
    markers : dict of str -> ndarray
        ``cell_id`` and one column per marker: the cell mean (Aegle's ``cell_by_marker``).
    metadata : dict of str -> ndarray
        ``cell_id``, morphology (:func:`morphology`), ``<marker>_<compartment>_<statistic>``
        for the other compartments and statistics, and the pairing flags (``has_nucleus``).
    graph : tuple or None
        ``(connectivities, distances)`` CSR matrices (:func:`spatial_neighbours`).
    stats : dict
        Counts and parameters.

    Notes
    -----
    Column names follow Aegle's cell-profiling outputs (``cell_by_marker.csv``: the marker
    name is the cell mean; ``<marker>_nucleus_mean`` / ``<marker>_cytoplasm_mean``), the
    morphology follows ``skimage.measure.regionprops`` as MCMICRO's mcquant and steinbock
    report it, and the graph uses squidpy's ``spatial_connectivities``/``spatial_distances``.
    Every marker is read once, block by block, for all three compartments
    (:func:`_compartment_intensities`).
    """
    shape = tuple(cell.shape)
    if len(shape) != 2 or tuple(nucleus.shape) != shape:
        raise InputError(f"cell labels {shape} and nucleus labels {tuple(nucleus.shape)}: expected two 2-D "
                         "images of the same shape")
    if cytoplasm is not None and tuple(cytoplasm.shape) != shape:
        raise InputError(f"cytoplasm labels {tuple(cytoplasm.shape)}: expected the cell labels' shape {shape}")
    threads = max(1, int(threads))
    rows = _block_rows(shape, memory_mb, 16)
    for name, lab in (("cell", cell), ("nucleus", nucleus), ("cytoplasm", cytoplasm)):
        if lab is None:
            continue
        kind = np.dtype(lab.dtype).kind
        if kind not in "iu" or (kind == "i" and any(_rows(lab, y, y + rows).min(initial=0) < 0
                                                    for y in range(0, shape[0], rows))):
            raise InputError(f"{name} labels: dtype {np.dtype(lab.dtype)}; expected non-negative integer ids")
    stats_wanted = tuple(dict.fromkeys(("mean", *statistics)))
    unknown = sorted(set(stats_wanted) - set(STATISTICS))
    if unknown:
        raise InputError(f"statistics {unknown}: expected some of {', '.join(STATISTICS)}")
    if neighbours not in NEIGHBOURS:
        raise InputError(f"neighbours={neighbours!r}: expected one of {', '.join(NEIGHBOURS)}")
    if image_mpp is not None and not (np.isfinite(image_mpp) and image_mpp > 0):
        raise InputError(f"image_mpp={image_mpp!r}: expected a positive number of µm per pixel")
    names, planes = [], []
    for name, plane in channels:
        name = str(name)
        if name in names:
            raise InputError(f"marker {name!r} appears twice in the channel names")
        if tuple(plane.shape) != shape:
            raise InputError(f"a channel has shape {tuple(plane.shape)} but the masks have {shape}")
        names.append(name)
        planes.append(plane)
    ids = cell_ids(cell, memory_mb=memory_mb)
    meta = morphology(cell, nucleus, ids, mpp=image_mpp, memory_mb=memory_mb, threads=threads)
    meta["has_nucleus"] = meta["nucleus_area"] > 0
    markers = {"cell_id": ids.copy()}
    graph, pool = None, None
    if threads > 1:  # one pool of `threads` workers for the graph and the markers: no more threads than asked
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(threads)
    try:
        if neighbours != "none":  # Qhull / the k-d tree release the GIL: one worker builds the graph while
            xy = np.column_stack([meta["centroid_x"], meta["centroid_y"]]) * (image_mpp or 1.0)  # the rest measure
            graph = (spatial_neighbours(xy, method=neighbours, radius=neighbour_radius) if pool is None else
                     pool.submit(spatial_neighbours, xy, method=neighbours, radius=neighbour_radius))
        count, total, squares = _compartment_intensities(cell, nucleus, cytoplasm, planes, ids, stats_wanted,
                                                         threads=threads, pool=pool, memory_mb=memory_mb,
                                                         progress=progress)
        if pool is not None and graph is not None:
            graph = graph.result()
    finally:
        if pool is not None:
            pool.shutdown()
    tables = _statistics_from_sums(count, total, squares, stats_wanted)
    del total, squares  # now the tables themselves (in place)
    if "median" in stats_wanted:
        tables["median"] = _compartment_medians(cell, nucleus, cytoplasm, planes, ids, count,
                                                 memory_mb=memory_mb)
    for j, name in enumerate(names):  # columns are views of the tables: no copy
        markers[name] = tables["mean"][j, 0]
        for k, comp in enumerate(COMPARTMENTS):
            for stat in (s for s in STATISTICS if s in tables and (comp, s) != ("cell", "mean")):
                meta[f"{name}_{comp}_{stat}"] = tables[stat][j, k]
    stats = {"cells": int(len(ids)), "markers": names, "statistics": list(stats_wanted),
             "cells_without_nucleus": int(np.count_nonzero(~meta["has_nucleus"])),
             "image_mpp": image_mpp, "neighbours": neighbours, "neighbour_radius": neighbour_radius,
             "edges": int(graph[0].nnz // 2) if graph is not None else 0,
             "spatial_unit": "micrometer" if image_mpp else "pixel"}
    return markers, meta, graph, stats
