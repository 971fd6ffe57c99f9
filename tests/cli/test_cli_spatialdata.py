"""`maskworks write-spatialdata` on a small slide run through tile-image, segment-cells (watershed), repair,
stitch and quantify: the store `spatialdata.read_zarr` opens holds the slide, the stitched labels and quantify's
table, as they are.  Runs in .venv-scverse (spatialdata 0.8, anndata 0.13, Python 3.12; `make test` does); in .venv, the stage says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from maskworks.cli import main
from maskworks.demo import CODEX_SLIDE, make_codex_slide
from maskworks.io import read_volume

scverse = pytest.mark.scverse  # every test but the last runs in .venv-scverse

NAMES = list(CODEX_SLIDE["channels"])  # CD45, DAPI, Ki67, PanCK
SHAPE = (520, 700)  # levels 520x700, 260x350, 130x175
MPP = 0.5


def _spatialdata():
    return pytest.importorskip("spatialdata", reason="!!! spatialdata is MISSING: write-spatialdata is NOT TESTED; "
                               "run the scverse tests in .venv-scverse (`make test` does) !!!")


@pytest.fixture(scope="module")
def quantified(tmp_path_factory):
    _spatialdata()
    d = tmp_path_factory.mktemp("quantified")
    data = make_codex_slide(SHAPE, seed=3)
    image = d / "slide.ome.tif"
    tifffile.imwrite(image, data["image"], ome=True, compression="zlib", tile=(256, 256),
                     metadata={"axes": "CYX", "PhysicalSizeX": MPP, "PhysicalSizeXUnit": "µm"})
    channels = d / "channels.txt"
    channels.write_text("\n".join(NAMES) + "\n")
    tiles, seg, rep, st, q = (d / n for n in ("tiles", "seg", "rep", "st", "q"))
    assert main(["tile-image", str(image), str(tiles), "--channels", str(channels), "--nuclear-channel", "DAPI",
                 "--wholecell-channels", "CD45,PanCK", "--patch-height", "256", "--patch-width", "256",
                 "--overlap", "0.1"]) == 0
    assert main(["segment-cells", str(tiles), str(seg), "--backend", "watershed"]) == 0
    assert main(["repair-masks", "--segment-dir", str(seg), "--metadata", str(tiles / "patches_metadata.csv"),
                 "--out", str(rep)]) == 0
    assert main(["stitch", str(tiles), str(rep), str(st)]) == 0
    assert main(["quantify", str(image), str(st), str(q), "--channels", str(channels)]) == 0
    return d, image, st, q, data


@pytest.fixture(scope="module")
def store(quantified):
    d, image, st, q, _ = quantified
    out = d / "slide.zarr"
    assert main(["write-spatialdata", str(image), str(st), str(q / "cells.h5ad"), str(out), "--chunk", "128"]) == 0
    return out, _spatialdata().read_zarr(out)


@scverse
def test_image_is_the_slide_with_its_channel_names_as_a_pyramid(quantified, store):
    import anndata

    _, image, _, q, data = quantified
    _, sdata = store
    tree = sdata.images["image"]
    levels = sorted(tree.children)
    assert levels == ["scale0", "scale1", "scale2"]
    full = tree["scale0"]["image"]
    assert full.dims == ("c", "y", "x")
    assert list(full.coords["c"].values) == list(anndata.read_h5ad(q / "cells.h5ad").var_names) == NAMES
    assert full.dtype == data["image"].dtype
    np.testing.assert_array_equal(full.values, tifffile.imread(image))
    assert full.data.chunksize == (1, 128, 128)  # read and stored one channel chunk at a time
    shapes = [tree[lv]["image"].shape for lv in levels]
    assert shapes == [(4, 520, 700), (4, 260, 350), (4, 130, 175)]


@scverse
def test_labels_are_the_stitched_labels_as_pyramids(quantified, store):
    _, _, st, _, _ = quantified
    _, sdata = store
    for element, name in (("cell_labels", "cell"), ("nucleus_labels", "nucleus")):
        tree = sdata.labels[element]
        assert sorted(tree.children) == ["scale0", "scale1", "scale2"]
        stitched = read_volume(st / f"{name}.ome.tif", ndim=2).numpy()
        level0 = tree["scale0"]["image"].values
        assert level0.dtype == stitched.dtype and np.array_equal(level0, stitched)
        coarse = tree["scale1"]["image"].values
        assert coarse.shape == (260, 350) and set(np.unique(coarse)) <= set(np.unique(stitched))


@scverse
def test_table_annotates_the_cell_labels(quantified, store):
    import anndata
    from spatialdata.models import TableModel, get_table_keys

    _, _, st, q, _ = quantified
    _, sdata = store
    table = sdata.tables["table"]
    assert get_table_keys(table) == ("cell_labels", "region", "cell_id")
    TableModel().validate(table)
    assert list(table.obs["region"].unique()) == ["cell_labels"]
    ids = table.obs["cell_id"].to_numpy()
    labelled = np.unique(sdata.labels["cell_labels"]["scale0"]["image"].values)
    assert set(ids) == set(labelled[labelled > 0])  # every cell in the table is in the labels, and the reverse
    source = anndata.read_h5ad(q / "cells.h5ad")
    np.testing.assert_array_equal(table.X, source.X)
    np.testing.assert_array_equal(table.obsm["spatial"], source.obsm["spatial"])
    assert (table.obsp["spatial_connectivities"] != source.obsp["spatial_connectivities"]).nnz == 0
    # spatialdata's own join of the labels' values with the table's rows finds every row
    from spatialdata import match_table_to_element

    matched = match_table_to_element(sdata, "cell_labels", "table")
    assert sorted(matched.obs["cell_id"]) == sorted(ids)


@scverse
def test_every_element_is_in_micrometres(store):
    from spatialdata.transformations import Scale, get_transformation

    _, sdata = store
    assert list(sdata.coordinate_systems) == ["global"]
    for element in (sdata.images["image"], sdata.labels["cell_labels"], sdata.labels["nucleus_labels"]):
        transform = get_transformation(element, "global")
        assert isinstance(transform, Scale)
        np.testing.assert_allclose(transform.to_affine_matrix(("y", "x"), ("y", "x")),
                                   [[MPP, 0, 0], [0, MPP, 0], [0, 0, 1]])


@scverse
def test_stats_and_an_mpp_given_or_unknown(quantified, store, tmp_path):
    from spatialdata.transformations import Identity, Scale, get_transformation

    out, _ = store
    stats = json.loads(out.with_name("slide_stats.json").read_text())
    assert stats["cells"] > 50 and stats["levels"] == 3 and stats["image_mpp"] == MPP and stats["channels"] == NAMES

    d, image, st, q, data = quantified
    assert main(["write-spatialdata", str(image), str(st), str(q), str(tmp_path / "given.zarr"),
                 "--image-mpp", "0.377"]) == 0
    given = get_transformation(_spatialdata().read_zarr(tmp_path / "given.zarr").images["image"], "global")
    assert isinstance(given, Scale) and np.allclose(given.to_affine_matrix(("y", "x"), ("y", "x")).diagonal(),
                                                     [0.377, 0.377, 1])

    # no pixel size anywhere (a plain TIFF, stitch labels and a table without one): pixels
    import anndata

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, data["image"])
    table = anndata.read_h5ad(q / "cells.h5ad")
    table.uns["maskworks"]["image_mpp"] = "unknown"
    table.write_h5ad(tmp_path / "cells.h5ad")
    labels = tmp_path / "st"
    labels.mkdir()
    for name in ("cell", "nucleus"):
        tifffile.imwrite(labels / f"{name}.ome.tif", read_volume(st / f"{name}.ome.tif", ndim=2).numpy())
    assert main(["write-spatialdata", str(plain), str(labels), str(tmp_path / "cells.h5ad"),
                 str(tmp_path / "pixels.zarr")]) == 0
    sdata = _spatialdata().read_zarr(tmp_path / "pixels.zarr")
    assert isinstance(get_transformation(sdata.labels["cell_labels"], "global"), Identity)
    assert json.loads((tmp_path / "pixels_stats.json").read_text())["unit"] == "pixel"


@scverse
def test_labels_of_another_image_are_refused_and_nothing_is_written(quantified, tmp_path, capsys):
    d, image, st, q, data = quantified
    small = tmp_path / "small.ome.tif"
    tifffile.imwrite(small, data["image"][:, :300, :400], ome=True, metadata={"axes": "CYX"})
    out = tmp_path / "bad.zarr"
    assert main(["write-spatialdata", str(small), str(st), str(q), str(out)]) == 2
    assert "must come from this image" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".maskworks")) == ["small.ome.tif"]


@scverse
@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_repeated_marker_names_are_made_unique(quantified, tmp_path):
    import anndata

    d, image, st, q, _ = quantified
    table = anndata.read_h5ad(q / "cells.h5ad")
    table.var_names = ["DAPI", "DAPI", "Ki67", "PanCK"]  # a table whose repeats are not numbered
    table.var = table.var.drop(columns=[c for c in ("channel",) if c in table.var])
    table.write_h5ad(tmp_path / "cells.h5ad")
    assert main(["write-spatialdata", str(image), str(st), str(tmp_path / "cells.h5ad"),
                 str(tmp_path / "s.zarr")]) == 0
    sdata = _spatialdata().read_zarr(tmp_path / "s.zarr")
    names = ["DAPI", "DAPI-1", "Ki67", "PanCK"]
    assert list(sdata.images["image"]["scale0"]["image"].coords["c"].values) == names
    assert list(sdata.tables["table"].var_names) == names


def test_without_spatialdata_the_stage_names_its_environment(tmp_path, capsys):
    try:
        import spatialdata  # noqa: F401

        pytest.skip("spatialdata is installed here (the scverse environment)")
    except ImportError:
        pass
    out = tmp_path / "s.zarr"
    assert main(["write-spatialdata", str(tmp_path / "x.tif"), str(tmp_path), str(tmp_path), str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs spatialdata 0.8" in err and "make setup-scverse" in err and "envs/scverse.yaml" in err
    assert not out.exists()
