"""`maskworks tile-image`, `segment-cells` (watershed) and `stitch` on a small synthetic slide."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import zarr

from maskworks.cli import main
from maskworks.codex import segment
from maskworks.codex.stages import CELL_COLUMNS, PATCH_COLUMNS
from maskworks.demo import CODEX_SLIDE, make_codex_slide, write_demo_data
from maskworks.io import read_volume, slides

NAMES = list(CODEX_SLIDE["channels"])  # CD45, DAPI, Ki67, PanCK
SHAPE = (600, 800)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("slide")
    data = make_codex_slide(SHAPE, seed=1)
    image = d / "slide.ome.tif"
    tifffile.imwrite(image, data["image"], ome=True, compression="zlib",
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"})
    channels = d / "antibodies.tsv"
    channels.write_text("version\tchannel_id\tantibody_name\n" + "".join(f"1\tch{i}\t{n}\n" for i, n in enumerate(NAMES)))
    return d, image, channels, data


def _tile_args(image, channels, out, *extra):
    return ["tile-image", str(image), str(out), "--channels", str(channels), "--nuclear-channel", "DAPI",
            "--wholecell-channels", "CD45,PanCK", "--patch-height", "256", "--patch-width", "256",
            "--overlap", "0.1", *extra]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def chain(slide, tmp_path_factory):
    d, image, channels, data = slide
    out = tmp_path_factory.mktemp("chain")
    tiles, seg, rep, st = out / "tiles", out / "seg", out / "rep", out / "st"
    assert main(_tile_args(image, channels, tiles)) == 0
    assert main(["segment-cells", str(tiles), str(seg), "--backend", "watershed", "--batch-size", "3"]) == 0
    assert main(["repair-masks", "--segment-dir", str(seg), "--metadata", str(tiles / "patches_metadata.csv"),
                 "--out", str(rep)]) == 0
    assert main(["stitch", str(tiles), str(rep), str(st)]) == 0
    return tiles, seg, rep, st, data


def test_tile_image_writes_patches_table_stats_and_qc(chain):
    tiles, *_, data = chain
    assert sorted(p.name for p in tiles.iterdir()) == ["patches.zarr", "patches_metadata.csv", "tiling_qc.png",
                                                      "tiling_stats.json"]
    st = json.loads((tiles / "tiling_stats.json").read_text())
    # step 256 - 25 = 231; 3 rows cover 600 (718), 4 columns cover 800 (949)
    assert st["grid_shape"] == [3, 4] and st["step"] == [231, 231] and st["padding"] == [118, 149]
    assert st["image_mpp"] == 0.5 and st["nuclear_channel"] == "DAPI" and st["wholecell_channels"] == ["CD45", "PanCK"]
    root = zarr.open_group(str(tiles / "patches.zarr"), mode="r")
    arr = root["patches"]
    assert arr.shape == (12, 256, 256, 2) and arr.chunks == (1, 256, 256, 2) and arr.dtype == np.uint16
    img = data["image"]
    p5 = arr[5]  # row 1, col 1
    np.testing.assert_array_equal(p5[..., 0], img[1, 231:487, 231:487])
    np.testing.assert_array_equal(p5[..., 1], np.maximum(img[0], img[3])[231:487, 231:487])
    last = arr[11]
    assert not last[600 - 462:].any() and not last[:, 800 - 693:].any()  # zero padding
    rows = _rows(tiles / "patches_metadata.csv")
    assert list(rows[0]) == list(PATCH_COLUMNS) and len(rows) == 12
    # no tissue right of 70 % of the width; faint noise in the lower right corner
    assert [(r["is_empty"], r["is_noisy"], r["is_informative"]) for r in rows if r["col"] == "3"] == [
        ("True", "True", "False"), ("True", "True", "False"), ("False", "True", "False")]
    assert sum(r["is_informative"] == "True" for r in rows) == st["informative"] >= 6


def test_segment_cells_writes_one_npz_per_informative_patch(chain):
    tiles, seg, *_ = chain
    informative = [r["patch_id"] for r in _rows(tiles / "patches_metadata.csv") if r["is_informative"] == "True"]
    assert sorted(p.name for p in seg.glob("patch_*.npz")) == sorted(f"patch_{i}.npz" for i in informative)
    st = json.loads((seg / "segment_stats.json").read_text())
    assert st["backend"] == "watershed" and st["segmented"] == len(informative) and st["cells"] > 200
    assert (seg / "segment_qc.png").stat().st_size > 10_000
    with np.load(seg / f"patch_{informative[0]}.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["cell", "cell_boundary", "nucleus", "nucleus_boundary"]
        for key in ("cell", "nucleus"):
            lab = npz[key]
            assert lab.shape == (256, 256) and lab.dtype.kind == "u"
            assert st["per_patch"][informative[0]][f"{key}s" if key == "cell" else "nuclei"] == lab.max()
            b = npz[f"{key}_boundary"]
            assert b.dtype == np.uint8 and set(np.unique(b)) <= {0, 1}
            from skimage.segmentation import find_boundaries

            np.testing.assert_array_equal(b, find_boundaries(lab, mode="inner"))


def test_stitch_writes_whole_slide_labels_table_and_qc(chain):
    *_, st, data = chain
    cell, nucleus, cyto = (read_volume(st / f"{k}.ome.tif") for k in ("cell", "nucleus", "cytoplasm"))
    assert cell.shape == SHAPE and cell.dtype == np.uint32 and cell.voxel_size == (0.5, 0.5)
    assert cell.unit == "micrometer"
    c, n, y = cell.numpy(), nucleus.numpy(), cyto.numpy()
    k = int(c.max())
    np.testing.assert_array_equal(np.unique(c)[1:], np.arange(1, k + 1))
    assert (c[n > 0] == n[n > 0]).all()  # nucleus k inside cell k
    np.testing.assert_array_equal(y, np.where(n > 0, 0, c))
    rows = _rows(st / "cells.csv")
    assert list(rows[0]) == list(CELL_COLUMNS) and len(rows) == k
    assert [int(r["cell_area"]) for r in rows] == np.bincount(c.ravel())[1:].tolist()
    stats = json.loads((st / "stitch_stats.json").read_text())
    assert stats["cells"] == k == stats["repair"]["matched"] and stats["stitched"] == ["cell_original",
                                                                                       "nucleus_original"]
    cs = stats["cell_stitch"]
    assert cs["from_core"] + cs["rescued"] + cs["joined"] + cs["cut_single"] == stats["repair"]["cells_in"]
    assert stats["check"] == {"cells": k, "fragmented_cells": 0, "cells_without_nucleus": 0,
                              "nuclei_outside_cell": 0, "fragmented_nuclei": 0, "cytoplasm_mismatch": 0}
    # the unrepaired segmentation, stitched on its own
    for key, what in (("cell", "cells_in"), ("nucleus", "nuclei_in")):
        original = read_volume(st / f"{key}_original.ome.tif").numpy()
        assert original.shape == SHAPE and stats["repair"][what] == len(np.unique(original)) - 1
    assert stats["repair"]["cells_in"] >= k
    assert (st / "stitch_qc.png").stat().st_size > 10_000
    # against the truth: most true cells found once, none twice
    truth = data["cells"]
    m = (c > 0) & (truth > 0)
    top = int(truth.max()) + 1
    keys, inter = np.unique(c[m].astype(np.int64) * top + truth[m], return_counts=True)
    s, t = keys // top, keys % top
    iou = inter / (np.bincount(c.ravel())[s] + np.bincount(truth.ravel())[t] - inter)
    matched = t[iou > 0.5]
    assert matched.size >= 0.7 * truth.max() and np.unique(matched).size == matched.size


def test_stitch_to_zarr_equals_ome_tiff(chain, tmp_path):
    tiles, _, rep, st, _ = chain
    assert main(["stitch", str(tiles), str(rep), str(tmp_path), "--format", "zarr"]) == 0
    for k in ("cell", "nucleus", "cytoplasm", "cell_original", "nucleus_original"):
        z = read_volume(tmp_path / f"{k}.zarr")
        assert z.dtype == np.uint32 and z.voxel_size == (0.5, 0.5)
        np.testing.assert_array_equal(z.numpy(), read_volume(st / f"{k}.ome.tif").numpy())


def test_stitch_under_a_memory_budget_equals_in_memory(chain, tmp_path, caplog):
    """A budget below what the slide needs in memory: Zarr label stores and row bands, the same outputs."""
    tiles, _, rep, st, _ = chain
    assert main(["stitch", str(tiles), str(rep), str(tmp_path), "--memory-mb", "1"]) == 0
    assert "using bands of 16 rows" in caplog.text
    stats = json.loads((tmp_path / "stitch_stats.json").read_text())
    ref = json.loads((st / "stitch_stats.json").read_text())
    assert stats["memory"]["in_memory"] is False and stats["memory"]["band_rows"] == 16
    assert ref["memory"]["in_memory"] is True
    for k in ("cell_stitch", "nucleus_stitch", "repair", "check", "cells", "nucleus_fragments_removed"):
        assert stats[k] == ref[k], k
    for k in ("cell", "nucleus", "cytoplasm", "cell_original", "nucleus_original"):
        np.testing.assert_array_equal(read_volume(tmp_path / f"{k}.ome.tif").numpy(),
                                      read_volume(st / f"{k}.ome.tif").numpy())
    assert (tmp_path / "cells.csv").read_text() == (st / "cells.csv").read_text()
    assert not list(tmp_path.glob(".stitch-work-*"))  # the work stores are gone


def test_quantify_under_a_memory_budget_equals_no_limit(slide, chain, tmp_path, caplog):
    """The per-cell tables take their part of the budget and the rest is the row block: a budget too
    small for this slide reads it in blocks of the least size, with the same tables."""
    from maskworks.codex.stages import QUANTIFY_MIN_BLOCK_MB, quantify_plan

    _, image, channels, _ = slide
    st = chain[3]
    outs = {}
    for tag, budget in (("free", "1e9"), ("bound", "1")):
        outs[tag] = tmp_path / tag
        assert main(["quantify", str(image), str(st), str(outs[tag]), "--channels", str(channels),
                     "--memory-mb", budget]) == 0
    plan = json.loads((outs["bound"] / "quantify_stats.json").read_text())["memory"]
    assert plan["block_mb"] == QUANTIFY_MIN_BLOCK_MB and "memory_mb=1.0 is below" in caplog.text
    assert json.loads((outs["free"] / "quantify_stats.json").read_text())["memory"]["block_mb"] > 1e8
    for table in sorted(outs["free"].glob("*.csv")):
        assert table.read_bytes() == (outs["bound"] / table.name).read_bytes(), table.name
    # the plan: a float64 value per cell, marker, compartment and statistic, and the other columns
    cells, markers = 1000, 10
    expected = cells * (markers * 3 * 2 + 48) * 16 / 2**20
    got = quantify_plan(cells, markers, ["mean", "std"], 4096)
    hulls_mb = cells * 3000 / 2**20  # the morphology's hull chains, before the tables exist
    assert got["tables_mb"] == round(expected) and got["hulls_mb"] == round(hulls_mb)
    assert got["block_mb"] == round((4096 - 400 - max(expected, hulls_mb)) * 0.6, 1)
    hulls = quantify_plan(10**6, 1, ["mean"], 4096)  # many cells, one marker: the hull chains weigh most
    assert hulls["block_mb"] == round((4096 - 400 - 10**6 * 3000 / 2**20) * 0.6, 1)
    assert quantify_plan(cells, markers, ["mean"], None)["block_mb"] is None


def test_lazy_tiling_equals_in_memory(slide, chain, tmp_path, monkeypatch):
    d, image, channels, _ = slide
    monkeypatch.setattr(slides, "IN_MEMORY_BYTES", 1 << 16)
    assert main(_tile_args(image, channels, tmp_path)) == 0
    assert json.loads((tmp_path / "tiling_stats.json").read_text())["read_lazily"] is True
    a = zarr.open_group(str(tmp_path / "patches.zarr"), mode="r")["patches"][...]
    b = zarr.open_group(str(chain[0] / "patches.zarr"), mode="r")["patches"][...]
    np.testing.assert_array_equal(a, b)
    assert (tmp_path / "patches_metadata.csv").read_text() == (chain[0] / "patches_metadata.csv").read_text()


def test_missing_channel_lists_the_names_and_leaves_nothing(slide, tmp_path, capsys):
    d, image, channels, _ = slide
    out = tmp_path / "out"
    args = _tile_args(image, channels, out)
    args[args.index("CD45,PanCK")] = "CD45,CD8"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'CD8' not found" in err and "CD45, DAPI, Ki67, PanCK" in err
    assert not out.exists() or not any(out.iterdir())
    short = tmp_path / "short.txt"
    short.write_text("DAPI\nCD45\n")
    assert main(_tile_args(image, short, out)) == 2
    assert "lists 2 channel names" in capsys.readouterr().err
    # without a names file the OME-XML names are used; this file has none
    no_names = _tile_args(image, channels, out)
    del no_names[3:5]
    assert main(no_names) == 2
    assert "no channel names" in capsys.readouterr().err


def test_split_modes_on_the_command_line(slide, tmp_path):
    d, image, channels, _ = slide
    args = [a for a in _tile_args(image, channels, tmp_path, "--split-mode", "quarters")]
    del args[args.index("--overlap"):args.index("--overlap") + 2]
    assert main(args) == 0
    st = json.loads((tmp_path / "tiling_stats.json").read_text())
    assert st["grid_shape"] == [2, 2] and st["split_mode"] == "quarters" and st["overlap"] == 0.0
    assert st["step"] == [300, 400] and st["padding"] == [0, 0]  # Aegle's split at h // 2, w // 2
    assert zarr.open_group(str(tmp_path / "patches.zarr"), mode="r")["patches"].shape[0] == 4


def test_halves_without_overlap_stitch_whole_cells(slide, tmp_path):
    """Aegle's halves (no overlap): the cells on the seam are joined, not cut in two."""
    d, image, channels, data = slide
    tiles, seg, rep, st = (tmp_path / k for k in ("tiles", "seg", "rep", "st"))
    args = _tile_args(image, channels, tiles, "--split-mode", "halves")
    del args[args.index("--overlap"):args.index("--overlap") + 2]
    assert main(args) == 0
    assert main(["segment-cells", str(tiles), str(seg), "--backend", "watershed"]) == 0
    assert main(["repair-masks", "--segment-dir", str(seg), "--metadata", str(tiles / "patches_metadata.csv"),
                 "--out", str(rep)]) == 0
    assert main(["stitch", str(tiles), str(rep), str(st)]) == 0
    stats = json.loads((st / "stitch_stats.json").read_text())
    assert stats["cell_stitch"]["joined"] > 0 and all(v == 0 for k, v in stats["check"].items() if k != "cells")
    cell, truth = read_volume(st / "cell.ome.tif").numpy(), data["cells"]
    seam = SHAPE[1] // 2
    on_seam = np.unique(truth[:, seam - 1][(truth[:, seam - 1] == truth[:, seam]) & (truth[:, seam] > 0)])
    m = (cell > 0) & (truth > 0)
    top = int(truth.max()) + 1
    keys, inter = np.unique(cell[m].astype(np.int64) * top + truth[m], return_counts=True)
    s, t = keys // top, keys % top
    iou = inter / (np.bincount(cell.ravel())[s] + np.bincount(truth.ravel())[t] - inter)
    found = np.isin(on_seam, t[iou > 0.5])
    # the true cells across the seam are found as often as the others (0.79 of them, all 0.79, here)
    assert on_seam.size > 10 and found.mean() >= 0.7 * np.unique(t[iou > 0.5]).size / truth.max()


def test_image_mpp_from_the_file_only_when_plausible(slide, tmp_path, capsys):
    d, image, channels, data = slide
    dpi72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(dpi72, data["image"], metadata={"axes": "CYX"}, resolution=(72, 72), resolutionunit="INCH")
    out = tmp_path / "out"
    assert main(_tile_args(dpi72, channels, out)) == 2
    err = capsys.readouterr().err
    assert str(dpi72) in err and "352.8" in err and "image_mpp" in err and "--image-mpp" in err
    assert not out.exists() or not any(out.iterdir())
    # the value given wins over the file's
    assert main(_tile_args(dpi72, channels, out, "--image-mpp", "0.377")) == 0
    st = json.loads((out / "tiling_stats.json").read_text())
    assert st["image_mpp"] == 0.377 and st["image_mpp_source"] == "given"
    assert main(_tile_args(dpi72, channels, tmp_path / "bad", "--image-mpp", "-1")) == 2
    assert "image_mpp" in capsys.readouterr().err


def test_full_image_patches_are_stored_in_tiles(slide, tmp_path, monkeypatch):
    """A whole-slide patch is written block by block into Zarr tiles (any slide size works; Blosc
    refuses chunks over 2 GiB); the smaller tile size makes this slide big enough to need it."""
    d, image, channels, data = slide
    from maskworks.codex import stages

    monkeypatch.setattr(stages, "PATCH_CHUNK", 128)
    monkeypatch.setattr(stages, "PATCH_CHUNK_BYTES", 2**16)
    assert main(_tile_args(image, channels, tmp_path, "--split-mode", "full_image")) == 0
    arr = zarr.open_group(str(tmp_path / "patches.zarr"), mode="r")["patches"]
    assert arr.shape == (1, *SHAPE, 2) and arr.chunks == (1, 128, 128, 2)
    img = data["image"]
    np.testing.assert_array_equal(arr[0, ..., 0], img[1])
    np.testing.assert_array_equal(arr[0, ..., 1], np.maximum(img[0], img[3]))
    row = _rows(tmp_path / "patches_metadata.csv")[0]
    assert float(row["nucleus_mean"]) == pytest.approx(img[1].mean())
    assert float(row["wholecell_std"]) == pytest.approx(np.maximum(img[0], img[3]).std())
    assert float(row["nucleus_non_zero_perc"]) == pytest.approx(np.count_nonzero(img[1]) / img[1].size)


def test_wholecell_mean_aggregation(slide, tmp_path):
    d, image, channels, data = slide
    assert main(_tile_args(image, channels, tmp_path, "--wholecell-aggregation", "mean")) == 0
    arr = zarr.open_group(str(tmp_path / "patches.zarr"), mode="r")["patches"]
    img = data["image"].astype(np.float64)
    np.testing.assert_array_equal(arr[0, :256, :256, 1], np.rint((img[0] + img[3]) / 2)[:256, :256])
    assert json.loads((tmp_path / "tiling_stats.json").read_text())["wholecell_aggregation"] == "mean"


def test_segment_cells_errors(chain, tmp_path, capsys, monkeypatch):
    tiles = chain[0]
    assert main(["segment-cells", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "run tile-image first" in capsys.readouterr().err
    monkeypatch.setattr(segment, "DEEPCELL_MODELS", tmp_path / ".deepcell" / "models")
    assert main(["segment-cells", str(tiles), str(tmp_path / "m"), "--backend", "mesmer"]) == 2
    err = capsys.readouterr().err
    assert "no Mesmer model found" in err and "DEEPCELL_ACCESS_TOKEN" in err
    assert not list((tmp_path / "m").glob("*"))


def test_stitch_needs_every_informative_patch(chain, tmp_path, capsys):
    tiles, seg, *_ = chain
    partial = tmp_path / "labels"
    partial.mkdir()
    first = sorted(seg.glob("patch_*.npz"))[0]
    (partial / first.name).write_bytes(first.read_bytes())
    assert main(["stitch", str(tiles), str(partial), str(tmp_path / "st")]) == 2
    assert "no labels for" in capsys.readouterr().err
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())


def test_codex_demo_data_and_its_tiling(tmp_path):
    written = write_demo_data(tmp_path, arms="codex")
    assert set(written) == {"codex/codex_image", "codex/codex_channels", "codex/codex_truth_cells",
                            "codex/codex_truth_nuclei"}
    with tifffile.TiffFile(written["codex/codex_image"]) as tif:
        assert tif.series[0].shape == (4, *CODEX_SLIDE["shape"]) and tif.series[0].dtype == np.uint16
    truth = read_volume(written["codex/codex_truth_cells"]).numpy()
    nuclei = read_volume(written["codex/codex_truth_nuclei"]).numpy()
    assert (truth[nuclei > 0] == nuclei[nuclei > 0]).all() and truth.max() > 3000
    cfg = CODEX_SLIDE
    assert main(["tile-image", str(written["codex/codex_image"]), str(tmp_path / "tiles"),
                 "--channels", str(written["codex/codex_channels"]), "--nuclear-channel", cfg["nuclear_channel"],
                 "--wholecell-channels", ",".join(cfg["wholecell_channels"]),
                 "--patch-height", str(cfg["patch_height"]), "--patch-width", str(cfg["patch_width"]),
                 "--overlap", str(cfg["overlap"])]) == 0
    st = json.loads((tmp_path / "tiles" / "tiling_stats.json").read_text())
    assert st["patches"] == 12 and st["padding"] == [34, 35] and st["image_mpp"] == 0.5
    rows = _rows(tmp_path / "tiles" / "patches_metadata.csv")
    flags = [(r["is_empty"], r["is_noisy"], r["is_informative"]) for r in rows]
    assert flags.count(("False", "False", "True")) == 9
    assert flags[3] == flags[7] == ("True", "True", "False")  # no tissue, nothing but hot pixels
    assert flags[11] == ("False", "True", "False")  # the corner of faint noise


def test_quantify_writes_mcquant_tables_with_numbered_channels_and_the_sample(slide, chain, tmp_path):
    import anndata
    import pandas as pd

    _, image, _, data = slide
    st = chain[3]
    names = tmp_path / "names.txt"
    names.write_text("CD45\nDAPI\nKi67\nDAPI\n")  # the 4th channel listed as a second DAPI (a later cycle)
    out = tmp_path / "q"
    assert main(["quantify", str(image), str(st), str(out), "--channels", str(names), "--sample", "S1",
                 "--nuclear-channel", "DAPI", "--neighbours", "none"]) == 0
    header = ["CellID", "CD45", "DAPI_1", "Ki67", "DAPI_2", "X_centroid", "Y_centroid", "Area", "MajorAxisLength",
              "MinorAxisLength", "Eccentricity", "Solidity", "Extent", "Orientation"]
    cell, nuclei = (pd.read_csv(out / f"S1--maskworks_{m}.csv") for m in ("cell", "nuclei"))
    assert list(cell.columns) == list(nuclei.columns) == header
    placed = pd.read_csv(st / "cells.csv")
    assert cell["CellID"].tolist() == placed["id"].tolist() and cell["Area"].tolist() == placed["cell_area"].tolist()
    np.testing.assert_allclose(cell[["X_centroid", "Y_centroid"]], placed[["centroid_x", "centroid_y"]], atol=0.006)
    with_nucleus = placed[placed["nucleus_area"] > 0]
    assert nuclei["CellID"].tolist() == with_nucleus["id"].tolist()
    assert nuclei["Area"].tolist() == with_nucleus["nucleus_area"].tolist()
    # DAPI_2 is the image's 4th channel: its mean over every cell, and over every nucleus
    for table, key in ((cell, "cell"), (nuclei, "nucleus")):
        lab = read_volume(st / f"{key}.ome.tif").numpy().ravel().astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.bincount(lab, weights=data["image"][3].ravel()) / np.bincount(lab)
        np.testing.assert_allclose(table["DAPI_2"], mean[table["CellID"]], rtol=1e-12)
    assert pd.read_csv(out / "cell_metadata.csv")["sample"].eq("S1").all()
    adata = anndata.read_h5ad(out / "cells.h5ad")
    assert adata.var_names.tolist() == ["CD45", "DAPI_1", "Ki67", "DAPI_2"]
    assert adata.var["original_name"].tolist() == ["CD45", "DAPI", "Ki67", "DAPI"]
    library = adata.uns["spatial"]["S1"]
    assert library["images"]["hires"].shape == (*SHAPE, 3)  # under 2000 px: every pixel
    assert library["scalefactors"]["tissue_hires_scalef"] == pytest.approx(2.0)  # 0.5 µm per pixel
    assert adata.uns["maskworks"]["hires_channel"] == "DAPI_1"
