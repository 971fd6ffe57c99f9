"""quantify on label images small enough to check by hand: intensities per compartment,
morphology, the neighbour graph, invariances, and the AnnData that scanpy/squidpy read."""

from __future__ import annotations

import numpy as np
import pytest

from maskworks.codex.quantify import intensity_statistics, quantify_cells, spatial_neighbours
from maskworks.io import InputError


def two_cells():
    """Cell 1: a 3x3 square with a 1-pixel nucleus in its middle; cell 5: a 2x4 bar, no nucleus."""
    cell = np.zeros((6, 8), np.uint16)
    cell[1:4, 1:4] = 1
    cell[4:6, 4:8] = 5
    nucleus = np.zeros_like(cell)
    nucleus[2, 2] = 1
    marker = np.arange(48, dtype=np.uint16).reshape(6, 8)  # value = 8 y + x
    return cell, nucleus, marker


def test_known_sums_means_and_compartments():
    cell, nucleus, marker = two_cells()
    markers, meta, _, st = quantify_cells(cell, nucleus, [("M", marker)], statistics=["sum", "std", "median"],
                                          neighbours="none")
    np.testing.assert_array_equal(markers["cell_id"], [1, 5])
    square = marker[1:4, 1:4]  # 9 10 11 / 17 18 19 / 25 26 27: sum 162, mean 18
    bar = marker[4:6, 4:8]
    assert markers["M"][0] == pytest.approx(18.0) and markers["M"][1] == pytest.approx(bar.mean())
    assert meta["M_cell_sum"][0] == 162 and meta["M_cell_median"][0] == 18
    assert meta["M_cell_std"][0] == pytest.approx(square.std())
    assert meta["M_nucleus_mean"][0] == 18 and np.isnan(meta["M_nucleus_mean"][1])  # cell 5 has none
    # cytoplasm = cell - nucleus: the eight border pixels of the square, sum 162 - 18
    assert meta["M_cytoplasm_sum"][0] == 144 and meta["M_cytoplasm_mean"][0] == pytest.approx(18.0)
    assert meta["area"].tolist() == [9, 8] and meta["nucleus_area"].tolist() == [1, 0]
    assert meta["centroid_y"].tolist() == [2.0, 4.5] and meta["centroid_x"].tolist() == [2.0, 5.5]
    assert meta["has_nucleus"].tolist() == [True, False] and st["cells_without_nucleus"] == 1
    assert meta["nucleus_cell_area_ratio"][0] == pytest.approx(1 / 9)
    assert meta["solidity"][0] == 1.0 and meta["extent"][1] == 1.0


def test_microns_from_the_pixel_size():
    cell, nucleus, marker = two_cells()
    _, meta, _, st = quantify_cells(cell, nucleus, [("M", marker)], image_mpp=0.5, neighbours="none")
    assert meta["area_um2"].tolist() == [2.25, 2.0] and meta["centroid_x_um"].tolist() == [1.0, 2.75]
    assert st["spatial_unit"] == "micrometer"


def test_ids_permuted_and_non_consecutive_give_the_same_rows():
    rng = np.random.default_rng(3)
    cell = np.repeat(np.repeat(rng.integers(0, 6, (8, 8)), 4, axis=0), 4, axis=1).astype(np.int32)
    nucleus = np.where((np.arange(32)[:, None] % 4 == 1) & (np.arange(32)[None] % 4 == 1), cell, 0)
    marker = rng.integers(0, 1000, cell.shape).astype(np.uint16)
    m1, meta1, _, _ = quantify_cells(cell, nucleus, [("A", marker)], statistics=["std"], neighbours="none")
    perm = np.array([0, 901, 17, 4, 33, 250])  # non-consecutive ids, another order
    m2, meta2, _, _ = quantify_cells(perm[cell], perm[nucleus], [("A", marker)], statistics=["std"],
                                     neighbours="none")
    order = np.argsort(perm[m1["cell_id"]])
    np.testing.assert_array_equal(m2["cell_id"], perm[m1["cell_id"]][order])
    for key in ("A",):
        np.testing.assert_allclose(m2[key], m1[key][order])
    for key in ("area", "perimeter", "A_nucleus_mean", "A_cytoplasm_std", "centroid_x"):
        np.testing.assert_allclose(meta2[key], meta1[key][order])


def test_block_wise_sums_equal_whole_plane():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 30, (50, 40))
    val = rng.random((50, 40)) * 100
    ids = np.unique(lab)[1:]
    whole = intensity_statistics(lab, val, ids, ("mean", "std", "sum"))
    from maskworks.codex import quantify

    blocky = quantify.compartment_sums(lab, val, ids, block_rows=7)
    np.testing.assert_allclose(blocky[1], whole["sum"])
    np.testing.assert_allclose(blocky[1] / blocky[0], whole["mean"])


def test_neighbour_graphs_are_symmetric_and_in_the_given_unit():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [50.0, 50.0]])
    conn, dist = spatial_neighbours(xy, method="radius", radius=10.5)
    assert conn.nnz == 8 and (conn != conn.T).nnz == 0  # the four square sides, both ways
    assert dist[0, 1] == 10.0 and dist[0, 3] == 0 and conn[4].nnz == 0
    conn, dist = spatial_neighbours(xy, method="delaunay")
    assert (conn != conn.T).nnz == 0 and conn.diagonal().sum() == 0 and conn[4].nnz >= 2
    conn, _ = spatial_neighbours(xy, method="delaunay", radius=15.0)  # long edges dropped
    assert conn[4].nnz == 0
    with pytest.raises(InputError, match="neighbour_radius"):
        spatial_neighbours(xy, method="radius")


def test_bad_inputs_are_refused():
    cell, nucleus, marker = two_cells()
    with pytest.raises(InputError, match="statistics"):
        quantify_cells(cell, nucleus, [("M", marker)], statistics=["mode"])
    with pytest.raises(InputError, match="shape"):
        quantify_cells(cell, nucleus[:3], [("M", marker)])
    with pytest.raises(InputError, match="twice"):
        quantify_cells(cell, nucleus, [("M", marker), ("M", marker)])
    with pytest.raises(InputError, match="image_mpp"):
        quantify_cells(cell, nucleus, [("M", marker)], image_mpp=0)


def test_quantify_files_writes_tables_and_an_anndata_scanpy_reads(tmp_path):
    import anndata
    import pandas as pd
    import tifffile

    from maskworks.codex.stages import quantify_files

    cell, nucleus, marker = two_cells()
    image = np.stack([marker, (nucleus > 0).astype(np.uint16) * 1000])
    tifffile.imwrite(tmp_path / "img.ome.tif", image, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["M", "NUC"]}})
    stitch = tmp_path / "stitch"
    stitch.mkdir()
    cyto = np.where(nucleus == 0, cell, 0)
    for name, lab in (("cell", cell), ("nucleus", nucleus), ("cytoplasm", cyto)):
        tifffile.imwrite(stitch / f"{name}.ome.tif", lab.astype(np.uint32), ome=True,
                         metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm",
                                   "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"})
    pd.DataFrame({"id": [1, 5], "patch_id": [0, 3]}).to_csv(stitch / "cells.csv", index=False)
    st = quantify_files(tmp_path / "img.ome.tif", None, stitch, tmp_path / "q")
    assert st["cells"] == 2 and st["markers"] == ["M", "NUC"] and st["image_mpp"] == 0.5
    by_marker = pd.read_csv(tmp_path / "q" / "cell_by_marker.csv")
    assert list(by_marker.columns) == ["cell_id", "M", "NUC"] and by_marker["M"].tolist()[0] == 18
    meta = pd.read_csv(tmp_path / "q" / "cell_metadata.csv")
    assert meta["patch_id"].tolist() == [0, 3] and meta["NUC_nucleus_mean"][0] == 1000
    assert meta["NUC_cytoplasm_mean"][0] == 0
    adata = anndata.read_h5ad(tmp_path / "q" / "cells.h5ad")
    assert adata.shape == (2, 2) and list(adata.var_names) == ["M", "NUC"]
    assert list(adata.obs_names) == ["1", "5"] and adata.X[0, 0] == 18
    np.testing.assert_allclose(adata.obsm["spatial"], [[1.0, 1.0], [2.75, 2.25]])  # (x, y) in µm
    assert adata.obsp["spatial_connectivities"].shape == (2, 2) and adata.obsp["spatial_distances"][0, 1] > 0
    assert adata.uns["spatial_neighbors"]["connectivities_key"] == "spatial_connectivities"
    assert (tmp_path / "q" / "quantify_qc.png").stat().st_size > 1000


def test_shapes_equal_skimage_regionprops():
    from skimage.measure import regionprops_table

    from maskworks.codex.quantify import MORPHOLOGY, region_shapes

    rng = np.random.default_rng(5)
    lab = np.zeros((120, 150), np.int32)
    for k in range(1, 40):  # ellipses of every orientation, some cut by the border, ids sparse
        cy, cx = rng.uniform(-5, 125), rng.uniform(-5, 155)
        ry, rx, th = rng.uniform(2, 12), rng.uniform(1, 9), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[:120, :150]
        u, v = (yy - cy) * np.cos(th) + (xx - cx) * np.sin(th), -(yy - cy) * np.sin(th) + (xx - cx) * np.cos(th)
        lab[(u / ry) ** 2 + (v / rx) ** 2 <= 1] = 7 * k
    ids = np.unique(lab)[1:]
    ours = region_shapes(lab, ids)
    ref = regionprops_table(lab, properties=["label", "centroid", *MORPHOLOGY])
    np.testing.assert_array_equal(ref["label"], ids)
    np.testing.assert_allclose(ours["centroid_y"], ref["centroid-0"], rtol=1e-9)
    np.testing.assert_allclose(ours["centroid_x"], ref["centroid-1"], rtol=1e-9)
    for prop, name in MORPHOLOGY.items():
        if name != "orientation":
            np.testing.assert_allclose(ours[name], ref[prop], rtol=1e-7, atol=1e-9, err_msg=name)
    # orientation: an axis (defined modulo pi), undefined where the two axes are equal
    # (and at exactly 45 degrees skimage's own special case depends on rounding)
    defined = (ref["axis_major_length"] - ref["axis_minor_length"] > 1e-6) & (np.abs(np.cos(2 * ref["orientation"])) > 1e-6)
    turn = np.angle(np.exp(2j * (ours["orientation"] - ref["orientation"])))
    np.testing.assert_allclose(turn[defined], 0, atol=1e-7)


def test_repair_flags_follow_each_object_to_its_original():
    from maskworks.codex.quantify import repair_flags

    cell_original = np.zeros((8, 12), np.uint32)
    cell_original[1:7, 1:6] = 5   # 30 px
    cell_original[1:7, 6:11] = 9  # 30 px
    nucleus_original = np.zeros_like(cell_original)
    nucleus_original[2:5, 2:5] = 3    # 9 px, inside cell 5's interior
    nucleus_original[2:6, 5:9] = 7    # 16 px, 4 of them on cell 5: trimmed to 9's interior
    # repaired: renumbered (cell 9 -> 1, cell 5 -> 2), nucleus 7 trimmed to 9 px
    cell = np.where(cell_original == 9, 1, np.where(cell_original == 5, 2, 0)).astype(np.uint32)
    nucleus = np.zeros_like(cell)
    nucleus[2:5, 2:5] = 2
    nucleus[2:5, 6:9] = 1
    flags = repair_flags(cell, nucleus, cell_original, nucleus_original, [1, 2])
    assert flags["cell_area_before"].tolist() == [30, 30] and flags["cell_retained_fraction"].tolist() == [1, 1]
    assert flags["nucleus_area_before"].tolist() == [16, 9]
    np.testing.assert_allclose(flags["nucleus_retained_fraction"], [9 / 16, 1.0])
    assert flags["nucleus_was_trimmed"].tolist() == [True, False]


def test_perimeters_of_touching_labels_equal_regionprops_across_bands(monkeypatch):
    from skimage.measure import label, regionprops_table

    from maskworks.codex import quantify

    rng = np.random.default_rng(1)
    lab = label(rng.random((90, 77)) > 0.5, connectivity=1)  # thousands of touching, ragged labels
    lab[rng.random(lab.shape) > 0.9] = 0
    monkeypatch.setattr(quantify, "_BLOCK_PIXELS", 77 * 7)  # bands of 7 rows: many band seams
    got = quantify.label_perimeters(lab, int(lab.max()) + 1)
    ref = regionprops_table(lab, properties=["label", "perimeter"])
    np.testing.assert_allclose(got[ref["label"]], ref["perimeter"], rtol=1e-12, atol=1e-12)
