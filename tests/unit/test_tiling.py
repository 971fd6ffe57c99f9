"""maskworks.codex.tiling: channel names and selection, patch grid, QC flags, lazy reading (stitching: test_stitch.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from maskworks.codex import tiling
from maskworks.codex.tiling import (
    model_input,
    open_multichannel,
    patch_grid,
    patch_qc,
    read_channel_names,
    read_patch,
    select_channels,
)
from maskworks.io import InputError, slides

# ----------------------------------------------------------------------------- channel names


def test_channel_names_one_per_line(tmp_path):
    p = tmp_path / "channels.txt"
    p.write_text("# exported by the scanner\nDAPI\n\n CD45 \nPan-Cytokeratin\r\n")
    assert read_channel_names(p) == ["DAPI", "CD45", "Pan-Cytokeratin"]


def test_channel_names_from_an_antibodies_table(tmp_path):
    p = tmp_path / "antibodies.tsv"
    p.write_text("version\tchannel_id\tantibody_name\tuniprot\n1\tch001\tDAPI\t-\n1\tch002\tCD45\tP08575\n")
    assert read_channel_names(p) == ["DAPI", "CD45"]
    c = tmp_path / "markers.csv"
    c.write_text("Marker Name,exposure\nDAPI,10\nPanCK,20\n")
    assert read_channel_names(c) == ["DAPI", "PanCK"]
    h = tmp_path / "names.txt"
    h.write_text("channel_name\nDAPI\nCD3\n")
    assert read_channel_names(h) == ["DAPI", "CD3"]


def test_channel_names_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_channel_names(tmp_path / "nope.txt")
    t = tmp_path / "t.tsv"
    t.write_text("id\tweird\n1\tDAPI\n")
    with pytest.raises(InputError, match="antibody_name"):
        read_channel_names(t)
    e = tmp_path / "e.txt"
    e.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no channel names"):
        read_channel_names(e)


def test_select_channels_by_name():
    names = ["CD45", "DAPI", "Ki67", "PanCK"]
    assert select_channels(names, "DAPI", "CD45,PanCK") == (1, [0, 3])
    assert select_channels(names, "dapi", ["panck"]) == (1, [3])  # case-insensitive fallback
    with pytest.raises(InputError) as err:
        select_channels(names, "Hoechst", ["CD45"])
    assert "Hoechst" in str(err.value) and all(n in str(err.value) for n in names)
    with pytest.raises(InputError, match="CD8.*available: CD45, DAPI, Ki67, PanCK"):
        select_channels(names, "DAPI", ["CD45", "CD8"])
    with pytest.raises(InputError, match="occurs 2 times"):
        select_channels(["DAPI", "CD45", "DAPI"], "DAPI", ["CD45"])
    with pytest.raises(InputError, match="wholecell_channels is empty"):
        select_channels(names, "DAPI", "")


# ----------------------------------------------------------------------------- reading


def _stack(c=4, h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 1000, (c, h, w)).astype(np.uint16)


def test_model_input_is_nuclear_and_max_of_wholecell(tmp_path):
    data = _stack()
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, data, metadata={"axes": "CYX"})
    with open_multichannel(path) as img:
        assert img.n_channels == 4 and img.shape == (20, 30) and not img.lazy
        x = model_input(img, 1, [0, 3])
    assert x.shape == (20, 30, 2) and x.dtype == np.uint16
    np.testing.assert_array_equal(x[..., 0], data[1])
    np.testing.assert_array_equal(x[..., 1], np.maximum(data[0], data[3]))


def test_channel_axis_detected_or_given(tmp_path):
    data = _stack()
    last = tmp_path / "yxc.tif"
    tifffile.imwrite(last, np.moveaxis(data, 0, -1), photometric="minisblack", planarconfig="contig")
    with open_multichannel(last) as img:
        assert img.n_channels == 4
        np.testing.assert_array_equal(img.region(2, slice(None), slice(None)), data[2])
    ome = tmp_path / "img.ome.tif"
    tifffile.imwrite(ome, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["a", "b", "c", "d"]},
                                                     "PhysicalSizeX": 0.377, "PhysicalSizeXUnit": "µm"})
    with open_multichannel(ome) as img:
        assert img.channel_names == ["a", "b", "c", "d"] and img.mpp == pytest.approx(0.377)
    amb = tmp_path / "tcyx.tif"
    tifffile.imwrite(amb, np.stack([data, data]), metadata={"axes": "TCYX"})
    with pytest.raises(InputError, match="channel_axis"):
        open_multichannel(amb)
    with pytest.raises(InputError, match="more than one plane"):
        open_multichannel(amb, channel_axis="C")
    one = tmp_path / "one.tif"
    tifffile.imwrite(one, data[:1], metadata={"axes": "CYX"})
    with open_multichannel(one) as img:
        assert img.n_channels == 1 and img.channel_axis is None
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, data)
    with open_multichannel(plain, channel_axis=0) as img:
        assert img.n_channels == 4
    with pytest.raises(InputError, match="names the Y axis"):
        open_multichannel(ome, channel_axis="Y")


@pytest.mark.parametrize("compression,tile", [(None, None), ("zlib", None), ("zlib", (32, 32))])
def test_large_images_are_read_lazily(tmp_path, monkeypatch, compression, tile):
    data = _stack(4, 64, 80)
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"}, compression=compression, tile=tile)
    monkeypatch.setattr(slides, "IN_MEMORY_BYTES", 1000)
    with open_multichannel(path) as img:
        assert img.lazy
        assert isinstance(img.data, np.memmap) == (compression is None)
        grid = patch_grid(img.shape, patch_height=48, patch_width=48, overlap=0.25)
        lazy = [read_patch(img, grid, i, 1, [0, 3]) for i in range(grid.n_patches)]
    with open_multichannel(path, lazy=False) as img:
        assert not img.lazy
        eager = [read_patch(img, grid, i, 1, [0, 3]) for i in range(grid.n_patches)]
    for a, b in zip(lazy, eager):
        np.testing.assert_array_equal(a, b)


def test_lazy_reads_decode_only_the_tiles_they_touch(tmp_path, monkeypatch):
    """A region read of one channel decodes that channel's tiles under the region, and nothing
    stays cached: memory does not grow with the channels read (issue 23)."""
    import tifffile as tf

    data = _stack(6, 256, 256)
    path = tmp_path / "tiled.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"}, compression="zlib", tile=(64, 64))
    decoded = []
    make_decoder = tf.TiffPage.__dict__["decode"].func  # tifffile's cached decoder factory

    def counting_decoder(page):
        decode = make_decoder(page)

        def counted(data, index, **kwargs):
            decoded.append(index)
            return decode(data, index, **kwargs)
        return counted

    monkeypatch.setattr(slides, "IN_MEMORY_BYTES", 1000)
    monkeypatch.setattr(tf.TiffPage, "decode", property(counting_decoder))
    with open_multichannel(path) as img:
        decoded.clear()
        np.testing.assert_array_equal(img.region(4, slice(70, 120), slice(10, 60)), data[4, 70:120, 10:60])
        assert len(decoded) == 1  # one 64 x 64 tile of channel 4, of 6 x 16 tiles in the file
        decoded.clear()
        np.testing.assert_array_equal(img.region(4, slice(70, 120), slice(10, 60)), data[4, 70:120, 10:60])
        assert len(decoded) == 1  # read again: nothing was kept


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize("shape,patch,overlap", [
    ((1400, 1860), (512, 512), 0.1), ((100, 100), (100, 100), 0.1), ((101, 57), (40, 30), 0.25),
    ((30, 20), (64, 48), 0.1), ((3000, 4100), (1440, 1920), 0.1), ((64, 64), (16, 16), 0.0),
])
def test_grid_step_minimal_padding_and_coverage(shape, patch, overlap):
    g = patch_grid(shape, patch_height=patch[0], patch_width=patch[1], overlap=overlap)
    assert g.patch_shape == patch
    for ax in range(2):
        size, step, n, length = patch[ax], g.step[ax], g.grid_shape[ax], shape[ax]
        assert step == size - int(size * overlap)
        assert g.padded_shape[ax] == size + (n - 1) * step >= length
        assert n == 1 or size + (n - 2) * step < length  # one patch fewer would not cover
    covered = np.zeros(g.padded_shape, int)
    cores = np.zeros(shape, int)
    for pid in range(g.n_patches):
        _, _, y0, x0 = g.position(pid)
        covered[y0:y0 + patch[0], x0:x0 + patch[1]] += 1
        ylo, yhi, xlo, xhi = g.core(pid)
        cores[ylo:yhi, xlo:xhi] += 1
        half = [(p - s) // 2 for p, s in zip(patch, g.step)]
        top, bottom, left, right = g.inner_edges(pid)
        assert ylo >= y0 + (half[0] if top else 0) and xlo >= x0 + (half[1] if left else 0)
        assert yhi <= y0 + patch[0] - (half[0] if bottom else 0)
        assert xhi <= x0 + patch[1] - (half[1] if right else 0)
    assert covered.min() >= 1 and covered.shape == g.padded_shape
    np.testing.assert_array_equal(cores, 1)  # the cores partition the image


@pytest.mark.parametrize("mode,direction,shape,grid", [
    ("full_image", "vertical", (300, 500), (1, 1)), ("halves", "vertical", (300, 500), (1, 2)),
    ("halves", "horizontal", (500, 300), (2, 1)), ("quarters", "vertical", (301, 499), (2, 2)),
])
def test_split_modes_with_an_overlap(mode, direction, shape, grid):
    g = patch_grid(shape, split_mode=mode, overlap=0.1, split_direction=direction)
    assert g.grid_shape == grid
    if mode == "full_image":
        assert g.patch_shape == g.padded_shape == shape
    for ax in range(2):
        if grid[ax] == 1:
            assert g.patch_shape[ax] == shape[ax]
        else:
            p = g.patch_shape[ax]
            assert g.step[ax] == p - int(p * 0.1) and g.padded_shape[ax] >= shape[ax]
            smaller = p - 1
            assert smaller + (smaller - int(smaller * 0.1)) < shape[ax]  # the smallest size that covers


@pytest.mark.parametrize("shape", [(300, 500), (301, 499), (7, 9)])
def test_halves_and_quarters_follow_aegles_split(shape):
    h, w = shape
    # vertical (Aegle's default): left [0, w // 2), right [w // 2, w); no overlap, no padding
    g = patch_grid(shape, split_mode="halves")
    assert g.grid_shape == (1, 2) and g.overlap == 0.0 and g.padded_shape == shape
    assert g.core(0) == (0, h, 0, w // 2) and g.core(1) == (0, h, w // 2, w)
    assert g.position(1)[3] == w // 2 and g.patch_shape == (h, w - w // 2)
    g = patch_grid(shape, split_mode="halves", split_direction="horizontal")
    assert g.grid_shape == (2, 1) and g.core(0) == (0, h // 2, 0, w) and g.core(1) == (h // 2, h, 0, w)
    g = patch_grid(shape, split_mode="quarters")
    assert g.grid_shape == (2, 2) and g.padded_shape == shape
    assert [g.core(i) for i in range(4)] == [(0, h // 2, 0, w // 2), (0, h // 2, w // 2, w),
                                             (h // 2, h, 0, w // 2), (h // 2, h, w // 2, w)]
    # the patches mode keeps its 10 % default overlap
    assert patch_grid(shape, patch_height=4, patch_width=4).overlap == 0.1


def test_grid_rejects_bad_parameters():
    with pytest.raises(InputError, match="split_mode"):
        patch_grid((10, 10), split_mode="thirds")
    with pytest.raises(InputError, match="split_direction"):
        patch_grid((10, 10), split_mode="halves", split_direction="diagonal")
    with pytest.raises(InputError, match="overlap"):
        patch_grid((10, 10), overlap=1.0)
    with pytest.raises(InputError, match="overlap"):
        patch_grid((10, 10), overlap=0.8)  # a step under a quarter of the patch
    assert patch_grid((100, 100), patch_height=40, patch_width=40, overlap=0.75).step == (10, 10)
    with pytest.raises(InputError, match="patch_height"):
        patch_grid((10, 10), patch_height=0)


def test_wholecell_channels_max_or_mean(tmp_path):
    data = _stack(3, 20, 30)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, data, metadata={"axes": "CYX"})
    with open_multichannel(path) as img:
        mx = model_input(img, 0, [1, 2])
        mean = model_input(img, 0, [1, 2], aggregation="mean")
        with pytest.raises(InputError, match="wholecell_aggregation"):
            model_input(img, 0, [1, 2], aggregation="median")
    np.testing.assert_array_equal(mx[..., 1], np.maximum(data[1], data[2]))
    expected = np.rint((data[1].astype(np.float64) + data[2]) / 2).astype(data.dtype)
    np.testing.assert_array_equal(mean[..., 1], expected)
    np.testing.assert_array_equal(mean[..., 0], data[0])


def test_read_patch_pads_with_zeros(tmp_path):
    data = _stack(2, 50, 70) + 1
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, data, metadata={"axes": "CYX"})
    with open_multichannel(path) as img:
        g = patch_grid(img.shape, patch_height=32, patch_width=32, overlap=0.25)
        last = g.n_patches - 1
        p = read_patch(img, g, last, 0, [1])
    _, _, y0, x0 = g.position(last)
    vh, vw = g.valid_shape(last)
    assert p.shape == (32, 32, 2) and (vh, vw) == (50 - y0, 70 - x0)
    np.testing.assert_array_equal(p[:vh, :vw, 0], data[0, y0:, x0:])
    assert not p[vh:].any() and not p[:, vw:].any()


# ----------------------------------------------------------------------------- QC


def test_patch_qc_flags():
    zeros = np.zeros((100, 100, 2), np.uint16)
    q = patch_qc(zeros)
    assert q["is_empty"] and q["is_noisy"] and q["is_bad_patch"] and not q["is_informative"]
    assert q["nucleus_non_zero_perc"] == 0
    sparse = zeros.copy()
    sparse[:3, :, 0] = 500  # 3 % non-zero, bright: empty, not noisy
    q = patch_qc(sparse)
    assert q["is_empty"] and not q["is_noisy"] and q["nucleus_mean"] == pytest.approx(15.0)
    faint = zeros.copy()
    faint[:30, :, 0] = 1  # 30 % non-zero, mean 0.3: noisy, not empty
    q = patch_qc(faint)
    assert not q["is_empty"] and q["is_noisy"] and not q["is_informative"]
    edge = zeros.copy()
    edge[:5, :, 0] = 100  # exactly 5 %: not empty (strictly below the threshold is)
    edge[..., 1] = 7
    q = patch_qc(edge)
    assert q["is_informative"] and not q["is_bad_patch"] and q["wholecell_mean"] == 7 and q["wholecell_std"] == 0
    assert patch_qc(edge, non_zero_perc_threshold=0.06)["is_empty"]
    assert patch_qc(edge, mean_intensity_threshold=5.01)["is_noisy"]
    with pytest.raises(InputError, match="patch_qc"):
        patch_qc(np.zeros((4, 4)))


def test_patch_stats_block_by_block_equal_one_pass():
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 60000, (301, 77, 2)).astype(np.uint16)
    patch[:40] = 0
    stats = tiling.PatchStats()
    for r0 in range(0, 301, 64):
        stats.add(patch[r0:r0 + 64])
    q = stats.qc()
    for c, name in enumerate(("nucleus", "wholecell")):
        assert q[f"{name}_mean"] == pytest.approx(patch[..., c].mean(dtype=np.float64), rel=1e-12)
        assert q[f"{name}_std"] == pytest.approx(patch[..., c].std(dtype=np.float64), rel=1e-12)
        assert q[f"{name}_non_zero_perc"] == np.count_nonzero(patch[..., c]) / patch[..., c].size


# ----------------------------------------------------------------------------- whole-cell normalisation


def _slide(tmp_path, data, name="norm.tif"):
    path = tmp_path / name
    tifffile.imwrite(path, data, metadata={"axes": "CYX"})
    return path


def test_sum_aggregation_is_float32_without_overflow(tmp_path):
    data = np.full((3, 4, 5), 40000, np.uint16)
    data[2, 0, 0] = 1
    with open_multichannel(_slide(tmp_path, data)) as img:
        out = model_input(img, 0, [1, 2], aggregation="sum")
    assert out.dtype == np.float32 and tiling.model_input_dtype(np.uint16, "sum") == np.float32
    assert out[0, 0, 1] == 40001 and out[1, 1, 1] == 80000 and out[2, 3, 0] == 40000


@pytest.mark.parametrize("rows", [1, 3, 1024])
def test_statistics_are_over_the_whole_slide_in_row_blocks(tmp_path, rows):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 4000, (3, 23, 17)).astype(np.uint16)
    data[2] = rng.integers(100, 200, (23, 17))
    with open_multichannel(_slide(tmp_path, data)) as img:
        mm = tiling.wholecell_statistics(img, [1, 2], "minmax", rows=rows)
        zs = tiling.wholecell_statistics(img, [1, 2], "zscore", rows=rows)
        pc = tiling.wholecell_statistics(img, [1, 2], "percentile", rows=rows)
    for st_mm, st_z, st_p, ch in zip(mm, zs, pc, (data[1], data[2])):
        assert (st_mm["min"], st_mm["max"]) == (ch.min(), ch.max())
        assert st_mm["offset"] == ch.min() and st_mm["scale"] == ch.max() - ch.min()
        assert st_z["mean"] == pytest.approx(ch.mean(), rel=1e-12)
        assert st_z["std"] == pytest.approx(ch.std(), rel=1e-12)
        # exact from the histogram: numpy's linear interpolation between order statistics
        assert st_p["low"] == pytest.approx(np.percentile(ch, 1.0), abs=1e-9)
        assert st_p["high"] == pytest.approx(np.percentile(ch, 99.8), abs=1e-9)
        assert st_p["exact"] is True


def test_percentiles_of_signed_and_float_channels(tmp_path):
    ch = np.arange(-50, 50, dtype=np.int16).reshape(10, 10)
    with open_multichannel(_slide(tmp_path, np.stack([ch, ch]), "i16.tif")) as img:
        st, = tiling.wholecell_statistics(img, [1], "percentile", percentiles=(10, 90))
    assert (st["low"], st["high"]) == (pytest.approx(np.percentile(ch, 10)), pytest.approx(np.percentile(ch, 90)))
    f = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    with open_multichannel(_slide(tmp_path, np.stack([f, f]), "f32.tif")) as img:
        st, = tiling.wholecell_statistics(img, [1], "percentile", rows=3, float_samples=100)
    assert st["exact"] is False  # every 4th pixel of the slide
    assert st["low"] == pytest.approx(0.01, abs=0.02) and st["high"] == pytest.approx(0.998, abs=0.02)


def test_constant_channel_is_shifted_not_divided(tmp_path):
    data = np.stack([np.ones((4, 4)), np.full((4, 4), 7.0)]).astype(np.uint8)
    with open_multichannel(_slide(tmp_path, data)) as img:
        st, = tiling.wholecell_statistics(img, [1], "zscore")
        out = model_input(img, 0, [1], normalisation="zscore", statistics=[st])
    assert st["std"] == 0 and st["scale"] == 1.0
    np.testing.assert_array_equal(out[..., 1], 0)


@pytest.mark.parametrize("aggregation", ["max", "mean", "sum"])
def test_model_input_normalises_each_channel_then_combines(tmp_path, aggregation):
    # channel 1 is bright (100..1100), channel 2 dim (0..10): unnormalised, max would only ever see channel 1
    rng = np.random.default_rng(2)
    data = np.stack([rng.integers(0, 50, (12, 16)), rng.integers(100, 1101, (12, 16)),
                     rng.integers(0, 11, (12, 16))]).astype(np.uint16)
    combine = {"max": np.maximum, "mean": lambda a, b: (a + b) / 2, "sum": np.add}[aggregation]
    with open_multichannel(_slide(tmp_path, data)) as img:
        for norm in ("minmax", "zscore", "percentile"):
            stats = tiling.wholecell_statistics(img, [1, 2], norm)
            whole = model_input(img, 0, [1, 2], aggregation=aggregation, normalisation=norm, statistics=stats)
            # a patch (a region) applies the slide's statistics: it equals the same pixels of the whole
            part = model_input(img, 0, [1, 2], slice(3, 9), slice(5, 16), aggregation=aggregation,
                               normalisation=norm, statistics=stats)
            assert whole.dtype == np.float32 and part.dtype == np.float32
            np.testing.assert_array_equal(part, whole[3:9, 5:16])
            np.testing.assert_array_equal(whole[..., 0], data[0])
            a, b = (data[c].astype(np.float64) for c in (1, 2))
            if norm == "minmax":
                a, b = ((x - x.min()) / (x.max() - x.min()) for x in (a, b))
            elif norm == "zscore":
                a, b = ((x - x.mean()) / x.std() for x in (a, b))
            else:
                a, b = (np.clip((x - np.percentile(x, 1)) / (np.percentile(x, 99.8) - np.percentile(x, 1)), 0, 1)
                        for x in (a, b))
            np.testing.assert_allclose(whole[..., 1], combine(a, b), rtol=1e-5, atol=1e-5)
        # without statistics given, model_input computes them over the whole image
        np.testing.assert_array_equal(model_input(img, 0, [1, 2], aggregation=aggregation, normalisation="minmax"),
                                      model_input(img, 0, [1, 2], aggregation=aggregation, normalisation="minmax",
                                                  statistics=tiling.wholecell_statistics(img, [1, 2], "minmax")))
        with pytest.raises(InputError, match="wholecell_normalisation"):
            model_input(img, 0, [1, 2], normalisation="robust")
    if aggregation == "max":
        assert tiling.model_input_dtype(np.uint16, "max", "none") == np.uint16


def test_tile_image_stores_normalised_float_patches_and_the_statistics(tmp_path):
    import json

    import zarr

    from maskworks.codex.stages import tile_image_files

    rng = np.random.default_rng(4)
    data = np.stack([rng.integers(0, 60000, (40, 50)), rng.integers(0, 4000, (40, 50)),
                     rng.integers(0, 40, (40, 50))]).astype(np.uint16)
    path = _slide(tmp_path, data)
    (tmp_path / "names.txt").write_text("DAPI\nCD45\nPanCK\n")
    kw = dict(nuclear_channel="DAPI", wholecell_channels=["CD45", "PanCK"], split_mode="patches", patch_height=24,
              patch_width=32, overlap=0.25, mean_intensity_threshold=0.0)
    st = tile_image_files(path, tmp_path / "names.txt", tmp_path / "z", wholecell_normalisation="zscore",
                          wholecell_aggregation="sum", **kw)
    root = zarr.open_group(str(tmp_path / "z" / "patches.zarr"), mode="r")
    patches = root["patches"][...]
    assert patches.dtype == np.float32 and st["wholecell_normalisation"] == "zscore"
    stats = root.attrs["wholecell_statistics"]
    assert [s["channel"] for s in stats] == ["CD45", "PanCK"]
    assert stats[0]["mean"] == pytest.approx(data[1].mean()) and stats[1]["std"] == pytest.approx(data[2].std())
    assert json.loads((tmp_path / "z" / "tiling_stats.json").read_text())["wholecell_statistics"] == stats
    expected = sum((data[c] - data[c].mean()) / data[c].std() for c in (1, 2))
    np.testing.assert_allclose(patches[0, ..., 1], expected[:24, :32], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(patches[0, ..., 0], data[0, :24, :32])  # the nuclear channel as it was
    # the defaults keep the slide's dtype and record no statistics
    tile_image_files(path, tmp_path / "names.txt", tmp_path / "d", **kw)
    root = zarr.open_group(str(tmp_path / "d" / "patches.zarr"), mode="r")
    assert root["patches"].dtype == np.uint16 and root.attrs["wholecell_statistics"] is None
