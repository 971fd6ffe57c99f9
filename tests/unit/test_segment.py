"""maskworks.codex.segment: the watershed backend on the demo slide, label helpers, Mesmer model lookup.

The Mesmer prediction itself runs in the deepcell environment: tests/unit/test_mesmer.py.
"""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from maskworks.codex import segment
from maskworks.codex.segment import (
    download_mesmer_model,
    find_mesmer_model,
    label_boundaries,
    segment_watershed,
    smallest_uint,
)
from maskworks.demo import CODEX_SLIDE, make_codex_slide
from maskworks.io import InputError


@pytest.fixture(scope="module")
def demo_patch():
    data = make_codex_slide((512, 512), seed=3)
    names = list(CODEX_SLIDE["channels"])
    img = data["image"]
    wc = np.maximum(img[names.index("CD45")], img[names.index("PanCK")])
    return np.stack([img[names.index("DAPI")], wc], axis=-1), data["cells"], data["nuclei"]


def _iou_matched(pred, truth):
    """Truth objects matched by a predicted object with IoU > 0.5 (such matches are one-to-one)."""
    m = (pred > 0) & (truth > 0)
    top = int(truth.max()) + 1
    keys, inter = np.unique(pred[m].astype(np.int64) * top + truth[m], return_counts=True)
    p, t = keys // top, keys % top
    iou = inter / (np.bincount(pred.ravel())[p] + np.bincount(truth.ravel())[t] - inter)
    return int(np.count_nonzero(iou > 0.5))


def test_watershed_finds_the_demo_cells_with_realistic_flaws(demo_patch):
    image, cells, nuclei = demo_patch
    cell, nucleus, stats = segment_watershed(image)
    assert cell.shape == nucleus.shape == image.shape[:2] and cell.dtype == nucleus.dtype == np.int32
    for lab in (cell, nucleus):
        np.testing.assert_array_equal(np.unique(lab)[1:], np.arange(1, lab.max() + 1))  # ids 1..n
    n_true = int(cells.max())
    assert stats["cells"] == cell.max() and stats["nuclei"] == nucleus.max()
    assert 0.85 * n_true <= cell.max() <= 1.3 * n_true
    assert 0.8 * n_true <= nucleus.max() <= n_true  # dim nuclei are missed, none invented
    assert _iou_matched(cell, cells) >= 0.75 * n_true
    assert _iou_matched(nucleus, nuclei) >= 0.8 * n_true
    # what repair is for: cells without a nucleus, nuclei across cell borders
    assert stats["cells_without_nucleus"] >= 0.02 * n_true
    assert stats["nuclei_split"] >= 0.01 * n_true


def test_watershed_is_deterministic_and_handles_blank_patches(demo_patch):
    image = demo_patch[0][:128, :128]
    a, b = segment_watershed(image)[:2], segment_watershed(image)[:2]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    cell, nucleus, stats = segment_watershed(np.zeros((64, 64, 2), np.uint16))
    assert not cell.any() and not nucleus.any() and stats["cells"] == 0
    with pytest.raises(InputError, match="segment_watershed"):
        segment_watershed(np.zeros((64, 64)))


def test_parameters_change_the_result(demo_patch):
    image = demo_patch[0][:256, :256]
    base = segment_watershed(image)[2]
    tight = segment_watershed(image, max_expansion=3)
    assert np.count_nonzero(tight[0]) < np.count_nonzero(segment_watershed(image)[0])
    merged = segment_watershed(image, min_nucleus_distance=15)[2]
    assert merged["nuclei"] < base["nuclei"]


def test_label_helpers():
    lab = np.zeros((8, 9), np.int64)
    lab[1:5, 1:5], lab[4:7, 5:8] = 3, 300
    np.testing.assert_array_equal(label_boundaries(lab), find_boundaries(lab, mode="inner"))
    assert label_boundaries(lab).dtype == np.uint8
    assert smallest_uint(lab).dtype == np.uint16 and smallest_uint(lab % 256).dtype == np.uint8
    assert smallest_uint(lab * 1000).dtype == np.uint32


# ----------------------------------------------------------------------------- Mesmer model lookup


def _fake_saved_model(folder):
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"\x08\x01")
    (folder / "variables").mkdir()
    return folder


def test_model_path_directory_or_tarball(tmp_path):
    model = _fake_saved_model(tmp_path / "models" / "MultiplexSegmentation")
    assert find_mesmer_model(model) == model
    assert find_mesmer_model(tmp_path / "models") == model  # a folder holding one
    tarball = tmp_path / "dl" / "MultiplexSegmentation-9.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(model, arcname="MultiplexSegmentation")
    found = find_mesmer_model(tarball)
    assert found == tmp_path / "dl" / "MultiplexSegmentation-9" / "MultiplexSegmentation"
    stamp = (found / "saved_model.pb").stat().st_mtime_ns
    assert find_mesmer_model(tarball) == found  # extracted once
    assert (found / "saved_model.pb").stat().st_mtime_ns == stamp
    assert not [p for p in tarball.parent.iterdir() if ".partial." in p.name]


def test_model_path_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no such file"):
        find_mesmer_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Keras SavedModel"):
        find_mesmer_model(tmp_path / "empty")
    bad = tmp_path / "bad.tar.gz"
    bad.write_text("not an archive")
    with pytest.raises(InputError, match="not a tar archive"):
        find_mesmer_model(bad)
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "x.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../escape.txt")
    with pytest.raises(InputError, match="unsafe archive member"):
        find_mesmer_model(evil)
    assert not (tmp_path.parent / "escape.txt").exists()


def test_no_model_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(segment, "DEEPCELL_MODELS", tmp_path / ".deepcell" / "models")
    with pytest.raises(InputError) as err:
        find_mesmer_model(None)
    msg = str(err.value)
    assert "model_path" in msg and str(tmp_path / ".deepcell" / "models" / "MultiplexSegmentation") in msg
    assert "DEEPCELL_ACCESS_TOKEN" in msg
    cached = _fake_saved_model(tmp_path / ".deepcell" / "models" / "MultiplexSegmentation")
    assert find_mesmer_model(None) == cached  # the deepcell cache


def test_download_needs_a_token(monkeypatch, tmp_path):
    monkeypatch.delenv("DEEPCELL_ACCESS_TOKEN", raising=False)
    with pytest.raises(InputError, match="DEEPCELL_ACCESS_TOKEN is not set.*users.deepcell.org"):
        download_mesmer_model(tmp_path)


def test_mesmer_backend_outside_the_deepcell_env_says_where_to_run(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is importable here (the deepcell environment)")
    with pytest.raises(InputError, match="deepcell environment"):
        segment.load_mesmer_model(_fake_saved_model(tmp_path / "m"))
