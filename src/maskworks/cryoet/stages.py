"""File-level runners of the cryo-ET stages and their ``maskworks`` commands.

Like :mod:`maskworks.em.stages`: read through :mod:`maskworks.io`, one library call,
atomic writes, a stats/report file and a QC PNG; the Snakemake scripts call the
same runners.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from ..io import (
    InputError,
    atomic_path,
    convert_length,
    read_volume,
    strip_extension,
    transaction,
    write_csv,
    write_volume,
)
from ..io.coordinates import read_centres
from ..io.outputs import check_outputs, fault_point, safe_name
from ..io.params import DEVICE, Choice, Flag, Number, Text, checked
from ..jobs import about, keyword_defaults, provenance
from .corrections import merge_corrections, plan_corrections, transposition_evidence
from .patches import EDGE_POLICIES, class_counts, iter_patches, plan_patches
from .proposals import propose_centres

log = logging.getLogger("maskworks")


def add_commands(sub):
    """Register ``propose-centres``, ``extract-patches``, ``merge-corrections``, ``export-training``,
    ``refine-membranes``, ``copick-runs`` and ``refine-summary``."""
    _add_extract(sub)
    _add_merge(sub)
    _add_refine(sub)
    _add_copick_runs(sub)
    _add_refine_summary(sub)
    _add_export_training(sub)
    _add_propose_centres(sub)


# ----------------------------------------------------------------------------- extract_patches

PATCH_FORMATS = ("nrrd", "nii.gz")
QC_LABELLED_PATCHES = 200  # the QC picture names each patch up to this many
# Output extension for each --format of merge-corrections (None: the label's own).
_MERGE_EXTENSIONS = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "mrc": ".mrc", "tif": ".tif", "zarr": ".zarr"}
_MANIFEST_COLUMNS = [
    "index", "N", "x", "y", "z", "start_z", "start_y", "start_x", "padded_voxels", "status", "reason",
    "background_voxels", "foreground_voxels", "ignore_voxels", "image", "label",
]
_REPORT_COLUMNS = [
    "key", "label", "status", "removed_voxels", "added_voxels", "ignored_voxels", "border_voxels",
    "background_voxels", "foreground_voxels", "ignore_voxels", "add", "remove", "ignore", "output", "geometry",
    "note",
]


def _centres_from(centres, x, y, z):
    if centres is not None and any(v is not None for v in (x, y, z)):
        raise InputError("give the patch centres either as a CSV (centres, --centres) or as x, y, z, not both")
    if centres is not None:
        return read_centres(centres), str(centres)
    if any(v is None for v in (x, y, z)):
        raise InputError("no patch centres: give a CSV of x,y,z (--centres) or all three of --x, --y, --z")
    return np.array([[x, y, z]], dtype=np.float64), f"centre x={x:g}, y={y:g}, z={z:g}"


def _existing_keys(*folders):
    return {strip_extension(p.name) for d in folders if d.is_dir() for p in d.iterdir()}


@checked(
    iter_patches,
    ds_token=Text(r"^[^_/\\\s]+$", "a non-empty word without underscores, slashes or spaces (the part before "
                  "the first '_' of a patch name is read back as the data set)"),
    token=Text(r"^[^/\\]+$", "a non-empty name without slashes", nullable=True),
    idx_add=Number(integer=True, minimum=0),
    format=Choice(PATCH_FORMATS),
)
def extract_patches_files(
    tomogram, segmentation, out_dir, *, centres=None, x=None, y=None, z=None, ds_token="other",
    token=None, idx_add=0, format="nrrd", manifest=None, qc=None, **params,
):
    """Run :func:`maskworks.cryoet.patches.iter_patches` on files and write every patch.

    Writes ``out_dir/imagesCorr/<ds_token>_<token>_patch<N>.<format>`` and the
    same name under ``labelsCorr/``, with the tomogram's voxel size and the
    patch's physical position as origin, so viewers overlay them on the
    tomogram.  ``N`` is the centre's row + ``idx_add``, moved on to the next
    number that no file in either folder (of any extension) has yet, so other
    patches are never overwritten; a centre the folder's manifest lists as
    written before (same data set, token, format and x, y, z) keeps its number,
    so a rerun rewrites the same files instead of adding copies.  Also writes
    ``manifest`` (default ``out_dir/manifest.csv``: the patches of earlier runs
    still in the folder, then one row per centre of this run, skipped ones
    with the reason; patch files it does not know are listed as ``existing``)
    and ``qc`` (default ``out_dir/patches_qc.png``).  The outputs are one
    transaction: on failure nothing in the folder changes.  ``params``: ``patch_size``,
    ``border``, ``edge``, ``binarize`` of ``iter_patches``.
    """
    out_dir = Path(out_dir)
    params = {**keyword_defaults(iter_patches), **params}
    token = strip_extension(Path(tomogram).name) if token is None else token
    manifest = Path(manifest) if manifest is not None else out_dir / "manifest.csv"
    qc = Path(qc) if qc is not None else out_dir / "patches_qc.png"
    inputs = [tomogram, segmentation, centres]
    with transaction(manifest, qc, inputs=inputs) as txn:
        names, kept, xyz, source, tomo, seg = _plan_extraction(
            tomogram, segmentation, out_dir, centres, x, y, z, ds_token, token, idx_add, format, manifest, params)
        txn.add([out_dir / sub / name for _, name in names.values() for sub in ("imagesCorr", "labelsCorr")],
                inputs=inputs)
        return _extract_patches_files(tomogram, segmentation, out_dir, tomo, seg, xyz, source, names,
                                      manifest, qc, params, kept)


def _plan_extraction(tomogram, segmentation, out_dir, centres, x, y, z, ds_token, token, idx_add, format, manifest,
                     params):
    """Read the centres and the volumes' headers and name every patch: ``(names, kept, xyz, source,
    tomo, seg)`` with ``names[row] = (N, file name)`` and ``kept`` the earlier manifest rows that stay."""
    xyz, source = _centres_from(centres, x, y, z)
    tomo = read_volume(tomogram, ndim=3, lazy=True, check_finite=False)
    seg = read_volume(segmentation, ndim=3, lazy=True, check_finite=False)
    if tomo.shape != seg.shape:
        raise InputError(
            f"{tomogram} has shape {tomo.shape} but its segmentation {segmentation} has shape {seg.shape}; "
            "they must cover the same voxels (z, y, x)"
        )
    if seg.unit is not None and \
            not np.allclose(convert_length(seg.voxel_size, seg.unit, tomo.unit), tomo.voxel_size, rtol=1e-3):
        log.warning("%s has voxel size %s %s but %s has %s %s; the tomogram's is written",
                    segmentation, seg.voxel_size, seg.unit, tomogram, tomo.voxel_size, tomo.unit)
    try:
        plans = plan_patches(tomo.shape, xyz, patch_size=params["patch_size"], edge=params["edge"])
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    earlier = _earlier_patches(manifest, out_dir)
    prefix = safe_name(f"{ds_token}_{token}_patch", f"patch names from ds_token {ds_token!r} and token {token!r}")
    # a centre written before (same data set, token, format and x, y, z) keeps its number: a rerun
    # rewrites the same files; only new centres take new numbers
    again = {}
    for r in earlier:
        name = Path(r["image"]).name
        if name.startswith(prefix) and name == f"{prefix}{r['N']}.{format}" and r["xyz"] is not None:
            again.setdefault(r["xyz"], int(r["N"]))
    taken = _existing_keys(out_dir / "imagesCorr", out_dir / "labelsCorr")
    numbers_again = set(again.values())
    names, reused = {}, set()
    for plan in plans:
        if plan.reason is None:
            key = tuple(round(float(v), 6) for v in xyz[plan.index])
            if key in again and again[key] not in reused:
                n = again[key]
                reused.add(n)
            else:
                n = plan.index + int(idx_add)
                while f"{prefix}{n}" in taken or n in numbers_again:
                    n += 1
            taken.add(f"{prefix}{n}")
            names[plan.index] = (n, f"{prefix}{n}.{format}")
    rewritten = {f"imagesCorr/{name}" for _, name in names.values()}
    kept = [r["row"] for r in earlier if r["row"].get("image") not in rewritten]
    return names, kept, xyz, source, tomo, seg


def _earlier_patches(manifest, out_dir):
    """The patches already in ``out_dir``: the rows of its manifest whose files are still there, and
    a row (status ``existing``) for every other patch file found in ``imagesCorr``."""
    import csv

    rows, listed = [], set()
    if manifest.is_file():
        with open(manifest, newline="") as fh:
            for r in csv.DictReader(fh):
                image = r.get("image") or ""
                if r.get("status") not in ("written", "existing") or not image or not (out_dir / image).exists():
                    continue
                try:
                    xyz = tuple(round(float(r[k]), 6) for k in ("x", "y", "z"))
                except (KeyError, TypeError, ValueError):
                    xyz = None
                rows.append({"row": {k: r.get(k, "") for k in _MANIFEST_COLUMNS}, "image": image,
                             "N": r.get("N", ""), "xyz": xyz})
                listed.add(image)
    images = out_dir / "imagesCorr"
    for p in sorted(images.iterdir()) if images.is_dir() else []:
        image = f"imagesCorr/{p.name}"
        if image in listed or p.name.startswith("."):
            continue
        label = out_dir / "labelsCorr" / p.name
        row = dict.fromkeys(_MANIFEST_COLUMNS, "")
        row.update(status="existing", reason="not written by extract-patches' runs listed here",
                   image=image, label=f"labelsCorr/{p.name}" if label.exists() else "")
        rows.append({"row": row, "image": image, "N": "", "xyz": None})
    return rows


def _extract_patches_files(tomogram, segmentation, out_dir, tomo, seg, xyz, source, names, manifest, qc, params,
                           kept=()):
    from tqdm import tqdm

    prov = provenance("extract_patches", {"tomogram": tomogram, "segmentation": segmentation}, params)
    log.info("extract_patches %s shape=%s voxel_size=%s %s: %d centres from %s, params=%s",
             tomogram, tomo.shape, tomo.voxel_size, tomo.unit, len(xyz), source, params)
    rows, shown, pad_value = [], [], None
    try:
        patches = iter_patches(tomo.data, seg.data, xyz, **params)
        for p in tqdm(patches, total=len(xyz), desc="extract_patches", unit="patch", file=sys.stderr,
                      disable=len(xyz) < 2):
            row = {"index": p.index, "x": p.centre[0], "y": p.centre[1], "z": p.centre[2],
                   "start_z": p.start[0], "start_y": p.start[1], "start_x": p.start[2],
                   "padded_voxels": p.padded_voxels}
            if p.reason is not None:
                rows.append({**row, "status": "skipped", "reason": p.reason})
                continue
            n, name = names[p.index]
            origin = tuple(o + s * v for o, s, v in zip(tomo.origin, p.start, tomo.voxel_size))
            for sub, data in (("imagesCorr", p.image), ("labelsCorr", p.label)):
                write_volume(out_dir / sub / name, data, tomo.voxel_size, unit=tomo.unit, origin=origin,
                             provenance=prov)
            pad_value = p.pad_value if p.pad_value is not None else pad_value
            rows.append({**row, "N": n, "status": "written", "reason": "padded" if p.padded_voxels else "",
                         **class_counts(p.label), "image": f"imagesCorr/{name}", "label": f"labelsCorr/{name}"})
            if len(shown) < 4:
                shown.append((n, p.image[p.image.shape[0] // 2], p.label[p.label.shape[0] // 2]))
    except InputError as exc:
        raise InputError(f"{exc} (tomogram {tomogram}, segmentation {segmentation}, centres {source})") from None
    written = [r for r in rows if r["status"] == "written"]
    stats = {
        "tomogram": str(tomogram), "segmentation": str(segmentation), "shape": list(tomo.shape),
        "voxel_size": list(tomo.voxel_size), "unit": tomo.unit, "centres": len(rows),
        "written": len(written), "skipped": len(rows) - len(written),
        "padded": sum(1 for r in written if r["padded_voxels"]), "pad_value": pad_value,
        "files": [r["label"] for r in written], "manifest": str(manifest), "qc": str(qc),
    }
    _patches_qc(qc, tomo, plans_rows=rows, shown=shown, size=params["patch_size"],
                title=f"extract_patches: {Path(str(tomogram)).name}  {stats['written']} written "
                f"({stats['padded']} padded), {stats['skipped']} skipped")
    write_csv(manifest, [*kept, *rows], _MANIFEST_COLUMNS)  # every patch in the folder
    stats["listed_from_earlier_runs"] = len(kept)
    log.info("extract_patches done: %s", {k: stats[k] for k in ("written", "skipped", "padded")})
    return stats


def _patches_qc(path, tomo, *, plans_rows, shown, size, title):
    """The tomogram's middle z-slice with every patch's x/y box, and a few patches with their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(4.5 * (1 + len(shown)), 4.8), squeeze=False)
    axes = axes[0]
    zmid = tomo.shape[0] // 2
    plane = np.asarray(tomo.data[zmid], dtype=np.float32)
    lo, hi = np.percentile(plane, [1, 99])
    axes[0].imshow(plane, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    colours = {"written": "#34c759", "padded": "#ffcc00", "skipped": "#ff3b30"}
    kinds = np.array(["skipped" if r["status"] == "skipped" else "padded" if r["padded_voxels"] else "written"
                      for r in plans_rows])
    corners = np.array([(r["start_x"] - 0.5, r["start_y"] - 0.5) for r in plans_rows], dtype=np.float64)
    square = np.array([(0, 0), (size, 0), (size, size), (0, size)], dtype=np.float64)
    labelled = len(plans_rows) <= QC_LABELLED_PATCHES  # beyond, the labels would cover the picture
    for kind, colour in colours.items():  # one collection per kind: the same cost for 10 or 10^5 patches
        boxes = corners[kinds == kind] if len(corners) else corners
        axes[0].add_collection(PolyCollection(boxes[:, None, :] + square[None], facecolors="none",
                                              edgecolors=colour, linewidths=1.2 if labelled else 0.4))
    for r, kind in zip(plans_rows if labelled else (), kinds):
        axes[0].text(r["start_x"] + 2, r["start_y"] + 2, f"N={r['N']}" if "N" in r else f"row {r['index']}",
                     color=colours[kind], fontsize=9, fontweight="bold", ha="left", va="top",
                     bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "edgecolor": "none"})
    for kind, colour in colours.items():
        axes[0].plot([], [], color=colour, label=kind)
    axes[0].legend(loc="lower left", fontsize=7, framealpha=0.7)
    axes[0].set_title(f"z = {zmid} (all patches' x/y boxes)", fontsize=9)
    overlay = ListedColormap([(0, 0, 0, 0), (1.0, 0.23, 0.19, 0.45), (0.04, 0.52, 1.0, 0.3)])
    for ax, (n, image, label) in zip(axes[1:], shown):
        ilo, ihi = np.percentile(image, [1, 99])
        ax.imshow(image, cmap="gray", vmin=ilo, vmax=ihi if ihi > ilo else ilo + 1, interpolation="nearest")
        ax.imshow(label, cmap=overlay, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"patch {n}, middle z (red 1, blue ignore)", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)


def _add_extract(sub):
    d = {**keyword_defaults(iter_patches), **keyword_defaults(extract_patches_files)}
    p = sub.add_parser("extract-patches",
                       help="cut image/label patches around centres for correction (MemBrain-seg layout)")
    p.add_argument("tomogram", help="tomogram: .mrc/.rec, or any volume format")
    p.add_argument("segmentation", help="its 0/1 membrane segmentation, same shape")
    p.add_argument("out_dir", help="folder for imagesCorr/, labelsCorr/, the manifest and the QC picture")
    p.add_argument("--centres", help="CSV of patch centres x,y,z in voxels (a header row and floats are fine)")
    p.add_argument("--x", type=float, help="one centre's x (with --y and --z) instead of --centres")
    p.add_argument("--y", type=float)
    p.add_argument("--z", type=float)
    p.add_argument("--patch-size", type=int, default=d["patch_size"], help="side of the cube (voxels)")
    p.add_argument("--border", type=int, default=d["border"], help="label shell set to 2 (ignore), voxels")
    p.add_argument("--ds-token", default=d["ds_token"], help="data-set word of the names (no underscores)")
    p.add_argument("--token", help="tomogram word of the names; if not given, the tomogram's file name stem")
    p.add_argument("--idx-add", type=int, default=d["idx_add"], help="added to the row index to number patches")
    p.add_argument("--edge", choices=EDGE_POLICIES, default=d["edge"],
                   help="patches past the edge: pad (mean / ignore), skip (listed in the manifest) or error")
    p.add_argument("--format", choices=PATCH_FORMATS, default=d["format"], help="patch file format")
    p.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=d["binarize"],
                   help="turn every nonzero segmentation value into 1 (else values other than 0/1 are an error)")
    p.add_argument("--manifest", help="manifest CSV; if not given, OUT_DIR/manifest.csv")
    p.add_argument("--qc", help="QC PNG; if not given, OUT_DIR/patches_qc.png")
    p.add_argument("--image-dtype", help="dtype of the image patches (e.g. float32); if not given, the tomogram's")
    p.set_defaults(run=_run_extract)


def _run_extract(a):
    return extract_patches_files(
        a.tomogram, a.segmentation, a.out_dir, centres=a.centres, x=a.x, y=a.y, z=a.z,
        ds_token=a.ds_token, token=a.token, idx_add=a.idx_add, format=a.format, manifest=a.manifest,
        qc=a.qc, patch_size=a.patch_size, border=a.border, edge=a.edge, binarize=a.binarize,
        image_dtype=a.image_dtype,
    )


# ----------------------------------------------------------------------------- merge_corrections


def _carries_geometry(vol):
    """False for a file that carries no geometry: voxel size 1 and origin 0 (what napari and many
    scripts write), whatever unit it names."""
    return any(v != 1 for v in vol.voxel_size) or any(o != 0 for o in vol.origin)


def _check_same_patch(label, mask) -> str:
    """A mask and its label must cover the same voxels: same shape and, where both files carry
    a geometry, the same voxel size, origin (to half a voxel) and axis directions.  Returns
    ``checked``, or ``none`` for a mask without geometry (accepted on its shape, with a warning)."""
    if mask.shape != label.shape:
        raise InputError(
            f"{mask.path} has shape {mask.shape} but its label {label.path} has shape {label.shape}; "
            "a correction mask must be drawn on the label patch it corrects"
        )
    if not _carries_geometry(mask):
        if _carries_geometry(label):
            log.warning("merge_corrections: %s carries no geometry (voxel size 1, origin 0); accepted on its shape "
                        "%s, which matches %s", mask.path, mask.shape, label.path)
        return "none"
    if not _carries_geometry(label):
        return "none"
    unit = label.unit if mask.unit is not None else None
    vs = np.array(convert_length(mask.voxel_size, mask.unit, unit))
    origin = np.array(convert_length(mask.origin, mask.unit, unit))
    dirs = [v.attrs.get("direction") for v in (mask, label)]
    same_dirs = None in dirs or np.allclose(dirs[0], dirs[1], atol=1e-3)
    if not np.allclose(vs, label.voxel_size, rtol=1e-3, atol=1e-9) or not same_dirs or \
            np.any(np.abs(origin - label.origin) > 0.5 * np.array(label.voxel_size)):
        raise InputError(
            f"{mask.path} has voxel size {tuple(vs.tolist())} and origin {tuple(origin.tolist())} but its label "
            f"{label.path} has voxel size {label.voxel_size} and origin {label.origin} ({label.unit or 'no unit'})"
            + ("" if same_dirs else f", and other axis directions ({dirs[0]} vs {dirs[1]})")
            + ": was the mask drawn on another patch? Save it on the right patch or remove it"
        )
    return "checked"


def _check_axis_order(label, mask, kind, allow) -> str:
    """A mask accepted on its shape alone (no geometry to compare) must not look transposed against its
    label (:func:`transposition_evidence`): a mask saved in (x, y, z) order on a cubic patch has the right
    shape and the wrong voxels.  Refused unless ``allow`` (then accepted with a warning).  Returns the
    geometry note: ``none`` or ``none, looks transposed``."""
    ev = transposition_evidence(label.data, mask.data, kind)
    if ev is None or not ev["transposed"]:
        return "none"
    what = (f"{mask.path} carries no geometry, and its content looks transposed against its label {label.path}: "
            f"{ev['best']:.0%} of its voxels fall where a{'n' if kind == 'add' else ''} {kind.capitalize()} "
            f"mask acts with its axes in the order {ev['perm']}, {ev['own']:.0%} as saved")
    if not allow:
        raise InputError(f"{what}. Save the mask on the patch (with its geometry) in (z, y, x) order, or pass "
                         "allow_no_geometry (--allow-no-geometry) to merge it as it is")
    log.warning("merge_corrections: %s; merged as saved (allow_no_geometry)", what)
    return "none, looks transposed"


def _output_extension(label_name, key, format):
    if format is not None:
        return _MERGE_EXTENSIONS[format]
    ext = label_name[len(key):]
    return ".nrrd" if ext.lower() == ".nhdr" else ext  # a detached header cannot be written atomically


@checked(merge_corrections, format=Choice(tuple(_MERGE_EXTENSIONS), nullable=True), allow_no_geometry=Flag())
def merge_corrections_files(labels_dir, corrections_dir, out_dir, *, format=None, report=None,
                            allow_no_geometry=False, **params):
    """Run :func:`maskworks.cryoet.corrections.merge_corrections` on a folder of label patches.

    Writes ``out_dir/<key>.<ext>`` for every label (with its corrections, or
    unchanged but with the border applied when it has no folder), in the
    label's format unless ``format`` is given, and ``report`` (default
    ``out_dir/report.csv``): one row per label with the voxels each step changed
    and the final class counts, plus rows for folders without a label, masks
    with an unknown prefix and files of unknown type, which are not read.
    A mask is checked against its label: same shape and, where both carry one, the
    same geometry; a mask without geometry whose content looks transposed against
    its label (:func:`~maskworks.cryoet.corrections.transposition_evidence`) is
    refused unless ``allow_no_geometry``.  On failure none of this run's outputs is
    left.  ``params``: ``border``, ``binarize`` of ``merge_corrections``.
    """
    labels_dir, corrections_dir, out_dir = Path(labels_dir), Path(corrections_dir), Path(out_dir)
    report = Path(report) if report is not None else out_dir / "report.csv"
    with transaction(report, inputs=[labels_dir, corrections_dir]) as txn:
        items, outputs, plan, stray = _plan_merge(labels_dir, corrections_dir, out_dir, format)
        txn.add(outputs.values(), inputs=[labels_dir, corrections_dir])
        return _merge_corrections_files(labels_dir, corrections_dir, items, outputs, plan, stray, report, params,
                                        allow_no_geometry)


def _plan_merge(labels_dir, corrections_dir, out_dir, format):
    for what, d in (("labels_dir", labels_dir), ("corrections_dir", corrections_dir)):
        if not d.is_dir():
            raise InputError(f"{what} {d}: no such folder")
    entries = sorted(corrections_dir.iterdir())
    folders = {d.name: [f.name for f in d.iterdir()] for d in entries if d.is_dir()}
    plan = plan_corrections([p.name for p in labels_dir.iterdir()], folders)
    if not plan.pairs and not plan.labels_without_folder:
        found = ", ".join(plan.unknown_type[:10]) or "nothing"
        raise InputError(f"labels_dir {labels_dir} holds no label volumes (found: {found})")
    items = [(name, key, masks) for name, key, masks in plan.pairs]
    items += [(name, key, None) for name, key in plan.labels_without_folder]
    items.sort(key=lambda item: item[1])
    outputs = {key: out_dir / f"{key}{_output_extension(name, key, format)}" for name, key, _ in items}
    return items, outputs, plan, [f.name for f in entries if not f.is_dir()]


def _merge_corrections_files(labels_dir, corrections_dir, items, outputs, plan, stray, report, params,
                             allow_no_geometry=False):
    log.info("merge_corrections %s + %s: %d labels, params=%s", labels_dir, corrections_dir, len(items), params)
    rows = []
    for name, key, masks in items:
        label = read_volume(labels_dir / name, ndim=3)
        vols = {kind: [] for kind in ("add", "remove", "ignore")}
        geometry = {}
        for kind, files in (masks or {}).items():
            for f in files:
                vol = read_volume(corrections_dir / key / f, ndim=3)
                geometry[f] = _check_same_patch(label, vol)
                if geometry[f] == "none":
                    geometry[f] = _check_axis_order(label, vol, kind, allow_no_geometry)
                vols[kind].append(vol.data)
        try:
            merged, st = merge_corrections(label.data, **vols, **params)
        except InputError as exc:
            raise InputError(f"{labels_dir / name}: {exc}") from None
        folder = corrections_dir / key if masks is not None else None
        prov = provenance("merge_corrections", {"label": labels_dir / name, "corrections": folder}, params)
        write_volume(outputs[key], merged, label.voxel_size, unit=label.unit, origin=label.origin, labels=True,
                     provenance=prov)
        if masks is None:
            status, note = "no corrections folder", f"copied with the border applied; no {corrections_dir / key}/"
        else:
            status = "merged" if any(masks.values()) else "empty corrections folder"
            note = ""
        without = sorted(f for f, g in geometry.items() if g.startswith("none"))
        if without and _carries_geometry(label):
            note = "; ".join(filter(None, [note, f"geometry: none in {', '.join(without)} (accepted on shape)"]))
        rows.append({"key": key, "label": name, "status": status, **st, "output": outputs[key].name,
                     "geometry": ";".join(f"{f}:{g}" for f, g in sorted(geometry.items())),
                     "note": note, **{k: ";".join(v) for k, v in (masks or {}).items()}})
    for folder in plan.folders_without_label:
        rows.append({"key": folder, "status": "folder without label",
                     "note": f"no label file {folder}.* in {labels_dir}; its masks were not used"})
    for f in plan.unknown_prefix:
        rows.append({"key": f.split("/")[0], "status": "unknown prefix",
                     "note": f"{f}: name does not start with Add/add, Remove/remove or Ignore/ignore, the "
                             "prefixes MemBrain-seg merges (case-sensitive); not used"})
    for f in plan.unknown_type:
        rows.append({"key": f.split("/")[0] if "/" in f else strip_extension(f), "status": "unknown file type",
                     "note": f"{f if '/' in f else labels_dir / f}: not a volume file; skipped"})
    for f in stray:
        rows.append({"key": strip_extension(f), "status": "not in a patch folder",
                     "note": f"{corrections_dir / f}: masks belong in a folder named after their label; skipped"})
    if plan.labels_without_folder:
        log.warning("merge_corrections: %d label(s) have no corrections folder and are copied with the "
                    "border applied: %s", len(plan.labels_without_folder),
                    ", ".join(k for _, k in plan.labels_without_folder))
    for r in rows[len(items):]:
        log.warning("merge_corrections: %s: %s", r["status"], r["note"])
    write_csv(report, rows, _REPORT_COLUMNS)
    stats = {
        "labels": len(items), "merged": sum(1 for r in rows if r["status"] == "merged"),
        "without_folder": len(plan.labels_without_folder),
        "folders_without_label": len(plan.folders_without_label),
        "unknown_prefix": len(plan.unknown_prefix), "unknown_type": len(plan.unknown_type) + len(stray),
        "outputs": [str(p) for p in outputs.values()], "report": str(report),
    }
    log.info("merge_corrections done: %s", {k: v for k, v in stats.items() if k != "outputs"})
    return stats


def _add_merge(sub):
    d = keyword_defaults(merge_corrections)
    p = sub.add_parser("merge-corrections",
                       help="merge Add/Remove/Ignore correction masks into label patches (MemBrain-seg layout)")
    p.add_argument("--labels-dir", required=True, help="folder of label patches (0/1/2)")
    p.add_argument("--corrections-dir", required=True,
                   help="one folder per label, named after it without extension, holding Add*/Remove*/Ignore* masks")
    p.add_argument("--out-dir", required=True, help="folder for the merged labels and report.csv")
    p.add_argument("--border", type=int, default=d["border"], help="shell set to 2 (ignore) at the end, voxels")
    p.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=d["binarize"],
                   help="set label values other than 0/1/2 to 1 (else they are an error)")
    p.add_argument("--format", choices=list(_MERGE_EXTENSIONS), help="output format; if not given, the label's own")
    p.add_argument("--report", help="report CSV; if not given, OUT_DIR/report.csv")
    p.add_argument("--allow-no-geometry", action=argparse.BooleanOptionalAction, default=False,
                   help="merge a mask without geometry whose content looks transposed against its label "
                   "(default: refuse it)")
    p.set_defaults(run=_run_merge)


def _run_merge(a):
    return merge_corrections_files(a.labels_dir, a.corrections_dir, a.out_dir, format=a.format,
                                   report=a.report, border=a.border, binarize=a.binarize,
                                   allow_no_geometry=a.allow_no_geometry)


# ----------------------------------------------------------------------------- propose_centres

_PROPOSAL_COLUMNS = ["rank", "x", "y", "z", "score", "x_angstrom", "y_angstrom", "z_angstrom"]


@checked(propose_centres)
def propose_centres_files(volume_map, out, *, candidates=None, copick_candidates=None, copick_picks=None,
                          copick_picks_user="maskworks", copick_picks_session="0", **params):
    """Run :func:`maskworks.cryoet.proposals.propose_centres` on a map file; write the centres CSV.

    ``volume_map``: MemBrain-seg's uncertainty map, its ``_scores.mrc``, a probability map, any volume
    :func:`read_volume` reads (lazily).  ``out``: the CSV ``extract-patches`` reads (``x,y,z`` voxels on the
    tomogram's X/Y/Z axes, ``rank``, ``score`` and the position in angstrom).  ``candidates``: a centres
    CSV (any layout :func:`read_centres` reads, napari points too) whose positions are the only ones
    proposed; ``copick_candidates``: ``(config, run, "object[,user[,session]]")``, copick picks as the
    candidates (in angstrom, divided by the map's voxel size).  ``copick_picks``: ``(config, run,
    object)``, also write the centres as copick picks of that object (user ``copick_picks_user``,
    session ``copick_picks_session``).  ``params``: those of ``propose_centres``.
    """
    vol = read_volume(volume_map, ndim=3, lazy=True, check_finite=False)
    vs = vol.voxel_size
    vs_a = tuple(convert_length(vs, vol.unit, "angstrom")) if vol.unit is not None else None
    cands = None
    if candidates is not None:
        cands = read_centres(candidates)[:, ::-1]  # x, y, z -> z, y, x
    if copick_candidates is not None:
        from ..io import copick as cio

        config, run_name, info = copick_candidates
        if vs_a is None:
            raise InputError(f"{volume_map} carries no voxel size unit, so copick picks (in angstrom) cannot be "
                             "placed on it")
        run = cio.select_runs(cio.open_project(config), [run_name])[0]
        xyz_a, _ = cio.read_picks(run, cio.parse_segmentation_info(info, "copick candidates"))
        zyx = (xyz_a[:, ::-1] - np.array(convert_length(vol.origin, vol.unit, "angstrom"))) / np.array(vs_a)
        cands = zyx if cands is None else np.concatenate([cands, zyx])
    try:
        found = propose_centres(vol.data, candidates=cands, **params)
    except InputError as exc:
        raise InputError(f"{volume_map}: {exc}") from None
    origin_a = convert_length(vol.origin, vol.unit, "angstrom") if vs_a is not None else None
    rows = []
    for c in found:
        row = {"rank": c["rank"], "x": c["x"], "y": c["y"], "z": c["z"], "score": f"{c['score']:.6g}"}
        if vs_a is not None:
            row.update({f"{a}_angstrom": round(origin_a[i] + c[a] * vs_a[i], 3) for i, a in enumerate("zyx")})
        rows.append(row)
    with transaction(out, inputs=[volume_map, candidates]):
        write_csv(out, rows, _PROPOSAL_COLUMNS)
    if copick_picks is not None and rows:
        from ..io import copick as cio

        if vs_a is None:
            raise InputError(f"{volume_map} carries no voxel size unit: the centres cannot be written as copick "
                             "picks (in angstrom)")
        config, run_name, obj = copick_picks
        run = cio.select_runs(cio.open_project(config), [run_name])[0]
        xyz = np.array([[r["x_angstrom"], r["y_angstrom"], r["z_angstrom"]] for r in rows])
        cio.write_picks(run, obj, xyz, [c["score"] for c in found], user_id=copick_picks_user,
                        session_id=copick_picks_session)
    if len(rows) < params.get("n", 10):
        log.warning("propose_centres %s: only %d of %d centres fit (shape %s, patch %s, at least %s apart)",
                    volume_map, len(rows), params.get("n", 10), vol.shape, params.get("patch_size", 160),
                    params.get("min_distance") or params.get("patch_size", 160))
    log.info("propose_centres %s -> %s: %d centres, best score %s", volume_map, out, len(rows),
             rows[0]["score"] if rows else "-")
    return {"centres": len(rows), "out": str(out), "rows": rows}


def _add_propose_centres(sub):
    from .proposals import MAP_KINDS

    d = keyword_defaults(propose_centres)
    p = sub.add_parser("propose-centres", help="patch centres where a network is least sure: the N most uncertain "
                       "places of an uncertainty/probability/score map, a patch apart, inside the tomogram")
    p.add_argument("--map", required=True, help="uncertainty map (MemBrain-seg --store-uncertainty-map), scores "
                   "(_scores.mrc) or probabilities; any volume format")
    p.add_argument("--out", required=True, help="centres CSV to write (x,y,z voxels: extract-patches' --centres)")
    p.add_argument("--kind", choices=MAP_KINDS, default=d["kind"],
                   help="what the map holds: uncertainty (higher = less sure), probability (0.5 least sure), "
                   "scores (logits; --threshold least sure)")
    p.add_argument("--threshold", type=float, default=d["threshold"], help="the least-sure score (--kind scores)")
    p.add_argument("--n", type=int, default=d["n"], help="how many centres")
    p.add_argument("--patch-size", type=int, default=d["patch_size"], help="patch side (voxels)")
    p.add_argument("--margin", type=int, default=d["margin"], help="voxels kept between a patch and the faces")
    p.add_argument("--min-distance", type=int, help="smallest distance between centres along some axis "
                   "(default: the patch size, so patches do not overlap)")
    p.add_argument("--candidates", help="a centres CSV (x,y,z; napari points too): only these positions")
    p.add_argument("--copick-candidates", nargs=3, metavar=("CONFIG", "RUN", "OBJECT[,USER[,SESSION]]"),
                   help="copick picks as the candidate positions")
    p.add_argument("--copick-picks", nargs=3, metavar=("CONFIG", "RUN", "OBJECT"),
                   help="also write the centres as copick picks of OBJECT")
    p.add_argument("--copick-picks-user", default="maskworks", help="user ID of those picks")
    p.add_argument("--copick-picks-session", default="0", help="session ID of those picks")
    p.set_defaults(run=_run_propose_centres)


def _run_propose_centres(a):
    propose_centres_files(a.map, a.out, candidates=a.candidates, copick_candidates=a.copick_candidates,
                          copick_picks=a.copick_picks, copick_picks_user=a.copick_picks_user,
                          copick_picks_session=a.copick_picks_session, n=a.n, patch_size=a.patch_size,
                          kind=a.kind, threshold=a.threshold, margin=a.margin, min_distance=a.min_distance)


# ----------------------------------------------------------------------------- export_training

_DATASET_COLUMNS = [
    "key", "tomogram", "split", "image", "label", "source_image", "source_label", "shape_z", "shape_y", "shape_x",
    "voxel_size_in", "voxel_size_out", "unit", "background_voxels", "foreground_voxels", "ignore_voxels",
]
MEMBRAIN_PATCH = 160  # MemBrain-seg's training crop: smaller patches are padded with the ignore label


@checked(val_fraction=Number(minimum=0, maximum=1), seed=Number(integer=True, minimum=0),
         pixel_size=Number(exclusive_minimum=0, unit="angstrom", nullable=True))
def export_training_files(tomograms, out_dir, *, val_fraction=0.2, seed=0, pixel_size=None):
    """Write merged label patches and their image patches as MemBrain-seg's training data.

    ``tomograms``: ``{name: (labels_dir, images_dir)}``, the merged labels of one tomogram
    (``merge-corrections``' folder) and its image patches (``extract-patches``' ``imagesCorr``),
    paired by file name without extension.  Writes ``out_dir/imagesTr/<key>_0000.nii.gz``,
    ``labelsTr/<key>.nii.gz``, ``imagesVal``, ``labelsVal`` (the split by tomogram, seeded:
    :func:`~maskworks.cryoet.training.split_by_tomogram`), ``dataset.csv`` (one row per patch:
    split, files, shapes, voxel sizes, class counts) and ``dataset.json`` (nnU-Net's description:
    channel, labels with 2 = ignore, counts).  ``pixel_size`` (Å): resample every patch to it
    (image linear, label nearest so the ignore label stays; MemBrain-seg trains at ~10 Å), else
    keep each patch's own.  ``out_dir`` is one output, replaced whole on a rerun (files of an
    earlier split never linger), and never a folder maskworks did not write.
    """
    import json

    from .training import corner_origin_shift, resample_patch, split_by_tomogram

    if not tomograms:
        raise InputError("export_training: no tomogram given (labels and image patch folders)")
    pairs = _training_pairs(tomograms)
    train, val = split_by_tomogram(tomograms, val_fraction=val_fraction, seed=seed)
    if val_fraction and not val:
        log.warning("export_training: one tomogram (%s), so no validation set: a split by tomogram needs two "
                    "or more (give more tomograms, or val_fraction 0 to say so)", ", ".join(train))
    out_dir = Path(out_dir)
    rows, small = [], []
    inputs = [d for pair in tomograms.values() for d in pair]
    with transaction(out_dir, inputs=inputs, stores=[out_dir]), atomic_path(out_dir) as tmp:
        for name, key, image_path, label_path in pairs:
            split = "Val" if name in val else "Tr"
            label = read_volume(label_path, ndim=3)
            image = read_volume(image_path, ndim=3)
            if image.shape != label.shape:
                raise InputError(f"{image_path} has shape {image.shape} but its label {label_path} has "
                                 f"{label.shape}; a training pair covers the same voxels")
            lab = np.asarray(label.data)
            if not np.isin(lab, (0, 1, 2)).all():
                bad = sorted(set(np.unique(lab).tolist()) - {0, 1, 2})[:5]
                raise InputError(f"{label_path}: label values {bad} - training labels are 0, 1 and 2 (ignore); "
                                 "merge the corrections first")
            img, vs, unit, origin = np.asarray(image.data), image.voxel_size, image.unit, image.origin
            if pixel_size is not None:
                if unit is None:
                    raise InputError(f"{image_path} carries no voxel size unit (voxel size {vs}), so it cannot be "
                                     f"resampled to {pixel_size:g} A; write the patches with their geometry")
                vs_a = tuple(convert_length(vs, unit, "angstrom"))
                img, lab, new_vs = resample_patch(img, lab, vs_a, (float(pixel_size),) * 3)
                shift = corner_origin_shift(vs_a, new_vs)
                origin = tuple(o + d for o, d in zip(convert_length(origin, unit, "angstrom"), shift))
                vs, unit = new_vs, "angstrom"
            if min(lab.shape) < MEMBRAIN_PATCH:
                small.append(key)
            files = {"image": f"images{split}/{key}_0000.nii.gz", "label": f"labels{split}/{key}.nii.gz"}
            prov = provenance("export_training", {"image": image_path, "label": label_path},
                              {"pixel_size": pixel_size, "split": split})
            write_volume(tmp / files["image"], img, vs, unit=unit, origin=origin, provenance=prov)
            write_volume(tmp / files["label"], lab.astype(np.uint8), vs, unit=unit, origin=origin, labels=True,
                         provenance=prov)
            rows.append({"key": key, "tomogram": name, "split": split, **files, "source_image": str(image_path),
                         "source_label": str(label_path), **dict(zip(("shape_z", "shape_y", "shape_x"), lab.shape)),
                         "voxel_size_in": " ".join(f"{v:g}" for v in label.voxel_size),
                         "voxel_size_out": " ".join(f"{v:g}" for v in vs), "unit": unit or "",
                         **class_counts(lab)})
        write_csv(tmp / "dataset.csv", rows, _DATASET_COLUMNS)
        (tmp / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "cryo-ET"}, "labels": {"background": 0, "membrane": 1, "ignore": 2},
            "numTraining": sum(r["split"] == "Tr" for r in rows),
            "numValidation": sum(r["split"] == "Val" for r in rows), "file_ending": ".nii.gz",
            "training_tomograms": train, "validation_tomograms": val, "seed": int(seed),
            "pixel_size_angstrom": pixel_size, "made_by": "maskworks export-training"}, indent=2) + "\n")
    if small:
        log.warning("export_training: %d patch(es) smaller than MemBrain-seg's %d-voxel training crop (it pads "
                    "them with the ignore label): %s", len(small), MEMBRAIN_PATCH, ", ".join(small[:10]))
    stats = {"patches": len(rows), "train": sum(r["split"] == "Tr" for r in rows),
             "val": sum(r["split"] == "Val" for r in rows), "training_tomograms": train,
             "validation_tomograms": val, "out_dir": str(out_dir)}
    log.info("export_training: %s", stats)
    return stats


def _training_pairs(tomograms) -> list[tuple[str, str, Path, Path]]:
    """``(tomogram, key, image, label)`` of every label patch, sorted; every label needs its image."""
    from .corrections import volume_format

    pairs, seen = [], {}
    for name, (labels_dir, images_dir) in sorted(tomograms.items()):
        labels_dir, images_dir = Path(labels_dir), Path(images_dir)
        for what, d in (("labels folder", labels_dir), ("image patches folder", images_dir)):
            if not d.is_dir():
                raise InputError(f"tomogram {name}: {what} {d}: no such folder")
        images = {strip_extension(p.name): p for p in images_dir.iterdir()
                  if not p.name.startswith(".") and volume_format(p.name)}
        labels = sorted(p for p in labels_dir.iterdir() if not p.name.startswith(".") and volume_format(p.name))
        if not labels:
            raise InputError(f"tomogram {name}: {labels_dir} holds no label patches")
        for label in labels:
            key = strip_extension(label.name)
            if key not in images:
                raise InputError(f"tomogram {name}: label patch {label} has no image patch {key}.* in {images_dir}")
            if key in seen:
                raise InputError(f"patch key {key} is in tomogram {seen[key]} and in {name}: training file names "
                                 "must be unique (extract-patches names patches <ds_token>_<tomogram>_patch<N>)")
            seen[key] = name
            pairs.append((name, key, images[key], label))
    return pairs


def _add_export_training(sub):
    p = sub.add_parser("export-training", help="merged label patches + image patches -> MemBrain-seg's training "
                       "layout (imagesTr/labelsTr/imagesVal/labelsVal), split by tomogram, optionally resampled")
    p.add_argument("--tomogram", nargs=3, action="append", required=True, metavar=("NAME", "LABELS_DIR", "IMAGES_DIR"),
                   help="a tomogram's merged labels (merge-corrections' folder) and image patches (imagesCorr); "
                   "repeat for each tomogram")
    p.add_argument("--out-dir", required=True, help="folder to write (replaced whole on a rerun)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the tomograms for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--pixel-size", type=float, help="resample every patch to this voxel size (angstrom); "
                   "MemBrain-seg trains at ~10")
    p.set_defaults(run=_run_export_training)


def _run_export_training(a):
    tomograms = {}
    for name, labels_dir, images_dir in a.tomogram:
        if name in tomograms:
            raise InputError(f"--tomogram {name} is given twice")
        tomograms[name] = (labels_dir, images_dir)
    export_training_files(tomograms, a.out_dir, val_fraction=a.val_fraction, seed=a.seed, pixel_size=a.pixel_size)


# ----------------------------------------------------------------------------- refine_membranes

_REFINE_COLUMNS = [
    "run", "organelle_id", "kept", "reason", "elongated", "voxels_in", "voxels_refined", "voxels_out",
    "membrane_voxels_out", "volume_nm3", "surface_area_nm2", "box_z0", "box_y0", "box_x0", "box_z1", "box_y1", "box_x1",
    "run_membrane_voxels_in", "run_membrane_voxels_cleaned", "run_membrane_voxels_out", "device", "note",
]


@checked(
    voxel_size=Number(exclusive_minimum=0, unit="angstrom"),
    save_session_id=Text(r"^[^/\\\s]+$", "a non-empty session id without slashes or spaces"),
    device=DEVICE,
    fill_missing=Flag(),
    allow_empty_output=Flag(),
    org_output_name=Text(r"^[^/\\\s]+$", "a copick object name without slashes or spaces", nullable=True),
    mem_output_name=Text(r"^[^/\\\s]+$", "a copick object name without slashes or spaces", nullable=True),
    output_user_id=Text(r"^[^/\\\s]+$", "a user id without slashes or spaces", nullable=True),
    keep_going=Flag(),
)
def refine_membranes_files(
    config, *, org_info, mem_info, voxel_size=10.0, save_session_id="1", run=None, qc_dir=None,
    stats=None, device="auto", fill_missing=False, allow_empty_output=False, org_output_name=None,
    mem_output_name=None, output_user_id=None, keep_going=False, root=None, **params,
):
    """Run :func:`maskworks.cryoet.refine.refine_membranes` on the runs of a copick project.

    For each run (``run``: a name or a list of names; None: every run, sorted),
    reads the segmentations ``org_info`` and ``mem_info`` (``name[,user[,session]]``)
    at ``voxel_size`` (Å), refines them, and writes the two results as copick
    *instance* segmentations (each voxel the id of its organelle) named
    ``org_output_name`` / ``mem_output_name`` (default ``<input name>-refined``; a
    pickable object of the project, as copick requires), under user ``output_user_id``
    (default: SABER's, ``<user>-refined`` or ``saber-refined`` when the info names no
    user) and session ``save_session_id``; only those two outputs are overwritten.  Also writes ``qc_dir/<run>_refine_qc.png`` and
    ``stats`` (CSV, one row per organelle and run, with the reason for each dropped one).

    Every run's inputs are found, and every output checked writable, before anything
    is computed.  With one run, a missing segmentation is an error at once; with
    several, the runs that have both are refined and the result's ``missing`` lists
    the others with the reason (the command line then exits 2); none at all is an
    error.  A chunk missing from an input store is an error unless ``fill_missing``
    (then it reads as zeros).  A run whose refinement keeps nothing is not written over
    a non-empty earlier output unless ``allow_empty_output``: with one run that is an
    error, with several the run is listed in ``missing`` and its row in the stats says
    so.  The outputs are one transaction: on failure the segmentations this call
    overwrote are put back as they were (new ones removed), and the pictures and stats
    are left as before.  ``params``: the filter keywords of ``refine_membranes``.

    ``keep_going`` (a batch of a project's runs, as the workflow runs them): each run is
    its own transaction, and a run that cannot be refined (a segmentation missing, an
    input that cannot be read, an empty result refused) is skipped with its reason in
    ``missing`` and in its stats row while the others are written; only a fault that
    is not the input's stops the call.  ``root``: the copick project already opened.
    """
    if keep_going:
        return _refine_each(config, run, qc_dir, stats, root, dict(
            org_info=org_info, mem_info=mem_info, voxel_size=voxel_size, save_session_id=save_session_id,
            device=device, fill_missing=fill_missing, allow_empty_output=allow_empty_output,
            org_output_name=org_output_name, mem_output_name=mem_output_name, output_user_id=output_user_id,
            **params))
    from ..backend import resolve_device
    from ..io import copick as cio
    from .refine import refine_membranes

    known = set(keyword_defaults(refine_membranes)) - {"device", "progress"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(f"refine_membranes: unknown parameter(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(sorted(known))}")
    org_spec = cio.parse_segmentation_info(org_info, "org_info")
    mem_spec = cio.parse_segmentation_info(mem_info, "mem_info")
    device = resolve_device(device)
    with transaction(stats, inputs=[config]) as txn:
        session = cio.stored_name(save_session_id, "save_session_id")
        root = root if root is not None else cio.open_project(config)
        out_names = _refined_outputs(root, config, org_spec, mem_spec, org_output_name, mem_output_name,
                                     output_user_id, session)
        runs = cio.select_runs(root, [run] if isinstance(run, str) else run)
        jobs, missing = [], {}
        for r in runs:
            try:
                org_seg, mem_seg = (cio.find_segmentation(r, org_spec, voxel_size),
                                    cio.find_segmentation(r, mem_spec, voxel_size))
            except InputError as exc:
                if len(runs) == 1:
                    raise
                missing[r.name] = str(exc)
                continue
            outputs = {}
            for role, (out_name, user) in out_names.items():
                for seg in (org_seg, mem_seg):  # the inputs found (a name-only info may find any user's)
                    if (seg.name, seg.user_id, seg.session_id, cio.segmentation_type(seg)) == \
                            (out_name, user, session, cio.output_type()):
                        raise InputError(f"run {r.name}: the refined {role} would be written over the input "
                                         f"{cio.describe_segmentation(seg)}; choose another output name, "
                                         "output_user_id or save_session_id")
                cio.check_writable(r, out_name, user_id=user, session_id=session, voxel_size=voxel_size)
                key = {"user_id": user, "session_id": session, "voxel_size": voxel_size, "kind": cio.output_type()}
                outputs[role] = (out_name, key, cio.output_store(r, out_name, **key))
            jobs.append((r, org_seg, mem_seg, outputs))
        if not jobs:
            raise InputError("no run has both segmentations: " + "; ".join(missing.values()))
        for name, _ in out_names.values():
            cio.check_instance_object(root, name, config)
        qcs = {r.name: Path(qc_dir) / f"{safe_name(r.name, 'copick run name')}_refine_qc.png"
               for r, *_ in jobs} if qc_dir is not None else {}
        stores = [store for *_, outputs in jobs for *_, store in outputs.values() if store is not None]
        txn.add([*qcs.values(), *stores], inputs=[config], owned=stores)
        result = _refine_membranes_files(config, jobs, org_spec, mem_spec, qcs, stats, device, params, missing,
                                         fill_missing=fill_missing, allow_empty_output=allow_empty_output)
    for r, name, data, key in result.pop("written"):
        cio.check_stored(r, name, data.shape, data.dtype, **key)
    return {**result, "missing": missing}


def _refine_each(config, run, qc_dir, stats, root, kwargs) -> dict:
    """refine_membranes_files(keep_going=True): one transaction per run (a run's outputs are committed
    when it is done), the project opened once, one stats file for all, written at the end."""
    from ..backend import resolve_device
    from ..io import copick as cio

    rows, runs, missing = [], [], {}
    # What is wrong for every run (the device, the project, the outputs' names) fails the call up front.
    if stats is not None:
        check_outputs([stats], inputs=[config])
    kwargs = {**kwargs, "device": resolve_device(kwargs["device"])}
    root = root if root is not None else cio.open_project(config)
    specs = [cio.parse_segmentation_info(kwargs[k], k) for k in ("org_info", "mem_info")]
    session = cio.stored_name(kwargs["save_session_id"], "save_session_id")
    for name, _ in _refined_outputs(root, config, *specs, kwargs["org_output_name"], kwargs["mem_output_name"],
                                    kwargs["output_user_id"], session).values():
        cio.check_instance_object(root, name, config)
    names = [r.name for r in cio.select_runs(root, [run] if isinstance(run, str) else run)]
    for name in names:
        try:
            result = refine_membranes_files(config, run=[name], qc_dir=qc_dir, stats=None, root=root, **kwargs)
        except InputError as exc:
            why = str(exc)
            reason = ("missing input" if isinstance(exc, cio.MissingSegmentation) else
                      "empty result not written" if "kept nothing" in why else "input cannot be used")
            log.warning("refine_membranes run %s skipped (%s): %s", name, reason, why)
            missing[name] = why
            rows.append({"run": name, "kept": False, "reason": reason, "note": why})
            continue
        rows += result["rows"]
        runs += result["runs"]
    if stats is not None:
        with transaction(stats, inputs=[config]):
            write_csv(stats, rows, _REFINE_COLUMNS)
    log.info("refine_membranes %s: %d run(s) refined, %d skipped", config, len(runs), len(missing))
    return {"runs": runs, "rows": rows, "stats": str(stats) if stats is not None else None,
            "qc": [str(Path(qc_dir) / f"{r['run']}_refine_qc.png") for r in runs] if qc_dir is not None else [],
            "missing": missing}


def _refined_outputs(root, config, org_spec, mem_spec, org_name, mem_name, user_id, session) -> dict:
    """``{"organelles": (name, user), "membranes": (name, user)}`` of the two outputs, checked: names copick
    keeps as given, never the same segmentation twice or one an input names (name, user and session alike).
    (That they are pickable objects is checked once the inputs are found: :func:`cio.check_instance_object`.)"""
    from ..io import copick as cio

    out = {}
    for role, spec, name, what in (("organelles", org_spec, org_name, "org_output_name"),
                                   ("membranes", mem_spec, mem_name, "mem_output_name")):
        name = cio.stored_name(cio.refined_name(spec, name), what)
        user = cio.stored_name(cio.refined_user_id(spec, user_id), "output_user_id")
        for other in (org_spec, mem_spec):
            if (name, user) == (other.name, other.user_id) and other.session_id in (None, session):
                raise InputError(f"{what}={name!r} under user {user!r}, session {session!r} is the input '{other}': "
                                 "refined segmentations are never written over their inputs; choose another "
                                 "output name, output_user_id or save_session_id")
        out[role] = (name, user)
    if out["organelles"] == out["membranes"]:
        raise InputError(f"org_output_name and mem_output_name both give {out['organelles'][0]!r} under user "
                         f"{out['organelles'][1]!r}: the two refined segmentations need different names")
    return out


def _refine_membranes_files(config, jobs, org_spec, mem_spec, qcs, stats, device, params, missing, *,
                            fill_missing, allow_empty_output):
    from tqdm import tqdm

    from ..io import copick as cio
    from .refine import label_boxes, label_dtype, refine_membranes

    log.info("refine_membranes %s: %d run(s), organelles '%s', membranes '%s', device %s, params=%s",
             config, len(jobs), org_spec, mem_spec, device, params)
    rows, summaries, written = [], [], []
    for r, org_seg, mem_seg, stores in tqdm(jobs, desc="refine_membranes", unit="run", file=sys.stderr,
                                    disable=len(jobs) < 2):
        org = cio.read_segmentation(org_seg, fill_missing=fill_missing)
        mem = cio.read_segmentation(mem_seg, fill_missing=fill_missing)
        if org.shape != mem.shape:
            raise InputError(f"run {r.name}: organelles {cio.describe_segmentation(org_seg)} have shape {org.shape} "
                             f"but membranes {cio.describe_segmentation(mem_seg)} have {mem.shape}")
        # The widest label the outputs can hold must be writable before any computing.
        bound = int(np.count_nonzero(org.data)) if params.get("label_components") else int(org.data.max(initial=0))
        cio.check_label_dtype(label_dtype(bound), f"run {r.name}: refined labels")
        with about(f"run {r.name}"):
            out_org, out_mem, st = refine_membranes(org.data, mem.data, device=device, **params)
        vs = org.voxel_size[0]
        outputs = [(stores[role][0], data, *stores[role][1:], cio.find_output(r, stores[role][0], **stores[role][1]))
                   for role, data in (("organelles", out_org), ("membranes", out_mem))]
        kept_old = [f"{cio.describe_segmentation(old)}" for _, data, _, _, old in outputs
                    if not np.any(data) and old is not None and not cio.is_empty(old)]
        if kept_old and not allow_empty_output:
            why = (f"the refinement kept nothing, and the earlier non-empty output(s) {', '.join(kept_old)} are "
                   "not overwritten with an empty result; check the inputs and parameters, or pass "
                   "allow_empty_output (--allow-empty-output) to write it")
            if len(jobs) == 1:
                raise InputError(f"run {r.name}: {why}")
            missing[r.name] = why
            continue
        for name, data, key, store, _ in outputs:
            if store is None:  # an overlay that is not on this machine: written through copick, not staged
                log.warning("run %s: %s goes to a copick overlay that is not on this machine; it is written "
                            "directly (a failure later in this run does not undo it)", r.name, name)
                cio.write_segmentation(r, name, data, **key)
            else:
                with atomic_path(store) as tmp:
                    cio.write_store(tmp, data, vs)
                written.append((r, name, data, key))
        fault_point("refine.run")
        if st.get("note"):
            log.warning("refine_membranes run %s: %s", r.name, st["note"])
        run_cols = {"run": r.name, "run_membrane_voxels_in": st["membrane_voxels_in"],
                    "run_membrane_voxels_cleaned": st["membrane_voxels_cleaned"],
                    "run_membrane_voxels_out": st["membrane_voxels_out"], "device": st["device"]}
        boxes = dict(label_boxes(out_org)) if st["organelles_kept"] else {}
        for rec in st["organelles"]:
            box = dict(zip(["box_z0", "box_y0", "box_x0", "box_z1", "box_y1", "box_x1"], rec["box"]))
            rows.append({**run_cols, **box, **{k: v for k, v in rec.items() if k not in ("id", "box")},
                         **_organelle_geometry(boxes, out_org, rec, vs / 10.0), "organelle_id": rec["id"],
                         "note": st.get("note", "")})
        if not st["organelles"]:
            rows.append({**run_cols, "note": st.get("note", "")})
        if r.name in qcs:
            _refine_qc(qcs[r.name], cio.read_tomogram(r, vs, org.shape), org.data, mem.data, out_org, out_mem,
                       org.voxel_size, title=f"refine_membranes: run {r.name}  {st['organelles_kept']}/"
                       f"{st['organelles_in']} organelles kept  membrane voxels {st['membrane_voxels_in']} -> "
                       f"{st['membrane_voxels_out']}")
        summaries.append({"run": r.name, **{k: v for k, v in st.items() if k != "organelles"},
                          "organelles_from": cio.describe_segmentation(org_seg),
                          "membranes_from": cio.describe_segmentation(mem_seg),
                          "written": [f"{name} (user {key['user_id']}, session {key['session_id']}, instance)"
                                      for name, key, _ in stores.values()]})
        log.info("refine_membranes run %s: %d/%d organelles kept, membrane voxels %d -> %d", r.name,
                 st["organelles_kept"], st["organelles_in"], st["membrane_voxels_in"], st["membrane_voxels_out"])
    for name, why in sorted(missing.items()):
        log.error("refine_membranes run %s not refined: %s", name, why)
        reason = "empty result not written" if "kept nothing" in why else "missing input"
        rows.append({"run": name, "kept": False, "reason": reason, "note": why})
    if stats is not None:
        write_csv(stats, rows, _REFINE_COLUMNS)
    return {"runs": summaries, "rows": rows, "stats": str(stats) if stats is not None else None,
            "qc": [str(p) for p in qcs.values()], "written": written}


def _organelle_geometry(boxes: dict, out_org, rec, vs_nm: float) -> dict:
    """Volume (nm^3) and surface area (nm^2: marching cubes at 0.5 on the organelle's own mask) of a kept
    refined organelle, ``boxes`` its bounding box in the output; empty for a dropped one."""
    box = boxes.get(rec["id"])
    if not rec.get("kept") or box is None:
        return {}
    from skimage.measure import marching_cubes, mesh_surface_area

    mine = np.pad(np.asarray(out_org[box]) == rec["id"], 1)
    verts, faces, _, _ = marching_cubes(mine.astype(np.float32), 0.5, spacing=(vs_nm,) * 3)
    return {"volume_nm3": round(float(np.count_nonzero(mine)) * vs_nm ** 3, 3),
            "surface_area_nm2": round(float(mesh_surface_area(verts, faces)), 3)}


class _PlaneView:
    """``func`` of same-shaped arrays, computed only for the planes a QC picture reads."""

    def __init__(self, func, *arrays):
        self.func, self.arrays, self.shape = func, arrays, arrays[0].shape

    def __getitem__(self, index):
        return self.func(*(np.asarray(a[index]) for a in self.arrays))


def _refine_qc(path, tomogram, org, mem, out_org, out_mem, voxel_size, *, title):
    """Mid-slices: outlines of input and refined organelles/membranes on the tomogram, and both as maps."""
    from ..io.qc import save_orthoslices

    def nonzero(a):
        return a != 0

    def both(o, m):  # organelle 0.5, membrane 1.0
        return np.where(m != 0, 1.0, np.where(o != 0, 0.5, 0.0)).astype(np.float32)

    masks = {"organelles in": _PlaneView(nonzero, org), "membranes in": _PlaneView(nonzero, mem),
             "organelles refined": _PlaneView(nonzero, out_org), "membranes refined": _PlaneView(nonzero, out_mem)}
    maps = {"input": _PlaneView(both, org, mem), "refined": _PlaneView(both, out_org, out_mem)}
    background = tomogram if tomogram is not None else _PlaneView(both, org, mem)
    save_orthoslices(path, background, masks=masks, maps=maps, voxel_size=voxel_size,
                     title=f"{title}\nmaps: organelle 0.5, membrane 1")


def _add_refine(sub):
    from .refine import refine_membranes

    d = keyword_defaults(refine_membranes)
    p = sub.add_parser("refine-membranes",
                       help="pair each organelle with its membrane in a copick project (SABER refine-membranes)")
    p.add_argument("--config", required=True, help="copick configuration JSON")
    p.add_argument("--org-info", required=True,
                   help="organelle segmentation: 'name', 'name,userID' or 'name,userID,sessionID'")
    p.add_argument("--mem-info", required=True,
                   help="membrane segmentation: 'name', 'name,userID' or 'name,userID,sessionID'")
    p.add_argument("--voxel-size", type=float, default=10.0, help="voxel size of the segmentations (angstrom)")
    p.add_argument("--save-session-id", default="1", help="session ID of the refined segmentations")
    p.add_argument("--org-output-name", help="name of the refined organelles, a pickable object of the project "
                   "(default: <organelle name>-refined)")
    p.add_argument("--mem-output-name", help="name of the refined membranes, a pickable object of the project "
                   "(default: <membrane name>-refined)")
    p.add_argument("--output-user-id", help="user ID of the refined segmentations (default: SABER's, <user>-refined "
                   "when the info names a user, else saber-refined)")
    p.add_argument("--run", dest="runs", action="append", metavar="RUN",
                   help="run to refine (repeat for several); if not given, every run")
    p.add_argument("--device", default=d["device"], help="auto, cpu, cuda or cuda:N")
    p.add_argument("--ball-size", type=int, default=d["ball_size"], help="opening ball radius (voxels)")
    p.add_argument("--min-membrane-area", type=int, default=d["min_membrane_area"],
                   help="smallest membrane component kept (voxels, 6-connected)")
    p.add_argument("--edge-trim-z", type=int, default=d["edge_trim_z"],
                   help="membrane removed in this many first/last z-slices (0: none)")
    p.add_argument("--edge-trim-xy", type=int, default=d["edge_trim_xy"],
                   help="membrane removed in this border in y and x (0: none)")
    p.add_argument("--min-roi-relative-size", type=float, default=d["min_roi_relative_size"],
                   help="organelles smaller than this fraction of the volume along any axis are dropped")
    p.add_argument("--keep-surface-membranes", action=argparse.BooleanOptionalAction,
                   default=d["keep_surface_membranes"],
                   help="keep only membrane with more than 10%% of its voxels on the organelle surface")
    p.add_argument("--label-components", action=argparse.BooleanOptionalAction, default=d["label_components"],
                   help="split the organelle mask into connected components first (for a binary mask)")
    p.add_argument("--membrane-output", choices=["dilated", "input"], default=d["membrane_output"],
                   help="refined membrane: the dilated near-membrane band (SABER) or only input membrane voxels")
    p.add_argument("--fill-missing", action=argparse.BooleanOptionalAction, default=False,
                   help="read chunks missing from an input store as zeros (default: an error)")
    p.add_argument("--allow-empty-output", action=argparse.BooleanOptionalAction, default=False,
                   help="write a result that kept nothing over a non-empty earlier output (default: refuse)")
    p.add_argument("--keep-going", action=argparse.BooleanOptionalAction, default=False,
                   help="refine each run on its own: a run that cannot be refined (missing or unreadable input, "
                   "empty result refused) is skipped with its reason in the stats and the exit status stays 0")
    p.add_argument("--qc-dir", help="folder for one QC PNG per run (<run>_refine_qc.png); if not given, none")
    p.add_argument("--stats", help="stats CSV, one row per organelle; if not given, none")
    p.set_defaults(run=_run_refine)


def _run_refine(a):
    result = refine_membranes_files(
        a.config, org_info=a.org_info, mem_info=a.mem_info, voxel_size=a.voxel_size,
        save_session_id=a.save_session_id, run=a.runs, qc_dir=a.qc_dir, stats=a.stats, device=a.device,
        ball_size=a.ball_size, min_membrane_area=a.min_membrane_area, edge_trim_z=a.edge_trim_z,
        edge_trim_xy=a.edge_trim_xy, min_roi_relative_size=a.min_roi_relative_size,
        keep_surface_membranes=a.keep_surface_membranes, label_components=a.label_components,
        membrane_output=a.membrane_output, fill_missing=a.fill_missing, allow_empty_output=a.allow_empty_output,
        org_output_name=a.org_output_name, mem_output_name=a.mem_output_name, output_user_id=a.output_user_id,
        keep_going=a.keep_going,
    )
    for name, why in sorted(result["missing"].items()):
        print(f"maskworks refine-membranes: run {name} {'skipped' if a.keep_going else 'not refined'}: {why}",
              file=sys.stderr)
    return 2 if result["missing"] and not a.keep_going else 0


# ----------------------------------------------------------------------------- copick_runs

COPICK_RUN_COLUMNS = ["run", "organelles", "membranes", "voxels", "missing"]


@checked(voxel_size=Number(exclusive_minimum=0, unit="angstrom"))
def copick_runs_files(config, out, *, org_info, mem_info, voxel_size=10.0, run=None):
    """List the runs of a copick project for the workflow (its ``copick_runs`` checkpoint): one row per
    run (``run``: a name or a list; None: every run) with the local Zarr stores of the organelle and
    membrane segmentations refine-membranes would read at ``voxel_size`` (empty where the project is
    not on this machine), the organelle segmentation's voxel count (from its header: how the workflow
    sizes its jobs), or in ``missing`` why the run lacks one.  Writes ``out`` (TSV)."""
    from ..io import copick as cio

    org_spec = cio.parse_segmentation_info(org_info, "org_info")
    mem_spec = cio.parse_segmentation_info(mem_info, "mem_info")
    with transaction(out, inputs=[config]):
        root = cio.open_project(config)
        rows = []
        for r in cio.select_runs(root, [run] if isinstance(run, str) else run):
            row = {"run": safe_name(r.name, f"{config}: copick run name"), "organelles": "", "membranes": "",
                   "missing": ""}
            for key, spec in (("organelles", org_spec), ("membranes", mem_spec)):
                try:
                    seg = cio.find_segmentation(r, spec, voxel_size)
                except InputError as exc:
                    row["missing"] = "; ".join(filter(None, [row["missing"], str(exc)]))
                    continue
                row[key] = cio.local_store(seg) or ""
                if key == "organelles":
                    row["voxels"] = cio.segmentation_voxels(seg)
            rows.append(row)
        write_csv(out, rows, COPICK_RUN_COLUMNS, delimiter="\t")
    log.info("copick_runs %s: %d run(s), %d lacking an input", config, len(rows), sum(bool(r["missing"]) for r in rows))
    return rows


def refine_summary_files(runs_table, stats, out):
    """The project-wide table of a refinement done in batches (the workflow's ``refine_summary``):
    every row of the batches' ``stats`` CSVs, and one row per run that the listing ``runs_table``
    (copick-runs' TSV) found lacking an input (``missing input``: never submitted), sorted by run and
    organelle id.  Each skipped run is logged as a warning.  Writes ``out`` (CSV); returns the counts."""
    import csv

    with open(runs_table, newline="") as fh:
        listed = {r["run"]: r for r in csv.DictReader(fh, delimiter="\t")}
    rows, done = [], set()
    for path in stats:
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                if r["run"] not in listed:
                    raise InputError(f"{path}: run {r['run']!r} is not in the project listing {runs_table}")
                rows.append(r)
                done.add(r["run"])
    for name, r in listed.items():
        if r["missing"]:
            rows.append({"run": name, "kept": False, "reason": "missing input",
                         "note": f"skipped before submission: {r['missing']}"})
        elif name not in done:
            rows.append({"run": name, "kept": False, "reason": "not refined",
                         "note": "listed with both inputs but in no batch's stats"})
    rows.sort(key=lambda r: (r["run"], int(r.get("organelle_id") or 0)))
    with transaction(out, inputs=[runs_table, *stats]):
        write_csv(out, rows, _REFINE_COLUMNS)
    skipped = {r["run"]: (r["reason"], r["note"]) for r in rows if r.get("reason") in _SKIP_REASONS}
    for name, (reason, note) in sorted(skipped.items()):
        log.warning("refine_summary: run %s skipped (%s): %s", name, reason, note)
    counts = {"runs": len(listed), "refined": len(done - set(skipped)), "skipped": len(skipped),
              "organelles_kept": sum(str(r.get("kept")) == "True" for r in rows)}
    log.info("refine_summary %s: %s", out, counts)
    return {**counts, "skipped_runs": {k: v[0] for k, v in skipped.items()}, "summary": str(out)}


_SKIP_REASONS = ("missing input", "input cannot be used", "empty result not written", "not refined")


def _add_refine_summary(sub):
    p = sub.add_parser("refine-summary", help="one table of a project's refinement done in batches: every "
                       "organelle of every run, and every skipped run with its reason")
    p.add_argument("--runs-table", required=True, help="copick-runs' TSV (the project listing)")
    p.add_argument("--stats", nargs="+", default=[], help="the batches' refine-membranes stats CSVs")
    p.add_argument("--out", required=True, help="CSV to write")
    p.set_defaults(run=_run_refine_summary)


def _run_refine_summary(a):
    refine_summary_files(a.runs_table, a.stats, a.out)


def _add_copick_runs(sub):
    p = sub.add_parser("copick-runs", help="list the runs of a copick project and the input stores of each "
                       "(the workflow's copick_runs step)")
    p.add_argument("--config", required=True, help="copick configuration JSON")
    p.add_argument("--org-info", required=True, help="organelle segmentation: 'name[,userID[,sessionID]]'")
    p.add_argument("--mem-info", required=True, help="membrane segmentation: 'name[,userID[,sessionID]]'")
    p.add_argument("--voxel-size", type=float, default=10.0, help="voxel size of the segmentations (angstrom)")
    p.add_argument("--run", dest="runs", action="append", metavar="RUN", help="run to list; if not given, every run")
    p.add_argument("--out", required=True, help="TSV to write: run, organelles, membranes, missing")
    p.set_defaults(run=_run_copick_runs)


def _run_copick_runs(a):
    copick_runs_files(a.config, a.out, org_info=a.org_info, mem_info=a.mem_info, voxel_size=a.voxel_size, run=a.runs)
