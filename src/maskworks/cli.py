"""``maskworks <stage>``: every workflow stage on the command line.

Each arm's ``stages`` module holds the file-level runners (read through
:mod:`maskworks.io`, one library call, one transaction of outputs, a stats JSON, a QC
PNG) that the Snakemake scripts call too, and registers its commands here; their shared
kit is :mod:`maskworks.jobs`.  This module is only the command line: the parser and
the exit statuses.  Option names are the config keys with dashes; defaults come from
the library functions' signatures.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys

from . import __version__
from .io.errors import InputError
from .jobs import ending, failure, stop_on_sigterm

log = logging.getLogger("maskworks")

# Modules with an ``add_commands(subparsers)``; imported when the parser is built.
ARMS = ["maskworks.em.stages", "maskworks.cryoet.stages", "maskworks.codex.stages"]
# The commands each arm registers: a run of one stage imports only its arm (each arm pulls in
# its own libraries), the full parser (``--help``, an unknown command) imports them all.
COMMANDS = {
    "maskworks.em.stages": ("texture-mask", "postprocess-mask", "train-unet", "predict-unet"),
    "maskworks.cryoet.stages": ("propose-centres", "extract-patches", "merge-corrections", "export-training",
                                "refine-membranes", "copick-runs", "refine-summary"),
    "maskworks.codex.stages": ("tile-image", "segment-cells", "download-mesmer-model", "repair-masks",
                               "stitch", "quantify", "write-spatialdata"),
}


# ----------------------------------------------------------------------------- command line


def _add_demo(sub):
    p = sub.add_parser("demo-data", help="write the deterministic synthetic demo data")
    p.add_argument("out_dir", help="folder to write into (e.g. demo_data)")
    p.add_argument("--arms", help="comma list of em, cryoet, codex, copick; if not given, every part this "
                   "environment can write (the copick project needs copick: the cryo-ET environment)")
    p.set_defaults(run=_run_demo_data)
    p = sub.add_parser("demo-copick-project", help="write a copick project of many small generated runs, a few "
                       "lacking their membranes (the refinement's scale test; needs copick)")
    p.add_argument("out_dir", help="folder to write into (the project is OUT_DIR/copick)")
    p.add_argument("--runs", type=int, default=300, help="number of runs")
    p.add_argument("--lacking", type=int, default=3, help="runs (the last ones) without a membrane segmentation")
    p.set_defaults(run=_run_demo_copick_project)
    p = sub.add_parser("demo-summary", help="print where the demo results and QC pictures are")
    p.add_argument("--results", default="results")
    p.set_defaults(run=_run_demo_summary)


def _run_demo_copick_project(a):
    from .demo import write_copick_project_of_runs

    if a.runs < 1 or not 0 <= a.lacking <= a.runs:
        raise InputError(f"--runs {a.runs} --lacking {a.lacking}: need runs >= 1 and 0 <= lacking <= runs")
    done = write_copick_project_of_runs(a.out_dir, a.runs, lacking=a.lacking)
    print(f"copick project: {done['config']} ({a.runs} runs, lacking membranes: {', '.join(done['lacking']) or 'none'})")


def _run_demo_summary(a):
    from .demo import summary

    return summary(a.results)


def _run_demo_data(a):
    from .demo import default_arms, write_demo_data

    arms = [s.strip() for s in a.arms.split(",") if s.strip()] if a.arms else default_arms()
    for name, path in sorted(write_demo_data(a.out_dir, arms).items()):
        print(f"{name}: {path}")
    if not a.arms and "copick" not in arms:
        print("copick project not written: copick is not installed in this environment; write it with the "
              "cryo-ET environment: .venv-cryoet/bin/maskworks demo-data DIR --arms copick", file=sys.stderr)


def build_parser(argv=None):
    """The ``maskworks`` parser.  With ``argv`` that names a stage, only that stage's arm is
    imported and registered (the start-up cost of one run); otherwise every arm."""
    parser = argparse.ArgumentParser(prog="maskworks", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"maskworks {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--ome-zarr-version", choices=["0.4", "0.5"],
                        help="OME-Zarr version of .zarr outputs; if not given, 0.5 (Zarr v3) where zarr 3 is "
                             "installed, else 0.4")
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
    """Run one stage; returns the exit status (0 done, 2 bad input or an output that cannot be
    written, 3 out of memory, 4 a service the input lives on cannot be reached, 130/143 stopped by
    SIGINT/SIGTERM) after one line on stderr."""
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    stop_on_sigterm()
    try:
        if args.ome_zarr_version:
            from .io.volumes import set_ome_zarr_version

            set_ome_zarr_version(args.ome_zarr_version)
        result = args.run(args)
    except BaseException as exc:
        known = failure(exc)
        if known is None:
            raise
        code, message = known
        print(ending(args.command, code, message), file=sys.stderr)
        return code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
