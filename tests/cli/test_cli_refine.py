"""`maskworks refine-membranes` on the demo copick project (3 runs of 64 x 128 x 128)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import exe, run

from maskworks.backend import resolve_device
from maskworks.cli import main
from maskworks.io import copick as cio

pytestmark = pytest.mark.copick  # copick needs zarr 2: this module runs in .venv-cryoet (make test)
copick = pytest.importorskip("copick", reason="copick runs in .venv-cryoet (make test runs this module there)")

ORG, MEM = "organelles", "membrane,membrain-seg,1"
GPU = resolve_device("auto") != "cpu"  # cupy imports and a device is visible


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from maskworks.demo import _write_cryoet_copick

    return _write_cryoet_copick(tmp_path_factory.mktemp("demo"))["config"].parent


@pytest.fixture()
def project(demo, tmp_path):
    """A private copy of the demo project (its config points at the copy)."""
    root = tmp_path / "copick"
    shutil.copytree(demo, root)
    cfg = root / "copick_config.json"
    data = json.loads(cfg.read_text())
    data["overlay_root"] = f"local://{root}"
    cfg.write_text(json.dumps(data))
    return cfg


def segs(cfg, run_name, user):
    r = cio.select_runs(cio.open_project(cfg), [run_name])[0]
    return {s.name: s for s in r.segmentations if s.user_id == user}


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_refine_writes_segmentations_qc_and_stats(project, tmp_path):
    qc, stats = tmp_path / "qc", tmp_path / "stats.csv"
    assert main(["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM,
                 "--run", "TS_003", "--run", "TS_001", "--device", "cpu", "--qc-dir", str(qc),
                 "--stats", str(stats)]) == 0
    for name in ("TS_001", "TS_003"):
        org = segs(project, name, "saber-refined")["organelles-refined"]
        mem = segs(project, name, "membrain-seg-refined")["membrane-refined"]
        assert org.session_id == mem.session_id == "1" and org.voxel_size == 10.0
        assert cio.segmentation_type(org) == cio.segmentation_type(mem) == "instance"
        o, m = cio.read_segmentation(org).data, cio.read_segmentation(mem).data
        big = 300 if name == "TS_003" else 2
        assert set(np.unique(o)) == set(np.unique(m)) == {0, 1, big, 3}
        assert o.dtype == (np.uint16 if name == "TS_003" else np.uint8)
        assert (qc / f"{name}_refine_qc.png").stat().st_size > 1000
    assert not segs(project, "TS_002", "saber-refined")  # not asked for
    table = rows(stats)
    assert [(r["run"], r["organelle_id"], r["kept"]) for r in table] == [
        (run_name, str(i), str(i in (1, 2, 300, 3))) for run_name, ids in
        (("TS_001", (1, 2, 3, 4, 5)), ("TS_003", (1, 3, 4, 5, 300))) for i in ids]
    reasons = {(r["run"], r["organelle_id"]): r["reason"] for r in table}
    assert reasons[("TS_001", "4")].startswith("too small")
    assert reasons[("TS_001", "5")] == "no membrane in any of its z-slices"
    assert all(int(r["run_membrane_voxels_out"]) < int(r["run_membrane_voxels_in"]) for r in table)


def test_rerun_with_name_only_info_reads_the_inputs_not_the_outputs(project):
    from maskworks.cryoet.stages import refine_membranes_files

    first = refine_membranes_files(project, org_info=ORG, mem_info="membrane", run=["TS_002"], device="cpu")
    out = cio.read_segmentation(segs(project, "TS_002", "saber-refined")["organelles-refined"]).data
    second = refine_membranes_files(project, org_info=ORG, mem_info="membrane", run="TS_002", device="cpu")
    assert first["runs"][0]["organelles_from"] == second["runs"][0]["organelles_from"] == \
        "organelles (user saber, session 1, voxel size 10 A, multilabel)"
    assert second["runs"][0]["membranes_from"].startswith("membrane (user membrain-seg,")
    np.testing.assert_array_equal(cio.read_segmentation(segs(project, "TS_002", "saber-refined")
                                                        ["organelles-refined"]).data, out)
    # a new session is a new output; the old one stays
    refine_membranes_files(project, org_info=ORG, mem_info="membrane", run=["TS_002"], device="cpu",
                           save_session_id="7")
    r = cio.select_runs(cio.open_project(project), ["TS_002"])[0]
    assert sorted(s.session_id for s in r.segmentations if s.user_id.endswith("-refined")) == ["1", "1", "7", "7"]


def test_nothing_kept_writes_empty_volumes(project, tmp_path):
    stats = tmp_path / "stats.csv"
    assert main(["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM,
                 "--run", "TS_001", "--min-membrane-area", str(10**9), "--device", "cpu",
                 "--stats", str(stats)]) == 0
    for user, name in (("saber-refined", "organelles-refined"), ("membrain-seg-refined", "membrane-refined")):
        vol = cio.read_segmentation(segs(project, "TS_001", user)[name])
        assert vol.shape == (64, 128, 128) and not vol.data.any()
    table = rows(stats)
    assert len(table) == 5 and all(r["kept"] == "False" for r in table)
    assert all(r["note"].startswith("no organelle kept") for r in table)


def test_missing_segmentation_lists_the_available_ones(project, capsys):
    assert main(["refine-membranes", "--config", str(project), "--org-info", "mito", "--mem-info", MEM,
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert ("refine-membranes: error: no run has both segmentations: run TS_001: no segmentation matches "
            "'mito' at voxel size 10 A") in err
    assert "organelles (user saber, session 1, voxel size 10 A, multilabel)" in err
    assert "membrane (user membrain-seg, session 1, voxel size 10 A, binary)" in err
    assert not segs(project, "TS_001", "saber-refined")


def test_a_run_without_its_input_is_reported_and_the_others_refined(project, tmp_path, capsys):
    r = cio.select_runs(cio.open_project(project), ["TS_002"])[0]
    seg = cio.find_segmentation(r, cio.parse_segmentation_info(MEM), 10)
    shutil.rmtree(seg.path)
    stats = tmp_path / "stats.csv"
    assert main(["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM,
                 "--device", "cpu", "--stats", str(stats)]) == 2
    err = capsys.readouterr().err
    assert "run TS_002 not refined: run TS_002: no segmentation matches 'membrane,membrain-seg,1'" in err
    assert "organelles (user saber, session 1, voxel size 10 A, multilabel)" in err  # what TS_002 has
    for name in ("TS_001", "TS_003"):
        assert segs(project, name, "saber-refined")["organelles-refined"] and segs(project, name, "membrain-seg-refined")
    assert not segs(project, "TS_002", "saber-refined")
    table = rows(stats)
    assert [r["reason"] for r in table if r["run"] == "TS_002"] == ["missing input"]


def test_outputs_are_instance_segmentations_named_apart_under_saber_s_user(project):
    """Name-only infos: SABER's user for that call (saber-refined) for both outputs, names <name>-refined so
    that readers looking segmentations up by name alone never take an output for its input."""
    from maskworks.cryoet.stages import refine_membranes_files

    refine_membranes_files(project, org_info="organelles", mem_info="membrane", run="TS_001", device="cpu")
    r = cio.select_runs(cio.open_project(project), ["TS_001"])[0]
    out = {s.name: s for s in r.segmentations if s.user_id.endswith("-refined")}
    assert sorted(out) == ["membrane-refined", "organelles-refined"]
    assert {s.user_id for s in out.values()} == {"saber-refined"}
    assert {cio.segmentation_type(s) for s in out.values()} == {"instance"}
    # copick's default (name-only, binary or multilabel) lookups of the inputs find the inputs alone
    assert [s.user_id for s in r.get_segmentations(name="organelles")] == ["saber"]
    assert [s.user_id for s in r.get_segmentations(name="membrane")] == ["membrain-seg"]
    assert r.get_segmentations(name="organelles-refined", is_instance=True)[0].user_id == "saber-refined"


def test_output_names_and_user_can_be_chosen_and_must_be_project_objects(project, capsys):
    from maskworks.cryoet.stages import refine_membranes_files

    result = refine_membranes_files(project, org_info=ORG, mem_info=MEM, run="TS_001", device="cpu",
                                    org_output_name="organelle", mem_output_name="membrane",
                                    output_user_id="curated")
    assert result["runs"][0]["written"] == ["organelle (user curated, session 1, instance)",
                                            "membrane (user curated, session 1, instance)"]
    out = segs(project, "TS_001", "curated")
    assert sorted(out) == ["membrane", "organelle"] and cio.segmentation_type(out["membrane"]) == "instance"
    args = ["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM, "--run", "TS_002",
            "--device", "cpu"]
    assert main([*args, "--org-output-name", "mitochondria"]) == 2
    err = capsys.readouterr().err
    assert "the refined segmentation 'mitochondria' is an instance segmentation" in err
    assert f"copick add object -c {project} --name mitochondria --object-type segmentation" in err
    # never over an input: the membrane input is membrane/membrain-seg/1
    assert main([*args, "--mem-output-name", "membrane", "--output-user-id", "membrain-seg"]) == 2
    assert "refined segmentations are never written over their inputs" in capsys.readouterr().err
    assert main([*args, "--org-output-name", "organelle", "--mem-output-name", "organelle",
                 "--output-user-id", "curated"]) == 2
    assert "need different names" in capsys.readouterr().err
    # a name-only info finds another user's instance segmentation: the output may not be that one either
    r = cio.select_runs(cio.open_project(project), ["TS_002"])[0]
    inst = r.new_segmentation(voxel_size=10.0, name="organelle", session_id="1", user_id="curator", is_instance=True)
    inst.from_numpy(cio.read_segmentation(cio.find_segmentation(r, cio.parse_segmentation_info(ORG), 10)).data)
    assert main([*args[:4], "organelle", *args[5:], "--org-output-name", "organelle", "--output-user-id",
                 "curator"]) == 2
    assert "the refined organelles would be written over the input organelle (user curator, session 1" in \
        capsys.readouterr().err
    assert not segs(project, "TS_002", "saber-refined") and not segs(project, "TS_002", "curated")


def test_copick_s_own_tools_read_the_refined_organelles_one_by_one(project, tmp_path):
    """copick-utils' `copick process seg-stats` on the refined instance segmentation gives one row per kept
    organelle with its voxel count, the ids and counts maskworks reports (a multilabel output made it read
    the ids as object labels: id 3 became a third object class)."""
    from maskworks.cryoet.stages import refine_membranes_files

    stats = tmp_path / "stats.csv"
    refine_membranes_files(project, org_info=ORG, mem_info=MEM, run="TS_003", device="cpu", stats=stats)
    kept = {int(r["organelle_id"]): int(r["voxels_out"]) for r in rows(stats) if r["kept"] == "True"}
    assert sorted(kept) == [1, 3, 300]
    copick_exe = exe("copick")
    table = tmp_path / "seg_stats.csv"
    proc = subprocess.run([str(copick_exe), "process", "seg-stats", "-c", str(project), "--run-names", "TS_003",
                           "-i", "organelles-refined:saber-refined/1@10.0?instance=true", "-f", "csv",
                           "-op", str(table)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = [r for r in csv.DictReader(open(table)) if r["instance_id"]]  # the other row: the background
    assert {int(r["instance_id"]): int(r["volume_voxels"]) for r in found} == kept
    # each row names the project's object of that name (label 3 in the demo config): an object, not an id
    assert {(r["label"], r["segmentation_type"]) for r in found} == {("3", "instance")}


def test_a_failing_run_leaves_no_outputs_behind(project, tmp_path, capsys):
    """TS_001 is refined (its outputs staged), then TS_002's membrane store turns out to miss a chunk:
    the run fails and nothing of it is in the project, the stats or the QC folder."""
    store = next((Path(project).parent / "ExperimentRuns" / "TS_002").rglob("*membrain-seg_1_membrane.zarr"))
    next(p for p in sorted((store / "0").rglob("*")) if p.is_file() and not p.name.startswith(".")).unlink()
    before = sorted(p.relative_to(project.parent) for p in Path(project).parent.rglob("*"))
    qc, stats = tmp_path / "qc", tmp_path / "stats.csv"
    assert main(["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM,
                 "--device", "cpu", "--qc-dir", str(qc), "--stats", str(stats)]) == 2
    assert "TS_002" in capsys.readouterr().err
    assert not segs(project, "TS_001", "saber-refined") and not segs(project, "TS_001", "membrain-seg-refined")
    assert not stats.exists() and not qc.exists()
    assert sorted(p.relative_to(project.parent) for p in Path(project).parent.rglob("*")) == before


@pytest.mark.skipif(GPU, reason="a GPU is there")
def test_cuda_without_a_gpu_fails_before_reading(project, capsys):
    assert main(["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM,
                 "--device", "cuda"]) == 2
    assert "asks for a GPU" in capsys.readouterr().err


def test_command_line_entry_point(project, tmp_path):
    proc = run([exe("maskworks"), "refine-membranes", "--help"])
    for option in ("--config", "--org-info", "--mem-info", "--voxel-size", "--save-session-id", "--run",
                   "--device", "--ball-size", "--min-membrane-area", "--edge-trim-z", "--edge-trim-xy",
                   "--min-roi-relative-size", "--keep-surface-membranes", "--label-components",
                   "--membrane-output", "--qc-dir", "--org-output-name", "--mem-output-name", "--output-user-id",
                   "--stats"):
        assert option in proc.stdout
    run([exe("maskworks"), "refine-membranes", "--config", project, "--org-info", "organelles,saber,1",
         "--mem-info", MEM, "--run", "TS_002", "--keep-surface-membranes", "--min-membrane-area", "300",
         "--device", "cpu", "--stats", tmp_path / "s.csv"])
    assert segs(project, "TS_002", "saber-refined")["organelles-refined"]
    assert len(rows(tmp_path / "s.csv")) == 5


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_run_killed_after_writing_its_first_run_changes_nothing_and_the_next_run_cleans_up(project, tmp_path):
    """refine-membranes over three runs, SIGKILLed right after TS_001's outputs were written (staged): the
    project is as it was; the next run, even one that fails, removes the killed run's staging."""
    root = Path(project).parent
    before = _tree(root)
    args = [exe("maskworks"), "refine-membranes", "--config", project, "--org-info", ORG, "--mem-info", MEM,
            "--device", "cpu"]
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          env={**os.environ, "MASKWORKS_FAULT": "kill:refine.run:1"})
    assert proc.returncode == -signal.SIGKILL
    visible = {k: v for k, v in _tree(root).items() if ".mw-" not in k and not k.endswith(".maskworks.lock")}
    assert visible == before
    assert any(".mw-" in k for k in _tree(root))  # the dead run's staging, hidden from copick
    assert not segs(project, "TS_001", "saber-refined")
    store = next((root / "ExperimentRuns" / "TS_002").rglob("*membrain-seg_1_membrane.zarr"))
    next(p for p in sorted((store / "0").rglob("*")) if p.is_file() and not p.name.startswith(".")).unlink()
    damaged = {k: v for k, v in _tree(root).items() if ".mw-" not in k and not k.endswith(".maskworks.lock")}
    failing = subprocess.run([str(a) for a in args], capture_output=True, text=True)  # TS_002 fails to read
    assert failing.returncode == 2 and "TS_002" in failing.stderr
    assert _tree(root) == damaged  # the killed run's staging is gone, and nothing else changed


def test_copick_outputs_are_the_same_bytes_every_time(demo, tmp_path):
    """Two runs on two copies of a project write byte-identical refined stores (copick's layout and
    compressor, Blosc's threads off)."""
    stores = []
    for i in range(2):
        root = tmp_path / f"p{i}"
        shutil.copytree(demo, root)
        cfg = root / "copick_config.json"
        data = json.loads(cfg.read_text())
        data["overlay_root"] = f"local://{root}"
        cfg.write_text(json.dumps(data))
        assert main(["refine-membranes", "--config", str(cfg), "--org-info", ORG, "--mem-info", MEM, "--run", "TS_001",
                     "--device", "cpu"]) == 0
        found = sorted((root / "ExperimentRuns" / "TS_001").rglob("*-refined_*.zarr"))
        assert len(found) == 2
        stores.append({p.name: _tree(p) for p in found})
    assert stores[0] == stores[1]


def _delete_chunk(project, run="TS_001"):
    store = next((Path(project).parent / "ExperimentRuns" / run).rglob("*membrain-seg_1_membrane.zarr"))
    next(p for p in sorted((store / "0").rglob("*")) if p.is_file() and not p.name.startswith(".")).unlink()


def test_the_switches_that_accept_what_is_refused_by_default(project, tmp_path):
    """--fill-missing reads a deleted chunk as zeros (here the store's only one: no membrane, so
    nothing is kept, which is refused over the earlier result); --allow-empty-output then writes
    the empty result."""
    args = ["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM, "--run", "TS_001",
            "--device", "cpu"]
    assert main(args) == 0  # the earlier, non-empty result
    _delete_chunk(project)
    assert main([*args, "--fill-missing"]) == 2
    assert main([*args, "--fill-missing", "--allow-empty-output"]) == 0
    r = cio.select_runs(cio.open_project(project), ["TS_001"])[0]
    refined = [s for s in r.segmentations if s.user_id.endswith("-refined")]
    assert len(refined) == 2 and all(cio.is_empty(s) for s in refined)
    assert not [p for p in Path(project).parent.rglob(".mw-*")]  # no staging left


def test_an_empty_result_among_several_runs_is_reported_and_the_others_written(project, tmp_path, capsys):
    """TS_001 has a non-empty earlier result, TS_003 none: with a filter that keeps nothing,
    TS_003 gets its (empty) result, TS_001 keeps its earlier one, the stats and exit 2 say so."""
    args = ["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM, "--device", "cpu",
            "--stats", str(tmp_path / "stats.csv")]
    assert main([*args, "--run", "TS_001"]) == 0
    ts001 = next((Path(project).parent / "ExperimentRuns" / "TS_001").rglob("*saber-refined*"))
    before = _tree(ts001)
    capsys.readouterr()
    code = main([*args, "--run", "TS_001", "--run", "TS_003", "--min-membrane-area", "1000000000"])
    assert code == 2 and "run TS_001 not refined: the refinement kept nothing" in capsys.readouterr().err
    assert _tree(ts001) == before
    r = cio.select_runs(cio.open_project(project), ["TS_003"])[0]
    refined = [s for s in r.segmentations if s.user_id.endswith("-refined")]
    assert len(refined) == 2 and all(cio.is_empty(s) for s in refined)
    assert "empty result not written" in (tmp_path / "stats.csv").read_text()


def test_copick_runs_lists_every_run_with_its_input_stores(project, tmp_path):
    """The workflow's copick_runs step: one row per run, the local stores refine-membranes reads, and
    the reason where a run lacks one."""
    out = tmp_path / "runs.tsv"
    assert main(["copick-runs", "--config", str(project), "--org-info", ORG, "--mem-info", MEM, "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out), delimiter="\t"))
    assert [r["run"] for r in rows] == ["TS_001", "TS_002", "TS_003"]
    for r in rows:
        assert not r["missing"] and Path(r["organelles"]).is_dir() and r["membranes"].endswith("membrane.zarr")
    out2 = tmp_path / "runs2.tsv"
    assert main(["copick-runs", "--config", str(project), "--org-info", "nothing", "--mem-info", MEM,
                 "--out", str(out2), "--run", "TS_002"]) == 0
    rows = list(csv.DictReader(open(out2), delimiter="\t"))
    assert [r["run"] for r in rows] == ["TS_002"] and "no segmentation matches 'nothing'" in rows[0]["missing"]


def test_keep_going_skips_the_runs_that_cannot_be_refined_and_writes_the_others(project, tmp_path, capsys):
    """A batch of runs as the workflow gives them: TS_002 lacks its membranes, TS_003's organelle store misses
    a chunk; both are skipped with their reasons (stats, stderr), TS_001 is refined, the exit status is 0."""
    r = cio.select_runs(cio.open_project(project), ["TS_002"])[0]
    shutil.rmtree(cio.find_segmentation(r, cio.parse_segmentation_info(MEM), 10).path)
    _delete_chunk(project, "TS_003")
    stats, qc = tmp_path / "stats.csv", tmp_path / "qc"
    assert main(["refine-membranes", "--config", str(project), "--org-info", ORG, "--mem-info", MEM, "--device", "cpu",
                 "--run", "TS_001", "--run", "TS_002", "--run", "TS_003", "--keep-going", "--stats", str(stats),
                 "--qc-dir", str(qc)]) == 0
    err = capsys.readouterr().err
    assert "run TS_002 skipped: run TS_002: no segmentation matches 'membrane,membrain-seg,1'" in err
    assert "run TS_003 skipped: copick segmentation membrane" in err and "chunks are missing" in err
    table = rows(stats)
    assert {r["run"] for r in table if r["kept"] == "True"} == {"TS_001"}
    assert [(r["run"], r["reason"]) for r in table if r["run"] != "TS_001"] == [
        ("TS_002", "missing input"), ("TS_003", "input cannot be used")]
    assert segs(project, "TS_001", "saber-refined")["organelles-refined"]
    assert not segs(project, "TS_002", "saber-refined") and not segs(project, "TS_003", "saber-refined")
    assert sorted(p.name for p in qc.iterdir()) == ["TS_001_refine_qc.png"]


def test_propose_centres_from_and_to_copick_picks(project, tmp_path):
    """Candidates from a person's copick picks (angstrom) scored on an uncertainty map; the chosen centres
    written back as copick picks, read by copick's API at the same places."""
    from maskworks.io import write_volume

    shape = (64, 128, 128)
    u = np.full(shape, 0.1, np.float32)
    u[20:44, 80:110, 20:50] = 1.0  # the uncertain region, around z 32, y 95, x 35
    m = write_volume(tmp_path / "u.mrc", u, (10.0, 10.0, 10.0), unit="angstrom")
    r = cio.select_runs(cio.open_project(project), ["TS_001"])[0]
    picks = r.new_picks(object_name="organelle", session_id="1", user_id="curator")
    picks.from_numpy(np.array([[350.0, 950.0, 320.0], [1000.0, 300.0, 320.0]]))  # x, y, z in angstrom
    out = tmp_path / "centres.csv"
    assert main(["propose-centres", "--map", str(m), "--out", str(out), "--n", "1", "--patch-size", "32",
                 "--copick-candidates", str(project), "TS_001", "organelle,curator",
                 "--copick-picks", str(project), "TS_001", "membrane"]) == 0
    row = rows(out)[0]
    assert (row["x"], row["y"], row["z"]) == ("35", "95", "32")
    back = cio.select_runs(cio.open_project(project), ["TS_001"])[0].get_picks(object_name="membrane",
                                                                               user_id="maskworks")
    positions, _ = back[0].numpy()
    np.testing.assert_allclose(positions, [[350.0, 950.0, 320.0]])
