"""Measure every cell: marker intensities per compartment, morphology, spatial neighbours, AnnData.

The deliverable that users of Aegle, steinbock and MCMICRO open next: a cell x marker table
(Aegle's ``cell_by_marker.csv``), a per-cell metadata table (``cell_metadata.csv``) and an
AnnData object for scanpy/squidpy with the cell centroids in ``obsm["spatial"]`` and a spatial
neighbour graph in ``obsp`` (squidpy's keys).  Everything is vectorised over cells
(``np.bincount`` over label images, ``scipy.ndimage`` reductions, ``skimage.measure``
regionprops tables); intensities are read one channel at a time, block by block, so a whole
slide never needs float copies of every channel.
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


def cell_ids(cell) -> np.ndarray:
    """The ids present in a cell label image, ascending (0 excluded)."""
    counts = np.bincount(np.asarray(cell).ravel().astype(np.int64, copy=False))
    return np.flatnonzero(counts[1:]) + 1


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


def intensity_statistics(labels, plane, ids, statistics=("mean",)) -> dict[str, np.ndarray]:
    """Per-id ``mean``, ``sum``, ``std`` (population) and ``median`` of ``plane`` over ``labels``.

    Ids without pixels in ``labels`` get NaN (0 for ``sum``).  ``median`` needs the whole
    plane at once (``scipy.ndimage.median``); the others stream block by block.
    """
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise InputError(f"statistics {unknown}: expected some of {', '.join(STATISTICS)}")
    out = {}
    count, total, squares = compartment_sums(labels, plane, ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
        if "mean" in statistics:
            out["mean"] = mean
        if "sum" in statistics:
            out["sum"] = total
        if "std" in statistics:
            out["std"] = np.where(count > 0, np.sqrt(np.maximum(squares / count - mean * mean, 0.0)), np.nan)
    if "median" in statistics:
        from scipy import ndimage

        lab = np.asarray(labels)
        med = np.asarray(ndimage.median(np.asarray(plane, dtype=np.float64), lab, index=ids), dtype=np.float64)
        out["median"] = np.where(count > 0, med, np.nan)
    return out


def morphology(cell, nucleus, ids, *, mpp=None) -> dict[str, np.ndarray]:
    """Shape of every cell (``ids``) and of its nucleus (same id), with centroids and areas in
    pixels and, when ``mpp`` (µm per pixel) is known, in µm / µm².

    Notes
    -----
    The values are skimage's ``regionprops`` definitions.  Centroid, area, extent and the
    moment-based properties (axis lengths, eccentricity, orientation, from the inertia
    tensor) are computed for all labels at once from per-label sums (``np.bincount``, two
    passes so the central moments are exact), the perimeter by :func:`label_perimeters`; only
    ``convex_area`` (and ``solidity`` = area / convex area) comes from ``regionprops_table``.
    """
    out: dict[str, np.ndarray] = {"cell_id": np.asarray(ids, dtype=np.int64)}
    for prefix, lab in (("", cell), ("nucleus_", nucleus)):
        for name, col in region_shapes(np.asarray(lab), ids).items():
            out[f"{prefix}{name}"] = col
    out["nucleus_cell_area_ratio"] = np.divide(out["nucleus_area"], out["area"], out=np.zeros(len(ids)),
                                               where=out["area"] > 0)
    if mpp:
        for prefix in ("", "nucleus_"):
            out[f"{prefix}centroid_y_um"] = out[f"{prefix}centroid_y"] * mpp
            out[f"{prefix}centroid_x_um"] = out[f"{prefix}centroid_x"] * mpp
            out[f"{prefix}area_um2"] = out[f"{prefix}area"] * mpp * mpp
    return out


def region_shapes(lab, ids) -> dict[str, np.ndarray]:
    """regionprops' centroid, area, perimeter, convex area, axis lengths, eccentricity,
    solidity, extent and orientation of the labels ``ids`` of a 2-D label image, one row per
    id (ids without pixels: area 0, the rest NaN)."""
    from scipy import ndimage
    from skimage.measure import regionprops_table

    ids = np.asarray(ids, dtype=np.int64)
    n = int(ids[-1]) + 1 if len(ids) else 1
    rows = max(1, _BLOCK_PIXELS // max(1, lab.shape[1]))
    cols = np.arange(lab.shape[1], dtype=np.float64)
    count, sum_r, sum_c = (np.zeros(n) for _ in range(3))
    blocks = [slice(y, y + rows) for y in range(0, lab.shape[0], rows)]

    def pixels(block):
        sub = lab[block].astype(np.int64, copy=False)
        r = np.broadcast_to(np.arange(block.start, block.start + sub.shape[0], dtype=np.float64)[:, None], sub.shape)
        c = np.broadcast_to(cols[None, :], sub.shape)
        keep = (sub > 0) & (sub < n)
        return sub[keep], r[keep], c[keep]

    for block in blocks:
        ids_here, r, c = pixels(block)
        count += np.bincount(ids_here, minlength=n)
        sum_r += np.bincount(ids_here, weights=r, minlength=n)
        sum_c += np.bincount(ids_here, weights=c, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_r, mean_c = sum_r / count, sum_c / count
    mu20, mu02, mu11 = (np.zeros(n) for _ in range(3))
    for block in blocks:  # central moments about each label's own centroid: no cancellation
        ids_here, r, c = pixels(block)
        dr, dc = r - mean_r[ids_here], c - mean_c[ids_here]
        mu20 += np.bincount(ids_here, weights=dr * dr, minlength=n)
        mu02 += np.bincount(ids_here, weights=dc * dc, minlength=n)
        mu11 += np.bincount(ids_here, weights=dr * dc, minlength=n)
    area = count[ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b, c_ = mu02[ids] / area, -mu11[ids] / area, mu20[ids] / area  # skimage's inertia tensor
        half_trace, det = (a + c_) / 2, a * c_ - b * b
        root = np.sqrt(np.maximum(half_trace * half_trace - det, 0.0))
        l1, l2 = np.maximum(half_trace + root, 0.0), np.maximum(half_trace - root, 0.0)
        eccentricity = np.where(l1 == 0, 0.0, np.sqrt(np.maximum(1.0 - l2 / l1, 0.0)))
        orientation = np.where(a - c_ == 0, np.where(b < 0, -np.pi / 4, np.pi / 4), 0.5 * np.arctan2(-2 * b, c_ - a))
    boxes = ndimage.find_objects(lab.astype(np.int64, copy=False), max_label=n - 1)
    box_area = np.array([(s[0].stop - s[0].start) * (s[1].stop - s[1].start) if s is not None else np.nan
                         for s in (boxes[i - 1] for i in ids)], dtype=np.float64) if len(ids) else np.zeros(0)
    table = regionprops_table(lab.astype(np.int64, copy=False), properties=["label", "area_convex"]) \
        if np.any(lab) else {}
    perimeter = label_perimeters(lab, n)[ids]
    convex = _aligned(table, "area_convex", ids)
    present = area > 0
    nan = np.full(len(ids), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "centroid_y": np.where(present, mean_r[ids], nan), "centroid_x": np.where(present, mean_c[ids], nan),
            "area": area, "perimeter": np.where(present, perimeter, nan), "convex_area": convex,
            "major_axis_length": np.where(present, 4 * np.sqrt(l1), nan),
            "minor_axis_length": np.where(present, 4 * np.sqrt(l2), nan),
            "eccentricity": np.where(present, eccentricity, nan), "solidity": area / convex,
            "extent": area / box_area, "orientation": np.where(present, orientation, nan),
        }


# skimage's perimeter weights (neighborhood 4) by the code 1 (a border pixel) + 2 x its 4-connected and
# 10 x its diagonal border neighbours: straight runs 1, diagonal steps sqrt(2), corners (1 + sqrt(2)) / 2.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def label_perimeters(lab, n) -> np.ndarray:
    """``regionprops(...).perimeter`` of every label 1..n-1 of a 2-D label image, all at once.

    A label's border pixels are its pixels with a 4-neighbour of another label (or outside the
    image); each border pixel is weighted by how its 8 neighbours that are border pixels of
    the same label continue the outline, as skimage's ``perimeter(neighborhood=4)`` does on the
    label's own mask.  Row bands with a two-row halo: memory a few bands' worth.
    """
    lab = np.asarray(lab)
    h, w = lab.shape
    out = np.zeros(n)
    rows = max(1, _BLOCK_PIXELS // max(1, w))
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        a0, a1 = max(0, r0 - 2), min(h, r1 + 2)
        pad = np.zeros((a1 - a0 + 2, w + 2), np.int64)
        pad[1:-1, 1:-1] = lab[a0:a1]
        c = pad[1:-1, 1:-1]
        border = np.zeros(pad.shape, bool)
        border[1:-1, 1:-1] = (c > 0) & ~((c == pad[:-2, 1:-1]) & (c == pad[2:, 1:-1]) &
                                         (c == pad[1:-1, :-2]) & (c == pad[1:-1, 2:]))
        band = slice(r0 - a0 + 1, r1 - a0 + 1)  # rows of the band in pad
        centre, here = pad[band, 1:-1], border[band, 1:-1]
        code = here.astype(np.int64)
        for dy, dx, weight in ((-1, 0, 2), (1, 0, 2), (0, -1, 2), (0, 1, 2),
                               (-1, -1, 10), (-1, 1, 10), (1, -1, 10), (1, 1, 10)):
            ys = slice(band.start + dy, band.stop + dy)
            xs = slice(1 + dx, w + 1 + dx)
            code += weight * (border[ys, xs] & (pad[ys, xs] == centre))
        ids = centre[here]
        keep = ids < n
        out += np.bincount(ids[keep], weights=_PERIMETER_WEIGHTS[code[here][keep]], minlength=n)
    return out


def _aligned(table, key, ids, fill=np.nan) -> np.ndarray:
    """A regionprops_table column placed at the rows of ``ids`` (ids it lacks get ``fill``)."""
    col = np.full(len(ids), fill, dtype=np.float64)
    if key in table and len(ids):
        where = np.searchsorted(ids, table["label"])
        ok = (where < len(ids)) & (ids[np.minimum(where, len(ids) - 1)] == table["label"])
        col[where[ok]] = np.asarray(table[key], dtype=np.float64)[ok]
    return col


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
        pairs = np.unique(np.sort(pairs, axis=1), axis=0)
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


def repair_flags(cell, nucleus, cell_original, nucleus_original, ids) -> dict:
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
        Aegle flags it).
    """
    ids = np.asarray(ids, np.int64)
    out = {}
    for name, after, before in (("cell", cell, cell_original), ("nucleus", nucleus, nucleus_original)):
        after, before = np.asarray(after), np.asarray(before)
        if after.shape != before.shape:
            raise InputError(f"repair_flags: {name} is {after.shape} but {name}_original is {before.shape}")
        top = int(max(after.max(initial=0), ids.max(initial=0)))
        source = np.zeros(top + 1, np.int64)
        area_after = np.zeros(top + 1, np.int64)
        area_before = np.bincount(before.ravel(), minlength=1)
        for band in range(0, after.shape[0], 1024):
            a, b = after[band:band + 1024].ravel(), before[band:band + 1024].ravel()
            m = a > 0
            area_after += np.bincount(a[m], minlength=top + 1)
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
                   neighbours="delaunay", neighbour_radius=None, progress=None):
    """Measure every cell of a stitched slide.

    Parameters
    ----------
    cell, nucleus : array-like of int, shape (y, x)
        Whole-slide labels, cell ``k`` paired with nucleus ``k`` (as ``stitch`` writes them).
    channels : iterable of (str, array-like)
        ``(marker name, plane)`` pairs, read one at a time (planes may be lazy arrays).
    cytoplasm : array-like, optional
        Cytoplasm labels; default ``cell`` where ``nucleus`` is 0.
    statistics : sequence of str
        Of ``mean`` (always computed for the cell compartment), ``sum``, ``std``, ``median``.
    image_mpp : float, optional
        µm per pixel: adds µm/µm² columns; the spatial graph is in µm (else in pixels).
    neighbours : {"delaunay", "radius", "none"}
        The spatial neighbour graph of the cell centroids.
    neighbour_radius : float, optional
        µm (pixels without ``image_mpp``): the radius graph's distance, or the longest
        Delaunay edge kept.

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
    """
    cell = np.asarray(cell)
    nucleus = np.asarray(nucleus)
    if cell.ndim != 2 or nucleus.shape != cell.shape:
        raise InputError(f"cell labels {cell.shape} and nucleus labels {nucleus.shape}: expected two 2-D "
                         "images of the same shape")
    for name, lab in (("cell", cell), ("nucleus", nucleus)):
        if lab.dtype.kind not in "iu" or (lab.dtype.kind == "i" and lab.size and lab.min() < 0):
            raise InputError(f"{name} labels: dtype {lab.dtype}; expected non-negative integer ids")
    stats_wanted = tuple(dict.fromkeys(("mean", *statistics)))
    unknown = sorted(set(stats_wanted) - set(STATISTICS))
    if unknown:
        raise InputError(f"statistics {unknown}: expected some of {', '.join(STATISTICS)}")
    if neighbours not in NEIGHBOURS:
        raise InputError(f"neighbours={neighbours!r}: expected one of {', '.join(NEIGHBOURS)}")
    if image_mpp is not None and not (np.isfinite(image_mpp) and image_mpp > 0):
        raise InputError(f"image_mpp={image_mpp!r}: expected a positive number of µm per pixel")
    ids = cell_ids(cell)
    cyto = np.where(nucleus == 0, cell, 0) if cytoplasm is None else np.asarray(cytoplasm)
    labels = {"cell": cell, "nucleus": nucleus, "cytoplasm": cyto}
    meta = morphology(cell, nucleus, ids, mpp=image_mpp)
    meta["has_nucleus"] = meta["nucleus_area"] > 0
    markers = {"cell_id": ids.copy()}
    names = []
    for name, plane in channels:
        name = str(name)
        if name in names:
            raise InputError(f"marker {name!r} appears twice in the channel names")
        names.append(name)
        for comp in COMPARTMENTS:
            values = intensity_statistics(labels[comp], plane, ids, stats_wanted)
            for stat, col in values.items():
                if comp == "cell" and stat == "mean":
                    markers[name] = col
                else:
                    meta[f"{name}_{comp}_{stat}"] = col
        if progress is not None:
            progress(len(names))
    graph = None
    if neighbours != "none":
        xy = np.column_stack([meta["centroid_x"], meta["centroid_y"]]) * (image_mpp or 1.0)
        graph = spatial_neighbours(xy, method=neighbours, radius=neighbour_radius)
    stats = {"cells": int(len(ids)), "markers": names, "statistics": list(stats_wanted),
             "cells_without_nucleus": int(np.count_nonzero(~meta["has_nucleus"])),
             "image_mpp": image_mpp, "neighbours": neighbours, "neighbour_radius": neighbour_radius,
             "edges": int(graph[0].nnz // 2) if graph is not None else 0,
             "spatial_unit": "micrometer" if image_mpp else "pixel"}
    return markers, meta, graph, stats
