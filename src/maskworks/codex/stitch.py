"""Whole-slide labels from overlapping patch labels: placement, seam joins, slide-wide clean-up, checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maskworks.io import InputError

from .tiling import PatchGrid


def stitch_patches(grid: PatchGrid, patch_ids, load, *, out=None, duplicate_overlap=0.5, progress=None,
                   paired=True):
    """Assemble per-patch instance labels into whole-slide labels with unique ids.

    Parameters
    ----------
    grid : PatchGrid
        The grid the patches were cut on.
    patch_ids : iterable of int
        The patches that have results (e.g. the informative ones).
    load : callable
        ``load(patch_id) -> (cell, nucleus)``: the patch's instance labels, each
        (patch_height, patch_width); nucleus ``k`` belongs to cell ``k`` (as
        :func:`maskworks.codex.repair.repair_masks` writes them).  With
        ``paired=False``, ``load(patch_id) -> labels`` (one label image).  The
        last few patches are kept in memory (two grid rows); each is loaded up to
        four times.
    out : dict, optional
        ``cell`` (and, when paired, ``nucleus`` and ``cytoplasm``): zero-filled
        uint32 array-likes of ``grid.image_shape`` to write into (e.g. Zarr
        arrays, for slides that do not fit in memory).  Default: NumPy arrays.
    duplicate_overlap : float in [0, 1]
        A view of an object that lands on already-placed objects for more than
        this fraction of its pixels is the same object seen from another patch
        and is not placed again.
    progress : callable, optional
        Wraps the patch iterators (``progress(iterable, desc=...)``, e.g. ``tqdm``).
    paired : bool
        Cell/nucleus pairs (default), or one label image (``nucleus`` and
        ``cytoplasm`` are then all zero, or None when ``out`` is given).

    Returns
    -------
    cell, nucleus, cytoplasm : array-like of uint32, ``grid.image_shape``
        Cell ``k`` pairs with nucleus ``k`` and cytoplasm ``k`` (= cell ``k``
        minus nucleus ``k``); ids 1..n, consecutive, in placement order.
    table : dict of ndarray
        Per cell: ``id``, ``centroid_y``, ``centroid_x`` (pixels, image
        coordinates), ``cell_area``, ``nucleus_area``, ``cytoplasm_area``,
        ``patch_id`` (where it was taken from; for a joined object the first
        patch holding a piece) and ``patches`` (how many patches it was
        assembled from; 1 unless joined).
    stats : dict
        ``cells``, ``patches``; how objects were placed: ``from_core``,
        ``rescued``, ``joined`` (assembled across seams from pieces seen in
        several patches), ``joined_pieces`` (the pieces they were made of),
        ``cut_single`` (a piece with no partner: its neighbour patch has no
        result); ``duplicates`` (views not placed as the object is already
        there), ``trimmed`` (objects placed on the free part of their pixels);
        what the final check removed: ``dropped_unplaced`` (pieces whose pixels
        all belong to other patches' cores or objects), ``fragments_removed``
        (objects that kept only their largest connected part),
        ``nucleus_fragments_removed`` (likewise for nuclei; the rest becomes
        cytoplasm), ``dropped_without_nucleus`` (cells whose nucleus another
        object took).

    Notes
    -----
    An object is *whole* in a patch when it touches none of the patch's inner
    edges (sides facing a neighbour, :meth:`PatchGrid.inner_edges`), else *cut*.

    1. Whole objects are placed from the patch whose core
       (:meth:`PatchGrid.core`; the cores partition the image) holds their
       centroid; then whole objects whose core patch sees them cut ("rescued").
       An object is placed on the pixels that are still free.
    2. Cut views not covered by a placed object are joined across the seams:
       two cut views in neighbouring patches are the same object when they
       overlap in the patches' shared band for at least half the pixels either
       has there (with no overlap between the patches: when they meet along at
       least half of either's contact with the seam); the joined object takes,
       at each pixel, the view of the patch whose core holds the pixel, and the
       view of any of its patches where that core's patch has no result.  A cut
       view that no neighbour continues is placed whole (on the free pixels).
    3. The final check keeps each object's largest 8-connected part (and its
       nucleus's), drops cells left without a nucleus, and relabels the ids
       consecutively; cytoplasm is cell minus nucleus.

    So the only objects cut are those at the slide border, cell ``k`` holds
    nucleus ``k``, and every id is one connected region.
    """
    if not 0.0 <= float(duplicate_overlap) <= 1.0:
        raise InputError(f"duplicate_overlap={duplicate_overlap!r}: expected a fraction in [0, 1]")
    h, w = grid.image_shape
    keys = ("cell", "nucleus", "cytoplasm") if paired else ("cell",)
    given = out is not None
    if not given:
        out = {k: np.zeros((h, w), np.uint32) for k in keys}
    patch_ids = sorted({int(p) for p in patch_ids})
    for pid in patch_ids:
        grid.position(pid)  # in the grid
    wrap = progress or (lambda it, **kw: it)
    views = _Views(grid, load, paired)
    placed = _Placed()
    for pid in wrap(patch_ids, desc="stitch (whole objects)"):
        _place_whole(grid, views.get(pid), out, placed, "core", duplicate_overlap, paired)
    for pid in wrap(patch_ids, desc="stitch (rescue)"):
        _place_whole(grid, views.get(pid), out, placed, "rescued", duplicate_overlap, paired)
    _join_cut(grid, patch_ids, views, out, placed, duplicate_overlap, paired, wrap)
    table = _finalise(grid, out, placed, paired, wrap)
    stats = {"cells": int(table["id"].size), "patches": len(patch_ids), **placed.counts}
    if not paired:
        return out["cell"], *(None if given else np.zeros((h, w), np.uint32) for _ in range(2)), table, stats
    return out["cell"], out["nucleus"], out["cytoplasm"], table, stats


@dataclass
class _View:
    """One patch's labels (ids 1..n, nucleus k of cell k) and their per-object summary."""

    pid: int
    y0: int
    x0: int
    cell: np.ndarray
    nucleus: np.ndarray | None
    n: int
    area: np.ndarray
    in_core: np.ndarray
    cut: np.ndarray
    boxes: np.ndarray  # (n + 1, 4): y_lo, y_hi, x_lo, x_hi in image coordinates
    hint: np.ndarray | None = None  # nucleus pixels (paired nuclei, or the nuclei given with unpaired labels)
    nuc_area: np.ndarray | None = None  # per piece: its pixels in a nucleus

    @property
    def region(self):
        return slice(self.y0, self.y0 + self.cell.shape[0]), slice(self.x0, self.x0 + self.cell.shape[1])


class _Views:
    """Patch views, the most recent kept in memory (enough for the neighbours of the patch being read)."""

    def __init__(self, grid, load, paired):
        from collections import OrderedDict

        self.grid, self.load, self.paired = grid, load, paired
        reach = _reach(grid)
        self.capacity = (reach[0] + 1) * grid.grid_shape[1] + 2
        self.cache = OrderedDict()

    def get(self, pid) -> _View:
        if pid in self.cache:
            self.cache.move_to_end(pid)
            return self.cache[pid]
        view = _read_view(self.grid, pid, self.load, self.paired)
        self.cache[pid] = view
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return view


def _reach(grid):
    """How many grid steps apart two patches can be and still overlap or touch, per axis."""
    return tuple(max(1, math.ceil(p / s) - 1) if s > 0 else 1 for p, s in zip(grid.patch_shape, grid.step))


def _read_view(grid, pid, load, paired) -> _View:
    from scipy import ndimage as ndi

    row, col, y0, x0 = grid.position(pid)
    vh, vw = grid.valid_shape(pid)
    hint = None
    if paired:
        cell, nucleus = load(pid)
    else:
        cell = load(pid)
        if isinstance(cell, tuple):  # labels and the nuclei that tell touching pieces apart
            cell, hint = cell
            if tuple(np.shape(hint)) != tuple(np.shape(cell)):
                raise InputError(f"patch {pid}: nucleus shape {np.shape(hint)} differs from the label shape "
                                 f"{np.shape(cell)}")
            hint = np.asarray(hint)[:vh, :vw] > 0
        nucleus = np.zeros(np.shape(cell), np.uint8)
    if tuple(np.shape(cell)) != tuple(grid.patch_shape) or tuple(np.shape(nucleus)) != tuple(grid.patch_shape):
        raise InputError(f"patch {pid}: label shapes {np.shape(cell)} and {np.shape(nucleus)} differ from "
                         f"the grid's patch shape {tuple(grid.patch_shape)}")
    cell, nucleus, n = _paired_labels(np.asarray(cell)[:vh, :vw], np.asarray(nucleus)[:vh, :vw])
    flat = cell.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    yy, xx = np.indices((vh, vw))
    cy = np.bincount(flat, weights=yy.ravel(), minlength=n + 1) / np.maximum(area, 1) + y0
    cx = np.bincount(flat, weights=xx.ravel(), minlength=n + 1) / np.maximum(area, 1) + x0
    y_lo, y_hi, x_lo, x_hi = grid.core(pid)
    in_core = (cy >= y_lo) & (cy < y_hi) & (cx >= x_lo) & (cx < x_hi)
    cut = np.zeros(n + 1, bool)
    top, bottom, left, right = grid.inner_edges(pid)
    for inner, edge in ((top, cell[0]), (bottom, cell[-1]), (left, cell[:, 0]), (right, cell[:, -1])):
        if inner:
            cut[edge] = True
    cut[0] = False
    boxes = np.zeros((n + 1, 4), np.int64)
    for k, sl in enumerate(ndi.find_objects(cell, max_label=n), start=1):
        if sl is not None:
            boxes[k] = (sl[0].start + y0, sl[0].stop + y0, sl[1].start + x0, sl[1].stop + x0)
    if not paired:
        nuc_area = np.bincount(cell[hint], minlength=n + 1) if hint is not None else None
        return _View(pid, y0, x0, cell, None, n, area, in_core, cut, boxes, hint, nuc_area)
    nuc_area = np.bincount(nucleus.ravel(), minlength=n + 1)
    return _View(pid, y0, x0, cell, nucleus, n, area, in_core, cut, boxes, nucleus > 0, nuc_area)


class _Placed:
    """Per placed object (global id 1..): source patch, how it was placed, bounding box (a superset)."""

    HOW = ("core", "rescued", "joined", "cut_single")

    def __init__(self):
        self.next_id = 1
        self.parts: list[np.ndarray] = []  # rows: id, patch_id, how, n_patches, y_lo, y_hi, x_lo, x_hi
        self.counts = {"from_core": 0, "rescued": 0, "joined": 0, "joined_pieces": 0, "cut_single": 0,
                       "duplicates": 0, "trimmed": 0, "dropped_unplaced": 0, "fragments_removed": 0,
                       "nucleus_fragments_removed": 0, "dropped_without_nucleus": 0}

    def new_ids(self, k: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + k, dtype=np.int64)
        self.next_id += k
        return ids

    def add(self, ids, patch_id, how, n_patches, boxes):
        rows = np.zeros((len(ids), 8), np.int64)
        rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = ids, patch_id, self.HOW.index(how), n_patches
        rows[:, 4:] = boxes
        self.parts.append(rows)

    def rows(self) -> np.ndarray:
        if not self.parts:
            return np.zeros((0, 8), np.int64)
        a = np.concatenate(self.parts)
        return a[np.argsort(a[:, 0], kind="stable")]


def _paired_labels(cell, nucleus):
    """Cell ids made consecutive 1..n, nucleus ids mapped the same way (unpaired nucleus pixels: 0)."""
    cell = np.asarray(cell)
    nucleus = np.asarray(nucleus)
    if cell.dtype.kind not in "iu" or nucleus.dtype.kind not in "iu":
        raise InputError(f"stitch: labels must be integers, got {cell.dtype} and {nucleus.dtype}")
    if cell.size and (cell.min() < 0 or nucleus.min() < 0):
        raise InputError("stitch: labels must not be negative")
    ids = np.unique(cell)
    ids = ids[ids != 0]
    if ids.size == 0:
        return np.zeros(cell.shape, np.uint16), np.zeros(cell.shape, np.uint16), 0
    # the smallest type that holds the ids: the views of a grid row or two stay in memory
    dtype = np.uint16 if ids.size < 2**16 else np.uint32
    if ids[-1] == ids.size:  # already consecutive
        c = cell.astype(dtype)
        n = np.where((nucleus <= ids.size) & (nucleus == c), nucleus, 0).astype(dtype)
        return c, n, int(ids.size)
    c = np.searchsorted(ids, cell) + 1
    c[cell == 0] = 0
    pos = np.minimum(np.searchsorted(ids, nucleus), ids.size - 1)
    n = np.where((nucleus != 0) & (ids[pos] == nucleus), pos + 1, 0)
    n = np.where(n == c, n, 0)
    return c.astype(dtype), n.astype(dtype), int(ids.size)


def _read(out, key, region):
    return np.array(out[key][region])


def _paint(out, region, cell_buf, nuc_buf, put, lab, view):
    cell_buf[put] = lab[put]
    out["cell"][region] = cell_buf
    if nuc_buf is not None:
        nuc = put & (view.nucleus > 0)
        nuc_buf[nuc] = lab[nuc]
        out["nucleus"][region] = nuc_buf


def _place_whole(grid, v: _View, out, placed: _Placed, how, duplicate_overlap, paired):
    """Place one patch's whole objects of one pass (``core``: centroid in the core; ``rescued``: not)."""
    if v.n == 0:
        return
    present = v.area > 0
    present[0] = False
    select = present & ~v.cut & (v.in_core if how == "core" else ~v.in_core)
    if not select.any():
        return
    region = v.region
    cell_buf = _read(out, "cell", region)
    taken = cell_buf != 0
    overlap = np.bincount(v.cell[taken], minlength=v.n + 1)
    duplicate = select & (overlap > duplicate_overlap * v.area)
    placed.counts["duplicates"] += int(np.count_nonzero(duplicate))
    keep = select & ~duplicate
    put = keep[v.cell] & ~taken
    got = np.bincount(v.cell[put], minlength=v.n + 1)
    keep &= got > 0
    if not keep.any():
        return
    placed.counts["trimmed"] += int(np.count_nonzero(keep & (got < v.area)))
    sel = np.flatnonzero(keep)
    lut = np.zeros(v.n + 1, np.int64)
    lut[sel] = placed.new_ids(sel.size)
    placed.add(lut[sel], v.pid, how, 1, v.boxes[sel])
    placed.counts["from_core" if how == "core" else "rescued"] += int(sel.size)
    lab = lut[v.cell]
    _paint(out, region, cell_buf, _read(out, "nucleus", region) if paired else None, put & (lab > 0), lab, v)


def _seam_pairs(a: _View, b: _View):
    """Local ids (in a, in b) of the views of one object seen by two patches.

    Where the patches overlap: views that share at least half the pixels either
    has in the shared band (and, if both hold nucleus pixels, whose nuclei meet
    in the band).  Where they only touch (no overlap): views whose
    cross-sections on the seam agree (side by side for at least half the longer
    one), or a piece of one or two pixels on the seam that touches the other
    (8-connected) across it.  Two cells that meet exactly on a seam without
    overlap cannot be told from one cut cell and are joined.
    """
    ha, wa = a.cell.shape
    hb, wb = b.cell.shape
    y_lo, y_hi = max(a.y0, b.y0), min(a.y0 + ha, b.y0 + hb)
    x_lo, x_hi = max(a.x0, b.x0), min(a.x0 + wa, b.x0 + wb)
    if y_hi > y_lo and x_hi > x_lo:  # a shared band
        sa = a.cell[y_lo - a.y0:y_hi - a.y0, x_lo - a.x0:x_hi - a.x0].ravel()
        sb = b.cell[y_lo - b.y0:y_hi - b.y0, x_lo - b.x0:x_hi - b.x0].ravel()
        ia, ib, count = _pair_counts(sa, sb, b.n)
        na, nb = np.bincount(sa, minlength=a.n + 1), np.bincount(sb, minlength=b.n + 1)
        same = 2 * count >= np.minimum(na[ia], nb[ib])
        if a.hint is not None and b.hint is not None:
            # one cell seen by both holds the same nucleus in both (it crosses the band); two views
            # with nuclei that do not meet there are two cells one patch's segmentation merged
            both = (a.nuc_area[ia] > 0) & (b.nuc_area[ib] > 0)
            if both.any():
                ha = a.hint[y_lo - a.y0:y_hi - a.y0, x_lo - a.x0:x_hi - a.x0].ravel()
                hb = b.hint[y_lo - b.y0:y_hi - b.y0, x_lo - b.x0:x_hi - b.x0].ravel()
                ka, kb, _ = _pair_counts(sa[ha & hb], sb[ha & hb], b.n)
                same &= ~both | np.isin(ia * (b.n + 1) + ib, ka * (b.n + 1) + kb)
        return ia[same], ib[same], None
    if y_hi < y_lo or x_hi < x_lo:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), None
    (sa, sb), (da, db), (la, lb), (ma, mb) = _contacts(a, b, y_lo, y_hi, x_lo, x_hi)
    na, nb = np.bincount(la, minlength=a.n + 1), np.bincount(lb, minlength=b.n + 1)
    ia, ib, count = _pair_counts(sa, sb, b.n)
    same = 2 * count >= np.maximum(na[ia], nb[ib])
    if a.hint is not None and b.hint is not None:
        # two pieces that each hold a nucleus of their own are two cells (a cut nucleus meets itself)
        both = (a.nuc_area[ia] > 0) & (b.nuc_area[ib] > 0)
        if both.any():
            ka, kb, _ = _pair_counts(ma, mb, b.n)
            meet = np.isin(ia * (b.n + 1) + ib, ka * (b.n + 1) + kb)
            same &= ~both | meet
    # a spill: a piece of a few pixels against the seam (at most twice its seam pixels, or 4); joined
    # later with the one object it touches most across any seam
    ja, jb, touch = _pair_counts(da, db, b.n)
    spill_a = (a.area <= np.maximum(4, 2 * na))[ja]
    spill_b = (b.area <= np.maximum(4, 2 * nb))[jb]
    return ia[same], ib[same], (ja, jb, touch, spill_a, spill_b)


def _pair_counts(sa, sb, nb):
    both = (sa > 0) & (sb > 0)
    key, count = np.unique(sa[both].astype(np.int64) * (nb + 1) + sb[both], return_counts=True)
    return key // (nb + 1), key % (nb + 1), count


def _contacts(a: _View, b: _View, y_lo, y_hi, x_lo, x_hi):
    """Across the seam of two patches that touch without overlapping: the cell label pairs side by
    side, the pairs of 8-neighbours, each side's labels on the seam, and the 8-neighbour pairs whose
    pixels both lie in a nucleus."""
    vertical = x_hi == x_lo and y_hi > y_lo
    horizontal = y_hi == y_lo and x_hi > x_lo

    def line(v, img, first_side):
        h, w = img.shape
        if vertical:
            return img[y_lo - v.y0:y_hi - v.y0, w - 1 if first_side else 0]
        if horizontal:
            return img[h - 1 if first_side else 0, x_lo - v.x0:x_hi - v.x0]
        return img[h - 1 if v.y0 < y_lo else 0, w - 1 if v.x0 < x_lo else 0][None]  # a corner

    a_first = a.x0 < b.x0 if vertical else a.y0 < b.y0
    la, lb = line(a, a.cell, a_first), line(b, b.cell, not a_first)
    ha = line(a, a.hint, a_first) if a.hint is not None else None
    hb = line(b, b.hint, not a_first) if b.hint is not None else None
    if vertical or horizontal:
        i = np.arange(la.size)
        pa = np.concatenate([i, i[:-1], i[1:]])  # b's pixel at i, i + 1, i - 1 touches a's pixel i
        pb = np.concatenate([i, i[1:], i[:-1]])
        side = np.arange(la.size)
    else:
        pa = pb = np.zeros(1, np.int64)
        side = pa[:0]
    both = (ha[pa] & hb[pb]) if ha is not None and hb is not None else np.zeros(pa.size, bool)
    return (la[side], lb[side]), (la[pa], lb[pb]), (la, lb), (la[pa[both]], lb[pb[both]])


def _join_cut(grid, patch_ids, views, out, placed, duplicate_overlap, paired, wrap):
    """Pass 2: cut views not covered by placed objects, joined across seams and placed core by core."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    present = set(patch_ids)
    ny, nx = grid.grid_shape
    ry, rx = _reach(grid)
    offset, candidates, edges, spills = {}, {}, [], []
    total = 0
    for pid in wrap(patch_ids, desc="stitch (seams)"):
        v = views.get(pid)
        offset[pid] = total
        total += v.n + 1
        cand = v.cut & (v.area > 0)
        if cand.any():
            taken = _read(out, "cell", v.region) != 0
            overlap = np.bincount(v.cell[taken], minlength=v.n + 1)
            covered = cand & (overlap > duplicate_overlap * v.area)
            placed.counts["duplicates"] += int(np.count_nonzero(covered))
            cand &= ~covered
        candidates[pid] = cand
        if not cand.any():
            continue
        row, col = divmod(pid, nx)
        for r in range(max(0, row - ry), row + 1):
            for c in range(max(0, col - rx), min(nx, col + rx + 1)):
                q = r * nx + c
                if q >= pid or q not in present or not candidates[q].any():
                    continue
                ia, ib, touching = _seam_pairs(v, views.get(q))
                ok = cand[ia] & candidates[q][ib]
                if ok.any():
                    edges.append(np.stack([ia[ok] + offset[pid], ib[ok] + offset[q]]))
                if touching is not None:
                    ja, jb, touch, spill_a, spill_b = touching
                    ok = cand[ja] & candidates[q][jb]
                    for spill, this, other in ((spill_a, ja + offset[pid], jb + offset[q]),
                                               (spill_b, jb + offset[q], ja + offset[pid])):
                        pick = ok & spill
                        spills.append(np.stack([this[pick], other[pick], touch[pick]]))
    if total == 0 or not any(c.any() for c in candidates.values()):
        return
    e = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), np.int64)
    if spills:  # each spill without a match of its own joins the object it touches most
        sp = np.concatenate(spills, axis=1)
        sp = sp[:, ~np.isin(sp[0], e)]
        if sp.size:
            sp = sp[:, np.lexsort((-sp[2], sp[0]))]
            first = np.ones(sp.shape[1], bool)
            first[1:] = sp[0, 1:] != sp[0, :-1]
            e = np.concatenate([e, sp[:2, first]], axis=1)
    graph = coo_matrix((np.ones(e.shape[1], np.int8), (e[0], e[1])), shape=(total, total))
    _, group = connected_components(graph, directed=False)
    nodes = np.concatenate([np.flatnonzero(candidates[pid]) + offset[pid] for pid in patch_ids])
    node_group = group[nodes]
    # groups numbered in order of their first piece (row-major patches, ascending local id)
    uniq, first = np.unique(node_group, return_index=True)
    order = uniq[np.argsort(first, kind="stable")]
    rank = np.full(group.max() + 1, -1, np.int64)
    rank[order] = np.arange(order.size)
    pieces = np.bincount(rank[node_group], minlength=order.size)
    gids = placed.new_ids(order.size)
    boxes = np.tile(np.array([np.iinfo(np.int64).max, -1, np.iinfo(np.int64).max, -1]), (order.size, 1))
    source = np.full(order.size, -1, np.int64)
    got = np.zeros(order.size, np.int64)
    owner_row, owner_col = _core_owners(grid)
    absent = np.ones(grid.n_patches, bool)
    absent[list(present)] = False
    single = pieces == 1  # a cut view no other patch continues is placed whole, like a whole object
    for fill in (False, True):
        if fill and not (absent.any() or single.any()):
            break
        for pid in patch_ids:
            cand = candidates[pid]
            if not cand.any():
                continue
            v = views.get(pid)
            lut = np.zeros(v.n + 1, np.int64)
            local = np.flatnonzero(cand)
            g = rank[group[local + offset[pid]]]
            lut[local] = g + 1
            if not fill:
                np.minimum.at(boxes[:, 0], g, v.boxes[local, 0])
                np.maximum.at(boxes[:, 1], g, v.boxes[local, 1])
                np.minimum.at(boxes[:, 2], g, v.boxes[local, 2])
                np.maximum.at(boxes[:, 3], g, v.boxes[local, 3])
                unset = source[g] < 0
                source[g[unset]] = pid
            region = v.region
            ys, xs = region
            owner = owner_row[ys][:, None] * nx + owner_col[xs][None, :]
            cell_buf = _read(out, "cell", region)
            rank_img = lut[v.cell]  # group rank + 1, 0 elsewhere
            if fill:
                alone = np.concatenate([[False], single])[rank_img]
                where = (owner != pid) & (absent[owner] | alone)
            else:
                where = owner == pid
            put = (rank_img > 0) & where & (cell_buf == 0)
            if not put.any():
                continue
            got += np.bincount(rank_img[put] - 1, minlength=order.size)
            gid_lut = np.zeros(v.n + 1, np.int64)
            gid_lut[local] = gids[g]
            _paint(out, region, cell_buf, _read(out, "nucleus", region) if paired else None, put,
                   gid_lut[v.cell], v)
    ok = got > 0
    placed.counts["dropped_unplaced"] += int(np.count_nonzero(~ok))
    joined = ok & (pieces > 1)
    placed.counts["joined"] += int(np.count_nonzero(joined))
    placed.counts["joined_pieces"] += int(pieces[joined].sum())
    placed.counts["cut_single"] += int(np.count_nonzero(ok & (pieces == 1)))
    for mask, how in ((joined, "joined"), (ok & (pieces == 1), "cut_single")):
        if mask.any():
            placed.add(gids[mask], source[mask], how, pieces[mask], boxes[mask])


def _core_owners(grid):
    """For every image row (column), the grid row (column) whose cores hold it."""
    owners = []
    for axis in (0, 1):
        n, length = grid.grid_shape[axis], grid.image_shape[axis]
        own = np.zeros(length, np.int64)
        for i in range(n):
            pid = i * grid.grid_shape[1] if axis == 0 else i
            lo, hi = grid.core(pid)[2 * axis:2 * axis + 2]
            own[lo:hi] = i
        owners.append(own)
    return owners


def _finalise(grid, out, placed: _Placed, paired, wrap) -> dict:
    """Keep each object's largest part, drop cells without a nucleus, relabel 1..n; the cell table."""
    rows = placed.rows()
    n = int(placed.next_id - 1)
    cols = ("id", "centroid_y", "centroid_x", "cell_area", "nucleus_area", "cytoplasm_area", "patch_id", "patches")
    if n == 0:
        return {c: np.zeros(0, np.float64 if c.startswith("centroid") else np.int64) for c in cols}
    window = _windows(grid, rows[:, 4:])
    for wid in wrap(np.unique(window[window >= 0]).tolist(), desc="stitch (check)"):
        _, _, y0, x0 = grid.position(wid)
        vh, vw = grid.valid_shape(wid)
        mine = np.zeros(n + 1, bool)
        mine[rows[window == wid, 0]] = True
        _clean(out, (slice(y0, y0 + vh), slice(x0, x0 + vw)), mine, placed, paired)
    for r in rows[window < 0]:  # larger than any patch: checked in its own box
        mine = np.zeros(n + 1, bool)
        mine[r[0]] = True
        _clean(out, (slice(int(r[4]), int(r[5])), slice(int(r[6]), int(r[7]))), mine, placed, paired)

    cores = [grid.core(pid) for pid in range(grid.n_patches)]
    area = np.zeros(n + 1, np.int64)
    nuc_area = np.zeros(n + 1, np.int64)
    sy = np.zeros(n + 1)
    sx = np.zeros(n + 1)
    for y_lo, y_hi, x_lo, x_hi in cores:
        region = (slice(y_lo, y_hi), slice(x_lo, x_hi))
        c = _read(out, "cell", region).astype(np.int64)
        if not c.any():
            continue
        yy, xx = np.indices(c.shape)
        flat = c.ravel()
        area += np.bincount(flat, minlength=n + 1)
        sy += np.bincount(flat, weights=(yy + y_lo).ravel(), minlength=n + 1)
        sx += np.bincount(flat, weights=(xx + x_lo).ravel(), minlength=n + 1)
        if paired:
            nuc = _read(out, "nucleus", region).astype(np.int64)
            nuc_area += np.bincount(nuc.ravel(), minlength=n + 1)
    keep = area > 0
    keep[0] = False
    old = np.flatnonzero(keep)
    lut = np.zeros(n + 1, np.uint32)
    lut[old] = np.arange(1, old.size + 1)
    for y_lo, y_hi, x_lo, x_hi in cores:
        region = (slice(y_lo, y_hi), slice(x_lo, x_hi))
        c = _read(out, "cell", region)
        if not c.any():
            continue
        c = lut[c]
        out["cell"][region] = c
        if paired:
            nuc = lut[_read(out, "nucleus", region)]
            out["nucleus"][region] = nuc
            out["cytoplasm"][region] = np.where(nuc > 0, 0, c).astype(np.uint32)
    info = np.zeros((n + 1, 2), np.int64)
    info[rows[:, 0]] = rows[:, [1, 3]]
    a = area[old]
    return {"id": np.arange(1, old.size + 1, dtype=np.int64), "centroid_y": sy[old] / a, "centroid_x": sx[old] / a,
            "cell_area": a, "nucleus_area": nuc_area[old], "cytoplasm_area": a - nuc_area[old],
            "patch_id": info[old, 0], "patches": info[old, 1]}


def _windows(grid, boxes) -> np.ndarray:
    """For each box (y_lo, y_hi, x_lo, x_hi), a patch whose rectangle holds it, or -1."""
    found = []
    for axis, (lo, hi) in enumerate(((boxes[:, 0], boxes[:, 1]), (boxes[:, 2], boxes[:, 3]))):
        step, size, n = grid.step[axis], grid.patch_shape[axis], grid.grid_shape[axis]
        i = np.minimum(lo // max(step, 1), n - 1)
        found.append((i, i * step + size >= hi))
    (iy, oky), (ix, okx) = found
    return np.where(oky & okx, iy * grid.grid_shape[1] + ix, -1)


def _clean(out, region, mine, placed: _Placed, paired):
    """In one region: the objects marked in ``mine`` keep their largest 8-connected part, their nucleus
    its largest part (the rest turns cytoplasm); paired cells left without a nucleus are removed."""
    from skimage.measure import label

    cell = _read(out, "cell", region)
    changed = False
    keep = _largest_parts(cell, label(cell, connectivity=2), mine)
    if keep is not None:
        placed.counts["fragments_removed"] += int(np.unique(cell[~keep & (cell > 0)]).size)
        cell[~keep] = 0
        changed = True
    nuc = _read(out, "nucleus", region) if paired else None
    if paired:
        if changed:
            nuc[cell == 0] = 0
        keep_n = _largest_parts(nuc, label(nuc, connectivity=2), mine)
        if keep_n is not None:
            placed.counts["nucleus_fragments_removed"] += int(np.unique(nuc[~keep_n & (nuc > 0)]).size)
            nuc[~keep_n] = 0
            changed = True
        has = np.zeros(mine.size, bool)
        has[nuc[nuc > 0]] = True
        orphan = mine.copy()
        orphan[0] = False
        orphan &= ~has
        present = np.zeros(mine.size, bool)
        present[cell[cell > 0]] = True
        orphan &= present
        if orphan.any():
            placed.counts["dropped_without_nucleus"] += int(np.count_nonzero(orphan))
            cell[orphan[cell]] = 0
            changed = True
    if changed:
        out["cell"][region] = cell
        if paired:
            out["nucleus"][region] = nuc


def _largest_parts(labels, parts, mine):
    """Mask of the pixels to keep: every part except the smaller parts of the ids marked in ``mine``;
    None when there is nothing to remove."""
    n_parts = int(parts.max())
    if n_parts == 0:
        return None
    part_id = np.zeros(n_parts + 1, np.int64)
    part_id[parts.ravel()] = labels.ravel()
    size = np.bincount(parts.ravel(), minlength=n_parts + 1)
    idx = np.flatnonzero(mine[part_id] & (np.arange(n_parts + 1) > 0))
    if idx.size == 0:
        return None
    order = idx[np.lexsort((-size[idx], part_id[idx]))]
    first = np.ones(order.size, bool)
    first[1:] = part_id[order[1:]] != part_id[order[:-1]]
    drop = np.zeros(n_parts + 1, bool)
    drop[order[~first]] = True
    if not drop.any():
        return None
    return ~drop[parts]


def stitch_segmentation(grid: PatchGrid, patch_ids, load, *, duplicate_overlap=0.5, progress=None, out=None,
                        band_rows=None):
    """Whole-slide cells and nuclei from per-patch segmentations, repaired after stitching.

    The patches' *unrepaired* cell and nucleus labels are stitched each on its
    own (:func:`stitch_patches` with ``paired=False``; the nuclei keep two cell
    pieces that each hold one apart at a seam without overlap), then the
    whole-slide pair is repaired (:func:`maskworks.codex.repair.repair_masks`:
    the same matcher as per patch).  Repairing after placement keeps the part
    of a cut cell that has no nucleus in its patch, which a per-patch repair
    drops, so large cells are joined whole.

    Parameters
    ----------
    grid, patch_ids, duplicate_overlap, progress
        As :func:`stitch_patches`.
    load : callable
        ``load(patch_id) -> (cell, nucleus)``: the segmentation's labels of
        the patch (ids need not pair).
    out : dict, optional
        Zero-filled uint32 array-likes of ``grid.image_shape`` to write into
        (e.g. Zarr arrays, for slides that do not fit in memory): ``cell``,
        ``nucleus``, ``cytoplasm``, ``cell_original``, ``nucleus_original``.
        Default: NumPy arrays.
    band_rows : int, optional
        Rows per band of the slide-wide passes (repair, nucleus clean-up, the
        table); default: the whole slide at once.  The result does not depend
        on it.

    Returns
    -------
    cell, nucleus, cytoplasm : array-like of uint32, ``grid.image_shape``
        Cell ``k`` pairs with nucleus ``k`` (inside its interior, one connected
        part) and cytoplasm ``k`` = cell ``k`` minus nucleus ``k``; ids 1..n.
    cell_original, nucleus_original : array-like of uint32
        The stitched segmentation before repair.
    table : dict of ndarray
        As :func:`stitch_patches`, per repaired cell (``patch_id`` and
        ``patches`` of its stitched cell).
    stats : dict
        ``cells``, ``patches``, ``cell_stitch`` and ``nucleus_stitch`` (the
        :func:`stitch_patches` stats of each), ``repair`` (its metrics) and
        ``nucleus_fragments_removed`` (nuclei the trimming left in several
        parts: the largest 8-connected part kept, the rest turned cytoplasm).
    """
    from .repair import repair_label_stores

    wrap = progress or (lambda it, **kw: it)
    h, w = grid.image_shape
    if out is None:
        out = {k: np.zeros((h, w), np.uint32) for k in STITCHED}
    rows = max(1, int(band_rows or h))
    cells, _, _, cell_table, cell_stats = stitch_patches(
        grid, patch_ids, load, out={"cell": out["cell_original"]}, duplicate_overlap=duplicate_overlap,
        paired=False, progress=lambda it, desc: wrap(it, desc=f"{desc}, cells"))
    nuclei, _, _, _, nucleus_stats = stitch_patches(
        grid, patch_ids, lambda pid: load(pid)[1], out={"cell": out["nucleus_original"]},
        duplicate_overlap=duplicate_overlap, paired=False,
        progress=lambda it, desc: wrap(it, desc=f"{desc}, nuclei"))
    metrics = repair_label_stores(cells, nuclei, out["cell"], out["nucleus"], band_rows=rows)
    n = metrics["matched"]
    parts = label_parts(out["nucleus"], rows)
    drop = parts.smaller_parts()
    # the nuclei without their smaller parts, the cytoplasm, and the table: one more pass
    area = np.zeros(n + 1, np.int64)
    nuc_area = np.zeros(n + 1, np.int64)
    sy, sx = np.zeros(n + 1), np.zeros(n + 1)
    source = np.zeros(n + 1, np.int64)
    for r0, nuc, local in wrap(parts.bands(out["nucleus"]), desc="stitch (nuclei, table)"):
        band = slice(r0, r0 + nuc.shape[0])
        if drop is not None:
            nuc[drop[parts.global_index(r0, local)]] = 0
            out["nucleus"][band] = nuc
        c = np.asarray(out["cell"][band])
        out["cytoplasm"][band] = np.where(nuc > 0, 0, c).astype(np.uint32)
        flat = c.ravel()
        area += np.bincount(flat, minlength=n + 1)
        sy += np.bincount(flat, weights=np.repeat(np.arange(r0, r0 + c.shape[0], dtype=np.float64), w),
                          minlength=n + 1)
        sx += np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), c.shape[0]), minlength=n + 1)
        nuc_area += np.bincount(nuc.ravel(), minlength=n + 1)
        fg = c > 0
        source[c[fg]] = np.asarray(cells[band])[fg]
    cy = sy[1:] / np.maximum(area[1:], 1)
    cx = sx[1:] / np.maximum(area[1:], 1)
    nuc_area = nuc_area[1:]
    old = source[1:] - 1  # stitched cell ids are 1..m, rows 0..m-1 of its table
    table = {"id": np.arange(1, n + 1, dtype=np.int64), "centroid_y": cy, "centroid_x": cx,
             "cell_area": area[1:].astype(np.int64), "nucleus_area": nuc_area.astype(np.int64),
             "cytoplasm_area": (area[1:] - nuc_area).astype(np.int64),
             "patch_id": cell_table["patch_id"][old], "patches": cell_table["patches"][old]}
    stats = {"cells": n, "patches": cell_stats["patches"], "cell_stitch": cell_stats,
             "nucleus_stitch": nucleus_stats, "repair": metrics, "nucleus_fragments_removed": parts.fragmented()}
    return out["cell"], out["nucleus"], out["cytoplasm"], cells, nuclei, table, stats


STITCHED = ("cell", "nucleus", "cytoplasm", "cell_original", "nucleus_original")


class LabelParts:
    """The 8-connected parts of every id of a label image read by row bands, joined across the seams.

    Each band is labelled on its own (``skimage.measure.label``, 8-connected, a
    part per id); parts of one id that meet across a band seam (8-neighbours on
    the rows either side) are one *component*.  Components are what
    ``label(image, connectivity=2)`` of the whole image gives, without holding
    it.  Build with :func:`label_parts`.
    """

    def __init__(self, offsets, part_label, part_size, component, rows):
        self.offsets, self.rows = offsets, rows  # band start row -> index of its first part
        self.component = component  # per part (bands in order, then local label order)
        n = int(component.max(initial=-1)) + 1
        self.label = np.zeros(n, np.int64)
        self.label[component] = part_label
        self.size = np.bincount(component, weights=part_size, minlength=n)
        self.first = np.full(n, component.size, np.int64)  # first part in raster order
        np.minimum.at(self.first, component, np.arange(component.size))
        self._lookup = np.concatenate([component, [n]])  # background (index component.size) -> n

    def global_index(self, r0, local):
        """Component of each pixel of the band starting at row ``r0`` (``local``: its band labels, 0 =
        background, which maps to the last entry of the arrays indexed by it: give them one more)."""
        return self._lookup[np.where(local > 0, self.offsets[r0] + local - 1, self.component.size)]

    def fragmented(self) -> int:
        """Ids in more than one component."""
        if not self.label.size:
            return 0
        return int(np.count_nonzero(np.bincount(self.label) > 1))

    def smaller_parts(self):
        """Per component (and one more entry, False, for the background): True for every component
        but the largest of its id (ties: the first in raster order); None when nothing is dropped."""
        if not self.fragmented():
            return None
        order = np.lexsort((self.first, -self.size, self.label))
        keep = np.ones(order.size, bool)
        keep[1:] = self.label[order[1:]] != self.label[order[:-1]]
        drop = np.zeros(self.label.size + 1, bool)
        drop[order[~keep]] = True
        return drop

    def bands(self, image):
        """``(r0, block, local)`` per band of ``image``: its rows as an array and their band labels."""
        return _labelled_bands(image, self.rows)


def _labelled_bands(image, rows):
    from skimage.measure import label

    for r0 in range(0, image.shape[0], rows):
        block = np.asarray(image[r0:r0 + rows])
        yield r0, block, label(block, connectivity=2)


def label_parts(image, band_rows) -> LabelParts:
    """:class:`LabelParts` of a 2-D label image (array-like), read ``band_rows`` rows at a time."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = max(1, int(band_rows))
    offsets, labels, sizes, edges = {}, [], [], []
    total = 0
    above = None  # the previous band's last row: ids and global part indices
    for r0, block, local in _labelled_bands(image, rows):
        k = int(local.max(initial=0))
        part_label = np.zeros(k + 1, np.int64)
        part_label[local.ravel()] = block.ravel()
        labels.append(part_label[1:])
        sizes.append(np.bincount(local.ravel(), minlength=k + 1)[1:])
        offsets[r0] = total
        top = (block[0], local[0] + total - 1)
        if above is not None:
            w = block.shape[1]
            for dx in (-1, 0, 1):  # pixel x above meets x + dx below
                a = slice(max(0, -dx), w - max(0, dx))
                b = slice(max(0, dx), w - max(0, -dx))
                same = (above[0][a] == top[0][b]) & (top[0][b] != 0)
                edges.append(np.stack([above[1][a][same], top[1][b][same]]))
        above = (block[-1], local[-1] + total - 1)
        total += k
    component = np.zeros(0, np.int64)
    if total:
        e = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), np.int64)
        graph = coo_matrix((np.ones(e.shape[1], np.int8), (e[0], e[1])), shape=(total, total))
        _, component = connected_components(graph, directed=False)
        # components numbered in raster order of their first part
        uniq, first = np.unique(component, return_index=True)
        rank = np.empty(uniq.size, np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)
        component = rank[component]
    return LabelParts(offsets, _concat(labels), _concat(sizes), component, rows)


def _concat(arrays):
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def check_stitched(cell, nucleus=None, cytoplasm=None, *, band_rows=None) -> dict:
    """The promises of :func:`stitch_patches`, counted on its outputs (read by row bands).

    Returns ``cells``; ``fragmented_cells`` (ids with more than one 8-connected
    part), and with ``nucleus``: ``cells_without_nucleus``,
    ``nuclei_outside_cell`` (nucleus pixels whose cell has another id),
    ``fragmented_nuclei``; with ``cytoplasm``: ``cytoplasm_mismatch`` (pixels
    where cytoplasm differs from cell minus nucleus).  All 0 for a good stitch.
    ``band_rows``: rows read at a time (default: all); the counts do not
    depend on it.
    """
    h = cell.shape[0]
    rows = max(1, int(band_rows or h))
    present = np.zeros(1, bool)
    paired = np.zeros(1, bool)
    outside = mismatch = 0
    for r0 in range(0, h, rows):
        c = np.asarray(cell[r0:r0 + rows])
        present = _mark(present, c[c > 0])
        if nucleus is None:
            continue
        n = np.asarray(nucleus[r0:r0 + rows])
        inside = (n > 0) & (n == c)
        paired = _mark(paired, n[inside])
        outside += int(np.count_nonzero((n > 0) & ~inside))
        if cytoplasm is not None:
            mismatch += int(np.count_nonzero(np.asarray(cytoplasm[r0:r0 + rows]) != np.where(n > 0, 0, c)))
    out = {"cells": int(np.count_nonzero(present)), "fragmented_cells": label_parts(cell, rows).fragmented()}
    if nucleus is not None:
        paired = np.concatenate([paired, np.zeros(max(0, present.size - paired.size), bool)])
        out["cells_without_nucleus"] = int(np.count_nonzero(present & ~paired[:present.size]))
        out["nuclei_outside_cell"] = outside
        out["fragmented_nuclei"] = label_parts(nucleus, rows).fragmented()
        if cytoplasm is not None:
            out["cytoplasm_mismatch"] = mismatch
    return out


def _mark(seen, ids):
    """``seen`` (bool per id) with ``ids`` set, grown as needed."""
    if ids.size:
        top = int(ids.max())
        if top >= seen.size:
            seen = np.concatenate([seen, np.zeros(top + 1 - seen.size, bool)])
        seen[ids] = True
    return seen
