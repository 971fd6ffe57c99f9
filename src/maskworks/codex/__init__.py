"""Multiplexed-tissue (CODEX/PhenoCycler) arm: patching and QC, cell segmentation, cell-nucleus mask repair, stitching."""
