"""Rule texture_mask: volume -> tissue mask, confidence map, stats JSON, QC PNG."""

from maskworks.em.stages import texture_mask_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
texture_mask_files(
    snakemake.params.sources["volume"],  # with the dataset of an HDF5 file
    snakemake.output.mask,
    confidence=snakemake.output.confidence,
    stats=snakemake.output.stats,
    qc=snakemake.output.qc,
    truth=snakemake.params.sources["truth"],
    **snakemake.params.geometry,
    **snakemake.params.texture,
    threads=snakemake.threads,
    device=snakemake.params.device,
)
