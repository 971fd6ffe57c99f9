# Helpers for every rule: config validation, input tables, input functions,
# environment choice.  Rules themselves hold no Python beyond short params.
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

validate(config, "../config/schema.yaml")

SOFTWARE = config["software"]
SLURM = config["slurm"]
# This workflow's own source (the directory above rules/), also when it is used as a
# module from another Snakefile (workflow.basedir is then the user's directory).
SOURCE = workflow.current_basedir.join("..")
# Set here, not asserted (envvars:): this workflow provides it to the conda env builds.
SOURCE_VARIABLE = "MASKWORKS_SOURCE"


def maskworks_source():
    """What pip installs maskworks from in every conda env (envs/*.yaml: ${MASKWORKS_SOURCE}):
    this source directory, or the repository and ref of a workflow used as a github()/gitlab()
    module.  $MASKWORKS_SOURCE, when set, wins (any pip requirement, e.g. a wheel)."""
    from snakemake.sourcecache import HostingProviderFile, LocalGitFile

    if os.environ.get(SOURCE_VARIABLE):
        return os.environ[SOURCE_VARIABLE]
    if is_local_source():
        return str(Path(SOURCE.get_path_or_uri(secret_free=True)).resolve())
    if isinstance(SOURCE, HostingProviderFile):
        return f"git+https://{SOURCE.host}/{SOURCE.repo}.git@{SOURCE.ref}"
    if isinstance(SOURCE, LocalGitFile):
        return f"git+file://{os.path.abspath(SOURCE.repo_path)}@{SOURCE.ref}"
    raise WorkflowError(
        f"maskworks is used from {SOURCE}: conda envs install it from a local checkout or a "
        "github()/gitlab() module; set MASKWORKS_SOURCE to a pip requirement for it (e.g. a wheel)"
    )


def is_local_source():
    from snakemake.sourcecache import LocalGitFile, LocalSourceFile

    return isinstance(SOURCE, LocalSourceFile) and not isinstance(SOURCE, LocalGitFile)


# pip expands ${MASKWORKS_SOURCE} in the env files' pip sections when Snakemake builds them.
os.environ[SOURCE_VARIABLE] = maskworks_source()


def read_table(path, schema):
    """Read a TSV input table (comments with #), validate it and index it by name."""
    if not Path(path).is_file():
        raise ValueError(f"input table {path} does not exist (config key points at it)")
    df = pd.read_csv(path, sep="\t", comment="#", dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    df = df.apply(lambda col: col.str.strip())
    validate(df, schema)
    dup = df["name"][df["name"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: duplicate names {dup}; every row needs its own name")
    if df.empty:
        logger.warning(
            f"{path} lists no inputs yet: add one row per input (see README), or run `make demo`."
        )
    return df.set_index("name", drop=False)


EM = config["em"]
em_volumes = (
    read_table(EM["volumes"], "../config/em_volumes.schema.yaml")
    if EM["enabled"]
    else None
)


def em_row(wildcards):
    return em_volumes.loc[wildcards.name]


def em_inputs(wildcards):
    """The volume (and, when the table names one, its ground-truth mask) of an EM row."""
    row = em_row(wildcards)
    return {
        "volume": row["path"],
        **({"truth": row["truth"]} if row.get("truth") else {}),
    }


def em_geometry(wildcards):
    """Voxel size/unit from the table; empty cells mean 'take them from the file'."""
    row = em_row(wildcards)
    return {
        "voxel_size": row.get("voxel_size") or None,
        "unit": row.get("unit") or None,
    }


CRYOET = config["cryoet"]
REFINE = CRYOET["refine_membranes"]
cryoet_tomograms = (
    read_table(CRYOET["tomograms"], "../config/cryoet_tomograms.schema.yaml")
    if CRYOET["enabled"]
    else None
)


def cryoet_row(wildcards):
    return cryoet_tomograms.loc[wildcards.name]


def cryoet_inputs(wildcards):
    row = cryoet_row(wildcards)
    return {
        "tomogram": row["tomogram"],
        "segmentation": row["segmentation"],
        "centres": row["centres"],
    }


def copick_runs():
    """Runs to refine: the configured list, else every run of the copick project (sorted)."""
    if not (CRYOET["enabled"] and REFINE["copick_config"]):
        return []
    if REFINE["runs"]:
        return list(REFINE["runs"])
    try:
        from maskworks.io.copick import open_project
    except ImportError as exc:
        raise WorkflowError(
            "listing copick runs needs maskworks[core] in the Snakemake environment; "
            f"install it or list the runs in cryoet.refine_membranes.runs ({exc})"
        )
    return sorted(r.name for r in copick_root().runs)


def copick_root():
    """The copick project of the refinement, opened once per Snakemake process."""
    from maskworks.io.copick import open_project

    if "root" not in _COPICK:
        _COPICK["root"] = open_project(REFINE["copick_config"])
    return _COPICK["root"]


_COPICK = {}


def refine_inputs(wildcards):
    """The copick config and the segmentation stores refine_membranes reads for a run (when the
    project is on the local file system), so that changing them reruns the job."""
    from maskworks.io.copick import input_stores

    stores = input_stores(
        copick_root(),
        wildcards.run,
        [REFINE["org_info"], REFINE["mem_info"]],
        REFINE["voxel_size"],
    )
    return {"config": REFINE["copick_config"], "stores": stores}


def store_state(wildcards):
    """Files and newest modification time inside the input Zarr stores, as a param: Snakemake
    compares only a directory's own mtime, which rewriting a chunk inside it does not change
    (and params computed from `input` are not compared at all)."""
    state = {}
    for store in refine_inputs(wildcards)["stores"]:
        times = [
            os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(store)
            for f in files
        ]
        state[Path(store).name] = [len(times), max(times, default=0)]
    return state


def stage_params(section, drop=()):
    """A config section as a rule's params, keys sorted: Snakemake's params trigger compares
    the recorded value, so reordering keys in a config file must not rerun anything."""
    return {k: section[k] for k in sorted(section) if k not in drop}


def uses_conda():
    from snakemake.settings.types import DeploymentMethod

    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def conda_env(name):
    """The conda env file of a rule: envs/<name>.yaml, or its GPU variant envs/gpu/<name>.yaml
    (CuPy, CUDA/cuDNN for TensorFlow) when software.gpu is set."""
    return (
        f"../envs/gpu/{name}.yaml"
        if SOFTWARE["gpu"] and name != "monai"
        else f"../envs/{name}.yaml"
    )


def gpu_request(device):
    """gpu=1 for a job that will use a GPU (`device` cuda[:N], or auto with the GPU envs,
    software.gpu); `cpu`, or `auto` with the CPU envs, asks for none."""
    d = str(device)
    if d == "cpu":
        return 0
    if d == "auto":
        return int(SOFTWARE["gpu"])
    if uses_conda() and not SOFTWARE["gpu"]:
        raise WorkflowError(
            f"device: {d} needs the GPU conda envs: set software.gpu: true (or use device: auto/cpu)"
        )
    return 1


def job_device(device):
    """The device a job is told to use: a job given a GPU must use it (`auto` becomes `cuda`,
    which fails loudly where the GPU cannot be used); a job given none runs on the CPU.
    """
    d = str(device)
    if not gpu_request(d):
        return "cpu"
    return "cuda" if d == "auto" else d


def intermediate(path):
    """A full-volume float intermediate: temp() unless em.keep_intermediates keeps it."""
    return path if EM["keep_intermediates"] else temp(path)


def scaled(base):
    """A resource that grows with the attempt: a job retried after running out of memory or
    time (profiles/slurm: retries) asks for base x attempt."""
    return lambda wildcards, attempt: base * attempt


def site_resources(gpu=0):
    """Slurm account and partition from the config (slurm.*), else $SBATCH_ACCOUNT /
    $SBATCH_PARTITION; nothing when neither is set (Slurm's defaults apply).  ``gpu``: whether
    the job asks for a GPU (slurm.gpu_partition), or a function of the wildcards that says so.
    """
    account = SLURM["account"] or os.environ.get("SBATCH_ACCOUNT")
    cpu = SLURM["partition"] or os.environ.get("SBATCH_PARTITION")
    out = {"slurm_account": account}
    if callable(gpu):
        if SLURM["gpu_partition"] or cpu:
            out["slurm_partition"] = (
                lambda wildcards: (gpu(wildcards) and SLURM["gpu_partition"]) or cpu
            )
    else:
        out["slurm_partition"] = (gpu and SLURM["gpu_partition"]) or cpu
    return {k: v for k, v in out.items() if v}


def em_mask_gpu(method):
    """Whether the group em_mask of a `method` (texture | unet) mask runs where there is a GPU:
    its job that makes the mask (texture_mask or predict_unet) and its postprocess_mask job are
    submitted together, so they share one partition, the GPU one if either asks for a GPU.
    """
    maker = EM["texture_mask" if method == "texture" else "predict_unet"]["device"]
    return bool(gpu_request(maker) or gpu_request(EM["postprocess_mask"]["device"]))


def grouped_with_gpu_job(wildcards):
    """postprocess_mask is submitted with the job that made its mask (group em_mask)."""
    return em_mask_gpu(wildcards.method)


CODEX = config["codex"]
SEG = CODEX["segment_cells"]
codex_images = (
    read_table(CODEX["images"], "../config/codex_images.schema.yaml")
    if CODEX["enabled"]
    else None
)
# Where the download rule puts the Mesmer model when neither model_path nor the deepcell cache has it.
MESMER_DOWNLOAD = "resources/mesmer"
SEGMENT_GPU = gpu_request(SEG["device"]) if SEG["backend"] == "mesmer" else 0
DEEPCELL_CACHE = Path("~/.deepcell/models/MultiplexSegmentation").expanduser()


def codex_row(wildcards):
    return codex_images.loc[wildcards.name]


def codex_inputs(wildcards):
    row = codex_row(wildcards)
    return {
        "image": row["image"],
        **({"channels": row["channels"]} if row.get("channels") else {}),
    }


def codex_channels(wildcards):
    """Channel choice of a table row: nuclear name, whole-cell names, microns per pixel."""
    row = codex_row(wildcards)
    return {
        "nuclear_channel": row["nuclear_channel"],
        "wholecell_channels": [
            c.strip() for c in row["wholecell_channels"].split(",") if c.strip()
        ],
        "image_mpp": float(row["image_mpp"]) if row.get("image_mpp") else None,
    }


def deepcell_python(wildcards=None):
    """The interpreter of the DeepCell env: conda's (envs/deepcell.yaml), else software.deepcell_python,
    else .venv-deepcell of this workflow's source (`make setup-deepcell`)."""
    if uses_conda():
        return "python"
    if SOFTWARE["deepcell_python"]:
        py = Path(SOFTWARE["deepcell_python"])
        where = "software.deepcell_python"
    elif is_local_source():
        source = os.path.normpath(SOURCE.get_path_or_uri(secret_free=True))
        py = Path(source) / ".venv-deepcell" / "bin" / "python"
        where = "the workflow's .venv-deepcell"
    else:
        raise WorkflowError(
            f"the Mesmer backend needs the DeepCell environment: set software.deepcell_python "
            f"(the workflow comes from {SOURCE}), or use conda (--sdm conda)"
        )
    if not py.exists():
        raise WorkflowError(
            f"the Mesmer backend runs in the DeepCell environment, but {py} ({where}) does not exist: "
            "run `make setup-deepcell` in the maskworks checkout, set software.deepcell_python, "
            "or use conda (--sdm conda) to build envs/deepcell.yaml"
        )
    return str(py)


def segment_python(wildcards):
    """Mesmer needs TensorFlow (DeepCell env); the watershed backend runs anywhere."""
    if SEG["backend"] == "mesmer" or uses_conda():
        return deepcell_python()
    return sys.executable


def mesmer_model(wildcards):
    """Model for segment_cells: the configured path, the deepcell cache, else the download rule's."""
    if SEG["backend"] != "mesmer":
        return []
    if SEG["model_path"]:
        return SEG["model_path"]
    if DEEPCELL_CACHE.is_dir():
        return str(DEEPCELL_CACHE)
    return MESMER_DOWNLOAD


def cli_args(params):
    """Command-line options (--dashed-names) of a params dict, quoted for the shell."""
    out = []
    for key, value in sorted(params.items()):
        opt = f"--{key.replace('_', '-')}"
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(opt if value else f"--no-{opt[2:]}")
        else:
            text = (
                json.dumps(value, sort_keys=True)
                if isinstance(value, dict)
                else str(value)
            )
            out += [opt, shlex.quote(text)]
    return " ".join(out)


def segment_args(wildcards, input):
    """segment-cells options from the config (watershed parameters only for that backend)."""
    opts = {
        k: v for k, v in SEG.items() if k not in ("watershed", "model_path", "device")
    }
    opts["device"] = job_device(SEG["device"]) if SEG["backend"] == "mesmer" else "cpu"
    if SEG["backend"] == "watershed":
        opts.update(SEG["watershed"])
        for k in (
            "preprocess_kwargs",
            "postprocess_kwargs_whole_cell",
            "postprocess_kwargs_nuclear",
        ):
            opts.pop(k)
    else:
        opts["model_path"] = input.model
    opts["image_mpp"] = codex_channels(wildcards)["image_mpp"]
    return cli_args(opts)


UNET = EM["train_unet"]


def unet_training_inputs(wildcards):
    """Training pairs: table rows with a truth (all, or those listed) and/or patch folders."""
    names = list(UNET["training"]) or [n for n, t in em_volumes["truth"].items() if t]
    missing = [
        n for n in names if n not in em_volumes.index or not em_volumes.loc[n, "truth"]
    ]
    if missing:
        raise WorkflowError(
            f"em.train_unet.training names {missing}: not rows of {EM['volumes']} with a truth"
        )
    out = {
        "images": [em_volumes.loc[n, "path"] for n in names],
        "labels": [em_volumes.loc[n, "truth"] for n in names],
    }
    if UNET["images_dir"]:
        out.update(images_dir=UNET["images_dir"], labels_dir=UNET["labels_dir"])
    if not names and not UNET["images_dir"]:
        raise WorkflowError(
            "em.train_unet is enabled but there is nothing to train on: give rows a truth mask "
            "or set images_dir/labels_dir"
        )
    return out


def all_outputs():
    """Final targets of every enabled arm."""
    out = []
    if EM["enabled"]:
        methods = ["texture"] + (["unet"] if UNET["enabled"] else [])
        out += expand(
            "results/em/{name}/{method}_final.zarr",
            name=em_volumes.index,
            method=methods,
        )
    if CRYOET["enabled"]:
        out += expand("results/cryoet/patches/{name}", name=cryoet_tomograms.index)
        with_corrections = [n for n, c in cryoet_tomograms["corrections"].items() if c]
        out += expand("results/cryoet/merged/{name}", name=with_corrections)
        out += expand("results/cryoet/refine/{run}_refine_stats.csv", run=copick_runs())
    if CODEX["enabled"]:
        out += expand("results/codex/{name}/quantify", name=codex_images.index)
    return out
