"""refine_membranes on volumes small enough to draw by hand: each rule of the algorithm, dtypes, overlaps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from maskworks.backend import resolve_device
from maskworks.cryoet.refine import label_dtype, refine_membranes
from maskworks.io import InputError

SHAPE = (40, 80, 80)
GPU = resolve_device("auto") != "cpu"  # cupy imports and a device is visible
QUIET = {"progress": False, "device": "cpu"}


def ball(shape, centre, radius):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


def shell(mask, thickness=2):
    """Voxels outside ``mask`` within ``thickness`` of it: a membrane wrapped around an organelle."""
    return (ndi.distance_transform_edt(~mask) <= thickness) & ~mask


def scene(*spheres, shape=SHAPE):
    """Organelle ids and shell membranes for ``(id, centre, radius)`` spheres."""
    org = np.zeros(shape, np.int32)
    mem = np.zeros(shape, np.uint8)
    for oid, centre, radius in spheres:
        b = ball(shape, centre, radius)
        org[b] = oid
        mem[shell(b)] = 1
    mem[org > 0] = 0
    return org, mem


def by_id(stats):
    return {r["id"]: r for r in stats["organelles"]}


def test_organelle_with_shell_membrane_is_kept_with_its_membrane():
    org, mem = scene((7, (20, 40, 40), 10))
    o, m, st = refine_membranes(org, mem, min_membrane_area=500, membrane_output="input", **QUIET)
    np.testing.assert_array_equal(o, org)  # the whole sphere, with its id
    assert o.dtype == np.uint8 and m.dtype == np.uint8
    assert set(np.unique(m)) == {0, 7}
    assert np.all(mem[m > 0] == 1)  # membrane_output="input": input membrane only, never grown
    # the opening (background outside the crop) trims the shell only where it meets the crop edge
    assert np.count_nonzero(m) > 0.9 * np.count_nonzero(mem)
    assert st["organelles_in"] == st["organelles_kept"] == 1 and st["organelles_dropped"] == 0
    assert st["membrane_voxels_in"] == np.count_nonzero(mem) and st["membrane_voxels_out"] == np.count_nonzero(m)
    rec = by_id(st)[7]
    assert rec["kept"] and rec["voxels_in"] == rec["voxels_out"] == np.count_nonzero(org) and not rec["elongated"]


def test_small_organelle_is_dropped_by_min_roi_relative_size():
    org, mem = scene((1, (20, 30, 30), 10), (2, (20, 62, 62), 4))
    o, m, st = refine_membranes(org, mem, min_membrane_area=100, **QUIET)
    rec = by_id(st)[2]
    # extent 9 voxels along y and x, below 0.15 x 80 = 12; along z 9 >= 0.15 x 40 = 6
    assert not rec["kept"] and rec["reason"].startswith("too small") and "y 9" in rec["reason"]
    assert "z 9" not in rec["reason"]
    assert not np.any(o == 2) and not np.any(m == 2) and by_id(st)[1]["kept"]
    _, _, st0 = refine_membranes(org, mem, min_membrane_area=100, min_roi_relative_size=0.1, **QUIET)
    assert not by_id(st0)[2]["reason"].startswith("too small")


def test_internal_fragment_is_removed_by_keep_surface_membranes():
    org, mem = scene((1, (20, 40, 40), 10))
    mem[19:22, 38:43, 38:43] = 1  # 75 voxels inside the organelle, 5 voxels from its surface
    fragment = np.zeros(SHAPE, bool)
    fragment[19:22, 38:43, 38:43] = True
    kw = {"min_membrane_area": 50, "membrane_output": "input", **QUIET}  # compare input voxels
    _, m, _ = refine_membranes(org, mem, **kw)
    assert np.count_nonzero(m[fragment]) == 75
    _, m_surface, _ = refine_membranes(org, mem, keep_surface_membranes=True, **kw)
    assert np.count_nonzero(m_surface[fragment]) == 0
    np.testing.assert_array_equal(m_surface, np.where(fragment, 0, m))  # the shell itself is untouched


@pytest.mark.parametrize("oid, dtype", [(300, np.uint16), (70000, np.uint32)])
def test_labels_above_255_survive(oid, dtype):
    org, mem = scene((oid, (20, 40, 40), 10))
    o, m, st = refine_membranes(org.astype(np.int64), mem, min_membrane_area=500, **QUIET)
    assert o.dtype == dtype and m.dtype == dtype and st["dtype"] == np.dtype(dtype).name
    assert set(np.unique(o)) == {0, oid} and set(np.unique(m)) == {0, oid}


def test_label_dtype_is_the_smallest_unsigned():
    assert [label_dtype(v) for v in (0, 255, 256, 65535, 65536, 2**32)] == \
        [np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint64]


def test_edge_trim_zero_keeps_the_membrane_at_the_edge():
    org, mem = scene((1, (20, 40, 4), 10))  # touches the x = 0 face; its membrane runs along it
    assert np.count_nonzero(mem[:, :, :3]) > 0
    kw = {"min_membrane_area": 100, "membrane_output": "input", **QUIET}  # where input membrane survives
    _, m3, _ = refine_membranes(org, mem, edge_trim_xy=3, **kw)
    _, m0, st = refine_membranes(org, mem, edge_trim_xy=0, edge_trim_z=0, **kw)
    assert np.count_nonzero(m3[:, :, :3]) == 0
    assert np.count_nonzero(m0[:, :, :3]) > 0 and st["membrane_voxels_cleaned"] == np.count_nonzero(mem)
    # edge_trim_z: membrane in the first/last slices goes, and organelle voxels in them with it
    org_z, mem_z = scene((1, (8, 40, 40), 10))
    o, m, st = refine_membranes(org_z, mem_z, edge_trim_z=5, edge_trim_xy=0, **kw)
    assert st["z_slices_without_membrane"] == 5 + 19  # z 0..4 trimmed, z 21..39 never had any
    assert np.count_nonzero(o[:5]) == 0 and np.count_nonzero(m[:5]) == 0 and np.count_nonzero(o[5:]) > 0


def test_nothing_kept_gives_empty_volumes_and_a_note():
    org, mem = scene((1, (20, 40, 40), 10))
    o, m, st = refine_membranes(org, np.zeros_like(mem), **QUIET)
    assert o.shape == m.shape == SHAPE and not o.any() and not m.any()
    assert st["organelles_kept"] == 0 and "no organelle kept" in st["note"]
    assert by_id(st)[1]["reason"] == "no membrane in any of its z-slices"
    o, m, st = refine_membranes(np.zeros(SHAPE, np.uint16), mem, **QUIET)
    assert not o.any() and not m.any() and st["organelles_in"] == 0 and "no labels" in st["note"]


def test_organelle_without_membrane_nearby_is_dropped():
    org, mem = scene((1, (20, 25, 25), 8), (2, (20, 58, 58), 8))
    mem[ball(SHAPE, (20, 58, 58), 11) & ~ball(SHAPE, (20, 58, 58), 8)] = 0  # organelle 2 loses its shell
    o, m, st = refine_membranes(org, mem, min_membrane_area=100, **QUIET)
    assert by_id(st)[1]["kept"] and by_id(st)[2]["reason"] == "no membrane nearby"
    assert set(np.unique(o)) == {0, 1}


def test_overlapping_membranes_go_to_the_higher_id():
    # Two box organelles with a one-voxel membrane sheet between them (x 10..35, sheet x = 36,
    # x 37..62): the sheet lies in both padded boxes and within the dilation of both, so both
    # claim it; as in SABER's 3-D conversion, the higher id (written later) wins.
    org = np.zeros(SHAPE, np.int32)
    org[10:30, 20:60, 10:36] = 9
    org[10:30, 20:60, 37:63] = 4
    mem = (shell(org == 9) | shell(org == 4)).astype(np.uint8)
    mem[org > 0] = 0
    shared = np.zeros(SHAPE, bool)
    shared[12:28, 22:58, 36] = True  # the sheet away from the boxes' rounded edges
    o, m, st = refine_membranes(org, mem, min_membrane_area=100, **QUIET)
    assert st["organelles_kept"] == 2
    assert np.all(m[shared] == 9) and np.any(m == 4)
    # swapping the ids gives each organelle the same voxels; the shared membrane follows the higher id
    swapped = np.select([org == 9, org == 4], [4, 9], 0)
    o2, m2, _ = refine_membranes(swapped, mem, min_membrane_area=100, **QUIET)
    np.testing.assert_array_equal(o2 > 0, o > 0)
    np.testing.assert_array_equal(m2 > 0, m > 0)
    assert np.all(m2[shared] == 9) and np.array_equal(o2 == 4, o == 9)


def test_membrane_output_dilated_is_the_band_and_input_its_membrane_voxels():
    org, mem = scene((3, (20, 40, 40), 10))
    o_d, m_d, st_d = refine_membranes(org, mem, min_membrane_area=500, **QUIET)  # default: dilated
    o_i, m_i, st_i = refine_membranes(org, mem, min_membrane_area=500, membrane_output="input", **QUIET)
    np.testing.assert_array_equal(o_d, o_i)  # the organelles do not depend on it
    assert st_d["membrane_output"] == "dilated" and st_i["membrane_output"] == "input"
    assert np.all(mem[m_i > 0] == 1) and np.all(m_d[m_i > 0] == 3)  # input ⊆ dilated, input ⊆ membrane
    grown = (m_d > 0) & (mem == 0)
    assert grown.any()  # dilated: the band reaches beyond the input membrane
    # the band: within the dilation radius (2) of the membrane and of the organelle
    sphere = ball(SHAPE, (20, 40, 40), 10)
    d_org = ndi.distance_transform_edt(~sphere)
    d_mem = ndi.distance_transform_edt(mem == 0)
    assert np.all(d_org[m_d > 0] <= 2) and np.all(d_mem[m_d > 0] <= 2)
    with pytest.raises(InputError, match="membrane_output"):
        refine_membranes(org, mem, membrane_output="grown", **QUIET)


def test_elongation_is_judged_on_the_padded_crop():
    # tight box 8 x 8 x 25 (ratio 3.1 > 3); padded by ball_size // 2 = 1: 10 x 10 x 27 (2.7 < 3)
    org = np.zeros(SHAPE, np.int32)
    org[16:24, 36:44, 27:52] = 2
    mem = shell(org > 0, thickness=2).astype(np.uint8)
    _, _, st = refine_membranes(org, mem, min_membrane_area=100, min_roi_relative_size=0.1, ball_size=3, **QUIET)
    assert by_id(st)[2]["kept"] and not by_id(st)[2]["elongated"]
    # ball_size 1 pads nothing: the crop is the tight box, elongated
    _, _, st = refine_membranes(org, mem, min_membrane_area=100, min_roi_relative_size=0.1, ball_size=1, **QUIET)
    assert by_id(st)[2]["elongated"]


def test_opening_treats_the_outside_of_the_crop_as_background():
    # A box in the corner of the volume (z = 0 and y = 0 faces), its shell only on the inner
    # sides: the crop's edge is the volume's, and the ball erodes from it as from background,
    # so the organelle's voxels along the volume edge where z = 0 meets y = 0 are opened away.
    org = np.zeros(SHAPE, np.int32)
    org[0:14, 0:24, 20:56] = 6
    mem = shell(org > 0, thickness=2).astype(np.uint8)
    o, _, st = refine_membranes(org, mem, min_membrane_area=100, edge_trim_z=0, edge_trim_xy=0,
                                min_roi_relative_size=0.1, ball_size=3, **QUIET)
    assert by_id(st)[6]["kept"]
    assert o[0, 0, 38] == 0 and o[0, 1, 38] == 0 and o[1, 0, 38] == 0  # the corner edge, rounded by the opening
    assert o[7, 12, 38] == 6 and o[0, 12, 38] == 6  # the inside and the middle of the face stay
    # the same box away from the volume edges keeps its corners (the shell wraps it)
    org2 = np.zeros(SHAPE, np.int32)
    org2[10:24, 20:44, 20:56] = 6
    mem2 = shell(org2 > 0, thickness=2).astype(np.uint8)
    o2, _, _ = refine_membranes(org2, mem2, min_membrane_area=100, min_roi_relative_size=0.1, ball_size=3, **QUIET)
    assert o2[10, 20, 38] == 6


def test_surface_is_the_26_neighbour_erosion_with_a_background_border():
    from maskworks.backend import get_backend
    from maskworks.cryoet.refine import _surface

    b = get_backend("cpu")
    cube = np.zeros((9, 9, 9), bool)
    cube[2:7, 2:7, 2:7] = True
    surf = _surface(b, cube)
    inner = np.zeros_like(cube)
    inner[3:6, 3:6, 3:6] = True
    np.testing.assert_array_equal(surf, cube & ~inner)
    # a notch: the voxel diagonal to it (no face neighbour outside) is on the surface too
    notched = cube.copy()
    notched[3, 3, 3] = False
    surf = _surface(b, notched)
    assert surf[4, 4, 4] and surf[3, 3, 4]
    # an organelle filling the crop: its outer layer is surface (the outside is background)
    full = np.ones((5, 5, 5), bool)
    surf = _surface(b, full)
    assert surf[0, 2, 2] and surf[4, 4, 4] and not surf[2, 2, 2] and surf.sum() == 125 - 27


def test_label_permutation_permutes_the_result():
    org, mem = scene((1, (20, 22, 22), 9), (2, (20, 58, 22), 9), (3, (20, 40, 60), 9))
    o, m, _ = refine_membranes(org, mem, min_membrane_area=100, **QUIET)
    perm = np.array([0, 30, 10, 20])
    op, mp, _ = refine_membranes(perm[org], mem, min_membrane_area=100, **QUIET)
    np.testing.assert_array_equal(op, perm[o])
    np.testing.assert_array_equal(mp, perm[m])


def test_label_components_splits_a_binary_mask():
    org, mem = scene((1, (20, 25, 25), 9), (1, (20, 56, 56), 9))
    binary = org > 0
    o, m, st = refine_membranes(binary, mem, min_membrane_area=100, label_components=True, **QUIET)
    assert set(np.unique(o)) == {0, 1, 2} and st["organelles_kept"] == 2
    assert np.all(o[ball(SHAPE, (20, 25, 25), 9)] == 1)  # numbered in C order of their first voxel
    assert np.all(o[ball(SHAPE, (20, 56, 56), 9)] == 2)
    # without it the mask is one organelle, and only its largest component survives
    o1, _, st1 = refine_membranes(binary, mem, min_membrane_area=100, **QUIET)
    assert st1["organelles_in"] == 1 and np.count_nonzero(o1) == np.count_nonzero(ball(SHAPE, (20, 25, 25), 9))


def test_elongated_organelle_uses_the_thin_dilation():
    org = np.zeros(SHAPE, np.int32)
    grids = np.ogrid[:40, :80, :80]
    inside = ((grids[0] - 20) / 6) ** 2 + ((grids[1] - 40) / 7) ** 2 + ((grids[2] - 40) / 32) ** 2 <= 1
    org[inside] = 5
    mem = shell(inside, thickness=2).astype(np.uint8)
    o, m, st = refine_membranes(org, mem, min_membrane_area=100, **QUIET)
    rec = by_id(st)[5]
    assert rec["kept"] and rec["elongated"]
    # dilation radius 1: only membrane within one voxel of the organelle is near it (the ball(1)
    # opening then trims the staircase corners of that one-voxel layer)
    d = ndi.distance_transform_edt(~inside)
    assert np.all(d[m > 0] <= 1.0) and np.count_nonzero(m) > 0.5 * np.count_nonzero(mem & (d <= 1))


def test_memory_does_not_depend_on_how_many_organelles():
    """Crop-wise work: the largest allocation is a full-volume array, whatever the organelle count."""
    import tracemalloc

    def peak(n):
        centres = [(20, 14 + 26 * (i // 3), 14 + 26 * (i % 3)) for i in range(n)]
        org, mem = scene(*[(i + 1, c, 8) for i, c in enumerate(centres)])
        tracemalloc.start()
        refine_membranes(org, mem, min_membrane_area=100, min_roi_relative_size=0.05, **QUIET)
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    assert peak(9) < 1.3 * peak(1)


@pytest.mark.parametrize("kwargs, match", [
    ({"ball_size": 0}, "ball_size"), ({"edge_trim_z": -1}, "edge_trim_z"),
    ({"min_roi_relative_size": 2}, "min_roi_relative_size"), ({"device": "tpu"}, "device"),
])
def test_bad_parameters_are_refused(kwargs, match):
    org, mem = scene((1, (20, 40, 40), 10))
    with pytest.raises(InputError, match=match):
        refine_membranes(org, mem, **{**QUIET, **kwargs})


def test_bad_inputs_are_refused():
    org, mem = scene((1, (20, 40, 40), 10))
    with pytest.raises(InputError, match="shape"):
        refine_membranes(org, mem[:, :-1], **QUIET)
    with pytest.raises(InputError, match="dtype float"):
        refine_membranes(org.astype(np.float32), mem, **QUIET)
    with pytest.raises(InputError, match="negative"):
        refine_membranes(-org, mem, **QUIET)


@pytest.mark.skipif(not GPU, reason="needs cupy and a CUDA device")
def test_cpu_and_gpu_give_the_same_result():
    from maskworks.demo import make_cryoet_segmentations

    data = make_cryoet_segmentations(seed=2, renumber={2: 300})
    for kwargs in ({}, {"min_membrane_area": 300, "keep_surface_membranes": True}):
        cpu = refine_membranes(data["organelles"], data["membranes"], progress=False, device="cpu", **kwargs)
        gpu = refine_membranes(data["organelles"], data["membranes"], progress=False, device="cuda", **kwargs)
        np.testing.assert_array_equal(cpu[0], gpu[0])
        np.testing.assert_array_equal(cpu[1], gpu[1])
        assert cpu[2]["organelles"] == gpu[2]["organelles"] and gpu[2]["device"].startswith("cuda")


def test_demo_scene_exercises_every_rule():
    from maskworks.demo import make_cryoet_segmentations

    a = make_cryoet_segmentations(seed=1)
    b = make_cryoet_segmentations(seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # deterministic
    _, m, st = refine_membranes(a["organelles"], a["membranes"], **QUIET)
    recs = by_id(st)
    assert [recs[i]["kept"] for i in (1, 2, 3)] == [True, True, True] and recs[3]["elongated"]
    assert recs[4]["reason"].startswith("too small")
    assert recs[5]["reason"] == "no membrane in any of its z-slices"
    assert st["membrane_voxels_cleaned"] < st["membrane_voxels_in"]  # fragments and edge junk removed
    _, m_low, _ = refine_membranes(a["organelles"], a["membranes"], min_membrane_area=300, **QUIET)
    _, m_surf, _ = refine_membranes(a["organelles"], a["membranes"], min_membrane_area=300,
                                    keep_surface_membranes=True, **QUIET)
    inner = ndi.binary_erosion(a["organelles"] == 1, iterations=4)  # the crista lies deep inside organelle 1
    assert np.count_nonzero(m_low[inner]) > 0 and np.count_nonzero(m_surf[inner]) == 0


@pytest.mark.parametrize("r", [1, 2, 3, 2.5])
@pytest.mark.parametrize("budget", [9 * 9**3, 9 * 14**3, 9 * 40**3])
def test_the_tiled_distance_transform_equals_the_whole_one(r, budget):
    """The GPU path splits a crop whose padded cube would exceed the budget into tiles with a halo of
    r + 1: the same voxels as the whole transform, at tiles of every size down to one voxel (run here
    on the CPU with the tiling forced; the smallest budget sends it to the host fallback)."""
    from maskworks.backend import get_backend
    from maskworks.cryoet.refine import distance_within

    b = get_backend("cpu")
    rng = np.random.default_rng(int(r * 10) + budget % 97)
    for shape in [(7, 30, 41), (23, 9, 17)]:
        mask = rng.random(shape) > 0.04  # sparse zeros: distances reach past r
        whole = distance_within(b, mask, r, tiled=False)
        np.testing.assert_array_equal(distance_within(b, mask, r, budget=budget, tiled=True), whole)
        np.testing.assert_array_equal(whole, ndi.distance_transform_edt(mask) <= r)
    ones = np.ones((5, 6, 7), bool)  # no zero: nothing is within r of one
    assert not distance_within(b, ones, r, budget=budget, tiled=True).any()
    assert not distance_within(b, ones, r, tiled=False).any()


@pytest.mark.skipif(resolve_device("auto") == "cpu", reason="no GPU")
def test_the_gpu_distance_transform_is_tiled_within_its_budget_with_the_same_result():
    from maskworks.backend import get_backend
    from maskworks.cryoet import refine

    b = get_backend("cuda")
    rng = np.random.default_rng(0)
    mask = rng.random((20, 300, 300)) > 0.01
    want = ndi.distance_transform_edt(mask) <= 3
    got = refine.distance_within(b, b.asarray(mask), 3, budget=9 * 64**3)  # whole: 9 * 300^3 B > budget
    np.testing.assert_array_equal(b.to_numpy(got), want)
