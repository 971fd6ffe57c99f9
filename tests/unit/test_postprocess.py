"""postprocess_mask: known answers on hand-drawn volumes; equal to the ball-element definition."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import ball, disk

from maskworks.em.postprocess import postprocess_mask
from maskworks.io import InputError

OFF = dict(opening_radius=0, keep_largest=False, fill_holes=False, grow_radius=0, closing_radius=0)


def cube(shape=(20, 20, 20), lo=5, hi=15):
    m = np.zeros(shape, np.uint8)
    m[lo:hi, lo:hi, lo:hi] = 1
    return m


def run(mask, **kw):
    return postprocess_mask(mask, **{**OFF, **kw})


def test_opening_removes_speck_and_spur_keeps_cube():
    m = cube()
    m[2, 2, 2] = 1  # isolated speck
    m[10, 10, 15:19] = 1  # 1-voxel-thick spur sticking out of the cube
    out, stats = run(m, opening_radius=1)
    # ball(1) is the 6-neighbour cross: it cannot reach into the cube's 12 edges (8 voxels each
    # plus 8 corners) and it keeps the spur's root voxel, which a cross centred on the face covers
    np.testing.assert_array_equal(out, ndi.binary_opening(m, structure=ball(1)))
    assert out[2, 2, 2] == 0 and not out[10, 10, 16:].any() and out[10, 10, 15] == 1
    assert out[6:14, 6:14, 6:14].all() and out.sum() == 1000 - 104 + 1
    assert out.dtype == np.uint8
    assert stats["voxels_in"] == 1000 + 1 + 4 and stats["voxels_out"] == 1000 - 104 + 1


def test_keep_largest_keeps_the_bigger_cube():
    m = np.zeros((12, 12, 24), np.uint8)
    m[2:8, 2:8, 2:8] = 1  # 216 voxels
    m[2:10, 2:10, 12:20] = 1  # 512 voxels
    out, stats = run(m, keep_largest=True)
    expected = np.zeros_like(m)
    expected[2:10, 2:10, 12:20] = 1
    np.testing.assert_array_equal(out, expected)
    assert stats["components_in"] == 2 and stats["components_removed"] == 1
    assert stats["components_out"] == 1


def test_keep_largest_uses_full_connectivity():
    m = np.zeros((6, 6, 6), np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = m[3, 3, 3] = 1  # touch at corners only: one 26-connected object
    m[5, 5, 0] = 1
    out, stats = run(m, keep_largest=True)
    assert stats["components_in"] == 2
    assert out.sum() == 3 and out[5, 5, 0] == 0


def test_fill_holes_fills_enclosed_cavity_not_one_open_to_a_face():
    m = np.zeros((10, 10, 20), np.uint8)
    m[1:9, 1:9, 1:9] = 1
    m[3:6, 3:6, 3:6] = 0  # enclosed cavity: 27 voxels
    m[:, :, 11:20] = 1
    m[4:6, 4:6, 14:20] = 0  # notch open to the x = 19 face
    out, stats = run(m, fill_holes=True)
    assert out[3:6, 3:6, 3:6].all()
    assert not out[4:6, 4:6, 14:20].any()
    assert stats["holes_filled"] == 27
    np.testing.assert_array_equal(out, ndi.binary_fill_holes(m))


def test_fill_holes_matches_scipy_on_random_masks():
    rng = np.random.default_rng(1)
    for shape in [(9, 11, 13), (17, 19)]:
        m = rng.random(shape) < 0.6
        out, _ = run(m, fill_holes=True)
        np.testing.assert_array_equal(out.astype(bool), ndi.binary_fill_holes(m))


@pytest.mark.parametrize("r", [2, -2])
def test_grow_and_shrink_a_cube_by_a_ball(r):
    m = cube((24, 24, 24), 7, 17)
    out, _ = run(m, grow_radius=r)
    if r > 0:
        expected = ndi.binary_dilation(m, structure=ball(r))
        assert out.sum() > m.sum()
    else:
        expected = ndi.binary_erosion(m, structure=ball(-r))
        np.testing.assert_array_equal(out, cube((24, 24, 24), 9, 15))
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


@pytest.mark.parametrize("r", [1, 2, 3])
def test_ball_operations_equal_the_structuring_element_definition(r):
    """Distance-transform erosion/dilation == scipy with ball(r), outside counted as foreground."""
    rng = np.random.default_rng(r)
    m = ndi.binary_dilation(rng.random((14, 15, 16)) < 0.03, structure=ball(1))
    b = ball(r)
    dil = ndi.binary_dilation(m, structure=b)
    ero = ndi.binary_erosion(m, structure=b, border_value=1)
    np.testing.assert_array_equal(run(m, grow_radius=r)[0], dil)
    np.testing.assert_array_equal(run(m, grow_radius=-r)[0], ero)
    opened = ndi.binary_dilation(ndi.binary_erosion(m, structure=b, border_value=1), structure=b)
    np.testing.assert_array_equal(run(m, opening_radius=r)[0], opened)
    closed = ndi.binary_erosion(dil, structure=b, border_value=1)
    np.testing.assert_array_equal(run(m, closing_radius=r)[0], closed)


def test_two_d_images_use_a_disk():
    rng = np.random.default_rng(5)
    m = rng.random((30, 31)) < 0.2
    expected = ndi.binary_dilation(m, structure=disk(3))
    np.testing.assert_array_equal(run(m, grow_radius=3)[0], expected)


def test_closing_bridges_a_one_voxel_gap():
    m = np.zeros((12, 12, 24), np.uint8)
    m[2:10, 2:10, 2:11] = 1
    m[2:10, 2:10, 12:21] = 1  # x = 11 is a 1-voxel gap
    assert run(m, keep_largest=True)[1]["components_removed"] == 1
    out, stats = run(m, closing_radius=1, keep_largest=True)
    assert out[3:9, 3:9, 11].all()
    assert stats["components_removed"] == 0 and stats["components_out"] == 1
    assert np.all(out >= m)


def test_closing_does_not_erode_at_the_volume_faces():
    m = np.zeros((10, 10, 10), np.uint8)
    m[:, :, :5] = 1  # touches five faces
    m[0, 0, 7] = 1  # single voxel in a corner
    out, _ = run(m, closing_radius=2)
    assert np.all(out >= m)
    assert ndi.binary_closing(m, structure=ball(2)).sum() < m.sum()  # what naive closing would do


def test_opening_keeps_an_object_that_fills_the_volume():
    m = np.ones((6, 7, 8), np.uint8)
    out, _ = postprocess_mask(m, opening_radius=2, grow_radius=-1)
    np.testing.assert_array_equal(out, m)


def test_empty_stays_empty():
    m = np.zeros((8, 8, 8), bool)
    out, stats = postprocess_mask(m, opening_radius=1, closing_radius=1, grow_radius=2)
    assert out.dtype == np.uint8 and not out.any()
    assert stats["voxels_out"] == 0 and stats["components_in"] == 0 and stats["holes_filled"] == 0


def test_keep_largest_and_fill_are_idempotent():
    rng = np.random.default_rng(3)
    m = ndi.binary_opening(rng.random((20, 20, 20)) < 0.55)
    kw = dict(opening_radius=0, keep_largest=True, fill_holes=True)
    once, _ = postprocess_mask(m, **kw)
    twice, stats = postprocess_mask(once, **kw)
    np.testing.assert_array_equal(once, twice)
    assert stats["components_removed"] == 0 and stats["holes_filled"] == 0


def test_zero_255_input_gives_uint8_zero_one_and_stats():
    m = cube() * 255
    out, stats = postprocess_mask(m, opening_radius=0)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    np.testing.assert_array_equal(out, cube())
    assert stats["fraction_in"] == pytest.approx(1000 / 8000) == stats["fraction_out"]
    for key in ("opening_radius", "keep_largest", "fill_holes", "grow_radius", "closing_radius"):
        assert key in stats


@pytest.mark.parametrize(
    "mask, kw, words",
    [
        (np.zeros(5, np.uint8), {}, ["1-D"]),
        (np.zeros((2, 2, 2, 2), np.uint8), {}, ["4-D"]),
        (np.zeros((4, 4, 4), np.float32), {}, ["float32"]),
        (np.zeros((4, 4, 4), np.uint8), {"opening_radius": -1}, ["opening_radius", "-1"]),
        (np.zeros((4, 4, 4), np.uint8), {"closing_radius": -2}, ["closing_radius", "-2"]),
        (np.zeros((4, 4, 4), np.uint8), {"grow_radius": (1, -1, 1)}, ["grow_radius", "one sign"]),
        (np.zeros((4, 4), np.uint8), {"opening_radius": (1, 2, 2)}, ["opening_radius", "2-D"]),
    ],
)
def test_bad_input_raises_input_error(mask, kw, words):
    with pytest.raises(InputError) as err:
        postprocess_mask(mask, **kw)
    for w in words:
        assert w in str(err.value)


def test_mask_overlap_known_answer_and_ignore():
    from maskworks.em.postprocess import mask_overlap

    truth = np.array([[0, 1, 1, 2]], np.uint8)
    mask = np.array([[1, 1, 0, 1]], np.uint8)
    s = mask_overlap(mask, truth)  # ignore not given: label 2 counts as foreground
    assert (s["true_positive"], s["false_positive"], s["false_negative"]) == (2, 1, 1)
    assert s["dice"] == pytest.approx(4 / 6) and s["jaccard"] == pytest.approx(2 / 4)
    s = mask_overlap(mask, truth, ignore_label=2)
    assert (s["true_positive"], s["false_positive"], s["false_negative"]) == (1, 1, 1)
    assert s["dice"] == pytest.approx(0.5) and s["voxels"] == 3
    assert mask_overlap(np.zeros((2, 2)), np.zeros((2, 2)))["dice"] == 1.0
    with pytest.raises(InputError):
        mask_overlap(np.zeros((2, 2)), np.zeros((3, 2)))


def test_per_slice_hole_fill_closes_a_tube_open_at_the_faces():
    """A tube along z: its lumen touches the top and bottom faces, so the 3-D fill leaves it; the
    per-slice fill across z closes it in every section (Catena's filled outline), and across x
    (where the wall is two stripes) fills nothing."""
    z, y, x = np.ogrid[:12, :32, :32]
    r = np.sqrt((y - 16.0) ** 2 + (x - 16.0) ** 2)
    tube = np.broadcast_to((r >= 6) & (r <= 9), (12, 32, 32)).astype(np.uint8)
    lumen = np.broadcast_to(r < 6, (12, 32, 32))
    kw = {"opening_radius": 0, "keep_largest": False}
    plain, st = postprocess_mask(tube, **kw)
    assert not plain[lumen].any() and st["holes_filled"] == 0 and st["holes_filled_2d"] == 0
    filled, st = postprocess_mask(tube, fill_holes_2d="z", **kw)
    assert filled[lumen].all() and st["holes_filled_2d"] == int(lumen.sum())
    np.testing.assert_array_equal(filled, (tube | lumen).astype(np.uint8))
    across_x, st = postprocess_mask(tube, fill_holes_2d="x", **kw)
    np.testing.assert_array_equal(across_x, tube)
    with pytest.raises(InputError, match="fill_holes_2d='w'"):
        postprocess_mask(tube, fill_holes_2d="w")


@pytest.mark.parametrize("params", [
    dict(opening_radius=1, keep_largest=True, fill_holes=True, grow_radius=2, closing_radius=1),
    dict(opening_radius=2, keep_largest=False, fill_holes=True, grow_radius=-1, fill_holes_2d="z"),
    dict(opening_radius=0, keep_largest=True, fill_holes=False, grow_radius=0, fill_holes_2d="y"),
])
def test_threads_and_memory_bound_give_the_whole_volume_result(params):
    """Slabs over two threads, and out of core (Zarr in, Zarr out, a budget that makes ~20 slabs
    of a few planes), give the one-slab result voxel for voxel and the same stats."""
    import zarr

    rng = np.random.default_rng(4)
    m = (ndi.gaussian_filter(rng.random((40, 200, 200)), 2.0) > 0.5).astype(np.uint8)
    ref, st_ref = postprocess_mask(m, threads=1, **params)
    two, st_two = postprocess_mask(m, threads=2, **params)
    np.testing.assert_array_equal(two, ref)
    src = zarr.array(m, chunks=(8, 100, 100))
    out = zarr.zeros(m.shape, chunks=(8, 100, 100), dtype="u1")
    res, st_oc = postprocess_mask(src, threads=2, memory_mb=24, out=out, **params)
    assert res is out
    np.testing.assert_array_equal(out[...], ref)
    skip = {"threads", "memory_mb"}
    assert {k: v for k, v in st_two.items() if k not in skip} == {k: v for k, v in st_ref.items() if k not in skip}
    assert {k: v for k, v in st_oc.items() if k not in skip} == {k: v for k, v in st_ref.items() if k not in skip}
    assert st_ref["components_in"] > 1 and st_oc["memory_mb"] == 24


def test_a_budget_too_small_for_one_slab_is_an_error():
    import zarr

    src = zarr.zeros((8, 2000, 2000), chunks=(8, 500, 500), dtype="u1")
    with pytest.raises(InputError, match="memory_mb=16 cannot hold one slab of 2000x2000 planes"):
        postprocess_mask(src, memory_mb=16, opening_radius=3)


GPU = __import__("maskworks.backend", fromlist=["resolve_device"]).resolve_device("auto") != "cpu"
PIPELINES = [
    dict(opening_radius=1, keep_largest=True, fill_holes=True, grow_radius=2, closing_radius=1),
    dict(opening_radius=2, keep_largest=False, fill_holes=True, grow_radius=-1, fill_holes_2d="z"),
    dict(opening_radius=0, keep_largest=True, fill_holes=False, grow_radius=0, fill_holes_2d="x"),
]


def speckled(seed=4, shape=(40, 120, 120)):
    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.random(shape), 2.0) > 0.5).astype(np.uint8)


@pytest.mark.parametrize("params", PIPELINES)
def test_the_whole_volume_pipeline_of_a_gpu_gives_the_slab_result(params):
    """On a GPU the mask is processed in one piece (distance transforms and labels of the whole
    volume, not slabs joined by union-find): that pipeline, run here with NumPy and scipy as
    its array modules, gives the slab-wise voxels and stats."""
    from maskworks.em.postprocess import _HOST, _whole

    m = speckled()
    ref, st = postprocess_mask(m, threads=2, device="cpu", **params)
    full = {**OFF, "fill_holes_2d": None, **params}
    whole, st_whole = _whole(_HOST, m, full)
    np.testing.assert_array_equal(whole, ref)
    assert st_whole == {k: st[k] for k in st_whole} and st["device"] == "cpu"


def test_the_whole_volume_pipeline_breaks_ties_by_position():
    """Two largest components of equal size: the one met first in C order is kept, whatever
    the numbering of the labelling (a GPU's need not follow C order)."""
    from maskworks.em.postprocess import _HOST, _first_largest

    m = np.zeros((6, 10, 10), np.uint8)
    m[1:3, 6:9, 6:9] = 1  # 18 voxels, met second in C order (z = 1, y = 6)
    m[1:3, 1:4, 1:4] = 1  # 18 voxels, met first (z = 1, y = 1)
    m[4, 0, 0] = 1
    labels, _ = ndi.label(m)
    swapped = np.choose(labels, [0, 3, 2, 1]).astype(np.int32)  # a numbering not in C order
    assert _first_largest(_HOST, labels) == labels[1, 1, 1]
    assert _first_largest(_HOST, swapped) == swapped[1, 1, 1]
    out, _ = postprocess_mask(m, **{**OFF, "keep_largest": True})
    assert out[1, 1, 1] == 1 and out[1, 7, 7] == 0


@pytest.mark.skipif(not GPU, reason="needs cupy and a CUDA device")
@pytest.mark.parametrize("params", PIPELINES)
def test_cpu_and_gpu_give_the_same_mask(params):
    import zarr

    m = speckled()
    ref, st = postprocess_mask(m, device="cpu", **params)
    gpu, st_gpu = postprocess_mask(m, device="cuda", **params)
    np.testing.assert_array_equal(gpu, ref)
    assert st_gpu["device"] == "cuda:0" and st_gpu["voxels_out"] == st["voxels_out"]
    out = zarr.zeros(m.shape, chunks=(8, 60, 60), dtype="u1")
    postprocess_mask(zarr.array(m, chunks=(8, 60, 60)), device="cuda", memory_mb=24, out=out, **params)
    np.testing.assert_array_equal(out[...], ref)
    plane, _ = postprocess_mask(m[20], device="cuda", **params)
    np.testing.assert_array_equal(plane, postprocess_mask(m[20], device="cpu", **params)[0])


@pytest.mark.skipif(GPU, reason="a GPU is there")
def test_a_gpu_asked_for_without_one_is_a_clear_error():
    with pytest.raises(InputError, match="device='cuda:1' asks for a GPU but"):
        postprocess_mask(cube(), device="cuda:1")
    assert postprocess_mask(cube(), device="auto")[1]["device"] == "cpu"
    assert postprocess_mask(cube()[10], device="cpu")[1]["device"] == "cpu"


@pytest.mark.parametrize("r", [1, 3, 9])
def test_distance_transform_on_tiles_is_exact(r):
    """On a GPU the ball tests run on tiles (cupyx's transform pads to a cube of the longest
    side): tiles smaller than the ball's reach included, the answer is the whole array's."""
    from maskworks.em.postprocess import _HOST, _within

    rng = np.random.default_rng(r)
    x = rng.random((23, 41, 37)) > 0.02  # sparse zeros: distances up to several voxels
    x[:, :20, :] = True  # a large region without zeros, larger than some tiles
    whole = ndi.distance_transform_edt(x) <= r
    for tile in (5, 8, 16):
        np.testing.assert_array_equal(_within(_HOST, x, r, tile=tile), whole)
    assert not _within(_HOST, np.ones((9, 9, 9), bool), r, tile=4).any()


def ellipsoid(radii):
    """The structuring element of per-axis radii by its definition: offsets d with
    sum((d_i / r_i)^2) <= 1 (a radius of 0: no reach along that axis)."""
    reach = [int(np.floor(abs(v))) for v in radii]
    grid = np.ogrid[tuple(slice(-n, n + 1) for n in reach)]
    total = sum(np.where(g == 0, 0.0, np.inf) if v == 0 else (g / float(v)) ** 2 for g, v in zip(grid, radii))
    return total <= 1.0 + 1e-9


@pytest.mark.parametrize("radii", [(1, 3, 3), (0, 2, 2), (0.5, 2.5, 1.5), (2, 1, 3)])
def test_per_axis_radii_are_the_ellipsoid_of_those_radii(radii):
    """Three radii (the same physical radius on anisotropic voxels) erode, dilate, open and close
    with the ellipsoid of those semi-axes, as the structuring-element definition says."""
    rng = np.random.default_rng(7)
    m = ndi.binary_dilation(rng.random((16, 17, 18)) < 0.03, structure=ball(1))
    e = ellipsoid(radii)
    dil = ndi.binary_dilation(m, structure=e)
    ero = ndi.binary_erosion(m, structure=e, border_value=1)
    np.testing.assert_array_equal(run(m, grow_radius=radii)[0], dil)
    np.testing.assert_array_equal(run(m, grow_radius=tuple(-v for v in radii))[0], ero)
    np.testing.assert_array_equal(run(m, opening_radius=radii)[0], ndi.binary_dilation(ero, structure=e))
    np.testing.assert_array_equal(run(m, closing_radius=radii)[0],
                                  ndi.binary_erosion(dil, structure=e, border_value=1))


def test_per_axis_radii_follow_the_axes():
    """Transposing the mask and its radii together transposes the result (the z radius acts along z
    and nowhere else), slab by slab and out of core alike."""
    import zarr

    rng = np.random.default_rng(8)
    m = (ndi.gaussian_filter(rng.random((30, 40, 50)), 1.5) > 0.52).astype(np.uint8)
    params = dict(opening_radius=(0.5, 1.5, 2), closing_radius=(1, 2, 3), grow_radius=(-1, -2, -1),
                  keep_largest=False, fill_holes=True)
    ref, _ = postprocess_mask(m, **params)
    order = (2, 0, 1)
    turned = {k: tuple(v[i] for i in order) if isinstance(v, tuple) else v for k, v in params.items()}
    out, _ = postprocess_mask(np.ascontiguousarray(m.transpose(order)), **turned)
    np.testing.assert_array_equal(out, ref.transpose(order))
    store = zarr.zeros(m.shape, chunks=(6, 40, 50), dtype="u1")
    postprocess_mask(zarr.array(m, chunks=(6, 40, 50)), memory_mb=16, out=store, threads=2, **params)
    np.testing.assert_array_equal(store[...], ref)


def test_one_radius_is_the_ball_and_three_equal_radii_the_same():
    m = cube((20, 20, 20), 6, 14)
    np.testing.assert_array_equal(run(m, grow_radius=(2, 2, 2))[0], run(m, grow_radius=2)[0])
    np.testing.assert_array_equal(run(m, grow_radius=2)[0], ndi.binary_dilation(m, structure=ball(2)))
