"""Run SABER 1.0.1's CPU refinement on an .npz of inputs (in .venv-peers); save its 3-D outputs.

Called by test_saber.py with the peers venv's Python: ``run_saber.py IN OUT JSON_CONFIG``.
SABER writes organelle id + 1; the ids are shifted back so the outputs compare with ours.
"""

import json
import sys

import numpy as np
from saber.analysis.refine_membranes import FilteringConfig, OrganelleMembraneFilter

src, dst, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
d = np.load(src)
refiner = OrganelleMembraneFilter(FilteringConfig(**cfg), gpu_id=None)
res = refiner.run(d["organelles"], d["membranes"])
out = {k: refiner.convert_to_3d_labels(res[k]).astype(np.int64) for k in ("organelles", "membranes")}
np.savez(dst, **{k: np.where(v > 0, v - 1, 0) for k, v in out.items()})
