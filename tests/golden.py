"""Good tiny inputs for every stage and each stage's outputs of one good run (the "golden" set),
shared by the reliability tests: each case copies a stage's golden outputs and reruns the stage
there the way a user would, with one thing broken."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import tifffile

from maskworks.cli import main
from maskworks.io import read_volume, write_volume

SHAPE = (32, 64, 64)
VS = (16, 16, 16)
TINY_NET = ["--channels", "4,8", "--strides", "2", "--num-res-units", "0", "--patch-size", "16",
            "--split-block-shape", "16", "--epochs", "1", "--patches-per-epoch", "2", "--val-patches", "1",
            "--batch-size", "1", "--device", "cpu"]
ORG, MEM = "organelles", "membrane,membrain-seg,1"

# stage -> command line of its good run; {in}: the shared good inputs, {out}: the output folder,
# {bad}: the case's own folder of broken inputs.
STAGES = {
    "texture-mask": ["texture-mask", "{in}/vol.tif", "{out}/mask.tif", "--block-size", "16"],
    "postprocess-mask": ["postprocess-mask", "{in}/truth.tif", "{out}/final.tif"],
    "train-unet": ["train-unet", "{out}/model", "--images", "{in}/vol.tif", "--labels", "{in}/truth.tif", *TINY_NET],
    "predict-unet": ["predict-unet", "{in}/vol.tif", "{in}/model/best.pt", "{out}/pred.tif", "--roi-size", "16",
                     "--overlap", "4", "--device", "cpu"],
    "extract-patches": ["extract-patches", "{in}/tomo.mrc", "{in}/seg.mrc", "{out}/patches", "--centres",
                        "{in}/centres.csv", "--patch-size", "24", "--border", "2"],
    "merge-corrections": ["merge-corrections", "--labels-dir", "{in}/labels", "--corrections-dir",
                          "{in}/corrections", "--out-dir", "{out}/merged", "--border", "2"],
    "refine-membranes": ["refine-membranes", "--config", "{out}/copick/copick_config.json", "--org-info", ORG,
                         "--mem-info", MEM, "--run", "TS_001", "--device", "cpu", "--qc-dir", "{out}/qc",
                         "--stats", "{out}/stats.csv"],
    "tile-image": ["tile-image", "{in}/slide.ome.tif", "{out}/tiles", "--channels", "{in}/channels.txt",
                   "--nuclear-channel", "DAPI", "--wholecell-channels", "CD45,PanCK", "--patch-height", "128",
                   "--patch-width", "128"],
    "segment-cells": ["segment-cells", "{in}/tiles", "{out}/seg", "--backend", "watershed"],
    "repair-masks": ["repair-masks", "--segment-dir", "{in}/seg", "--metadata", "{in}/tiles/patches_metadata.csv",
                     "--out", "{out}/rep"],
    "stitch": ["stitch", "{in}/tiles", "{in}/rep", "{out}/st"],
    "quantify": ["quantify", "{in}/slide.ome.tif", "{in}/st", "{out}/q", "--channels", "{in}/channels.txt"],
}


def _fmt(args, **where):
    return [str(a).format(**where) for a in args]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- good inputs


def make_golden(root: Path) -> dict:
    """Good inputs for every stage and each stage's golden outputs (one good run) under ``root``."""
    from conftest import write_demo

    from maskworks.demo import CODEX_SLIDE, make_codex_slide, make_cryoet_tomogram, make_em_volume

    inp, golden = root / "in", root / "golden"
    inp.mkdir()
    image, truth = make_em_volume(shape=SHAPE, seed=5)
    write_volume(inp / "vol.tif", image, VS, unit="nanometer")
    write_volume(inp / "truth.tif", truth, VS, unit="nanometer")
    tomo, seg = make_cryoet_tomogram(shape=(48, 64, 64), seed=2)
    write_volume(inp / "tomo.mrc", tomo.astype(np.float32), 10.0, unit="angstrom")
    write_volume(inp / "seg.mrc", seg.astype(np.uint8), 10.0, unit="angstrom")
    (inp / "centres.csv").write_text("x,y,z\n20,20,20\n40,30,24\n")
    slide = make_codex_slide((256, 320), seed=1)
    tifffile.imwrite(inp / "slide.ome.tif", slide["image"], ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"})
    (inp / "channels.txt").write_text("\n".join(CODEX_SLIDE["channels"]) + "\n")
    project = write_demo(root / "copick_src", arms=("copick",)) / "cryoet" / "copick"

    def good(stage, out):
        out.mkdir(parents=True, exist_ok=True)
        if stage == "refine-membranes":
            _copy_project(project, out / "copick")
        args = _fmt(STAGES[stage], **{"in": inp, "out": out, "bad": root})
        code, err = run_stage(args)
        assert code == 0, (stage, err[-3000:])
        return out

    # Stages feed each other: the outputs of one are the inputs of the next.
    for stage in STAGES:
        good(stage, golden / stage)
        if stage == "train-unet":
            shutil.copytree(golden / stage / "model", inp / "model")
        if stage == "extract-patches":
            shutil.copytree(golden / stage / "patches" / "labelsCorr", inp / "labels")
            label = read_volume(sorted((inp / "labels").iterdir())[0])
            key = label.path.name.split(".")[0]
            (inp / "corrections" / key).mkdir(parents=True)
            add = np.zeros(label.shape, np.uint8)
            add[8:12, 8:12, 8:12] = 1
            write_volume(inp / "corrections" / key / "Add1.nrrd", add, label.voxel_size, unit=label.unit,
                         origin=label.origin)
        if stage in ("tile-image", "segment-cells", "stitch"):
            name = {"tile-image": "tiles", "segment-cells": "seg", "stitch": "st"}[stage]
            shutil.copytree(golden / stage / name, inp / name)
        if stage == "repair-masks":
            shutil.copytree(golden / stage / "rep", inp / "rep")
    return {"in": inp, "golden": golden, "root": root}


def run_stage(args, capsys=None) -> tuple[int, str]:
    """Run ``maskworks <args>`` as a user would: in this process, but the copick stages (copick needs
    zarr 2) with the cryo-ET environment's command.  Returns the exit status and stderr."""
    if args[0] in COPICK_STAGES:
        from conftest import cryoet_exe

        proc = subprocess.run([cryoet_exe("maskworks"), *map(str, args)], capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stderr
    if capsys is not None:
        capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err if capsys is not None else ""


COPICK_STAGES = ("refine-membranes", "copick-runs")


def _copy_project(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)
    _point_project_at(dest)


def _point_project_at(project: Path) -> None:
    """A copied copick project's config names its own folder as the overlay."""
    cfg = project / "copick_config.json"
    data = json.loads(cfg.read_text())
    data["overlay_root"] = f"local://{project}"
    cfg.write_text(json.dumps(data))
