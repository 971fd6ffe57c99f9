"""Run MemBrain-seg 0.0.10's correction merge on one label patch (in .venv-peers).

``run_membrain.py FOLDER LABEL OUT.npy``: ``get_corrections_from_folder`` reads the label and
the Add/Remove/Ignore masks with SimpleITK and applies its 16-voxel ignore border.
"""

import sys

import numpy as np
from membrain_seg.annotations.merge_corrections import get_corrections_from_folder

np.save(sys.argv[3], np.asarray(get_corrections_from_folder(sys.argv[1], sys.argv[2])).astype(np.uint8))
