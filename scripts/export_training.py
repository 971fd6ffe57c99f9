"""Rule export_training: merged labels + image patches of every corrected tomogram -> MemBrain-seg's layout."""

from pathlib import Path

from maskworks.cryoet.stages import export_training_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
tomograms = {name: (merged, Path(patches) / "imagesCorr")
             for name, merged, patches in zip(snakemake.params.names, snakemake.input.merged, snakemake.input.patches)}
export_training_files(tomograms, snakemake.output.training, **snakemake.params.export)
