"""Rule tile_image: multichannel image -> two-channel patches, patch QC table, QC PNG."""

from maskworks.codex.stages import tile_image_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
tile_image_files(
    snakemake.input.image,
    snakemake.input.get("channels"),
    snakemake.output.tiles,
    **snakemake.params.channels,
    **snakemake.params.tile,
)
