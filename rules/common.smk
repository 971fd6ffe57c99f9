# Helpers for every rule: config validation, input tables, input functions,
# environment choice.  Rules themselves hold no Python beyond short params.
import os
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

validate(config, "../config/schema.yaml")

# Conda envs (--sdm conda) hold maskworks' dependencies, not maskworks itself:
# the package is taken from this checkout.  Jobs inherit the variable, and
# cluster jobs re-read this file, so it holds there too.
_SRC = str(Path(workflow.basedir) / "src")
if _SRC not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p))


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
        logger.warning(f"{path} lists no inputs yet: add one row per input (see README), or run `make demo`.")
    return df.set_index("name", drop=False)


EM = config["em"]
em_volumes = read_table(EM["volumes"], "../config/em_volumes.schema.yaml") if EM["enabled"] else None


def em_row(wildcards):
    return em_volumes.loc[wildcards.name]


def em_inputs(wildcards):
    """The volume (and, when the table names one, its ground-truth mask) of an EM row."""
    row = em_row(wildcards)
    return {"volume": row["path"], **({"truth": row["truth"]} if row.get("truth") else {})}


def em_geometry(wildcards):
    """Voxel size/unit from the table; empty cells mean 'take them from the file'."""
    row = em_row(wildcards)
    return {"voxel_size": row.get("voxel_size") or None, "unit": row.get("unit") or None}


CRYOET = config["cryoet"]
REFINE = CRYOET["refine_membranes"]
cryoet_tomograms = (
    read_table(CRYOET["tomograms"], "../config/cryoet_tomograms.schema.yaml") if CRYOET["enabled"] else None
)


def cryoet_row(wildcards):
    return cryoet_tomograms.loc[wildcards.name]


def cryoet_inputs(wildcards):
    row = cryoet_row(wildcards)
    return {"tomogram": row["tomogram"], "segmentation": row["segmentation"], "centres": row["centres"]}


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
    return sorted(r.name for r in open_project(REFINE["copick_config"]).runs)


def stage_params(section, drop=()):
    """A config section as a rule's params, keys sorted: Snakemake's params trigger compares
    the recorded value, so reordering keys in a config file must not rerun anything."""
    return {k: section[k] for k in sorted(section) if k not in drop}


def gpu_request(device):
    """GPU-capable rules ask Slurm/Snakemake for one GPU unless the config pins them to the CPU."""
    return 0 if str(device) == "cpu" else 1


def all_outputs():
    """Final targets of every enabled arm."""
    out = []
    if EM["enabled"]:
        out += expand("results/em/{name}/mask.zarr", name=em_volumes.index)
    if CRYOET["enabled"]:
        out += expand("results/cryoet/patches/{name}", name=cryoet_tomograms.index)
        with_corrections = [n for n, c in cryoet_tomograms["corrections"].items() if c]
        out += expand("results/cryoet/merged/{name}", name=with_corrections)
        out += expand("results/cryoet/refine/{run}_refine_stats.csv", run=copick_runs())
    return out
