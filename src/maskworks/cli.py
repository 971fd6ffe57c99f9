"""``maskworks <stage>``: every workflow stage on the command line.

Each arm's ``stages`` module holds the file-level runners (read through
:mod:`maskworks.io`, one library call, atomic writes, a stats JSON, a QC PNG) that
the Snakemake scripts call too, and registers its commands here; this module
holds what they share.  Option names are the config keys with dashes; defaults
come from the library functions' signatures.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import importlib
import inspect
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .io import InputError

log = logging.getLogger("maskworks")

# Modules with an ``add_commands(subparsers)``; imported when the parser is built.
ARMS = ["maskworks.em.stages", "maskworks.cryoet.stages", "maskworks.codex.stages"]
# The commands each arm registers: a run of one stage imports only its arm (each arm pulls in
# its own libraries), the full parser (``--help``, an unknown command) imports them all.
COMMANDS = {
    "maskworks.em.stages": ("texture-mask", "postprocess-mask", "train-unet", "predict-unet"),
    "maskworks.cryoet.stages": ("extract-patches", "merge-corrections", "refine-membranes"),
    "maskworks.codex.stages": ("tile-image", "segment-cells", "download-mesmer-model", "repair-masks",
                               "stitch", "quantify"),
}


# ----------------------------------------------------------------------------- helpers


def geometry(vol, voxel_size=None, unit=None):
    """Voxel size/unit of a volume, overridden by the user's values when given."""
    vs = voxel_size_override(voxel_size) or vol.voxel_size
    return vs, (unit or vol.unit)


def keyword_defaults(func):
    """Keyword-only defaults of a library function: the single source of CLI defaults."""
    return {k: p.default for k, p in inspect.signature(func).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


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


@contextlib.contextmanager
def all_or_nothing(*paths):
    """The outputs ``paths`` of a stage as one transaction (:func:`maskworks.io.atomic.transaction`):
    written beside their targets and renamed into place together when the stage succeeds, so a
    failed run leaves every earlier output as it was and a killed run's staging is cleaned by
    the next.  An output written some other way and changed by a failed run is removed, so
    that no mix of new and old files is left behind."""
    from .io.atomic import transaction

    before = {Path(p): _mtime(p) for p in paths if p is not None}
    with transaction(*before):
        try:
            yield
        except BaseException:
            for p, t in before.items():  # staged outputs never touched their targets
                if (p.exists() or p.is_symlink()) and _mtime(p) != t:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            raise


def _mtime(path):
    p = Path(path)
    return p.stat().st_mtime_ns if p.exists() else None


def snakemake_job(snakemake):
    """Set up a Snakemake script job: imports confined to the job's own environment (see
    :func:`isolate_imports`), stderr (tracebacks, tqdm) and the maskworks log sent to the
    job's log file, and a first log line saying which maskworks and Python run the job."""
    isolate_imports()
    if snakemake.log:
        sys.stderr = open(str(snakemake.log[0]), "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    log.info("rule %s: maskworks %s from %s; python %s (environment %s)", snakemake.rule, __version__,
             Path(__file__).resolve().parent, sys.executable, sys.prefix)
    sys.excepthook = functools.partial(_job_excepthook, snakemake.rule, sys.excepthook)


def _job_excepthook(rule, default, kind, exc, tb):
    """Bad input and an output that cannot be written end a job with their message, as on the
    command line; anything else with a traceback."""
    message = str(exc) if issubclass(kind, InputError) else write_failure(exc)
    if message is not None:
        print(f"maskworks {rule}: error: {message}", file=sys.stderr)
    else:
        default(kind, exc, tb)


# OS errors that mean "the output cannot be written here" (a person can fix them), not a bug.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_failure(exc) -> str | None:
    """The message for an output that could not be written (full or read-only disk, no permission),
    or None when ``exc`` is something else.  Libraries that turn the OSError into their own error
    (zarr: a KeyError) keep it as the cause, so the chain is searched."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            where = f" {exc.filename}" if exc.filename else ""
            return (f"cannot write{where}: {exc.strerror or exc}; earlier outputs are left as they were - "
                    "free space or choose a writable output folder, then rerun")
        exc = exc.__cause__ or exc.__context__
    return None


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


# ----------------------------------------------------------------------------- command line


def _add_demo(sub):
    p = sub.add_parser("demo-data", help="write the deterministic synthetic demo data")
    p.add_argument("out_dir", help="folder to write into (e.g. demo_data)")
    p.set_defaults(run=_run_demo_data)
    p = sub.add_parser("demo-summary", help="print where the demo results and QC pictures are")
    p.add_argument("--results", default="results")
    p.set_defaults(run=lambda a: demo_summary(a.results))


def _run_demo_data(a):
    from .demo import write_demo_data

    for name, path in sorted(write_demo_data(a.out_dir).items()):
        print(f"{name}: {path}")


def demo_summary(results="results"):
    """Print the demo's outputs: final masks with their scores against the ground truth,
    the other arms' main outputs, and every QC picture."""
    import json

    root = Path(results)
    if not root.is_dir():
        print(f"no results under {root}/", file=sys.stderr)
        return 1
    print("\nmaskworks demo results")
    for s in sorted(root.glob("em/*/*_final_stats.json")):
        st = json.loads(s.read_text())
        method = s.name.split("_final_stats.json")[0]
        truth = st.get("truth", {})
        print(f"  em {s.parent.name} ({method}): {s.parent / (method + '_final.zarr')}  masked {st['fraction_out']:.1%}"
              + (f"  Dice vs truth {truth['dice']:.3f}" if truth else ""))
    for d in sorted(root.glob("cryoet/patches/*")):
        print(f"  cryo-ET patches {d.name}: {d / 'imagesCorr'}, {d / 'labelsCorr'}")
    for d in sorted(root.glob("cryoet/merged/*")):
        print(f"  cryo-ET training labels {d.name}: {d} (report.csv)")
    for s in sorted(root.glob("cryoet/refine/*_refine_stats.csv")):
        print(f"  copick run {s.name.split('_refine_stats')[0]}: refined organelles/membranes written to copick; {s}")
    for d in sorted(root.glob("codex/*/stitch")):
        print(f"  CODEX {d.parent.name}: {d / 'cell.ome.tif'} ... cells.csv")
    for d in sorted(root.glob("codex/*/quantify")):
        print(f"  CODEX {d.parent.name} per-cell tables: {d / 'cell_by_marker.csv'}, cell_metadata.csv, "
              "cells.h5ad (AnnData with spatial neighbours)")
    print("  QC pictures:")
    for png in sorted(root.glob("**/*.png")):
        print(f"    {png}")
    return 0


def build_parser(argv=None):
    """The ``maskworks`` parser.  With ``argv`` that names a stage, only that stage's arm is
    imported and registered (the start-up cost of one run); otherwise every arm."""
    parser = argparse.ArgumentParser(prog="maskworks", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"maskworks {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="STAGE",
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=argparse.ArgumentDefaultsHelpFormatter),
    )
    command = next((a for a in (argv or ()) if not a.startswith("-")), None)
    arms = [arm for arm in ARMS if command in COMMANDS[arm]] or ARMS
    for arm in arms:
        importlib.import_module(arm).add_commands(sub)
    _add_demo(sub)
    return parser


def main(argv=None):
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        result = args.run(args)
    except InputError as exc:
        print(f"maskworks {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = write_failure(exc)
        if message is None:
            raise
        print(f"maskworks {args.command}: error: {message}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
