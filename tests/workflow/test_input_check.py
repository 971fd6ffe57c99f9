"""Bad rows among many: every one reported before anything is submitted, the good rows planned and run,
and a job that stops on bad input retried with the least resources instead of more.

The workflow is run as users run it (a copy of the workflow, the demo data, its tables with bad rows
added); the retry test runs the real texture_mask job on a volume whose header is right and whose voxels
are not (a NaN: found only by reading them), through Snakemake's own retries.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import ROOT, WORKFLOW_FILES, exe, run, write_demo

EM_HEADER = "name\tpath\tvoxel_size\tunit\ttruth\tlevel\n"


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    d = tmp_path_factory.mktemp("input-check")
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / name)
    write_demo(d / "demo_data", arms=["em", "cryoet", "codex"])
    # a volume with a right header and a NaN inside: the check passes it, the job stops on it (exit 2)
    data = np.random.default_rng(0).normal(size=(16, 32, 32)).astype(np.float32)
    data[8, 16, 16] = np.nan
    with mrcfile.new(d / "demo_data" / "em" / "nan.mrc") as m:
        m.set_data(data)
        m.voxel_size = 8.0
    (d / "bad_centres.csv").write_text("x,y,z\n1000,5,5\n")
    return d


def _tables(wd: Path, stop: bool = False) -> str:
    """A config whose tables hold the demo's rows plus one bad row per kind of problem."""
    em = (wd / "config" / "demo_em_volumes.tsv").read_text().rstrip("\n") + "\n" + (
        "missing\tdemo_data/em/nope.mrc\t\t\t\t\n"
        "wrongtruth\tdemo_data/em/sample2.mrc\t\t\tdemo_data/em/sample1_truth.zarr\t\n"
        "badsize\tdemo_data/em/sample2.mrc\t0,1,1\t\t\t\n"
    )
    (wd / "em.tsv").write_text(em)
    tomo = (wd / "config" / "demo_cryoet_tomograms.tsv").read_text().rstrip("\n") + "\n" + (
        "tomo2\tdemo_data/cryoet/tomo1.mrc\tdemo_data/cryoet/tomo1_seg.mrc\tbad_centres.csv\t\n"
        "tomo3\tdemo_data/cryoet/tomo1.mrc\tdemo_data/em/sample2.mrc\tdemo_data/cryoet/tomo1_centres.csv\t\n"
    )
    (wd / "tomo.tsv").write_text(tomo)
    codex = (wd / "config" / "demo_codex_images.tsv").read_text().rstrip("\n") + "\n" + (
        "slide2\tdemo_data/codex/slide1.ome.tif\tdemo_data/codex/slide1_channels.txt\tDAPI\tCD99\t0.5\n"
    )
    (wd / "codex.tsv").write_text(codex)
    cfg = wd / ("stop.yaml" if stop else "bad.yaml")
    cfg.write_text(
        "em: {volumes: em.tsv}\ncryoet: {tomograms: tomo.tsv, refine_membranes: {copick_config: null}}\n"
        "codex: {images: codex.tsv}\n" + ("input_check: {on_invalid: stop}\n" if stop else "")
    )
    return cfg.name


BAD = {
    "missing": "demo_data/em/nope.mrc: no such file or directory",
    "wrongtruth": "truth shape (96, 320, 320) differs from the volume's (64, 128, 128)",
    "badsize": "voxel_size='0,1,1'",
    "tomo2": "1 of 1 centre(s) lie outside the tomogram",
    "tomo3": "differs from the tomogram's",
    "slide2": "channel 'CD99' not found",
}


def test_every_bad_row_is_reported_before_submission_and_the_good_rows_are_planned(wd):
    cfg = _tables(wd)
    proc = run([exe("snakemake"), "-n", "--configfile", "config/demo.yaml", cfg], cwd=wd)
    out = proc.stdout + proc.stderr
    assert "6 input row(s) cannot run and are left out of this run" in out, out
    for name, why in BAD.items():
        assert re.search(rf"{name} \(.*\): .*{re.escape(why)}", out), (name, out)
    report = (wd / "logs" / "input_check.tsv").read_text().splitlines()
    assert report[0].split("\t") == ["arm", "table", "name", "problem"]
    assert {line.split("\t")[2] for line in report[1:]} == set(BAD)
    # the good rows are planned, the bad ones are not
    planned = set(re.findall(r"wildcards: name=([\w.-]+)", out))
    assert {"sample1", "sample2", "tomo1", "slide1"} <= planned
    assert not planned & set(BAD), planned


def test_a_second_plan_reuses_the_verdicts_and_sees_a_changed_file(wd):
    cfg = _tables(wd)
    run([exe("snakemake"), "-n", "--configfile", "config/demo.yaml", cfg], cwd=wd)
    cache = wd / ".snakemake" / "maskworks" / "input_check.json"
    before = cache.stat().st_mtime_ns
    run([exe("snakemake"), "-n", "--configfile", "config/demo.yaml", cfg], cwd=wd)
    assert cache.stat().st_mtime_ns == before  # nothing new to record: every row came from the cache
    (wd / "bad_centres.csv").write_text("x,y,z\n5,5,5\n")  # fixed
    try:
        proc = run([exe("snakemake"), "-n", "--configfile", "config/demo.yaml", cfg], cwd=wd)
        assert "5 input row(s) cannot run" in proc.stdout + proc.stderr
        assert "tomo2" not in (wd / "logs" / "input_check.tsv").read_text()
    finally:
        (wd / "bad_centres.csv").write_text("x,y,z\n1000,5,5\n")


def test_on_invalid_stop_runs_nothing_and_lists_every_bad_row(wd):
    cfg = _tables(wd, stop=True)
    proc = run([exe("snakemake"), "-n", "--configfile", "config/demo.yaml", cfg], cwd=wd, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "6 input row(s) cannot run (input_check.on_invalid: stop" in out, out
    assert all(name in out for name in BAD)
    assert "Job stats" not in out


@pytest.mark.slow
def test_a_job_stopped_by_bad_voxels_is_retried_with_the_least_resources(wd):
    (wd / "retry.tsv").write_text(EM_HEADER + "good\tdemo_data/em/sample2.mrc\t\t\t\t\nnan\tdemo_data/em/nan.mrc\t\t\t\t\n")
    (wd / "retry.yaml").write_text(
        "em: {volumes: retry.tsv, train_unet: {enabled: false}}\ncryoet: {enabled: false}\ncodex: {enabled: false}\n"
    )
    proc = run([exe("snakemake"), "--cores", "2", "--retries", "2", "--keep-going", "--configfile", "retry.yaml"],
               cwd=wd, check=False, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert (wd / "results" / "em" / "good" / "texture_final.zarr").is_dir(), out  # the good row ran
    assert not (wd / "results" / "em" / "nan").exists()
    assert "[input error, exit 2: a retry with the same input cannot succeed]" in (
        wd / "logs" / "em" / "texture_mask" / "nan.log").read_text()
    # Snakemake's own record of each attempt: the first with the rule's resources, the retries with the least
    blocks = re.findall(r"rule texture_mask:\n((?:    .*\n)+)", out)
    attempts = [re.search(r"resources: (.*)", b).group(1) for b in blocks if "wildcards: name=nan\n" in b]
    assert len(attempts) == 3, out
    assert "mem_mb=16000" in attempts[0] and "runtime=120" in attempts[0]
    assert all("mem_mb=1000" in a and "runtime=5" in a for a in attempts[1:]), attempts
    assert "stopped on bad input (see its log); its retry asks for the least resources" in out
