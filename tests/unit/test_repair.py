"""Cell-nucleus mask repair: hand-drawn cases, properties, and equality with the pixel-set reference."""

from __future__ import annotations

import numpy as np
import pytest
from reference_matcher import reference_repair
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from maskworks.codex import repair as repair_module
from maskworks.codex.repair import boundaries, repair_masks
from maskworks.io import InputError


def box(shape, *boxes):
    """Label image with ``(label, y0, y1, x0, x1)`` rectangles painted in order."""
    out = np.zeros(shape, dtype=np.int32)
    for label, y0, y1, x0, x1 in boxes:
        out[y0:y1, x0:x1] = label
    return out


def two_cells():
    """Cells 1 (columns 0-5) and 2 (columns 6-11) in a 10 x 12 image with a background margin."""
    return box((10, 12), (1, 1, 9, 0, 6), (2, 1, 9, 6, 12))


# ----------------------------------------------------------------------------- boundaries


@pytest.mark.parametrize("shape", [(17, 23), (6, 9, 11)])
def test_boundaries_equal_find_boundaries_inner(shape):
    rng = np.random.default_rng(1)
    labels = ndi.zoom(rng.integers(0, 6, size=tuple(max(s // 3, 2) for s in shape)), 3, order=0)[
        tuple(slice(s) for s in shape)]
    np.testing.assert_array_equal(boundaries(labels), find_boundaries(labels, mode="inner"))


def test_membrane_is_the_inner_four_neighbour_boundary():
    cells = two_cells()
    expected = np.zeros(cells.shape, dtype=bool)
    expected[1, :] = expected[8, :] = True  # rows beside the background margin
    expected[1:9, 5:7] = True  # the two columns where cells 1 and 2 meet
    # the image border (columns 0 and 11) is not a membrane; corners need a 4-neighbour
    np.testing.assert_array_equal(boundaries(cells), expected)


# ----------------------------------------------------------------------------- hand-drawn cases


def test_nucleus_inside_its_cell_is_kept_whole():
    cells = two_cells()
    nuclei = box(cells.shape, (1, 3, 6, 1, 4), (2, 3, 6, 8, 11))
    cell, nucleus, cytoplasm, m = repair_masks(cells, nuclei)
    np.testing.assert_array_equal(cell, cells)
    np.testing.assert_array_equal(nucleus, nuclei)
    np.testing.assert_array_equal(cytoplasm, np.where(nuclei > 0, 0, cells))
    assert cell.dtype == nucleus.dtype == cytoplasm.dtype == np.uint8
    assert m == {"cells_in": 2, "nuclei_in": 2, "matched": 2, "matched_fraction": 1.0, "cells_unmatched": 0,
                 "nuclei_unmatched": 0, "nuclei_trimmed": 0, "nucleus_trimmed_fraction": 0.0}


def test_nucleus_crossing_two_cells_goes_to_the_first_cell_trimmed():
    cells = two_cells()
    # 3 x 6 nucleus over columns 3-8: columns 3-4 in cell 1's interior, 5-6 on the membranes,
    # 7-8 in cell 2's interior.  Cell 1 comes first and accepts it (mismatch 12/18 < 1).
    nuclei = box(cells.shape, (7, 3, 6, 3, 9))
    cell, nucleus, cytoplasm, m = repair_masks(cells, nuclei)
    np.testing.assert_array_equal(cell, np.where(cells == 1, 1, 0))
    np.testing.assert_array_equal(nucleus, box(cells.shape, (1, 3, 6, 3, 5)))
    np.testing.assert_array_equal(cytoplasm, cell - nucleus)
    assert m["matched"] == 1 and m["cells_unmatched"] == 1 and m["nuclei_unmatched"] == 0
    assert m["matched_fraction"] == 1 / (2 + 1 - 1)
    assert m["nuclei_trimmed"] == 1 and m["nucleus_trimmed_fraction"] == pytest.approx(12 / 18)


def test_lowest_mismatch_wins_and_a_taken_nucleus_is_unavailable():
    cells = two_cells()
    # nucleus 5 (2 x 6 = 12 px): 2 px in cell 1's interior, 4 on the membranes, 6 in cell 2's
    # interior; nucleus 9: inside cell 1 (mismatch 0).  Cell 1 prefers 9 to 5 (10/12); cell 2
    # then gets 5 (6/12), trimmed to its 6 interior pixels.
    nuclei = box(cells.shape, (5, 3, 5, 4, 10), (9, 6, 8, 1, 3))
    cell, nucleus, _, m = repair_masks(cells, nuclei)
    np.testing.assert_array_equal(cell, cells)
    np.testing.assert_array_equal(nucleus, box(cells.shape, (1, 6, 8, 1, 3), (2, 3, 5, 7, 10)))
    assert m["matched"] == 2 and m["nuclei_trimmed"] == 1
    assert m["nucleus_trimmed_fraction"] == pytest.approx(6 / (4 + 12))

    # without nucleus 9, cell 1 (visited first) takes 5 although cell 2 overlaps it more
    cell, nucleus, _, m = repair_masks(cells, np.where(nuclei == 9, 0, nuclei))
    np.testing.assert_array_equal(cell, np.where(cells == 1, 1, 0))
    np.testing.assert_array_equal(nucleus, box(cells.shape, (1, 3, 5, 4, 5)))
    assert m["matched"] == 1 and m["cells_unmatched"] == 1


def test_later_cell_falls_back_to_its_next_candidate_when_its_best_is_taken():
    cells = two_cells()
    # nucleus 1 as above (cell 1: mismatch 10/12, cell 2: 6/12); nucleus 2 in cell 2 with 2 of 6 px
    # inside (row 7), 2 on the membrane (row 8), 2 in the background (row 9): mismatch 4/6.
    nuclei = box(cells.shape, (1, 3, 5, 4, 10), (2, 7, 10, 8, 10))
    alone = repair_masks(np.where(cells == 2, 2, 0), nuclei)[1]
    np.testing.assert_array_equal(alone, box(cells.shape, (1, 3, 5, 7, 10)))  # cell 2 alone prefers 1
    # with cell 1 present, cell 1 takes nucleus 1 and cell 2 falls back to nucleus 2
    cell, nucleus, _, m = repair_masks(cells, nuclei)
    np.testing.assert_array_equal(cell, cells)
    np.testing.assert_array_equal(nucleus, box(cells.shape, (1, 3, 5, 4, 5), (2, 7, 8, 8, 10)))
    assert m["matched"] == 2 and m["nuclei_trimmed"] == 2


def test_ties_go_to_the_smaller_nucleus_id():
    cells = two_cells()
    # two nuclei inside cell 1's interior: mismatch 0 both
    _, nucleus, _, _ = repair_masks(cells, box(cells.shape, (3, 2, 4, 1, 4), (4, 5, 7, 1, 4)))
    np.testing.assert_array_equal(nucleus, box(cells.shape, (1, 2, 4, 1, 4)))
    _, nucleus, _, _ = repair_masks(cells, box(cells.shape, (4, 2, 4, 1, 4), (3, 5, 7, 1, 4)))
    np.testing.assert_array_equal(nucleus, box(cells.shape, (1, 5, 7, 1, 4)))
    # equal non-zero mismatches: 2 of 6 pixels on the membrane each (rows 1 and 8)
    _, nucleus, _, _ = repair_masks(cells, box(cells.shape, (8, 1, 4, 1, 3), (6, 6, 9, 1, 3)))
    np.testing.assert_array_equal(nucleus, box(cells.shape, (1, 6, 8, 1, 3)))


def test_gaps_and_huge_ids_change_nothing():
    cells = two_cells()
    nuclei = box(cells.shape, (5, 3, 5, 4, 10), (9, 6, 8, 1, 3))
    expected = repair_masks(cells, nuclei)
    for c, n in ((np.where(cells == 2, 70000, cells * 40), nuclei * 1000),
                 (cells.astype(np.uint64) * np.uint64(2**40), nuclei.astype(np.int64) + (nuclei > 0) * 2**50)):
        got = repair_masks(c, n)
        for a, b in zip(expected[:3], got[:3]):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        assert got[3] == expected[3]


def test_cell_without_nucleus_and_stray_nucleus_are_dropped():
    cells = box((10, 12), (4, 1, 9, 0, 6), (6, 1, 9, 6, 12))
    nuclei = box(cells.shape, (2, 3, 6, 1, 4), (3, 0, 1, 0, 12))  # 3: in the background margin
    cell, nucleus, cytoplasm, m = repair_masks(cells, nuclei)
    np.testing.assert_array_equal(cell, np.where(cells == 4, 1, 0))
    np.testing.assert_array_equal(nucleus, box(cells.shape, (1, 3, 6, 1, 4)))
    assert m["matched"] == 1 and m["cells_unmatched"] == 1 and m["nuclei_unmatched"] == 1
    assert m["matched_fraction"] == 1 / 3


def test_nucleus_only_on_the_membrane_is_rejected():
    cells = two_cells()
    # nucleus 1: the column of cell 1's membrane next to cell 2 (mismatch 1); nucleus 2 covers
    # cell 2's membrane row and the background above it
    nuclei = box(cells.shape, (1, 2, 8, 5, 6), (2, 0, 2, 7, 11))
    cell, nucleus, cytoplasm, m = repair_masks(cells, nuclei)
    assert not cell.any() and not nucleus.any() and not cytoplasm.any()
    assert m["matched"] == 0 and m["matched_fraction"] == 0.0 and m["nucleus_trimmed_fraction"] == 0.0


def test_empty_images():
    z = np.zeros((5, 7), dtype=np.uint16)
    cell, nucleus, cytoplasm, m = repair_masks(z, z)
    assert cell.shape == (5, 7) and cell.dtype == np.uint8 and not cell.any()
    assert m["cells_in"] == m["nuclei_in"] == m["matched"] == 0


@pytest.mark.parametrize("cells, nuclei, message", [
    (np.zeros((4, 5), int), np.zeros((4, 6), int), "shape"),
    (np.zeros((4, 5), np.float32), np.zeros((4, 5), int), "dtype float32"),
    (np.zeros((4, 5), bool), np.zeros((4, 5), int), "dtype bool"),
    (np.zeros((4, 5), int), np.full((4, 5), -1), "negative"),
    (np.zeros(5, int), np.zeros(5, int), "1-D"),
])
def test_bad_inputs(cells, nuclei, message):
    with pytest.raises(InputError, match=message):
        repair_masks(cells, nuclei)


# ----------------------------------------------------------------------------- random tilings


def tiling(seed, shape=(96, 112), n_cells=45):
    """Voronoi cells with background gaps, disc nuclei (some off-centre, crossing borders, missing,
    or in the background), ids shuffled with gaps."""
    rng = np.random.default_rng(seed)
    seeds = np.stack([rng.integers(0, s, n_cells) for s in shape], axis=1)
    marker = np.zeros(shape, dtype=np.int64)
    marker[tuple(seeds.T)] = np.arange(1, n_cells + 1)
    dist, index = ndi.distance_transform_edt(marker == 0, return_indices=True)
    cells = marker[tuple(index)]
    cells[dist > rng.uniform(5, 9)] = 0
    yy, xx = np.indices(shape)
    nuclei = np.zeros(shape, dtype=np.int64)
    centres = [c + rng.normal(0, 2.5, 2) for c in seeds if rng.random() < 0.85]
    centres += [rng.uniform(0, shape) for _ in range(6)]
    for j, (cy, cx) in enumerate(centres, start=1):
        nuclei[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(0.8, 5.5) ** 2] = j
    return shuffle_ids(cells, rng), shuffle_ids(nuclei, rng)


def shuffle_ids(labels, rng):
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(labels.max() + 1, dtype=np.int64)
    lut[ids] = rng.choice(np.arange(1, 20 * ids.size + 2), size=ids.size, replace=False)
    return lut[labels].astype(rng.choice([np.uint16, np.int32, np.uint32, np.int64]))


@pytest.mark.parametrize("seed", range(8))
def test_equals_the_reference_matcher_on_random_tilings(seed):
    cells, nuclei = tiling(seed)
    got = repair_masks(cells, nuclei)
    ref = reference_repair(cells, nuclei)
    for g, r in zip(got[:3], ref[:3]):
        assert g.dtype == r.dtype
        np.testing.assert_array_equal(g, r)
    m = got[3]
    assert m["matched"] == len(ref[3]) and m["cells_in"] == len(np.unique(cells)) - 1
    assert 0 < m["matched"] < m["cells_in"] and m["nuclei_trimmed"] > 0  # the tiling exercises repair


@pytest.mark.parametrize("progress", [0.0, 2.0])
def test_vectorised_rounds_and_one_by_one_agree_with_the_reference(monkeypatch, progress):
    """0.0: rounds until every cell is settled; 2.0: one round, then one cell at a time."""
    monkeypatch.setattr(repair_module, "_MIN_ROUND_PROGRESS", progress)
    for seed in (11, 12):
        cells, nuclei = tiling(seed, n_cells=60)
        for g, r in zip(repair_masks(cells, nuclei)[:3], reference_repair(cells, nuclei)[:3]):
            np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("band_pixels", [1, 250, 1000])
def test_band_by_band_equals_the_reference(monkeypatch, band_pixels):
    """Bands of 1, 2 and 8 rows: membranes across band edges, pairs counted in several bands."""
    monkeypatch.setattr(repair_module, "BAND_PIXELS", band_pixels)
    for seed in (21, 22):
        cells, nuclei = tiling(seed)
        for g, r in zip(repair_masks(cells, nuclei)[:3], reference_repair(cells, nuclei)[:3]):
            np.testing.assert_array_equal(g, r)


def test_3d_labels_equal_the_reference(monkeypatch):
    """Face neighbours in 3-D, planes as bands."""
    monkeypatch.setattr(repair_module, "BAND_PIXELS", 1)
    rng = np.random.default_rng(4)
    cells = ndi.zoom(rng.integers(0, 12, size=(4, 5, 5)), 4, order=0)[:14, :18, :17]
    nuclei = ndi.zoom(rng.integers(0, 30, size=(7, 9, 9)), 2, order=0)[:14, :18, :17] * (rng.random((14, 18, 17)) < 0.9)
    got, ref = repair_masks(cells, nuclei), reference_repair(cells, nuclei)
    assert got[3]["matched"] > 3
    for g, r in zip(got[:3], ref[:3]):
        np.testing.assert_array_equal(g, r)


def sequential_greedy(prefs, n_cells):
    taken, match = set(), {}
    for c in range(1, n_cells + 1):
        for n in prefs.get(c, []):
            if n not in taken:
                taken.add(n)
                match[c] = n
                break
    return match


@pytest.mark.parametrize("progress", [0.0, 0.125, 2.0])
def test_greedy_pass_equals_sequential_on_contested_preference_lists(monkeypatch, progress):
    monkeypatch.setattr(repair_module, "_MIN_ROUND_PROGRESS", progress)
    rng = np.random.default_rng(5)
    for n_cells, n_nuclei in ((40, 15), (60, 60), (30, 90)):
        prefs = {c: list(rng.choice(np.arange(1, n_nuclei + 1), size=rng.integers(0, 5), replace=False))
                 for c in range(1, n_cells + 1)}
        pc = np.array([c for c, ns in prefs.items() for _ in ns], dtype=np.int64)
        pn = np.array([n for ns in prefs.values() for n in ns], dtype=np.int64)
        match = repair_module._greedy_match(pc, pn, n_cells, n_nuclei)
        expected = np.zeros(n_cells + 1, dtype=np.int64)
        for c, n in sequential_greedy(prefs, n_cells).items():
            expected[c] = n
        np.testing.assert_array_equal(match, expected)
    # a chain: cell c wants c+1 then c; every cell depends on the one before it
    n = 50
    pc = np.repeat(np.arange(1, n + 1), 2)
    pn = np.stack([np.arange(2, n + 2), np.arange(1, n + 1)], axis=1).ravel()
    np.testing.assert_array_equal(repair_module._greedy_match(pc, pn, n, n + 1)[1:], np.arange(2, n + 2))


@pytest.mark.parametrize("seed", range(4))
def test_properties_on_random_tilings(seed):
    cells, nuclei = tiling(100 + seed)
    cell, nucleus, cytoplasm, m = repair_masks(cells, nuclei)
    k = m["matched"]
    assert set(np.unique(cell)) == set(range(k + 1)) == set(np.unique(nucleus))
    assert cell.dtype == np.min_scalar_type(k)
    inner = nucleus != 0
    assert np.all(cell[inner] == nucleus[inner])  # nucleus k lies in cell k ...
    assert not boundaries(cell)[inner].any()  # ... in its interior
    np.testing.assert_array_equal(cytoplasm, np.where(inner, 0, cell))
    # every output cell is an input cell, whole
    for kk in range(1, k + 1):
        assert len(np.unique(cells[cell == kk])) == 1
        assert np.count_nonzero(cells == cells[cell == kk][0]) == np.count_nonzero(cell == kk)
    again = repair_masks(cell, nucleus)
    for a, b in zip((cell, nucleus, cytoplasm), again[:3]):
        np.testing.assert_array_equal(a, b)
    assert again[3]["matched"] == k and again[3]["nuclei_trimmed"] == 0


def same_up_to_relabelling(a, b):
    """One-to-one correspondence of ids (0 with 0); returns the map a-id -> b-id."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]
    mapping = dict(zip(pairs[0].tolist(), pairs[1].tolist()))
    assert mapping.get(0, 0) == 0
    return mapping


def test_invariant_to_label_permutation_without_competition():
    """With every nucleus a candidate of one cell only, the order of ids does not matter."""
    rng = np.random.default_rng(3)
    cells, _ = tiling(7)
    depth = ndi.distance_transform_edt(~boundaries(cells) & (cells != 0))
    nuclei = np.where(depth > rng.uniform(1, 3, size=cells.shape), cells, 0)  # eroded cells, ragged
    nuclei[rng.random(cells.shape) < 0.02] = 0
    nuclei = np.where(np.isin(nuclei, np.unique(cells)[::3]), 0, nuclei)  # some cells lose their nucleus
    base = repair_masks(cells, nuclei)
    for _ in range(3):
        permuted = repair_masks(shuffle_ids(cells, rng), shuffle_ids(nuclei, rng))
        cell_map = same_up_to_relabelling(base[0], permuted[0])
        assert same_up_to_relabelling(base[1], permuted[1]) == {k: cell_map[k] for k in np.unique(base[1]).tolist()}
        same_up_to_relabelling(base[2], permuted[2])
        assert {k: v for k, v in base[3].items()} == permuted[3]


def test_no_nucleus_at_all_over_several_bands_gives_no_cells(monkeypatch):
    """All-zero nuclei (a wrong nuclear channel, say) on an image of several bands: no cell
    pairs, nothing is kept, and the metrics say so (it used to end in an IndexError)."""
    from maskworks.codex import repair

    monkeypatch.setattr(repair, "BAND_PIXELS", 64 * 16)
    cells = np.zeros((64, 64), np.uint16)
    cells[4:20, 4:20], cells[30:60, 10:40] = 1, 2
    cell, nucleus, cytoplasm, metrics = repair.repair_masks(cells, np.zeros_like(cells))
    assert not cell.any() and not nucleus.any() and not cytoplasm.any()
    assert metrics["matched"] == 0 and metrics["cells_unmatched"] == 2 and metrics["nuclei_in"] == 0
