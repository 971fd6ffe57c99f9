"""Block-wise traversal of arrays too large for memory: chunks with a halo."""

from __future__ import annotations

import os
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


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what Slurm or taskset granted)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads) -> int:
    """``threads`` None: every CPU this process may use (:func:`available_cpus`); else ``threads``."""
    return available_cpus() if threads is None else int(threads)


class Slabs:
    """Run a function on slabs of an array in a pool of threads.

    NumPy's element-wise operations and scipy.ndimage's filters release the GIL, so slabs of
    one array are processed in parallel by threads, without copies.  A 1-D filter along one
    axis is split along another axis (``avoid``), so each slab holds whole lines and the
    result is the same, bit for bit, as one call on the whole array.  Use as a context manager
    (the pool is shut down on exit); with one thread, functions run in the calling thread.
    """

    def __init__(self, threads: int = 1):
        self.threads = max(1, int(threads))
        self._pool = None

    def __enter__(self):
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="maskworks")
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def slices(self, shape, avoid: int | None = None) -> list[tuple[slice, ...]]:
        """About equal slabs of ``shape`` (one per thread) along its first axis, or its second
        when ``avoid`` is 0, each a tuple of slices of every axis."""
        shape = tuple(int(s) for s in shape)
        axis = 1 if (avoid == 0 and len(shape) > 1) else 0
        n = max(1, min(self.threads, shape[axis]))
        bounds = np.linspace(0, shape[axis], n + 1).round().astype(int)
        full = [slice(None)] * len(shape)
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                full[axis] = slice(int(a), int(b))
                out.append(tuple(full))
        return out

    def run(self, fn, shape, avoid: int | None = None) -> list:
        """``[fn(slab) for slab in self.slices(shape, avoid)]``, in parallel."""
        parts = self.slices(shape, avoid)
        if self._pool is None or len(parts) == 1:
            return [fn(p) for p in parts]
        return list(self._pool.map(fn, parts))


def return_freed_memory() -> None:
    """Have glibc's allocator hand blocks of 1 MiB and more back to the system when they are freed.

    By default the threshold above which malloc maps memory of its own rises with every large
    block freed (up to 32 MiB), and blocks below it are kept in each thread's arena: a
    memory-bounded run that allocates and frees slab after slab in several threads would hold
    many of them at once.  Called by the stages that are given a memory budget; elsewhere (not
    glibc) it does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
    except (OSError, AttributeError):
        pass
