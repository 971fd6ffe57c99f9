"""File I/O for every stage: volumes with their voxel size, atomic writes, block-wise access."""

from .atomic import atomic_path
from .blocks import Block, iter_blocks, n_blocks, progress_reporter
from .volumes import (
    FORMATS,
    InputError,
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
    "FORMATS", "Block", "InputError", "Volume", "atomic_path", "convert_length", "create_volume",
    "format_of", "iter_blocks", "iter_chunk_slices", "n_blocks", "normalize_unit", "progress_reporter", "read_volume",
    "strip_extension", "write_csv", "write_json", "write_volume",
]
