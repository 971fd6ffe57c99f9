"""Rule predict_unet: volume + checkpoint -> probability and mask (OME-Zarr), stats JSON, QC PNG."""

from maskworks.em.stages import predict_unet_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
predict_unet_files(
    snakemake.params.sources["volume"],  # with the dataset of an HDF5 file
    snakemake.input.checkpoint,
    snakemake.output.prob,
    snakemake.output.mask,
    stats=snakemake.output.stats,
    qc=snakemake.output.qc,
    truth=snakemake.params.sources["truth"],
    **snakemake.params.geometry,
    **snakemake.params.predict,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
