"""Read a maskworks export-training folder with MemBrain-seg 0.0.10's own dataset class (in .venv-peers).

``run_membrain_dataset.py DATA_DIR OUT_DIR``: for imagesTr/labelsTr and imagesVal/labelsVal, builds
``CryoETMemSegDataset`` (as MemBrain-seg's data module does), saves every label and image it loaded
(``OUT_DIR/<split>/<label file name>.label.npy`` / ``.image.npy``, in its own axis order), takes one
item through its validation transforms, and prints a JSON summary.
"""

import json
import os
import sys

import numpy as np
from membrain_seg.segmentation.dataloading.memseg_dataset import CryoETMemSegDataset

data, out = sys.argv[1], sys.argv[2]
summary = {}
for split in ("Tr", "Val"):
    ds = CryoETMemSegDataset(os.path.join(data, f"images{split}"), os.path.join(data, f"labels{split}"),
                             train=False, patch_size=160)
    os.makedirs(os.path.join(out, split), exist_ok=True)
    names = []
    for (_, label_path), image, label in zip(ds.data_paths, ds.imgs, ds.labels):
        name = os.path.basename(label_path)
        names.append(name)
        np.save(os.path.join(out, split, name + ".label.npy"), label)
        np.save(os.path.join(out, split, name + ".image.npy"), image)
    item = ds[0] if len(ds) else None
    summary[split] = {"len": len(ds), "names": sorted(names), "tokens": sorted(set(ds.dataset_labels)),
                      "item_image": list(item["image"].shape) if item else None}
print(json.dumps(summary))
