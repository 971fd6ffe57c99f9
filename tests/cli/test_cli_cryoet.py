"""`maskworks extract-patches` and `maskworks merge-corrections` on tiny files."""

from __future__ import annotations

import csv

import nibabel as nib
import nrrd
import numpy as np
import pytest
from conftest import exe, run

from maskworks.cli import main
from maskworks.io import read_volume, write_volume

SHAPE = (12, 16, 20)  # z, y, x
VS = (10.0, 10.0, 10.0)
ORIGIN = (100.0, 200.0, 300.0)  # z, y, x in angstrom


@pytest.fixture()
def tomo(tmp_path):
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    seg = np.zeros(SHAPE, np.uint8)
    seg[4:8, 6:10, 8:12] = 1
    t = write_volume(tmp_path / "tomo.mrc", image, VS, unit="angstrom", origin=ORIGIN)
    s = write_volume(tmp_path / "tomo_seg.mrc", seg, VS, unit="angstrom", origin=ORIGIN)
    c = tmp_path / "centres.csv"
    c.write_text("x,y,z\n10.4,8,6\n1,8.2,6\n14,9,5.5\n")
    return tmp_path, t, s, c, image, seg


def _manifest(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_extract_writes_patches_with_geometry_manifest_and_qc(tomo):
    d, t, s, c, image, seg = tomo
    out = d / "out"
    assert main(["extract-patches", str(t), str(s), str(out), "--centres", str(c),
                 "--patch-size", "8", "--border", "2"]) == 0
    names = [f"other_tomo_patch{n}.nrrd" for n in range(3)]
    assert _files(out) == sorted(["manifest.csv", "patches_qc.png", *(f"imagesCorr/{n}" for n in names),
                                  *(f"labelsCorr/{n}" for n in names)])
    # centre 0: x=10.4 -> 10, y=8, z=6 -> start (z, y, x) = (2, 4, 6)
    data, header = nrrd.read(str(out / "imagesCorr" / names[0]), index_order="C")
    np.testing.assert_array_equal(data, image[2:10, 4:12, 6:14])
    np.testing.assert_allclose(header["space origin"], [300 + 6 * 10, 200 + 4 * 10, 100 + 2 * 10])  # x, y, z
    np.testing.assert_allclose(header["space directions"], np.diag([10.0, 10.0, 10.0]))
    lab = read_volume(out / "labelsCorr" / names[0])
    assert lab.dtype == np.uint8 and lab.origin == (120.0, 240.0, 360.0) and lab.unit == "angstrom"
    inner = lab.numpy()[2:6, 2:6, 2:6]
    np.testing.assert_array_equal(inner, seg[4:8, 6:10, 8:12])
    assert np.count_nonzero(lab.numpy() == 2) == 512 - 64
    # centre 1: x=1 -> start x = -3, three x-planes padded with the mean and 2
    img1 = read_volume(out / "imagesCorr" / names[1]).numpy()
    np.testing.assert_allclose(img1[:, :, :3], image.mean())
    assert (read_volume(out / "labelsCorr" / names[1]).numpy()[:, :, :3] == 2).all()
    rows = _manifest(out / "manifest.csv")
    assert [r["N"] for r in rows] == ["0", "1", "2"]
    assert (rows[0]["start_z"], rows[0]["start_y"], rows[0]["start_x"]) == ("2", "4", "6")
    assert rows[0]["padded_voxels"] == "0" and rows[1]["padded_voxels"] == str(3 * 64)
    assert rows[1]["status"] == "written" and rows[1]["label"] == f"labelsCorr/{names[1]}"
    assert (out / "patches_qc.png").stat().st_size > 1000


def test_numbers_move_past_existing_files_in_either_folder(tomo):
    d, t, s, c, _, _ = tomo
    out = d / "out"
    for f in ["labelsCorr/other_tomo_patch1.nii.gz", "imagesCorr/other_tomo_patch2.nrrd"]:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("earlier")
    assert main(["extract-patches", str(t), str(s), str(out), "--centres", str(c),
                 "--patch-size", "8", "--border", "2", "--idx-add", "1"]) == 0
    rows = _manifest(out / "manifest.csv")
    assert [r["N"] for r in rows if r["status"] == "written"] == ["3", "4", "5"]
    # the file it did not write is listed, as it is in the folder
    assert [(r["status"], r["image"]) for r in rows if r["status"] != "written"] == [
        ("existing", "imagesCorr/other_tomo_patch2.nrrd")]
    assert (out / "labelsCorr/other_tomo_patch1.nii.gz").read_text() == "earlier"
    assert (out / "imagesCorr/other_tomo_patch2.nrrd").read_text() == "earlier"
    assert (out / "labelsCorr/other_tomo_patch5.nrrd").exists()


def test_nifti_output_single_centre_and_tokens(tomo):
    d, t, s, _, image, _ = tomo
    out = d / "out"
    assert main(["extract-patches", str(t), str(s), str(out), "--x", "10", "--y", "8", "--z", "6",
                 "--patch-size", "8", "--border", "1", "--format", "nii.gz", "--ds-token", "ds1",
                 "--token", "TS_01"]) == 0
    img = nib.load(str(out / "imagesCorr" / "ds1_TS_01_patch0.nii.gz"))
    # NIfTI is RAS: the LPS position (x 360, y 240, z 120) has x and y negated
    np.testing.assert_allclose(img.affine[:3, 3], [-360, -240, 120])
    np.testing.assert_allclose(np.diag(img.affine)[:3], [-10, -10, 10])
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    back = read_volume(out / "imagesCorr" / "ds1_TS_01_patch0.nii.gz")
    np.testing.assert_array_equal(back.numpy(), image[2:10, 4:12, 6:14])
    assert back.unit == "angstrom"


def test_skip_lists_the_reason(tomo):
    d, t, s, c, _, _ = tomo
    out = d / "out"
    assert main(["extract-patches", str(t), str(s), str(out), "--centres", str(c),
                 "--patch-size", "8", "--border", "2", "--edge", "skip"]) == 0
    rows = _manifest(out / "manifest.csv")
    assert [r["status"] for r in rows] == ["written", "skipped", "written"]
    assert rows[1]["N"] == "" and "x<0" in rows[1]["reason"] and rows[1]["image"] == ""
    assert _files(out / "labelsCorr") == ["other_tomo_patch0.nrrd", "other_tomo_patch2.nrrd"]


@pytest.mark.parametrize("args, words", [
    (["--edge", "error"], ["centre 1 (x=1, y=8.2, z=6)", "edge='pad'", "centres.csv"]),
    (["--ds-token", "my_ds"], ["ds_token='my_ds'", "underscores"]),
    (["--x", "3"], ["not both"]),
    (["--patch-size", "8", "--border", "4"], ["border=4"]),
])
def test_bad_input_exits_2_and_writes_nothing(tomo, capsys, args, words):
    d, t, s, c, _, _ = tomo
    out = d / "out"
    assert main(["extract-patches", str(t), str(s), str(out), "--centres", str(c),
                 "--patch-size", "8", "--border", "2", *args]) == 2
    err = capsys.readouterr().err
    assert "maskworks extract-patches: error:" in err
    for w in words:
        assert w in err
    assert not out.exists()


def test_centres_outside_and_shape_mismatch(tomo, capsys):
    d, t, s, _, _, seg = tomo
    c = d / "far.csv"
    c.write_text("5 5 5\n20 5 5\n")
    assert main(["extract-patches", str(t), str(s), str(d / "out"), "--centres", str(c)]) == 2
    err = capsys.readouterr().err
    assert "far.csv" in err and "centre 1 (x=20, y=5, z=5)" in err and "x 0..19" in err
    small = write_volume(d / "small.mrc", seg[:, :, :19], VS)
    assert main(["extract-patches", str(t), str(small), str(d / "out"), "--x", "5", "--y", "5", "--z", "5"]) == 2
    err = capsys.readouterr().err
    assert "tomo.mrc has shape (12, 16, 20)" in err and "small.mrc has shape (12, 16, 19)" in err


def test_failure_midway_removes_this_runs_patches(tomo, capsys):
    d, t, _, c, _, seg = tomo
    seg = seg.copy()
    seg[8, 9, 15] = 3  # only in the third patch (x 10..17, y 5..12, z 2..9)
    bad = write_volume(d / "bad_seg.mrc", seg, VS, unit="angstrom", origin=ORIGIN)
    out = d / "out"
    (out / "labelsCorr").mkdir(parents=True)
    (out / "labelsCorr" / "keep.nrrd").write_text("earlier")
    assert main(["extract-patches", str(t), str(bad), str(out), "--centres", str(c),
                 "--patch-size", "8", "--border", "2"]) == 2
    err = capsys.readouterr().err
    assert "values other than 0/1: 3" in err and "--binarize" in err and "centre 2" in err
    assert _files(out) == ["labelsCorr/keep.nrrd"]
    assert main(["extract-patches", str(t), str(bad), str(out), "--centres", str(c),
                 "--patch-size", "8", "--border", "2", "--binarize"]) == 0
    assert len(_files(out / "labelsCorr")) == 4


def test_console_script_exit_code(tomo):
    d, t, s, c, _, _ = tomo
    proc = run([exe("maskworks"), "extract-patches", t, s, d / "out", "--centres", c, "--ds-token", "a_b"],
               check=False)
    assert proc.returncode == 2 and "ds_token='a_b'" in proc.stderr
    assert not (d / "out").exists()


# ----------------------------------------------------------------------------- merge-corrections

PATCH = (6, 6, 6)
P_ORIGIN = (20.0, 40.0, 60.0)


def _mask(*region):
    m = np.zeros(PATCH, np.uint8)
    m[region] = 1
    return m


@pytest.fixture()
def folders(tmp_path):
    labels, corr = tmp_path / "labels", tmp_path / "corrections"
    label = np.zeros(PATCH, np.uint8)
    label[2:4, 2:4, 1:5] = 1
    geo = {"unit": "angstrom", "origin": P_ORIGIN}
    write_volume(labels / "p0.nrrd", label, VS, **geo)
    write_volume(labels / "p1.nii.gz", label, VS, **geo)
    write_volume(labels / "p2.nrrd", label, VS, **geo)
    (labels / "readme.txt").write_text("not a label")
    # p0: remove x 1..2, add a column, ignore one voxel of that column
    write_volume(corr / "p0" / "Remove1.nrrd", _mask(slice(2, 4), slice(2, 4), slice(1, 3)), VS, **geo)
    write_volume(corr / "p0" / "add_column.nrrd", _mask(slice(1, 5), 3, 2), VS, **geo)
    write_volume(corr / "p0" / "Ignore_voxel.nrrd", _mask(2, 3, 2), VS, **geo)
    write_volume(corr / "p0" / "Fix.nrrd", _mask(0, 0, 0), VS, **geo)
    # MemBrain-seg skips a name in capitals ("not fitting the naming"): so must the merge
    write_volume(corr / "p0" / "ADDX.nrrd", _mask(slice(None), slice(None), slice(None)), VS, **geo)
    (corr / "p0" / "notes.txt").write_text("?")
    # a mask without geometry (MITK-less tools) is accepted
    write_volume(corr / "p1" / "remove.npy", _mask(slice(None), slice(None), slice(None)))
    write_volume(corr / "p7" / "Add.nrrd", _mask(0, 0, 0), VS, **geo)
    write_volume(corr / "stray.nrrd", _mask(0, 0, 0), VS, **geo)
    return tmp_path, labels, corr, label


def _merge(labels, corr, out, *args):
    return main(["merge-corrections", "--labels-dir", str(labels), "--corrections-dir", str(corr),
                 "--out-dir", str(out), "--border", "1", *args])


def test_merge_applies_precedence_and_reports_everything(folders):
    d, labels, corr, label = folders
    out = d / "merged"
    assert _merge(labels, corr, out) == 0
    assert _files(out) == ["p0.nrrd", "p1.nii.gz", "p2.nrrd", "report.csv"]
    p0 = read_volume(out / "p0.nrrd")
    assert p0.origin == P_ORIGIN and p0.voxel_size == VS and p0.unit == "angstrom"
    expected = label.copy()
    expected[2:4, 2:4, 1:3] = 0  # Remove
    expected[1:5, 3, 2] = 1  # Add, over the removed voxel (2, 3, 2) and (3, 3, 2)
    expected[2, 3, 2] = 2  # Ignore
    expected[[0, -1], :, :] = expected[:, [0, -1], :] = expected[:, :, [0, -1]] = 2
    np.testing.assert_array_equal(p0.numpy(), expected)
    assert (read_volume(out / "p1.nii.gz").numpy() != 1).all()  # everything removed
    rows = {(r["key"], r["status"]): r for r in _manifest(out / "report.csv")}
    r0 = rows[("p0", "merged")]
    assert (r0["removed_voxels"], r0["added_voxels"], r0["ignored_voxels"]) == ("8", "4", "1")
    assert r0["add"] == "add_column.nrrd" and r0["ignore"] == "Ignore_voxel.nrrd"
    assert r0["foreground_voxels"] == str(np.count_nonzero(expected == 1))
    assert rows[("p2", "no corrections folder")]["output"] == "p2.nrrd"
    assert "p7" in rows[("p7", "folder without label")]["note"]
    unknown = [r["note"] for r in _manifest(out / "report.csv") if r["status"] == "unknown prefix"]
    assert len(unknown) == 2 and "p0/ADDX.nrrd" in unknown[0] and "p0/Fix.nrrd" in unknown[1]
    assert "the prefixes MemBrain-seg merges (case-sensitive)" in unknown[0]
    assert {k for k, st in rows if st == "unknown file type"} == {"p0", "readme"}
    assert ("stray", "not in a patch folder") in rows


def test_merge_format_option(folders):
    d, labels, corr, _ = folders
    out = d / "merged"
    assert _merge(labels, corr, out, "--format", "nii.gz") == 0
    assert _files(out) == ["p0.nii.gz", "p1.nii.gz", "p2.nii.gz", "report.csv"]
    assert read_volume(out / "p0.nii.gz").origin == P_ORIGIN


def test_merge_shape_mismatch_names_both_files(folders, capsys):
    d, labels, corr, _ = folders
    write_volume(corr / "p1" / "Add2.nrrd", np.zeros((6, 6, 5), np.uint8), VS)
    out = d / "merged"
    assert _merge(labels, corr, out) == 2
    err = capsys.readouterr().err
    assert "Add2.nrrd has shape (6, 6, 5)" in err and "p1.nii.gz has shape (6, 6, 6)" in err
    assert not out.exists() or _files(out) == []  # p0 had been merged: removed again


def test_merge_mask_from_another_patch_is_an_error(folders, capsys):
    d, labels, corr, _ = folders
    write_volume(corr / "p0" / "Add2.nrrd", _mask(0, 0, 0), VS, unit="angstrom",
                 origin=(20.0, 40.0, 140.0))
    assert _merge(labels, corr, d / "merged") == 2
    err = capsys.readouterr().err
    assert "Add2.nrrd" in err and "p0.nrrd" in err and "another patch" in err
    assert "(20.0, 40.0, 140.0)" in err
    # the same origin in nanometres is the same patch
    write_volume(corr / "p0" / "Add2.nrrd", _mask(0, 0, 0), (1.0, 1.0, 1.0), unit="nanometer",
                 origin=(2.0, 4.0, 6.0))
    assert _merge(labels, corr, d / "merged") == 0


def _membrane_patch(n=32):
    """A cubic label patch with two membrane sheets (z = 10 across, y = 22 on part of the patch)."""
    label = np.zeros((n,) * 3, np.uint8)
    label[10, 2:30, 2:30] = 1
    label[4:28, 22, 16:30] = 1
    return label


@pytest.mark.parametrize("kind", ["Remove", "Add"])
def test_merge_refuses_a_geometry_less_mask_that_looks_transposed(tmp_path, capsys, kind):
    """On a cubic patch a mask saved in (x, y, z) order has the right shape and the wrong voxels: a mask
    without geometry is checked by its content (Remove voxels on the membrane, Add voxels next to it)."""
    labels, corr, out = tmp_path / "labels", tmp_path / "corr", tmp_path / "merged"
    label = _membrane_patch()
    write_volume(labels / "p0.nrrd", label, VS, unit="angstrom", origin=(120.0, 40.0, 80.0))
    mask = np.zeros_like(label)
    if kind == "Remove":
        mask[10, 5:25, 3:9] = 1  # a false membrane piece
    else:
        mask[9:12, 5:25, 30] = 1  # continues the z = 10 sheet to the x border
    write_volume(corr / "p0" / f"{kind}1.npy", mask.transpose(2, 1, 0))  # no geometry, (x, y, z) order
    args = ["merge-corrections", "--labels-dir", str(labels), "--corrections-dir", str(corr), "--out-dir", str(out),
            "--border", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{kind}1.npy carries no geometry, and its content looks transposed against its label" in err
    assert "(2, 1, 0)" in err and "--allow-no-geometry" in err and not out.exists()
    # merged as saved when the user says so, and the report says how it was taken
    assert main([*args, "--allow-no-geometry"]) == 0
    row = _manifest(out / "report.csv")[0]
    assert row["geometry"] == f"{kind}1.npy:none, looks transposed"
    # the same mask in (z, y, x) order is accepted on its shape, as before
    write_volume(corr / "p0" / f"{kind}1.npy", mask)
    assert main([*args]) == 0
    assert _manifest(out / "report.csv")[0]["geometry"] == f"{kind}1.npy:none"
    merged = read_volume(out / "p0.nrrd").numpy()
    assert (merged[mask > 0] == (0 if kind == "Remove" else 1)).all()


def test_merge_bad_label_values_and_binarize(folders, capsys):
    d, labels, corr, label = folders
    write_volume(labels / "p2.nrrd", label * 255, VS, unit="angstrom", origin=P_ORIGIN)
    assert _merge(labels, corr, d / "merged") == 2
    err = capsys.readouterr().err
    assert "p2.nrrd" in err and "255" in err and "binarize" in err
    assert _merge(labels, corr, d / "merged", "--binarize") == 0


def test_merge_refuses_to_write_into_its_input(folders, capsys):
    d, labels, corr, _ = folders
    assert _merge(labels, corr, labels) == 2
    assert "input folder" in capsys.readouterr().err
    assert _merge(labels, d / "nope", d / "merged") == 2
    assert "nope: no such folder" in capsys.readouterr().err


def test_demo_patches_extract_and_merge(tmp_path):
    from maskworks.demo import (
        CRYOET_PATCHES,
        _write_cryoet_patches,
        make_cryoet_tomogram,
    )

    w = _write_cryoet_patches(tmp_path)
    cfg, out, merged = CRYOET_PATCHES, tmp_path / "patches", tmp_path / "merged"
    assert main(["extract-patches", str(w["cryoet_tomogram"]), str(w["cryoet_segmentation"]), str(out),
                 "--centres", str(w["cryoet_centres"]), "--patch-size", str(cfg["patch_size"]),
                 "--border", str(cfg["border"]), "--ds-token", cfg["ds_token"]]) == 0
    rows = _manifest(out / "manifest.csv")
    assert all(r["status"] == "written" for r in rows) and sum(r["padded_voxels"] != "0" for r in rows) >= 2
    assert main(["merge-corrections", "--labels-dir", str(out / "labelsCorr"), "--corrections-dir",
                 str(w["cryoet_corrections"]), "--out-dir", str(merged), "--border", str(cfg["border"])]) == 0
    report = {r["key"]: r for r in _manifest(merged / "report.csv")}
    assert report["demo_tomo1_patch0"]["status"] == report["demo_tomo1_patch4"]["status"] == "merged"
    assert all(r["status"] in ("merged", "no corrections folder") for r in report.values())
    # the corrections repair patch 0: outside the ignored voxels it equals the true membranes
    _, truth = make_cryoet_tomogram()
    start = [int(r) for r in (rows[0]["start_z"], rows[0]["start_y"], rows[0]["start_x"])]
    true0 = truth[tuple(slice(s, s + cfg["patch_size"]) for s in start)]
    fixed = read_volume(merged / "demo_tomo1_patch0.nrrd").numpy()
    before = read_volume(out / "labelsCorr" / "demo_tomo1_patch0.nrrd").numpy()
    keep = fixed != 2
    assert (before[keep] != true0[keep]).sum() > 100 and (fixed[keep] == true0[keep]).all()


# ----------------------------------------------------------------------------- viewers' geometry


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz"])
def test_patch_geometry_reads_the_same_in_simpleitk_for_both_formats(tmp_path, ext):
    sitk = pytest.importorskip("SimpleITK")
    data = np.arange(np.prod(PATCH), dtype=np.uint8).reshape(PATCH) % 3
    path = write_volume(tmp_path / f"p{ext}", data, VS, unit="angstrom", origin=P_ORIGIN)
    img = sitk.ReadImage(str(path))
    assert img.GetOrigin() == pytest.approx(P_ORIGIN[::-1])  # x, y, z in LPS
    assert img.GetSpacing() == pytest.approx(VS[::-1])
    assert img.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), data)  # z, y, x as ours
    back = read_volume(path)
    assert back.origin == pytest.approx(P_ORIGIN) and back.voxel_size == pytest.approx(VS)


@pytest.mark.parametrize("label_ext", [".nii.gz", ".nrrd"])
def test_a_correction_saved_by_a_simpleitk_viewer_on_our_patch_merges(tmp_path, label_ext):
    """What MITK/Slicer do: read our patch, draw, save the mask with the patch's geometry."""
    sitk = pytest.importorskip("SimpleITK")
    labels, corr = tmp_path / "labels", tmp_path / "corrections"
    label = np.zeros(PATCH, np.uint8)
    label[2:4, 2:4, 1:5] = 1
    path = write_volume(labels / f"p0{label_ext}", label, VS, unit="angstrom", origin=P_ORIGIN)
    add = _mask(slice(1, 5), 3, 2)
    drawn = sitk.GetImageFromArray(add)
    drawn.CopyInformation(sitk.ReadImage(str(path)))
    (corr / "p0").mkdir(parents=True)
    sitk.WriteImage(drawn, str(corr / "p0" / "Add1.nrrd"))
    assert _merge(labels, corr, tmp_path / "merged") == 0
    # the same merge from a mask without any geometry
    plain = tmp_path / "plain"
    write_volume(plain / "p0" / "Add1.npy", add)
    assert _merge(labels, plain, tmp_path / "merged_plain") == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "merged" / f"p0{label_ext}").numpy(),
                                  read_volume(tmp_path / "merged_plain" / f"p0{label_ext}").numpy())
    row = _manifest(tmp_path / "merged" / "report.csv")[0]
    assert row["status"] == "merged" and row["geometry"] == "Add1.nrrd:checked"


def test_a_mask_without_geometry_is_accepted_with_a_note_and_a_real_mismatch_refused(tmp_path, capsys):
    sitk = pytest.importorskip("SimpleITK")
    labels, corr = tmp_path / "labels", tmp_path / "corrections"
    label = np.zeros(PATCH, np.uint8)
    write_volume(labels / "p0.nrrd", label, VS, unit="angstrom", origin=P_ORIGIN)
    (corr / "p0").mkdir(parents=True)
    # napari and many scripts: spacing 1, origin 0 (SimpleITK's defaults), whatever the unit says
    sitk.WriteImage(sitk.GetImageFromArray(_mask(1, 1, 1)), str(corr / "p0" / "Add1.nii.gz"))
    assert _merge(labels, corr, tmp_path / "merged") == 0
    row = _manifest(tmp_path / "merged" / "report.csv")[0]
    assert row["geometry"] == "Add1.nii.gz:none" and "geometry: none in Add1.nii.gz" in row["note"]
    assert read_volume(tmp_path / "merged" / "p0.nrrd").numpy()[1, 1, 1] == 1
    # a mask that carries a real, different geometry (another patch) is still refused
    other = sitk.GetImageFromArray(_mask(1, 1, 1))
    other.SetSpacing(VS[::-1])
    other.SetOrigin((P_ORIGIN[2] + 50, P_ORIGIN[1], P_ORIGIN[0]))
    sitk.WriteImage(other, str(corr / "p0" / "Add2.nrrd"))
    assert _merge(labels, corr, tmp_path / "merged2") == 2
    assert "another patch" in capsys.readouterr().err


def test_extract_keeps_the_tomogram_dtype_unless_told(tmp_path):
    image = (np.arange(np.prod(SHAPE)) % 200 - 100).astype(np.int8).reshape(SHAPE)
    seg = np.zeros(SHAPE, np.uint8)
    t = write_volume(tmp_path / "tomo.mrc", image, VS, unit="angstrom")
    s = write_volume(tmp_path / "seg.mrc", seg, VS, unit="angstrom")
    assert main(["extract-patches", str(t), str(s), str(tmp_path / "a"), "--x", "1", "--y", "8", "--z", "6",
                 "--patch-size", "8", "--border", "1"]) == 0
    p = read_volume(tmp_path / "a" / "imagesCorr" / "other_tomo_patch0.nrrd").numpy()
    assert p.dtype == np.int8 and p[:, :, :3].min() == p[:, :, :3].max() == round(float(image.mean()))
    np.testing.assert_array_equal(p[:, :, 3:], image[2:10, 4:12, 0:5])
    assert read_volume(tmp_path / "a" / "labelsCorr" / "other_tomo_patch0.nrrd").dtype == np.uint8
    assert main(["extract-patches", str(t), str(s), str(tmp_path / "b"), "--x", "10", "--y", "8", "--z", "6",
                 "--patch-size", "8", "--border", "1", "--image-dtype", "float32"]) == 0
    assert read_volume(tmp_path / "b" / "imagesCorr" / "other_tomo_patch0.nrrd").dtype == np.float32


def test_rerun_into_the_same_folder_is_idempotent(tomo, tmp_path):
    """The same centres give the same files (MemBrain-seg users rerun the extraction); new centres
    continue the numbering; the manifest lists every patch in the folder."""
    d, t, s, c, _, _ = tomo
    out = tmp_path / "out"
    args = ["extract-patches", str(t), str(s), str(out), "--centres", str(c), "--patch-size", "8",
            "--border", "2"]
    assert main(args) == 0

    def contents():  # pynrrd stamps the time into its header: compare what the files hold
        return {f"{sub}/{p.name}": (v.numpy().tobytes(), v.voxel_size, v.origin)
                for sub in ("imagesCorr", "labelsCorr") for p in sorted((out / sub).iterdir())
                for v in [read_volume(p)]}

    first = contents()
    manifest = (out / "manifest.csv").read_text()
    assert main(args) == 0
    assert contents() == first and len(first) == 6
    assert (out / "manifest.csv").read_text() == manifest
    # one new centre: the next number; the manifest keeps the earlier patches
    more = tmp_path / "more.csv"
    more.write_text("x,y,z\n12,9,7\n")
    assert main(args[:5] + [str(more)] + args[6:]) == 0
    rows = _manifest(out / "manifest.csv")
    written = [r for r in rows if r["status"] == "written"]
    assert [r["N"] for r in written] == ["0", "1", "2", "3"]
    assert sorted(r["image"] for r in written) == [f"imagesCorr/{n}" for n in _files(out / "imagesCorr")]


def _training_input(root, tomograms=("tomoA", "tomoB", "tomoC"), n=2, size=20, vs=8.0):
    rng = np.random.default_rng(5)
    args = []
    for t in tomograms:
        for i in range(n):
            label = (rng.random((size,) * 3) < 0.3).astype(np.uint8)
            label[:2] = 2
            key = f"demo_{t}_patch{i}"
            write_volume(root / t / "merged" / f"{key}.nrrd", label, (vs,) * 3, unit="angstrom", origin=ORIGIN)
            write_volume(root / t / "imagesCorr" / f"{key}.nrrd", rng.standard_normal((size,) * 3).astype(np.float32),
                         (vs,) * 3, unit="angstrom", origin=ORIGIN)
        args += ["--tomogram", t, str(root / t / "merged"), str(root / t / "imagesCorr")]
    (root / "tomoA" / "merged" / "report.csv").write_text("key\n")  # merge-corrections' report: not a patch
    return args


def test_export_training_writes_membrain_seg_s_layout_split_by_tomogram(tmp_path):
    args = _training_input(tmp_path / "in")
    out = tmp_path / "training"
    assert main(["export-training", *args, "--out-dir", str(out), "--val-fraction", "0.34", "--seed", "3"]) == 0
    rows = _manifest(out / "dataset.csv")
    val = {r["tomogram"] for r in rows if r["split"] == "Val"}
    train = {r["tomogram"] for r in rows if r["split"] == "Tr"}
    assert len(val) == 1 and len(train) == 2 and not val & train  # no tomogram on both sides
    for r in rows:
        assert (out / r["image"]).name == f"{r['key']}_0000.nii.gz" and (out / r["image"]).parent.name == \
            f"images{r['split']}"
        assert (out / r["label"]).name == f"{r['key']}.nii.gz" and (out / r["label"]).parent.name == \
            f"labels{r['split']}"
        lab = read_volume(out / r["label"])
        src = read_volume(r["source_label"])
        np.testing.assert_array_equal(lab.numpy(), src.numpy())
        assert lab.voxel_size == (8.0, 8.0, 8.0) and lab.origin == ORIGIN and lab.unit == "angstrom"
    assert sorted(p.name for p in out.iterdir()) == [".maskworks", "dataset.csv", "dataset.json", "imagesTr",
                                                     "imagesVal", "labelsTr", "labelsVal"]
    # the split depends on the seed and the names only, not on the order the tomograms are given in
    shuffled = [*args[8:], *args[:8]]
    assert main(["export-training", *shuffled, "--out-dir", str(tmp_path / "again"), "--val-fraction", "0.34",
                 "--seed", "3"]) == 0
    assert {r["tomogram"] for r in _manifest(tmp_path / "again" / "dataset.csv") if r["split"] == "Val"} == val


def test_export_training_resamples_images_linearly_and_labels_by_nearest(tmp_path):
    args = _training_input(tmp_path / "in", tomograms=("tomoA",), n=1, size=20, vs=8.0)
    out = tmp_path / "training"
    assert main(["export-training", *args, "--out-dir", str(out), "--pixel-size", "10"]) == 0
    row = _manifest(out / "dataset.csv")[0]
    assert row["split"] == "Tr" and row["voxel_size_out"] == "10 10 10"
    lab, img = read_volume(out / row["label"]), read_volume(out / row["image"])
    src = read_volume(row["source_label"]).numpy()
    assert lab.shape == img.shape == (16, 16, 16) and lab.voxel_size == (10.0, 10.0, 10.0)
    assert set(np.unique(lab.numpy())) == {0, 1, 2}  # the ignore label survives resampling
    assert (lab.numpy()[:1] == 2).all() and abs((lab.numpy() == 1).mean() - (src == 1).mean()) < 0.05
    # voxel 0's corner stays in place: the new centre is 1 A further (10/2 - 8/2)
    assert lab.origin == tuple(o + 1.0 for o in ORIGIN)
    src_img = read_volume(row["source_image"]).numpy()
    assert abs(float(img.numpy().mean()) - float(src_img.mean())) < 0.05 and img.numpy().dtype == np.float32


def test_export_training_replaces_its_own_folder_and_nothing_else(tmp_path, capsys):
    args = _training_input(tmp_path / "in")
    out = tmp_path / "training"
    assert main(["export-training", *args, "--out-dir", str(out), "--seed", "0", "--val-fraction", "0.34"]) == 0
    first = {p.relative_to(out) for p in out.rglob("*.nii.gz")}
    assert main(["export-training", *args, "--out-dir", str(out), "--seed", "0", "--val-fraction", "0"]) == 0
    second = {p.relative_to(out) for p in out.rglob("*.nii.gz")}
    assert all(p.parts[0] in ("imagesTr", "labelsTr") for p in second) and len(second) == len(first) == 12
    # a folder maskworks did not write is never replaced; a missing image is named
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export-training", *args, "--out-dir", str(tmp_path / "mine")]) == 2
    assert "is a folder that maskworks did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (tmp_path / "in" / "tomoB" / "imagesCorr" / "demo_tomoB_patch1.nrrd").unlink()
    assert main(["export-training", *args, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tomogram tomoB: label patch" in err and "demo_tomoB_patch1.nrrd has no image patch" in err
    assert {p.relative_to(out) for p in out.rglob("*.nii.gz")} == second  # the earlier export is intact


SPOTS = [(48, 60, 70), (40, 250, 90), (56, 160, 250), (44, 270, 270)]  # z, y, x of planted uncertain regions


def _uncertainty_map(path, kind="uncertainty", shape=(96, 320, 320)):
    rng = np.random.default_rng(11)
    u = rng.random(shape, dtype=np.float32) * 0.2
    for s in SPOTS:
        u[tuple(slice(c - 12, c + 12) for c in s)] += 0.8
    data = u if kind == "uncertainty" else (1.0 - u) * np.where(rng.random(shape) < 0.5, -6, 6).astype(np.float32)
    write_volume(path, data.astype(np.float32), VS, unit="angstrom", origin=ORIGIN)
    return path


@pytest.mark.parametrize("kind", ["uncertainty", "scores"])
def test_proposed_centres_fall_on_the_planted_uncertain_spots(tmp_path, kind):
    """An uncertainty map (or MemBrain-seg-style scores, least sure near 0) with four planted spots: the four
    best centres are on them (to within half a block), a patch apart, with their patch inside the tomogram;
    extract-patches cuts them without padding."""
    m = _uncertainty_map(tmp_path / "map.mrc", kind)
    out = tmp_path / "centres.csv"
    assert main(["propose-centres", "--map", str(m), "--out", str(out), "--n", "4", "--patch-size", "64",
                 "--kind", kind]) == 0
    rows = _manifest(out)
    got = [(int(r["z"]), int(r["y"]), int(r["x"])) for r in rows]
    for spot in SPOTS:
        assert min(max(abs(a - b) for a, b in zip(spot, g)) for g in got) <= 4, (spot, got)
    for i, a in enumerate(got):
        assert all(32 <= c <= n - 32 for c, n in zip(a, (96, 320, 320)))
        assert all(max(abs(p - q) for p, q in zip(a, b)) >= 64 for b in got[i + 1:])
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    r0 = rows[0]
    assert float(r0["x_angstrom"]) == ORIGIN[2] + int(r0["x"]) * 10.0
    # the CSV is extract-patches' --centres
    tomo = write_volume(tmp_path / "tomo.mrc", np.zeros((96, 320, 320), np.float32), VS, unit="angstrom", origin=ORIGIN)
    seg = write_volume(tmp_path / "seg.mrc", np.zeros((96, 320, 320), np.uint8), VS, unit="angstrom", origin=ORIGIN)
    assert main(["extract-patches", str(tomo), str(seg), str(tmp_path / "patches"), "--centres", str(out),
                 "--patch-size", "64", "--edge", "error"]) == 0
    assert len(list((tmp_path / "patches" / "imagesCorr").iterdir())) == 4


def test_proposals_among_candidates_from_a_napari_points_csv(tmp_path):
    m = _uncertainty_map(tmp_path / "map.mrc")
    cands = tmp_path / "points.csv"  # napari: index, axis-0 (z), axis-1 (y), axis-2 (x)
    cands.write_text("index,axis-0,axis-1,axis-2\n0,48,200,200\n1,40,250,92\n2,47,62,70\n3,50,70,80\n")
    out = tmp_path / "centres.csv"
    assert main(["propose-centres", "--map", str(m), "--out", str(out), "--n", "3", "--patch-size", "64",
                 "--candidates", str(cands)]) == 0
    got = [(int(r["z"]), int(r["y"]), int(r["x"])) for r in _manifest(out)]
    # the two candidates on spots first; the one 10 voxels from a chosen one is too near; then the plain one
    assert got[:2] in ([(47, 62, 70), (40, 250, 92)], [(40, 250, 92), (47, 62, 70)]) and got[2] == (48, 200, 200)
