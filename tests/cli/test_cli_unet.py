"""`maskworks train-unet` and `maskworks predict-unet` on tiny files (in-process, CPU)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from maskworks.cli import main  # noqa: E402
from maskworks.io import read_volume, write_volume  # noqa: E402

SHAPE = (32, 48, 48)
TINY = ["--channels", "4,8,16", "--strides", "2,2", "--num-res-units", "1", "--patch-size", "16",
        "--patches-per-epoch", "4", "--val-patches", "2", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; more threads only spin against other processes
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from maskworks.demo import make_em_volume

    image, truth = make_em_volume(SHAPE, seed=4)
    d = tmp_path_factory.mktemp("unet")
    write_volume(d / "img.zarr", image, (40, 16, 16), unit="nanometer")
    write_volume(d / "truth.tif", truth * 255, (40, 16, 16), unit="nanometer")  # a 0/255 mask
    write_volume(d / "truth01.zarr", truth, (40, 16, 16), unit="nanometer")
    return d


@pytest.fixture(scope="module")
def trained(data):
    out = data / "model"
    assert main(["train-unet", str(out), "--images", str(data / "img.zarr"), "--labels", str(data / "truth.tif"),
                 "--epochs", "1", *TINY]) == 0
    return out


def test_train_writes_every_output_and_resumes(data, trained):
    for name in ["best.pt", "last.pt", "history.csv", "curves.png", "metrics.json"]:
        assert (trained / name).exists(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and 0 <= metrics["test"]["dice"] <= 1
    assert metrics["inputs"][0]["voxel_size"] == [40.0, 16.0, 16.0]
    last = torch.load(trained / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and "optimizer" in last

    resumed = data / "resumed"
    resumed.mkdir()
    for name in ["best.pt", "last.pt"]:
        (resumed / name).write_bytes((trained / name).read_bytes())
    assert main(["train-unet", str(resumed), "--images", str(data / "img.zarr"), "--labels", str(data / "truth.tif"),
                 "--epochs", "2", "--resume", *TINY]) == 0
    rows = list(csv.DictReader((resumed / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs_run"] == 2


@pytest.mark.parametrize("ext", [".zarr", ".tif"])
def test_predict_writes_probability_mask_stats_and_qc(data, trained, tmp_path, ext):
    out = tmp_path / f"mask{ext}"
    prob = tmp_path / f"prob{ext}"
    assert main(["predict-unet", str(data / "img.zarr"), str(trained / "best.pt"), str(out), "--prob", str(prob),
                 "--roi-size", "16", "--overlap", "4", "--chunk-shape", "24", "--truth", str(data / "truth01.zarr"),
                 "--device", "cpu"]) == 0
    mask, p = read_volume(out), read_volume(prob)
    assert mask.dtype == np.uint8 and set(np.unique(mask.numpy())) <= {0, 1}
    assert p.dtype == np.float16 and 0 <= float(p.numpy().min()) and float(p.numpy().max()) <= 1
    assert mask.voxel_size == pytest.approx((40, 16, 16)) and mask.unit == "nanometer"
    assert p.voxel_size == pytest.approx((40, 16, 16))
    np.testing.assert_array_equal(mask.numpy(), (p.numpy().astype(np.float32) > 0.5) | (mask.numpy() == 1))
    stats = json.loads((tmp_path / "mask_stats.json").read_text())
    assert stats["chunk_shape"] == [24, 24, 24] and stats["blocks"] == 8 and 0 <= stats["truth"]["dice"] <= 1
    assert (tmp_path / "mask_qc.png").stat().st_size > 1000


def test_predict_blend_constant_on_the_command_line(data, trained, tmp_path):
    """--blend constant (Catena's plain average) reaches the library: recorded in the stats and a
    different probability where windows overlap than the default gaussian blend."""
    probs = {}
    for blend in ("gaussian", "constant"):
        out = tmp_path / blend / "mask.tif"
        assert main(["predict-unet", str(data / "img.zarr"), str(trained / "best.pt"), str(out), "--roi-size", "16",
                     "--overlap", "8", "--device", "cpu", "--blend", blend]) == 0
        assert json.loads((tmp_path / blend / "mask_stats.json").read_text())["blend"] == blend
        probs[blend] = read_volume(tmp_path / blend / "mask_prob.zarr").numpy().astype(np.float32)
    assert not np.array_equal(probs["gaussian"], probs["constant"])


def test_train_from_a_folder_of_patch_pairs(tmp_path):
    from maskworks.demo import make_em_volume

    images, merged = tmp_path / "patches" / "imagesCorr", tmp_path / "merged"
    for k in range(3):
        image, truth = make_em_volume((24, 24, 24), seed=10 + k)
        label = truth.copy()
        label[:4], label[-4:], label[:, :4], label[:, -4:], label[:, :, :4], label[:, :, -4:] = 2, 2, 2, 2, 2, 2
        write_volume(images / f"other_tomo_patch{k}.nrrd", image, 10.0, unit="angstrom")
        write_volume(merged / f"other_tomo_patch{k}.nrrd", label, 10.0, unit="angstrom")
    (merged / "report.csv").write_text("key,status\n")  # what merge-corrections writes beside the labels
    out = tmp_path / "model"
    assert main(["train-unet", str(out), "--images-dir", str(images), "--labels-dir", str(merged),
                 "--split-block-shape", "24", "--epochs", "1", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["inputs"]) == 3
    assert {k: v["blocks"] for k, v in metrics["split"].items()} == {"train": 1, "val": 1, "test": 1}
    (merged / "other_tomo_patch1.nrrd").unlink()
    assert main(["train-unet", str(out), "--images-dir", str(images), "--labels-dir", str(merged), *TINY]) == 2


class NotAllowed:
    pass


def test_checkpoints_are_never_unpickled(data, tmp_path, capsys):
    bad = tmp_path / "evil.pt"
    torch.save({"format": "maskworks-unet/1", "payload": NotAllowed()}, bad)
    assert main(["predict-unet", str(data / "img.zarr"), str(bad), str(tmp_path / "m.zarr"), "--device", "cpu"]) == 2
    assert "cannot be read as a maskworks U-Net checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.zarr").exists() and not (tmp_path / "m_prob.zarr").exists()
