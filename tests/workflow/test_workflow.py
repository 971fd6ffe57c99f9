"""The Snakemake workflow for real: lint, dry-runs, the demo run, reruns and config errors.

Each test session copies the workflow into a temporary directory, writes the demo
data there and runs Snakemake in it, so nothing touches the checkout's results/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, exe, list_copick_runs, run, workflow_copy

pytestmark = pytest.mark.workflow

def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table into {rule: count}."""
    counts: dict[str, int] = {}
    m = re.search(r"Job stats:\n(.*?)\n\n", output + "\n\n", re.S)
    if not m:
        return counts
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def snakemake(wd: Path, *args, check=True):
    proc = run([exe("snakemake"), "--cores", "2", *args], cwd=wd, check=check)
    return proc


@pytest.fixture(scope="module")
def wd(tmp_path_factory) -> Path:
    return workflow_copy(tmp_path_factory.mktemp("workflow"))


@pytest.fixture(scope="module")
def demo_run(wd):
    proc = snakemake(wd, "--configfile", "config/demo.yaml")
    return proc


def test_lint_passes(wd):
    proc = run([exe("snakemake"), "--lint", "--configfile", "config/demo.yaml"], cwd=wd, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_are_snakefmt_clean():
    proc = run([exe("snakefmt"), "--check", "Snakefile", "rules"], cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_lists_the_demo_jobs(wd):
    """Before the copick project is listed (by copick, in the cryo-ET environment), a dry run shows every
    other job and the listing; once it has run, the refinement's jobs too: the three runs in two batches
    (runs_per_job: 2) and the project table."""
    proc = snakemake(wd, "-n", "--configfile", "config/demo.yaml")
    counts = job_counts(proc.stdout + proc.stderr)
    others = {"all": 1, "texture_mask": 2, "postprocess_mask": 4, "train_unet": 1, "predict_unet": 2,
              "extract_patches": 1, "merge_corrections": 1, "export_training": 1, "tile_image": 1, "segment_cells": 1,
              "repair_masks": 1,
              "stitch": 1, "quantify": 1}
    assert counts == {**others, "copick_runs": 1, "refine_summary": 1}, proc.stdout
    assert "checkpoint jobs" in proc.stdout + proc.stderr
    list_copick_runs(wd, "config/demo.yaml")
    proc = snakemake(wd, "-n", "--configfile", "config/demo.yaml")
    assert job_counts(proc.stdout + proc.stderr) == {**others, "refine_membranes": 2, "refine_summary": 1}, \
        proc.stdout


def test_slurm_profile_dry_run(wd):
    # CI has no conda: the local-venv choice a user makes on such a cluster (the rules name
    # no env modules, so nothing is loaded); executor and resources stay under test.
    proc = run([exe("snakemake"), "--profile", "profiles/slurm", "-n", "--configfile", "config/demo.yaml",
                "--sdm", "env-modules"], cwd=wd)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("texture_mask") == 2 and counts.get("postprocess_mask") == 4, proc.stdout


def test_default_config_with_empty_table_says_so(wd):
    proc = snakemake(wd, "-n")
    out = proc.stdout + proc.stderr
    assert "config/em_volumes.tsv lists no inputs yet" in out
    assert set(job_counts(out)) <= {"all"}


def test_demo_run_writes_every_output_with_voxel_sizes(wd, demo_run):
    from maskworks.io import read_volume

    # sample1 is an OME-Zarr 0.5 pyramid whose masks are made at level 1 (40 x 16 x 16 nm) and written
    # back at level 0 (40 x 8 x 8 nm); sample2 (MRC) has one level
    expected = {"sample1": ((40.0, 16.0, 16.0), "nanometer"), "sample2": ((80.0, 80.0, 80.0), "angstrom")}
    final = {"sample1": ((40.0, 8.0, 8.0), (96, 320, 320)), "sample2": ((80.0, 80.0, 80.0), (64, 128, 128))}
    for name, (vs, unit) in expected.items():
        d = wd / "results" / "em" / name
        for f in ["texture_mask.zarr", "texture_confidence.zarr", "texture_stats.json", "texture_qc.png",
                  "texture_final.zarr", "texture_final_stats.json", "texture_final_qc.png",
                  "unet_prob.zarr", "unet_mask.zarr", "unet_stats.json", "unet_qc.png",
                  "unet_final.zarr", "unet_final_stats.json", "unet_final_qc.png"]:
            assert (d / f).exists(), f"{name}: {f} missing"
        for f in ["texture_mask.zarr", "texture_confidence.zarr", "unet_prob.zarr", "unet_mask.zarr"]:
            v = read_volume(d / f, lazy=True)
            assert v.voxel_size == pytest.approx(vs) and v.unit == unit, (f, v.voxel_size, v.unit)
        for f in ["texture_final.zarr", "unet_final.zarr"]:  # full-resolution OME-Zarr 0.5 label images
            v = read_volume(d / f, lazy=True)
            assert v.voxel_size == pytest.approx(final[name][0]) and v.shape == final[name][1], (f, v.voxel_size)
            assert v.attrs["ome_zarr_version"] == "0.5"
            import zarr
            from ome_zarr_models.v05 import ImageLabel

            ImageLabel.from_zarr(zarr.open_group(str(d / f), mode="r"))
        for method, least in [("texture", 0.9), ("unet", 0.7)]:
            mask = read_volume(d / f"{method}_final.zarr").numpy()
            assert mask.dtype == "uint8" and set(map(int, mask.ravel()[::97])) <= {0, 1}
            stats = json.loads((d / f"{method}_final_stats.json").read_text())
            assert stats["truth"]["dice"] >= least, (method, stats["truth"])
        assert (wd / "logs" / "em" / "texture_mask" / f"{name}.log").exists()
        assert (wd / "benchmarks" / "em" / "texture_mask" / f"{name}.tsv").exists()
    metrics = json.loads((wd / "results" / "em" / "unet" / "metrics.json").read_text())
    assert (wd / "results" / "em" / "unet" / "best.pt").exists() and metrics


def test_demo_run_cryoet_outputs(wd, demo_run):
    import csv

    from maskworks.io import read_volume

    patches = wd / "results" / "cryoet" / "patches" / "tomo1"
    images = sorted((patches / "imagesCorr").glob("*.nrrd"))
    labels = sorted((patches / "labelsCorr").glob("*.nrrd"))
    assert [p.name for p in images] == [p.name for p in labels] == [f"demo_tomo1_patch{i}.nrrd" for i in range(6)]
    lab = read_volume(labels[0])
    assert lab.shape == (64, 64, 64) and lab.voxel_size == (10.0, 10.0, 10.0)
    assert (lab.numpy()[:8] == 2).all() and (lab.numpy()[:, :, -8:] == 2).all()  # the border shell
    merged = wd / "results" / "cryoet" / "merged" / "tomo1"
    report = list(csv.DictReader(open(merged / "report.csv")))
    by_key = {r["key"]: r for r in report}
    assert by_key["demo_tomo1_patch0"]["status"] == "merged" and int(by_key["demo_tomo1_patch0"]["added_voxels"]) > 0
    assert by_key["demo_tomo1_patch1"]["status"] == "no corrections folder"
    refine = wd / "results" / "cryoet" / "refine"
    summary = list(csv.DictReader(open(refine / "refine_summary.csv")))
    for run_name in ["TS_001", "TS_002", "TS_003"]:
        rows = [r for r in summary if r["run"] == run_name]
        assert rows and any(r["kept"] == "True" for r in rows) and any(r["kept"] == "False" for r in rows)
        assert all(float(r["surface_area_nm2"]) > 0 for r in rows if r["kept"] == "True")
    assert sorted(p.name for p in refine.glob("batches/*_qc/*.png")) == [
        "TS_001_refine_qc.png", "TS_002_refine_qc.png", "TS_003_refine_qc.png"]


def test_rerun_without_changes_does_nothing(wd, demo_run):
    proc = snakemake(wd, "-n", "--configfile", "config/demo.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _override(wd: Path, name: str, change: dict) -> str:
    cfg = yaml.safe_load((wd / "config" / "demo.yaml").read_text())
    for section, values in change.items():
        cfg["em"].setdefault(section, {}).update(values)
    # safe_dump sorts keys: a reordered config must not count as a change either.
    (wd / name).write_text(yaml.safe_dump(cfg))
    return name


def test_params_change_reruns_only_affected_jobs(wd, demo_run):
    post = _override(wd, "post.yaml", {"postprocess_mask": {"opening_radius": 2}})
    counts = job_counts(snakemake(wd, "-n", "--configfile", post).stdout)
    assert counts == {"all": 1, "postprocess_mask": 4}  # texture and U-Net masks of both samples
    tex = _override(wd, "tex.yaml", {"texture_mask": {"min_region_size": 500}})
    counts = job_counts(snakemake(wd, "-n", "--configfile", tex).stdout)
    assert counts == {"all": 1, "texture_mask": 2, "postprocess_mask": 2}  # the U-Net chain is untouched
    unet = _override(wd, "unet.yaml", {"predict_unet": {"threshold": 0.6}})
    counts = job_counts(snakemake(wd, "-n", "--configfile", unet).stdout)
    assert counts == {"all": 1, "predict_unet": 2, "postprocess_mask": 2}


def test_invalid_config_is_rejected_with_the_schema_message(wd):
    bad = _override(wd, "bad.yaml", {"texture_mask": {"block_size": -1}})
    proc = snakemake(wd, "-n", "--configfile", bad, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "block_size" in out and "minimum" in out, out[-3000:]


def test_unknown_config_key_is_rejected(wd):
    bad = _override(wd, "typo.yaml", {"texture_mask": {"blocksize": 32}})
    proc = snakemake(wd, "-n", "--configfile", bad, check=False)
    assert proc.returncode != 0 and "blocksize" in proc.stdout + proc.stderr


def test_bad_table_row_is_rejected(wd):
    (wd / "bad.tsv").write_text("name\tpath\tvoxel_size\tunit\ttruth\nbad name\tx.zarr\tabc\t\t\n")
    cfg = _override(wd, "badtable.yaml", {})
    y = yaml.safe_load((wd / cfg).read_text())
    y["em"]["volumes"] = "bad.tsv"
    (wd / cfg).write_text(yaml.safe_dump(y))
    proc = snakemake(wd, "-n", "--configfile", cfg, check=False)
    assert proc.returncode != 0 and "bad name" in proc.stdout + proc.stderr


def test_demo_run_codex_outputs(wd, demo_run):
    import csv

    from maskworks.io import read_volume

    d = wd / "results" / "codex" / "slide1"
    meta = list(csv.DictReader(open(d / "repair" / "patches_metadata.csv")))
    informative = [r for r in meta if r["is_informative"] == "True"]
    assert len(meta) == 12 and 0 < len(informative) < 12  # the demo slide has empty patches
    cells = read_volume(d / "stitch" / "cell.ome.tif", ndim=2).numpy()
    nuclei = read_volume(d / "stitch" / "nucleus.ome.tif", ndim=2).numpy()
    assert cells.dtype == np.uint32 and cells.shape == nuclei.shape == (1400, 1860)
    table = list(csv.DictReader(open(d / "stitch" / "cells.csv")))
    assert len(table) == int(cells.max()) > 1000
    # repaired pairs: every stitched nucleus lies inside the cell with the same id
    inside = nuclei > 0
    assert np.array_equal(cells[inside], nuclei[inside])
    # the stitch's promises, recounted on the demo slide: no cell without its nucleus, none fragmented
    from maskworks.codex.stitch import check_stitched

    stats = json.loads((d / "stitch" / "stitch_stats.json").read_text())
    assert stats["check"] == check_stitched(cells, nuclei) | {"cytoplasm_mismatch": 0}
    assert all(v == 0 for k, v in stats["check"].items() if k != "cells")
    assert stats["cell_stitch"]["joined"] > 0


def test_demo_run_quantifies_every_cell_on_every_marker(wd, demo_run):
    import anndata
    import pandas as pd

    from maskworks.io import read_volume

    d = wd / "results" / "codex" / "slide1"
    by_marker = pd.read_csv(d / "quantify" / "cell_by_marker.csv")
    meta = pd.read_csv(d / "quantify" / "cell_metadata.csv")
    cells = read_volume(d / "stitch" / "cell.ome.tif", ndim=2).numpy()
    assert list(by_marker.columns) == ["cell_id", "CD45", "DAPI", "Ki67", "PanCK"]
    assert len(by_marker) == len(meta) == len(np.unique(cells)) - 1
    # Ki67 marks a fifth of the nuclei (demo generator): high in those nuclei, low in their cytoplasm
    positive = meta["Ki67_nucleus_mean"] > 300
    assert 0.1 < positive.mean() < 0.3, positive.mean()
    assert (meta.loc[positive, "Ki67_nucleus_mean"] > 3 * meta.loc[positive, "Ki67_cytoplasm_mean"]).mean() > 0.9
    assert meta.loc[~positive & meta["has_nucleus"], "Ki67_nucleus_mean"].median() < 50
    adata = anndata.read_h5ad(d / "quantify" / "cells.h5ad")
    assert adata.n_obs == len(by_marker) and list(adata.var_names) == ["CD45", "DAPI", "Ki67", "PanCK"]
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2) and adata.obsm["spatial"].max() <= 1860 * 0.5
    assert adata.obsp["spatial_connectivities"].nnz > 2 * adata.n_obs


def test_mesmer_rule_uses_the_deepcell_venv_without_conda(wd, tmp_path):
    cfg = yaml.safe_load((wd / "config" / "demo.yaml").read_text())
    cfg["codex"]["segment_cells"] = {"backend": "mesmer", "model_path": "demo_data", "device": "cpu"}
    (wd / "mesmer.yaml").write_text(yaml.safe_dump(cfg))
    args = ["-n", "-p", "--configfile", "mesmer.yaml", "--forcerun", "segment_cells", "--until", "segment_cells"]
    proc = snakemake(wd, *args, check=False)
    out = proc.stdout + proc.stderr
    venv = wd / ".venv-deepcell" / "bin" / "python"
    # the workflow copy has no .venv-deepcell yet: the error says how to get one
    assert proc.returncode != 0 and "make setup-deepcell" in out and str(venv) in out, out[-3000:]
    assert "software.deepcell_python" in out
    venv.parent.mkdir(parents=True)
    venv.symlink_to(ROOT / ".venv-deepcell" / "bin" / "python")
    out = snakemake(wd, *args).stdout
    # isolated (-I: no PYTHONPATH, no user site), told its device
    assert f"{venv} -I -m maskworks.cli -v segment-cells" in out, out[-3000:]
    assert "--backend mesmer" in out and "--model-path demo_data" in out and "--device cpu" in out
    # or any interpreter the user names (e.g. when the workflow is used as a module)
    cfg["software"] = {"deepcell_python": str(ROOT / ".venv-deepcell" / "bin" / "python")}
    (wd / "mesmer2.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(wd, *args[:3], "mesmer2.yaml", *args[4:]).stdout
    assert f"{ROOT / '.venv-deepcell' / 'bin' / 'python'} -I -m maskworks.cli" in out, out[-3000:]


def test_unknown_table_column_is_rejected(wd):
    (wd / "typo.tsv").write_text("name\tpath\ttruht\nsample1\tdemo_data/em/sample1.zarr\tdemo_data/em/sample1_truth.zarr\n")
    y = yaml.safe_load((wd / "config" / "demo.yaml").read_text())
    y["em"]["volumes"] = "typo.tsv"
    (wd / "typotable.yaml").write_text(yaml.safe_dump(y))
    proc = snakemake(wd, "-n", "--configfile", "typotable.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "truht" in out, out[-3000:]


def test_report_includes_the_qc_pictures_and_stats(wd, demo_run):
    import zipfile

    run([exe("snakemake"), "--configfile", "config/demo.yaml", "--report", "report.zip"], cwd=wd)
    names = [n.rsplit("/", 1)[-1] for n in zipfile.ZipFile(wd / "report.zip").namelist()]
    for expected in ["texture_qc.png", "texture_final_qc.png", "texture_final_stats.json", "unet_qc.png",
                     "curves.png", "patches_qc.png", "TS_001_refine_qc.png", "refine_summary.csv",
                     "stitch_qc.png", "quantify_qc.png"]:
        assert expected in names, expected


@pytest.mark.slow
def test_segment_backend_switches_from_the_command_line(tmp_path):
    """codex.segment_cells.backend set with --config: the rule runs the backend in its environment's
    interpreter with only its own options (a real tile_image + segment_cells run with expansion; a dry
    run of instanseg, which needs a model)."""
    import sys

    wd = workflow_copy(tmp_path)
    until = ["--configfile", "config/demo.yaml", "--until", "segment_cells"]
    # the interpreter running Snakemake (the torch env, .venv), not the deepcell one
    here = re.escape(str(Path(sys.executable).parent)) + r"/python[0-9.]* -I -m maskworks.cli -v segment-cells"
    expansion = "codex={'segment_cells': {'backend': 'expansion'}}"
    out = snakemake(wd, "-n", "-p", *until, "--config", expansion).stdout
    assert re.search(here, out), out[-3000:]
    assert "--backend expansion" in out and "--expansion-distance 10" in out and "--device cpu" in out
    assert "--foreground-sigma" not in out and "--preprocess-kwargs" not in out and "--model-path" not in out
    snakemake(wd, *until, "--config", expansion)
    seg = next((wd / "results" / "codex").glob("*/segment"))
    stats = json.loads((seg / "segment_stats.json").read_text())
    assert stats["backend"] == "expansion" and stats["expansion_distance"] == 10 and stats["cells"] > 0
    assert stats["cells"] == stats["nuclei"]  # every cell grew from one nucleus
    with np.load(next(seg.glob("patch_*.npz")), allow_pickle=False) as z:
        cell, nucleus = z["cell"], z["nucleus"]
    assert (cell[nucleus > 0] == nucleus[nucleus > 0]).all()  # nucleus k inside cell k
    # instanseg: the model is required, and goes to the rule as an input and to the command
    proc = snakemake(wd, "-n", *until, "--config", "codex={'segment_cells': {'backend': 'instanseg'}}",
                     check=False)
    assert proc.returncode != 0 and "needs codex.segment_cells.model_path" in proc.stdout + proc.stderr
    (wd / "instanseg.pt").write_bytes(b"")
    out = snakemake(wd, "-n", "-p", *until, "--forcerun", "segment_cells", "--config",
                    "codex={'segment_cells': {'backend': 'instanseg', 'model_path': 'instanseg.pt', "
                    "'device': 'cpu'}}").stdout
    assert re.search(here, out), out[-3000:]
    assert "--backend instanseg" in out and "--model-path instanseg.pt" in out and "--device cpu" in out
    assert "--expansion-distance" not in out and "--preprocess-kwargs" not in out


def test_a_changed_channel_file_reruns_its_slide(tmp_path):
    """A slide given as a table of one file per channel: its files are the rules' inputs, so changing
    one of them (not the table) reruns the slide's stages."""
    import os
    import time

    import tifffile

    from maskworks.io.slides import read_channel_names

    wd = workflow_copy(tmp_path)
    codex = wd / "demo_data" / "codex"
    with tifffile.TiffFile(codex / "slide1.ome.tif") as tif:
        planes = tif.series[0].asarray()
    names = read_channel_names(codex / "slide1_channels.txt")
    rows = ["path\tchannel_name"]
    for name, plane in zip(names, planes):
        tifffile.imwrite(codex / f"split_{name}.tif", plane)
        rows.append(f"split_{name}.tif\t{name}")
    (codex / "split.tsv").write_text("\n".join(rows) + "\n")
    (wd / "split_images.tsv").write_text("name\timage\tnuclear_channel\twholecell_channels\timage_mpp\n"
                                         "split\tdemo_data/codex/split.tsv\tDAPI\tCD45,PanCK\t0.5\n")
    cfg = yaml.safe_load((wd / "config" / "demo.yaml").read_text())
    cfg["codex"]["images"] = "split_images.tsv"
    (wd / "split.yaml").write_text(yaml.safe_dump(cfg))
    until = ["--configfile", "split.yaml", "--until", "tile_image"]
    out = snakemake(wd, "-n", *until).stdout
    assert job_counts(out).get("tile_image") == 1
    snakemake(wd, *until)
    assert "tile_image" not in job_counts(snakemake(wd, "-n", *until).stdout)  # done
    later = time.time() + 10  # newer than the outputs
    os.utime(codex / f"split_{names[1]}.tif", (later, later))
    assert job_counts(snakemake(wd, "-n", *until).stdout).get("tile_image") == 1
