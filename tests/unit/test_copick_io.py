"""maskworks.io.copick on a tiny filesystem copick project made through the copick API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maskworks.io import InputError
from maskworks.io import copick as cio

pytestmark = pytest.mark.copick  # copick needs zarr 2: this module runs in .venv-cryoet (make test)
copick = pytest.importorskip("copick", reason="copick runs in .venv-cryoet (make test runs this module there)")

SHAPE = (6, 8, 10)  # z, y, x: all different, so a transposed read would show


@pytest.fixture()
def project(tmp_path):
    import copick
    from copick.models import PickableObject

    cfg = tmp_path / "copick_config.json"
    root = copick.new_config(str(cfg), overlay_root=str(tmp_path / "overlay"), proj_name="t",
                             pickable_objects=[PickableObject(name="membrane", is_particle=False, label=1),
                                               PickableObject(name="vesicle", is_particle=False, label=2)])
    org = np.zeros(SHAPE, np.uint16)
    org[1, 2, 3] = 300
    org[4, 5, 6] = 7
    for run_name in ("run-b", "run-a"):
        run = root.new_run(run_name)
        run.new_voxel_spacing(10.0)
        for user, session in (("bob", "2"), ("alice", "9"), ("alice", "10"), ("aaa-refined", "1")):
            seg = run.new_segmentation(voxel_size=10.0, name="organelles", session_id=session,
                                       is_multilabel=True, user_id=user)
            seg.from_numpy(org + (user == "bob"))  # bob's copy is told apart by its values
        run.new_segmentation(voxel_size=10.0, name="membrane", session_id="1", user_id="tool").from_numpy(
            (org > 0).astype(np.uint8))
        run.new_segmentation(voxel_size=20.0, name="coarse", session_id="1", is_multilabel=True,
                             user_id="tool").from_numpy(np.zeros((3, 4, 5), np.uint8))
    return cfg, org


@pytest.mark.parametrize("text, expected", [
    ("organelles", ("organelles", None, None)),
    ("organelles,saber", ("organelles", "saber", None)),
    (" organelles , saber , 1 ", ("organelles", "saber", "1")),
])
def test_parse_segmentation_info(text, expected):
    info = cio.parse_segmentation_info(text)
    assert (info.name, info.user_id, info.session_id) == expected
    assert str(info) == ",".join(p for p in expected if p)


@pytest.mark.parametrize("text", ["", "a,,1", "a,b,c,d", ","])
def test_parse_segmentation_info_refuses_bad_text(text):
    with pytest.raises(InputError, match="name,userID,sessionID"):
        cio.parse_segmentation_info(text, "--org-info")


def test_runs_are_sorted_and_checked(project):
    root = cio.open_project(project[0])
    assert [r.name for r in cio.select_runs(root)] == ["run-a", "run-b"]
    assert [r.name for r in cio.select_runs(root, ["run-b", "run-a", "run-b"])] == ["run-a", "run-b"]
    with pytest.raises(InputError, match="run-x not in the copick project; available runs: run-a, run-b"):
        cio.select_runs(root, ["run-b", "run-x"])


def test_open_project_names_the_file(tmp_path):
    with pytest.raises(InputError, match="no such copick configuration file"):
        cio.open_project(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not a readable copick configuration"):
        cio.open_project(bad)


def test_name_only_is_deterministic_and_never_reads_refined_outputs(project):
    run = cio.select_runs(cio.open_project(project[0]), ["run-a"])[0]
    seg = cio.find_segmentation(run, cio.parse_segmentation_info("organelles"), 10)
    # 'aaa-refined' sorts first but holds outputs; of alice's sessions '10' < '9' as text
    assert (seg.user_id, seg.session_id) == ("alice", "10")
    seg = cio.find_segmentation(run, cio.parse_segmentation_info("organelles,bob"), 10)
    assert (seg.user_id, seg.session_id) == ("bob", "2")
    seg = cio.find_segmentation(run, cio.parse_segmentation_info("organelles,alice,9"), 10)
    assert seg.session_id == "9"
    seg = cio.find_segmentation(run, cio.parse_segmentation_info("organelles,aaa-refined"), 10)
    assert seg.user_id == "aaa-refined"  # named explicitly: allowed


def test_missing_segmentation_lists_what_the_run_has(project):
    run = cio.select_runs(cio.open_project(project[0]), ["run-a"])[0]
    with pytest.raises(InputError) as err:
        cio.find_segmentation(run, cio.parse_segmentation_info("mito,saber,1"), 10)
    msg = str(err.value)
    assert "run run-a: no segmentation matches 'mito,saber,1' at voxel size 10 A" in msg
    assert "organelles (user alice, session 9, voxel size 10 A, multilabel)" in msg
    assert "membrane (user tool, session 1, voxel size 10 A, binary)" in msg
    assert "coarse (user tool, session 1, voxel size 20 A, multilabel)" in msg
    with pytest.raises(InputError, match="no segmentation matches 'coarse' at voxel size 10 A"):
        cio.find_segmentation(run, cio.parse_segmentation_info("coarse"), 10)
    with pytest.raises(InputError, match="only read when named"):
        cio.find_segmentation(run, cio.parse_segmentation_info("mito"), 10)


def test_read_gives_zyx_with_the_voxel_size_in_angstrom(project):
    cfg, org = project
    run = cio.select_runs(cio.open_project(cfg), ["run-b"])[0]
    vol = cio.read_segmentation(cio.find_segmentation(run, cio.parse_segmentation_info("organelles,alice"), 10.0))
    assert vol.shape == SHAPE and vol.data[1, 2, 3] == 300 and vol.data[4, 5, 6] == 7
    np.testing.assert_array_equal(vol.data, org)
    assert vol.voxel_size == (10.0, 10.0, 10.0) and vol.unit == "angstrom"
    assert vol.attrs["copick"]["user_id"] == "alice" and vol.attrs["copick"]["type"] == "multilabel"


def test_write_keeps_labels_above_255_and_touches_only_its_output(project):
    cfg, org = project
    root = cio.open_project(cfg)
    run = cio.select_runs(root, ["run-a"])[0]
    before = cio.read_segmentation(cio.find_segmentation(run, cio.parse_segmentation_info("organelles,bob"), 10))
    data = np.zeros(SHAPE, np.uint16)
    data[2, 3, 4] = 300
    info = cio.parse_segmentation_info("organelles,bob")
    seg = cio.find_segmentation(run, info, 10)
    assert seg.user_id == "bob"
    assert cio.refined_user_id(info) == "bob-refined"
    # a name-only info: SABER's user for that call; a configured user wins
    assert cio.refined_user_id(cio.parse_segmentation_info("organelles")) == "saber-refined"
    assert cio.refined_user_id(info, "curated") == "curated"
    assert cio.refined_name(info) == "organelles-refined" and cio.refined_name(info, "mito") == "mito"
    cio.write_segmentation(run, "organelles", data, user_id="bob-refined", session_id="1", voxel_size=10.0,
                           kind="multilabel")
    data = data.astype(np.uint32)
    data[2, 3, 4] = 70000
    cio.write_segmentation(run, "organelles", data, user_id="bob-refined", session_id="1",
                           voxel_size=10.0, kind="multilabel")  # overwrites the same output, now uint32

    run = cio.select_runs(cio.open_project(cfg), ["run-a"])[0]  # fresh view of the storage
    out = cio.find_segmentation(run, cio.parse_segmentation_info("organelles,bob-refined,1"), 10)
    assert cio.segmentation_type(out) == "multilabel"
    back = cio.read_segmentation(out)
    assert back.dtype == np.uint32 and back.data[2, 3, 4] == 70000 and np.count_nonzero(back.data) == 1
    after = cio.read_segmentation(cio.find_segmentation(run, cio.parse_segmentation_info("organelles,bob"), 10))
    np.testing.assert_array_equal(after.data, before.data)
    assert len([s for s in run.segmentations if s.user_id == "bob-refined"]) == 1


def test_instance_inputs_are_read_and_outputs_are_instance_segmentations(project):
    run = cio.select_runs(cio.open_project(project[0]), ["run-a"])[0]
    seg = run.new_segmentation(voxel_size=10.0, name="vesicle", session_id="1", user_id="tool", is_instance=True)
    seg.from_numpy(project[1])
    found = cio.find_segmentation(run, cio.parse_segmentation_info("vesicle"), 10)
    # ids of organelles are instances of one object, not object labels (what a multilabel output would say)
    assert cio.segmentation_type(found) == "instance" and cio.output_type() == "instance"
    cio.write_segmentation(run, "vesicle", project[1], user_id="tool-refined", session_id="1", voxel_size=10.0)
    run = cio.select_runs(cio.open_project(project[0]), ["run-a"])[0]
    assert not run.get_segmentations(name="vesicle", user_id="tool-refined")  # copick's default: not instances
    out = run.get_segmentations(name="vesicle", user_id="tool-refined", is_instance=True)
    assert len(out) == 1 and cio.segmentation_type(out[0]) == "instance"
    np.testing.assert_array_equal(cio.read_segmentation(out[0]).data, project[1])


def test_label_dtype_check(monkeypatch):
    cio.check_label_dtype(np.uint16)
    cio.check_label_dtype(np.uint64)
    with pytest.raises(InputError, match="unsigned"):
        cio.check_label_dtype(np.int32, "labels")
    from copick.models import CopickSegmentation

    def old_from_numpy(self, data, levels=1):  # a copick that writes uint8 only
        raise AssertionError("never called")

    monkeypatch.setattr(CopickSegmentation, "from_numpy", old_from_numpy)
    cio.check_label_dtype(np.uint8)
    with pytest.raises(InputError, match="need uint16 but copick .* writes segmentations as uint8"):
        cio.check_label_dtype(np.uint16, "labels")


def test_an_unreachable_data_portal_is_said_plainly_and_fast(tmp_path, monkeypatch, capsys):
    """A data-portal project whose portal cannot be reached: exit 4 (a retry may work, unlike bad input)
    within seconds, naming the portal and the datasets, where copick would retry ~40 s and fail with a
    transport error reported as "not a readable configuration".  The portal client is pointed at a port
    that refuses connections, so the test does not depend on this machine's network."""
    import time

    from cryoet_data_portal import _client

    from maskworks.cli import main

    monkeypatch.setattr(_client, "DEFAULT_URL", "http://127.0.0.1:9/graphql")
    cfg = tmp_path / "portal.json"
    cfg.write_text(json.dumps({"config_type": "cryoet_data_portal", "name": "portal", "dataset_ids": [10301],
                               "overlay_root": f"local://{tmp_path / 'overlay'}", "pickable_objects": []}))
    start = time.monotonic()
    code = main(["copick-runs", "--config", str(cfg), "--org-info", "organelles", "--mem-info", "membranes",
                 "--out", str(tmp_path / "runs.tsv")])
    err = capsys.readouterr().err
    assert code == 4 and time.monotonic() - start < 10
    assert "reads its runs from the CryoET Data Portal (datasets 10301) at http://127.0.0.1:9/graphql" in err
    assert "cannot be reached" in err and "not a readable" not in err
    assert not (tmp_path / "runs.tsv").exists()
