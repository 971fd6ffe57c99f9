"""Rule predict_unet: volume + checkpoint -> probability and mask (OME-Zarr), stats JSON, QC PNG."""

from maskworks.em.stages import predict_unet_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
predict_unet_files(
    snakemake.input.volume,
    snakemake.input.checkpoint,
    snakemake.output.prob,
    snakemake.output.mask,
    stats=snakemake.output.stats,
    qc=snakemake.output.qc,
    truth=snakemake.input.get("truth"),
    **snakemake.params.geometry,
    **snakemake.params.predict,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
