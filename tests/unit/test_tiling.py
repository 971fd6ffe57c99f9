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
from maskworks.io import InputError

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


@pytest.mark.parametrize("compression,kind", [(None, np.memmap), ("zlib", tiling._ChannelPages)])
def test_large_images_are_read_lazily(tmp_path, monkeypatch, compression, kind):
    data = _stack(4, 64, 80)
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"}, compression=compression)
    monkeypatch.setattr(tiling, "IN_MEMORY_BYTES", 1000)
    with open_multichannel(path) as img:
        assert img.lazy and isinstance(img.data, kind)
        grid = patch_grid(img.shape, patch_height=48, patch_width=48, overlap=0.25)
        lazy = [read_patch(img, grid, i, 1, [0, 3]) for i in range(grid.n_patches)]
        if kind is tiling._ChannelPages:
            assert sorted(img.data._planes) == [0, 1, 3]  # the unused channel 2 was never decoded
    with open_multichannel(path, lazy=False) as img:
        assert not img.lazy
        eager = [read_patch(img, grid, i, 1, [0, 3]) for i in range(grid.n_patches)]
    for a, b in zip(lazy, eager):
        np.testing.assert_array_equal(a, b)


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
            model_input(img, 0, [1, 2], aggregation="sum")
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
