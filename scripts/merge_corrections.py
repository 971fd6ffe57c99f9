"""Rule merge_corrections: label patches + Add/Remove/Ignore masks -> training labels, report."""

from pathlib import Path

from maskworks.cryoet.stages import merge_corrections_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
merge_corrections_files(
    Path(snakemake.input.patches) / "labelsCorr",
    snakemake.input.corrections,
    snakemake.output.merged,
    **snakemake.params.merge,
)
