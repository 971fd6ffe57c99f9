"""maskworks.codex.stitch.stitch_patches: whole-slide labels from overlapping patch labels.

The per-patch "segmentations" are a known label image cropped to each patch (so a
perfect stitch gives it back exactly), with patch-local ids in a random order and,
like a real segmentation, one label per connected part inside the patch.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label

from maskworks.codex.stitch import check_stitched, stitch_patches
from maskworks.codex.tiling import patch_grid
from maskworks.io import InputError

GOOD = {"fragmented_cells": 0, "cells_without_nucleus": 0, "nuclei_outside_cell": 0, "fragmented_nuclei": 0,
        "cytoplasm_mismatch": 0}


def _slide(shape=(260, 330), seed=0, spacing=16, radius=7.5):
    """Round cells (Voronoi regions cut at ``radius``) with a nucleus each: nucleus k in cell k."""
    rng = np.random.default_rng(seed)
    h, w = shape
    gy, gx = np.meshgrid(np.arange(6, h - 2, spacing), np.arange(6, w - 2, spacing), indexing="ij")
    sy = np.clip(gy + rng.integers(-3, 4, gy.shape), 0, h - 1).ravel()
    sx = np.clip(gx + rng.integers(-3, 4, gx.shape), 0, w - 1).ravel()
    seeds = np.zeros(shape, np.int32)
    seeds[sy, sx] = np.arange(1, sy.size + 1)
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    cells = np.where(dist <= radius, seeds[iy, ix], 0)
    nuclei = np.where(dist <= 3, cells, 0)
    return _consecutive(cells, nuclei)


def _consecutive(cells, nuclei):
    ids = np.unique(cells)[1:]
    lut = np.zeros(cells.max() + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1)
    return lut[cells], lut[nuclei]


def _mixed_slide(shape, seed):
    """Small round cells among large irregular ones (some longer than a patch, some U-shaped, so that a
    patch sees them in several parts), each with one nucleus, every cell one 8-connected region."""
    rng = np.random.default_rng(seed)
    cells, nuclei = _slide(shape, seed=seed, spacing=14, radius=6.0)
    cells, nuclei = cells.astype(np.int64), nuclei.astype(np.int64)
    yy, xx = np.indices(shape)
    top = int(cells.max())
    for k in range(int(rng.integers(3, 6))):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b = rng.uniform(12, shape[0] / 2), rng.uniform(8, 30)
        t = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
        v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        blob = (u / a) ** 2 + (v / b) ** 2 <= 1
        if k % 2:  # a U: the ellipse without a notch cut from one side
            blob &= ~(((u / a) ** 2 + ((v - b / 2) / (b / 2)) ** 2 <= 0.6) & (v > 0))
        top += 1
        cells[blob] = top
        nuclei[blob] = 0
        inner = ndi.binary_erosion(cells == top, iterations=2)
        if inner.any():
            py, px = np.argwhere(inner)[len(np.argwhere(inner)) // 2]
            disk = ((yy - py) ** 2 + (xx - px) ** 2 <= 9) & inner
            nuclei[disk] = top
    # one connected part per cell and per nucleus; cells without nucleus dropped
    parts = label(cells, connectivity=2)
    biggest = np.zeros(cells.max() + 1, np.int64)
    sizes = np.bincount(parts.ravel())
    order = np.argsort(sizes)
    part_id = np.zeros(parts.max() + 1, np.int64)
    part_id[parts.ravel()] = cells.ravel()
    biggest[part_id[order]] = order
    cells = np.where(biggest[cells] == parts, cells, 0)
    nuclei = np.where(nuclei == cells, nuclei, 0)
    nparts = label(nuclei, connectivity=2)
    nsizes = np.bincount(nparts.ravel())
    norder = np.argsort(nsizes)
    npart_id = np.zeros(nparts.max() + 1, np.int64)
    npart_id[nparts.ravel()] = nuclei.ravel()
    nbig = np.zeros(cells.max() + 1, np.int64)
    nbig[npart_id[norder]] = norder
    nuclei = np.where((nuclei > 0) & (nbig[nuclei] == nparts), nuclei, 0)
    has = np.zeros(cells.max() + 1, bool)
    has[nuclei[nuclei > 0]] = True
    cells = np.where(has[cells], cells, 0)
    return _consecutive(cells, nuclei)


def _patch_loader(grid, cells, nuclei, seed=0, perturb=False, split_parts=False):
    """Per-patch 'segmentations': the truth cropped to each patch (cut at its edges), zero-padded,
    with patch-local ids in a random order; ``perturb`` drops each object's rim in some patches
    (as a segmentation that depends on the patch's context would); ``split_parts`` gives each
    connected part of a cropped object its own id (as a segmentation would)."""
    rng = np.random.default_rng(seed)
    out = {}
    for pid in range(grid.n_patches):
        _, _, y0, x0 = grid.position(pid)
        vh, vw = grid.valid_shape(pid)
        c = np.zeros(grid.patch_shape, np.int64)
        n = np.zeros(grid.patch_shape, np.int64)
        c[:vh, :vw] = cells[y0:y0 + vh, x0:x0 + vw]
        n[:vh, :vw] = nuclei[y0:y0 + vh, x0:x0 + vw]
        if perturb:
            inner = ndi.grey_erosion(c, size=3) == c
            shrink = rng.random(int(c.max()) + 1) < 0.5
            c = np.where(~inner & shrink[c], 0, c)
            n = np.where(c == n, n, 0)
        if split_parts:
            parts = label(c, connectivity=2)
            # the nucleus follows the part of its cell that holds it
            n = np.where(n > 0, parts, 0)
            c = parts
        ids = np.unique(c)[1:]
        lut = np.zeros(int(c.max()) + 1, np.int64)
        lut[ids] = rng.permutation(ids.size) + 1
        out[pid] = (lut[c].astype(np.uint16), lut[n].astype(np.uint16))
    return out.__getitem__


def _same_labels(stitched, truth):
    """Whether two label images are the same up to the ids."""
    fg = (stitched > 0) | (truth > 0)
    if not np.array_equal(stitched > 0, truth > 0):
        return False
    pairs = np.unique(np.stack([stitched[fg], truth[fg]]), axis=1)
    return np.unique(pairs[0]).size == pairs.shape[1] == np.unique(pairs[1]).size


def _match(stitched, truth):
    """(pairs with IoU > 0.5, truth ids matched more than once, stitched ids matched to none)."""
    m = (stitched > 0) & (truth > 0)
    top = int(truth.max()) + 1
    keys, inter = np.unique(stitched[m].astype(np.int64) * top + truth[m], return_counts=True)
    s, t = keys // top, keys % top
    a_s, a_t = np.bincount(stitched.ravel()), np.bincount(truth.ravel())
    good = inter / (a_s[s] + a_t[t] - inter) > 0.5
    t_good, s_good = t[good], s[good]
    return good.sum(), np.unique(t_good[np.bincount(t_good)[t_good] > 1]), \
        np.setdiff1d(np.arange(1, int(stitched.max()) + 1), s_good)


def test_stitch_exact_patches_gives_each_true_cell_once_and_whole():
    cells, nuclei = _slide()
    grid = patch_grid(cells.shape, patch_height=64, patch_width=80, overlap=0.3)  # half-overlap 9 > radius
    cell, nucleus, cyto, table, stats = stitch_patches(grid, range(grid.n_patches),
                                                       _patch_loader(grid, cells, nuclei))
    assert cell.dtype == nucleus.dtype == cyto.dtype == np.uint32 and cell.shape == cells.shape
    n_true = int(cells.max())
    assert stats["cells"] == int(cell.max()) == n_true == table["id"].size
    np.testing.assert_array_equal(np.unique(cell)[1:], np.arange(1, n_true + 1))
    assert _same_labels(cell, cells) and _same_labels(nucleus, nuclei)
    pairs = np.unique(np.stack([cell[cells > 0], cells[cells > 0]]), axis=1)
    to_true = np.zeros(n_true + 1, np.int64)
    to_true[pairs[0]] = pairs[1]
    np.testing.assert_array_equal(to_true[nucleus], nuclei)  # cell k pairs with nucleus k ...
    np.testing.assert_array_equal(cyto, np.where(nucleus > 0, 0, cell))  # ... and cytoplasm k
    assert stats["from_core"] == n_true and stats["rescued"] == stats["joined"] == stats["cut_single"] == 0
    # the table: areas and centroids of the stitched objects
    np.testing.assert_array_equal(table["cell_area"], np.bincount(cell.ravel())[1:])
    np.testing.assert_array_equal(table["nucleus_area"], np.bincount(nucleus.ravel(), minlength=n_true + 1)[1:])
    np.testing.assert_array_equal(table["cytoplasm_area"], table["cell_area"] - table["nucleus_area"])
    cy = ndi.mean(np.indices(cell.shape)[0], cell, index=np.arange(1, n_true + 1))
    np.testing.assert_allclose(table["centroid_y"], cy)
    assert (table["patches"] == 1).all()


@pytest.mark.parametrize("seed", [1, 3])  # seed 1 meets a duplicate, seed 3 rescues and duplicates
def test_stitch_tolerates_patch_dependent_segmentations(seed):
    cells, nuclei = _slide(seed=seed)
    grid = patch_grid(cells.shape, patch_height=64, patch_width=64, overlap=0.3)
    cell, nucleus, cyto, table, stats = stitch_patches(
        grid, range(grid.n_patches), _patch_loader(grid, cells, nuclei, seed=seed + 1, perturb=True))
    assert stats["duplicates"] + stats["rescued"] > 0
    n_good, twice, unmatched = _match(cell, cells)
    assert n_good == cells.max() == cell.max()  # each true cell once, no extras
    assert twice.size == 0 and unmatched.size == 0
    assert check_stitched(cell, nucleus, cyto) == {"cells": int(cells.max()), **GOOD}


def test_stitch_joins_an_object_cut_in_both_patches():
    # One row of two patches: A = x [0, 64), B = x [32, 96); cores A [0, 48), B [48, 90).
    shape = (40, 90)
    grid = patch_grid(shape, patch_height=40, patch_width=64, overlap=0.5)
    assert grid.grid_shape == (1, 2) and grid.core(0) == (0, 40, 0, 48) and grid.core(1) == (0, 40, 48, 90)
    cells = np.zeros(shape, np.int64)
    cells[2:18, 34:46] = 1   # an L: its centroid (x ~ 41.3) lies in A's core ...
    cells[10, 46:66] = 1     # ... its tail crosses A's right edge: whole only in B
    cells[24:30, 20:88] = 2  # a bar cut by A's right edge and by B's left edge: cut in both
    cells[33:37, 5:15] = 3   # an ordinary cell inside A's core
    nuclei = np.where(np.isin(cells, [1, 3]), cells, 0)
    nuclei[24:30, 60:64] = 2
    cell, nucleus, cyto, table, stats = stitch_patches(grid, [0, 1], _patch_loader(grid, cells, nuclei))
    assert {k: stats[k] for k in ("from_core", "rescued", "joined", "joined_pieces", "cut_single")} == \
        {"from_core": 1, "rescued": 1, "joined": 1, "joined_pieces": 2, "cut_single": 0}
    assert _same_labels(cell, cells) and _same_labels(nucleus, nuclei)
    # placement order: the ordinary cell (pass 1), the L from B (rescued), the bar (joined across the seam)
    assert table["patch_id"].tolist() == [0, 1, 0] and table["patches"].tolist() == [1, 1, 2]
    assert table["cell_area"].tolist() == [40, 16 * 12 + 20, 6 * 68]
    assert np.unique(cell[24:30, 20:88]).tolist() == [3] and np.unique(nucleus[24:30, 60:64]).tolist() == [3]
    assert stats["duplicates"] == 1  # A's cut view of the L (rescued whole from B)


def _random_tiling(seed, overlaps):
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(120, 200)), int(rng.integers(120, 220)))
    cells, nuclei = _mixed_slide(shape, seed)
    overlap = float(rng.choice(overlaps))
    grid = patch_grid(shape, patch_height=int(rng.integers(40, 90)), patch_width=int(rng.integers(40, 90)),
                      overlap=overlap)
    return cells, nuclei, grid


@pytest.mark.parametrize("seed", range(8))
def test_stitch_property_random_tilings_give_the_labels_back(seed):
    """Random overlapping grids (patches smaller than the large cells) of a known label image: the
    stitch is that image, and its promises hold."""
    cells, nuclei, grid = _random_tiling(seed, [0.1, 0.2, 0.3, 0.5])
    load = _patch_loader(grid, cells, nuclei, seed=seed, split_parts=True)
    cell, nucleus, cyto, table, stats = stitch_patches(grid, range(grid.n_patches), load)
    assert check_stitched(cell, nucleus, cyto) == {"cells": int(cells.max()), **GOOD}, (grid, stats)
    assert _same_labels(cell, cells), (grid, stats)
    assert _same_labels(nucleus, nuclei), (grid, stats)
    assert stats["joined"] > 0 and stats["dropped_without_nucleus"] == stats["fragments_removed"] == 0
    big = np.bincount(cells.ravel())[1:] > grid.patch_shape[0] * grid.patch_shape[1] / 4
    assert big.any()


@pytest.mark.parametrize("seed", range(5))
def test_stitch_without_overlap_joins_along_the_seams(seed):
    """Patches that only touch (Aegle's halves/quarters): pieces are joined where their cross-sections
    on the seam agree, spills of a pixel or two join what they touch; two pieces that each hold a
    nucleus of their own stay two cells.  The stitch is the labelled image again."""
    cells, nuclei, grid = _random_tiling(seed, [0.0])
    assert grid.step == grid.patch_shape
    load = _patch_loader(grid, cells, nuclei, seed=seed, split_parts=True)
    cell, nucleus, cyto, table, stats = stitch_patches(grid, range(grid.n_patches), load)
    assert check_stitched(cell, nucleus, cyto) == {"cells": int(cells.max()), **GOOD}, (grid, stats)
    assert _same_labels(cell, cells) and _same_labels(nucleus, nuclei) and stats["joined"] > 0
    # without nuclei to tell them apart, cells that meet exactly on a seam may be joined: only those
    cell, *_ = stitch_patches(grid, range(grid.n_patches), lambda p: load(p)[0], paired=False)
    fg = cells > 0
    assert np.array_equal(cell > 0, fg)
    pairs = np.unique(np.stack([cell[fg], cells[fg]]), axis=1)
    assert np.unique(pairs[1]).size == pairs.shape[1]  # no true cell split
    ids, count = np.unique(pairs[0], return_counts=True)
    merged = np.isin(pairs[0], ids[count > 1])
    on_seam = np.zeros(cells.shape, bool)
    on_seam[grid.step[0] - 1::grid.step[0]] = on_seam[grid.step[0]::grid.step[0]] = True
    on_seam[:, grid.step[1] - 1::grid.step[1]] = on_seam[:, grid.step[1]::grid.step[1]] = True
    assert np.isin(pairs[1][merged], cells[on_seam]).all()


@pytest.mark.parametrize("seed", range(4))
def test_stitch_promises_hold_for_patch_dependent_segmentations_of_large_cells(seed):
    cells, nuclei, grid = _random_tiling(seed, [0.1, 0.2, 0.3])
    load = _patch_loader(grid, cells, nuclei, seed=seed, perturb=True, split_parts=True)
    cell, nucleus, cyto, table, stats = stitch_patches(grid, range(grid.n_patches), load)
    check = check_stitched(cell, nucleus, cyto)
    assert {k: v for k, v in check.items() if k != "cells"} == GOOD
    n_good, twice, unmatched = _match(cell, cells)
    assert twice.size == 0 and n_good >= cells.max() - 4 and unmatched.size <= 4


def test_stitch_fills_from_neighbours_where_a_patch_has_no_result():
    cells, nuclei = _mixed_slide((150, 160), 7)
    grid = patch_grid(cells.shape, patch_height=60, patch_width=60, overlap=0.2)
    missing = 4  # the middle patch was not informative
    load = _patch_loader(grid, cells, nuclei, seed=2, split_parts=True)
    ids = [p for p in range(grid.n_patches) if p != missing]
    cell, nucleus, cyto, table, stats = stitch_patches(grid, ids, load)
    assert check_stitched(cell, nucleus, cyto)["fragmented_cells"] == 0
    assert {k: v for k, v in check_stitched(cell, nucleus, cyto).items() if k != "cells"} == GOOD
    # what the other patches see is there; what only the missing patch sees is not
    seen = np.zeros(cells.shape, bool)
    for p in ids:
        _, _, y0, x0 = grid.position(p)
        vh, vw = grid.valid_shape(p)
        seen[y0:y0 + vh, x0:x0 + vw] = True
    assert not cell[~seen].any()
    whole_elsewhere = [k for k in range(1, int(cells.max()) + 1) if seen[cells == k].all()]
    n_good, twice, unmatched = _match(cell, np.where(np.isin(cells, whole_elsewhere), cells, 0))
    assert twice.size == 0 and n_good >= len(whole_elsewhere) - 2


def test_stitch_of_unpaired_labels():
    cells, _ = _mixed_slide((140, 150), 3)
    grid = patch_grid(cells.shape, patch_height=50, patch_width=64, overlap=0.1)
    load = _patch_loader(grid, cells, np.zeros_like(cells), split_parts=True)
    cell, nucleus, cyto, table, stats = stitch_patches(grid, range(grid.n_patches), lambda p: load(p)[0],
                                                       paired=False)
    assert _same_labels(cell, cells) and not nucleus.any() and not cyto.any()
    assert check_stitched(cell) == {"cells": int(cells.max()), "fragmented_cells": 0}


def test_stitch_removes_fragments_and_cells_without_nucleus():
    # Two patches, no overlap: A sees a cell whose nucleus B's segmentation gives to another cell.
    shape = (30, 60)
    grid = patch_grid(shape, patch_height=30, patch_width=30, overlap=0.0)
    a = np.zeros((30, 30), np.int64)
    b = np.zeros((30, 30), np.int64)
    a[5:15, 5:15] = 1           # whole in A, its nucleus ...
    na = np.where(a == 1, 0, 0)
    na[8:12, 8:12] = 1          # ... inside it
    a[20:25, 3:6] = 2           # a cell of A without any nucleus pixel
    b[5:15, 5:15] = 1
    nb = np.zeros_like(b)
    nb[8:12, 8:12] = 1
    cell, nucleus, cyto, table, stats = stitch_patches(
        grid, [0, 1], {0: (a, na), 1: (b, nb)}.__getitem__)
    assert stats["dropped_without_nucleus"] == 1 and stats["cells"] == 2
    assert check_stitched(cell, nucleus, cyto) == {"cells": 2, **GOOD}


def test_stitch_into_zarr_equals_numpy(tmp_path):
    import zarr

    cells, nuclei = _mixed_slide((130, 150), seed=3)
    grid = patch_grid(cells.shape, patch_height=48, patch_width=48, overlap=0.4)
    load = _patch_loader(grid, cells, nuclei, seed=4, perturb=True)
    ref = stitch_patches(grid, range(grid.n_patches), load)
    out = {k: zarr.zeros(cells.shape, chunks=(40, 40), dtype=np.uint32, store=str(tmp_path / k))
           for k in ("cell", "nucleus", "cytoplasm")}
    got = stitch_patches(grid, range(grid.n_patches), load, out=out)
    for a, b in zip(ref[:3], got[:3]):
        np.testing.assert_array_equal(a, b[...])
    assert ref[4] == got[4]


def test_stitch_checks_shapes_and_labels():
    grid = patch_grid((20, 20), patch_height=16, patch_width=16, overlap=0.25)
    with pytest.raises(InputError, match="patch shape"):
        stitch_patches(grid, [0], lambda pid: (np.zeros((8, 8), int), np.zeros((8, 8), int)))
    with pytest.raises(InputError, match="integers"):
        stitch_patches(grid, [0], lambda pid: (np.zeros((16, 16)), np.zeros((16, 16))))
    with pytest.raises(InputError, match="duplicate_overlap"):
        stitch_patches(grid, [0], None, duplicate_overlap=-1)
    cell, nucleus, cyto, table, stats = stitch_patches(grid, [], None)
    assert not cell.any() and stats["cells"] == 0 and table["id"].size == 0


def _segmentation_loader(grid, cells, nuclei, seed=0):
    """Per-patch unrepaired 'segmentations': cells and nuclei cropped, each with its own patch-local
    ids (one per connected part), the nuclei numbered independently of the cells."""
    load = _patch_loader(grid, cells, nuclei, seed=seed, split_parts=True)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for pid in range(grid.n_patches):
        c, n = load(pid)
        parts = label(n, connectivity=2)
        lut = np.zeros(int(parts.max()) + 1, np.int64)
        lut[1:] = rng.permutation(int(parts.max())) + 1
        out[pid] = (c, lut[parts].astype(np.uint16))
    return out.__getitem__


@pytest.mark.parametrize("seed", range(4))
def test_stitch_segmentation_repairs_after_placement(seed):
    """The part of a large cut cell without a nucleus in its patch is kept (a per-patch repair drops
    it, and the cell would end at the seam): the stitch of the unrepaired patches, repaired, is the
    labelled image again."""
    from maskworks.codex.repair import repair_masks
    from maskworks.codex.stitch import stitch_segmentation

    cells, nuclei, grid = _random_tiling(seed, [0.1, 0.2])
    load = _segmentation_loader(grid, cells, nuclei, seed=seed)
    cell, nucleus, cyto, cell0, nucleus0, table, stats = stitch_segmentation(grid, range(grid.n_patches), load)
    assert _same_labels(cell0, cells) and _same_labels(nucleus0, nuclei)
    # the truth has cells whose nucleus lies on their membrane: the repair treats them as it would the slide
    truth_cell, truth_nucleus, _, truth_metrics = repair_masks(cells, nuclei)
    assert stats["repair"] == truth_metrics
    assert check_stitched(cell, nucleus, cyto) == {"cells": int(truth_cell.max()), **GOOD}
    assert _same_labels(cell, truth_cell)
    # ... and the stitch keeps the largest part of a nucleus the trimming split
    split = check_stitched(truth_cell, truth_nucleus)["fragmented_nuclei"]
    assert stats["nucleus_fragments_removed"] == split
    if not split:
        assert _same_labels(nucleus, truth_nucleus)
    assert not nucleus[truth_nucleus == 0].any()
    assert stats["repair"]["matched"] == stats["cells"] == table["id"].size and stats["cell_stitch"]["joined"] > 0
    np.testing.assert_array_equal(table["cell_area"], np.bincount(cell.ravel())[1:])
    np.testing.assert_array_equal(table["nucleus_area"], np.bincount(nucleus.ravel(), minlength=cell.max() + 1)[1:])
    assert set(table["patches"].tolist()) > {1}

    # repairing each patch first loses the nucleus-less parts of cut cells
    def repaired(pid):
        c, n, _, _ = repair_masks(*load(pid))
        return c, n

    before, *_ = stitch_patches(grid, range(grid.n_patches), repaired)
    assert np.count_nonzero(before) < np.count_nonzero(cells)


def _check_in_memory(cell, nucleus, cytoplasm):
    """The promises counted on whole images (skimage's labelling of the whole slide): the reference
    for the banded check."""
    def fragmented(labels):
        parts = label(labels, connectivity=2)
        part_id = np.zeros(int(parts.max()) + 1, np.int64)
        part_id[parts.ravel()] = labels.ravel()
        return int(np.count_nonzero(np.bincount(part_id[1:]) > 1)) if parts.max() else 0

    ids = np.unique(cell)[1:] if cell.any() else np.zeros(0, int)
    inside = np.unique(nucleus[(nucleus > 0) & (nucleus == cell)])
    return {"cells": int(ids.size), "fragmented_cells": fragmented(cell),
            "cells_without_nucleus": int(np.setdiff1d(ids, inside).size),
            "nuclei_outside_cell": int(np.count_nonzero((nucleus > 0) & (nucleus != cell))),
            "fragmented_nuclei": fragmented(nucleus),
            "cytoplasm_mismatch": int(np.count_nonzero(cytoplasm != np.where(nucleus > 0, 0, cell)))}


def _tangled(shape, seed):
    """Labels with many ids in several 8-connected parts, U shapes and diagonal contacts across rows."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 6, size=shape)
    lab[rng.random(shape) < 0.5] = 0
    return lab.astype(np.uint32)


@pytest.mark.parametrize("seed", range(6))
def test_label_parts_by_bands_are_the_whole_image_parts(seed):
    from maskworks.codex.stitch import _largest_parts, label_parts

    lab = _tangled((37, 23), seed)
    whole = label(lab, connectivity=2)
    n = int(lab.max())
    mine = np.ones(n + 1, bool)
    mine[0] = False
    keep = _largest_parts(lab, whole, mine)
    for rows in (1, 2, 5, 37):
        parts = label_parts(lab, rows)
        # the same number of components per id as the whole image's labelling
        expected = np.bincount(np.unique(np.stack([whole.ravel(), lab.ravel()]), axis=1)[1][1:], minlength=n + 1)
        np.testing.assert_array_equal(np.bincount(parts.label, minlength=n + 1), expected)
        drop = parts.smaller_parts()
        got = np.ones(lab.shape, bool) if drop is None else np.concatenate(
            [~drop[parts.global_index(r0, local)] for r0, _, local in parts.bands(lab)])
        np.testing.assert_array_equal(got, np.ones(lab.shape, bool) if keep is None else keep)


@pytest.mark.parametrize("seed", range(3))
def test_check_by_bands_counts_what_the_whole_image_check_counts(seed):
    cell = _tangled((41, 29), seed)
    nucleus = np.where(np.random.default_rng(seed).random(cell.shape) < 0.4, cell, 0).astype(np.uint32)
    nucleus[3, 3] = 9  # a nucleus outside its cell
    cyto = np.where(nucleus > 0, 0, cell).astype(np.uint32)
    cyto[0, 0] += 1
    expected = _check_in_memory(cell, nucleus, cyto)
    assert expected["fragmented_cells"] > 0 and expected["cells_without_nucleus"] >= 0
    for rows in (1, 3, 8, None):
        assert check_stitched(cell, nucleus, cyto, band_rows=rows) == expected


@pytest.mark.parametrize("seed", range(3))
def test_stitch_segmentation_into_stores_by_bands_equals_in_memory(seed, tmp_path):
    """The bounded path (Zarr label stores, repair, clean-up and table by row bands) gives exactly the
    in-memory result, itself checked against the whole-image repair."""
    import zarr

    from maskworks.codex.repair import repair_masks
    from maskworks.codex.stitch import STITCHED, stitch_segmentation

    cells, nuclei, grid = _random_tiling(seed, [0.1, 0.2])
    load = _segmentation_loader(grid, cells, nuclei, seed=seed)
    ref = stitch_segmentation(grid, range(grid.n_patches), load)
    truth_cell, truth_nucleus, _, metrics = repair_masks(ref[3], ref[4])  # the whole-image repair
    assert ref[6]["repair"] == metrics and _same_labels(ref[0], truth_cell)
    for rows in (7, 16):
        out = {k: zarr.create_array(store=str(tmp_path / f"{rows}_{k}"), shape=cells.shape, chunks=(32, 32),
                                    dtype=np.uint32, fill_value=0) for k in STITCHED}
        got = stitch_segmentation(grid, range(grid.n_patches), load, out=out, band_rows=rows)
        for a, b in zip(ref[:5], got[:5]):
            np.testing.assert_array_equal(a, b[...])
        for k in ref[5]:
            np.testing.assert_array_equal(ref[5][k], got[5][k])
        assert got[6] == ref[6]
        assert check_stitched(*got[:3], band_rows=rows) == _check_in_memory(*ref[:3])
