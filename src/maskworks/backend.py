"""Array-module choice: NumPy + scipy.ndimage on the CPU, CuPy + cupyx.scipy.ndimage on a GPU.

Library code written against ``backend.xp`` and ``backend.ndi`` runs unchanged on
either; CuPy is imported only when a GPU is asked for (or ``auto`` looks for one).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .io import InputError

DEVICES = "auto | cpu | cuda | cuda:N"


@dataclass(frozen=True)
class Backend:
    """The array module (``xp``), its ndimage (``ndi``) and the device they run on."""

    device: str
    xp: ModuleType
    ndi: ModuleType

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"

    def asarray(self, array, dtype=None):
        """``array`` on this backend's device (no copy when it is already there)."""
        with self.context():
            return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        """``array`` as a NumPy array on the host."""
        if self.is_gpu and not isinstance(array, np.ndarray):
            return self.xp.asnumpy(array)
        return np.asarray(array)

    def context(self):
        """Context that makes this backend's GPU the current one (nothing on the CPU)."""
        if not self.is_gpu:
            return contextlib.nullcontext()
        return self.xp.cuda.Device(_index(self.device))


def _index(device: str) -> int:
    return int(device.split(":", 1)[1])


def _import_cupy():
    """CuPy and cupyx.scipy.ndimage, or the reason they cannot be used."""
    try:
        import cupy
        import cupyx.scipy.ndimage as cndi
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return None, None, f"cupy cannot be imported ({type(exc).__name__}: {exc})"
    return cupy, cndi, None


def _gpu_count(cupy) -> tuple[int, str | None]:
    try:
        return int(cupy.cuda.runtime.getDeviceCount()), None
    except Exception as exc:  # no driver, no device, CUDA_VISIBLE_DEVICES=""
        return 0, f"no CUDA device is visible ({type(exc).__name__}: {exc})"


def resolve_device(device: str = "auto") -> str:
    """Turn a ``device`` setting into ``"cpu"`` or ``"cuda:N"``.

    Parameters
    ----------
    device : str
        ``auto`` (a GPU when CuPy imports and a device is visible, else the CPU),
        ``cpu``, ``cuda`` (the first GPU) or ``cuda:N``.

    Raises
    ------
    InputError
        For an unknown value, or a GPU asked for where CuPy or the device is missing.
    """
    d = str(device if device is not None else "auto").strip().lower()
    if d == "cpu":
        return "cpu"
    if d == "auto":
        cupy, _, _ = _import_cupy()
        if cupy is None:
            return "cpu"
        n, _ = _gpu_count(cupy)
        return "cuda:0" if n > 0 else "cpu"
    if d == "cuda":
        d = "cuda:0"
    head, _, tail = d.partition(":")
    if head != "cuda" or not tail.isdigit():
        raise InputError(f"device={device!r} is not one of {DEVICES}")
    cupy, _, why = _import_cupy()
    if cupy is None:
        raise InputError(
            f"device={device!r} asks for a GPU but {why}; install the GPU extra "
            "(pip install 'maskworks[gpu]') on a machine with CUDA, or use device=cpu or auto"
        )
    n, why = _gpu_count(cupy)
    index = int(tail)
    if index >= n:
        seen = f"only {n} CUDA device(s) are visible" if n else (why or "no CUDA device is visible")
        raise InputError(f"device={device!r} asks for GPU {index} but {seen}; use device=cpu or auto")
    return f"cuda:{index}"


def get_backend(device: str = "auto") -> Backend:
    """The :class:`Backend` for a ``device`` setting (see :func:`resolve_device`)."""
    resolved = resolve_device(device)
    if resolved == "cpu":
        from scipy import ndimage

        return Backend("cpu", np, ndimage)
    cupy, cndi, _ = _import_cupy()
    return Backend(resolved, cupy, cndi)
