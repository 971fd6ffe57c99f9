"""maskworks.em.texture: the classical volume-EM tissue mask."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from maskworks.demo import EM_SAMPLES, make_em_volume
from maskworks.em.texture import local_variance, sym3_eigenvalues, texture_mask
from maskworks.io import InputError


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def small_em():
    return make_em_volume((40, 80, 80), seed=3)


@pytest.fixture(scope="module")
def small_em_result(small_em):
    return texture_mask(small_em[0])


@pytest.mark.parametrize("shape, seed", [((48, 96, 96), 0), (EM_SAMPLES["sample2"]["shape"], EM_SAMPLES["sample2"]["seed"])])
def test_finds_the_tissue_of_the_demo_volume(shape, seed):
    image, truth = make_em_volume(shape, seed=seed)
    mask, confidence, stats = texture_mask(image)
    assert dice(mask, truth) >= 0.9
    # the resin's crack and bright sheet (far from the tissue, extreme grey values) stay out of the mask
    far = ndi.distance_transform_edt(truth == 0) > 10
    artefacts = far & ((image < 90) | (image > 215))
    assert np.count_nonzero(artefacts) > 100
    assert not mask[artefacts].any()
    assert confidence[truth == 1].mean() > confidence[truth == 0].mean() + 0.3


def test_local_variance_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 6, 7))
    size = (3, 4, 5)

    def reflect(i, n):  # scipy "reflect": d c b a | a b c d | d c b a
        return -i - 1 if i < 0 else 2 * n - i - 1 if i >= n else i

    expected = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        axes = [[reflect(i + d, n) for d in range(-(s // 2), (s - 1) // 2 + 1)] for i, s, n in zip(idx, size, x.shape)]
        expected[idx] = x[np.ix_(*axes)].var()
    np.testing.assert_allclose(local_variance(x, size), expected, atol=1e-12)
    assert local_variance(np.full((4, 4, 4), 7.0), 3).max() == 0.0


def test_sym3_eigenvalues_match_eigvalsh():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(500, 3, 4))
    a = g @ g.transpose(0, 2, 1)
    v = rng.normal(size=(50, 3))
    a[:50] = v[:, :, None] * v[:, None, :]  # rank one: a single plane
    l1, l2, l3 = sym3_eigenvalues(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2])
    ref = np.linalg.eigvalsh(a)
    np.testing.assert_allclose(np.stack([l3, l2, l1], axis=1), ref, atol=1e-7 * np.abs(ref).max())


def test_chunked_equals_unchunked(small_em, small_em_result):
    image = small_em[0]
    mask0, conf0, stats0 = small_em_result
    calls = []
    mask1, conf1, stats1 = texture_mask(image, chunk_shape=(24, 45, 50), progress=lambda d, t: calls.append((d, t)))
    assert stats1["chunks"] == 2 * 2 * 2 and calls[-1] == (8, 8)
    np.testing.assert_allclose(conf1, conf0, atol=1e-5)
    np.testing.assert_array_equal(mask1, mask0)
    assert stats1["threshold"] == stats0["threshold"]


def test_chunked_zarr_input_and_output(small_em, small_em_result):
    image = small_em[0]
    mask0, conf0, _ = small_em_result
    src = zarr.array(image, chunks=(16, 32, 32))
    out = zarr.zeros(image.shape, chunks=(16, 32, 32), dtype="f4")
    mask, conf, stats = texture_mask(src, chunk_shape=(40, 48, 80), out_confidence=out, progress=False)
    assert conf is out and stats["chunks"] == 2
    np.testing.assert_allclose(out[...], conf0, atol=1e-5)
    np.testing.assert_array_equal(mask, mask0)


def test_outputs_and_stats(small_em_result):
    mask, conf, stats = small_em_result
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert conf.dtype == np.float32 and conf.min() >= 0.0 and conf.max() <= 1.0
    for key in ("voxels", "fraction_masked", "threshold", "threshold_method", "intensity_p1", "intensity_p99",
                "evidence_scales", "components_removed", "holes_filled", "chunks", "halo"):
        assert key in stats
    assert stats["voxels"] == mask.size and stats["chunks"] == 1 and stats["threshold_method"] == "otsu"
    assert stats["fraction_masked"] == pytest.approx(mask.mean())
    assert 0.0 < stats["threshold"] < 1.0
    assert stats["intensity_p1"] < stats["intensity_p99"]
    assert set(stats["evidence_scales"]) == {"texture", "contrast", "edges"}
    assert all(v > 0 for v in stats["evidence_scales"].values())
    assert stats["halo"] >= 32  # at least block_size / 2 and 4 x the largest sigma


def test_fixed_threshold_is_used_as_given(small_em, small_em_result):
    image = small_em[0]
    mask, conf, stats = texture_mask(image, threshold=0.3, min_region_size=0)
    assert stats["threshold"] == 0.3 and stats["threshold_method"] == "fixed"
    np.testing.assert_array_equal(mask, (conf > 0.3).astype(np.uint8))
    np.testing.assert_array_equal(conf, small_em_result[1])  # the confidence does not depend on it


@pytest.mark.parametrize("step, threads, store", [(20, 1, "numpy"), (3, 2, "numpy"), (1, 2, "zarr"), (7, 1, "zarr")])
def test_small_components_removed_and_holes_filled(step, threads, store):
    """The clean-up by z-slabs (in memory, or out of core on a Zarr mask) gives what one pass on
    the whole mask gives, whatever the slabs: components and holes cross the slab faces."""
    from maskworks.em.texture import _clean
    from maskworks.io.blocks import Slabs

    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:14, 2:14, 2:14] = 1  # 1728 voxels, kept
    mask[6:8, 6:8, 6:8] = 0  # hole of 8 voxels, filled
    mask[17:19, 17:19, 17:19] = 1  # speck of 8 voxels, removed
    mask[16:20, 0:5, 0:5] = 1  # 100 voxels, kept at min size 100
    expected = np.zeros_like(mask)
    expected[2:14, 2:14, 2:14] = 1
    expected[16:20, 0:5, 0:5] = 1
    if store == "zarr":
        mask = zarr.array(mask, chunks=(4, 20, 20))
    with Slabs(threads) as par:
        assert _clean(mask, 100, par, step) == (1, 1)
        np.testing.assert_array_equal(mask[...], expected)
        assert _clean(mask, 100, par, step) == (0, 0)  # idempotent


def test_threads_and_memory_bound_change_nothing(small_em, small_em_result):
    """Two threads give the single-thread result bit for bit; a memory budget chooses chunks that
    fit it and gives the same mask (the halo makes chunked == unchunked)."""
    from maskworks.em.texture import memory_chunks

    image = small_em[0]
    mask0, conf0, stats0 = small_em_result
    mask1, conf1, stats1 = texture_mask(image, threads=1)
    mask2, conf2, stats2 = texture_mask(image, threads=2)
    assert stats1["threads"] == 1 and stats2["threads"] == 2
    np.testing.assert_array_equal(conf1, conf2)
    np.testing.assert_array_equal(mask1, mask2)
    image, _ = make_em_volume((96, 160, 160), seed=5)  # 2.5 M voxels: more than 64 MiB of work
    mask0, conf0, _ = texture_mask(image)
    out = zarr.zeros(image.shape, chunks=(8, 80, 80), dtype="u1")
    mask3, conf3, stats3 = texture_mask(image, memory_mb=64, out_mask=out, progress=False)
    assert mask3 is out and stats3["chunks"] > 1 and stats3["memory_mb"] == 64
    np.testing.assert_array_equal(out[...], mask0)
    np.testing.assert_allclose(conf3, conf0, atol=1e-5)
    # the chunk's working set (with its halo) fits the budget; full y/x slabs where they fit
    from maskworks.em.texture import WORK_BYTES_PER_VOXEL

    for shape, mb in [((256, 512, 512), 2048), ((1000, 2000, 2000), 1024), ((64, 64, 64), 64)]:
        cz, cy, cx = memory_chunks(shape, 34, mb, 4)
        outer = [min(s, c + 68) for s, c in zip(shape, (cz, cy, cx))]
        assert np.prod(outer) * (WORK_BYTES_PER_VOXEL + 4) <= mb * 2**20 or (cz, cy, cx) == (8, 8, 8)
    assert memory_chunks((256, 512, 512), 34, 2048, 4)[1:] == (512, 512)


def test_featureless_volume_gives_an_empty_mask():
    mask, conf, stats = texture_mask(np.full((20, 30, 30), 100, np.uint8))
    assert not mask.any() and conf.max() < 1e-3 and stats["fraction_masked"] == 0.0


@pytest.mark.parametrize(
    "volume, kwargs, name",
    [
        (np.zeros((8, 8)), {}, "volume"),
        (np.zeros((8, 8, 8, 2)), {}, "volume"),
        (np.zeros((8, 8, 8)), {"block_size": 0}, "block_size"),
        (np.zeros((8, 8, 8)), {"texture_sigma": -1.0}, "texture_sigma"),
        (np.zeros((8, 8, 8)), {"edge_sigma": -0.5}, "edge_sigma"),
        (np.zeros((8, 8, 8)), {"min_region_size": -1}, "min_region_size"),
        (np.zeros((8, 8, 8)), {"threshold": 1.5}, "threshold"),
        (np.zeros((8, 8, 8)), {"threshold": "mean"}, "threshold"),
        (np.zeros((8, 8, 8)), {"chunk_shape": (4, 4)}, "chunk_shape"),
        (np.zeros((8, 8, 8)), {"out_confidence": np.zeros((8, 8, 7), np.float32)}, "out_confidence"),
    ],
)
def test_bad_input_names_the_parameter(volume, kwargs, name):
    with pytest.raises(InputError, match=name):
        texture_mask(volume, **kwargs)


def test_crossing_planes_curtaining_and_a_ramp_stay_out_of_the_mask():
    """The "artefacts" demo variant: two cracks and a bright sheet crossing at right angles in the
    resin, curtaining and a brightness ramp.  Where planes cross, the tensor has two large
    eigenvalues; the incoherence l3 / l1 still sees no texture there."""
    for seed in (0, 2):
        image, truth = make_em_volume((64, 128, 128), seed=seed, variant="artefacts")
        plain, plain_truth = make_em_volume((64, 128, 128), seed=seed)
        mask, conf, _ = texture_mask(image)
        assert dice(mask, truth) >= 0.95
        assert dice(texture_mask(plain)[0], plain_truth) >= 0.96
        # resin far from the tissue: 0.5-1 % masked (with the single-plane test 1 - l2 / l1, 3.3-3.4 %)
        far = ndi.distance_transform_edt(truth == 0) > 8
        assert np.count_nonzero(mask[far]) < 0.015 * np.count_nonzero(far)
    with pytest.raises(InputError, match="variant"):
        make_em_volume((32, 32, 32), variant="cracks")


def test_anisotropy_is_one_minus_l3_over_l1():
    from maskworks.em.texture import _anisotropy

    rng = np.random.default_rng(2)
    g = rng.normal(size=(500, 3, 4))
    a = g @ g.transpose(0, 2, 1)
    n = rng.normal(size=(2, 3))
    a[0] = np.outer(n[0], n[0])  # one plane: l2 = l3 = 0
    a[1] = np.outer(n[0], n[0]) + np.outer(n[1], n[1])  # two crossing planes: l3 = 0
    a[2] = np.eye(3)  # isotropic
    ref = np.linalg.eigvalsh(a)
    got = _anisotropy(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2])
    np.testing.assert_allclose(got, (ref[:, 2] - ref[:, 0]) / ref[:, 2], atol=1e-7)
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(1.0) and got[2] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("shape, phase", [((9, 10, 11), (0, 0, 0)), ((8, 7, 12), (1, 0, 1)), ((5, 6, 2), (1, 1, 1))])
def test_coarse_smoothing_is_exact_at_the_even_samples_and_upsampling_is_linear(shape, phase):
    from maskworks.em.texture import _gauss_pass, _smooth_coarse, upsample
    from maskworks.io.blocks import Slabs

    rng = np.random.default_rng(3)
    x = rng.random(shape).astype(np.float32)
    with Slabs(2) as par:
        coarse = _smooth_coarse(x.copy(), _gauss_pass(1.5), phase, par)
        full = ndi.gaussian_filter(x, 1.5, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(coarse, full[phase[0]::2, phase[1]::2, phase[2]::2], atol=1e-6)
        up = upsample(coarse, phase, shape, par)
    # known answer along each axis: samples kept, midpoints averaged, ends without a neighbour copied
    expect = coarse
    for axis, (p, n) in enumerate(zip(phase, shape)):
        a = np.moveaxis(expect, axis, 0)
        rows = []
        for j in range(n):
            t = j - p
            lo = min(a.shape[0] - 1, max(0, t // 2))
            rows.append(a[lo] if t < 0 or t % 2 == 0 or lo + 1 >= a.shape[0] else 0.5 * (a[lo] + a[lo + 1]))
        expect = np.moveaxis(np.stack(rows), 0, axis)
    np.testing.assert_allclose(up, expect, atol=1e-6)


GPU = __import__("maskworks.backend", fromlist=["resolve_device"]).resolve_device("auto") != "cpu"


def test_the_device_runner_gives_the_thread_pool_result(small_em):
    """On a GPU each step runs as one call on the whole block (``_OnDevice``), in the backend's
    array modules.  With NumPy and scipy as those modules it gives the thread pool's evidence,
    histograms and confidence: what differs on a GPU is CuPy's arithmetic, not the steps.  (Its
    box statistics are taken in float64, against float32 in the pool: a rounding apart.)"""
    from maskworks.backend import get_backend
    from maskworks.em.texture import (
        _confidence_block,
        _evidence,
        _lo_crop,
        _normalise,
        _OnDevice,
        _scales,
        _Work,
        upsample,
    )
    from maskworks.io.blocks import Slabs

    image = small_em[0][:, 3:, 1:]  # odd extents: both phases of the coarse samples
    sc = _scales(1.0, 0.5, 16)
    phase = (0, 1, 1)
    crop = tuple(slice(2, n - 3) for n in image.shape)
    results = []
    with Slabs(2) as pool:
        for run in (pool, _OnDevice(get_backend("cpu"))):
            work = _Work()
            x = _normalise(image, 20.0, 230.0, run, out=work.get("a", image.shape))
            raw, hists = _confidence_block(_evidence(x, sc, phase, run, work), _lo_crop(crop, phase), run)
            results.append((upsample(raw, phase, image.shape, run).copy(), hists))
    (c_pool, h_pool), (c_dev, h_dev) = results
    np.testing.assert_allclose(c_dev, c_pool, rtol=1e-4, atol=1e-6)
    assert h_dev.keys() == h_pool.keys()
    for k in h_pool:  # the same samples, in the same bins but for a rounding at a bin's edge
        assert h_dev[k].sum() == h_pool[k].sum() and np.abs(h_dev[k] - h_pool[k]).sum() <= 1e-2 * h_pool[k].sum()
    assert all(isinstance(h, np.ndarray) and h.sum() > 0 for h in h_dev.values())


@pytest.mark.skipif(not GPU, reason="needs cupy and a CUDA device")
def test_cpu_and_gpu_give_the_same_mask(small_em):
    image, truth = small_em
    m_cpu, c_cpu, st_cpu = texture_mask(image, device="cpu")
    m_gpu, c_gpu, st_gpu = texture_mask(image, device="cuda")
    assert st_gpu["device"] == "cuda:0" and st_cpu["device"] == "cpu"
    np.testing.assert_allclose(c_gpu, c_cpu, atol=5e-4)  # cupyx sums float32 in float32
    assert abs(st_gpu["threshold"] - st_cpu["threshold"]) < 1e-3
    assert np.count_nonzero(m_gpu != m_cpu) <= 1e-3 * m_cpu.size
    # chunks on the device (and a memory budget sizing them) give the same result
    m_chunks, c_chunks, _ = texture_mask(image, device="cuda", chunk_shape=(16, 40, 40))
    np.testing.assert_allclose(c_chunks, c_gpu, atol=5e-4)
    assert np.count_nonzero(m_chunks != m_gpu) <= 1e-3 * m_cpu.size
    out_c = zarr.zeros(image.shape, chunks=(8, 40, 40), dtype="f4")
    out_m = zarr.zeros(image.shape, chunks=(8, 40, 40), dtype="u1")
    texture_mask(zarr.array(image, chunks=(8, 40, 40)), device="cuda", memory_mb=64, out_confidence=out_c,
                 out_mask=out_m)
    assert np.count_nonzero(out_m[...] != m_gpu) <= 1e-3 * m_cpu.size
    assert dice(m_gpu, truth) >= dice(m_cpu, truth) - 0.005


@pytest.mark.skipif(GPU, reason="a GPU is there")
def test_a_gpu_asked_for_without_one_is_a_clear_error(small_em):
    with pytest.raises(InputError, match="device='cuda' asks for a GPU but"):
        texture_mask(small_em[0], device="cuda")
    with pytest.raises(InputError, match="texture_mask: device='gpu'"):
        texture_mask(small_em[0], device="gpu")
    assert texture_mask(small_em[0][:16, :32, :32], device="auto", min_region_size=0)[2]["device"] == "cpu"


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint16", "int32", "uint8", "huge"])
def test_intensity_range_is_numpys_percentile_whatever_the_chunks_and_threads(dtype):
    """The normalisation's 1st/99th percentiles, from histogram bins computed in float32 where the
    values fit: exact order statistics for every input type, chunking and thread count."""
    from maskworks.em.texture import _intensity_range

    rng = np.random.default_rng(4)
    shape = (30, 34, 40)
    vol = {"float32": rng.normal(0, 1, shape).astype(np.float32), "float64": rng.normal(0, 1, shape),
           "uint16": rng.integers(0, 65535, shape).astype(np.uint16),
           "int32": rng.integers(-2**31, 2**31 - 1, shape).astype(np.int32),
           "uint8": rng.integers(0, 3, shape).astype(np.uint8),  # ties: order statistics inside one bin
           "huge": (rng.normal(0, 1, shape) * 1e37).astype(np.float32)}[dtype]  # float64 bins: no overflow
    expected = np.percentile(vol, [1, 99])
    for chunks in (None, (16, 16, 16)):
        for threads in (1, 2):
            p1, p99, stride = _intensity_range(vol, shape, chunks, threads)
            assert (p1, p99, stride) == (expected[0], expected[1], 1), (chunks, threads)


def test_per_axis_scales_follow_the_axes(small_em):
    """Three sigmas and a three-sided window (z, y, x) act along their own axes: transposing the
    volume and the scales together transposes the confidence and the mask."""
    vol = small_em[0]
    scales = dict(block_size=(9, 25, 17), texture_sigma=(0.4, 1.0, 1.5), edge_sigma=(0.25, 0.5, 0.75))
    mask, conf, _ = texture_mask(vol, **scales)
    order = (2, 0, 1)
    turned = {k: tuple(v[i] for i in order) for k, v in scales.items()}
    mask_t, conf_t, _ = texture_mask(np.ascontiguousarray(vol.transpose(order)), **turned)
    np.testing.assert_allclose(conf_t, conf.transpose(order), atol=1e-5)
    assert dice(mask_t, mask.transpose(order)) > 0.999


def test_three_equal_scales_are_the_one_scale(small_em, small_em_result):
    mask, conf, _ = texture_mask(small_em[0], block_size=(64, 64, 64), texture_sigma=(1.0,) * 3,
                                 edge_sigma=(0.5,) * 3)
    np.testing.assert_array_equal(mask, small_em_result[0])
    np.testing.assert_array_equal(conf, small_em_result[1])
