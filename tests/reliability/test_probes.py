"""What a careful user tried (issue "Outputs that can never destroy what is not theirs"), one row per
probe: the stage is run the way a user runs it, on a copy of its golden outputs, with one thing set up
to be destroyed or misread; the row holds the exit status, a piece of the message, and what must
survive byte for byte (a victim folder, an input, another run's outputs).  ``test_the_probe_table``
prints the measured table."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
from conftest import chunk_file, exe
from golden import STAGES, _digest, _fmt, _point_project_at, run_stage

from maskworks.io import read_volume, write_volume

# The file each stage's golden run wrote (relative to its output folder), used as a victim's place.
A_FILE_OUTPUT = {
    "texture-mask": "mask.tif", "postprocess-mask": "final.tif", "train-unet": "model/metrics.json",
    "predict-unet": "pred.tif", "extract-patches": "patches/manifest.csv", "merge-corrections": "merged/report.csv",
    "refine-membranes": "stats.csv", "tile-image": "tiles/patches_metadata.csv",
    "segment-cells": "seg/segment_stats.json", "repair-masks": "rep/repair_stats.json", "stitch": "st/cells.csv",
    "quantify": "q/cells.h5ad",
}


@dataclass
class Probe:
    defect: str  # the issue's number
    what: str  # the probe, in words (the table's row)
    scene: Callable  # (env, out, tmp) -> (args, survivors): the command line and what must not change
    code: int  # the exit status expected
    expect: str  # text the message (or, for exit 0, the stats) must hold
    stage: str = ""
    check: Callable | None = None  # (out) -> None: more assertions on the result
    subprocess: bool = False  # run as its own process (hangs, memory limits)
    rows: list = field(default_factory=list)


def _copy_golden(env, stage, out):
    shutil.copytree(env["golden"] / stage, out)
    if stage == "refine-membranes":
        _point_project_at(out / "copick")


def _args(env, stage, out, tmp):
    return _fmt(STAGES[stage], **{"in": env["in"], "out": out, "bad": tmp})


def _victim_folder(path: Path) -> Path:
    if path.exists():
        path.unlink()
    path.mkdir(parents=True)
    (path / "precious.txt").write_text("a week of annotation\n")
    return path


def folder_in_place_of(stage):
    def scene(env, out, tmp):
        return _args(env, stage, out, tmp), [_victim_folder(out / A_FILE_OUTPUT[stage])]
    return scene


def folder_as_option(option):
    def scene(env, out, tmp):  # the confidence map is a store: a folder of someone else's under that name
        victim = _victim_folder(tmp / ("victim.zarr" if option == "--confidence" else "victim"))
        return [*_args(env, "texture-mask", out, tmp), option, str(victim)], [victim]
    return scene


def file_in_place_of_the_folder(stage):
    """The stage's output folder (or, for single-file stages, a folder above the output) is a file."""
    def scene(env, out, tmp):
        blocker = out / "blocker"
        blocker.write_text("not a folder\n")
        args = _args(env, stage, out, tmp)
        if stage == "refine-membranes":
            i = args.index("--qc-dir")
            args[i + 1] = str(blocker / "qc")
        else:
            args = [a.replace(str(out), str(blocker)) if a.startswith(str(out)) else a for a in args]
        return args, [blocker, *[p for p in out.iterdir() if p != blocker]]
    return scene


def device_as_stats(env, out, tmp):
    return [*_args(env, "texture-mask", out, tmp), "--stats", "/dev/null"], []


def fifo_as_qc(env, out, tmp):
    os.mkfifo(tmp / "pipe")
    return [*_args(env, "texture-mask", out, tmp), "--qc", str(tmp / "pipe")], []


def shared_log_in_a_failing_run(env, out, tmp):
    log = tmp / "shared.log"
    log.write_text("lines other jobs wrote\n")
    other = tmp / "other.tif"
    write_volume(other, np.zeros((32, 32, 64), np.uint8), (16, 16, 16), unit="nanometer")
    return [*_args(env, "texture-mask", out, tmp), "--stats", str(log), "--truth", str(other)], [log, out]


def input_as_output(env, out, tmp):
    shutil.copy(env["in"] / "vol.tif", out / "vol.tif")
    return ["texture-mask", str(out / "vol.tif"), str(out / "vol.tif"), "--block-size", "16"], [out / "vol.tif"]


def hard_link_to_the_input(env, out, tmp):
    shutil.copy(env["in"] / "vol.tif", tmp / "vol.tif")
    os.link(tmp / "vol.tif", out / "linked.tif")
    return ["texture-mask", str(tmp / "vol.tif"), str(out / "linked.tif"), "--block-size", "16"], [tmp / "vol.tif"]


def stats_is_the_mask(env, out, tmp):
    return [*_args(env, "texture-mask", out, tmp), "--stats", str(out / "mask.tif")], [out]


def confidence_is_the_mask(env, out, tmp):
    args = ["texture-mask", str(env["in"] / "vol.tif"), str(out / "m.zarr"), "--confidence", str(out / "m.zarr"),
            "--block-size", "16"]
    return args, [out]


def checkpoint_as_prediction(env, out, tmp):
    shutil.copytree(env["in"] / "model", tmp / "model")
    args = ["predict-unet", str(env["in"] / "vol.tif"), str(tmp / "model" / "best.pt"), str(tmp / "model" / "best.pt")]
    return args, [tmp / "model"]


def merged_into_the_labels(env, out, tmp):
    shutil.copytree(env["in"] / "labels", tmp / "labels")
    args = ["merge-corrections", "--labels-dir", str(tmp / "labels"), "--corrections-dir",
            str(env["in"] / "corrections"), "--out-dir", str(tmp / "labels"), "--border", "2"]
    return args, [tmp / "labels"]


def escaping_patch_id(env, out, tmp):
    meta = tmp / "patches_metadata.csv"
    text = (env["in"] / "tiles" / "patches_metadata.csv").read_text().splitlines()
    head, first = text[0], text[1].split(",")
    first[0] = "x/../../evil"
    meta.write_text("\n".join([head, ",".join(first), *text[2:]]) + "\n")
    (tmp / "evil.npz").write_bytes(b"outside the segment folder")
    args = ["repair-masks", "--segment-dir", str(env["in"] / "seg"), "--metadata", str(meta), "--out", str(out / "rep")]
    return args, [tmp / "evil.npz", out]


def _detached_tomogram(tmp, data_file):
    (tmp / "t").mkdir()
    header = tmp / "t" / "tomo.nhdr"
    header.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 64 64 48\nencoding: raw\nendian: little\n"
                      f"space directions: (10,0,0) (0,10,0) (0,0,10)\nspace: left-posterior-superior\n"
                      f"data file: {data_file}\n")
    return header


def nhdr(data_file):
    def scene(env, out, tmp):
        if data_file == "fifo":
            (tmp / "t").mkdir()
            os.mkfifo(tmp / "t" / "fifo")
            header = tmp / "t" / "tomo.nhdr"
            header.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 64 64 48\nencoding: raw\n"
                              "endian: little\ndata file: fifo\n")
        else:
            header = _detached_tomogram(tmp, data_file)
        args = _args(env, "extract-patches", out, tmp)
        args[1] = str(header)
        return args, [out]
    return scene


def huge_zarr_claim(env, out, tmp):
    import zarr

    zarr.open(str(tmp / "huge.zarr"), mode="w", shape=(100000, 100000, 100000), chunks=(64, 64, 64), dtype="u1")
    return ["texture-mask", str(tmp / "huge.zarr"), str(out / "mask.tif"), "--block-size", "16"], [out]


def npz_bomb(env, out, tmp):
    seg = tmp / "seg"
    shutil.copytree(env["in"] / "seg", seg)
    bomb = sorted(seg.glob("patch_*.npz"))[0]
    with np.load(bomb) as npz:
        nucleus = npz["nucleus"]
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("cell.npy", "w", force_zip64=True) as f:  # claims 10^10 bytes; 10 MB on disk
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (100000, 100000)})
            chunk = bytes(1 << 24)
            for _ in range(600):
                f.write(chunk)
        with z.open("nucleus.npy", "w") as f:
            np.lib.format.write_array(f, nucleus)
    args = ["repair-masks", "--segment-dir", str(seg), "--metadata", str(env["in"] / "tiles" / "patches_metadata.csv"),
            "--out", str(out / "rep")]
    return args, [out]


def mrc_extended_header_claim(env, out, tmp):
    import struct

    data = bytearray((env["in"] / "tomo.mrc").read_bytes())
    struct.pack_into("<i", data, 92, 2_000_000_000)  # nsymbt: 2 GB of extended header
    (tmp / "tomo.mrc").write_bytes(bytes(data))
    args = _args(env, "extract-patches", out, tmp)
    args[1] = str(tmp / "tomo.mrc")
    return args, [out]


def session_copick_rewrites(env, out, tmp):
    return [*_args(env, "refine-membranes", out, tmp), "--save-session-id", "1_x"], [out]


def absent_zarr_chunk(env, out, tmp):
    image = read_volume(env["in"] / "vol.tif").numpy()
    store = write_volume(tmp / "vol.zarr", image, (16, 16, 16), unit="nanometer", chunks=(16, 32, 32))
    chunk_file(store / "0", (1, 1, 1)).unlink()
    return ["texture-mask", str(store), str(out / "mask.zarr"), "--block-size", "16"], []


def absent_chunk_reads_as_zeros(out):
    image = read_volume(out.parent / "tmp" / "vol.zarr").numpy()
    assert not image[16:32, 32:64, 32:64].any()  # the absent chunk reads as the fill value, as Zarr defines it


def empty_nuclear_channel(env, out, tmp):
    image = tifffile.imread(env["in"] / "slide.ome.tif")
    names = (env["in"] / "channels.txt").read_text().split()
    image[names.index("DAPI")] = 0
    tifffile.imwrite(tmp / "slide.ome.tif", image, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.5,
                                                                       "PhysicalSizeXUnit": "µm"})
    args = _args(env, "tile-image", out, tmp)
    args[1] = str(tmp / "slide.ome.tif")
    return args, []


def truth_at_another_scale(env, out, tmp):
    truth = read_volume(env["in"] / "truth.tif").numpy()
    write_volume(tmp / "truth.tif", truth, (32, 32, 32), unit="micrometer")
    return [*_args(env, "texture-mask", out, tmp), "--truth", str(tmp / "truth.tif")], []


def out_of_memory(env, out, tmp):
    big = np.zeros((256, 1024, 1024), np.float32)  # 1 GiB; the filters need several times that
    big[:, ::7] = 1.0
    write_volume(tmp / "big.zarr", big, (16, 16, 16), unit="nanometer", chunks=(64, 256, 256))
    return ["texture-mask", str(tmp / "big.zarr"), str(out / "big_mask.zarr"), "--block-size", "16",
            "--chunk-shape", "256,1024,1024"], [out]


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


PROBES = [
    *[Probe("1", f"a folder with files where {stage} writes {A_FILE_OUTPUT[stage]}", folder_in_place_of(stage), 2,
            "is a folder", stage) for stage in STAGES],
    *[Probe("1", f"texture-mask {opt} names a folder with files", folder_as_option(opt), 2,
            "is a folder" if opt != "--confidence" else "maskworks did not write", "texture-mask")
      for opt in ("--stats", "--qc", "--confidence")],
    Probe("2", "--stats /dev/null (a device)", device_as_stats, 2, "character device", "texture-mask"),
    Probe("2", "--qc names a FIFO", fifo_as_qc, 2, "named pipe", "texture-mask", subprocess=True),
    Probe("2", "a shared log as --stats of a run that fails", shared_log_in_a_failing_run, 2, "other.tif",
          "texture-mask"),
    Probe("4", "--save-session-id 1_x (copick stores 1-x)", session_copick_rewrites, 2, "would store it as '1-x'",
          "refine-membranes"),
    Probe("5", "texture-mask o/vol.tif o/vol.tif", input_as_output, 2, "is also an input", "texture-mask"),
    Probe("5", "the output is a hard link to the input", hard_link_to_the_input, 2, "is also an input",
          "texture-mask"),
    Probe("5", "--stats is the mask's path", stats_is_the_mask, 2, "given for two outputs", "texture-mask"),
    Probe("5", "--confidence is the mask's path", confidence_is_the_mask, 2, "given for two outputs",
          "texture-mask"),
    Probe("5", "predict-unet writes onto its checkpoint", checkpoint_as_prediction, 2, "is also an input",
          "predict-unet"),
    Probe("5", "merge-corrections --out-dir is the labels folder", merged_into_the_labels, 2,
          "inside the input folder", "merge-corrections"),
    Probe("6", "patch_id x/../../evil in patches_metadata.csv", escaping_patch_id, 2, "cannot be used in a file name",
          "repair-masks"),
    Probe("6", "detached NRRD 'data file: ../../../../etc/passwd'", nhdr("../../../../etc/passwd"), 2,
          "leads out of the header's folder", "extract-patches"),
    Probe("6", "detached NRRD 'data file: /etc/passwd'", nhdr("/etc/passwd"), 2, "is an absolute path",
          "extract-patches"),
    Probe("6", "detached NRRD whose data file is a FIFO", nhdr("fifo"), 2, "not a regular file", "extract-patches",
          subprocess=True),
    Probe("7", "a Zarr array claiming 100000^3 voxels", huge_zarr_claim, 2, "more than the budget", "texture-mask"),
    Probe("7", "an NPZ patch whose header claims (100000, 100000)", npz_bomb, 2, "claims shape (100000, 100000)",
          "repair-masks"),
    Probe("7", "an MRC header claiming a 2 GB extended header", mrc_extended_header_claim, 2,
          "extended header", "extract-patches"),
    *[Probe("8", f"{stage}'s output folder is a regular file", file_in_place_of_the_folder(stage), 2,
            "is a file, not a folder", stage) for stage in STAGES],
    Probe("8", "out of memory (a 3 GiB address-space limit)", out_of_memory, 3, "ran out of memory", "texture-mask",
          subprocess=True),
    Probe("9", "a chunk absent from a plain Zarr input", absent_zarr_chunk, 0, "", "texture-mask",
          check=absent_chunk_reads_as_zeros),
    Probe("9", "the nuclear channel is zero everywhere", empty_nuclear_channel, 0, "zero everywhere", "tile-image"),
    Probe("9", "--truth at 32 um voxels for a 16 nm volume", truth_at_another_scale, 0, "is it the truth of this volume",
          "texture-mask"),
]
RESULTS: list[tuple] = []


def _survivor_state(paths):
    out = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out[str(p)] = {str(q.relative_to(p)): _digest(q) for q in sorted(p.rglob("*")) if q.is_file()
                           and not q.name.startswith(".mw-")}
        else:
            out[str(p)] = _digest(p) if p.exists() else None
    return out


@pytest.mark.parametrize("probe", PROBES, ids=[f"{p.defect}:{p.what}" for p in PROBES])
def test_probe(env, tmp_path, capsys, caplog, probe):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    _copy_golden(env, probe.stage, out)
    args, survivors = probe.scene(env, out, tmp)
    before = _survivor_state(survivors)
    if probe.subprocess:
        proc = subprocess.run([exe("maskworks"), *args], capture_output=True, text=True, timeout=300,
                              preexec_fn=_limit_memory if probe.code == 3 else None)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = run_stage(args, capsys)
    intact = _survivor_state(survivors) == before
    last = err.strip().splitlines()[-1] if err.strip() else ""
    RESULTS.append((probe.defect, probe.what, code, "intact" if intact else "CHANGED", last))
    assert code == probe.code, err
    assert "Traceback" not in err, err
    if probe.code:
        assert probe.expect in err, err
    elif probe.expect:
        stats = "".join(p.read_text() for p in out.rglob("*_stats.json"))
        assert probe.expect in stats and probe.expect in err + caplog.text, (stats, err)  # stats and log
    assert intact, "something that was not the stage's to replace changed"
    assert Path("/dev/null").is_char_device()
    if probe.check:
        probe.check(out)


def test_the_probe_table(capsys):
    """Print the measured table (probe -> exit status, survivors, message) for the closing note."""
    if not RESULTS:
        pytest.skip("no probe ran in this session")
    with capsys.disabled():
        print("\n| # | probe | exit | survivors | message |\n|---|---|---|---|---|")
        for defect, what, code, state, msg in RESULTS:
            print(f"| {defect} | {what} | {code} | {state} | {msg[:170].replace('|', '/')} |")
