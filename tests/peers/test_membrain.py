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
