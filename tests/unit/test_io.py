"""maskworks.io: round trips, metadata other tools write, atomic writes, errors, block iteration."""

import json
import os

import numpy as np
import pytest

from maskworks.io import (
    InputError,
    atomic_path,
    create_volume,
    format_of,
    iter_blocks,
    n_blocks,
    read_volume,
    strip_extension,
    write_json,
    write_volume,
)
from maskworks.io import volumes as volumes_mod

VS = (40.0, 16.0, 8.0)  # anisotropic (z, y, x) so that axis-order mistakes show
ORIGIN = (1.0, 2.0, 3.0)
SHAPE = (3, 5, 7)  # z = 3 would pass for RGB planes if a writer guessed


def sample(dtype, shape=SHAPE):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    hi = {"uint8": 256, "uint16": 65536, "int32": 70000}[np.dtype(dtype).name]
    return rng.integers(0, hi, size=shape).astype(dtype)


def leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".mw-") or p == ".maskworks.lock"]


FORMAT_CASES = [
    # ext, dtypes kept, keeps voxel size, keeps unit and origin
    (".mrc", ["uint8", "uint16", "float32"], True, False),
    (".rec", ["uint8", "float32"], True, False),
    (".tif", ["uint8", "uint16", "float32", "int32"], True, True),
    (".tiff", ["uint16"], True, True),
    (".zarr", ["uint8", "uint16", "float32", "int32"], True, True),
    (".nrrd", ["uint8", "uint16", "float32", "int32"], True, True),
    (".nii.gz", ["uint8", "uint16", "float32", "int32"], True, True),
    (".npy", ["uint8", "uint16", "float32", "int32"], False, False),
]


@pytest.mark.parametrize(
    "ext, dtype, keeps_vs, keeps_meta",
    [(ext, dt, vs, meta) for ext, dts, vs, meta in FORMAT_CASES for dt in dts],
)
def test_round_trip_keeps_data_dtype_and_geometry(tmp_path, ext, dtype, keeps_vs, keeps_meta):
    a = sample(dtype)
    path = tmp_path / f"vol{ext}"
    assert write_volume(path, a, VS, unit="nanometer", origin=ORIGIN) == path
    v = read_volume(path)
    assert v.shape == a.shape and v.dtype == a.dtype and v.path == path
    np.testing.assert_array_equal(v.numpy(), a)
    if ext in (".mrc", ".rec"):  # MRC stores angstroms
        assert v.unit == "angstrom"
        assert v.voxel_size == pytest.approx([10 * s for s in VS])
        assert v.origin == pytest.approx([10 * o for o in ORIGIN])
    elif keeps_vs:
        assert v.voxel_size == pytest.approx(VS)
    if keeps_meta:
        assert v.unit == "nanometer" and v.origin == pytest.approx(ORIGIN)
    if not keeps_vs:
        assert v.voxel_size == (1.0, 1.0, 1.0) and v.unit is None
    assert leftovers(tmp_path) == []


def test_mrc_nanometre_voxel_size_reads_back_in_angstrom(tmp_path):
    import mrcfile

    write_volume(tmp_path / "a.mrc", np.zeros((2, 3, 4), np.float32), 1.5, unit="nanometer")
    assert read_volume(tmp_path / "a.mrc").voxel_size == pytest.approx((15.0, 15.0, 15.0))
    with mrcfile.open(tmp_path / "a.mrc") as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(15.0)


def test_mrc_uint8_mask_stays_one_byte_and_imod_reads_it_unsigned(tmp_path):
    import mrcfile

    a = sample("uint8")
    write_volume(tmp_path / "m.mrc", a, VS)
    with mrcfile.open(tmp_path / "m.mrc") as mrc:
        assert int(mrc.header.mode) == 0  # one byte per voxel, not widened to mode 6
    lazy = read_volume(tmp_path / "m.mrc", lazy=True)
    assert lazy.dtype == np.uint8
    np.testing.assert_array_equal(lazy.numpy(), a)
    raw = (tmp_path / "m.mrc").read_bytes()
    stamp, flags = np.frombuffer(raw[152:160], "<i4")
    assert stamp == 1146047817 and flags & 1 == 0  # IMOD: unsigned bytes


def test_mrc_labels_are_narrowed_and_too_large_labels_raise(tmp_path):
    labels = np.array([[[0, 1], [2, 60000]]], np.int32)
    write_volume(tmp_path / "ok.mrc", labels)
    v = read_volume(tmp_path / "ok.mrc")
    assert v.dtype == np.uint16
    np.testing.assert_array_equal(v.numpy(), labels)
    labels[0, 0, 0] = 70000
    with pytest.raises(InputError, match="big.mrc.*70000"):
        write_volume(tmp_path / "big.mrc", labels)
    assert os.listdir(tmp_path) == ["ok.mrc"]


@pytest.mark.parametrize("ext", [".tif", ".npy", ".zarr"])
def test_two_d_images_round_trip(tmp_path, ext):
    a = sample("uint16", (5, 7))
    write_volume(tmp_path / f"im{ext}", a, (0.5, 0.25), unit="micrometer")
    v = read_volume(tmp_path / f"im{ext}", ndim=2)
    assert v.ndim == 2 and v.dtype == a.dtype
    np.testing.assert_array_equal(v.numpy(), a)
    if ext != ".npy":
        assert v.voxel_size == pytest.approx((0.5, 0.25)) and v.unit == "micrometer"


def test_tiff_is_written_as_grey_z_pages(tmp_path):
    import tifffile

    for shape in [(3, 5, 7), (4, 5, 3)]:  # neither may turn into RGB planes or RGB pixels
        a = sample("uint8", shape)
        write_volume(tmp_path / "t.tif", a, VS)
        with tifffile.TiffFile(tmp_path / "t.tif") as tif:
            assert len(tif.pages) == shape[0]
            assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
            assert tif.pages[0].shape == shape[1:]
        np.testing.assert_array_equal(read_volume(tmp_path / "t.tif").numpy(), a)


# ----------------------------------------------------------------------------- Zarr


def test_ome_zarr_metadata_is_ngff_0_4(tmp_path):
    write_volume(tmp_path / "v.zarr", sample("uint8"), VS, unit="nanometer", origin=ORIGIN,
                 provenance={"stage": "test"}, ome_zarr_version="0.4")
    attrs = json.loads((tmp_path / "v.zarr" / ".zattrs").read_text())
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4"
    assert ms["axes"] == [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    ds = ms["datasets"][0]
    assert ds["path"] == "0"
    trs = ds["coordinateTransformations"]
    assert trs[0] == {"type": "scale", "scale": list(VS)}
    assert trs[1] == {"type": "translation", "translation": list(ORIGIN)}
    assert attrs["maskworks"] == {"stage": "test"}
    from ome_zarr.format import FormatV04

    FormatV04().validate_coordinate_transformations(3, 1, [trs])
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    (node,) = list(Reader(parse_url(str(tmp_path / "v.zarr")))())
    assert node.data[0].shape == SHAPE
    # the same metadata as ome_zarr's own writer gives for this level
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w", zarr_format=2)
    write_multiscales_metadata(ref, [{"path": "0", "coordinateTransformations": trs}], fmt=FormatV04(),
                               axes=ms["axes"])
    (expected,) = json.loads(json.dumps(ref.attrs.asdict()))["multiscales"]
    expected.pop("name")  # optional; maskworks leaves it out, so the bytes do not depend on the path
    assert [expected] == attrs["multiscales"]


def test_zarr_reads_lazily(tmp_path, ome_zarr_version):
    import zarr
    from conftest import chunk_file

    a = np.ones((4, 4, 4), np.uint8)
    write_volume(tmp_path / "v.zarr", a, VS, chunks=(2, 2, 2))
    v = read_volume(tmp_path / "v.zarr", lazy=True)
    # the Zarr array itself behind a reader that names the store when a chunk cannot be read
    assert isinstance(v.data._array, zarr.Array) and v.data.chunks == (2, 2, 2)
    # a chunk removed after opening reads as the fill value: nothing had been loaded yet
    os.remove(chunk_file(tmp_path / "v.zarr" / "0", (0, 0, 0)))
    assert v.numpy()[:2, :2, :2].sum() == 0 and v.numpy().sum() == 64 - 8


def test_create_volume_writes_zarr_block_wise(tmp_path):
    import zarr

    shape = (6, 5, 4)
    target = tmp_path / "b.zarr"
    with create_volume(target, shape, np.int32, VS, unit="nanometer", chunks=(2, 5, 4)) as out:
        assert isinstance(out, zarr.Array)
        assert not target.exists()  # appears only on success
        for block in iter_blocks(shape, (2, 5, 4)):
            out[block.inner] = block.inner[0].start
    v = read_volume(tmp_path / "b.zarr")
    assert v.dtype == np.int32 and v.voxel_size == pytest.approx(VS)
    np.testing.assert_array_equal(v.numpy()[:, 0, 0], [0, 0, 2, 2, 4, 4])
    assert leftovers(tmp_path) == []


def test_ome_zarr_from_ome_zarr_writer(tmp_path):
    from ome_zarr.writer import write_image

    a = sample("uint16", (4, 6, 8))
    write_image(a, str(tmp_path / "o.zarr"), scale_factors=None, axes="zyx",
                scale={"z": 0.04, "y": 0.016, "x": 0.008}, axes_units={a: "micrometer" for a in "zyx"})
    v = read_volume(tmp_path / "o.zarr", lazy=True)
    assert v.voxel_size == pytest.approx((0.04, 0.016, 0.008)) and v.unit == "micrometer"
    np.testing.assert_array_equal(v.numpy(), a)


def test_ngff_transformations_compose_dataset_first(tmp_path):
    import zarr

    root = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    root.create_array("s0", data=np.zeros((2, 2, 2), np.uint8))
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 2.0, 2.0]},
            {"type": "translation", "translation": [1.0, 1.0, 1.0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [10.0, 10.0, 10.0]}],
    }]
    v = read_volume(tmp_path / "g.zarr")
    assert v.voxel_size == pytest.approx((20.0, 20.0, 20.0))
    assert v.origin == pytest.approx((10.0, 10.0, 10.0))


# ----------------------------------------------------------------------------- other writers


@pytest.mark.parametrize("unit, expected", [("nm", "nanometer"), ("micron", "micrometer"),
                                            ("\\u00B5m", "micrometer")])
def test_imagej_hyperstack_tiff(tmp_path, unit, expected):
    import tifffile

    a = sample("uint16")
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / VS[2], 1 / VS[1]),
                     metadata={"spacing": VS[0], "unit": unit, "axes": "ZYX"})
    v = read_volume(tmp_path / "ij.tif", ndim=3)
    assert v.voxel_size == pytest.approx(VS) and v.unit == expected
    np.testing.assert_array_equal(v.numpy(), a)


def test_nrrd_with_space_directions_as_mitk_writes(tmp_path):
    import nrrd

    a = sample("uint8")
    header = {  # NRRD lists axes fastest first: x, y, z
        "space": "left-posterior-superior",
        "space directions": np.array([[VS[2], 0, 0], [0, VS[1], 0], [0, 0, VS[0]]]),
        "space origin": np.array(ORIGIN[::-1]),
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
    }
    nrrd.write(str(tmp_path / "m.nrrd"), np.asfortranarray(a.transpose(2, 1, 0)), header)
    v = read_volume(tmp_path / "m.nrrd")
    assert v.shape == SHAPE
    assert v.voxel_size == pytest.approx(VS) and v.origin == pytest.approx(ORIGIN)
    np.testing.assert_array_equal(v.numpy(), a)


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("ext", [".zarr", ".tif", ".mrc"])
def test_failed_create_volume_leaves_nothing(tmp_path, ext):
    with pytest.raises(RuntimeError, match="boom"):
        with create_volume(tmp_path / f"c{ext}", (4, 4, 4), np.uint8, VS, chunks=(2, 2, 2)) as out:
            out[:2] = 1
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", [".zarr", ".nrrd"])
def test_failed_rewrite_leaves_existing_target_unchanged(tmp_path, ext, monkeypatch):
    path = tmp_path / f"e{ext}"
    a = sample("uint8")
    write_volume(path, a, VS)

    def broken(tmp, *args):
        tmp.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setitem(volumes_mod._WRITERS, "nrrd", broken)
    monkeypatch.setattr(volumes_mod, "_copy_blockwise", _fail_copy)
    with pytest.raises(OSError, match="disk full"):
        write_volume(path, np.zeros((2, 2, 2), np.uint8), 3.0)
    v = read_volume(path)
    np.testing.assert_array_equal(v.numpy(), a)
    assert v.voxel_size == pytest.approx(VS)
    assert sorted(os.listdir(tmp_path)) == [path.name]


def _fail_copy(src, dst):
    dst[:1] = 7
    raise OSError("disk full")


def test_rewrite_replaces_a_zarr_directory(tmp_path, ome_zarr_version):
    from conftest import chunk_file

    path = tmp_path / "r.zarr"
    write_volume(path, np.ones((8, 8, 8), np.uint8), VS, chunks=(2, 2, 2))
    write_volume(path, np.full((2, 3, 4), 5, np.uint16), 2.0)
    v = read_volume(path)
    assert v.shape == (2, 3, 4) and v.dtype == np.uint16 and v.voxel_size == (2.0, 2.0, 2.0)
    chunks = [p for p in (path / "0").rglob("*") if p.is_file() and p.name not in (".zarray", ".zattrs", "zarr.json")]
    assert chunks == [chunk_file(path / "0", (0, 0, 0))]  # no stale chunks
    assert os.listdir(tmp_path) == ["r.zarr"]


def test_atomic_path_and_write_json(tmp_path):
    target = tmp_path / "sub" / "x.txt"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise ValueError
    assert not (tmp_path / "sub").exists()  # nothing left, not even the folder the write made
    write_json(tmp_path / "s.json", {"n": np.int64(3), "f": np.float32(0.5), "a": np.arange(2)})
    assert json.loads((tmp_path / "s.json").read_text()) == {"n": 3, "f": 0.5, "a": [0, 1]}


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nothing.mrc"):
        read_volume(tmp_path / "nothing.mrc")


def test_unknown_extension(tmp_path):
    (tmp_path / "v.xyz").write_text("?")
    with pytest.raises(InputError, match=r"v\.xyz.*extension"):
        read_volume(tmp_path / "v.xyz")
    with pytest.raises(InputError, match=r"w\.xyz"):
        write_volume(tmp_path / "w.xyz", np.zeros((2, 2, 2)))


@pytest.mark.parametrize("name", ["bad.mrc", "bad.tif", "bad.nrrd", "bad.nii.gz", "bad.npy"])
def test_corrupt_file(tmp_path, name):
    (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        read_volume(tmp_path / name)


def test_two_d_where_three_d_needed_and_squeezing(tmp_path):
    write_volume(tmp_path / "im.tif", np.zeros((5, 6), np.uint8))
    with pytest.raises(InputError, match=r"im\.tif.*\(5, 6\).*3-D"):
        read_volume(tmp_path / "im.tif", ndim=3)
    write_volume(tmp_path / "one.npy", np.zeros((1, 5, 6), np.uint8))
    assert read_volume(tmp_path / "one.npy", ndim=2).shape == (5, 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, bad):
    a = np.ones((4, 4, 4), np.float32)
    a[1, 2, 3] = bad
    write_volume(tmp_path / "f.npy", a)
    with pytest.raises(InputError, match=r"f\.npy.*1 NaN/Inf.*\(1, 2, 3\)"):
        read_volume(tmp_path / "f.npy")
    unchecked = read_volume(tmp_path / "f.npy", check_finite=False).numpy()
    assert np.count_nonzero(~np.isfinite(unchecked)) == 1
    write_volume(tmp_path / "f.zarr", a, chunks=(2, 2, 2))
    with pytest.raises(InputError, match=r"f\.zarr.*1 NaN/Inf.*\(1, 2, 3\)"):
        read_volume(tmp_path / "f.zarr", lazy=True)


# ----------------------------------------------------------------------------- names and blocks


def test_format_of_and_strip_extension(tmp_path):
    assert format_of("a/b.ome.zarr") == "zarr" and format_of("p.NII.GZ") == "nifti"
    assert format_of("x.rec") == "mrc" and format_of("x.tiff") == "tiff"
    assert strip_extension("p3.nii.gz") == "p3" and strip_extension("t.ome.zarr") == "t"
    assert strip_extension("run.1.mrc") == "run.1"


@pytest.mark.parametrize(
    "shape, chunks, halo",
    [((10, 7, 5), (4, 3, 5), 2), ((9, 9), (4, 0), (1, 3)), ((5, 6, 7), None, 1)],
)
def test_iter_blocks_covers_the_shape_once(shape, chunks, halo):
    count = np.zeros(shape, np.int32)
    index = np.arange(np.prod(shape)).reshape(shape)
    blocks = list(iter_blocks(shape, chunks, halo))
    assert len(blocks) == n_blocks(shape, chunks)
    halos = (halo,) * len(shape) if np.isscalar(halo) else halo
    for b in blocks:
        count[b.inner] += 1
        for o, i, h, s in zip(b.outer, b.inner, halos, shape, strict=True):
            assert o.start == max(0, i.start - h) and o.stop == min(s, i.stop + h)
        np.testing.assert_array_equal(index[b.outer][b.crop], index[b.inner])
    assert (count == 1).all()


def test_uint8_mrc_header_statistics_are_unsigned(tmp_path):
    import mrcfile

    data = np.full((4, 5, 6), 200, np.uint8)
    data[0, 0, 0] = 10
    write_volume(tmp_path / "u8.mrc", data, 10.0, unit="angstrom")
    with mrcfile.open(tmp_path / "u8.mrc") as mrc:
        assert (mrc.header.dmin, mrc.header.dmax) == (10.0, 200.0)
        assert float(mrc.header.dmean) == pytest.approx(data.mean(), rel=1e-5)
