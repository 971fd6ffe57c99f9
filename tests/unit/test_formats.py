"""The formats labs have today, written by the tools that write them (ome-zarr-py, ngff-zarr, zarr-python,
h5py, tensorstore, tifffile), each read by maskworks with the right axes, voxel size, origin and level,
and each giving the texture mask the same array gives as a plain ``.npy``; maskworks' own outputs
checked by ome-zarr-models and opened by napari's OME-Zarr reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maskworks.cli import main
from maskworks.io import InputError, read_volume, write_volume
from maskworks.io.formats import local_path, split_hdf5

zarr = pytest.importorskip("zarr")
pytestmark = pytest.mark.skipif(int(zarr.__version__.split(".")[0]) < 3, reason="the zarr 3 environment's formats")

SHAPE = (24, 48, 40)  # z, y, x: no two sides alike, so a transposition shows
VS = (40.0, 8.0, 4.0)  # nm, anisotropic
ORIGIN = (400.0, 80.0, 40.0)


@pytest.fixture(scope="module")
def volume():
    from maskworks.demo import make_em_volume

    image, _ = make_em_volume(shape=SHAPE, seed=4)
    return image


def _level1(a):
    """A 2x (y, x) nearest-neighbour level 1 (what the writers that are handed their levels get)."""
    return a[:, ::2, ::2]


def _stored(path, level_path, order=None):
    """A level exactly as the writer stored it (read with zarr itself), in (z, y, x) order."""
    data = np.asarray(zarr.open_array(str(path / level_path), mode="r")[...])
    data = data.reshape(data.shape[-3:]) if data.ndim > 3 else data
    return data.transpose(order) if order else data


# ----------------------------------------------------------------------------- writers of each format


def ome_zarr_py(version):
    def write(path, a):
        from ome_zarr.format import FormatV04, FormatV05
        from ome_zarr.scale import Methods
        from ome_zarr.writer import write_image

        group = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
        write_image(a, group, fmt=FormatV05() if version == "0.5" else FormatV04(), axes="zyx",
                    scale_factors=[{"z": 1, "y": 2, "x": 2}], method=Methods.NEAREST,
                    scale=dict(zip("zyx", VS)), axes_units={k: "nanometer" for k in "zyx"})
        return path, a, VS, (0.0, 0.0, 0.0), _stored(path, "s1")
    return write


def ngff_zarr(version, dims):
    def write(path, a):
        import ngff_zarr as nz

        data = a.transpose(2, 1, 0) if dims == "xyz" else a[None, None] if dims == "tczyx" else a
        names = list(dims)
        scale = {**dict(zip("zyx", VS)), "t": 1.0, "c": 1.0}
        trans = {**dict(zip("zyx", ORIGIN)), "t": 0.0, "c": 0.0}
        image = nz.to_ngff_image(data, dims=names, scale={d: scale[d] for d in names},
                                 translation={d: trans[d] for d in names},
                                 axes_units={d: "nanometer" for d in names if d in "zyx"})
        ms = nz.to_multiscales(image, scale_factors=[{"z": 1, "y": 2, "x": 2}],
                               method=nz.Methods.DASK_IMAGE_NEAREST)
        nz.to_ngff_zarr(str(path), ms, version=version)  # ngff-zarr stores the axes in z, y, x order
        return path, a, VS, ORIGIN, _stored(path, "scale1/image")
    return write


def xyz_ome_zarr(path, a):
    """An OME-Zarr 0.4 image whose axes are x, y, z (legal in NGFF; the writers above all normalise to
    z, y, x), two levels, with a translation: written with zarr-python and its NGFF metadata."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for level, data in enumerate((a, _level1(a))):
        root.create_array(str(level), data=np.ascontiguousarray(data.transpose(2, 1, 0)), chunks=(16, 16, 8))
        f = 2 ** level
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [VS[2] * f, VS[1] * f, VS[0]]},
            {"type": "translation", "translation": list(ORIGIN[::-1])}]})
    root.attrs["multiscales"] = [{"version": "0.4", "datasets": datasets,
                                  "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "xyz"]}]
    return path, a, VS, ORIGIN, _level1(a)


def zarr_v3_sharded(path, a):
    arr = zarr.create_array(str(path), shape=a.shape, chunks=(8, 16, 8), shards=(16, 32, 16), dtype=a.dtype,
                            zarr_format=3)
    arr[...] = a
    return path, a, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), None


def bioformats2raw(path, a):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    write_image(a, root.create_group("0"), fmt=FormatV04(), axes="zyx", scale_factors=[],
                scale=dict(zip("zyx", VS)), axes_units={k: "nanometer" for k in "zyx"})
    root.create_group("OME").attrs["series"] = ["0"]
    return path, a, VS, (0.0, 0.0, 0.0), None


def hdf5_cremi(path, a):
    import h5py

    path = path.with_suffix(".h5")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("volumes/raw", data=a, chunks=(8, 16, 8), compression="gzip")
        ds.attrs["resolution"] = VS
        ds.attrs["offset"] = ORIGIN
    return f"{path}:/volumes/raw", a, VS, ORIGIN, None


def hdf5_ilastik(path, a):
    import h5py

    path = path.with_suffix(".h5")
    with h5py.File(path, "w") as f:  # ilastik: axistags z y x c, element size in micrometres
        ds = f.create_dataset("exported_data", data=a[..., None])
        ds.attrs["axistags"] = json.dumps({"axes": [{"key": k, "typeFlags": 2} for k in "zyx"] + [
            {"key": "c", "typeFlags": 1}]})
        ds.attrs["element_size_um"] = [v / 1000 for v in VS]
    return path, a, tuple(v / 1000 for v in VS), (0.0, 0.0, 0.0), None


def n5_tensorstore(path, a):
    import tensorstore as ts

    path = path.with_suffix(".n5")
    for level, data in ((0, a), (1, _level1(a))):
        store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path / f"s{level}")},
                         "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": [16, 16, 8],
                                      "dataType": "uint8", "compression": {"type": "gzip"}}, "create": True}).result()
        store[...] = data.transpose(2, 1, 0)
        attrs_file = path / f"s{level}" / "attributes.json"
        attrs = json.loads(attrs_file.read_text())
        attrs["downsamplingFactors"] = [2 ** level, 2 ** level, 1]
        attrs_file.write_text(json.dumps(attrs))
    (path / "attributes.json").write_text(json.dumps({"n5": "2.5.0", "pixelResolution": {
        "dimensions": list(VS[::-1]), "unit": "nm"}, "scales": [[1, 1, 1], [2, 2, 1]]}))
    return path, a, VS, (0.0, 0.0, 0.0), _level1(a)


def precomputed_tensorstore(path, a):
    import tensorstore as ts

    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
                     "multiscale_metadata": {"data_type": "uint8", "num_channels": 1, "type": "image"},
                     "scale_metadata": {"size": list(a.shape[::-1]), "resolution": list(VS[::-1]),
                                        "voxel_offset": [10, 10, 10], "chunk_size": [16, 16, 8], "encoding": "raw"},
                     "create": True}).result()
    store[ts.d[:].translate_to[0]][..., 0] = a.transpose(2, 1, 0)
    return path, a, VS, tuple(10.5 * v for v in VS), None  # the centre of voxel 10


def tiff_slices(path, a):
    import tifffile

    path = path.with_name("slices")
    path.mkdir()
    for z, plane in enumerate(a):  # s1.tif ... s24.tif: natural order, not s1, s10, s11, ...
        tifffile.imwrite(path / f"s{z + 1}.tif", plane, resolution=(1 / VS[2], 1 / VS[1]))
    return path, a, (1.0, VS[1], VS[2]), (0.0, 0.0, 0.0), None


def tiled_bigtiff(path, a):
    import tifffile

    path = path.with_suffix(".tif")
    tifffile.imwrite(path, a, bigtiff=True, tile=(16, 16), compression="zlib",
                     metadata={"axes": "ZYX", "voxel_size": list(VS), "unit": "nanometer"})
    return path, a, VS, (0.0, 0.0, 0.0), None


WRITERS = {
    "ome-zarr-py 0.5": ome_zarr_py("0.5"), "ome-zarr-py 0.4": ome_zarr_py("0.4"),
    "ngff-zarr 0.5 zyx": ngff_zarr("0.5", "zyx"), "ngff-zarr 0.4 xyz": ngff_zarr("0.4", "xyz"),
    "ngff-zarr 0.5 tczyx": ngff_zarr("0.5", "tczyx"), "OME-Zarr 0.4 axes x,y,z": xyz_ome_zarr,
    "zarr v3 sharded": zarr_v3_sharded,
    "bioformats2raw": bioformats2raw, "hdf5 (CREMI)": hdf5_cremi, "hdf5 (ilastik)": hdf5_ilastik,
    "n5 (tensorstore)": n5_tensorstore, "precomputed (tensorstore)": precomputed_tensorstore,
    "tiff slices": tiff_slices, "tiled BigTIFF": tiled_bigtiff,
}


@pytest.fixture(params=sorted(WRITERS), scope="module")
def written(request, volume, tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    path, a, vs, origin, level1 = WRITERS[request.param](folder / "vol.zarr", volume)
    return request.param, path, a, vs, origin, level1


def test_each_format_reads_with_its_axes_geometry_and_levels(written):
    """``level1``: the writer's level 1 as stored (None: one level)."""
    name, path, a, vs, origin, level1 = written
    vol = read_volume(path, ndim=3, lazy=True)
    assert vol.shape == a.shape, name
    assert vol.voxel_size == pytest.approx(vs), name
    assert vol.origin == pytest.approx(origin), name
    np.testing.assert_array_equal(vol.numpy(), a)
    np.testing.assert_array_equal(np.asarray(vol.data[3:7, 5:20, 2:9]), a[3:7, 5:20, 2:9])  # a region alone
    whole = read_volume(path, ndim=3)  # read into memory: the same
    np.testing.assert_array_equal(whole.numpy(), a)
    if level1 is not None:
        one = read_volume(path, ndim=3, level=1, lazy=True)
        assert one.voxel_size == pytest.approx((vs[0], 2 * vs[1], 2 * vs[2])), name
        np.testing.assert_array_equal(one.numpy(), level1)
    with pytest.raises(InputError, match="level") as err:
        read_volume(path, level=1 if level1 is None else 2)
    assert str(split_hdf5(local_path(path))[0]) in str(err.value)


def _mask(capsys, tmp_path, source, *extra):
    out = tmp_path / f"m{len(list(tmp_path.iterdir()))}.zarr"
    assert main(["texture-mask", str(source), str(out), "--block-size", "16", *extra]) == 0, capsys.readouterr().err
    return read_volume(out)


def test_each_format_gives_the_mask_of_the_same_array_as_npy(written, tmp_path, capsys):
    name, path, a, vs, origin, level1 = written
    np.save(tmp_path / "same.npy", a)
    expected = _mask(capsys, tmp_path, tmp_path / "same.npy").numpy()
    got = _mask(capsys, tmp_path, path)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert got.voxel_size == pytest.approx(vs) and got.origin == pytest.approx(origin)
    if level1 is not None:
        np.save(tmp_path / "level1.npy", level1)
        at1 = _mask(capsys, tmp_path, path, "--level", "1")
        np.testing.assert_array_equal(at1.numpy(), _mask(capsys, tmp_path, tmp_path / "level1.npy").numpy())
        assert at1.voxel_size == pytest.approx((vs[0], 2 * vs[1], 2 * vs[2]))


def test_a_channel_axis_with_several_channels_is_refused_naming_the_axes(tmp_path, volume):
    import ngff_zarr as nz

    data = np.stack([volume, volume])
    image = nz.to_ngff_image(data, dims=["c", "z", "y", "x"])
    nz.to_ngff_zarr(str(tmp_path / "c.zarr"), nz.to_multiscales(image), version="0.5")
    with pytest.raises(Exception, match=r"axes czyx"):
        read_volume(tmp_path / "c.zarr", ndim=3)


# ----------------------------------------------------------------------------- outputs as labels


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_masks_are_multiscale_labels_that_validators_and_napari_accept(tmp_path, volume, version, capsys):
    from ome_zarr_models import v04, v05

    big = np.tile(volume, (1, 8, 8))  # 24 x 384 x 320: two pyramid levels (down to <= 256 per side)
    write_volume(tmp_path / "vol.tif", big, VS, unit="nanometer")
    assert main(["--ome-zarr-version", version, "texture-mask", str(tmp_path / "vol.tif"), str(tmp_path / "m.zarr"),
                 "--block-size", "16"]) == 0, capsys.readouterr().err
    models = v05 if version == "0.5" else v04
    mask = models.ImageLabel.from_zarr(zarr.open_group(str(tmp_path / "m.zarr"), mode="r"))
    meta = mask.attributes.ome if version == "0.5" else mask.attributes
    assert len(meta.multiscales[0].datasets) == 2
    label = meta.image_label
    assert {c.label_value: c.rgba for c in label.colors}[1] and {p.label_value for p in label.properties} == {0, 1, 2}
    models.Image.from_zarr(zarr.open_group(str(tmp_path / "m_confidence.zarr"), mode="r"))  # an image, not labels
    levels = read_volume(tmp_path / "m.zarr")
    level1 = read_volume(tmp_path / "m.zarr", level=1)
    np.testing.assert_array_equal(level1.numpy(), levels.numpy()[:, ::2, ::2])  # nearest, not blurred
    assert level1.voxel_size == pytest.approx((VS[0], 2 * VS[1], 2 * VS[2]))  # z is not thinned at 40 nm
    from napari_ome_zarr import napari_get_reader

    layers = napari_get_reader(str(tmp_path / "m.zarr"))(str(tmp_path / "m.zarr"))
    assert [kind for _, _, kind in layers] == ["labels"]
    (data, meta, _), = layers
    assert [tuple(d.shape) for d in data] == [big.shape, (24, 192, 160)]
    assert list(meta["scale"])[-3:] == pytest.approx(list(VS))


def test_a_mask_made_at_level_1_is_written_back_as_a_label_image_of_its_input(tmp_path, volume, capsys):
    """texture-mask at level 1 of an OME-Zarr 0.5 image (ome-zarr-py), post-processed into
    image.zarr/labels/tissue at level 0: the label image has the image's levels, ome-zarr-models
    validates the image with its labels, napari opens the image and its labels layer."""
    from ome_zarr_models import v05

    path, *_ = ome_zarr_py("0.5")(tmp_path / "img.zarr", volume)
    assert main(["texture-mask", str(path), str(tmp_path / "m1.zarr"), "--level", "1", "--block-size", "16"]) == 0
    assert read_volume(tmp_path / "m1.zarr").shape == _level1(volume).shape
    assert main(["postprocess-mask", str(tmp_path / "m1.zarr"), str(path / "labels" / "tissue"),
                 "--full-resolution-of", str(path), "--image", str(path), "--stats", str(tmp_path / "s.json"),
                 "--qc", str(tmp_path / "qc.png")]) == 0, capsys.readouterr().err
    group = zarr.open_group(str(path), mode="r")
    v05.Image.from_zarr(group)
    v05.ImageLabel.from_zarr(group["labels"]["tissue"])
    assert dict(group["labels"].attrs)["ome"]["labels"] == ["tissue"]
    full = read_volume(path / "labels" / "tissue")
    assert full.shape == volume.shape and full.voxel_size == pytest.approx(VS)
    coarse = read_volume(tmp_path / "m1.zarr").numpy()
    from maskworks.em.postprocess import postprocess_mask

    expected, _ = postprocess_mask(coarse)
    np.testing.assert_array_equal(full.numpy(), np.repeat(np.repeat(expected, 2, axis=1), 2, axis=2))
    from napari_ome_zarr import napari_get_reader

    kinds = [kind for _, _, kind in napari_get_reader(str(path))(str(path))]
    assert kinds == ["image", "labels"]


def test_level_1_has_the_centre_of_its_first_voxel_and_the_users_voxel_size_times_its_factors(tmp_path, volume):
    """N5 and pyramidal TIFF levels store no origin of their own: level 1's first voxel is the mean of
    level 0's first two along y and x.  A voxel size the user gives is level 0's."""
    import tifffile

    n5, *_ = n5_tensorstore(tmp_path / "v", volume)
    one = read_volume(n5, level=1, lazy=True)
    assert one.origin == pytest.approx((0.0, VS[1] / 2, VS[2] / 2))
    assert read_volume(n5, level=1, voxel_size=(30, 6, 3)).voxel_size == pytest.approx((30, 12, 6))
    assert read_volume(n5, voxel_size=(30, 6, 3)).voxel_size == pytest.approx((30, 6, 3))
    tif = tmp_path / "pyramid.ome.tif"  # a pyramidal OME-TIFF: level 1 in SubIFDs
    with tifffile.TiffWriter(tif, bigtiff=True) as w:
        w.write(volume, subifds=1, tile=(16, 16), metadata={
            "axes": "ZYX", "PhysicalSizeZ": VS[0], "PhysicalSizeY": VS[1], "PhysicalSizeX": VS[2],
            "PhysicalSizeZUnit": "nm", "PhysicalSizeYUnit": "nm", "PhysicalSizeXUnit": "nm"})
        w.write(volume[:, ::2, ::2], subfiletype=1, tile=(16, 16))
    for lazy in (True, False):  # read by tiles or whole: the same level, the same geometry
        level = read_volume(tif, level=1, lazy=lazy)
        np.testing.assert_array_equal(level.numpy(), volume[:, ::2, ::2])
        assert level.voxel_size == pytest.approx((VS[0], 2 * VS[1], 2 * VS[2]))
        assert level.origin == pytest.approx((0.0, VS[1] / 2, VS[2] / 2))


def test_a_local_precomputed_url_and_a_slice_beyond_the_folder(tmp_path, volume):
    path, *_ = precomputed_tensorstore(tmp_path / "pc", volume)
    url = read_volume(f"precomputed://file://{path}", ndim=3, lazy=True)
    np.testing.assert_array_equal(url.numpy(), volume)
    slices, *_ = tiff_slices(tmp_path / "x", volume)
    stack = read_volume(slices, ndim=3, lazy=True)
    with pytest.raises(InputError, match="slice 24 of a folder of 24"):
        stack.data[24]


def test_an_hdf5_unit_attribute_says_the_unit_of_resolution(tmp_path, volume):
    import h5py

    with h5py.File(tmp_path / "v.h5", "w") as f:
        ds = f.create_dataset("raw", data=volume)
        ds.attrs["resolution"] = (0.04, 0.008, 0.004)
        ds.attrs["unit"] = "micrometer"
    vol = read_volume(tmp_path / "v.h5")
    assert vol.unit == "micrometer" and vol.voxel_size == pytest.approx((0.04, 0.008, 0.004))


def test_a_mask_is_written_back_only_onto_the_image_it_covers(tmp_path, volume, capsys):
    """A mask made at level 1 of an image goes into that image's labels on its level-0 grid without
    naming the image again; onto an image of another extent it is refused, naming both."""
    path, *_ = ome_zarr_py("0.5")(tmp_path / "img.zarr", volume)
    assert main(["texture-mask", str(path), str(tmp_path / "m1.zarr"), "--level", "1", "--block-size", "16"]) == 0
    assert main(["postprocess-mask", str(tmp_path / "m1.zarr"), str(path / "labels" / "tissue"),
                 "--stats", str(tmp_path / "s.json"), "--qc", str(tmp_path / "qc.png")]) == 0, capsys.readouterr().err
    assert read_volume(path / "labels" / "tissue").shape == volume.shape
    other, *_ = ome_zarr_py("0.5")(tmp_path / "other.zarr", volume[:, :24])
    capsys.readouterr()
    assert main(["postprocess-mask", str(tmp_path / "m1.zarr"), str(tmp_path / "full.zarr"),
                 "--full-resolution-of", str(other), "--stats", str(tmp_path / "s2.json"),
                 "--qc", str(tmp_path / "qc2.png")]) == 2
    err = capsys.readouterr().err
    assert "along y the mask covers" in err and str(other) in err and "m1.zarr" in err
    assert not (tmp_path / "full.zarr").exists()
