"""Rule postprocess_mask: texture mask -> cleaned 3-D mask, stats JSON, QC PNG."""

from maskworks.em.stages import postprocess_mask_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
postprocess_mask_files(
    snakemake.input.mask,
    snakemake.output.mask,
    stats=snakemake.output.stats,
    qc=snakemake.output.qc,
    image=snakemake.params.sources["volume"],
    truth=snakemake.params.sources["truth"],
    full_resolution_of=snakemake.params.full_resolution_of,
    **snakemake.params.postprocess,
    threads=snakemake.threads,
    device=snakemake.params.device,
)
