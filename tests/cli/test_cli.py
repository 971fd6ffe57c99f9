"""`maskworks texture-mask` and `maskworks postprocess-mask` on tiny TIFF, MRC and Zarr files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import exe, run

from maskworks.cli import main
from maskworks.io import read_volume, write_volume

SHAPE = (48, 96, 96)


@pytest.fixture(scope="module")
def em(tmp_path_factory):
    from maskworks.demo import make_em_volume

    image, truth = make_em_volume(shape=SHAPE, seed=3)
    d = tmp_path_factory.mktemp("cli")
    paths = {}
    for ext, unit, vs in [(".tif", "nanometer", (40, 16, 16)), (".mrc", "angstrom", (80, 80, 80)),
                          (".zarr", "nanometer", (30, 10, 10))]:
        paths[ext] = write_volume(d / f"vol{ext}", image, vs, unit=unit)
        write_volume(d / f"truth{ext}", truth, vs, unit=unit)
    return d, paths


@pytest.mark.parametrize("ext", [".tif", ".mrc", ".zarr"])
def test_texture_then_postprocess_on_each_format(em, ext, tmp_path):
    d, paths = em
    src = read_volume(paths[ext])
    out = tmp_path / f"mask{ext}"
    proc = run([exe("maskworks"), "texture-mask", paths[ext], out, "--block-size", "32",
                "--truth", d / f"truth{ext}"])
    assert proc.returncode == 0
    mask = read_volume(out)
    assert mask.dtype == np.uint8 and mask.shape == SHAPE
    assert mask.voxel_size == pytest.approx(src.voxel_size) and mask.unit == src.unit
    for sibling in ["mask_confidence.zarr", "mask_stats.json", "mask_qc.png"]:
        assert (tmp_path / sibling).exists(), sibling
    conf = read_volume(tmp_path / "mask_confidence.zarr")
    assert conf.dtype == np.float32 and conf.voxel_size == pytest.approx(src.voxel_size)
    stats = json.loads((tmp_path / "mask_stats.json").read_text())
    assert stats["threshold_method"] == "otsu" and 0 < stats["fraction_masked"] < 1
    assert stats["truth"]["dice"] > 0.8

    final = tmp_path / f"final{ext}"
    run([exe("maskworks"), "postprocess-mask", out, final, "--image", paths[ext],
         "--opening-radius", "1", "--grow-radius", "-1"])
    fm = read_volume(final)
    assert fm.dtype == np.uint8 and fm.voxel_size == pytest.approx(src.voxel_size)
    assert fm.numpy().sum() < mask.numpy().sum()  # eroded by one voxel
    st = json.loads((tmp_path / "final_stats.json").read_text())
    assert st["grow_radius"] == -1 and (tmp_path / "final_qc.png").stat().st_size > 1000


def test_fixed_threshold_and_voxel_size_override(em, tmp_path):
    _, paths = em
    out = tmp_path / "m.zarr"
    assert main(["texture-mask", str(paths[".tif"]), str(out), "--threshold", "0.5",
                 "--voxel-size", "8,4,4", "--unit", "nanometer", "--chunk-shape", "20,40,40"]) == 0
    v = read_volume(out)
    assert v.voxel_size == (8.0, 4.0, 4.0) and v.unit == "nanometer"
    assert json.loads((tmp_path / "m_stats.json").read_text())["threshold"] == 0.5


@pytest.mark.skipif(__import__("maskworks.backend", fromlist=["x"]).resolve_device("auto") != "cpu",
                    reason="a GPU is there")
@pytest.mark.parametrize("stage", ["texture-mask", "postprocess-mask"])
def test_cuda_without_a_gpu_fails_and_writes_nothing(em, stage, tmp_path, capsys):
    _, paths = em
    out = tmp_path / "m.zarr"
    assert main([stage, str(paths[".tif"]), str(out), "--device", "cuda"]) == 2
    assert "asks for a GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert main([stage, str(paths[".tif"]), str(out), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "m_stats.json").read_text())["device"] == "cpu"


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["texture-mask", str(tmp_path / "nope.mrc"), str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err
    assert "nope.mrc" in err and "no such file" in err
    assert not list(tmp_path.iterdir())


def test_2d_input_is_rejected_and_nothing_written(tmp_path, capsys):
    img = tmp_path / "slice.tif"
    write_volume(img, np.zeros((32, 32), np.uint8))
    assert main(["texture-mask", str(img), str(tmp_path / "o.tif")]) == 2
    assert "3-D volume is needed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slice.tif"]


def test_nan_input_is_rejected(tmp_path, capsys):
    vol = np.ones((16, 16, 16), np.float32)
    vol[3, 4, 5] = np.nan
    write_volume(tmp_path / "v.nrrd", vol)
    assert main(["texture-mask", str(tmp_path / "v.nrrd"), str(tmp_path / "o.tif")]) == 2
    err = capsys.readouterr().err
    assert "v.nrrd" in err and "NaN" in err and "(3, 4, 5)" in err


def test_bad_parameter_exits_nonzero_via_console_script(em, tmp_path):
    _, paths = em
    proc = run([exe("maskworks"), "texture-mask", paths[".tif"], tmp_path / "o.tif", "--block-size", "0"], check=False)
    assert proc.returncode == 2 and "block_size" in proc.stderr
    assert not (tmp_path / "o.tif").exists()
    proc = run([exe("maskworks"), "texture-mask", paths[".tif"], tmp_path / "o.tif", "--threshold", "high"], check=False)
    assert proc.returncode == 2 and "otsu" in proc.stderr


def test_failure_after_partial_write_leaves_nothing(em, tmp_path, monkeypatch):
    _, paths = em
    import maskworks.em.stages as stages

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stages, "save_orthoslices", broken)
    with pytest.raises(RuntimeError):
        main(["texture-mask", str(paths[".tif"]), str(tmp_path / "o.zarr")])
    assert not list(tmp_path.iterdir())


def test_each_stage_imports_only_its_arm():
    """``COMMANDS`` lists what each arm registers, so a run of one stage builds its parser from that
    arm alone; the full parser has every command once."""
    import argparse

    from maskworks.cli import ARMS, COMMANDS, build_parser

    def commands(parser):
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return set(sub.choices) - {"demo-data", "demo-summary", "demo-copick-project"}

    listed = [c for arm in ARMS for c in COMMANDS[arm]]
    assert len(listed) == len(set(listed)) and commands(build_parser()) == set(listed)
    for arm in ARMS:
        for command in COMMANDS[arm]:
            assert commands(build_parser(["-v", command, "x"])) == set(COMMANDS[arm])


def test_memory_bound_runs_write_zarr_piece_by_piece_with_the_same_result(tmp_path):
    """`--memory-mb` on both EM stages: Zarr in, Zarr out, chunked and slab-wise, and the same
    masks, stats and Dice as the unbounded runs (the bounded texture run takes more chunks)."""
    from maskworks.demo import make_em_volume

    image, truth = make_em_volume((96, 160, 160), seed=5)
    write_volume(tmp_path / "vol.zarr", image, (30, 10, 10), unit="nanometer", chunks=(16, 80, 80))
    write_volume(tmp_path / "truth.zarr", truth, (30, 10, 10), unit="nanometer")
    stats = {}
    for tag, extra in [("free", []), ("bound", ["--memory-mb", "64", "--threads", "2"])]:
        assert main(["texture-mask", str(tmp_path / "vol.zarr"), str(tmp_path / f"{tag}.zarr"),
                     "--truth", str(tmp_path / "truth.zarr"), *extra]) == 0
        assert main(["postprocess-mask", str(tmp_path / f"{tag}.zarr"), str(tmp_path / f"{tag}_final.zarr"),
                     "--grow-radius", "1", *(["--memory-mb", "24", "--threads", "2"] if extra else [])]) == 0
        stats[tag] = json.loads((tmp_path / f"{tag}_stats.json").read_text())
        stats[tag + "_final"] = json.loads((tmp_path / f"{tag}_final_stats.json").read_text())
    assert stats["bound"]["chunks"] > 1 == stats["free"]["chunks"] and stats["bound"]["memory_mb"] == 64
    assert stats["bound"]["truth"] == stats["free"]["truth"] and stats["free"]["truth"]["dice"] > 0.9
    for name in ("", "_final"):
        a, b = read_volume(tmp_path / f"free{name}.zarr"), read_volume(tmp_path / f"bound{name}.zarr")
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert b.voxel_size == pytest.approx((30, 10, 10))
    assert stats["bound_final"]["voxels_out"] == stats["free_final"]["voxels_out"]
    assert stats["bound_final"]["memory_mb"] == 24 and stats["bound_final"]["threads"] == 2


def test_scales_as_lengths_are_converted_per_axis_from_the_voxel_size(em, tmp_path):
    """On 40 x 16 x 16 nm voxels, "16nm" is 0.4 voxels along z and 1 along y and x: the run with
    lengths is the run with those three numbers, differs from the one-number default (which the
    stats warn about on voxels this anisotropic), and the stats say what each length became."""
    _, paths = em

    def texture(name, *args):
        assert main(["texture-mask", str(paths[".tif"]), str(tmp_path / f"{name}.zarr"), *args]) == 0
        stats = json.loads((tmp_path / f"{name}_stats.json").read_text())
        return read_volume(tmp_path / f"{name}.zarr").numpy(), stats

    lengths, st = texture("lengths", "--texture-sigma", "16nm", "--edge-sigma", "8 nm", "--block-size", "0.512um")
    numbers, _ = texture("numbers", "--texture-sigma", "0.4,1,1", "--edge-sigma", "0.2,0.5,0.5",
                         "--block-size", "13,32,32")
    default, st_default = texture("default", "--block-size", "32")
    np.testing.assert_array_equal(lengths, numbers)
    assert np.count_nonzero(lengths != default) > 0
    assert st["scales"] == {"texture_sigma": {"given": "16 nanometer", "voxels": [0.4, 1.0, 1.0]},
                            "edge_sigma": {"given": "8 nanometer", "voxels": [0.2, 0.5, 0.5]},
                            "block_size": {"given": "0.512 micrometer", "voxels": [13, 32, 32]}}
    assert "warnings" not in st
    warned = " ".join(st_default["warnings"])
    assert "texture_sigma=1 voxels" in warned and "anisotropy 2.5:1" in warned and "'16nm'" in warned

    # angstrom voxels (the MRC): 8 nm is one 80 A voxel on every axis, the default
    assert main(["texture-mask", str(paths[".mrc"]), str(tmp_path / "a.zarr"), "--block-size", "512nm",
                 "--texture-sigma", "8nm", "--edge-sigma", "40A"]) == 0
    assert main(["texture-mask", str(paths[".mrc"]), str(tmp_path / "b.zarr")]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "a.zarr").numpy(), read_volume(tmp_path / "b.zarr").numpy())

    # post-processing radii: a length shrinks by an ellipsoid of that physical radius
    mask = tmp_path / "numbers.zarr"
    for name, radius in [("p_len", "-32nm"), ("p_num", "-0.8,-2,-2")]:
        # (a value that starts with '-' but is not one number follows an '=')
        assert main(["postprocess-mask", str(mask), str(tmp_path / f"{name}.zarr"), f"--grow-radius={radius}",
                     "--opening-radius", "0"]) == 0
    shrunk = read_volume(tmp_path / "p_len.zarr").numpy()
    np.testing.assert_array_equal(shrunk, read_volume(tmp_path / "p_num.zarr").numpy())
    assert 0 < shrunk.sum() < numbers.sum()
    st = json.loads((tmp_path / "p_len_stats.json").read_text())
    assert st["scales"] == {"grow_radius": {"given": "-32 nanometer", "voxels": [-0.8, -2.0, -2.0]}}


@pytest.mark.parametrize("args, words", [
    (["--texture-sigma", "8 parsec"], ["texture_sigma", "8 parsec", "a length with its unit"]),
    (["--block-size", "64nm"], ["block_size=64 nanometer", "(2, 4, 4) voxels", ">= 3"]),
    (["--edge-sigma=-4nm"], ["edge_sigma", "-4nm"]),
])
def test_a_bad_length_names_the_value(em, tmp_path, capsys, args, words):
    _, paths = em
    assert main(["texture-mask", str(paths[".tif"]), str(tmp_path / "m.zarr"), *args]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not any(tmp_path.iterdir())


def test_a_length_on_a_volume_without_a_unit_is_an_error(tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).random((20, 30, 30), dtype=np.float32))
    assert main(["texture-mask", str(tmp_path / "v.npy"), str(tmp_path / "m.zarr"), "--texture-sigma", "8nm"]) == 2
    err = capsys.readouterr().err
    assert "v.npy" in err and "texture_sigma=8 nanometer" in err and "--voxel-size" in err
    assert not (tmp_path / "m.zarr").exists()
