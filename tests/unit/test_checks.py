"""The input check made before submission: header-only, every problem of a row, verdicts cached by the
files' state -- on real files of each format."""

from __future__ import annotations

import json
import os

import mrcfile
import numpy as np
import pytest
import tifffile

from maskworks.checks import check_codex_row, check_em_row, check_table, check_tomogram_row
from maskworks.io.volumes import inspect_volume, write_volume


@pytest.fixture()
def files(tmp_path):
    vol = np.random.default_rng(0).integers(0, 255, (8, 16, 16), dtype=np.uint8)
    out = {}
    with mrcfile.new(tmp_path / "v.mrc") as m:
        m.set_data(vol)
        m.voxel_size = 10.0
    out["mrc"] = tmp_path / "v.mrc"
    write_volume(tmp_path / "v.zarr", vol, voxel_size=(10, 10, 10), unit="angstrom")
    out["zarr"] = tmp_path / "v.zarr"
    write_volume(tmp_path / "truth.zarr", (vol > 100).astype(np.uint8), voxel_size=(10, 10, 10), unit="angstrom")
    out["truth"] = tmp_path / "truth.zarr"
    write_volume(tmp_path / "small.zarr", vol[:4], voxel_size=(10, 10, 10), unit="angstrom")
    out["small"] = tmp_path / "small.zarr"
    tifffile.imwrite(tmp_path / "v.tif", vol)
    out["tif"] = tmp_path / "v.tif"
    np.save(tmp_path / "v.npy", vol)
    out["npy"] = tmp_path / "v.npy"
    (tmp_path / "c.csv").write_text("x,y,z\n8,8,4\n")
    out["centres"] = tmp_path / "c.csv"
    (tmp_path / "far.csv").write_text("x,y,z\n8,8,4\n80,8,4\n")
    out["far"] = tmp_path / "far.csv"
    return out


@pytest.mark.parametrize("fmt", ["mrc", "zarr", "tif", "npy"])
def test_inspect_volume_reads_the_header_of_each_format(files, fmt):
    h = inspect_volume(files[fmt], ndim=3)
    assert h.shape == (8, 16, 16) and h.dtype.kind == "u"  # mrcfile stores uint8 as its mode 6 (uint16)
    if fmt in ("mrc", "zarr"):
        assert h.voxel_size == pytest.approx((10, 10, 10))


def test_inspect_volume_reads_no_voxel(files):
    # every chunk of the store damaged: a header-only read does not notice (a job reading them would)
    chunks = [p for p in files["zarr"].rglob("*") if p.is_file() and "/c/" in str(p)]
    assert chunks
    for p in chunks:
        p.write_bytes(b"garbage")
    assert inspect_volume(files["zarr"], ndim=3).shape == (8, 16, 16)


def test_inspect_volume_refuses_what_read_volume_refuses(files, tmp_path):
    with pytest.raises(Exception, match="no such file"):
        inspect_volume(tmp_path / "nope.mrc")
    with pytest.raises(Exception, match="more than the budget"):
        inspect_volume(files["mrc"], max_voxels=100)
    with pytest.raises(Exception, match="expected 2"):
        inspect_volume(files["mrc"], ndim=2)
    with pytest.raises(Exception, match="level=1"):
        inspect_volume(files["mrc"], level=1)


def test_em_row_lists_every_problem(files, tmp_path):
    assert check_em_row({"name": "a", "path": str(files["zarr"]), "truth": str(files["truth"])}) == []
    problems = check_em_row({"name": "a", "path": str(files["zarr"]), "truth": str(files["small"]),
                             "voxel_size": "0,1,1"})
    assert len(problems) == 2, problems
    assert "voxel_size='0,1,1'" in problems[0] and "differs from the volume's (8, 16, 16)" in problems[1]
    assert "no such file" in check_em_row({"name": "a", "path": str(tmp_path / "x.mrc")})[0]


def test_tomogram_row_checks_shapes_and_centres(files, tmp_path):
    row = {"name": "t", "tomogram": str(files["mrc"]), "segmentation": str(files["zarr"]),
           "centres": str(files["centres"])}
    assert check_tomogram_row(row) == []
    bad = {**row, "segmentation": str(files["small"]), "centres": str(files["far"]),
           "corrections": str(tmp_path / "nowhere")}
    problems = check_tomogram_row(bad)
    assert len(problems) == 3, problems
    assert "differs from the tomogram's (8, 16, 16)" in problems[0]
    assert "1 of 2 centre(s) lie outside" in problems[1]
    assert "corrections folder does not exist" in problems[2]


def test_codex_row_checks_channel_names(tmp_path):
    img = np.zeros((3, 32, 32), np.uint16)
    tifffile.imwrite(tmp_path / "s.ome.tif", img, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD45", "Ki67"]}})
    row = {"name": "s", "image": str(tmp_path / "s.ome.tif"), "nuclear_channel": "DAPI",
           "wholecell_channels": "CD45", "image_mpp": "0.5"}
    assert check_codex_row(row) == []
    problems = check_codex_row({**row, "wholecell_channels": "CD45,PanCK"})
    assert len(problems) == 1 and "PanCK" in problems[0]


def test_check_table_caches_verdicts_and_sees_changed_files(files, tmp_path):
    cache = tmp_path / "cache.json"
    rows = {"a": {"name": "a", "path": str(files["zarr"])}, "b": {"name": "b", "path": str(tmp_path / "b.mrc")}}
    assert set(check_table("em", rows, cache=cache)) == {"b"}
    keys = json.loads(cache.read_text())
    assert len(keys) == 2
    mtime = cache.stat().st_mtime_ns
    assert set(check_table("em", rows, cache=cache)) == {"b"}
    assert cache.stat().st_mtime_ns == mtime  # every verdict from the cache
    os.symlink(files["mrc"], tmp_path / "b.mrc")  # the missing file appears
    assert check_table("em", rows, cache=cache) == {}
