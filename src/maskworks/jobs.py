"""What every stage runner shares, on the command line and in a Snakemake job alike.

The runners (each arm's ``stages.py``) take their defaults from the library functions, name the
file behind a bad value (:func:`about`), record their provenance, and end with one message and a
known exit status for everything a person can act on (:func:`failure`).  A Snakemake script job
is set up by :func:`snakemake_job`: its imports confined to its own environment, its log, and
the same messages and statuses as the command line.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .io.errors import InputError, Interrupted, Unreachable
from .io.outputs import write_failure

log = logging.getLogger("maskworks")

# Exit statuses: 2 bad input or an output that cannot be written (rerunning as is cannot succeed),
# 3 out of memory (more memory can), 130/143 stopped by SIGINT/SIGTERM.
EXIT_INPUT, EXIT_MEMORY, EXIT_UNREACHABLE = 2, 3, 4
# The line that ends the log of a job stopped by bad input: the workflow reads it to give a retry of that
# job (profiles/slurm: retries) the least resources instead of more (rules/common.smk: scaled).
INPUT_ERROR_MARK = "[input error, exit 2: a retry with the same input cannot succeed]"


def keyword_defaults(func):
    """Keyword-only defaults of a library function: the single source of CLI defaults."""
    return {k: p.default for k, p in inspect.signature(func).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def geometry(vol, unit=None):
    """Voxel size and unit of a volume read with the user's voxel size (``read_volume(voxel_size=)``),
    the unit overridden by the user's when given."""
    return vol.voxel_size, (unit or vol.unit)


def voxel_size_override(voxel_size):
    """The (z, y, x) voxel size a user gave to replace a file's, or None."""
    return None if voxel_size in (None, "", []) else _triple(voxel_size, "voxel_size")


def _triple(value, name):
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    if np.isscalar(value):
        value = [value] * 3
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a number or a 'z,y,x' triple") from None
    if len(out) == 1:
        out = out * 3
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise InputError(f"{name}={value!r}: expected one positive finite number or three (z,y,x)")
    return out


@contextlib.contextmanager
def about(path):
    """Errors about the data read from ``path`` (a file, or a copick run) name it: a library
    function sees only arrays."""
    try:
        yield
    except InputError as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"{path}: {exc}") from exc


def provenance(stage, inputs, params):
    return {"stage": stage, "maskworks_version": __version__,
            "inputs": {k: str(v) for k, v in inputs.items() if v is not None}, "params": params}


def sibling(path, suffix):
    from .io import strip_extension

    p = Path(path)
    return p.with_name(strip_extension(p.name) + suffix)


# ----------------------------------------------------------------------------- endings


def failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit status and one-line message for an exception a person can act on, or None for a bug
    (which keeps its traceback)."""
    if isinstance(exc, InputError):
        return EXIT_INPUT, str(exc)
    if isinstance(exc, Unreachable):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        exc = Interrupted(signal.SIGINT)
    if isinstance(exc, Interrupted):
        name = signal.Signals(exc.signum).name
        if getattr(exc, "committed", False):
            return 128 + exc.signum, f"stopped by {name} right after its outputs were committed (they are complete)"
        return 128 + exc.signum, f"stopped by {name}; this run's staging was removed and the earlier outputs are as " \
                                 "they were"
    if isinstance(exc, MemoryError):
        return EXIT_MEMORY, ("ran out of memory; earlier outputs are left as they were - give the stage more memory "
                             "(a bigger node, the rule's mem_mb) or set memory_mb so that it works block by block")
    message = write_failure(exc)
    return (EXIT_INPUT, message) if message is not None else None


def ending(name: str, code: int, message: str) -> str:
    """The one line a stage that failed on something a person can act on writes last to stderr; for bad
    input (exit 2) it ends with the mark that tells the workflow a retry cannot help."""
    text = f"maskworks {name}: error: {message}"
    return f"{text} {INPUT_ERROR_MARK}" if code == EXIT_INPUT else text


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's cancel, ``kill``) stops the stage like Ctrl-C: staging removed, one line."""
    def handler(signum, frame):
        raise Interrupted(signum)

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------- Snakemake jobs


def snakemake_job(snakemake):
    """Set up a Snakemake script job: imports confined to the job's own environment (see
    :func:`isolate_imports`), stderr (tracebacks, tqdm) and the maskworks log sent to the
    job's log file, a first log line saying which maskworks and Python run the job, and the
    command line's one-line messages and exit statuses for what a person can act on."""
    isolate_imports()
    if snakemake.log:
        sys.stderr = open(str(snakemake.log[0]), "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    log.info("rule %s: maskworks %s from %s; python %s (environment %s)", snakemake.rule, __version__,
             Path(__file__).resolve().parent, sys.executable, sys.prefix)
    stop_on_sigterm()
    sys.excepthook = functools.partial(_job_excepthook, snakemake.rule, sys.excepthook)
    version = (snakemake.config.get("outputs") or {}).get("ome_zarr_version")
    if version:
        from .io.volumes import set_ome_zarr_version

        set_ome_zarr_version(version)


def _job_excepthook(rule, default, kind, exc, tb):
    known = failure(exc)
    if known is None:
        default(kind, exc, tb)
        return
    code, message = known
    print(ending(rule, code, message), file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)  # the status Snakemake (and a cluster's retry policy) sees


def _inside(path, prefixes) -> bool:
    p = os.path.realpath(path)
    return any(p == q or p.startswith(q + os.sep) for q in prefixes)


def isolate_imports() -> list[str]:
    """Confine imports to this interpreter's own environment, as ``python -I`` would.

    Snakemake's script preamble appends the host's ``sys.path`` (its virtual environment and
    any PYTHONPATH) so that it can unpickle its job object; a package missing from the job's
    conda env would then be imported silently from the host.  The entries outside this
    interpreter's prefixes are dropped, and a maskworks or NumPy that was already imported
    from there is an error.  Returns the dropped entries.
    """
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    dropped = [p for p in sys.path if p and not _inside(p, prefixes)]
    sys.path[:] = [p for p in sys.path if not p or _inside(p, prefixes)]
    for name in ("maskworks", "numpy"):
        where = getattr(sys.modules.get(name), "__file__", None)
        if where and not _inside(where, prefixes) and not _editable_install(name, where):
            raise RuntimeError(
                f"{name} was imported from {where}, outside this job's environment {sys.prefix}: the "
                f"environment lacks it (rebuild the conda env: snakemake --conda-create-envs-only), "
                "and jobs never use the host's packages"
            )
    return dropped


def _editable_install(name, where) -> bool:
    """Whether ``name`` is installed in this environment in editable mode (pip install -e) from
    the project that holds ``where`` (a development checkout)."""
    import importlib.metadata
    import json

    try:
        direct = importlib.metadata.distribution(name).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    info = json.loads(direct or "{}")
    if not info.get("dir_info", {}).get("editable"):
        return False
    root = info.get("url", "").removeprefix("file://")
    return bool(root) and _inside(where, {os.path.realpath(root)})
