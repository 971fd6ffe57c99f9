"""Rule extract_patches: tomogram + segmentation + centres -> imagesCorr/labelsCorr patches, manifest, QC."""

from maskworks.cryoet.stages import extract_patches_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
extract_patches_files(
    snakemake.input.tomogram,
    snakemake.input.segmentation,
    snakemake.output.patches,
    centres=snakemake.input.centres,
    token=snakemake.params.token,
    **snakemake.params.extract,
)
