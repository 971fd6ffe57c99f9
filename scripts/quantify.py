"""Rule quantify: source image + stitched masks -> cell x marker table, cell metadata, AnnData, QC."""

from maskworks.codex.stages import quantify_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
quantify_files(
    snakemake.input.image,
    snakemake.input.get("channels"),
    snakemake.input.stitch,
    snakemake.output.quantify,
    image_mpp=snakemake.params.image_mpp,
    sample=snakemake.wildcards.name,
    nuclear_channel=snakemake.params.nuclear_channel,
    threads=snakemake.threads,
    **snakemake.params.quantify,
)
