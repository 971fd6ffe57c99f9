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
