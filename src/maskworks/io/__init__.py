"""File I/O for every stage: volumes with their voxel size, outputs committed as one transaction,
block-wise access."""

from .blocks import Block, iter_blocks, n_blocks, progress_reporter
from .errors import InputError, OutputBusy
from .outputs import atomic_path, staged, transaction
from .volumes import (
    FORMATS,
    Volume,
    convert_length,
    create_volume,
    format_of,
    iter_chunk_slices,
    normalize_unit,
    read_volume,
    strip_extension,
    write_csv,
    write_json,
    write_volume,
)

__all__ = [
    "FORMATS", "Block", "InputError", "OutputBusy", "Volume", "atomic_path", "convert_length", "create_volume",
    "format_of", "iter_blocks", "iter_chunk_slices", "n_blocks", "normalize_unit", "progress_reporter", "read_volume",
    "staged", "strip_extension", "transaction", "write_csv", "write_json", "write_volume",
]
