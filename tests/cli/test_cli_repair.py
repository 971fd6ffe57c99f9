"""`maskworks repair-masks`: one image (.tif/.npy in, TIFF or Zarr out) and a folder of segmented patches."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import exe, run

from maskworks.cli import main
from maskworks.codex.repair import boundaries, repair_masks
from maskworks.io import read_volume, write_volume


def masks():
    """Three cells (one without a nucleus) and nuclei with gaps in their ids, one crossing a border."""
    cells = np.zeros((24, 30), dtype=np.uint16)
    cells[2:12, 1:14], cells[2:12, 14:28], cells[13:22, 3:20] = 7, 3, 40
    nuclei = np.zeros_like(cells, dtype=np.int32)
    nuclei[5:9, 4:9] = 11
    nuclei[5:9, 12:18] = 5  # crosses cells 7 and 3
    return cells, nuclei


@pytest.mark.parametrize("ext, fmt", [(".tif", "tif"), (".npy", "zarr")])
def test_repair_masks_one_image(tmp_path, ext, fmt):
    cells, nuclei = masks()
    write_volume(tmp_path / f"cells{ext}", cells, (0.5, 0.5), unit="micrometer")
    write_volume(tmp_path / f"nuclei{ext}", nuclei)
    out = tmp_path / "out"
    assert main(["repair-masks", "--cells", str(tmp_path / f"cells{ext}"), "--nuclei",
                 str(tmp_path / f"nuclei{ext}"), "--out", str(out), "--format", fmt]) == 0
    expected = repair_masks(cells, nuclei)
    suffix = ".zarr" if fmt == "zarr" else ".tif"
    for name, want in zip(("cell", "nucleus", "cytoplasm"), expected[:3]):
        vol = read_volume(out / f"{name}{suffix}", ndim=2)
        assert vol.dtype == want.dtype
        np.testing.assert_array_equal(vol.numpy(), want)
        if ext == ".tif":
            assert vol.voxel_size == pytest.approx((0.5, 0.5)) and vol.unit == "micrometer"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics[k] for k in expected[3]} == pytest.approx(expected[3])
    assert metrics["matched"] == 2 and metrics["cells_in"] == 3 and metrics["shape"] == [24, 30]


@pytest.mark.parametrize("case, message", [
    ("float", "dtype float64"),
    ("negative", "negative labels"),
    ("shape", "shape"),
    ("missing", "no such file"),
])
def test_repair_masks_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case, message):
    cells, nuclei = masks()
    if case == "float":
        nuclei = nuclei.astype(np.float64)
    elif case == "negative":
        nuclei = nuclei - 1
    elif case == "shape":
        nuclei = nuclei[:-1]
    np.save(tmp_path / "cells.npy", cells)
    np.save(tmp_path / "nuclei.npy", nuclei)
    if case == "missing":
        (tmp_path / "nuclei.npy").unlink()
    out = tmp_path / "out"
    assert main(["repair-masks", "--cells", str(tmp_path / "cells.npy"), "--nuclei", str(tmp_path / "nuclei.npy"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "repair-masks: error:" in err and message in err and "nuclei.npy" in err
    assert not out.exists() or not any(out.iterdir())


def test_repair_masks_command_line_exit_code(tmp_path):
    cells, nuclei = masks()
    np.save(tmp_path / "cells.npy", cells)
    np.save(tmp_path / "nuclei.npy", nuclei.astype(np.float32))
    proc = run([exe("maskworks"), "repair-masks", "--cells", tmp_path / "cells.npy", "--nuclei",
                tmp_path / "nuclei.npy", "--out", tmp_path / "out"], check=False, timeout=120)
    assert proc.returncode == 2 and "dtype float32" in proc.stderr and "integer" in proc.stderr


def write_patches(root, informative=(True, False, True)):
    """A segment-cells folder with patch_<id>.npz for the informative patches and their table."""
    seg = root / "segment"
    seg.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for pid, ok in enumerate(informative):
        rows.append({"patch_id": pid, "y_start": 0, "x_start": 30 * pid, "height": 24, "width": 30,
                     "is_informative": ok})
        if ok:
            cells, nuclei = masks()
            perm = rng.permutation(60) + 1
            np.savez_compressed(seg / f"patch_{pid}.npz", cell=cells, nucleus=perm[nuclei].astype(np.uint16) * (nuclei > 0),
                                cell_boundary=boundaries(cells).astype(np.uint8))
    table = root / "patches_metadata.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return seg, table


def test_repair_masks_patch_folder(tmp_path):
    seg, table = write_patches(tmp_path)
    out = tmp_path / "repaired"
    assert main(["repair-masks", "--segment-dir", str(seg), "--metadata", str(table), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["patch_0.npz", "patch_2.npz", "patches_metadata.csv",
                                                      "repair_stats.json"]
    with np.load(out / "patch_2.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(["cell", "nucleus", "cytoplasm", "cell_boundary", "nucleus_boundary",
                                            "cytoplasm_boundary", "cell_original", "nucleus_original"])
        with np.load(seg / "patch_2.npz") as src:
            np.testing.assert_array_equal(npz["cell_original"], src["cell"])
            np.testing.assert_array_equal(npz["nucleus_original"], src["nucleus"])
            expected = repair_masks(src["cell"], src["nucleus"])
        for name, want in zip(("cell", "nucleus", "cytoplasm"), expected[:3]):
            np.testing.assert_array_equal(npz[name], want)
            assert npz[name].dtype == want.dtype
            np.testing.assert_array_equal(npz[f"{name}_boundary"], boundaries(want).astype(np.uint8))
    with open(out / "patches_metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["patch_id"] for r in rows] == ["0", "1", "2"] and rows[1]["x_start"] == "30"
    assert rows[0]["matched"] == "2" and rows[1]["matched"] == "" and float(rows[2]["matched_fraction"]) == 2 / 3
    stats = json.loads((out / "repair_stats.json").read_text())
    assert stats["patches"] == 3 and stats["patches_repaired"] == 2 and stats["matched"] == 4
    assert stats["matched_fraction"] == pytest.approx(4 / (6 + 4 - 4))


def test_repair_masks_patch_folder_errors(tmp_path, capsys):
    seg, table = write_patches(tmp_path)
    (seg / "patch_2.npz").unlink()
    out = tmp_path / "repaired"
    assert main(["repair-masks", "--segment-dir", str(seg), "--metadata", str(table), "--out", str(out)]) == 2
    assert "patch_2.npz" in capsys.readouterr().err and not out.exists()
    assert main(["repair-masks", "--segment-dir", str(seg), "--out", str(out)]) == 2
    assert "--metadata" in capsys.readouterr().err
    assert main(["repair-masks", "--cells", "a.tif", "--out", str(out)]) == 2
    assert "--nuclei" in capsys.readouterr().err
