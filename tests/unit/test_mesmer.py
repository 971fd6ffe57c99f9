"""The real Mesmer code path: a tiny random-weight PanopticNet with Mesmer's four heads, saved as a
Keras SavedModel, run through `maskworks segment-cells --backend mesmer` in .venv-deepcell
(as the Snakemake rule runs it).  The masks of a random model mean nothing; shapes, dtypes and
files do."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from conftest import ROOT, run
from skimage.segmentation import find_boundaries

from maskworks.codex.stages import tile_image_files
from maskworks.demo import CODEX_SLIDE, make_codex_slide

DC_PY = ROOT / ".venv-deepcell" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not DC_PY.exists(),
        reason="!!! .venv-deepcell is MISSING: the real Mesmer (DeepCell/TensorFlow) code path is NOT TESTED; "
               "build it with `make setup-deepcell` (`make test` does) !!!",
    ),
]

QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}

BUILD = """
import sys
from deepcell.model_zoo.panopticnet import PanopticNet
model = PanopticNet("mobilenetv2", input_shape=(128, 128, 2), norm_method=None,
                    num_semantic_classes=[1, 3, 1, 3], location=True, include_top=True, use_imagenet=False)
model.save(sys.argv[1], include_optimizer=False)
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesmer") / "tiny_mesmer"
    run([DC_PY, "-c", BUILD, path], env=QUIET, timeout=300)
    assert (path / "saved_model.pb").is_file()
    return path


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    data = make_codex_slide((300, 300), seed=2)
    image = d / "slide.ome.tif"
    tifffile.imwrite(image, data["image"], ome=True, metadata={"axes": "CYX", "Channel": {"Name": list(CODEX_SLIDE["channels"])}})
    tile_image_files(image, None, d / "tiles", nuclear_channel="DAPI", wholecell_channels=["CD45", "PanCK"],
                     image_mpp=0.5, patch_height=256, patch_width=256, overlap=0.1)
    return d / "tiles"


def test_cli_imports_in_the_deepcell_env():
    proc = run([DC_PY, "-c", "import sys, numpy; from maskworks.cli import main, build_parser; build_parser(); "
                "import maskworks.codex.stages, maskworks.codex.tiling, maskworks.codex.stitch, maskworks.codex.segment, maskworks.codex.repair; "
                "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules; print(numpy.__version__)"],
               timeout=120)
    assert proc.stdout.strip().startswith("1.")  # numpy < 2 there


def test_segment_cells_runs_mesmer_on_batches(tiny_model, tiles, tmp_path):
    out = tmp_path / "seg"
    with open(tiles / "patches_metadata.csv", newline="") as fh:
        informative = [int(r["patch_id"]) for r in csv.DictReader(fh) if r["is_informative"] == "True"]
    assert len(informative) >= 2
    run([DC_PY, "-m", "maskworks.cli", "segment-cells", tiles, out, "--backend", "mesmer",
         "--model-path", tiny_model, "--batch-size", "1", "--image-mpp", "0.5",
         "--preprocess-kwargs", '{"percentile": 99.5}',
         "--postprocess-kwargs-whole-cell", '{"maxima_threshold": 0.05}',
         "--postprocess-kwargs-nuclear", '{"maxima_threshold": 0.05}'], env=QUIET, timeout=300)
    assert sorted(p.name for p in out.glob("patch_*.npz")) == sorted(f"patch_{i}.npz" for i in informative)
    st = json.loads((out / "segment_stats.json").read_text())
    assert st["backend"] == "mesmer" and st["segmented"] == len(informative) and st["batch_size"] == 1
    assert st["model_path"] == str(tiny_model) and st["preprocess_kwargs"] == {"percentile": 99.5}
    assert st["postprocess_kwargs_whole_cell"] == {"maxima_threshold": 0.05}
    assert (out / "segment_qc.png").stat().st_size > 1000
    for i in informative:
        with np.load(out / f"patch_{i}.npz", allow_pickle=False) as npz:
            assert sorted(npz.files) == ["cell", "cell_boundary", "nucleus", "nucleus_boundary"]
            for key in ("cell", "nucleus"):
                lab, b = npz[key], npz[f"{key}_boundary"]
                assert lab.shape == b.shape == (256, 256) and lab.dtype.kind == "u" and b.dtype == np.uint8
                np.testing.assert_array_equal(b, find_boundaries(lab, mode="inner"))



def test_mesmer_job_states_its_device_and_refuses_a_gpu_it_cannot_use(tiny_model, tiles, tmp_path):
    common = [DC_PY, "-I", "-m", "maskworks.cli", "-v", "segment-cells", tiles, "--backend", "mesmer",
              "--model-path", tiny_model, "--image-mpp", "0.5"]
    proc = run([*common[:7], tmp_path / "cpu", *common[7:], "--device", "cpu"], env=QUIET, timeout=300)
    assert "backend mesmer on device cpu" in proc.stderr
    assert json.loads((tmp_path / "cpu" / "segment_stats.json").read_text())["device"] == "cpu"
    probe = run([DC_PY, "-c", "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"],
                env=QUIET, timeout=120)
    if probe.stdout.strip() != "0":
        pytest.skip("TensorFlow sees a GPU here")
    # what a job given a GPU is told (device cuda): a clear error, exit 2, no outputs
    proc = run([*common[:7], tmp_path / "gpu", *common[7:], "--device", "cuda"], env=QUIET, timeout=300,
               check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "this job was given a GPU, but TensorFlow 2.8.4 sees 0 GPU(s)" in proc.stderr
    assert "CUDA 11.2" in proc.stderr and not list((tmp_path / "gpu").glob("*.npz"))


LAMBDA_MODEL = """
import sys
import tensorflow as tf
inp = tf.keras.Input((128, 128, 2))
code = eval("lambda x: (__import__('pathlib').Path(%r).write_text('code from the model ran'), x)[1]" % sys.argv[2])
tf.keras.Model(inp, tf.keras.layers.Lambda(code)(inp)).save(sys.argv[1], include_optimizer=False)
"""


def test_a_model_holding_python_code_is_refused_before_it_is_loaded(tiles, tmp_path):
    """A SavedModel with a Lambda layer (marshalled Python bytecode, here writing a marker file): Keras
    runs that code when it loads the model (shown first, as the danger is real); segment-cells refuses
    the model with exit 2 and the code never runs."""
    model, marker = tmp_path / "lambda_model", tmp_path / "ran.txt"
    run([DC_PY, "-c", LAMBDA_MODEL, model, marker], env=QUIET, timeout=300)
    marker.unlink(missing_ok=True)
    run([DC_PY, "-c", f"import tensorflow as tf; tf.keras.models.load_model({str(model)!r}, compile=False)"],
        env=QUIET, timeout=300)
    assert marker.exists()  # plain Keras loading runs the model's code
    marker.unlink()
    proc = run([DC_PY, "-m", "maskworks.cli", "segment-cells", tiles, tmp_path / "seg", "--backend", "mesmer",
                "--model-path", model, "--image-mpp", "0.5", "--device", "cpu"], env=QUIET, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"model {model}: holds Lambda layer(s)" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "seg").exists()
