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
    pair_by_overlap,
    segment_expansion,
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


# ----------------------------------------------------------------------------- expansion


def test_expansion_grows_the_watershed_nuclei_into_paired_cells(demo_patch):
    image, cells, nuclei = demo_patch
    cell, nucleus, stats = segment_expansion(image, expansion_distance=4)
    # the nuclei are the watershed's (same nuclear step, same parameters)
    np.testing.assert_array_equal(nucleus, segment_watershed(image)[1])
    assert cell.dtype == nucleus.dtype == np.int32 and cell.shape == image.shape[:2]
    assert stats == {"nuclei": int(nucleus.max()), "cells": int(cell.max())} and cell.max() == nucleus.max()
    # paired: nucleus k lies inside cell k, and cell k is nucleus k grown by at most 4 pixels
    m = nucleus > 0
    np.testing.assert_array_equal(cell[m], nucleus[m])
    from scipy import ndimage as ndi

    assert ndi.distance_transform_edt(nucleus == 0)[cell > 0].max() <= 4
    assert np.count_nonzero(cell) > np.count_nonzero(nucleus)
    # the repair step keeps every pair as it is
    from maskworks.codex.repair import repair_masks

    rc, rn, _, rstats = repair_masks(cell, nucleus)
    assert rstats["matched"] == cell.max() and np.count_nonzero(rc) == np.count_nonzero(cell)
    # distance 0: the cells are the nuclei; blank: nothing
    np.testing.assert_array_equal(segment_expansion(image, expansion_distance=0)[0], nucleus)
    blank = segment_expansion(np.zeros((32, 32, 2), np.uint16))
    assert not blank[0].any() and blank[2] == {"nuclei": 0, "cells": 0}


def test_expansion_meets_half_way_between_two_nuclei():
    img = np.zeros((20, 41, 2), np.uint16)
    img[8:13, 8:13, 0] = 1000  # two 5 x 5 nuclei, facing edges at columns 12 and 32
    img[8:13, 32:37, 0] = 1000
    cell, nucleus, _ = segment_expansion(img, smoothing_sigma=0, min_nucleus_area=1, expansion_distance=30)
    assert nucleus.max() == 2 and set(np.unique(cell)) == {1, 2}
    left = nucleus[10, 10]
    # column 22 is 10 pixels from both: the border; everything else goes to the nearer nucleus
    assert (cell[:, :22] == left).all() and (cell[:, 23:] == 3 - left).all()


def test_pair_by_overlap_renumbers_and_trims_nuclei():
    cell = np.zeros((6, 10), np.int32)
    cell[:, :5], cell[:, 5:] = 7, 3  # ids need not be consecutive
    nucleus = np.zeros_like(cell)
    nucleus[1:3, 3:7] = 5  # 4 pixels in cell 7 (cols 3-4), 4 in cell 3: tie -> nucleus 5 to both
    nucleus[4, 6:9] = 9    # cell 3 overlaps nucleus 9 by 3 pixels, nucleus 5 by 4: nucleus 5 wins
    nucleus[5, 0] = 2      # the only nucleus in cell 7 besides 5 (1 pixel): 5 wins there too
    c, n = pair_by_overlap(cell, nucleus)
    np.testing.assert_array_equal(np.unique(c), [1, 2])  # 3 -> 1, 7 -> 2
    assert c.dtype == n.dtype == np.int32
    expected = np.zeros_like(cell)
    expected[1:3, 3:5], expected[1:3, 5:7] = 2, 1
    np.testing.assert_array_equal(n, expected)
    # every nucleus lies inside the cell of its id
    assert (c[n > 0] == n[n > 0]).all()
    c, n = pair_by_overlap(cell, np.zeros_like(cell))
    assert not n.any() and c.max() == 2


# ----------------------------------------------------------------------------- InstanSeg


@pytest.fixture(scope="module")
def tiny_instanseg(tmp_path_factory):
    """A tiny InstanSeg model with random weights, built and saved as InstanSeg's own export does
    (instanseg.utils.utils.export_to_torchscript): the real UNet, pixel classifier and TorchScript
    wrapper, two input channels, nuclei and cells."""
    pytest.importorskip("instanseg", reason="instanseg-torch is not installed (make setup installs it)")
    import torch
    from instanseg.utils.loss.instanseg_loss import InstanSeg as InstanSegMethod
    from instanseg.utils.loss.instanseg_loss import InstanSeg_Torchscript
    from instanseg.utils.models.InstanSeg_UNet import InstanSeg_UNet

    torch.manual_seed(0)
    unet = InstanSeg_UNet(in_channels=2, layers=np.array([8, 16])[::-1], out_channels=[2, 2, 1, 2, 2, 1],
                          norm="BATCH", dropout=0)
    method = InstanSegMethod(n_sigma=2, feature_engineering_function="0", dim_coords=2, dim_seeds=1, device="cpu")
    model = method.initialize_pixel_classifier(unet, MLP_width=5)
    wrapper = InstanSeg_Torchscript(model, cells_and_nuclei=True, pixel_size=0.5, n_sigma=2, backbone_dim_in=2,
                                    feature_engineering_function="0")
    folder = tmp_path_factory.mktemp("instanseg") / "fluorescence_nuclei_and_cells" / "0.1.0"
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(wrapper), str(folder / "instanseg.pt"))
    return folder


def test_instanseg_real_code_path_with_a_tiny_model(tiny_instanseg, demo_patch):
    from maskworks.codex.segment import (
        find_instanseg_model,
        load_instanseg_model,
        segment_instanseg,
    )

    # the model folder (as InstanSeg's download extracts it) or the file itself
    assert find_instanseg_model(tiny_instanseg.parent.parent) == tiny_instanseg / "instanseg.pt"
    model = load_instanseg_model(tiny_instanseg / "instanseg.pt")
    batch = demo_patch[0][None, :96, :96]
    cell, nucleus = segment_instanseg(np.concatenate([batch, np.zeros_like(batch)]), model=model)
    assert cell.shape == nucleus.shape == (2, 96, 96) and cell.dtype == nucleus.dtype == np.int32
    for c, n in zip(cell, nucleus):
        np.testing.assert_array_equal(np.setdiff1d(c, [0]), np.arange(1, c.max() + 1))  # ids 1..n
        assert (c[n > 0] == n[n > 0]).all()  # nucleus k inside cell k
    assert not cell[1].any() and not nucleus[1].any()  # a flat patch: nothing, without the model
    # the pixel size rescales to the model's 0.5 um/px and back: same shape out
    c2, _ = segment_instanseg(batch, model=model, image_mpp=0.25)
    assert c2.shape == (1, 96, 96)
    with pytest.raises(InputError, match=r"\(n, h, w, 2\)"):
        segment_instanseg(batch[..., :1], model=model)


def test_instanseg_model_path_errors(tmp_path):
    from maskworks.codex.segment import find_instanseg_model, load_instanseg_model

    with pytest.raises(InputError, match="needs model_path"):
        find_instanseg_model(None)
    with pytest.raises(InputError, match="no such file"):
        find_instanseg_model(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no instanseg.pt"):
        find_instanseg_model(tmp_path / "empty")
    pytest.importorskip("instanseg", reason="instanseg-torch is not installed (make setup installs it)")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a TorchScript model"):
        load_instanseg_model(tmp_path / "bad.pt")


def test_instanseg_output_channels_are_nuclei_then_cells_and_get_paired():
    """What segment_instanseg makes of InstanSeg's output (channel 0 nuclei, 1 cells), with a stand-in for
    the model that returns known labels: each nucleus is renumbered after its cell and trimmed to it."""
    torch = pytest.importorskip("torch")
    from maskworks.codex.segment import segment_instanseg

    nuclei = np.zeros((8, 8), np.int64)
    nuclei[1:3, 1:4] = 4  # overhangs cell 2 by one column
    nuclei[5:7, 5:7] = 9
    cells = np.zeros((8, 8), np.int64)
    cells[0:4, 0:3], cells[4:8, 4:8] = 2, 1

    class Model:
        class instanseg:
            cells_and_nuclei = True

        def eval_small_image(self, image, **kwargs):
            assert tuple(image.shape) == (2, 8, 8) and image.dtype == torch.float32
            assert kwargs["target"] == "all_outputs" and kwargs["normalise"] is True
            return torch.from_numpy(np.stack([nuclei, cells]))[None].float()

    patch = np.random.default_rng(0).integers(0, 100, (1, 8, 8, 2))
    cell, nucleus = segment_instanseg(patch, model=Model())
    np.testing.assert_array_equal(cell[0], cells)
    expected = np.zeros((8, 8), np.int32)
    expected[1:3, 1:3], expected[5:7, 5:7] = 2, 1
    np.testing.assert_array_equal(nucleus[0], expected)
