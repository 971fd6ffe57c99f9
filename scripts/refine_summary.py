"""Rule refine_summary: the batches' refine stats + the project listing -> refine_summary.csv."""

from maskworks.cryoet.stages import refine_summary_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
refine_summary_files(snakemake.input.table, list(snakemake.input.stats), snakemake.output.summary)
