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


def test_repeated_channel_names_are_numbered_as_mcquant_numbers_them():
    from maskworks.codex.stages import mcquant_names

    assert mcquant_names(["DAPI", "CD3", "DAPI"]) == ["DAPI_1", "CD3", "DAPI_2"]
    assert mcquant_names(["DAPI", "Blank", "DAPI", "Blank", "DAPI", "CD8"]) == \
        ["DAPI_1", "Blank_1", "DAPI_2", "Blank_2", "DAPI_3", "CD8"]
    assert mcquant_names(["CD3", "CD8"]) == ["CD3", "CD8"]
    with pytest.raises(InputError, match="DAPI_1"):  # numbering would make a second DAPI_1
        mcquant_names(["DAPI", "DAPI", "DAPI_1"])
    with pytest.raises(InputError, match="Area"):  # a morphology column of mcquant's tables
        mcquant_names(["DAPI", "Area"])


def ellipse_slide():
    """Cells 3, 8, 12: ellipses at three orientations; cells 3 and 12 hold a concentric nucleus,
    cell 8 none.  Channels DAPI (1000 on the nuclei), CD3, DAPI again (random counts)."""
    yy, xx = np.mgrid[:40, :60]
    cell, nucleus = np.zeros((40, 60), np.uint32), np.zeros((40, 60), np.uint32)
    for k, (cy, cx, ry, rx, th, nuc) in {3: (10, 12, 8, 5, 0.3, True), 8: (28, 30, 7, 4, 1.1, False),
                                         12: (12, 46, 9, 5, -0.7, True)}.items():
        u = (yy - cy) * np.cos(th) + (xx - cx) * np.sin(th)
        v = -(yy - cy) * np.sin(th) + (xx - cx) * np.cos(th)
        cell[(u / ry) ** 2 + (v / rx) ** 2 <= 1] = k
        if nuc:
            nucleus[(u / (ry - 4)) ** 2 + (v / (rx - 2)) ** 2 <= 1] = k
    rng = np.random.default_rng(3)
    image = np.stack([(nucleus > 0) * 1000, rng.integers(0, 500, cell.shape), rng.integers(0, 50, cell.shape)])
    return cell, nucleus, image.astype(np.uint16)


def _write_slide(tmp_path, cell, nucleus, image, names):
    import tifffile

    tifffile.imwrite(tmp_path / "slide 7.ome.tif", image, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": names}})
    stitch = tmp_path / "stitch"
    stitch.mkdir()
    for name, lab in (("cell", cell), ("nucleus", nucleus), ("cytoplasm", np.where(nucleus == 0, cell, 0))):
        tifffile.imwrite(stitch / f"{name}.ome.tif", lab.astype(np.uint32), ome=True,
                         metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm",
                                   "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"})
    return tmp_path / "slide 7.ome.tif", stitch


MCQUANT_COLUMNS = ["X_centroid", "Y_centroid", "Area", "MajorAxisLength", "MinorAxisLength", "Eccentricity",
                   "Solidity", "Extent", "Orientation"]
REGIONPROPS = ["centroid-1", "centroid-0", "area", "axis_major_length", "axis_minor_length", "eccentricity",
               "solidity", "extent", "orientation"]


def test_mcquant_tables_have_mcquants_columns_and_regionprops_values(tmp_path, monkeypatch):
    import anndata
    import pandas as pd
    from skimage.measure import regionprops_table

    from maskworks.codex import stages

    cell, nucleus, image = ellipse_slide()
    path, stitch = _write_slide(tmp_path, cell, nucleus, image, ["DAPI", "CD3", "DAPI"])
    monkeypatch.setattr(stages, "HIRES_PIXELS", 30)  # a 60-px wide slide: the picture is every 2nd pixel
    st = stages.quantify_files(path, None, stitch, tmp_path / "q", sample="S1", nuclear_channel="DAPI")
    assert st["markers"] == ["DAPI_1", "CD3", "DAPI_2"] and st["channel_names"] == ["DAPI", "CD3", "DAPI"]
    q = tmp_path / "q"
    tables = {comp: pd.read_csv(q / name) for comp, name in stages.mcquant_tables("S1").items()}
    assert sorted(p.name for p in q.glob("*.csv")) == ["S1--maskworks_cell.csv", "S1--maskworks_nuclei.csv",
                                                       "cell_by_marker.csv", "cell_metadata.csv"]
    for name in stages.mcquant_tables("S1").values():  # how spatialdata-io's MCMICRO reader splits the name
        stem = name[:-4]
        assert stem.split("--")[0] == "S1" and stem.split("_")[-1] in ("cell", "nuclei")
    for comp, lab in (("cell", cell), ("nucleus", nucleus)):
        table = tables[comp]
        assert list(table.columns) == ["CellID", "DAPI_1", "CD3", "DAPI_2", *MCQUANT_COLUMNS]
        # what mcquant computes: regionprops of the mask (radians), intensity_mean of every channel
        ref = regionprops_table(lab.astype(np.int32), properties=["label", "centroid", *REGIONPROPS[2:]])
        assert table["CellID"].tolist() == ref["label"].tolist() == ([3, 8, 12] if comp == "cell" else [3, 12])
        for ours, theirs in zip(MCQUANT_COLUMNS, REGIONPROPS):
            np.testing.assert_allclose(table[ours], ref[theirs], rtol=1e-9, atol=1e-12, err_msg=f"{comp} {ours}")
        for c, marker in enumerate(["DAPI_1", "CD3", "DAPI_2"]):
            mean = regionprops_table(lab.astype(np.int32), image[c], properties=["intensity_mean"])["intensity_mean"]
            np.testing.assert_allclose(table[marker], mean, rtol=1e-12, err_msg=f"{comp} {marker}")
    # the same numbers as Aegle's tables
    by_marker = pd.read_csv(q / "cell_by_marker.csv")
    meta = pd.read_csv(q / "cell_metadata.csv")
    assert list(by_marker.columns) == ["cell_id", "DAPI_1", "CD3", "DAPI_2"]
    np.testing.assert_allclose(tables["cell"]["CD3"], by_marker["CD3"], rtol=1e-5)
    np.testing.assert_allclose(tables["nucleus"]["DAPI_2"], meta["DAPI_2_nucleus_mean"].dropna(), rtol=1e-5)
    np.testing.assert_allclose(tables["nucleus"]["Area"], meta["nucleus_area"][meta["has_nucleus"]])
    assert tables["nucleus"]["DAPI_1"].tolist() == [1000, 1000]
    assert meta.columns[:2].tolist() == ["cell_id", "sample"] and meta["sample"].tolist() == ["S1"] * 3
    # AnnData: the panel, the sample, squidpy's image and scale factors
    adata = anndata.read_h5ad(q / "cells.h5ad")
    assert adata.var_names.tolist() == ["DAPI_1", "CD3", "DAPI_2"]
    assert adata.var["original_name"].tolist() == ["DAPI", "CD3", "DAPI"]
    assert adata.var["channel"].tolist() == [0, 1, 2]
    assert adata.obs["sample"].dtype == "category" and adata.obs["sample"].tolist() == ["S1"] * 3
    spatial = adata.uns["spatial"]
    assert list(spatial) == ["S1"]
    hires, scalef = spatial["S1"]["images"]["hires"], spatial["S1"]["scalefactors"]
    assert hires.shape == (20, 30, 3) and hires.dtype == np.uint8
    assert scalef["tissue_hires_scalef"] == pytest.approx(1 / (2 * 0.5))  # µm -> every 2nd pixel
    areas = np.bincount(cell.ravel())[[3, 8, 12]]
    assert scalef["spot_diameter_fullres"] == pytest.approx(2 * np.sqrt(np.median(areas) / np.pi) * 0.5)
    # each cell drawn where squidpy puts it: obsm["spatial"] (µm) x scale factor on the picture
    xy = np.rint(adata.obsm["spatial"] * scalef["tissue_hires_scalef"]).astype(int)
    assert hires[xy[:, 1], xy[:, 0], 0].tolist() == [255, 0, 255]  # nuclei of cells 3 and 12, no nucleus in 8
    np.testing.assert_array_equal(hires[..., 0], np.where(nucleus[::2, ::2] > 0, 255, 0))


def test_sample_defaults_to_the_image_name_as_mcquant_names_it(tmp_path):
    from maskworks.codex.stages import quantify_files

    cell, nucleus, image = ellipse_slide()
    path, stitch = _write_slide(tmp_path, cell, nucleus, image, ["DAPI", "CD3", "CD8"])
    (tmp_path / "ok.ome.tif").write_bytes(path.read_bytes())
    st = quantify_files(tmp_path / "ok.ome.tif", None, stitch, tmp_path / "q", neighbours="none")
    assert st["sample"] == "ok" and (tmp_path / "q" / "ok--maskworks_nuclei.csv").is_file()
    with pytest.raises(InputError, match="slide 7"):  # a space: not a file name part; --sample fixes it
        quantify_files(path, None, stitch, tmp_path / "q2")
    assert not (tmp_path / "q2").exists()


class _LazyRows:
    """A label image or plane that only slices (like a Zarr array): no ``__array__``; records the
    most rows any read asked for."""

    def __init__(self, data):
        self._data, self.shape, self.dtype, self.most_rows = data, data.shape, data.dtype, 0

    def __getitem__(self, index):
        out = self._data[index]
        self.most_rows = max(self.most_rows, out.shape[0] if out.ndim else 0)
        return out


def _label_zoo():
    """Random blobs, 1-px lines (straight and diagonal), single pixels, a ring, labels cut by
    every border and a label in several pieces; sparse ids."""
    from scipy import ndimage
    from skimage.measure import label

    rng = np.random.default_rng(7)
    lab = label(ndimage.gaussian_filter(rng.random((130, 170)), 2.5) > 0.52).astype(np.int32) * 3
    lab[5, 20:60] = 1001                       # horizontal line
    lab[20:70, 100] = 1002                     # vertical line
    idx = np.arange(40)
    lab[80 + idx, 10 + idx] = 1003             # diagonal line
    lab[80 + idx, 90 - idx // 3] = 1004        # steep staircase
    lab[[2, 60, 128], [165, 3, 80]] = [1005, 1006, 1007]  # single pixels, two on the border
    yy, xx = np.mgrid[:130, :170]
    lab[(np.hypot(yy - 100, xx - 140) < 12) & (np.hypot(yy - 100, xx - 140) > 8)] = 1008  # a ring
    lab[0, :] = 1009                           # the whole top row
    lab[:, -1] = 1010                          # the whole right column
    lab[[40, 41, 90, 120], [5, 6, 160, 40]] = 1011  # one id in four pieces
    return lab


def test_convex_area_bbox_and_solidity_equal_skimage_exactly(monkeypatch):
    from skimage.measure import regionprops_table

    from maskworks.codex import quantify

    lab = _label_zoo()
    ids = np.unique(lab)[1:]
    ref = regionprops_table(lab, properties=["label", "area_convex", "solidity", "extent", "bbox"])
    np.testing.assert_array_equal(ref["label"], ids)
    # one block, and blocks of a few rows: hull chains merged across seams; with hull points held a few
    # labels at a time (the chunks of a large slide's hulls)
    for memory_mb, points in ((None, quantify._HULL_POINTS), (0.05, quantify._HULL_POINTS), (None, 7)):
        monkeypatch.setattr(quantify, "_HULL_POINTS", points)
        for lazy in (False, True):
            ours = quantify.region_shapes(_LazyRows(lab) if lazy else lab, ids, memory_mb=memory_mb)
            np.testing.assert_array_equal(ours["convex_area"], ref["area_convex"])
            np.testing.assert_allclose(ours["solidity"], ref["solidity"], rtol=1e-12)
            np.testing.assert_allclose(ours["extent"], ref["extent"], rtol=1e-12)
    # ids without pixels: area 0, NaN shape
    ours = quantify.region_shapes(lab, np.r_[ids, 5000])
    assert ours["area"][-1] == 0 and np.isnan(ours["convex_area"][-1]) and np.isnan(ours["extent"][-1])


def test_orientation_follows_skimage_sign_convention():
    from scipy import ndimage
    from skimage.measure import regionprops_table
    from skimage.segmentation import watershed

    from maskworks.codex.quantify import region_shapes

    rng = np.random.default_rng(0)
    seeds = np.zeros((300, 300), np.int32)
    pts = rng.integers(0, 300, (700, 2))
    seeds[pts[:, 0], pts[:, 1]] = np.arange(1, 701)
    dist = ndimage.distance_transform_edt(seeds == 0)
    lab = watershed(dist, seeds, mask=dist < 7)  # touching near-round cells, some exactly symmetric
    lab[lab == 1] = 0
    lab[1:4, 1:4] = 1            # a square: equal diagonal moments, b = 0
    lab[10:12, 280:282] = 0
    lab[10, 280] = lab[11, 281] = 2000  # two diagonal pixels: a == c, b < 0
    lab[10, 281] = lab[11, 280] = 2001  # the other diagonal: a == c, b > 0
    ids = np.unique(lab)[1:]
    ours = region_shapes(lab, ids)["orientation"]
    ref = regionprops_table(lab, properties=["label", "orientation", "inertia_tensor"])
    np.testing.assert_array_equal(ref["label"], ids)
    branch = ref["inertia_tensor-0-0"] == ref["inertia_tensor-1-1"]
    assert branch.sum() >= 3
    np.testing.assert_array_equal(ours[branch], ref["orientation"][branch])
    np.testing.assert_array_equal(ours[np.isin(ids, [2000, 2001])], [np.pi / 4, -np.pi / 4])
    # a horizontal axis is +-pi/2 alike; skimage's sign there is the rounding of an exact 0 moment
    horizontal = np.isclose(np.abs(ref["orientation"]), np.pi / 2, atol=1e-9) & \
        np.isclose(np.abs(ours), np.pi / 2, atol=1e-9)
    np.testing.assert_allclose(ours[~horizontal], ref["orientation"][~horizontal], atol=1e-9)


def test_lazy_blocks_and_threads_give_the_in_memory_tables():
    rng = np.random.default_rng(4)
    cell = np.repeat(np.repeat(rng.integers(0, 40, (12, 10)), 5, axis=0), 6, axis=1).astype(np.uint16)
    cell[rng.random(cell.shape) > 0.9] = 0
    nucleus = np.where(rng.random(cell.shape) > 0.6, cell, 0).astype(np.uint16)
    nucleus[0:3, 0:4] = 77  # a nucleus id without a cell, partly over other cells
    planes = [("A", rng.integers(0, 4000, cell.shape).astype(np.uint16)), ("B", rng.random(cell.shape))]
    stats = ["sum", "std", "median"]
    m1, meta1, _, st1 = quantify_cells(cell, nucleus, planes, statistics=stats, neighbours="none")
    lazy = [_LazyRows(a) for a in (cell, nucleus, planes[0][1], planes[1][1])]
    m2, meta2, _, st2 = quantify_cells(lazy[0], lazy[1], [("A", lazy[2]), ("B", lazy[3])], statistics=stats,
                                       neighbours="none", threads=2, memory_mb=0.01)
    assert list(meta2) == list(meta1) and list(m2) == list(m1) and st1 == st2
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-12)
    for key in meta1:
        np.testing.assert_allclose(np.asarray(meta2[key], float), np.asarray(meta1[key], float), rtol=1e-9,
                                   atol=1e-12, err_msg=key)
    # these cells are scattered over every row, so median's blocks (holding their cells whole) are the
    # whole image; the rest reads blocks:
    assert lazy[0].most_rows == cell.shape[0]
    lazy = [_LazyRows(a) for a in (cell, nucleus, planes[0][1])]
    quantify_cells(lazy[0], lazy[1], [("A", lazy[2])], statistics=["std"], neighbours="none", memory_mb=0.01)
    assert 0 < max(x.most_rows for x in lazy) < cell.shape[0] // 4


def test_compartments_from_one_read_equal_one_pass_per_compartment():
    rng = np.random.default_rng(9)
    cell = rng.integers(0, 25, (40, 50)).astype(np.int32)
    nucleus = np.where(rng.random(cell.shape) > 0.5, rng.integers(0, 30, cell.shape), 0).astype(np.int32)
    plane = rng.random(cell.shape) * 1000
    stats = ("mean", "sum", "std")
    markers, meta, _, _ = quantify_cells(cell, nucleus, [("P", plane)], statistics=stats, neighbours="none")
    ids = markers["cell_id"]
    default_cyto = np.where(nucleus == 0, cell, 0)
    for comp, lab in (("cell", cell), ("nucleus", nucleus), ("cytoplasm", default_cyto)):
        ref = intensity_statistics(lab, plane, ids, stats)
        for stat in stats:
            got = markers["P"] if (comp, stat) == ("cell", "mean") else meta[f"P_{comp}_{stat}"]
            np.testing.assert_allclose(got, ref[stat], rtol=1e-10, atol=1e-9, err_msg=f"{comp} {stat}")
    # a cytoplasm image of its own (here: the nucleus ids) is measured as given
    _, meta2, _, _ = quantify_cells(cell, nucleus, [("P", plane)], cytoplasm=nucleus, neighbours="none")
    np.testing.assert_allclose(meta2["P_cytoplasm_mean"], meta["P_nucleus_mean"], rtol=1e-12)


def test_statistics_are_one_table_per_statistic_filled_in_place():
    rng = np.random.default_rng(5)
    cell = np.repeat(np.repeat(rng.integers(0, 30, (10, 10)), 4, axis=0), 4, axis=1).astype(np.int32)
    cell[cell == 7] = 1000  # a large id: the tables have a row per cell, not per label value
    nucleus = np.where(rng.random(cell.shape) > 0.5, cell, 0)
    planes = [(f"P{j}", rng.random(cell.shape) * 100) for j in range(3)]
    stats = ("mean", "sum", "std")
    markers, meta, _, _ = quantify_cells(cell, nucleus, planes, statistics=stats, neighbours="none")
    ids = markers["cell_id"]
    default_cyto = np.where(nucleus == 0, cell, 0)
    for name, plane in planes:
        for comp, lab in (("cell", cell), ("nucleus", nucleus), ("cytoplasm", default_cyto)):
            ref = intensity_statistics(lab, plane, ids, stats)
            for stat in stats:
                got = markers[name] if (comp, stat) == ("cell", "mean") else meta[f"{name}_{comp}_{stat}"]
                np.testing.assert_allclose(got, ref[stat], rtol=1e-12, err_msg=f"{name} {comp} {stat}")
    # every marker's column of a statistic is a view of the same table: the columns cost no copy
    assert markers["P0"].base is not None and markers["P0"].base is markers["P2"].base is meta["P1_nucleus_mean"].base
    assert meta["P0_cell_std"].base is meta["P2_cytoplasm_std"].base is not markers["P0"].base
    assert meta["P0_cell_sum"].base is meta["P1_nucleus_sum"].base is not markers["P0"].base


def test_placement_is_a_left_join_on_the_cell_ids(tmp_path):
    import pandas as pd

    from maskworks.codex.stages import _placement

    ids = np.array([2, 5, 9])
    pd.DataFrame({"id": [9, 2, 7], "patch_id": [4, 1, 0], "patches": ["3;4", "1", "0"], "cell_area": [1, 2, 3]}
                 ).to_csv(tmp_path / "cells.csv", index=False)
    cols = _placement(tmp_path / "cells.csv", ids)
    assert list(cols) == ["patch_id", "stitched_from"]
    np.testing.assert_array_equal(cols["patch_id"], [1, np.nan, 4])
    assert cols["stitched_from"][0] == "1" and cols["stitched_from"][2] == "3;4"
    pd.DataFrame({"id": [5, 2, 9], "patch_id": [4, 1, 0]}).to_csv(tmp_path / "cells.csv", index=False)
    assert _placement(tmp_path / "cells.csv", ids)["patch_id"].tolist() == [1, 4, 0]  # all found: still integers
    assert _placement(tmp_path / "none.csv", ids) == {}


def test_median_reads_blocks_that_hold_their_cells_whole():
    """Compact cells: the exact median (scipy.ndimage.median of each cell's pixels) from blocks of rows
    a little taller than the budget's, never whole planes."""
    from scipy import ndimage
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(12)
    seeds = np.zeros((240, 90), np.int32)
    seeds[rng.integers(0, 240, 150), rng.integers(0, 90, 150)] = np.arange(1, 151)
    cell = expand_labels(seeds, 6)
    nucleus = np.where(expand_labels(seeds, 2) == cell, cell, 0)
    plane = rng.integers(0, 1000, cell.shape).astype(np.uint16)
    lazy = [_LazyRows(a) for a in (cell, nucleus, plane)]
    markers, meta, _, _ = quantify_cells(lazy[0], lazy[1], [("P", lazy[2])], statistics=["median"],
                                         neighbours="none", memory_mb=0.05)
    ids = markers["cell_id"]
    cyto = np.where(nucleus == 0, cell, 0)
    for comp, lab in (("cell", cell), ("nucleus", nucleus), ("cytoplasm", cyto)):
        present = np.isin(ids, lab)
        want = np.where(present, ndimage.median(plane.astype(float), lab, index=ids), np.nan)
        np.testing.assert_array_equal(meta[f"P_{comp}_median"], want, err_msg=comp)
    assert 0 < max(x.most_rows for x in lazy) < cell.shape[0] // 4
