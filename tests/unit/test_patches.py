"""iter_patches / plan_patches / label_border on tiny volumes with hand-checkable answers."""

from __future__ import annotations

import numpy as np
import pytest

import maskworks.cryoet.patches as patches_mod
from maskworks.cryoet.patches import class_counts, iter_patches, label_border, plan_patches
from maskworks.io import InputError

SHAPE = (10, 12, 14)  # z, y, x: all different so that an axis mix-up shows


def _volumes():
    tomo = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    seg = np.zeros(SHAPE, np.uint8)
    seg[4:6, 5:7, 6:8] = 1
    return tomo, seg


def test_inside_patch_is_a_plain_crop_in_zyx_order():
    tomo, seg = _volumes()
    # x=7, y=6, z=5; size 4 -> start (z, y, x) = (3, 4, 5)
    (p,) = iter_patches(tomo, seg, [[7, 6, 5]], patch_size=4, border=0)
    assert p.start == (3, 4, 5) and p.padded_voxels == 0 and p.reason is None and p.pad_value is None
    np.testing.assert_array_equal(p.image, tomo[3:7, 4:8, 5:9])
    np.testing.assert_array_equal(p.label, seg[3:7, 4:8, 5:9])
    assert p.image.dtype == np.float32 and p.label.dtype == np.uint8
    assert p.centre == (7.0, 6.0, 5.0) and p.index == 0


@pytest.mark.parametrize("x, start_x", [(7.49, 5), (7.5, 6), (6.5, 5), (7.51, 6)])
def test_float_centres_round_to_nearest_halves_up(x, start_x):
    (p,) = plan_patches(SHAPE, [[x, 6, 5]], patch_size=4)
    assert p.start == (3, 4, start_x)


def test_odd_size_is_centred():
    (p,) = plan_patches(SHAPE, [[7, 6, 5]], patch_size=5)
    assert p.start == (3, 4, 5)  # 5 - 2 .. 5 + 2 on z


def test_border_shell_is_two_on_every_face():
    tomo = np.zeros((8, 8, 8), np.float32)
    seg = np.ones((8, 8, 8), np.uint8)
    (p,) = iter_patches(tomo, seg, [[4, 4, 4]], patch_size=8, border=2)
    inner = np.zeros((8, 8, 8), bool)
    inner[2:6, 2:6, 2:6] = True
    assert (p.label[inner] == 1).all() and (p.label[~inner] == 2).all()
    assert class_counts(p.label) == {"background_voxels": 0, "foreground_voxels": 64, "ignore_voxels": 512 - 64}


def test_label_border_exact_thickness_and_copy():
    lab = np.zeros((6, 7, 9), np.uint8)
    out = label_border(lab, 1)
    assert lab.max() == 0  # input untouched
    assert (out[1:-1, 1:-1, 1:-1] == 0).all() and np.count_nonzero(out == 0) == 4 * 5 * 7
    for axis in range(3):
        assert (np.take(out, [0, -1], axis=axis) == 2).all()
    np.testing.assert_array_equal(label_border(lab, 0), lab)
    with pytest.raises(InputError, match="border=3"):
        label_border(lab, 3)  # nothing left of the 6-voxel axis


def test_pad_fills_mean_and_ignore():
    tomo, seg = _volumes()
    # x=1 with size 4: x from -1 to 2 -> one x-plane of 4 * 4 voxels is outside
    (p,) = iter_patches(tomo, seg, [[1, 6, 5]], patch_size=4, border=0)
    assert p.start == (3, 4, -1) and p.padded_voxels == 16
    mean = float(tomo.mean())
    assert p.pad_value == pytest.approx(mean)
    np.testing.assert_allclose(p.image[:, :, 0], mean)
    np.testing.assert_array_equal(p.image[:, :, 1:], tomo[3:7, 4:8, 0:3])
    assert (p.label[:, :, 0] == 2).all()
    np.testing.assert_array_equal(p.label[:, :, 1:], seg[3:7, 4:8, 0:3])


def test_pad_at_the_far_corner_counts_voxels():
    tomo, seg = _volumes()
    # centre at the last voxel (z 9, y 11, x 13); size 4 -> from c - 2 to c + 1: 3 voxels in per axis
    (p,) = iter_patches(tomo, seg, [[13, 11, 9]], patch_size=4, border=0)
    assert p.start == (7, 9, 11) and p.padded_voxels == 64 - 27
    np.testing.assert_array_equal(p.image[:3, :3, :3], tomo[7:, 9:, 11:])
    assert np.count_nonzero(p.label == 2) == 37


def test_skip_lists_the_reason_and_extracts_the_rest():
    tomo, seg = _volumes()
    out = list(iter_patches(tomo, seg, [[7, 6, 5], [1, 6, 5], [7, 6, 9]], patch_size=4, border=0, edge="skip"))
    assert [p.reason is None for p in out] == [True, False, False]
    assert out[1].image is None and out[1].label is None
    assert "16 padded voxels" in out[1].reason and "x<0" in out[1].reason
    assert "z>9" in out[2].reason


def test_error_policy_names_every_row_that_needs_padding():
    tomo, seg = _volumes()
    with pytest.raises(InputError) as e:
        iter_patches(tomo, seg, [[7, 6, 5], [1, 6, 5], [7, 6, 9]], patch_size=4, edge="error")
    msg = str(e.value)
    assert "2 patch(es)" in msg and "centre 1 (x=1, y=6, z=5)" in msg and "centre 2" in msg
    assert "centre 0" not in msg and "edge='pad'" in msg


@pytest.mark.parametrize("edge", ["pad", "skip", "error"])
def test_centres_outside_are_always_an_error(edge):
    tomo, seg = _volumes()
    with pytest.raises(InputError) as e:
        iter_patches(tomo, seg, [[7, 6, 5], [14, 6, 5], [7, 6, -0.6]], patch_size=4, edge=edge)
    msg = str(e.value)
    assert "2 patch centre(s) lie outside" in msg and "x 0..13, y 0..11, z 0..9" in msg
    assert "centre 1 (x=14, y=6, z=5)" in msg and "centre 2 (x=7, y=6, z=-0.6)" in msg


def test_shapes_must_agree():
    tomo, seg = _volumes()
    with pytest.raises(InputError, match=r"\(10, 12, 14\).*\(10, 12, 13\)"):
        iter_patches(tomo, seg[..., :13], [[7, 6, 5]])


def test_label_values_other_than_0_1_need_binarize():
    tomo, seg = _volumes()
    seg = seg * 255
    seg[5, 6, 7] = 3
    with pytest.raises(InputError) as e:
        list(iter_patches(tomo, seg, [[7, 6, 5]], patch_size=4, border=0))
    assert "3, 255" in str(e.value) and "binarize" in str(e.value) and "centre 0" in str(e.value)
    (p,) = iter_patches(tomo, seg, [[7, 6, 5]], patch_size=4, border=0, binarize=True)
    np.testing.assert_array_equal(p.label, (seg[3:7, 4:8, 5:9] > 0).astype(np.uint8))


def test_boolean_segmentation_is_fine():
    tomo, seg = _volumes()
    (p,) = iter_patches(tomo, seg.astype(bool), [[7, 6, 5]], patch_size=4, border=0)
    np.testing.assert_array_equal(p.label, seg[3:7, 4:8, 5:9])


def test_nan_in_a_patch_is_an_error():
    tomo, seg = _volumes()
    tomo[4, 5, 6] = np.nan
    with pytest.raises(InputError, match="NaN/Inf"):
        list(iter_patches(tomo, seg, [[7, 6, 5]], patch_size=4, border=0))


@pytest.mark.parametrize("kw, match", [
    ({"patch_size": 0}, "patch_size=0"), ({"border": 2, "patch_size": 4}, "border=2"),
    ({"border": -1}, "border=-1"), ({"edge": "wrap"}, "edge='wrap'"),
])
def test_bad_parameters(kw, match):
    tomo, seg = _volumes()
    with pytest.raises(InputError, match=match):
        iter_patches(tomo, seg, [[7, 6, 5]], **{"patch_size": 4, **kw})


class Lazy:
    """An array that records the regions read from it (like a memory map or Zarr array)."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, sl):
        out = self.data[sl]
        self.reads.append(out.size)
        return out


def test_lazy_tomogram_is_read_patch_by_patch_and_scanned_once_for_the_mean(monkeypatch):
    tomo, seg = _volumes()
    lazy = Lazy(tomo)
    list(iter_patches(lazy, seg, [[7, 6, 5], [5, 5, 5]], patch_size=4, border=0))
    assert lazy.reads == [64, 64]  # no padding: no mean, only the two patches
    monkeypatch.setattr(patches_mod, "_SCAN_VOXELS", 3 * 12 * 14)
    lazy = Lazy(tomo)
    out = list(iter_patches(lazy, seg, [[1, 6, 5], [13, 6, 5], [7, 6, 5]], patch_size=4, border=0))
    slabs = [3 * 168] * 3 + [168]  # z slabs of 3 planes: 10 = 3 + 3 + 3 + 1
    assert lazy.reads == [48, *slabs, 48, 64]
    assert out[0].pad_value == out[1].pad_value == pytest.approx(float(tomo.mean()))
