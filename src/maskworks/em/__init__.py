"""em stages."""
