"""A stage's outputs are one transaction: a failed or killed rerun leaves the old set exactly as it
was, a killed run's staging is cleaned by the next run, and the next run gives what an
uninterrupted one gives."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import exe, run

from maskworks.io import read_volume, write_volume
from maskworks.io.atomic import partial_path, remove_stale, transaction

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
    return {p.name: _digest(p) for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    from maskworks.demo import make_em_volume

    image, truth = make_em_volume(shape=SHAPE, seed=5)
    d = tmp_path_factory.mktemp("txn")
    write_volume(d / "vol.tif", image, (16, 16, 16), unit="nanometer")
    write_volume(d / "truth.tif", truth, (16, 16, 16), unit="nanometer")
    write_volume(d / "other_shape.tif", truth[:, :32], (16, 16, 16), unit="nanometer")
    return d


TEXTURE = ["texture-mask", "{d}/vol.tif", "{o}/mask.tif", "--block-size", "16"]
POSTPROCESS = ["postprocess-mask", "{o}/mask.tif", "{o}/final.tif", "--image", "{d}/vol.tif"]


def _args(template, d, o, *extra):
    return [exe("maskworks")] + [a.format(d=d, o=o) for a in template] + list(extra)


@pytest.mark.parametrize("stage,bad", [
    ("texture", ["--truth", "{d}/other_shape.tif"]),  # inputs checked only after the outputs were written
    ("postprocess", ["--truth", "{d}/other_shape.tif"]),
])
def test_a_failed_rerun_leaves_the_old_outputs_byte_for_byte(volume, tmp_path, stage, bad):
    d, o = volume, tmp_path
    run(_args(TEXTURE, d, o))
    if stage == "postprocess":
        run(_args(POSTPROCESS, d, o))
    before = _state(o)
    template = TEXTURE if stage == "texture" else POSTPROCESS
    proc = run(_args(template, d, o, *[b.format(d=d) for b in bad]), check=False)
    assert proc.returncode == 2 and "other_shape.tif" in proc.stderr and "Traceback" not in proc.stderr
    assert _state(o) == before  # every output, stats and QC included, and no staging left


def test_a_killed_run_leaves_old_or_new_and_the_rerun_cleans_up(volume, tmp_path):
    """SIGKILL the texture mask at several points of its run: the folder holds the old outputs
    (bytes unchanged) or the complete new set, never a mix; a rerun removes the staging the
    killed run left and writes what an uninterrupted run writes."""
    d = volume
    ref = tmp_path / "ref"
    ref.mkdir()
    run(_args(TEXTURE, d, ref, "--threshold", "0.5"))
    reference = read_volume(ref / "mask.tif").numpy()
    work = tmp_path / "work"
    work.mkdir()
    run(_args(TEXTURE, d, work))  # the old result, another threshold
    old = _state(work)
    t0 = time.perf_counter()
    run(_args(TEXTURE, d, work, "--threshold", "0.5"))
    full = time.perf_counter() - t0
    new_mask = _digest(work / "mask.tif")
    seen = set()
    for fraction in (0.15, 0.35, 0.55, 0.7, 0.85, 0.95):
        run(_args(TEXTURE, d, work))  # back to the old result
        old = _state(work)
        proc = subprocess.Popen(_args(TEXTURE, d, work, "--threshold", "0.5"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(fraction * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = {k: v for k, v in _state(work).items() if ".partial." not in k and ".old." not in k}
        if now == old:
            seen.add("old")
        else:  # committed: the whole new set, with the new mask
            assert set(now) == set(old) and now["mask.tif"] == new_mask, fraction
            assert all(now[k] != old[k] for k in ("mask.tif", "mask_stats.json")), fraction
            seen.add("new")
        run(_args(TEXTURE, d, work, "--threshold", "0.5"))
        assert not [p for p in os.listdir(work) if ".partial." in p or ".old." in p]
        np.testing.assert_array_equal(read_volume(work / "mask.tif").numpy(), reference)
    assert "old" in seen


def test_stale_staging_of_dead_writers_is_removed(tmp_path):
    target = tmp_path / "out.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = partial_path(target)
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    stale.write_text("half")
    foreign = tmp_path / f".otherhost-1-abcd1234.partial.{target.name}"
    foreign.write_text("recent, another host's")
    (tmp_path / ".otherhost-2-abcd1234.old.out.json").mkdir()
    old_foreign = tmp_path / ".otherhost-2-abcd1234.old.out.json"
    os.utime(old_foreign, (time.time() - 3 * 86400,) * 2)
    removed = remove_stale(target)
    assert stale in removed and old_foreign in removed and foreign.exists()
    with transaction(target):
        pass


def test_transaction_commits_together_or_not_at_all(tmp_path):
    from maskworks.io import atomic_path

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


def test_a_killed_training_rerun_gives_back_the_earlier_model(volume, tmp_path):
    """SIGKILL a train-unet rerun at several points: the earlier run's five outputs are either
    still in place or kept whole in .previous_run, and the next run puts them back first."""
    d, out = volume, tmp_path / "model"
    tiny = ["--channels", "4,8", "--strides", "2", "--num-res-units", "0", "--patch-size", "16",
            "--split-block-shape", "16", "--patches-per-epoch", "2", "--val-patches", "1", "--batch-size", "1",
            "--device", "cpu"]
    base = [exe("maskworks"), "train-unet", out, "--images", d / "vol.tif", "--labels", d / "truth.tif", *tiny]
    t0 = time.perf_counter()
    run([*base, "--epochs", "4", "--seed", "1"])
    full = time.perf_counter() - t0
    seen = set()
    for fraction in (0.6,):  # past reading the inputs and setting the earlier set aside, before the end
        run([*base, "--epochs", "1"])  # the earlier model (timings in its history differ run to run)
        old = _state(out)
        proc = subprocess.Popen([str(a) for a in base] + ["--epochs", "4", "--seed", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(fraction * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        previous = out / ".previous_run"
        if previous.is_dir():  # killed while training: the earlier set waits there, whole
            assert _state(previous) == old, fraction
            seen.add("aside")
        else:  # not started moving, or finished: one whole set
            now = _state(out)
            assert now == old or (set(now) == set(old) and now["metrics.json"] != old["metrics.json"]), fraction
        run([*base, "--epochs", "1"])  # restores first, then trains the earlier model again
        assert not previous.exists() and set(_state(out)) == set(old)
    assert "aside" in seen  # at least one kill landed while the new model was training
