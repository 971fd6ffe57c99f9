"""Every stage x every class of bad input: exit 2, a message naming the file or the value, and the
outputs of the earlier good run left exactly as they were (bytes compared, no staging left).

Each stage first runs once on good tiny inputs ("golden" outputs).  A case copies those outputs to
a fresh folder, reruns the stage there the way a user would (``maskworks <stage> ...``) with one
thing broken, and compares the folder before and after.  ``test_the_table`` prints the measured
outcomes (stage x class -> exit code, target, message).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
from golden import SHAPE, STAGES, VS, _fmt, _point_project_at, _state, run_stage

from maskworks.io import write_volume

# ----------------------------------------------------------------------------- broken inputs


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def _copy_in(env, bad: Path, name: str) -> Path:
    src = env["in"] / name
    dst = bad / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


@dataclass
class Case:
    stage: str
    kind: str  # the bad-input class
    what: str  # what is broken, in words (the table's row)
    edit: Callable  # (args, env, bad) -> args of the broken run
    expect: str  # text the message must hold ({bad} and {in} are filled in)


def _with_file(name, damage, key=None):
    """Args with the input ``{in}/name`` replaced by a damaged copy in ``{bad}``."""
    def edit(args, env, bad):
        copy = _copy_in(env, bad, name)
        damage(copy)
        return [a.replace(str(env["in"] / name), str(copy)) if a.startswith(str(env["in"] / name)) else a
                for a in args]
    return edit


def _extra(*more):
    return lambda args, env, bad: [*args, *more]


def _nan_volume(path):
    write_volume(path, np.full(SHAPE, np.nan, np.float32), VS, unit="nanometer")


def _write_2d(path):
    write_volume(path, np.zeros(SHAPE[1:], np.float32), VS[1:], unit="nanometer")


def _float_mask(path):
    write_volume(path, np.full(SHAPE, 0.5, np.float32), VS, unit="nanometer")


def _other_shape(path):
    write_volume(path, np.zeros((SHAPE[0], 32, SHAPE[2]), np.uint8), VS, unit="nanometer")


def _tiff_bad_voxel_size(path):
    data = tifffile.imread(path)
    tifffile.imwrite(path, data, metadata={"voxel_size": [float("nan"), 16.0, 16.0], "unit": "nanometer"})


def _damage_zarr_chunk(store: Path):
    chunk = sorted(p for p in store.rglob("*") if p.is_file() and not p.name.startswith("."))[0]
    chunk.write_bytes(b"not a chunk at all")


def _five_d_tiff(path):
    tifffile.imwrite(path, np.zeros((2, 2, 2, 16, 16), np.uint16))


def _latin1_names(path):
    path.write_bytes("CD45\nDAPI\nKi67\nPanCK\xe9\n".encode("latin-1"))


def _npz_truncated(folder: Path):
    _truncate(sorted(folder.glob("patch_*.npz"))[0])


def _delete_copick_chunk(project: Path):
    store = next((project / "ExperimentRuns" / "TS_001").rglob("*membrain-seg_1_membrane.zarr"))
    next(p for p in sorted((store / "0").rglob("*")) if p.is_file() and not p.name.startswith(".")).unlink()


def _labels(dtype, value, nuclei=(64, 64)):
    """repair-masks on one image pair: cells holding ``value`` in ``dtype``, nuclei of shape ``nuclei``."""
    def edit(args, env, bad):
        cells = np.zeros((64, 64), dtype)
        cells[10:30, 10:30] = value
        nuc = np.zeros(nuclei, np.uint16)
        nuc[15:25, 15:25] = 1
        tifffile.imwrite(bad / "cells.tif", cells)
        tifffile.imwrite(bad / "nuclei.tif", nuc)
        return ["repair-masks", "--cells", str(bad / "cells.tif"), "--nuclei", str(bad / "nuclei.tif"),
                "--out", args[args.index("--out") + 1]]
    return edit


CASES = [
    # texture-mask
    Case("texture-mask", "truncated", "TIFF cut in half", _with_file("vol.tif", _truncate), "{bad}/vol.tif"),
    Case("texture-mask", "NaN/Inf", "volume of NaN", _with_file("vol.tif", _nan_volume), "NaN"),
    Case("texture-mask", "wrong dims", "2-D image", _with_file("vol.tif", _write_2d), "{bad}/vol.tif"),
    Case("texture-mask", "shape mismatch", "truth of another shape",
         _extra("--truth", "{bad}/other.tif"), "{bad}/other.tif"),
    Case("texture-mask", "header geometry", "voxel size NaN in the TIFF",
         _with_file("vol.tif", _tiff_bad_voxel_size), "voxel size"),
    Case("texture-mask", "parameter", "--edge-sigma 1e6", _extra("--edge-sigma", "1e6"), "edge_sigma=1000000.0"),
    Case("texture-mask", "parameter", "--chunk-shape 2", _extra("--chunk-shape", "2"), "chunk_shape='2'"),
    Case("texture-mask", "parameter", "--voxel-size inf", _extra("--voxel-size", "inf"), "voxel_size"),
    # postprocess-mask
    Case("postprocess-mask", "truncated", "TIFF cut in half", _with_file("truth.tif", _truncate), "{bad}/truth.tif"),
    Case("postprocess-mask", "wrong dtype", "float mask", _with_file("truth.tif", _float_mask), "{bad}/truth.tif"),
    Case("postprocess-mask", "wrong dims", "2-D mask", _with_file("truth.tif", _write_2d), "{bad}/truth.tif"),
    Case("postprocess-mask", "shape mismatch", "truth of another shape",
         _extra("--truth", "{bad}/other.tif"), "{bad}/other.tif"),
    Case("postprocess-mask", "parameter", "--grow-radius 1000", _extra("--grow-radius", "1000"), "grow_radius=1000"),
    # train-unet
    Case("train-unet", "truncated", "label TIFF cut in half", _with_file("truth.tif", _truncate), "{bad}/truth.tif"),
    Case("train-unet", "NaN/Inf", "image of NaN", _with_file("vol.tif", _nan_volume), "NaN"),
    Case("train-unet", "wrong dtype", "float labels", _with_file("truth.tif", _float_mask), "{bad}/truth.tif"),
    Case("train-unet", "shape mismatch", "labels of another shape", _with_file("truth.tif", _other_shape),
         "{bad}/truth.tif"),
    Case("train-unet", "parameter", "--learning-rate -1", _extra("--learning-rate", "-1"), "learning_rate=-1.0"),
    Case("train-unet", "parameter", "--patch-size 100000", _extra("--patch-size", "100000"), "patch_size"),
    Case("train-unet", "parameter", "--zoom-range 1.2,0.8", _extra("--zoom-range", "1.2,0.8"), "zoom_range"),
    # predict-unet
    Case("predict-unet", "truncated", "checkpoint cut in half", _with_file("model", lambda d: _truncate(d / "best.pt")),
         "best.pt"),
    Case("predict-unet", "NaN/Inf", "volume of NaN", _with_file("vol.tif", _nan_volume), "NaN"),
    Case("predict-unet", "wrong dims", "2-D image", _with_file("vol.tif", _write_2d), "{bad}/vol.tif"),
    Case("predict-unet", "shape mismatch", "truth of another shape",
         _extra("--truth", "{bad}/other.tif"), "{bad}/other.tif"),
    Case("predict-unet", "parameter", "--sw-batch-size 0", _extra("--sw-batch-size", "0"), "sw_batch_size=0"),
    Case("predict-unet", "parameter", "--mean nan --std 1", _extra("--mean", "nan", "--std", "1"), "mean=nan"),
    # extract-patches
    Case("extract-patches", "truncated", "MRC cut in half", _with_file("tomo.mrc", _truncate), "{bad}/tomo.mrc"),
    Case("extract-patches", "shape mismatch", "segmentation of another shape",
         _with_file("seg.mrc", lambda p: write_volume(p, np.zeros((8, 8, 8), np.uint8), 10.0)), "shape"),
    Case("extract-patches", "corrupt", "centres CSV with a word", _with_file(
        "centres.csv", lambda p: p.write_text("x,y,z\n20,twenty,20\n")), "{bad}/centres.csv"),
    Case("extract-patches", "parameter", "--border 12 of a 24 patch", _extra("--border", "12"), "border=12"),
    Case("extract-patches", "parameter", "--ds-token a_b", _extra("--ds-token", "a_b"), "ds_token='a_b'"),
    # merge-corrections
    Case("merge-corrections", "truncated", "correction NRRD cut in half", _with_file(
        "corrections", lambda d: _truncate(next(d.rglob("Add1.nrrd")), 0.3)), "Add1.nrrd"),
    Case("merge-corrections", "shape mismatch", "correction of another shape", _with_file(
        "corrections", lambda d: write_volume(next(d.rglob("Add1.nrrd")), np.ones((8, 8, 8), np.uint8), 10.0,
                                              unit="angstrom")), "Add1.nrrd"),
    Case("merge-corrections", "parameter", "--border -1", _extra("--border", "-1"), "border=-1"),
    # refine-membranes (the project is a copy inside {out})
    Case("refine-membranes", "missing chunk", "membrane chunk deleted",
         lambda args, env, bad: (_delete_copick_chunk(Path(args[2]).parent), args)[1], "missing"),
    Case("refine-membranes", "empty result", "nothing kept over a non-empty earlier output",
         _extra("--min-membrane-area", "1000000000"), "kept nothing"),
    Case("refine-membranes", "parameter", "--save-session-id ''", _extra("--save-session-id", ""),
         "save_session_id=''"),
    Case("refine-membranes", "parameter", "--ball-size 0", _extra("--ball-size", "0"), "ball_size=0"),
    Case("refine-membranes", "parameter", "--voxel-size 7 (no such spacing)", _extra("--voxel-size", "7"),
         "voxel size 7"),
    # tile-image
    Case("tile-image", "truncated", "OME-TIFF cut in half", _with_file("slide.ome.tif", _truncate),
         "{bad}/slide.ome.tif"),
    Case("tile-image", "wrong dims", "5-D TIFF", _with_file("slide.ome.tif", _five_d_tiff), "{bad}/slide.ome.tif"),
    Case("tile-image", "corrupt", "channel names not UTF-8", _with_file("channels.txt", _latin1_names),
         "{bad}/channels.txt"),
    Case("tile-image", "parameter", "--image-mpp 0", _extra("--image-mpp", "0"), "image_mpp"),
    Case("tile-image", "parameter", "--overlap 0.999", _extra("--overlap", "0.999"), "overlap=0.999"),
    # segment-cells
    Case("segment-cells", "corrupt", "patch store chunk damaged",
         _with_file("tiles", lambda d: _damage_zarr_chunk(d / "patches.zarr")), "patches.zarr"),
    Case("segment-cells", "corrupt", "patch table without is_informative", _with_file(
        "tiles", lambda d: (d / "patches_metadata.csv").write_text("patch_id,informative\n0,True\n")),
         "is_informative"),
    Case("segment-cells", "parameter", "--min-nucleus-distance 0", _extra("--min-nucleus-distance", "0"),
         "min_nucleus_distance=0"),
    # repair-masks
    Case("repair-masks", "truncated", "label NPZ cut", _with_file("seg", _npz_truncated), "patch_"),
    Case("repair-masks", "wrong dtype", "negative cell labels", _labels(np.int32, -3), "{bad}/cells.tif"),
    Case("repair-masks", "wrong dtype", "float cell labels", _labels(np.float32, 1.5), "{bad}/cells.tif"),
    Case("repair-masks", "shape mismatch", "nuclei of another shape", _labels(np.uint16, 1, nuclei=(40, 40)),
         "{bad}/nuclei.tif"),
    # stitch
    Case("stitch", "truncated", "label NPZ cut", _with_file("rep", _npz_truncated), "patch_"),
    Case("stitch", "parameter", "--duplicate-overlap -1", _extra("--duplicate-overlap", "-1"),
         "duplicate_overlap=-1.0"),
    # quantify
    Case("quantify", "shape mismatch", "image of another size", _with_file(
        "slide.ome.tif", lambda p: tifffile.imwrite(p, np.zeros((4, 100, 100), np.uint16), ome=True,
                                                    metadata={"axes": "CYX"})), "{bad}/slide.ome.tif"),
    Case("quantify", "parameter", "--neighbour-radius -5", _extra("--neighbours", "radius", "--neighbour-radius", "-5"),
         "neighbour_radius=-5.0"),
]

RESULTS: list[tuple] = []


def _bad_side_files(env, bad):
    """Inputs of another shape that several cases point at."""
    write_volume(bad / "other.tif", np.zeros((SHAPE[0], 32, SHAPE[2]), np.uint8), VS, unit="nanometer")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.stage}:{c.what}" for c in CASES])
def test_bad_input(env, tmp_path, capsys, case):
    out, bad = tmp_path / "out", tmp_path / "bad"
    bad.mkdir()
    shutil.copytree(env["golden"] / case.stage, out)
    if case.stage == "refine-membranes":
        _point_project_at(out / "copick")
    _bad_side_files(env, bad)
    where = {"in": env["in"], "out": out, "bad": bad}
    args = case.edit(_fmt(STAGES[case.stage], **where), env, bad)
    args = _fmt(args, **where)
    before = _state(out)
    code, err = run_stage(args, capsys)
    expect = case.expect.format(**where)
    intact = _state(out) == before
    RESULTS.append((case.stage, case.kind, case.what, code, err.strip().splitlines()[-1] if err.strip() else "",
                    "intact" if intact else "CHANGED"))
    assert code == 2, err
    assert expect in err, err
    assert "Traceback" not in err
    assert intact, "the earlier outputs changed"


# ----------------------------------------------------------------------------- read-only and full disks


@pytest.fixture()
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only); skipped with the reason where mounting is not allowed."""
    mounts = []

    def mount(path: Path, size: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'}): "
                        "the read-only and full-disk cases need one")
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _pages(folder: Path) -> int:
    """The 4 KiB pages a tmpfs needs for the files under ``folder`` (and one per folder)."""
    return sum(-(-p.stat().st_size // 4096) if p.is_file() else 1 for p in folder.rglob("*"))


@pytest.mark.parametrize("disk", ["read-only", "full"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_an_output_folder_that_cannot_be_written(env, tmp_path, tmpfs, capsys, stage, disk):
    """The rerun fails with exit 2 and a message naming where it could not write; the earlier
    outputs on that disk are exactly as they were."""
    golden = env["golden"] / stage
    out = tmpfs(tmp_path / "disk", _pages(golden) * 4096 if disk == "full" else 64 << 20)  # room for the old set
    for p in golden.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, out / p.name)
    if stage == "refine-membranes":
        _point_project_at(out / "copick")
    if disk == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
    before = _state(out)
    args = _fmt(STAGES[stage], **{"in": env["in"], "out": out, "bad": tmp_path})
    code, err = run_stage(args, capsys)
    intact = _state(out) == before
    RESULTS.append((stage, f"{disk} disk", f"output folder on a {disk} tmpfs", code,
                    err.strip().splitlines()[-1] if err.strip() else "", "intact" if intact else "CHANGED"))
    assert code == 2, err
    assert str(out) in err and "Traceback" not in err, err
    assert ("Read-only" in err or "not writable" in err) if disk == "read-only" else "No space left" in err, err
    assert intact, "the earlier outputs changed"


def test_the_table(capsys):
    """Print the measured table (stage x class -> exit code, message, target) for the closing note."""
    if not RESULTS:
        pytest.skip("no case ran in this session")
    with capsys.disabled():
        print("\n| stage | class | broken | exit | target | message |\n|---|---|---|---|---|---|")
        for stage, kind, what, code, msg, state in RESULTS:
            print(f"| {stage} | {kind} | {what} | {code} | {state} | {msg[:160].replace('|', '/')} |")
