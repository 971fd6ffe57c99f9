"""Rule train_unet: (image, label) volumes and/or patch folders -> U-Net checkpoints, history, metrics."""

from pathlib import Path

from maskworks.em.stages import train_unet_files
from maskworks.jobs import snakemake_job

snakemake_job(snakemake)  # `snakemake` is injected by Snakemake
train_unet_files(
    snakemake.params.sources["images"],  # with the dataset of an HDF5 file
    snakemake.params.sources["labels"],
    out_dir=Path(snakemake.output.best).parent,
    images_dir=snakemake.input.get("images_dir"),
    labels_dir=snakemake.input.get("labels_dir"),
    levels=snakemake.params.sources["levels"],
    **snakemake.params.train,
    device=snakemake.params.device,
)
