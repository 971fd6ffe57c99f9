"""maskworks' Zarr I/O on zarr-python 2, as the copick rules run it (``.venv-cryoet``: copick 1.31 needs
zarr 2): OME-Zarr 0.4 multiscale labels written and read back by level, a stage writing its outputs
block by block, TIFF read whole (tifffile's Zarr interface needs zarr 3) with its levels, and clear
errors for what zarr 2 cannot do.  ``make test`` runs these in ``.venv-cryoet``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maskworks.cli import main
from maskworks.io import InputError, read_volume, write_volume

zarr = pytest.importorskip("zarr")
pytestmark = [pytest.mark.copick,
              pytest.mark.skipif(int(zarr.__version__.split(".")[0]) >= 3, reason="the zarr 2 environment's I/O")]

VS = (40.0, 8.0, 4.0)


@pytest.fixture(scope="module")
def volume():
    from maskworks.demo import make_em_volume

    image, _ = make_em_volume(shape=(24, 48, 40), seed=4)
    return np.tile(image, (1, 8, 8))  # 24 x 384 x 320: a level 1 (down to <= 256 per side)


def test_labels_are_ome_zarr_04_pyramids_read_back_by_level(tmp_path, volume):
    mask = (volume > volume.mean()).astype(np.uint8)
    write_volume(tmp_path / "m.zarr", mask, VS, unit="nanometer", labels=True)
    attrs = json.loads((tmp_path / "m.zarr" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4" and "image-label" in attrs
    assert [d["path"] for d in attrs["multiscales"][0]["datasets"]] == ["0", "1"]
    level1 = read_volume(tmp_path / "m.zarr", level=1)
    np.testing.assert_array_equal(level1.numpy(), mask[:, ::2, ::2])
    assert level1.voxel_size == pytest.approx((VS[0], 2 * VS[1], 2 * VS[2]))
    np.testing.assert_array_equal(read_volume(tmp_path / "m.zarr", lazy=True).numpy(), mask)


def test_a_stage_writes_block_by_block_under_zarr_2(tmp_path, volume, capsys):
    write_volume(tmp_path / "vol.zarr", volume, VS, unit="nanometer")
    assert main(["texture-mask", str(tmp_path / "vol.zarr"), str(tmp_path / "mask.zarr"), "--block-size", "16",
                 "--memory-mb", "64"]) == 0, capsys.readouterr().err
    whole = tmp_path / "whole.zarr"
    assert main(["texture-mask", str(tmp_path / "vol.zarr"), str(whole), "--block-size", "16"]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "mask.zarr").numpy(), read_volume(whole).numpy())


def test_tiff_is_read_whole_with_its_levels(tmp_path, volume):
    import tifffile

    tif = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(tif, bigtiff=True) as w:
        w.write(volume, subifds=1, tile=(16, 16), metadata={"axes": "ZYX"})
        w.write(volume[:, ::2, ::2], subfiletype=1, tile=(16, 16))
    one = read_volume(tif, level=1, lazy=True)
    np.testing.assert_array_equal(one.numpy(), volume[:, ::2, ::2])
    assert one.origin == pytest.approx((0.0, 0.5, 0.5))


def test_what_zarr_2_cannot_do_is_said(tmp_path, volume, capsys):
    with pytest.raises(InputError, match="needs zarr >= 3.1"):
        write_volume(tmp_path / "m.zarr", volume, VS, ome_zarr_version="0.5")
    (tmp_path / "v3.zarr").mkdir()
    (tmp_path / "v3.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    assert main(["texture-mask", str(tmp_path / "v3.zarr"), str(tmp_path / "m.zarr")]) == 2
    err = capsys.readouterr().err
    assert "v3.zarr" in err and "zarr >= 3.1" in err
