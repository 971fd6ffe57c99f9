"""maskworks.demo: deterministic synthetic demo data."""

from __future__ import annotations

import numpy as np
import pytest

from maskworks.demo import EM_SAMPLES, make_em_volume, write_demo_data
from maskworks.io import InputError, read_volume


def test_make_em_volume_is_deterministic_per_seed():
    a_img, a_truth = make_em_volume((24, 40, 48), seed=5)
    b_img, b_truth = make_em_volume((24, 40, 48), seed=5)
    c_img, _ = make_em_volume((24, 40, 48), seed=6)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_truth, b_truth)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == a_truth.shape == (24, 40, 48)
    assert a_img.dtype == np.uint8 and a_truth.dtype == np.uint8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_em_volume_truth_and_contrast(seed):
    image, truth = make_em_volume((48, 80, 80), seed=seed)
    assert set(np.unique(truth)) == {0, 1}
    assert 0.4 <= truth.mean() <= 0.6
    assert truth[:, 0, :].any()  # the tissue touches the y = 0 face, as in a trimmed block
    tissue, resin = image[truth == 1].astype(float), image[truth == 0].astype(float)
    # similar grey values (a plain threshold cannot do it), far more texture in the tissue
    assert abs(tissue.mean() - resin.mean()) < 0.5 * tissue.std()
    assert tissue.std() > 1.5 * resin.std()
    assert image.min() < 60 and image.max() > 200  # crack and bright sheet in the resin


def test_make_em_volume_rejects_bad_shapes():
    with pytest.raises(InputError, match="shape"):
        make_em_volume((8, 40, 40))


def test_write_demo_data(tmp_path):
    written = write_demo_data(tmp_path, arms=("em",))
    assert set(written) == {"em/sample1", "em/sample1_truth", "em/sample2", "em/sample2_truth",
                            "em/sample3", "em/sample3_truth"}
    assert written["em/sample1"] == tmp_path / "em" / "sample1.zarr"
    assert written["em/sample2_truth"] == tmp_path / "em" / "sample2_truth.mrc"
    first = {}
    for name, spec in EM_SAMPLES.items():
        for key in (f"em/{name}", f"em/{name}_truth"):
            vol = read_volume(written[key], level=spec.get("level", 0))  # the generated volume's level
            assert vol.shape == spec["shape"] and vol.dtype == np.uint8
            assert vol.unit == spec["unit"]
            assert vol.voxel_size == pytest.approx(spec["voxel_size"])
            first[key] = vol.numpy()
    full = read_volume(written["em/sample1"])  # level 0: twice the y and x resolution
    assert full.shape == (96, 320, 320) and full.voxel_size == pytest.approx((40.0, 8.0, 8.0))
    image, truth = make_em_volume(EM_SAMPLES["sample1"]["shape"], seed=EM_SAMPLES["sample1"]["seed"])
    np.testing.assert_array_equal(first["em/sample1"], image)  # level 1 is the generated volume exactly
    np.testing.assert_array_equal(first["em/sample1_truth"], truth)
    assert read_volume(written["em/sample2"]).unit == "angstrom"
    image, truth = make_em_volume(EM_SAMPLES["sample2"]["shape"], seed=EM_SAMPLES["sample2"]["seed"])
    np.testing.assert_array_equal(first["em/sample2"], image)
    np.testing.assert_array_equal(first["em/sample2_truth"], truth)
    assert set(np.unique(first["em/sample1_truth"])) == {0, 1}
    # idempotent: writing again replaces the files with the same content
    again = write_demo_data(tmp_path, arms="em")
    assert again == written
    for key, data in first.items():
        level = EM_SAMPLES[key.split("/")[1].removesuffix("_truth")].get("level", 0)
        np.testing.assert_array_equal(read_volume(again[key], level=level).numpy(), data)


def test_write_demo_data_rejects_unknown_arms(tmp_path):
    with pytest.raises(InputError, match="nope"):
        write_demo_data(tmp_path, arms=("em", "nope"))
    assert not any(tmp_path.iterdir())
