"""Block-wise traversal of arrays too large for memory: chunks with a halo."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Block:
    """One chunk of a block-wise pass.

    ``outer`` is the region read (the chunk plus its halo, clipped to the
    array); ``inner`` is the chunk itself, where results are written;
    ``crop`` selects ``inner`` inside an array of ``outer``'s shape.
    """

    outer: tuple[slice, ...]
    inner: tuple[slice, ...]

    @property
    def crop(self) -> tuple[slice, ...]:
        return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(self.inner, self.outer))


def iter_blocks(shape, chunk_shape=None, halo=0):
    """Yield :class:`Block` s tiling ``shape`` in ``chunk_shape`` pieces with ``halo`` voxels around each.

    ``chunk_shape`` None (or any entry <= 0) means one block along that axis.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if chunk_shape is None:
        chunk_shape = shape
    chunk_shape = tuple(s if (c is None or int(c) <= 0) else int(c) for c, s in zip(chunk_shape, shape))
    halo = (int(halo),) * nd if np.isscalar(halo) else tuple(int(h) for h in halo)
    counts = [max(1, -(-s // c)) for s, c in zip(shape, chunk_shape)]
    for idx in np.ndindex(*counts):
        inner = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunk_shape, shape))
        outer = tuple(slice(max(0, sl.start - h), min(s, sl.stop + h)) for sl, h, s in zip(inner, halo, shape))
        yield Block(outer, inner)


def n_blocks(shape, chunk_shape=None) -> int:
    """How many blocks :func:`iter_blocks` yields (for progress bars)."""
    if chunk_shape is None:
        return 1
    return int(np.prod([max(1, -(-int(s) // (int(c) if c and int(c) > 0 else int(s)))) for s, c in zip(shape, chunk_shape)]))


def progress_reporter(progress, total: int, desc: str, unit: str = "chunk"):
    """``(bar, report)`` for a loop of ``total`` steps; call ``report(done)`` with the steps done.

    ``progress``: a callable (called as ``progress(done, total)``), ``False`` (silent) or
    ``None`` (a tqdm bar on stderr, which Snakemake scripts send to the rule's log, when
    there is more than one step).  Close ``bar`` when it is not None.
    """
    if callable(progress):
        return None, lambda done: progress(done, total)
    if progress is False or (progress is None and total <= 1):
        return None, lambda done: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
    return bar, lambda done: bar.update(done - bar.n)
