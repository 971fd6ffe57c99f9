"""Differential tests against SABER 1.0.1 (``make test-peers``; not part of ``make test``).

SABER's ``OrganelleMembraneFilter`` runs on its CPU path in .venv-peers (``make setup-peers``:
saber-em installed with --no-deps plus the torch, scipy and tqdm it imports); maskworks'
``refine_membranes`` runs here on the same generated inputs, SABER-style scenes with
instance labels, shells with gaps, fragments, edge junk, internal membranes, an organelle
without membrane, shared membrane voxels and organelles cut by the volume border.  Only the
id convention differs (SABER writes id + 1), and it is undone before comparing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskworks.cryoet.refine import refine_membranes

HERE = Path(__file__).parent
PEERS_PY = HERE.parents[1] / ".venv-peers" / "bin" / "python"
sys.path.insert(0, str(HERE))
from scenes import saber_scene  # noqa: E402

pytestmark = pytest.mark.skipif(not PEERS_PY.exists(), reason="no .venv-peers: run `make test-peers`")

CASES = [  # seed, SABER FilteringConfig / our keywords
    (0, {}),
    (1, {"min_membrane_area": 500}),
    (2, {"min_membrane_area": 500, "ball_size": 5}),
    (3, {"min_membrane_area": 2000, "ball_size": 4, "edge_trim_z": 3, "edge_trim_xy": 5}),
    (4, {"min_membrane_area": 800, "min_roi_relative_size": 0.1}),
]


@pytest.mark.parametrize("surface", [False, True], ids=["all-membranes", "surface-membranes"])
@pytest.mark.parametrize("seed, cfg", CASES, ids=[f"scene{c[0]}" for c in CASES])
def test_default_output_equals_saber_mask_by_mask(tmp_path, seed, cfg, surface):
    data = saber_scene(seed)
    np.savez(tmp_path / "in.npz", **data)
    cfg = {**cfg, "keep_surface_membranes": surface}
    subprocess.run([PEERS_PY, HERE / "run_saber.py", tmp_path / "in.npz", tmp_path / "saber.npz", json.dumps(cfg)],
                   check=True, capture_output=True, timeout=900)
    saber = np.load(tmp_path / "saber.npz")
    org, mem, st = refine_membranes(data["organelles"], data["membranes"], device="cpu", progress=False, **cfg)
    differ = {"organelles": int(np.count_nonzero(org.astype(np.int64) != saber["organelles"])),
              "membranes": int(np.count_nonzero(mem.astype(np.int64) != saber["membranes"]))}
    print(f"scene {seed} {cfg}: differing voxels {differ} of {org.size} each; kept "
          f"{st['organelles_kept']}/{st['organelles_in']}, membrane voxels {int(np.count_nonzero(mem))}")
    assert sum(differ.values()) < 0.001 * 2 * org.size
    assert set(np.unique(org)) == set(np.unique(saber["organelles"]))  # the same organelles kept
    for oid in np.unique(org)[1:]:  # mask by mask
        assert np.count_nonzero((org == oid) != (saber["organelles"] == oid)) == 0, oid
        assert np.count_nonzero((mem == oid) != (saber["membranes"] == oid)) == 0, oid
