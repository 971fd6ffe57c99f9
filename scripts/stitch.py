"""Rule stitch: repaired patches -> whole-slide cell/nucleus/cytoplasm labels, cell table, QC PNG."""

from pathlib import Path

from maskworks.codex.stages import stitch_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
stitch_files(
    snakemake.input.tiles,
    snakemake.input.repair,
    snakemake.output.stitch,
    metadata=Path(snakemake.input.repair) / "patches_metadata.csv",
    **snakemake.params.stitch,
)
