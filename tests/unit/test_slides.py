"""maskworks.io.slides: the slide layouts labs have (QPTIFF, OME-Zarr, one file per channel), read lazily."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from maskworks.codex.tiling import patch_grid, read_patch
from maskworks.io import InputError
from maskworks.io.slides import channel_files, open_multichannel

NAMES = ["DAPI", "CD45", "PanCK", "CD3"]


def _slide(c=4, h=96, w=128, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, (c, h, w), dtype=np.uint16)


def _qpi_description(name, biomarker, mpp=None):
    scan = f"<ScanProfile><PixelSizeMicrons>{mpp}</PixelSizeMicrons></ScanProfile>" if mpp else ""
    return ('<?xml version="1.0" encoding="utf-16"?><PerkinElmer-QPI-ImageDescription>'
            "<DescriptionVersion>2</DescriptionVersion><ImageType>FullResolution</ImageType>"
            f"<Name>{name}</Name><Biomarker>{biomarker}</Biomarker>{scan}</PerkinElmer-QPI-ImageDescription>")


def _write_qptiff(path, data, biomarkers, mpp=None, resolution=None):
    """A QPTIFF as Akoya scanners lay it out: one tiled page per channel, each with its XML description."""
    with tifffile.TiffWriter(path) as tw:
        for k, plane in enumerate(data):
            tw.write(plane, software="PerkinElmer-QPI", description=_qpi_description(f"Opal {k}", biomarkers[k], mpp),
                     tile=(64, 64), compression="zlib", metadata=None, resolution=resolution,
                     resolutionunit="CENTIMETER" if resolution else None)


def test_qptiff_channel_names_and_pixel_size(tmp_path):
    data = _slide()
    path = tmp_path / "slide.qptiff"
    _write_qptiff(path, data, NAMES, mpp=0.4977)
    with open_multichannel(path, lazy=True) as img:
        assert img.channel_names == NAMES and img.n_channels == 4
        assert img.mpp == pytest.approx(0.4977)
        np.testing.assert_array_equal(img.region(2, slice(10, 70), slice(5, 100)), data[2, 10:70, 5:100])
    # the resolution tags win over the scan profile (pixels per centimetre: 0.5 µm = 20000 px/cm)
    _write_qptiff(path, data, NAMES, mpp=0.4977, resolution=(20000, 20000))
    with open_multichannel(path) as img:
        assert img.mpp == pytest.approx(0.5)


def test_qptiff_without_biomarker_uses_the_fluor_name(tmp_path):
    data = _slide(c=2)
    path = tmp_path / "slide.qptiff"
    with tifffile.TiffWriter(path) as tw:
        for k, plane in enumerate(data):
            desc = _qpi_description(["DAPI", "Opal 520"][k], "").replace("<Biomarker></Biomarker>", "")
            tw.write(plane, software="PerkinElmer-QPI", description=desc, metadata=None)
    with open_multichannel(path) as img:
        assert img.channel_names == ["DAPI", "Opal 520"]


@pytest.mark.parametrize("writer", ["ome-zarr-py", "ngff-zarr"])
def test_ome_zarr_slide(tmp_path, writer):
    data = _slide(h=200, w=160)
    path = tmp_path / "slide.ome.zarr"
    if writer == "ome-zarr-py":
        import zarr
        from ome_zarr.writer import write_image

        group = zarr.open_group(str(path), mode="w")
        write_image(data, group, axes="cyx", scale_factors=(2,), storage_options={"chunks": (1, 64, 64)},
                    scale={"c": 1.0, "y": 0.65, "x": 0.65},
                    axes_units={"y": "micrometer", "x": "micrometer"},
                    omero={"channels": [{"label": n, "color": "FFFFFF", "active": True,
                                                 "window": {"start": 0, "end": 4000, "min": 0, "max": 65535}}
                                                for n in NAMES]})
    else:
        import ngff_zarr

        image = ngff_zarr.to_ngff_image(data, dims=["c", "y", "x"], scale={"c": 1.0, "y": 0.65, "x": 0.65},
                                        axes_units={"y": "micrometer", "x": "micrometer"}, channel_names=NAMES)
        ngff_zarr.to_ngff_zarr(path, ngff_zarr.to_multiscales(image, scale_factors=[2], chunks=64), version="0.5")
    with open_multichannel(path) as img:
        assert img.lazy and img.n_channels == 4 and img.shape == (200, 160)
        # ngff-zarr writes no omero block: the names then come from a channel names file
        assert img.channel_names == (NAMES if writer == "ome-zarr-py" else None)
        assert img.mpp == pytest.approx(0.65)
        np.testing.assert_array_equal(img.region(3, slice(30, 170), slice(0, 97)), data[3, 30:170, :97])


def test_ome_zarr_slide_with_singleton_axes(tmp_path):
    import zarr
    from ome_zarr.writer import write_image

    data = _slide(c=3, h=64, w=64)
    path = tmp_path / "tczyx.ome.zarr"
    write_image(data[None, :, None], zarr.open_group(str(path), mode="w"), axes="tczyx", scale_factors=())
    with open_multichannel(path) as img:
        assert img.n_channels == 3 and img.shape == (64, 64) and img.channel_names is None
        np.testing.assert_array_equal(img.region(1, slice(None), slice(None)), data[1])
    deep = tmp_path / "deep.ome.zarr"
    write_image(np.zeros((2, 3, 16, 16), np.uint8), zarr.open_group(str(deep), mode="w"), axes="czyx",
                scale_factors=())
    with pytest.raises(InputError, match="z=3 planes"):
        open_multichannel(deep)


def test_one_file_per_channel_folder_and_table(tmp_path):
    data = _slide(c=11, h=80, w=90)
    folder = tmp_path / "channels"
    folder.mkdir()
    for k, plane in enumerate(data):  # natural order: ch2 before ch10
        tifffile.imwrite(folder / f"ch{k}.tif", plane, compression="zlib", tile=(32, 32),
                         resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_multichannel(folder) as img:
        assert img.channel_names == [f"ch{k}" for k in range(11)]
        assert img.n_channels == 11 and img.shape == (80, 90) and img.mpp == pytest.approx(0.5)
        grid = patch_grid(img.shape, patch_height=48, patch_width=48, overlap=0.25)
        got = [read_patch(img, grid, i, 10, [2, 3]) for i in range(grid.n_patches)]
    stacked = tmp_path / "stacked.ome.tif"
    tifffile.imwrite(stacked, data, ome=True, metadata={"axes": "CYX"})
    with open_multichannel(stacked) as img:
        want = [read_patch(img, grid, i, 10, [2, 3]) for i in range(grid.n_patches)]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)

    table = tmp_path / "panel.tsv"
    table.write_text("marker_name\tpath\nDAPI\tchannels/ch0.tif\nCD45\t" + str(folder / "ch5.tif") + "\n")
    with open_multichannel(table) as img:
        assert img.channel_names == ["DAPI", "CD45"]
        np.testing.assert_array_equal(img.region(1, slice(None), slice(None)), data[5])
    # the files a workflow must track: the folder's TIFFs in channel order, the table's listed files
    assert channel_files(folder) == [folder / f"ch{k}.tif" for k in range(11)]
    assert channel_files(table) == [tmp_path / "channels" / "ch0.tif", folder / "ch5.tif"]
    assert channel_files(stacked) == []


def test_one_file_per_channel_errors_name_the_file(tmp_path):
    folder = tmp_path / "channels"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.zeros((10, 10), np.uint16))
    tifffile.imwrite(folder / "b.tif", np.zeros((10, 12), np.uint16))
    with pytest.raises(InputError, match=r"b\.tif: \(10, 12\) pixels"):
        open_multichannel(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .tif/.tiff file"):
        open_multichannel(empty)
    table = tmp_path / "files.csv"
    table.write_text("name,where\nDAPI,a.tif\n")
    with pytest.raises(InputError, match="needs a column 'path or file'"):
        open_multichannel(table)


def test_one_file_per_channel_is_never_read_whole(tmp_path):
    """Each file may be small, the slide is not: the channels stay on disk whatever their size."""
    folder = tmp_path / "channels"
    folder.mkdir()
    for k in range(3):
        tifffile.imwrite(folder / f"c{k}.tif", _slide(c=1, seed=k)[0], compression="zlib", tile=(32, 32))
    with open_multichannel(folder) as img:
        assert img.lazy and all(im.lazy for im in img.data.images)


def test_slide_pixels_from_the_header(tmp_path):
    from maskworks.io.slides import slide_pixels

    data = _slide(h=96, w=128)
    tifffile.imwrite(tmp_path / "s.ome.tif", data, ome=True, metadata={"axes": "CYX"})
    _write_qptiff(tmp_path / "s.qptiff", data, NAMES)
    folder = tmp_path / "channels"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", data[0])
    (tmp_path / "files.csv").write_text("path\nchannels/a.tif\n")
    import zarr
    from ome_zarr.writer import write_image

    write_image(data, zarr.open_group(str(tmp_path / "s.ome.zarr"), mode="w"), axes="cyx", scale_factors=())
    for p in ("s.ome.tif", "s.qptiff", "channels", "files.csv", "s.ome.zarr"):
        assert slide_pixels(tmp_path / p) == 96 * 128, p
