"""Rule repair_masks: per-patch cell/nucleus labels -> matched cell, nucleus, cytoplasm + metrics."""

from pathlib import Path

from maskworks.codex.stages import repair_patch_dir
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
repair_patch_dir(
    snakemake.input.segment,
    snakemake.output.repair,
    metadata=Path(snakemake.input.tiles) / "patches_metadata.csv",
)
