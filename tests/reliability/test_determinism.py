"""The same input gives the same Zarr bytes: reruns are reproducible and checksums mean something."""

from __future__ import annotations

import numpy as np
import pytest
from test_transactions import _digest, _state

from maskworks.io import write_volume


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint32])
def test_write_volume_zarr_bytes_are_the_same_every_time(tmp_path, dtype):
    rng = np.random.default_rng(0)
    a = (rng.random((24, 130, 70)) * 200).astype(dtype)
    digests = set()
    for i in range(3):
        path = write_volume(tmp_path / f"v{i}.zarr", a, (2.0, 1.0, 1.0), unit="nanometer",
                            chunks=(8, 64, 64), provenance={"stage": "test"})
        digests.add(_digest(path))
    assert len(digests) == 1


def test_a_stage_rerun_writes_the_same_zarr_bytes(tmp_path):
    from maskworks.cli import main
    from maskworks.demo import make_em_volume

    image, _ = make_em_volume(shape=(24, 48, 48), seed=2)
    write_volume(tmp_path / "vol.zarr", image, (10, 10, 10), unit="nanometer")
    states = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["texture-mask", str(tmp_path / "vol.zarr"), str(out / "mask.zarr"), "--block-size", "16"]) == 0
        states.append({k: v for k, v in _state(out).items() if k.endswith(".zarr")})
    assert states[0] == states[1] and set(states[0]) == {"mask.zarr", "mask_confidence.zarr"}
