"""Bad files end with a message naming the file, exit 2, and never a hint to load them unsafely."""

from __future__ import annotations

import numpy as np
import pytest

from maskworks.cli import main


def test_pickled_npy_is_refused_without_an_unsafe_hint(tmp_path, capsys):
    bad = tmp_path / "vol.npy"
    np.save(bad, np.array([{"a": 1}] * 8, dtype=object).reshape(2, 2, 2), allow_pickle=True)
    assert main(["texture-mask", str(bad), str(tmp_path / "out" / "mask.tif")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "pickled" in err and "allow_pickle" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_checkpoint_with_arbitrary_objects_is_refused_without_an_unsafe_hint(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from maskworks.io import write_volume

    ckpt = tmp_path / "best.pt"
    import argparse

    torch.save({"format": "x", "model": argparse.Namespace(run="anything")}, ckpt)  # not weights-only
    write_volume(tmp_path / "vol.tif", np.zeros((8, 16, 16), np.float32), 1.0)
    code = main(["predict-unet", str(tmp_path / "vol.tif"), str(ckpt), str(tmp_path / "p" / "mask.tif")])
    err = capsys.readouterr().err
    assert code == 2 and str(ckpt) in err and "weights_only" not in err and "pickled" in err


def test_truncated_npz_patch_labels(tmp_path, capsys):
    from maskworks.codex.stages import _read_patch_labels
    from maskworks.io import InputError

    path = tmp_path / "patch_0.npz"
    np.savez_compressed(path, cell=np.ones((8, 8), np.uint16), nucleus=np.ones((8, 8), np.uint16))
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(InputError, match="patch_0.npz"):
        _read_patch_labels(path)


def test_stats_json_is_valid_json_without_nan(tmp_path):
    import json

    from maskworks.io import write_json

    path = write_json(tmp_path / "s.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2),
                                            "d": np.array([np.nan, 3.0])})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"a": None, "b": [1.0, None], "c": 2.0, "d": [None, 3.0]}


@pytest.mark.parametrize("extra,what", [(["--mean", "nan", "--std", "1"], "mean=nan"),
                                        (["--mean", "0", "--std", "-5"], "std=-5"),
                                        (["--mean", "3"], "give both")])
def test_predict_unet_refuses_bad_z_score_statistics(tmp_path, capsys, extra, what):
    pytest.importorskip("monai")
    from maskworks.io import write_volume

    write_volume(tmp_path / "vol.tif", np.zeros((8, 16, 16), np.float32), 1.0)
    ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "p" / "mask.tif"
    assert main(["predict-unet", str(tmp_path / "vol.tif"), str(ckpt), str(out), *extra]) == 2
    assert what in capsys.readouterr().err and not out.exists()


def _tiny_checkpoint(tmp_path):
    """A real (untrained) U-Net checkpoint as train-unet writes it."""
    import torch

    from maskworks.em import unet

    cfg = {"channels": [4, 8], "strides": [2], "num_res_units": 0}
    model = unet.build_unet(channels=tuple(cfg["channels"]), strides=tuple(cfg["strides"]), num_res_units=0)
    ckpt = tmp_path / "best.pt"
    torch.save(unet._checkpoint(unet._cpu_state(model), cfg, 0, {}), ckpt)
    return ckpt


def test_a_patch_table_with_the_wrong_columns_is_refused(tmp_path):
    from maskworks.codex.stages import _informative
    from maskworks.io import InputError

    table = tmp_path / "patches_metadata.csv"
    table.write_text("patch_id,informative\n0,True\n")
    with pytest.raises(InputError, match="no is_informative column"):
        _informative(tmp_path, table)
    table.write_text("patch_id,is_informative\nzero,True\n")
    with pytest.raises(InputError, match="'zero' is not a whole number"):
        _informative(tmp_path, table)


@pytest.mark.copick
def test_a_copick_project_whose_overlay_root_is_missing_is_refused(tmp_path):
    pytest.importorskip("copick", reason="copick runs in .venv-cryoet (make test runs this test there)")
    import json

    from maskworks.io import InputError
    from maskworks.io.copick import open_project

    config = tmp_path / "copick.json"
    config.write_text(json.dumps({"name": "p", "overlay_root": f"local://{tmp_path / 'nowhere'}",
                                  "pickable_objects": []}))
    with pytest.raises(InputError, match="overlay_root .*nowhere.* does not exist"):
        open_project(config)
    (tmp_path / "static").mkdir()
    config.write_text(json.dumps({"name": "p", "overlay_root": f"local://{tmp_path / 'new'}",
                                  "static_root": f"local://{tmp_path / 'static'}", "pickable_objects": []}))
    open_project(config)  # a new overlay beside an existing static root: created on the first write


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_zarr_chunk_is_an_error_naming_the_store(tmp_path, capsys, damage):
    from maskworks.demo import make_em_volume
    from maskworks.io import write_volume

    image, _ = make_em_volume(shape=(24, 48, 48), seed=1)
    store = write_volume(tmp_path / "vol.zarr", image, (10, 10, 10), unit="nanometer", chunks=(8, 24, 24))
    from conftest import chunk_file

    chunk = chunk_file(store / "0", (1, 0, 0))
    chunk.write_bytes(chunk.read_bytes()[:20] if damage == "truncate" else b"not blosc at all" * 4)
    out = tmp_path / "o" / "mask.zarr"
    assert main(["texture-mask", str(store), str(out), "--block-size", "16", "--chunk-shape", "16"]) == 2
    err = capsys.readouterr().err
    assert str(store) in err and "cannot be read" in err and "Traceback" not in err
    assert not out.exists()
