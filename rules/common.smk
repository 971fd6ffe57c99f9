# Helpers for every rule: config validation, input tables, input functions,
# environment choice.  Rules themselves hold no Python beyond short params.
import os
from pathlib import Path

import pandas as pd
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


def all_outputs():
    """Final targets of every enabled arm."""
    out = []
    if EM["enabled"]:
        out += expand("results/em/{name}/mask.zarr", name=em_volumes.index)
    return out
