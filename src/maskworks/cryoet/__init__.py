"""Cryo-ET stages: annotation patch extraction, correction merging (MemBrain-seg patch
corrections) and organelle/membrane refinement over copick (SABER refine-membranes)."""
