"""A stage's outputs are one journaled commit (maskworks.io.outputs), tried through the real command
line and the real file system with faults injected at named steps (never a timer, never a mock of
the file system): a kill at every step of the commit leaves every output complete (its old or its
new version) and the next run, even a failing one, completes or rolls back the whole set; two runs
on the same outputs never mix or empty them; random interleavings of a writer and a reader keep
every output whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import exe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskworks.io import atomic_path, read_volume, transaction, write_volume
from maskworks.io.outputs import LOCK_FILE

SHAPE = (32, 64, 64)


def _digest(path: Path) -> str:
    """Bytes of a file, or of every file of a directory (names included)."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(p.read_bytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def _state(d: Path) -> dict:
    """What a reader of the folder sees: every entry but the hidden staging, journals and locks."""
    return {p.name: _digest(p) for p in sorted(d.iterdir()) if not p.name.startswith(".mw-") and p.name != LOCK_FILE}


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".mw-") or p.name == LOCK_FILE)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    from maskworks.demo import make_em_volume

    image, truth = make_em_volume(shape=SHAPE, seed=5)
    d = tmp_path_factory.mktemp("txn")
    write_volume(d / "vol.tif", image, (16, 16, 16), unit="nanometer")
    write_volume(d / "truth.tif", truth, (16, 16, 16), unit="nanometer")
    write_volume(d / "other_shape.tif", truth[:, :32], (16, 16, 16), unit="nanometer")
    return d


# Four outputs: two stores (mask.zarr, mask_confidence.zarr) and two files (stats, QC picture).
TEXTURE = ["texture-mask", "{d}/vol.tif", "{o}/mask.zarr", "--block-size", "16"]
POSTPROCESS = ["postprocess-mask", "{o}/mask.zarr", "{o}/final.tif", "--image", "{d}/vol.tif"]
FAILING = ["--truth", "{d}/other_shape.tif"]  # refused after the outputs were staged


def _args(template, d, o, *extra):
    return [exe("maskworks")] + [str(a).format(d=d, o=o) for a in [*template, *extra]]


def _run(args, fault=None, check=False):
    env = {k: v for k, v in os.environ.items() if k != "MASKWORKS_FAULT"}
    if fault:
        env["MASKWORKS_FAULT"] = fault
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=600, check=check)


@pytest.mark.parametrize("stage", ["texture", "postprocess"])
def test_a_failed_rerun_leaves_the_old_outputs_byte_for_byte(volume, tmp_path, stage):
    d, o = volume, tmp_path
    _run(_args(TEXTURE, d, o), check=True)
    if stage == "postprocess":
        _run(_args(POSTPROCESS, d, o), check=True)
    before = {p.name: _digest(p) for p in o.iterdir()}
    template = TEXTURE if stage == "texture" else POSTPROCESS
    proc = _run(_args(template, d, o, *FAILING))
    assert proc.returncode == 2 and "other_shape.tif" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: _digest(p) for p in o.iterdir()} == before  # every output, and nothing left beside them


# Every step of a commit of the texture mask's four outputs, in order: (step, n-th time).
STEPS = [("stage.done", 1), ("commit.prepared", 1), ("commit.record", 1), ("commit.install", 1),
         ("commit.install", 2), ("commit.install", 3), ("commit.install", 4), ("commit.done", 1)]
ASIDE = [("commit.aside", 1), ("commit.aside", 2)]  # between the two renames of a store, without exchange
AFTER_RECORD = {"commit.record", "commit.install", "commit.done", "commit.aside"}


@pytest.fixture(scope="module")
def versions(volume, tmp_path_factory):
    """The texture mask's four outputs with the default threshold ("old") and with 0.5 ("new")."""
    d = volume
    out = {}
    for name, extra in (("old", []), ("new", ["--threshold", "0.5"])):
        o = tmp_path_factory.mktemp(name)
        _run(_args(TEXTURE, d, o, *extra), check=True)
        out[name] = o
    old, new = _state(out["old"]), _state(out["new"])
    assert set(old) == set(new) == {"mask.zarr", "mask_confidence.zarr", "mask_stats.json", "mask_qc.png"}
    assert all(old[k] != new[k] for k in old)
    return out


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_kill_at_every_step_of_the_commit_leaves_old_or_new(volume, versions, tmp_path, exchange):
    """SIGKILL at each step of the commit (and, without RENAME_EXCHANGE as on NFS, between the two
    renames of each store): every output is then its complete old or complete new version; a
    failing rerun completes the commit (killed after the journal's commit record) or rolls it back
    (before), leaving no staging, journal or lock; a further good run gives the uninterrupted result."""
    d = volume
    old, new = _state(versions["old"]), _state(versions["new"])
    extra = "" if exchange else ",no-exchange"
    seen = {}
    for step, n in STEPS + ([] if exchange else ASIDE):
        work = tmp_path / f"{step}-{n}"
        shutil.copytree(versions["old"], work)
        proc = _run(_args(TEXTURE, d, work, "--threshold", "0.5"), fault=f"kill:{step}:{n}{extra}")
        assert proc.returncode == -signal.SIGKILL, (step, n, proc.stderr[-2000:])
        now = _state(work)
        if step == "commit.aside":  # without an exchange, one store is away for the instant between its renames
            assert len(set(old) - set(now)) == 1 and (set(old) - set(now)) < {"mask.zarr", "mask_confidence.zarr"}
        else:
            assert set(now) == set(old), (step, n, now)  # nothing missing, nothing added
        assert all(now[k] in (old[k], new[k]) for k in now), (step, n)  # each output whole
        if step not in AFTER_RECORD:
            assert now == old, (step, n)
        proc = _run(_args(TEXTURE, d, work, "--threshold", "0.5", *FAILING))  # the next run fails ...
        assert proc.returncode == 2, proc.stderr[-2000:]
        after = _state(work)  # ... and has first put the whole set right
        assert after == (new if step in AFTER_RECORD else old), (step, n)
        assert _leftovers(work) == [], (step, n, _leftovers(work))
        seen[(step, n)] = "new" if after == new else "old"
        _run(_args(TEXTURE, d, work, "--threshold", "0.5"), check=True)
        assert _state(work) == new
    assert set(seen.values()) == {"old", "new"}


def test_a_kill_during_recovery_is_recovered_by_the_run_after(volume, versions, tmp_path):
    d, work = volume, tmp_path / "work"
    shutil.copytree(versions["old"], work)
    _run(_args(TEXTURE, d, work, "--threshold", "0.5"), fault="kill:commit.install:2")
    proc = _run(_args(TEXTURE, d, work, *FAILING), fault="kill:recover.install:1")
    assert proc.returncode == -signal.SIGKILL
    assert all(v in (_state(versions["old"])[k], _state(versions["new"])[k]) for k, v in _state(work).items())
    assert _run(_args(TEXTURE, d, work, *FAILING)).returncode == 2
    assert _state(work) == _state(versions["new"]) and _leftovers(work) == []


def _wait_for(path: Path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _popen(args, fault):
    env = {**os.environ, "MASKWORKS_FAULT": fault}
    return subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


@pytest.mark.parametrize("second", ["failing", "good"])
def test_a_second_run_on_the_same_outputs_is_told_and_touches_nothing(volume, versions, tmp_path, second):
    """Run A (good, new threshold) is held just before its commit; run B on the same outputs stops at
    once with a message and exit 2; A then commits its complete set."""
    d, work, go = volume, tmp_path / "work", tmp_path / "go"
    shutil.copytree(versions["old"], work)
    a = _popen(_args(TEXTURE, d, work, "--threshold", "0.5"), f"wait:stage.done:1:{go}")
    _wait_for(Path(f"{go}.reached"), a)
    b = _run(_args(TEXTURE, d, work, *(FAILING if second == "failing" else [])))
    assert b.returncode == 2 and "another maskworks run" in b.stderr and "is writing this output" in b.stderr, b.stderr
    assert f"process {a.pid}" in b.stderr and "Traceback" not in b.stderr
    assert _state(work) == _state(versions["old"])
    go.touch()
    assert a.wait(timeout=300) == 0, a.communicate()
    assert _state(work) == _state(versions["new"]) and _leftovers(work) == []


def test_a_good_and_a_failing_run_started_together_leave_the_good_set(volume, versions, tmp_path):
    """No pause, no order: whichever run gets the outputs first, the failing one never removes or
    replaces anything, and the folder ends with the good run's complete set (or, if the good run was
    the one refused, the untouched old set)."""
    d = volume
    for i in range(3):
        work = tmp_path / f"w{i}"
        shutil.copytree(versions["old"], work)
        good = subprocess.Popen(_args(TEXTURE, d, work, "--threshold", "0.5"), stderr=subprocess.PIPE, text=True)
        bad = subprocess.Popen(_args(TEXTURE, d, work, "--threshold", "0.5", *FAILING), stderr=subprocess.PIPE,
                               text=True)
        codes = good.wait(timeout=300), bad.wait(timeout=300)
        assert codes[1] == 2
        assert _state(work) == (_state(versions["new"]) if codes[0] == 0 else _state(versions["old"]))
        assert codes[0] == 0 or "another maskworks run" in good.stderr.read()
        assert _leftovers(work) == []


def test_runs_on_different_outputs_in_one_folder_do_not_wait_for_each_other(volume, tmp_path):
    d, work, go = volume, tmp_path / "work", tmp_path / "go"
    a = _popen(_args(TEXTURE, d, work), f"wait:stage.done:1:{go}")
    _wait_for(Path(f"{go}.reached"), a)
    b = _run([exe("maskworks"), "texture-mask", d / "vol.tif", work / "other.zarr", "--block-size", "16"])
    assert b.returncode == 0, b.stderr
    go.touch()
    assert a.wait(timeout=300) == 0
    assert {"mask.zarr", "other.zarr", "mask_stats.json", "other_stats.json"} <= set(_state(work))
    assert _leftovers(work) == []


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_end_with_one_line_and_remove_the_staging(volume, versions, tmp_path, signum, code):
    d, work, go = volume, tmp_path / "work", tmp_path / "go"
    shutil.copytree(versions["old"], work)
    a = _popen(_args(TEXTURE, d, work, "--threshold", "0.5"), f"wait:stage.done:1:{go}")
    _wait_for(Path(f"{go}.reached"), a)
    a.send_signal(signum)
    _, err = a.communicate(timeout=300)
    assert a.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("maskworks texture-mask: error: stopped by")
    assert _state(work) == _state(versions["old"]) and _leftovers(work) == []


def test_the_killed_run_s_staging_is_removed_by_a_run_on_other_outputs_in_its_folder(volume, versions, tmp_path):
    d, work = volume, tmp_path / "work"
    shutil.copytree(versions["old"], work)
    _run(_args(TEXTURE, d, work, "--threshold", "0.5"), fault="kill:stage.done:1")
    assert _leftovers(work)  # the dead run's staging (and its lock file)
    _run([exe("maskworks"), "texture-mask", d / "vol.tif", work / "other.zarr", "--block-size", "16"], check=True)
    assert _leftovers(work) == [] and _state(work)["mask.zarr"] == _state(versions["old"])["mask.zarr"]


# ----------------------------------------------------------------------------- interleavings

WRITER = """
import json, sys
from pathlib import Path
from maskworks.io import atomic_path, transaction
spec = json.loads(sys.argv[1])
with transaction(*spec["targets"]):
    for t in spec["targets"]:
        with atomic_path(t) as tmp:
            if t.endswith(".zarr"):
                (tmp / "sub").mkdir(parents=True)
                (tmp / "a").write_text(spec["tag"])
                (tmp / "sub" / "b").write_text(spec["tag"] * 3)
            else:
                tmp.write_text(spec["tag"])
"""


def _version(path: Path) -> str | None:
    """The version tag a reader finds at ``path``; None if it is missing or not whole."""
    try:
        if path.name.endswith(".zarr"):
            a, b = (path / "a").read_text(), (path / "sub" / "b").read_text()
            return a if b == a * 3 else None
        return path.read_text()
    except OSError:
        return None


def _write(targets, tag, fault=None, wait=None):
    env = {k: v for k, v in os.environ.items() if k != "MASKWORKS_FAULT"}
    if fault:
        env["MASKWORKS_FAULT"] = fault
    args = [sys.executable, "-c", WRITER, json.dumps({"targets": [str(t) for t in targets], "tag": tag})]
    if wait:
        return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.integers(0, 3), stores=st.integers(0, 2), had_old=st.booleans(), exchange=st.booleans(),
       step=st.integers(0, 10), reader_at=st.integers(1, 5), recover_with=st.integers(0, 4), data=st.data())
def test_random_interleavings_of_a_writer_and_a_reader(tmp_path_factory, files, stores, had_old, exchange, step,
                                                       reader_at, recover_with, data):
    """A writer commits a random set of files and stores over their old versions (or none) in two
    folders; a reader looks at every output while the writer is held after a random number of
    installs, then the writer is killed at a random step; a later run on a random subset of the
    outputs recovers.  At every look each output is missing only if it never existed, and otherwise
    whole; after the recovery the set is all old or all new, as the commit record decides."""
    if files + stores == 0:
        files = 1
    root = tmp_path_factory.mktemp("interleave")
    targets = [root / ("a" if i % 2 else "b") / f"f{i}.txt" for i in range(files)] + \
              [root / ("b" if i % 2 else "a") / f"s{i}.zarr" for i in range(stores)]
    extra = "" if exchange else ",no-exchange"
    if had_old:
        assert _write(targets, "old").returncode == 0
    before = {t: _version(t) for t in targets}
    # the reader looks while the writer is held after `reader_at` installs (or at the end)
    go = root / "go"
    n = len(targets)
    held = min(reader_at, n)
    w = _write(targets, "new", fault=f"wait:commit.install:{held}:{go}{extra}", wait=True)
    deadline = time.monotonic() + 120
    while not Path(f"{go}.reached").exists():
        assert w.poll() is None, w.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    seen = {t: _version(t) for t in targets}
    assert all(seen[t] in (before[t], "new") for t in targets), seen
    assert sum(seen[t] == "new" for t in targets) == held, seen
    go.touch()
    assert w.wait(timeout=120) == 0, w.communicate()
    assert all(_version(t) == "new" for t in targets)
    # a second writer with newer data is killed at a random step
    steps = [("stage.done", 1), ("commit.prepared", 1), ("commit.record", 1)] + \
            [("commit.install", i + 1) for i in range(n)] + \
            ([] if exchange else [("commit.aside", i + 1) for i in range(stores)]) + [("commit.done", 1)]
    kill_step, kill_n = steps[step % len(steps)]
    proc = _write(targets, "newer", fault=f"kill:{kill_step}:{kill_n}{extra}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    looked = {t: _version(t) for t in targets}
    away = 1 if kill_step == "commit.aside" else 0  # without an exchange, a store between its two renames
    assert sum(v is None for v in looked.values()) == away and \
        all(v in ("new", "newer") for v in looked.values() if v is not None), looked
    # any later run on any of these outputs puts the whole set right
    subset = data.draw(st.lists(st.sampled_from(targets), min_size=1, max_size=n, unique=True))
    with transaction(*subset[: recover_with + 1]):
        pass
    final = {_version(t) for t in targets}
    committed = kill_step in AFTER_RECORD
    assert final == ({"newer"} if committed else {"new"}), (kill_step, kill_n, final)
    for folder in {t.parent for t in subset[: recover_with + 1]}:
        assert _leftovers(folder) == [], _leftovers(folder)
    with transaction(*targets):  # staging of a dead run in a folder the recovery did not write is swept by
        pass  # the next run writing there
    for folder in {t.parent for t in targets}:
        assert _leftovers(folder) == [], _leftovers(folder)


def test_transaction_commits_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(RuntimeError), transaction(a, b):
        with atomic_path(a) as tmp:
            tmp.write_text("new a")
        assert a.read_text() == "old a"  # staged, not yet in place
        raise RuntimeError("the stage fails after writing a")
    assert a.read_text() == "old a" and b.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    with transaction(a, b):
        for p in (a, b):
            with atomic_path(p) as tmp:
                tmp.write_text(f"new {p.stem}")
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


# ----------------------------------------------------------------------------- training


TINY = ["--channels", "4,8", "--strides", "2", "--num-res-units", "0", "--patch-size", "16",
        "--split-block-shape", "16", "--patches-per-epoch", "2", "--val-patches", "1", "--batch-size", "1",
        "--device", "cpu"]


def test_a_killed_training_rerun_leaves_the_earlier_model_and_resumes(volume, tmp_path):
    """A rerun of train-unet killed after its second epoch: the earlier run's five outputs are as
    they were (the new run's epochs are only in in_progress/); --resume continues from epoch 2 and
    commits a model of 4 epochs."""
    d, out = volume, tmp_path / "model"
    base = [exe("maskworks"), "train-unet", out, "--images", d / "vol.tif", "--labels", d / "truth.tif", *TINY]
    _run([*base, "--epochs", "1"], check=True)  # the earlier model
    old = _state(out)
    assert set(old) == {"best.pt", "last.pt", "history.csv", "curves.png", "metrics.json"}
    proc = _run([*base, "--epochs", "4", "--seed", "1"], fault="kill:train.epoch:2")
    assert proc.returncode == -signal.SIGKILL
    assert {k: v for k, v in _state(out).items() if k != "in_progress"} == old
    assert (out / "in_progress" / "last.pt").is_file()
    _run([*base, "--epochs", "4", "--seed", "1", "--resume"], check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 2 and metrics["epochs_in_history"] == 4
    assert not (out / "in_progress").exists() and _leftovers(out) == []


def test_the_next_run_of_the_same_kind_gives_what_an_uninterrupted_one_gives(volume, tmp_path):
    d = volume
    ref, work = tmp_path / "ref", tmp_path / "work"
    _run(_args(TEXTURE, d, ref), check=True)
    _run(_args(TEXTURE, d, work), fault="kill:commit.install:2")
    _run(_args(TEXTURE, d, work), check=True)
    np.testing.assert_array_equal(read_volume(work / "mask.zarr").numpy(), read_volume(ref / "mask.zarr").numpy())
    assert _state(work)["mask.zarr"] == _state(ref)["mask.zarr"]
