"""Rule merge_corrections: label patches + Add/Remove/Ignore masks -> training labels, report."""

from pathlib import Path

from maskworks.cli import snakemake_job
from maskworks.cryoet.stages import merge_corrections_files

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
merge_corrections_files(
    Path(snakemake.input.patches) / "labelsCorr",
    snakemake.input.corrections,
    snakemake.output.merged,
    **snakemake.params.merge,
)
