"""Differential test against MemBrain-seg 0.0.10's patch-corrections merge (``make test-peers``).

Label patches are written by maskworks (NRRD and NIfTI), correction masks are saved the way a
SimpleITK-based viewer saves them (on the patch's own geometry), and both tools merge them:
MemBrain-seg's ``get_corrections_from_folder`` in .venv-peers, maskworks' ``merge_corrections_files``
here, with MemBrain-seg's fixed 16-voxel ignore border.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from maskworks.cryoet.stages import merge_corrections_files
from maskworks.io import read_volume, write_volume

HERE = Path(__file__).parent
PEERS_PY = HERE.parents[1] / ".venv-peers" / "bin" / "python"
pytestmark = pytest.mark.skipif(not PEERS_PY.exists(), reason="no .venv-peers: run `make test-peers`")

SIZE, VS, ORIGIN = 48, (10.0, 10.0, 10.0), (120.0, 340.0, 560.0)


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz"])
def test_merged_labels_equal_membrain_seg(tmp_path, ext):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(7)
    labels, corr = tmp_path / "labels", tmp_path / "corrections"
    keys = [f"demo_tomo_patch{i}" for i in range(3)]
    for key in keys:
        label = (rng.random((SIZE,) * 3) < 0.3).astype(np.uint8)
        label[:16] = label[-16:] = 2
        path = write_volume(labels / f"{key}{ext}", label, VS, unit="angstrom", origin=ORIGIN)
        ref = sitk.ReadImage(str(path))
        (corr / key).mkdir(parents=True)
        # the last three are names MemBrain-seg skips ("not fitting the naming"): so must maskworks
        for name in ("Add1", "add_more", "Remove1", "Ignore1", "ADDX", "REMOVE2", "aDd3"):
            mask = (rng.random((SIZE,) * 3) < 0.1).astype(np.uint8)
            img = sitk.GetImageFromArray(mask)
            img.CopyInformation(ref)
            sitk.WriteImage(img, str(corr / key / f"{name}.nrrd"))
    out = tmp_path / "merged"
    merge_corrections_files(labels, corr, out, border=16)
    for key in keys:
        theirs = tmp_path / f"{key}.npy"
        subprocess.run([PEERS_PY, HERE / "run_membrain.py", corr / key, labels / f"{key}{ext}", theirs],
                       check=True, capture_output=True, timeout=300)
        ours = read_volume(out / f"{key}{ext}").numpy()
        np.testing.assert_array_equal(ours, np.load(theirs))


def _training_patches(root: Path, tomograms=("tomoA", "tomoB", "tomoC"), n=2, size=40):
    """Merged label patches (0/1/2) and image patches of a few tomograms, NRRD with geometry."""
    rng = np.random.default_rng(3)
    pairs = {}
    for t in tomograms:
        labels, images = root / t / "merged", root / t / "imagesCorr"
        for i in range(n):
            label = (rng.random((size,) * 3) < 0.2).astype(np.uint8)
            label[:4] = label[-4:] = 2
            image = rng.standard_normal((size,) * 3).astype(np.float32)
            key = f"demo_{t}_patch{i}"
            write_volume(labels / f"{key}.nrrd", label, (8.0, 8.0, 8.0), unit="angstrom", origin=ORIGIN)
            write_volume(images / f"{key}.nrrd", image, (8.0, 8.0, 8.0), unit="angstrom", origin=ORIGIN)
        pairs[t] = (labels, images)
    return pairs


@pytest.mark.parametrize("pixel_size", [None, 10.0])
def test_membrain_seg_s_dataset_class_reads_the_export(tmp_path, pixel_size):
    """export-training's folder is what MemBrain-seg trains from: its own CryoETMemSegDataset (as its data
    module builds it) finds every pair in imagesTr/labelsTr and imagesVal/labelsVal, reads the labels we
    wrote (0/1/2 kept through resampling) and takes an item through its transforms."""
    import json

    from maskworks.cryoet.stages import export_training_files

    pairs = _training_patches(tmp_path / "in")
    out = tmp_path / "training"
    stats = export_training_files(pairs, out, val_fraction=0.34, seed=1, pixel_size=pixel_size)
    assert stats["val"] == 2 and stats["train"] == 4
    seen = tmp_path / "seen"
    proc = subprocess.run([PEERS_PY, HERE / "run_membrain_dataset.py", out, seen], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for split, tomos in (("Tr", stats["training_tomograms"]), ("Val", stats["validation_tomograms"])):
        assert summary[split]["len"] == 2 * len(tomos)
        assert summary[split]["names"] == sorted(f"demo_{t}_patch{i}.nii.gz" for t in tomos for i in range(2))
        assert summary[split]["tokens"] == ["demo"] and summary[split]["item_image"] == [1, 160, 160, 160]
        for name in summary[split]["names"]:
            ours = read_volume(out / f"labels{split}" / name).numpy()
            theirs = np.load(seen / split / f"{name}.label.npy")
            np.testing.assert_array_equal(theirs, ours.transpose(1, 2, 0))  # MemBrain-seg's axis order
            image = read_volume(out / f"images{split}" / name.replace(".nii.gz", "_0000.nii.gz")).numpy()
            np.testing.assert_allclose(np.load(seen / split / f"{name}.image.npy"), image.transpose(1, 2, 0),
                                       rtol=1e-6)
            assert set(np.unique(ours)) <= {0, 1, 2}
            assert ours.shape == ((32,) * 3 if pixel_size else (40,) * 3)
