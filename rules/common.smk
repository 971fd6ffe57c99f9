# Helpers for every rule: config validation, input tables, input functions,
# environment choice.  Rules themselves hold no Python beyond short params.
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WildcardError, WorkflowError
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
    try:
        validate(df, schema)
    except WorkflowError:
        # every row that breaks the table's schema, not only the first
        problems = []
        for i in range(len(df)):
            try:
                validate(df.iloc[[i]].copy(), schema)
            except WorkflowError as exc:
                text = str(exc)
                m = re.search(r"ValidationError: (.*)", text)
                why = m.group(1) if m else text.split("\n\n")[0].strip()
                problems.append(f"  row {i + 1} ({df.iloc[i].get('name', '?')}): {why}")
        raise WorkflowError(
            f"{path}: {len(problems)} row(s) do not match {Path(schema).name}:\n"
            + "\n".join(problems)
        ) from None
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


def source_file(spec):
    """The file or folder behind a volume spec (``file.h5:/dataset``, ``precomputed://folder``)."""
    spec = str(spec).removeprefix("precomputed://")
    m = re.match(r"^(.*?\.(?:h5|hdf5|hdf|he5)):.*$", spec, re.I)
    return m.group(1) if m else spec


def row_source(row):
    """The volume of an EM table row as the stages read it: its path, with the dataset of an HDF5
    file (``file.h5:/dataset``, or the table's dataset column)."""
    dataset = row.get("dataset") or ""
    return f"{row['path']}:{dataset}" if dataset else row["path"]


def em_source(wildcards):
    return row_source(em_row(wildcards))


def em_sources(wildcards):
    """What the stages read for an EM row: the volume spec and the truth's (inputs name their files)."""
    return {
        "volume": em_source(wildcards),
        "truth": em_row(wildcards).get("truth") or None,
    }


def em_inputs(wildcards):
    """The volume file (and, when the table names one, its ground-truth mask) of an EM row."""
    row = em_row(wildcards)
    return {
        "volume": source_file(row["path"]),
        **({"truth": source_file(row["truth"])} if row.get("truth") else {}),
    }


def row_level(name):
    """The pyramid level of an EM row: its table cell, else em.level."""
    cell = em_volumes.loc[name].get("level") or ""
    return int(cell) if cell else EM["level"]


def em_level(wildcards):
    return row_level(wildcards.name)


def full_resolution_of(wildcards):
    """The volume a mask computed at a coarser level is written back to (em.full_resolution)."""
    return (
        em_source(wildcards) if EM["full_resolution"] and em_level(wildcards) else None
    )


def em_geometry(wildcards):
    """Voxel size/unit from the table (empty cells: from the file) and the level to work at."""
    row = em_row(wildcards)
    return {
        "level": em_level(wildcards),
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


def corrected_tomograms():
    """The tomograms with a corrections folder: their merged labels are the training data."""
    valid = set(valid_names(cryoet_tomograms, "cryoet"))
    return [n for n, c in cryoet_tomograms["corrections"].items() if c and n in valid]


def cryoet_row(wildcards):
    return cryoet_tomograms.loc[wildcards.name]


def cryoet_inputs(wildcards):
    row = cryoet_row(wildcards)
    return {
        "tomogram": row["tomogram"],
        "segmentation": row["segmentation"],
        "centres": row["centres"],
    }


# A refinement job does at least this much work (seconds) when runs_per_job is auto: a job's fixed cost
# (imports, opening the project) is ~3 s, and a cluster submission costs more than that in queue time.
REFINE_JOB_SECONDS = 60
# CPU time per run: refinement ~10 M voxels/s (bench/bench_refine.py); reading, writing and the QC
# picture about as much again; plus the per-run cost of finding and writing copick segmentations.
REFINE_VOXELS_PER_S = 5e6
REFINE_RUN_SECONDS = 0.5
_COPICK_INDEX = {}


def copick_index():
    """The rows of the copick_runs checkpoint's table (runs, their input stores, voxel counts and why a
    run lacks an input), listed by copick once in the cryo-ET environment and read here once per
    parse; raises Snakemake's "not yet" until the checkpoint has run.
    """
    table = checkpoints.copick_runs.get().output.table
    key = (table, os.stat(table).st_mtime_ns)
    if key not in _COPICK_INDEX:
        _COPICK_INDEX[key] = pd.read_csv(
            table, sep="\t", dtype=str, keep_default_na=False
        ).set_index("run", drop=False)
    return _COPICK_INDEX[key]


def copick_runs():
    """Runs to refine: the configured list, else every run of the copick project (sorted)."""
    if not (CRYOET["enabled"] and REFINE["copick_config"]):
        return []
    if REFINE["runs"]:
        return list(REFINE["runs"])
    return sorted(copick_index().index)


def refine_skipped():
    """{run: reason} of the listed runs that lack an input segmentation: never submitted."""
    index = copick_index()
    return {
        r: index.loc[r, "missing"] for r in copick_runs() if index.loc[r, "missing"]
    }


def runs_per_job(voxels):
    """refine_membranes.runs_per_job, or for `auto` as many runs as make REFINE_JOB_SECONDS of work
    at the median run size (voxel counts from the listing)."""
    n = REFINE["runs_per_job"]
    if n != "auto":
        return int(n)
    sizes = sorted(int(v) for v in voxels if str(v).isdigit())
    median = sizes[len(sizes) // 2] if sizes else 0
    per_run = REFINE_RUN_SECONDS + median / REFINE_VOXELS_PER_S
    return max(1, int(REFINE_JOB_SECONDS // per_run))


def refine_batches():
    """{batch: [runs]}: the runs that have both inputs, in name order, runs_per_job to a job.  Batch
    names are their first and last run, so a rerun after the project changed redoes the batches whose
    runs changed."""
    index = copick_index()
    skipped = refine_skipped()
    ready = [r for r in copick_runs() if r not in skipped]
    n = runs_per_job(index.loc[ready, "voxels"] if "voxels" in index else [])
    chunks = [ready[i : i + n] for i in range(0, len(ready), n)]
    return {(c[0] if len(c) == 1 else f"{c[0]}--{c[-1]}"): c for c in chunks}


def refine_batch_runs(wildcards):
    batches = refine_batches()
    if wildcards.batch not in batches:
        raise WorkflowError(
            f"refine batch {wildcards.batch!r} is not one of this project's batches "
            f"({', '.join(batches) or 'none'}); the runs or runs_per_job changed since it was asked for"
        )
    return batches[wildcards.batch]


_REFINE_INPUTS = {}


def refine_inputs(wildcards):
    """The copick config, the runs table and the segmentation stores refine_membranes reads for a
    batch of runs (when the project is on the local file system), so that changing them reruns it.
    Computed once per batch and listing (the input and the store_state param both ask).
    """
    index = copick_index()
    table = checkpoints.copick_runs.get().output.table
    key = (wildcards.batch, id(index))
    if key in _REFINE_INPUTS:
        return _REFINE_INPUTS[key]
    stores = [
        index.loc[r, k]
        for r in refine_batch_runs(wildcards)
        for k in ("organelles", "membranes")
        if index.loc[r, k]
    ]
    _REFINE_INPUTS[key] = {
        "config": REFINE["copick_config"],
        "table": table,
        "stores": stores,
    }
    return _REFINE_INPUTS[key]


def refine_run_args(wildcards):
    return " ".join(f"--run {shlex.quote(r)}" for r in refine_batch_runs(wildcards))


def refine_runtime(wildcards, attempt, rulename):
    """Minutes for a batch: three times its estimated CPU time, at least 30, x attempt (the least after
    bad input, see scaled)."""
    if attempt > 1 and failed_on_input(rulename, wildcards):
        return LEAST_RESOURCES["runtime"]
    index = copick_index()
    runs = refine_batch_runs(wildcards)
    voxels = (
        [int(v) for v in index.loc[runs, "voxels"] if str(v).isdigit()]
        if "voxels" in index
        else []
    )
    seconds = len(runs) * REFINE_RUN_SECONDS + sum(voxels) / REFINE_VOXELS_PER_S
    return max(30, int(3 * seconds / 60) + 1) * attempt


def copick_project_state(wildcards=None):
    """A digest of the names of the project's runs and of their segmentation stores (a filesystem project
    on this machine: one directory listing per run, no store is opened), as a param of the listing, so
    that a run or an input segmentation added or removed relists the project.  The refined outputs'
    stores and hidden entries (a killed run's staging) are left out: writing them must not make the
    next invocation list the project again.
    """
    import hashlib

    try:
        data = json.loads(Path(REFINE["copick_config"]).read_text())
    except (OSError, ValueError):
        return ""  # the listing itself says what is wrong with the config
    skip = tuple(
        f"_{REFINE[k] or REFINE[i].split(',')[0] + '-refined'}.zarr"
        for k, i in (("org_output_name", "org_info"), ("mem_output_name", "mem_info"))
    )
    digest = hashlib.sha256()
    for key in ("static_root", "overlay_root"):
        root = str(data.get(key) or "")
        if not root or ("://" in root and not root.startswith("local://")):
            continue
        runs = Path(root.removeprefix("local://")) / "ExperimentRuns"
        for run in sorted(os.listdir(runs)) if runs.is_dir() else []:
            digest.update(f"{key}/{run}\n".encode())
            for sub in ("Segmentations", "InstanceSegmentations"):
                folder = runs / run / sub
                names = sorted(os.listdir(folder)) if folder.is_dir() else []
                for name in names:
                    if not name.endswith(skip) and not name.startswith("."):
                        digest.update(f"{sub}/{name}\n".encode())
    return digest.hexdigest()


def copick_args(wildcards=None):
    """copick-runs options from the config."""
    return cli_args(
        {k: REFINE[k] for k in ("org_info", "mem_info", "voxel_size")}
    ) + "".join(f" --run {shlex.quote(str(r))}" for r in REFINE["runs"])


def refine_args(wildcards):
    """refine-membranes options from the config (the device a job given a GPU must use)."""
    opts = {
        k: v
        for k, v in REFINE.items()
        if k not in ("copick_config", "runs", "runs_per_job", "qc_pictures")
    }
    opts["device"] = job_device(REFINE["device"])
    return cli_args(opts)


def store_state(wildcards):
    """The state of the input Zarr stores of a batch, as a param: Snakemake compares only a directory's own
    mtime, which rewriting a chunk inside it does not change (and params computed from `input` are not
    compared at all).  Per store: its folders' count, entry count and newest mtime (zarr replaces a chunk
    by renaming a new file into its folder, which updates the folder's mtime), never a stat of each chunk:
    cheap on a network file system, once per batch and parse.
    """
    state = {}
    for store in refine_inputs(wildcards)["stores"]:
        folders, entries, newest = 0, 0, 0
        for folder, dirs, files in os.walk(store):
            folders += 1
            entries += len(dirs) + len(files)
            newest = max(newest, os.stat(folder).st_mtime_ns)
        key = str(Path(store).relative_to(Path(store).parents[2]))
        state[key] = [folders, entries, newest]
    return state


def stage_params(section, drop=()):
    """A config section as a rule's params, keys sorted: Snakemake's params trigger compares
    the recorded value, so reordering keys in a config file must not rerun anything."""
    return {k: section[k] for k in sorted(section) if k not in drop}


def uses_conda():
    from snakemake.settings.types import DeploymentMethod

    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def uses_apptainer():
    from snakemake.settings.types import DeploymentMethod

    return DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method


CONTAINERS = SOFTWARE["containers"]


def container_image(name):
    """The image the rules of environment ``name`` run in with --sdm apptainer (software.containers);
    None otherwise.  --sdm apptainer alone (no conda) with an environment lacking its image is refused
    here, before any job: Snakemake would run those jobs on the host."""
    image = CONTAINERS.get(name)
    if uses_apptainer() and not uses_conda() and not image:
        raise WorkflowError(
            f"--sdm apptainer: software.containers.{name} names no image, so the rules of the {name} "
            f"environment would run on the host; build one (make container-{name}, README: Containers) "
            "and set software.containers in your config, or add conda (--sdm conda apptainer)"
        )
    return image


def conda_env(name):
    """The conda env file of a rule: envs/<name>.yaml, or its GPU variant envs/gpu/<name>.yaml
    (CuPy, CUDA/cuDNN for TensorFlow) when software.gpu is set, as the copy that names the
    maskworks it installs (source_stamped_env).  monai's PyPI torch carries CUDA and scverse
    (the SpatialData store) uses no GPU: they have no variant."""
    return source_stamped_env(
        f"envs/gpu/{name}.yaml"
        if SOFTWARE["gpu"] and name not in ("monai", "scverse")
        else f"envs/{name}.yaml"
    )


def source_stamped_env(env):
    """The file Snakemake builds the conda env ``env`` (envs/...yaml of this workflow's source)
    from: a copy in .snakemake/maskworks-envs/ whose first line names the maskworks that its
    ${MASKWORKS_SOURCE} entry installs -- a digest of its src/maskworks/**/*.py and pyproject.toml
    (for a github() module or a $MASKWORKS_SOURCE of your own: the requirement, with its ref).
    Snakemake hashes an env file's text, never what ${MASKWORKS_SOURCE} expands to; so an edited
    source builds a new env, and an unchanged one (a commit of docs or tests) reuses its env.  The
    stamp is made once per run and handed to the jobs ($MASKWORKS_SOURCE_STAMP), which so resolve
    the envs the submitting process built.
    """
    import hashlib

    variable = f"{SOURCE_VARIABLE}_STAMP"
    root = Path(SOURCE.get_path_or_uri(secret_free=True)) if is_local_source() else None
    if not os.environ.get(variable):
        requirement = maskworks_source()
        digest = hashlib.sha256(requirement.encode())
        if root is not None and requirement == str(root.resolve()):
            sources = sorted((root / "src" / "maskworks").rglob("*.py"))
            for f in [*sources, root / "pyproject.toml"]:
                if f.is_file():
                    digest.update(f"\0{f.relative_to(root).as_posix()}\0".encode())
                    digest.update(f.read_bytes())
        # The code, not the commit: a commit that changes no code (docs, tests) reuses the envs and
        # reruns nothing through the software-env trigger.
        stamp = f"maskworks source sha256:{digest.hexdigest()[:16]}"
        os.environ[variable] = stamp

    def read(name):
        return workflow.sourcecache.open(SOURCE.join(name), "rb").read()

    out = Path(".snakemake", "maskworks-envs", Path(env).relative_to("envs")).resolve()
    stamp_line = f"# {os.environ[variable]}: written by rules/common.smk from {env}\n"
    files = {out: stamp_line.encode() + read(env)}
    # Snakemake looks for an env's post-deploy script and pin files beside it.
    stem = env[: -len(".yaml")]
    aux = [f"{stem}.post-deploy.sh"]
    if root is not None:
        aux += [str(p.relative_to(root)) for p in root.glob(f"{stem}.*.pin.txt")]
    for name in aux:
        if workflow.sourcecache.exists(SOURCE.join(name)):
            files[out.parent / Path(name).name] = read(name)
    # Every job parses this file too: write only what changed, never half a file.
    for path, content in files.items():
        if not path.is_file() or path.read_bytes() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(content)
            os.replace(tmp, path)
    return str(out)


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


# What a retry of a job that stopped on bad input asks for: it cannot succeed (Snakemake retries every
# failed job alike, snakemake#2441), so it runs once more, small and short, and fails the same way.
LEAST_RESOURCES = {"mem_mb": 1000, "runtime": 5}
# The mark maskworks writes at the end of a job log for bad input (maskworks.jobs.INPUT_ERROR_MARK).
INPUT_ERROR_MARK = "[input error, exit 2: a retry with the same input cannot succeed]"
_FAILED_ON_INPUT = set()


def failed_on_input(rulename, wildcards):
    """Whether an earlier attempt of this job stopped on bad input: its log says so (the mark of
    maskworks.jobs.ending).  Remembered by this process, so that a later attempt killed for its short
    runtime is not taken for one that needs more."""
    key = (rulename, tuple(sorted(dict(wildcards).items())))
    if key in _FAILED_ON_INPUT:
        return True
    from snakemake.io import apply_wildcards

    this = workflow.get_rule(rulename)
    # the rules submitted with it (group:) fail and are retried together: their logs count too
    together = [this] + [
        r
        for r in workflow.rules
        if this.group and r.group == this.group and r is not this
    ]
    for pattern in (p for r in together for p in r.log):
        try:
            path = apply_wildcards(str(pattern), wildcards)
        except (KeyError, WildcardError):
            continue  # a wildcard this job does not have
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 65536))
                tail = fh.read().decode(errors="replace")
        except OSError:
            continue
        if INPUT_ERROR_MARK in tail:
            _FAILED_ON_INPUT.add(key)
            if workflow.is_main_process:
                logger.warning(
                    f"{rulename} {dict(wildcards)}: stopped on bad input (see its log); its retry "
                    f"asks for the least resources ({LEAST_RESOURCES}) and will fail the same way"
                )
            return True
    return False


def scaled(base, resource, per_pixel=0, extra_mb=0, cap_mb=None):
    """A resource that grows with the attempt: a job retried after running out of memory or time
    (profiles/slurm: retries) asks for base x attempt; one that stopped on bad input asks for the
    least (LEAST_RESOURCES), as more cannot help.  ``per_pixel``: MB per megapixel of the row's
    slide added to ``base`` (a CODEX stage whose memory follows the slide's size, read from its
    header when the job is scheduled); ``extra_mb``: added to ``base`` (a stage's own memory budget);
    ``cap_mb``: the most the first attempt asks for (a stage that keeps to a budget on larger slides).
    """

    def value(wildcards, attempt, rulename):
        if attempt > 1 and failed_on_input(rulename, wildcards):
            return min(base, LEAST_RESOURCES[resource])
        extra = per_pixel * slide_megapixels(wildcards.name) if per_pixel else 0
        need = base + extra_mb + extra
        return int(round((need if cap_mb is None else min(need, cap_mb)) * attempt))

    return value


_SLIDE_MEGAPIXELS = {}


def slide_megapixels(name):
    """Megapixels of the CODEX table row ``name``'s slide (its header only; 0 when it cannot be read:
    the input check reports that row)."""
    if name not in _SLIDE_MEGAPIXELS:
        try:
            from maskworks.io.slides import slide_pixels

            _SLIDE_MEGAPIXELS[name] = (
                slide_pixels(codex_images.loc[name]["image"]) / 1e6
            )
        except Exception:
            _SLIDE_MEGAPIXELS[name] = 0.0
    return _SLIDE_MEGAPIXELS[name]


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
# stitch and quantify keep to their budget (codex.stitch/quantify.memory_mb; null: none) on slides too
# large for memory: their rules ask for at most the budget plus a margin
STITCH_CAP_MB = (
    None
    if CODEX["stitch"]["memory_mb"] is None
    else CODEX["stitch"]["memory_mb"] + 1000
)
QUANTIFY_CAP_MB = (
    None
    if CODEX["quantify"]["memory_mb"] is None
    else CODEX["quantify"]["memory_mb"] + 1000
)
SEG = CODEX["segment_cells"]
codex_images = (
    read_table(CODEX["images"], "../config/codex_images.schema.yaml")
    if CODEX["enabled"]
    else None
)
INPUT_CHECK = config["input_check"]
INPUT_CHECK_REPORT = "logs/input_check.tsv"
INPUT_CHECK_CACHE = ".snakemake/maskworks/input_check.json"


def check_inputs():
    """{arm: {name: [problems]}} of the rows of the enabled arms' tables that cannot run, found from their
    headers (maskworks.checks; verdicts cached by the files' size and mtime) when this process plans the
    run, before any job is submitted, and written to logs/input_check.tsv.  With on_invalid: stop, any bad
    row stops the run here, all of them listed.  Jobs (which re-read the tables) do not check again.
    """
    if not (INPUT_CHECK["enabled"] and workflow.is_main_process):
        return {}
    from maskworks.checks import check_table

    tables = {
        "em": (
            em_volumes,
            EM.get("volumes"),
            {"level": EM["level"], "max_voxels": EM["texture_mask"]["max_voxels"]},
        ),
        "cryoet": (cryoet_tomograms, CRYOET.get("tomograms"), {}),
        "codex": (codex_images, CODEX.get("images"), {}),
    }
    invalid, lines = {}, []
    for arm, (table, path, settings) in tables.items():
        if table is None or table.empty:
            continue
        rows = {name: dict(row) for name, row in table.iterrows()}
        bad = check_table(arm, rows, settings, cache=INPUT_CHECK_CACHE)
        invalid[arm] = bad
        lines += [(arm, path, n, p) for n, problems in bad.items() for p in problems]
    listing_file = Path(INPUT_CHECK_REPORT)
    listing_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = listing_file.with_name(f".{listing_file.name}.{os.getpid()}")
    pd.DataFrame(lines, columns=["arm", "table", "name", "problem"]).to_csv(
        tmp, sep="\t", index=False
    )
    os.replace(tmp, listing_file)
    n_bad = sum(len(b) for b in invalid.values())
    if n_bad:
        listing = "\n".join(f"  {a} {n} ({t}): {p}" for a, t, n, p in lines)
        if INPUT_CHECK["on_invalid"] == "stop":
            raise WorkflowError(
                f"{n_bad} input row(s) cannot run (input_check.on_invalid: stop; all listed in "
                f"{INPUT_CHECK_REPORT}):\n{listing}"
            )
        logger.warning(
            f"{n_bad} input row(s) cannot run and are left out of this run (the other rows run; "
            f"listed in {INPUT_CHECK_REPORT}; input_check.on_invalid: stop runs nothing instead):\n{listing}"
        )
    return invalid


INVALID_INPUTS = check_inputs()


def valid_names(table, arm):
    """The names of a table's rows that passed the input check, in table order."""
    if table is None:
        return []
    return [n for n in table.index if n not in INVALID_INPUTS.get(arm, {})]


def report_invalid_inputs():
    """The rows left out, said again at the end of a run (the warning above scrolls away)."""
    n_bad = sum(len(b) for b in INVALID_INPUTS.values())
    if n_bad:
        names = ", ".join(n for b in INVALID_INPUTS.values() for n in b)
        logger.warning(
            f"{n_bad} input row(s) were not run because their inputs failed the check: {names} "
            f"(reasons in {INPUT_CHECK_REPORT})"
        )


onsuccess:
    report_invalid_inputs()


onerror:
    report_invalid_inputs()


# Where the download rule puts the Mesmer model when neither model_path nor the deepcell cache has it.
MESMER_DOWNLOAD = "resources/mesmer"
# The environment segment_cells runs in: Mesmer needs TensorFlow (deepcell), InstanSeg PyTorch (the
# torch env, envs/monai.yaml; .venv locally); the classical backends need the core stack only.
SEGMENT_ENVS = {
    "mesmer": "deepcell",
    "instanseg": "monai",
    "watershed": "core",
    "expansion": "core",
}
SEGMENT_ENV = SEGMENT_ENVS[SEG["backend"]]
# The backends that load a model (and may use a GPU).
SEGMENT_MODELS = ("mesmer", "instanseg")
SEGMENT_GPU = gpu_request(SEG["device"]) if SEG["backend"] in SEGMENT_MODELS else 0
DEEPCELL_CACHE = Path("~/.deepcell/models/MultiplexSegmentation").expanduser()


def codex_row(wildcards):
    return codex_images.loc[wildcards.name]


def codex_inputs(wildcards):
    row = codex_row(wildcards)
    return {
        "image": row["image"],
        **({"channels": row["channels"]} if row.get("channels") else {}),
        "channel_files": codex_channel_files(row["image"]),
    }


def codex_channel_files(image):
    """The files of a one-file-per-channel slide (a folder of TIFFs, a table of files): inputs, so that
    changing one reruns the slide; none for a single file (or when the slide cannot be read: the
    input check reports it)."""
    from maskworks.io import InputError
    from maskworks.io.slides import channel_files

    try:
        return [str(p) for p in channel_files(image)]
    except (InputError, OSError):
        return []


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


def env_python(env, needed_by):
    """The interpreter of environment ``env`` (deepcell, cryoet) for the jobs that run in it; conda's
    (envs/<env>.yaml), else software.<env>_python, else .venv-<env> of this workflow's source
    (`make setup-<env>`)."""
    if uses_conda() or (uses_apptainer() and CONTAINERS.get(env)):
        return "python"
    key = f"{env}_python"
    if SOFTWARE[key]:
        py = Path(SOFTWARE[key])
        where = f"software.{key}"
    elif is_local_source():
        source = os.path.normpath(SOURCE.get_path_or_uri(secret_free=True))
        py = Path(source) / f".venv-{env}" / "bin" / "python"
        where = f"the workflow's .venv-{env}"
    else:
        raise WorkflowError(
            f"{needed_by} needs the {env} environment: set software.{key} "
            f"(the workflow comes from {SOURCE}), or use conda (--sdm conda)"
        )
    if not py.exists():
        raise WorkflowError(
            f"{needed_by} runs in the {env} environment, but {py} ({where}) does not exist: "
            f"run `make setup-{env}` in the maskworks checkout, set software.{key}, "
            f"or use conda (--sdm conda) to build envs/{env}.yaml"
        )
    return str(py)


def deepcell_python(wildcards=None):
    """The DeepCell environment's interpreter (Mesmer: TensorFlow 2.8, Python 3.10)."""
    return env_python("deepcell", "the Mesmer backend")


def cryoet_python(wildcards=None):
    """The cryo-ET environment's interpreter (copick, which needs zarr 2)."""
    return env_python("cryoet", "the copick rules (copick_runs, refine_membranes)")


def scverse_python(wildcards=None):
    """The scverse environment's interpreter (spatialdata 0.8, Python 3.12)."""
    return env_python("scverse", "the spatialdata rule (codex.spatialdata)")


def spatialdata_args(wildcards):
    """write-spatialdata options: the config's, and the pixel size of the image table's row."""
    opts = stage_params(CODEX["spatialdata"], drop=("enabled",))
    opts["image_mpp"] = codex_channels(wildcards)["image_mpp"]
    return cli_args(opts)


def segment_python(wildcards):
    """Mesmer runs in the DeepCell environment's interpreter; the other backends in the job's own
    environment (conda's or the container's, else this Snakemake's: .venv holds torch).
    """
    if SEGMENT_ENV == "deepcell":
        return deepcell_python()
    if uses_conda() or (uses_apptainer() and CONTAINERS.get(SEGMENT_ENV)):
        return "python"
    return sys.executable


def segment_model(wildcards):
    """Model for segment_cells: Mesmer's configured path, the deepcell cache, else the download rule's;
    InstanSeg's configured path (no download: README, InstanSeg weights); none for the classical
    backends.
    """
    if SEG["backend"] == "instanseg":
        if not SEG["model_path"]:
            raise WorkflowError(
                "codex.segment_cells.backend instanseg needs codex.segment_cells.model_path: an InstanSeg "
                "TorchScript model (instanseg.pt) or the folder of an extracted InstanSeg bioimage.io model "
                "(README: InstanSeg weights on an offline cluster)"
            )
        return SEG["model_path"]
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
    """segment-cells options from the config (a classical backend's parameters only for it, Mesmer's
    keyword arguments only for Mesmer)."""
    backend = SEG["backend"]
    opts = {
        k: v
        for k, v in SEG.items()
        if k not in ("watershed", "expansion", "model_path", "device")
    }
    opts["device"] = job_device(SEG["device"]) if backend in SEGMENT_MODELS else "cpu"
    if backend in ("watershed", "expansion"):
        opts.update(SEG[backend])
    if backend != "mesmer":
        for k in (
            "preprocess_kwargs",
            "postprocess_kwargs_whole_cell",
            "postprocess_kwargs_nuclear",
        ):
            opts.pop(k)
    if backend in SEGMENT_MODELS:
        opts["model_path"] = input.model
    opts["image_mpp"] = codex_channels(wildcards)["image_mpp"]
    return cli_args(opts)


UNET = EM["train_unet"]


def training_names():
    """The table rows train_unet learns from: those listed in em.train_unet.training, else every row
    with a truth."""
    valid = set(valid_names(em_volumes, "em"))
    return [n for n in UNET["training"] if n in valid or n not in em_volumes.index] or [
        n for n, t in em_volumes["truth"].items() if t and n in valid
    ]


def unet_training_sources(wildcards):
    """What train_unet reads for each training row: image and label specs and the pyramid level."""
    names = training_names()
    return {
        "images": [row_source(em_volumes.loc[n]) for n in names],
        "labels": [em_volumes.loc[n, "truth"] for n in names],
        "levels": [row_level(n) for n in names],
    }


def unet_training_inputs(wildcards):
    """Training pairs: table rows with a truth (all, or those listed) and/or patch folders."""
    names = training_names()
    missing = [
        n for n in names if n not in em_volumes.index or not em_volumes.loc[n, "truth"]
    ]
    if missing:
        raise WorkflowError(
            f"em.train_unet.training names {missing}: not rows of {EM['volumes']} with a truth"
        )
    out = {
        "images": [source_file(em_volumes.loc[n, "path"]) for n in names],
        "labels": [source_file(em_volumes.loc[n, "truth"]) for n in names],
    }
    if UNET["images_dir"]:
        out.update(images_dir=UNET["images_dir"], labels_dir=UNET["labels_dir"])
    if not names and not UNET["images_dir"]:
        raise WorkflowError(
            "em.train_unet is enabled but there is nothing to train on: give rows a truth mask "
            "or set images_dir/labels_dir"
        )
    return out


def refine_outputs(wildcards):
    """The refinement's target: the project table, known once the copick_runs checkpoint has listed
    the runs (an input function of its own, so the other arms' jobs show in a dry run before that).
    """
    if not (CRYOET["enabled"] and REFINE["copick_config"]):
        return []
    return ["results/cryoet/refine/refine_summary.csv"]


def refine_batch_stats(wildcards):
    return expand(
        "results/cryoet/refine/batches/{batch}_refine_stats.csv", batch=refine_batches()
    )


def all_outputs():
    """Final targets of every enabled arm but the copick refinement (refine_outputs)."""
    out = []
    if EM["enabled"]:
        methods = ["texture"] + (["unet"] if UNET["enabled"] else [])
        out += expand(
            "results/em/{name}/{method}_final.zarr",
            name=valid_names(em_volumes, "em"),
            method=methods,
        )
    if CRYOET["enabled"]:
        out += expand(
            "results/cryoet/patches/{name}",
            name=valid_names(cryoet_tomograms, "cryoet"),
        )
        out += expand("results/cryoet/merged/{name}", name=corrected_tomograms())
        if CRYOET["export_training"]["enabled"] and corrected_tomograms():
            out.append("results/cryoet/training")
    if CODEX["enabled"]:
        out += expand(
            "results/codex/{name}/quantify", name=valid_names(codex_images, "codex")
        )
        if CODEX["spatialdata"]["enabled"]:
            out += expand(
                "results/codex/{name}/spatialdata.zarr",
                name=valid_names(codex_images, "codex"),
            )
    return out
