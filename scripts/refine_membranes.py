"""Rule refine_membranes: one copick run -> refined organelles + membranes in copick, QC, stats."""

from pathlib import Path

from maskworks.cryoet.stages import refine_membranes_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
refine_membranes_files(
    snakemake.input.config,
    run=[snakemake.wildcards.run],
    qc_dir=Path(snakemake.output.qc).parent,  # writes <run>_refine_qc.png there
    stats=snakemake.output.stats,
    device=snakemake.params.device,
    **snakemake.params.refine,
)
