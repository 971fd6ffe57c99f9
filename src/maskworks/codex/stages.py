"""File-level runners of the multiplexed-tissue stages and their ``maskworks`` commands.

Like :mod:`maskworks.em.stages`: read through :mod:`maskworks.io`, one library call
per patch, atomic writes, a stats file and a QC PNG; the Snakemake scripts call the
same runners.  This module must import in the DeepCell environment (Python 3.10,
numpy<2, no torch/copick/ome-zarr/matplotlib at import time).

On-disk layout (what each stage reads and writes)
-------------------------------------------------
``tile-image`` -> ``<patches_dir>/``
    ``patches.zarr``        Zarr v2 group; array ``patches`` of shape (n, patch_height,
                            patch_width, 2), the image's dtype (float32 with a
                            whole-cell normalisation or ``sum``), one chunk per patch up
                            to 16 MiB, else 1024 x 1024 tiles (``full_image``,
                            halves, quarters of a whole slide); channel 0 nuclear, 1
                            whole-cell (max, mean or sum of the whole-cell channels,
                            each normalised first if asked); zero
                            padding bottom/right.  ``.attrs``: the grid (``image_shape``,
                            ``patch_shape``, ``step``, ``split_mode``, ``overlap``),
                            ``image_mpp``, channel names, source image,
                            ``wholecell_normalisation`` and ``wholecell_statistics``.
    ``patches_metadata.csv`` one row per patch, Aegle's columns first: patch_id,
                            x_start, y_start, height, width, nucleus_mean, nucleus_std,
                            nucleus_non_zero_perc, wholecell_mean, wholecell_std,
                            wholecell_non_zero_perc (fractions, as in Aegle),
                            is_empty, is_noisy, is_bad_patch, is_informative; then
                            row, col, valid_height, valid_width.
    ``tiling_stats.json``, ``tiling_qc.png``.
``segment-cells`` -> ``<segment_dir>/``
    ``patch_<patch_id>.npz`` for every informative patch (``np.load`` with
                            ``allow_pickle=False``): ``cell`` and ``nucleus`` (instance
                            labels, (patch_height, patch_width), smallest unsigned
                            dtype, ids 1..n per patch), ``cell_boundary`` and
                            ``nucleus_boundary`` (uint8 0/1,
                            ``find_boundaries(mode="inner")``).
    ``segment_stats.json`` (per-patch counts), ``segment_qc.png``.
``repair-masks`` -> ``<repair_dir>/`` (:func:`repair_patch_dir`)
    ``patch_<patch_id>.npz`` for every informative patch (``allow_pickle=False``):
                            ``cell``, ``nucleus``, ``cytoplasm`` (matched: ids 1..M, cell
                            k pairs with nucleus k, smallest unsigned dtype), their
                            ``*_boundary`` (uint8 0/1) and ``cell_original``,
                            ``nucleus_original`` (the segmentation's labels).
    ``patches_metadata.csv`` the tile-image table plus ``REPAIR_METRICS`` columns
                            (empty for patches not segmented).
    ``repair_stats.json``   totals and per-patch metrics.
``stitch`` reads ``patch_<patch_id>.npz`` files holding ``cell`` and ``nucleus`` where
    cell k pairs with nucleus k (as repair writes them) and writes ``cell``,
    ``nucleus``, ``cytoplasm`` whole-slide labels (uint32, ``.tif`` or ``.zarr``),
    ``cells.csv``, ``stitch_stats.json`` and ``stitch_qc.png``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..io import (
    InputError,
    atomic_path,
    read_volume,
    transaction,
    write_csv,
    write_json,
    write_volume,
)
from ..io.outputs import safe_name
from ..io.params import DEVICE, Choice, Choices, Mapping, Number, Text, checked
from ..io.slides import open_multichannel, read_channel_names, select_channels
from ..io.volumes import CheckedArray, describe_error, npy_header
from ..jobs import keyword_defaults, provenance
from .quantify import NEIGHBOURS, STATISTICS
from .repair import boundaries, check_labels, repair_masks
from .segment import (
    BACKENDS,
    download_mesmer_model,
    find_instanseg_model,
    find_mesmer_model,
    label_boundaries,
    load_instanseg_model,
    load_mesmer_model,
    segment_expansion,
    segment_instanseg,
    segment_mesmer,
    segment_watershed,
    smallest_uint,
    tensorflow_device,
)
from .stitch import STITCHED
from .tiling import (
    SPLIT_DIRECTIONS,
    SPLIT_MODES,
    WHOLECELL_AGGREGATIONS,
    WHOLECELL_NORMALISATIONS,
    PatchGrid,
    PatchStats,
    model_input,
    model_input_dtype,
    patch_grid,
    patch_qc,
    wholecell_statistics,
)

log = logging.getLogger("maskworks")


def add_commands(sub):
    """Register ``tile-image``, ``segment-cells``, ``repair-masks``, ``stitch``, ``quantify``,
    ``download-mesmer-model`` and ``write-spatialdata`` (:mod:`.spatial`)."""
    _add_tile(sub)
    _add_segment(sub)
    _add_repair(sub)
    _add_stitch(sub)
    _add_quantify(sub)
    _add_download(sub)
    from .spatial import add_commands as add_spatialdata  # spatial reads STITCH_FORMATS from here

    add_spatialdata(sub)


# ----------------------------------------------------------------------------- repair_masks

REPAIR_METRICS = ("cells_in", "nuclei_in", "matched", "matched_fraction", "cells_unmatched",
                  "nuclei_unmatched", "nuclei_trimmed", "nucleus_trimmed_fraction")
REPAIR_FORMATS = {"tif": ".tif", "zarr": ".zarr"}
COMPARTMENTS = ("cell", "nucleus", "cytoplasm")


def repair_masks_files(cells, nuclei, out_dir, *, format="tif"):
    """Run :func:`maskworks.codex.repair.repair_masks` on two label-image files and write its outputs.

    ``cells`` and ``nuclei``: 2-D label images in any format :func:`maskworks.io.read_volume`
    reads.  ``out_dir`` receives ``cell``, ``nucleus`` and ``cytoplasm`` (``.tif``, or
    OME-Zarr ``.zarr`` with ``format="zarr"``; the pixel size of ``cells``; cell k pairs
    with nucleus k) and ``metrics.json`` (the repair metrics, inputs and shape).
    """
    if format not in REPAIR_FORMATS:
        raise InputError(f"format={format!r}: expected one of {sorted(REPAIR_FORMATS)}")
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"{name}{REPAIR_FORMATS[format]}" for name in COMPARTMENTS}
    metrics_path = out_dir / "metrics.json"
    with transaction(*paths.values(), metrics_path, inputs=[cells, nuclei]):
        cell_vol, nuc_vol = read_volume(cells, ndim=2), read_volume(nuclei, ndim=2)
        arrays = check_labels(cell_vol.numpy(), nuc_vol.numpy(), names=(str(cells), str(nuclei)))
        log.info("repair_masks %s %s shape=%s -> %s", cells, nuclei, cell_vol.shape, out_dir)
        *masks, metrics = repair_masks(*arrays)
        prov = provenance("repair_masks", {"cells": cells, "nuclei": nuclei}, {})
        for name, mask in zip(COMPARTMENTS, masks):
            write_volume(paths[name], mask, cell_vol.voxel_size, unit=cell_vol.unit, origin=cell_vol.origin,
                         labels=True, colours={},
                         provenance=prov)
        metrics.update(cells=str(cells), nuclei=str(nuclei), shape=list(cell_vol.shape),
                       outputs={k: str(v) for k, v in paths.items()})
        write_json(metrics_path, metrics)
    log.info("repair_masks done: %s", {k: metrics[k] for k in ("cells_in", "nuclei_in", "matched")})
    return metrics


def repair_patch_dir(segment_dir, out_dir, *, metadata):
    """Repair every segmented patch: the ``repair_masks`` rule.

    Reads ``metadata`` (the ``patches_metadata.csv`` of ``tile-image``) and, for every
    informative patch, ``<segment_dir>/patch_<patch_id>.npz`` with ``cell`` and
    ``nucleus`` labels (the ``segment-cells`` output).  Writes into ``out_dir``:

    ``patch_<patch_id>.npz``  (``np.savez_compressed``; read with ``np.load(path,
        allow_pickle=False)``) per informative patch: ``cell``, ``nucleus``, ``cytoplasm``
        (matched; ids 1..M, cell k pairs with nucleus k; smallest unsigned dtype),
        ``cell_boundary``, ``nucleus_boundary``, ``cytoplasm_boundary`` (uint8 0/1,
        :func:`~maskworks.codex.repair.boundaries`) and ``cell_original``,
        ``nucleus_original`` (the segmentation's labels as read);
    ``patches_metadata.csv``  the input table with the ``REPAIR_METRICS`` columns added
        (empty for patches that were not segmented);
    ``repair_stats.json``  totals over the patches and each patch's metrics.

    Every file is written atomically; if the stage fails, the files it had already
    written are removed.
    """
    segment_dir, out_dir = Path(segment_dir), Path(out_dir)
    table, stats_path = out_dir / "patches_metadata.csv", out_dir / "repair_stats.json"
    with transaction(table, stats_path, inputs=[segment_dir, metadata]) as txn:
        rows, columns = _read_patches_metadata(metadata)
        todo = [r for r in rows if _is_true(r.get("is_informative", ""))]
        names = {r["patch_id"]: safe_name(f"patch_{r['patch_id']}.npz", f"{metadata}: patch_id {r['patch_id']!r}")
                 for r in todo}
        missing = [str(segment_dir / names[r["patch_id"]]) for r in todo
                   if not (segment_dir / names[r["patch_id"]]).exists()]
        if missing:
            raise InputError(f"{segment_dir}: no segmentation for {len(missing)} informative patch(es) listed in "
                             f"{metadata}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                             "run segment-cells on the same patches first")
        outputs = [out_dir / names[r["patch_id"]] for r in todo]
        txn.add(outputs, inputs=[segment_dir, metadata])
        per_patch = {}
        for row, target in zip(todo, _progress(outputs, "repair_masks")):
            source = segment_dir / names[row["patch_id"]]
            cells, nuclei = _read_patch_labels(source, shape=_patch_shape(row, metadata))
            *masks, metrics = repair_masks(*check_labels(cells, nuclei, names=(f"{source}:cell", f"{source}:nucleus")))
            arrays = dict(zip(COMPARTMENTS, masks))
            arrays.update({f"{k}_boundary": boundaries(v).astype(np.uint8) for k, v in zip(COMPARTMENTS, masks)})
            arrays.update(cell_original=cells, nucleus_original=nuclei)
            with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
            row.update(metrics)
            per_patch[str(row["patch_id"])] = metrics
        write_csv(table, rows, list(columns) + [c for c in REPAIR_METRICS if c not in columns])
        totals = {k: sum(m[k] for m in per_patch.values()) for k in ("cells_in", "nuclei_in", "matched")}
        objects = totals["cells_in"] + totals["nuclei_in"] - totals["matched"]
        totals["matched_fraction"] = totals["matched"] / objects if objects else 0.0
        write_json(stats_path, {"patches": len(rows), "patches_repaired": len(per_patch), **totals,
                                "segment_dir": str(segment_dir), "metadata": str(metadata),
                                "per_patch": per_patch})
    log.info("repair_masks done: %d patch(es), %s", len(per_patch), totals)
    return totals


def _patch_shape(row, metadata):
    """(height, width) of a patch-table row."""
    try:
        return int(row["height"]), int(row["width"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{metadata}: patch {row.get('patch_id')!r} has no whole-number height/width "
                         f"({row.get('height')!r}, {row.get('width')!r}); expected the table tile-image "
                         "writes") from None


def _read_patches_metadata(path):
    import csv

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such patch table (the patches_metadata.csv written by tile-image)")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows, columns = list(reader), reader.fieldnames or []
    if "patch_id" not in columns:
        raise InputError(f"{path}: no patch_id column (found {columns}); expected the patches_metadata.csv "
                         "written by tile-image")
    return rows, columns


def _is_true(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _read_patch_labels(path, keys=("cell", "nucleus"), shape=None):
    """The arrays ``keys`` of a patch NPZ, read in one opening (never pickles).  With ``shape`` (the
    patch's height and width), each member's header is checked against it before the member is
    decompressed: a header claiming another shape (a damaged file, or a decompression bomb) is an
    error, not an allocation."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise InputError(f"{path}: no array {', '.join(map(repr, missing))} (found {npz.files}; expected "
                                 "'cell' and 'nucleus' from segment-cells, or repair-masks' outputs)")
            if shape is not None:
                for k in keys:
                    claimed, dtype = _npz_member_header(npz, k)
                    if tuple(claimed) != tuple(shape) or dtype.kind not in "biu":
                        raise InputError(f"{path}: array {k!r} claims shape {tuple(claimed)} {dtype}, but the patch "
                                         f"is {tuple(shape)} integer labels; the file is damaged or from other "
                                         "patches - segment the patches again")
            return tuple(npz[k] for k in keys)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot be read as an NPZ of label images ({describe_error(exc)})") from None


def _npz_member_header(npz, key):
    """(shape, dtype) from the header of NPZ member ``key``: a few hundred bytes decompressed."""
    with npz.zip.open(f"{key}.npy") as member:
        return npy_header(member)


def _has_originals(path) -> bool:
    """Whether a patch NPZ holds the unrepaired segmentation (repair-masks' ``*_original``)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {"cell_original", "nucleus_original"} <= set(npz.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot be read as an NPZ of label images ({describe_error(exc)})") from None


def _add_repair(sub):
    p = sub.add_parser("repair-masks", help="keep the cells that pair with a nucleus, trim nuclei to the cell "
                       "interior (CellSegmentationEvaluator matcher); one image or every segmented patch")
    p.add_argument("--cells", help="whole-cell label image (.tif, .npy, .zarr, ...)")
    p.add_argument("--nuclei", help="nuclear label image of the same shape")
    p.add_argument("--segment-dir", help="instead of --cells/--nuclei: segment-cells output folder "
                   "(patch_<patch_id>.npz); every informative patch of --metadata is repaired")
    p.add_argument("--metadata", help="with --segment-dir: the patches_metadata.csv of tile-image")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=sorted(REPAIR_FORMATS), default="tif",
                   help="image format of cell/nucleus/cytoplasm for --cells/--nuclei")
    p.set_defaults(run=_run_repair)


def _run_repair(a):
    if a.segment_dir:
        if a.cells or a.nuclei or not a.metadata:
            raise InputError("--segment-dir goes with --metadata and without --cells/--nuclei")
        return repair_patch_dir(a.segment_dir, a.out, metadata=a.metadata)
    if not (a.cells and a.nuclei):
        raise InputError("give --cells and --nuclei (one image), or --segment-dir and --metadata (patches)")
    return repair_masks_files(a.cells, a.nuclei, a.out, format=a.format)


# ----------------------------------------------------------------------------- tile_image

PATCHES_STORE = "patches.zarr"
# Aegle's patches_metadata.csv columns first (x_start/y_start as its halves/quarters tables), then ours.
PATCH_COLUMNS = (
    "patch_id", "x_start", "y_start", "height", "width",
    "nucleus_mean", "nucleus_std", "nucleus_non_zero_perc", "wholecell_mean", "wholecell_std",
    "wholecell_non_zero_perc", "is_empty", "is_noisy", "is_bad_patch", "is_informative",
    "row", "col", "valid_height", "valid_width",
)
OVERVIEW_PIXELS = 1024  # longest side of the overview pictures
MPP_RANGE = (0.05, 5.0)  # µm/px a value read from the file must lie in to be used
PATCH_CHUNK = 1024  # patches larger than PATCH_CHUNK_BYTES are stored as PATCH_CHUNK x PATCH_CHUNK tiles
PATCH_CHUNK_BYTES = 16 * 2**20


@checked(
    split_mode=Choice(SPLIT_MODES),
    patch_height=Number(integer=True, minimum=16, unit="pixels"),
    patch_width=Number(integer=True, minimum=16, unit="pixels"),
    overlap=Number(minimum=0, maximum=0.75, nullable=True),
    split_direction=Choice(SPLIT_DIRECTIONS),
    wholecell_aggregation=Choice(WHOLECELL_AGGREGATIONS),
    wholecell_normalisation=Choice(WHOLECELL_NORMALISATIONS),
    non_zero_perc_threshold=Number(minimum=0, maximum=1),
    mean_intensity_threshold=Number(minimum=0),
)
def tile_image_files(
    image, channels, out_dir, *, nuclear_channel, wholecell_channels, image_mpp=None, channel_axis=None,
    split_mode="patches", patch_height=1440, patch_width=1920, overlap=None, split_direction="vertical",
    wholecell_aggregation="max", wholecell_normalisation="none", non_zero_perc_threshold=0.05,
    mean_intensity_threshold=1.0,
):
    """Cut a multichannel image into two-channel patches with QC: the ``tile_image`` rule.

    ``image``: TIFF/OME-TIFF (see :func:`~maskworks.io.slides.open_multichannel`);
    ``channels``: the channel names file (:func:`~maskworks.io.slides.read_channel_names`),
    or None to use the OME-XML channel names.  ``image_mpp``: the value given
    (image table or command line) wins; None: from the file (OME PhysicalSizeX
    or resolution tags) when it lies in ``MPP_RANGE`` (0.05-5 µm/px; a 72-dpi
    TIFF says 352.8), an error otherwise; no value in the file: unknown (Mesmer
    does not rescale).  ``split_mode``, ``overlap``, ``split_direction``: see
    :func:`~maskworks.codex.tiling.patch_grid`; ``wholecell_aggregation``:
    ``max`` (Aegle), ``mean`` (steinbock) or ``sum`` of the whole-cell channels, each first
    normalised by ``wholecell_normalisation`` (``none``, ``minmax``, ``zscore``,
    ``percentile``: statistics per channel over the whole slide, from one streaming pass,
    :func:`~maskworks.codex.tiling.wholecell_statistics`); with ``sum`` or a normalisation
    the patches are float32, else the image's dtype.
    The image is read whole up to ``maskworks.io.slides.IN_MEMORY_BYTES`` and lazily (per
    patch, only the channels used) above; a patch is written in blocks of
    ``PATCH_CHUNK`` rows, so a ``full_image`` patch of any size works.  Writes
    ``out_dir/patches.zarr``, ``patches_metadata.csv``, ``tiling_stats.json`` and
    ``tiling_qc.png`` (see the module docstring).
    """
    out_dir = Path(out_dir)
    outputs = [out_dir / PATCHES_STORE, out_dir / "patches_metadata.csv", out_dir / "tiling_stats.json",
               out_dir / "tiling_qc.png"]
    params = {"nuclear_channel": nuclear_channel, "wholecell_channels": wholecell_channels, "image_mpp": image_mpp,
              "channel_axis": channel_axis, "split_mode": split_mode, "patch_height": patch_height,
              "patch_width": patch_width, "overlap": overlap, "split_direction": split_direction,
              "wholecell_aggregation": wholecell_aggregation, "wholecell_normalisation": wholecell_normalisation,
              "non_zero_perc_threshold": non_zero_perc_threshold,
              "mean_intensity_threshold": mean_intensity_threshold}
    with transaction(*outputs, inputs=[image, channels]):
        return _tile_image_files(image, channels, *outputs, params)


def resolve_mpp(given, from_file, image) -> float | None:
    """The pixel size to use: ``given`` (table/config/command line) if set, else the file's value when
    it is plausible (``MPP_RANGE``); None when neither is known."""
    if given not in (None, ""):
        try:
            mpp = float(given)
        except (TypeError, ValueError):
            raise InputError(f"{image}: image_mpp={given!r} is not a number (microns per pixel)") from None
        if not math.isfinite(mpp) or mpp <= 0:
            raise InputError(f"{image}: image_mpp={given!r}: expected a positive number of microns per pixel")
        if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
            log.warning("%s: image_mpp=%s given, outside the usual %s-%s um/px; used as given", image, mpp,
                        *MPP_RANGE)
        return mpp
    if from_file is None:
        return None
    if not (math.isfinite(from_file) and MPP_RANGE[0] <= from_file <= MPP_RANGE[1]):
        raise InputError(
            f"{image}: the file says {from_file:.6g} microns per pixel (from its resolution tags or OME "
            f"PhysicalSizeX), outside the plausible {MPP_RANGE[0]}-{MPP_RANGE[1]} um/px (a 72-dpi TIFF says "
            "352.8); set the pixel size yourself: the image_mpp column of the image table, or --image-mpp")
    return float(from_file)


def _channel_names(img, image, channels):
    """The channel names of an open image: from the names file, else its OME-XML; one per channel."""
    if channels not in (None, ""):
        names, what = read_channel_names(channels), str(channels)
    elif img.channel_names:
        names, what = img.channel_names, f"the OME-XML channel names of {image}"
    else:
        raise InputError(f"{image}: no channel names in the file; give a channel names file (one name per line)")
    if len(names) != img.n_channels:
        raise InputError(f"{what} lists {len(names)} channel names but {image} has {img.n_channels} "
                         f"channel(s) (series axes {img.axes!r}, shape {tuple(img.data.shape)}); "
                         "fix the list or set channel_axis")
    return names, what


def _tile_image_files(image, channels, store, table, stats_path, qc, params):
    import time

    from ..io import ngff

    t0 = time.perf_counter()
    with open_multichannel(image, channel_axis=params["channel_axis"]) as img:
        names, what = _channel_names(img, image, channels)
        nuc, wc = select_channels(names, params["nuclear_channel"], params["wholecell_channels"], what=what)
        mpp = resolve_mpp(params["image_mpp"], img.mpp, image)
        grid = patch_grid(img.shape, split_mode=params["split_mode"], patch_height=params["patch_height"],
                          patch_width=params["patch_width"], overlap=params["overlap"],
                          split_direction=params["split_direction"])
        agg, norm = params["wholecell_aggregation"], params["wholecell_normalisation"]
        wstats = None if norm == "none" else wholecell_statistics(img, wc, norm)
        log.info("tile_image %s: %d channels, %s px, nuclear %s, whole-cell %s (%s), mpp %s, grid %s x %s of %s "
                 "(%s)", image, img.n_channels, img.shape, names[nuc], [names[i] for i in wc], agg, mpp,
                 *grid.grid_shape, grid.patch_shape, "lazy" if img.lazy else "in memory")
        dtype = model_input_dtype(img.data.dtype, agg, norm)
        factor = max(1, -(-max(img.shape) // OVERVIEW_PIXELS))
        overview = np.zeros((-(-img.shape[0] // factor), -(-img.shape[1] // factor), 2), np.float32)
        prov = provenance("tile_image", {"image": image, "channels": channels}, params)
        ph, pw = grid.patch_shape
        whole = ph * pw * 2 * dtype.itemsize <= PATCH_CHUNK_BYTES
        chunks = (1, ph, pw, 2) if whole else (1, min(ph, PATCH_CHUNK), min(pw, PATCH_CHUNK), 2)
        rows = []
        with atomic_path(store) as tmp:
            # Zarr v2 whatever the environment: the DeepCell environment (zarr 2) reads it
            root = ngff.create_group(tmp, "0.4")
            arr = ngff.create_array(root, "patches", (grid.n_patches, ph, pw, 2), chunks, dtype, "0.4")
            root.attrs.update(grid=grid.to_attrs(), image=str(image), channel_names=list(names),
                              nuclear_channel=names[nuc], wholecell_channels=[names[i] for i in wc],
                              wholecell_aggregation=agg, wholecell_normalisation=norm,
                              wholecell_statistics=_named_statistics(wstats, names, wc), image_mpp=mpp,
                              maskworks=prov)
            for pid in _progress(range(grid.n_patches), "tile_image"):
                row, col, y0, x0 = grid.position(pid)
                vh, vw = grid.valid_shape(pid)
                stats = PatchStats()
                for r0 in range(0, ph, chunks[1]):  # a block of chunk rows at a time
                    r1 = min(r0 + chunks[1], ph)
                    block = np.zeros((r1 - r0, pw, 2), dtype)
                    if r0 < vh:
                        ys = slice(y0 + r0, y0 + min(r1, vh))
                        block[:ys.stop - ys.start, :vw] = model_input(img, nuc, wc, ys, slice(x0, x0 + vw),
                                                                      aggregation=agg, normalisation=norm,
                                                                      statistics=wstats)
                    if dtype.kind == "f" and not np.isfinite(block).all():
                        raise InputError(f"{image}: NaN/Inf values in patch {pid} (rows {y0 + r0}..{y0 + r1}); "
                                         "fill them before tiling")
                    arr[pid, r0:r1] = block
                    stats.add(block)
                    # the overview: every factor-th pixel of the valid part
                    oy = (-(y0 + r0)) % factor
                    ox = (-x0) % factor
                    small = block[oy:max(0, min(r1, vh) - r0):factor, ox:vw:factor]
                    if small.size:
                        top, left = (y0 + r0 + oy) // factor, (x0 + ox) // factor
                        overview[top:top + small.shape[0], left:left + small.shape[1]] = small
                q = stats.qc(non_zero_perc_threshold=params["non_zero_perc_threshold"],
                             mean_intensity_threshold=params["mean_intensity_threshold"])
                rows.append({"patch_id": pid, "x_start": x0, "y_start": y0, "height": ph, "width": pw, **q,
                             "row": row, "col": col, "valid_height": vh, "valid_width": vw})
    write_csv(table, rows, PATCH_COLUMNS)
    counts = {k: sum(bool(r[k]) for r in rows) for k in ("is_informative", "is_empty", "is_noisy")}
    st = {"image": str(image), "image_shape": list(grid.image_shape), "channels": list(names),
          "nuclear_channel": names[nuc], "wholecell_channels": [names[i] for i in wc],
          "wholecell_aggregation": params["wholecell_aggregation"], "wholecell_normalisation": norm,
          "wholecell_statistics": _named_statistics(wstats, names, wc), "image_mpp": mpp,
          "image_mpp_source": "given" if params["image_mpp"] not in (None, "") else "file" if mpp else None,
          "chunks": list(chunks),
          "dtype": str(dtype), "read_lazily": bool(img.lazy), **grid.to_attrs(),
          "padded_shape": list(grid.padded_shape),
          "padding": [p - s for p, s in zip(grid.padded_shape, grid.image_shape)],
          "patches": grid.n_patches, "informative": counts["is_informative"], "empty": counts["is_empty"],
          "noisy": counts["is_noisy"], "seconds": round(time.perf_counter() - t0, 3)}
    if not any(r["nucleus_non_zero_perc"] for r in rows):
        _warn(st, f"the nuclear channel {names[nuc]!r} of {image} is zero everywhere: every patch is empty and no "
                  "cell will be found; check the channel names (--channels, --nuclear-channel)")
    _save_tiling_qc(qc, overview, factor, grid, rows,
                    title=f"tile_image: {Path(str(image)).name}  {grid.n_patches} patches, "
                    f"{counts['is_informative']} informative, {counts['is_empty']} empty, {counts['is_noisy']} noisy")
    write_json(stats_path, st)
    log.info("tile_image done: %s", {k: st[k] for k in ("patches", "informative", "empty", "noisy")})
    return st


def _named_statistics(statistics, names, channels):
    """The whole-cell statistics with their channel names (None without normalisation)."""
    if statistics is None:
        return None
    return [{"channel": names[c], **st} for c, st in zip(channels, statistics)]


def _warn(stats: dict, message: str) -> None:
    """A result that is valid but almost certainly not what the user wants: in the stats and the log."""
    stats.setdefault("warnings", []).append(message)
    log.warning(message)


def _progress(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="patch", file=sys.stderr, disable=not log.isEnabledFor(logging.INFO))


def _composite(patch) -> np.ndarray:
    """RGB picture of a (h, w, 2) model input: nuclear in blue, whole-cell in green (1st-99.8th percentile)."""
    rgb = np.zeros(patch.shape[:2] + (3,), np.float32)
    for c, out in ((0, 2), (1, 1)):
        ch = np.asarray(patch[..., c], np.float32)
        nz = ch[ch > 0]
        lo, hi = (np.percentile(nz, [1, 99.8]) if nz.size else (0.0, 1.0))
        rgb[..., out] = np.clip((ch - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb[..., 0] = 0.3 * rgb[..., 2]  # a little red keeps the nuclei visible on dark screens
    return rgb


def _outlined(rgb, cell, nucleus) -> np.ndarray:
    """``rgb`` with cell outlines in yellow and nucleus outlines in magenta."""
    out = rgb.copy()
    out[label_boundaries(cell) > 0] = (1.0, 0.85, 0.0)
    out[label_boundaries(nucleus) > 0] = (1.0, 0.2, 1.0)
    return out


def _save_tiling_qc(path, overview, factor, grid, rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    colours = {"informative": "#34c759", "empty": "#8e8e93", "noisy": "#ff9500"}
    fig, ax = plt.subplots(1, 1, figsize=(10, 10 * overview.shape[0] / max(overview.shape[1], 1) + 0.8))
    ax.imshow(_composite(overview), interpolation="nearest")
    for r in rows:
        status = "informative" if r["is_informative"] else "empty" if r["is_empty"] else "noisy"
        ax.add_patch(Rectangle(((r["x_start"] - 0.5) / factor, (r["y_start"] - 0.5) / factor),
                               r["width"] / factor, r["height"] / factor, fill=False,
                               edgecolor=colours[status], linewidth=1.2))
        ax.text((r["x_start"] + 8 * factor) / factor, (r["y_start"] + 8 * factor) / factor, str(r["patch_id"]),
                color=colours[status], fontsize=8, va="top")
    for name, colour in colours.items():
        ax.plot([], [], color=colour, label=name)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.7)
    ax.set_xlim(-0.5, grid.padded_shape[1] / factor)
    ax.set_ylim(grid.padded_shape[0] / factor, -0.5)
    ax.set_title(f"{title}\nnuclear (blue) and whole-cell (green); overview 1:{factor}", fontsize=10)
    ax.set_axis_off()
    _save_figure(fig, path)


def _save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _add_tile(sub):
    d = {**keyword_defaults(patch_grid), **keyword_defaults(patch_qc)}
    p = sub.add_parser("tile-image", help="multichannel TIFF -> two-channel patches (nuclear, max of whole-cell) "
                       "with informative-patch QC")
    p.add_argument("image", help="multichannel TIFF / OME-TIFF")
    p.add_argument("out_dir", help="folder for patches.zarr, patches_metadata.csv, tiling_stats.json, tiling_qc.png")
    p.add_argument("--channels", help="channel names: one per line, or a table with a header (e.g. an antibodies "
                   "TSV with antibody_name); if not given, the OME-XML channel names")
    p.add_argument("--nuclear-channel", required=True, help="name of the nuclear channel (e.g. DAPI)")
    p.add_argument("--wholecell-channels", required=True,
                   help="whole-cell (membrane) channel name(s), comma-separated; their pixel-wise maximum is used")
    p.add_argument("--image-mpp", type=float, help="microns per pixel; if not given, from the file")
    p.add_argument("--channel-axis", help="channel axis: index or tifffile letter; if not given, detected")
    p.add_argument("--split-mode", choices=SPLIT_MODES, default=d["split_mode"])
    p.add_argument("--patch-height", type=int, default=d["patch_height"], help="pixels (split-mode patches)")
    p.add_argument("--patch-width", type=int, default=d["patch_width"], help="pixels (split-mode patches)")
    p.add_argument("--overlap", type=float, default=d["overlap"],
                   help="fraction of the patch shared with the next, at most 0.75; default: 0.1 for patches, "
                   "0 for halves/quarters (Aegle's split)")
    p.add_argument("--split-direction", choices=SPLIT_DIRECTIONS, default=d["split_direction"],
                   help="halves: vertical = left | right, horizontal = top / bottom (Aegle)")
    p.add_argument("--wholecell-aggregation", choices=WHOLECELL_AGGREGATIONS,
                   default=keyword_defaults(tile_image_files)["wholecell_aggregation"],
                   help="how the whole-cell channels are combined: max (Aegle), mean (steinbock) or sum")
    p.add_argument("--wholecell-normalisation", choices=WHOLECELL_NORMALISATIONS,
                   default=keyword_defaults(tile_image_files)["wholecell_normalisation"],
                   help="each whole-cell channel first normalised with its statistics over the whole slide: none, "
                   "minmax, zscore or percentile (1st-99.8th, clipped to 0-1); with a normalisation or sum the "
                   "patches are float32")
    p.add_argument("--non-zero-perc-threshold", type=float, default=d["non_zero_perc_threshold"],
                   help="a patch whose nuclear channel has a smaller non-zero fraction is empty")
    p.add_argument("--mean-intensity-threshold", type=float, default=d["mean_intensity_threshold"],
                   help="a patch whose nuclear channel has a smaller mean is noisy")
    p.set_defaults(run=_run_tile)


def _run_tile(a):
    return tile_image_files(
        a.image, a.channels, a.out_dir, nuclear_channel=a.nuclear_channel, wholecell_channels=a.wholecell_channels,
        image_mpp=a.image_mpp, channel_axis=a.channel_axis, split_mode=a.split_mode, patch_height=a.patch_height,
        patch_width=a.patch_width, overlap=a.overlap, split_direction=a.split_direction,
        wholecell_aggregation=a.wholecell_aggregation, wholecell_normalisation=a.wholecell_normalisation,
        non_zero_perc_threshold=a.non_zero_perc_threshold,
        mean_intensity_threshold=a.mean_intensity_threshold,
    )


# ----------------------------------------------------------------------------- segment_cells


def _open_patches(patches_dir):
    """The patch array and grid written by tile-image (read lazily, one chunk per patch)."""
    from ..io.ngff import open_node

    path = Path(patches_dir) / PATCHES_STORE
    if not path.is_dir():
        raise InputError(f"{path}: no such patch store; run tile-image first")
    root = open_node(path)
    if "patches" not in root or "grid" not in root.attrs:
        raise InputError(f"{path}: not a tile-image patch store (no 'patches' array or 'grid' attribute)")
    return CheckedArray(root["patches"], path), PatchGrid.from_attrs(root.attrs["grid"]), dict(root.attrs)


def _informative(patches_dir, metadata=None):
    """Patch ids flagged informative in the patch table (default ``<patches_dir>/patches_metadata.csv``)."""
    metadata = Path(metadata) if metadata else Path(patches_dir) / "patches_metadata.csv"
    rows, columns = _read_patches_metadata(metadata)
    if "is_informative" not in columns:
        raise InputError(f"{metadata}: no is_informative column (found {columns}); expected the "
                         "patches_metadata.csv written by tile-image")
    ids = []
    for r in rows:
        try:
            pid = int(r["patch_id"])
        except (TypeError, ValueError):
            raise InputError(f"{metadata}: patch_id {r['patch_id']!r} is not a whole number") from None
        if _is_true(r["is_informative"]):
            ids.append(pid)
    return ids


# The classical backends: their function and the keywords of it they take (expansion also takes its
# distance in microns, converted with image_mpp).
CLASSICAL = {"watershed": segment_watershed, "expansion": segment_expansion}


def backend_params(backend) -> dict:
    """The parameters (with defaults) a backend takes as keywords of :func:`segment_cells_files`."""
    if backend not in CLASSICAL:
        return {}
    extra = {"expansion_distance_um": None} if backend == "expansion" else {}
    return {**keyword_defaults(CLASSICAL[backend]), **extra}


def _segment_params(backend, params):
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    known = backend_params(backend)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"unknown segmentation parameter(s) {unknown} for backend {backend}, which takes "
                         f"{sorted(known) or 'none'}")
    return {**known, **params}


@checked(segment_watershed, segment_expansion, backend=Choice(BACKENDS), batch_size=Number(integer=True, minimum=1),
         device=DEVICE,
         model_path=Text(r"^.+$", "a path to a Mesmer model (.tar.gz, .keras/.h5 or a SavedModel folder) or an "
                         "InstanSeg model (instanseg.pt or its folder)", nullable=True),
         expansion_distance_um=Number(minimum=0, nullable=True, unit="microns"),
         preprocess_kwargs=Mapping(), postprocess_kwargs_whole_cell=Mapping(), postprocess_kwargs_nuclear=Mapping())
def segment_cells_files(
    patches_dir, out_dir, *, backend="mesmer", model_path=None, image_mpp=None, batch_size=4,
    preprocess_kwargs=None, postprocess_kwargs_whole_cell=None, postprocess_kwargs_nuclear=None,
    metadata=None, device="auto", **backend_kwargs,
):
    """Segment every informative patch of a tile-image folder: the ``segment_cells`` rule.

    ``backend`` "mesmer" loads the model once (:func:`~maskworks.codex.segment.load_mesmer_model`
    with ``model_path``) and sends ``batch_size`` patches at a time, read from the
    patch store batch by batch; "instanseg" likewise with the InstanSeg TorchScript model at
    ``model_path`` (:func:`~maskworks.codex.segment.load_instanseg_model`, PyTorch); "watershed"
    and "expansion" take ``backend_kwargs`` (the keywords of
    :func:`~maskworks.codex.segment.segment_watershed` and
    :func:`~maskworks.codex.segment.segment_expansion`; expansion also
    ``expansion_distance_um``, which, when set, replaces ``expansion_distance`` by that many
    microns at ``image_mpp``).  ``image_mpp`` None: the
    value tile-image stored.  ``device`` (Mesmer, InstanSeg): auto | cpu | cuda[:N], see
    :func:`~maskworks.codex.segment.tensorflow_device`.  ``metadata``: the patch table whose
    ``is_informative`` column picks the patches (default: the one in
    ``patches_dir``).  Writes ``out_dir/patch_<patch_id>.npz`` per informative
    patch, ``segment_stats.json`` and ``segment_qc.png`` (see the module docstring).
    """
    out_dir = Path(out_dir)
    ws = _segment_params(backend, backend_kwargs)
    stats_path, qc = out_dir / "segment_stats.json", out_dir / "segment_qc.png"
    inputs = [patches_dir, metadata, model_path]
    with transaction(stats_path, qc, inputs=inputs) as txn:
        arr, grid, attrs = _open_patches(patches_dir)
        ids = _informative(patches_dir, metadata)
        bad = [i for i in ids if not 0 <= i < arr.shape[0]]
        if bad:
            raise InputError(f"patch table lists patch ids {bad[:5]} that {patches_dir}/{PATCHES_STORE} does not "
                             f"hold ({arr.shape[0]} patches)")
        outputs = [out_dir / f"patch_{i}.npz" for i in ids]
        txn.add(outputs, inputs=inputs)
        params = _segment_run_params(backend, ws, attrs, model_path, image_mpp, batch_size, device,
                                     preprocess_kwargs, postprocess_kwargs_whole_cell, postprocess_kwargs_nuclear)
        return _segment_cells_files(patches_dir, arr, ids, outputs, stats_path, qc, params)


def _segment_run_params(backend, ws, attrs, model_path, image_mpp, batch_size, device, preprocess_kwargs,
                        postprocess_kwargs_whole_cell, postprocess_kwargs_nuclear):
    mpp = float(image_mpp) if image_mpp not in (None, "") else attrs.get("image_mpp")
    params = {"backend": backend, "model_path": None if model_path is None else str(model_path), "image_mpp": mpp,
              "batch_size": int(batch_size), "device": "cpu"}
    if backend == "mesmer":
        find_mesmer_model(model_path)  # a missing model is reported before TensorFlow is imported
        params["device"] = tensorflow_device(device)
        params.update(preprocess_kwargs=dict(preprocess_kwargs or {}),
                      postprocess_kwargs_whole_cell=dict(postprocess_kwargs_whole_cell or {}),
                      postprocess_kwargs_nuclear=dict(postprocess_kwargs_nuclear or {}))
    elif backend == "instanseg":
        from ..em.unet import torch_device

        find_instanseg_model(model_path)  # a missing model is reported before any patch is read
        params["device"] = str(torch_device(device))
    else:
        ws = dict(ws)
        um = ws.pop("expansion_distance_um", None)
        if um is not None:
            if not mpp:
                raise InputError(f"expansion_distance_um={um} needs the pixel size, which neither the image table, "
                                 "--image-mpp nor the slide gives; set one, or expansion_distance in pixels")
            ws["expansion_distance"] = float(um) / float(mpp)
            params["expansion_distance_um"] = float(um)
        params.update(ws)
    return params


def _segment_cells_files(patches_dir, arr, ids, outputs, stats_path, qc, params):
    import time

    t0 = time.perf_counter()
    backend, bs = params["backend"], params["batch_size"]
    log.info("segment_cells %s: %d informative patch(es) of %d, backend %s on device %s, params %s",
             patches_dir, len(ids), arr.shape[0], backend, params["device"], params)
    app = None
    if backend == "mesmer" and ids:
        model = load_mesmer_model(params["model_path"])
        from deepcell.applications import Mesmer

        app = Mesmer(model=model)
    elif backend == "instanseg" and ids:
        app = load_instanseg_model(params["model_path"], device=params["device"])
    ws = {k: params[k] for k in keyword_defaults(CLASSICAL[backend])} if backend in CLASSICAL else {}
    per_patch, shown, target = {}, [], dict(zip(ids, outputs))
    qc_ids = {ids[int(round(i))] for i in np.linspace(0, len(ids) - 1, min(4, len(ids)))} if ids else set()
    batches = [ids[i:i + bs] for i in range(0, len(ids), bs)]
    for batch_ids in _progress(batches, f"segment_cells ({backend}, batches of {bs})"):
        batch = np.stack([np.asarray(arr[i]) for i in batch_ids])
        if backend == "mesmer":
            cells, nuclei = segment_mesmer(
                batch, model=app, image_mpp=params["image_mpp"], batch_size=bs,
                preprocess_kwargs=params["preprocess_kwargs"],
                postprocess_kwargs_whole_cell=params["postprocess_kwargs_whole_cell"],
                postprocess_kwargs_nuclear=params["postprocess_kwargs_nuclear"])
            extra = [{} for _ in batch_ids]
        elif backend == "instanseg":
            cells, nuclei = segment_instanseg(batch, model=app, image_mpp=params["image_mpp"])
            extra = [{} for _ in batch_ids]
        else:
            results = [CLASSICAL[backend](p, **ws) for p in batch]
            cells = [r[0] for r in results]
            nuclei = [r[1] for r in results]
            extra = [r[2] for r in results]
        for k, pid in enumerate(batch_ids):
            cell, nucleus = smallest_uint(np.asarray(cells[k])), smallest_uint(np.asarray(nuclei[k]))
            arrays = {"cell": cell, "nucleus": nucleus, "cell_boundary": label_boundaries(cell),
                      "nucleus_boundary": label_boundaries(nucleus)}
            with atomic_path(target[pid]) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
            per_patch[str(pid)] = {"cells": int(np.unique(cell).size - (cell.min() == 0)),
                                   "nuclei": int(np.unique(nucleus).size - (nucleus.min() == 0)), **extra[k]}
            if pid in qc_ids:
                shown.append((pid, batch[k], cell, nucleus))
    seconds = time.perf_counter() - t0
    st = {"patches_dir": str(patches_dir), "patches": int(arr.shape[0]), "segmented": len(ids), **params,
          "cells": sum(p["cells"] for p in per_patch.values()),
          "nuclei": sum(p["nuclei"] for p in per_patch.values()),
          "seconds": round(seconds, 3), "patches_per_second": round(len(ids) / seconds, 3) if seconds else None,
          "per_patch": per_patch}
    if not st["cells"]:
        _warn(st, f"no cell was found in the {len(ids)} informative patch(es) of {patches_dir}"
                  + ("" if ids else " (tile-image marked none informative)"))
    _save_segment_qc(qc, shown, f"segment_cells ({backend}): {len(ids)} patches, {st['cells']} cells, "
                     f"{st['nuclei']} nuclei")
    write_json(stats_path, st)
    log.info("segment_cells done: %s", {k: st[k] for k in ("segmented", "cells", "nuclei", "seconds")})
    return st


def _save_segment_qc(path, shown, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(shown))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5.6), squeeze=False)
    for ax, (pid, patch, cell, nucleus) in zip(axes[0], shown):
        ax.imshow(_outlined(_composite(patch), cell, nucleus), interpolation="nearest")
        ax.set_title(f"patch {pid}: {int(cell.max())} cells, {int(nucleus.max())} nuclei", fontsize=9)
    for ax in axes[0]:
        ax.set_axis_off()
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no informative patches", ha="center", va="center")
    fig.suptitle(f"{title}\ncell outlines yellow, nucleus outlines magenta", fontsize=10)
    _save_figure(fig, path)


def _json_dict(value):
    import json

    try:
        out = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"percentile\": 99.9}}': {exc}") from None
    if not isinstance(out, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return out


def _add_segment(sub):
    d = keyword_defaults(segment_watershed)
    p = sub.add_parser("segment-cells", help="whole-cell and nuclear labels of every informative patch "
                       "(Mesmer or classical watershed)")
    p.add_argument("patches_dir", help="tile-image output folder (patches.zarr, patches_metadata.csv)")
    p.add_argument("out_dir", help="folder for patch_<patch_id>.npz, segment_stats.json, segment_qc.png")
    p.add_argument("--backend", choices=BACKENDS, default="mesmer",
                   help="mesmer (DeepCell, needs the deepcell env and a model), instanseg (PyTorch, needs a model), "
                   "watershed or expansion (no weights)")
    p.add_argument("--metadata", help="patch table choosing the informative patches; if not given, the tile-image one")
    p.add_argument("--batch-size", type=int, default=4, help="patches read and sent to the model together")
    p.add_argument("--device", default="auto",
                   help="Mesmer, InstanSeg: auto, cpu, cuda or cuda:N (a GPU asked for must be usable)")
    p.add_argument("--image-mpp", type=float, help="microns per pixel; if not given, as tile-image recorded it")
    p.add_argument("--model-path", help="mesmer: Keras SavedModel directory or the MultiplexSegmentation tarball "
                   "(if not given, the deepcell cache ~/.deepcell/models); instanseg: the TorchScript instanseg.pt "
                   "or the folder of an extracted InstanSeg bioimage.io model (required)")
    g = p.add_argument_group("mesmer")
    g.add_argument("--preprocess-kwargs", type=_json_dict, default={}, help="JSON object for Mesmer pre-processing")
    g.add_argument("--postprocess-kwargs-whole-cell", type=_json_dict, default={},
                   help="JSON object for Mesmer whole-cell post-processing (deep_watershed)")
    g.add_argument("--postprocess-kwargs-nuclear", type=_json_dict, default={},
                   help="JSON object for Mesmer nuclear post-processing (deep_watershed)")
    g = p.add_argument_group("watershed (pixels)")
    g.add_argument("--smoothing-sigma", type=float, default=d["smoothing_sigma"], help="Gaussian smoothing")
    g.add_argument("--threshold-scale", type=float, default=d["threshold_scale"], help="multiplies the Otsu thresholds")
    g.add_argument("--min-nucleus-distance", type=int, default=d["min_nucleus_distance"],
                   help="smallest distance between nucleus seeds")
    g.add_argument("--min-nucleus-area", type=int, default=d["min_nucleus_area"])
    g.add_argument("--foreground-sigma", type=float, default=d["foreground_sigma"],
                   help="smoothing of the whole-cell channel for the cell foreground")
    g.add_argument("--max-expansion", type=float, default=d["max_expansion"], help="cell growth beyond the nucleus")
    g.add_argument("--min-cell-area", type=int, default=d["min_cell_area"], help="smallest cell without nucleus")
    g = p.add_argument_group("expansion (the nuclear options above, and)")
    e = backend_params("expansion")
    g.add_argument("--expansion-distance", type=float, default=e["expansion_distance"],
                   help="pixels each nucleus grows by to make its cell")
    g.add_argument("--expansion-distance-um", type=float, default=e["expansion_distance_um"],
                   help="the same in microns (needs the pixel size); replaces --expansion-distance")
    p.set_defaults(run=_run_segment)


def _run_segment(a):
    ws = {k: getattr(a, k) for k in backend_params(a.backend)}
    return segment_cells_files(
        a.patches_dir, a.out_dir, backend=a.backend, model_path=a.model_path, image_mpp=a.image_mpp,
        batch_size=a.batch_size, preprocess_kwargs=a.preprocess_kwargs,
        postprocess_kwargs_whole_cell=a.postprocess_kwargs_whole_cell,
        postprocess_kwargs_nuclear=a.postprocess_kwargs_nuclear, metadata=a.metadata, device=a.device, **ws,
    )


def _add_download(sub):
    p = sub.add_parser("download-mesmer-model", help="download DeepCell's Mesmer model (needs "
                       "DEEPCELL_ACCESS_TOKEN and internet; run once, e.g. on the submit host)")
    p.add_argument("dest", nargs="?", help="folder to extract into; if not given, the deepcell cache ~/.deepcell/models")
    p.set_defaults(run=_run_download)


def _run_download(a):
    print(download_mesmer_model(a.dest))


# ----------------------------------------------------------------------------- stitch

STITCH_FORMATS = {"ome.tif": ".ome.tif", "zarr": ".zarr"}
CELL_COLUMNS = ("id", "centroid_y", "centroid_x", "cell_area", "nucleus_area", "cytoplasm_area", "patch_id",
                "patches")
QC_CROP = 512  # side of the stitched QC crop, pixels (about 1:1 in the PNG)
STITCH_MEMORY_MB = 4096  # stitch's default memory budget
# Memory model of stitch (measured by bench/bench_budget.py): a fixed part (interpreter and
# libraries, per-patch work arrays, the patch views of about two grid rows, per-cell arrays), and
# per slide pixel either the whole slide in memory or one band of the slide-wide passes.
STITCH_BASE_MB = 150
STITCH_PATCH_BYTES = 40  # per pixel of one patch: the patch's work arrays
STITCH_VIEW_BYTES = 3  # per pixel of each kept patch view (uint16 labels and a nucleus mask)
STITCH_CELL_BYTES = 2  # per slide pixel: per-cell arrays, for cells of 100 pixels or more
STITCH_MEMORY_BYTES = 40  # per slide pixel held in memory: five uint32 label images and work arrays
STITCH_BAND_BYTES = 120  # per pixel of a band of the slide-wide passes
STITCH_MIN_BAND_ROWS = 16


def stitch_plan(grid, memory_mb=STITCH_MEMORY_MB) -> dict:
    """How stitch fits in ``memory_mb``: the whole slide in memory when it fits, else Zarr label
    stores on disk and slide-wide passes over row bands as tall as the budget allows.

    Returns ``in_memory`` (bool), ``band_rows`` (None in memory), ``fixed_mb`` (memory that does not
    depend on the band: interpreter, patch views, per-cell arrays) and ``in_memory_mb`` (what the
    in-memory path needs).
    """
    from .stitch import _reach

    h, w = grid.image_shape
    ph, pw = grid.patch_shape
    ry, rx = _reach(grid)
    views = (ry + 1) * grid.grid_shape[1] + 2
    mb = 2**20
    fixed = STITCH_BASE_MB + (ph * pw * (STITCH_PATCH_BYTES + views * STITCH_VIEW_BYTES) + h * w * STITCH_CELL_BYTES) / mb
    in_memory = fixed + h * w * STITCH_MEMORY_BYTES / mb
    plan = {"fixed_mb": round(fixed), "in_memory_mb": round(in_memory), "memory_mb": memory_mb}
    if memory_mb is None or in_memory <= memory_mb:
        return {**plan, "in_memory": True, "band_rows": None}
    rows = int((memory_mb - fixed) * mb / STITCH_BAND_BYTES) // max(w, 1)
    if rows < STITCH_MIN_BAND_ROWS:
        log.warning("stitch: memory_mb=%s is below what a %d x %d slide with %s patches needs at the least "
                    "(about %d MB); using bands of %d rows", memory_mb, h, w, tuple(grid.patch_shape),
                    fixed + STITCH_MIN_BAND_ROWS * w * STITCH_BAND_BYTES / mb, STITCH_MIN_BAND_ROWS)
    return {**plan, "in_memory": False, "band_rows": max(STITCH_MIN_BAND_ROWS, min(rows, h))}


@checked(format=Choice(tuple(STITCH_FORMATS)), duplicate_overlap=Number(exclusive_minimum=0, maximum=1),
         memory_mb=Number(exclusive_minimum=0, unit="MB", nullable=True))
def stitch_files(patches_dir, labels_dir, out_dir, *, format="ome.tif", metadata=None, duplicate_overlap=0.5,
                 memory_mb=STITCH_MEMORY_MB):
    """Assemble per-patch segmentations into whole-slide label images: the ``stitch`` rule.

    ``labels_dir`` holds ``patch_<patch_id>.npz`` for every patch that ``metadata``
    (default ``<patches_dir>/patches_metadata.csv``; the repair output's copy works
    too) marks informative: the repair-masks output (its ``cell_original`` and
    ``nucleus_original``, the segmentation as it was, are stitched) or the
    segment-cells output (``cell`` and ``nucleus``).  The cells and nuclei are
    stitched each on its own and the whole slide is repaired after placement
    (:func:`~maskworks.codex.stitch.stitch_segmentation`).  Writes into
    ``out_dir``: ``cell``, ``nucleus``, ``cytoplasm`` (uint32; cell k pairs with
    nucleus k; ``.ome.tif`` with the pixel size in µm, or OME-Zarr ``.zarr``), the
    unrepaired stitched ``cell_original`` and ``nucleus_original`` (as Aegle keeps
    both), ``cells.csv`` (``CELL_COLUMNS``; centroids in pixels),
    ``stitch_stats.json`` (how objects were placed and joined, the repair metrics
    and the ``check`` of the result, :func:`~maskworks.codex.stitch.check_stitched`)
    and ``stitch_qc.png`` (a crop with the outlines).

    ``memory_mb`` (MB; None: no limit) bounds the stage's memory (:func:`stitch_plan`): a
    slide that fits is stitched in memory, a larger one into Zarr label stores in a work
    folder inside ``out_dir`` (removed at the end), and the slide-wide repair, clean-up,
    table and check run over row bands; the outputs are the same either way.
    """
    if format not in STITCH_FORMATS:
        raise InputError(f"format={format!r}: expected one of {', '.join(STITCH_FORMATS)}")
    if not 0.0 <= float(duplicate_overlap) <= 1.0:
        raise InputError(f"duplicate_overlap={duplicate_overlap!r}: expected a fraction in [0, 1]")
    out_dir = Path(out_dir)
    images = {k: out_dir / f"{k}{STITCH_FORMATS[format]}" for k in STITCHED}
    table, stats_path, qc = out_dir / "cells.csv", out_dir / "stitch_stats.json", out_dir / "stitch_qc.png"
    with transaction(*images.values(), table, stats_path, qc, inputs=[patches_dir, labels_dir, metadata]):
        return _stitch_files(Path(patches_dir), Path(labels_dir), images, table, stats_path, qc, format,
                             metadata, duplicate_overlap, memory_mb)


def _stitch_files(patches_dir, labels_dir, images, table, stats_path, qc, format, metadata, duplicate_overlap,
                  memory_mb):
    import tempfile
    import time

    from .stitch import check_stitched, stitch_segmentation

    t0 = time.perf_counter()
    arr, grid, attrs = _open_patches(patches_dir)
    ids = _informative(patches_dir, metadata)
    missing = [str(labels_dir / f"patch_{i}.npz") for i in ids if not (labels_dir / f"patch_{i}.npz").is_file()]
    if missing:
        raise InputError(f"{labels_dir}: no labels for {len(missing)} informative patch(es): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    originals = all(_has_originals(labels_dir / f"patch_{i}.npz") for i in ids)
    keys = ("cell_original", "nucleus_original") if originals else ("cell", "nucleus")

    def load(pid):
        return _read_patch_labels(labels_dir / f"patch_{pid}.npz", keys, shape=grid.patch_shape)

    mpp = attrs.get("image_mpp")
    plan = stitch_plan(grid, memory_mb)
    prov = provenance("stitch", {"patches_dir": patches_dir, "labels_dir": labels_dir},
                      {"format": format, "duplicate_overlap": duplicate_overlap, "memory_mb": memory_mb})
    log.info("stitch %s + %s (%s): %d patch(es) on a %s grid -> %s (%s)", patches_dir, labels_dir, ", ".join(keys),
             len(ids), grid.grid_shape, images["cell"].parent,
             "in memory" if plan["in_memory"] else f"label stores, bands of {plan['band_rows']} rows")
    with tempfile.TemporaryDirectory(prefix=".stitch-work-", dir=images["cell"].parent) as work:
        out = None if plan["in_memory"] else {
            k: _label_store(Path(work) / f"{k}.zarr", grid.image_shape, plan["band_rows"]) for k in STITCHED}
        cell, nucleus, cyto, cell0, nucleus0, cells, st = stitch_segmentation(
            grid, ids, load, duplicate_overlap=duplicate_overlap, progress=lambda it, desc: _progress(it, desc),
            out=out, band_rows=plan["band_rows"])
        st["check"] = check_stitched(cell, nucleus, cyto, band_rows=plan["band_rows"])
        if not st["cells"]:
            _warn(st, f"the stitched slide holds no cell ({len(ids)} informative patch(es) in {labels_dir})")
        arrays = {"cell": cell, "nucleus": nucleus, "cytoplasm": cyto, "cell_original": cell0,
                  "nucleus_original": nucleus0}
        for k, a in arrays.items():
            if format == "zarr":
                vs, unit = ((mpp, mpp), "micrometer") if mpp else ((1.0, 1.0), None)
                write_volume(images[k], a, vs, unit=unit, chunks=tuple(min(1024, s) for s in a.shape),
                             provenance=prov, labels=True, colours={})
            else:
                _write_ome_tiff(images[k], a, mpp, prov)
        crop = _qc_crop(grid, ids, arr, cell, nucleus)
    _write_cells_csv(table, cells)
    cs = st["cell_stitch"]
    st.update(stitched=list(keys), patches_dir=str(patches_dir), labels_dir=str(labels_dir),
              image_shape=list(grid.image_shape), image_mpp=mpp, format=format, duplicate_overlap=duplicate_overlap,
              memory=plan, outputs={k: str(v) for k, v in images.items()},
              seconds=round(time.perf_counter() - t0, 3))
    _save_stitch_qc(qc, crop, f"stitch: {st['cells']} cells from {len(ids)} patches "
                    f"({cs['from_core']} core, {cs['rescued']} rescued, {cs['joined']} joined across seams)")
    write_json(stats_path, st)
    log.info("stitch done: %d cells (%s joined across seams, %s unmatched after repair); check %s", st["cells"],
             cs["joined"], st["repair"]["cells_unmatched"], st["check"])
    return st


def _label_store(path, shape, rows):
    """A zero-filled uint32 Zarr array on disk for a whole-slide label image (stitch's work store), in
    chunks one band of ``rows`` tall, so that reading a band decodes nothing else."""
    import zarr

    h, w = shape
    return zarr.create_array(store=str(path), shape=(h, w), chunks=(min(rows, h), min(1024, w)), dtype=np.uint32,
                             fill_value=0)


def _write_ome_tiff(path, array, mpp, prov, tile=512):
    """uint32 labels (any array-like) as a one-plane OME-TIFF with the pixel size in µm when known,
    written tile by tile from bands of ``tile`` rows (images smaller than a tile: one strip)."""
    import json

    import tifffile

    meta = {"axes": "YX", "Description": json.dumps({"maskworks": prov}, default=str)}
    if mpp:
        meta.update(PhysicalSizeX=float(mpp), PhysicalSizeXUnit="µm", PhysicalSizeY=float(mpp),
                    PhysicalSizeYUnit="µm")
    h, w = array.shape
    tiled = min(h, w) >= tile
    data = _tiles(array, tile) if tiled else np.asarray(array, dtype=np.uint32)
    with atomic_path(Path(path)) as tmp:
        tifffile.imwrite(str(tmp), data, shape=(h, w), dtype=np.uint32, ome=True, photometric="minisblack",
                         metadata=meta, compression="zlib", compressionargs={"level": 1},
                         tile=(tile, tile) if tiled else None, bigtiff=h * w * 4 > 2**31 - 2**25)


def _tiles(array, tile):
    """The ``tile`` x ``tile`` tiles of a 2-D array-like in TIFF order (zero-padded at the edges),
    read one band of rows at a time."""
    h, w = array.shape
    for y in range(0, h, tile):
        band = np.asarray(array[y:y + tile], dtype=np.uint32)
        for x in range(0, w, tile):
            t = np.zeros((tile, tile), np.uint32)
            piece = band[:, x:x + tile]
            t[:piece.shape[0], :piece.shape[1]] = piece
            yield t


def _write_cells_csv(path, cells):
    import pandas as pd

    frame = pd.DataFrame({c: cells[c] for c in CELL_COLUMNS})
    with atomic_path(Path(path)) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.2f")


def _qc_crop(grid, ids, arr, cell, nucleus):
    """Model input, cells and nuclei of a crop at the centre of the informative patch nearest the slide centre."""
    if not ids:
        return None
    h, w = grid.image_shape
    centre = np.array([h / 2, w / 2])

    def distance(pid):
        _, _, y0, x0 = grid.position(pid)
        vh, vw = grid.valid_shape(pid)
        return float(np.hypot(*(np.array([y0 + vh / 2, x0 + vw / 2]) - centre)))

    pid = min(ids, key=distance)
    _, _, y0, x0 = grid.position(pid)
    vh, vw = grid.valid_shape(pid)
    ch, cw = min(QC_CROP, vh), min(QC_CROP, vw)
    oy, ox = (vh - ch) // 2, (vw - cw) // 2
    patch = np.asarray(arr[pid, oy:oy + ch, ox:ox + cw])
    region = (slice(y0 + oy, y0 + oy + ch), slice(x0 + ox, x0 + ox + cw))
    return pid, (y0 + oy, x0 + ox), patch, np.asarray(cell[region]), np.asarray(nucleus[region])


def _save_stitch_qc(path, crop, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(8, 8.6))
    if crop is None:
        ax.text(0.5, 0.5, "no informative patches", ha="center", va="center")
    else:
        pid, (y, x), patch, cell, nucleus = crop
        ax.imshow(_outlined(_composite(patch), cell, nucleus), interpolation="nearest",
                  extent=(x - 0.5, x + patch.shape[1] - 0.5, y + patch.shape[0] - 0.5, y - 0.5))
        title += f"\ncrop y {y}..{y + patch.shape[0]}, x {x}..{x + patch.shape[1]} (in patch {pid}); " \
                 "cells yellow, nuclei magenta"
    ax.set_title(title, fontsize=10)
    _save_figure(fig, path)


def _add_stitch(sub):
    p = sub.add_parser("stitch", help="assemble per-patch cell/nucleus labels into whole-slide labels "
                       "(unique ids, each cell once, none cut at the seams)")
    p.add_argument("patches_dir", help="tile-image output folder (patches.zarr with the grid, patches_metadata.csv)")
    p.add_argument("labels_dir", help="folder of patch_<patch_id>.npz: the repair-masks output (its unrepaired "
                   "cell_original/nucleus_original are stitched, then the slide is repaired) or segment-cells'")
    p.add_argument("out_dir", help="folder for cell, nucleus, cytoplasm, cell_original, nucleus_original, cells.csv, "
                   "stitch_stats.json, stitch_qc.png")
    p.add_argument("--format", choices=sorted(STITCH_FORMATS), default="ome.tif", help="whole-slide label format")
    p.add_argument("--metadata", help="patch table choosing the patches; if not given, the tile-image one")
    p.add_argument("--duplicate-overlap", type=float, default=0.5,
                   help="an object overlapping already-placed ones by more than this fraction is a duplicate")
    p.add_argument("--memory-mb", type=float, default=STITCH_MEMORY_MB,
                   help="memory budget (MB): a slide that does not fit is stitched into Zarr label stores on disk "
                   "and repaired, cleaned and checked by row bands (default %(default)s)")
    p.set_defaults(run=_run_stitch)


def _run_stitch(a):
    return stitch_files(a.patches_dir, a.labels_dir, a.out_dir, format=a.format, metadata=a.metadata,
                        duplicate_overlap=a.duplicate_overlap, memory_mb=a.memory_mb)


# ----------------------------------------------------------------------------- quantify

QUANTIFY_OUTPUTS = ("cell_by_marker.csv", "cell_metadata.csv", "cells.h5ad", "quantify_stats.json",
                    "quantify_qc.png")
# MCMICRO's quantification tables: mcquant names them <image>_<mask>.csv, MCMICRO's image being
# <sample>--<segmentation method> and its masks cell and nuclei (spatialdata-io's reader parses that name;
# scimap takes the file stem as imageid).  mask name in the file -> the compartment measured.
MCQUANT_MASKS = {"cell": "cell", "nuclei": "nucleus"}
MCQUANT_METHOD = "maskworks"
# mcquant's columns after CellID and the markers, in its order -> the morphology column they hold
MCQUANT_SHAPES = {
    "X_centroid": "centroid_x", "Y_centroid": "centroid_y", "Area": "area", "MajorAxisLength": "major_axis_length",
    "MinorAxisLength": "minor_axis_length", "Eccentricity": "eccentricity", "Solidity": "solidity",
    "Extent": "extent", "Orientation": "orientation",
}
HIRES_PIXELS = 2000  # longest side of the AnnData's image (uns["spatial"]), as Visium's tissue_hires_image


def mcquant_tables(sample: str) -> dict[str, str]:
    """The mcquant table file of each compartment (``cell``, ``nucleus``) of slide ``sample``."""
    return {comp: f"{sample}--{MCQUANT_METHOD}_{mask}.csv" for mask, comp in MCQUANT_MASKS.items()}


def mcquant_names(names, what="the channel names") -> list[str]:
    """Channel names made unique as mcquant makes them: every occurrence of a repeated name gets
    ``_<k>``, k counting its occurrences from 1 (DAPI, CD3, DAPI -> DAPI_1, CD3, DAPI_2).  Names
    that would still repeat, or that are one of mcquant's own columns (``CellID``,
    ``X_centroid``, ``Area``, ...), are refused."""
    from collections import Counter

    names = [str(n) for n in names]
    total, seen, out = Counter(names), Counter(), []
    for n in names:
        seen[n] += 1
        out.append(f"{n}_{seen[n]}" if total[n] > 1 else n)
    clash = sorted(n for n, k in Counter(out).items() if k > 1)
    if clash:
        raise InputError(f"{what}: {', '.join(clash)} would name two channels once repeated names get _1, _2, ... "
                         "(as mcquant numbers them); rename one of them")
    taken = sorted(set(out) & {"CellID", *MCQUANT_SHAPES})
    if taken:
        raise InputError(f"{what}: {', '.join(taken)} is a column of mcquant's cell tables, not a marker name; "
                         "rename the channel")
    return out


class _PlaneRows:
    """One channel of a multichannel image as a (y, x) array read row block by row block."""

    def __init__(self, image, channel):
        self.image, self.channel, self.shape = image, channel, image.shape

    def __getitem__(self, index):
        ys, xs = (index, slice(None)) if isinstance(index, slice) else (index + (slice(None),))[:2]
        return self.image.region(self.channel, ys, xs)

    def __array__(self, dtype=None, copy=None):
        out = self.image.region(self.channel, slice(None), slice(None))
        return out.astype(dtype) if dtype is not None else out


QUANTIFY_MEMORY_MB = 8192  # quantify's default memory budget: a 1.5 M-cell, 50-marker slide's tables take ~4.5 GB
# Memory model of quantify (bench/bench_budget.py): the interpreter with pandas/anndata and the QC
# figure, the per-cell tables (a float64 table per statistic, compartment and marker, the
# morphology and flags, the AnnData's float32 X), and the row blocks of labels and channels.
QUANTIFY_BASE_MB = 400
QUANTIFY_CELL_COLUMNS = 48  # morphology, flags, placement and centroid columns a cell has besides the markers
QUANTIFY_VALUE_BYTES = 16  # per table value: the table and what writing it costs
QUANTIFY_HULL_BYTES = 3000  # per cell while the morphology runs: its convex hull chains (2.6 kB measured)
QUANTIFY_MIN_BLOCK_MB = 16
QUANTIFY_BLOCK_SHARE = 0.6  # of what the tables leave: the blocks' work arrays take ~1.5x their estimate


def quantify_plan(cells, markers, statistics, memory_mb=QUANTIFY_MEMORY_MB) -> dict:
    """How quantify fits in ``memory_mb`` (None: no limit): the per-cell tables' estimate, the
    morphology's hull chains (per cell, before the tables exist) and the block budget left for
    the row blocks of labels and channels (``block_mb``, at least ``QUANTIFY_MIN_BLOCK_MB``;
    None without a limit: the whole slide in one block)."""
    stats = len(dict.fromkeys(("mean", *statistics)))
    tables = cells * (markers * 3 * stats + QUANTIFY_CELL_COLUMNS) * QUANTIFY_VALUE_BYTES / 2**20
    hulls = cells * QUANTIFY_HULL_BYTES / 2**20  # the morphology's, freed before the tables are made
    plan = {"memory_mb": memory_mb, "cells": int(cells), "tables_mb": round(tables), "hulls_mb": round(hulls)}
    if memory_mb is None:
        return {**plan, "block_mb": None}
    block = (memory_mb - QUANTIFY_BASE_MB - max(tables, hulls)) * QUANTIFY_BLOCK_SHARE
    if block < QUANTIFY_MIN_BLOCK_MB:
        log.warning("quantify: memory_mb=%s is below what %d cells x %d markers need at the least (about %d MB: "
                    "the tables %d MB); using blocks of %d MB", memory_mb, cells, markers,
                    QUANTIFY_BASE_MB + max(tables, hulls) + QUANTIFY_MIN_BLOCK_MB / QUANTIFY_BLOCK_SHARE, tables,
                    QUANTIFY_MIN_BLOCK_MB)
    return {**plan, "block_mb": round(max(block, QUANTIFY_MIN_BLOCK_MB), 1)}


@checked(statistics=Choices(STATISTICS), neighbours=Choice(NEIGHBOURS),
         neighbour_radius=Number(exclusive_minimum=0, unit="µm", nullable=True),
         threads=Number(integer=True, minimum=1), memory_mb=Number(exclusive_minimum=0, unit="MB", nullable=True))
def quantify_files(image, channels, stitch_dir, out_dir, *, statistics=("mean",), image_mpp=None,
                   neighbours="delaunay", neighbour_radius=None, channel_axis=None, sample=None,
                   nuclear_channel=None, threads=2, memory_mb=QUANTIFY_MEMORY_MB):
    """Measure every stitched cell on every channel of the source image: the ``quantify`` rule.

    ``image`` and ``channels`` as for :func:`tile_image_files` (all channels are measured;
    a repeated name is numbered as mcquant does, :func:`mcquant_names`);
    ``stitch_dir``: the stitch output (``cell``/``nucleus``/``cytoplasm`` as ``.ome.tif`` or
    ``.zarr``, ``cells.csv``).  ``image_mpp`` None: the stitched labels' pixel size, else the
    image's.  ``sample``: the slide's name in the tables (the workflow's row name; None: the
    image's name without ``.ome.tif``, as mcquant names its tables); ``nuclear_channel``: the
    channel pictured in the AnnData (None: the first).  ``threads``: channels measured in
    parallel; ``memory_mb``: the stage's memory budget (MB; None: no limit): what the per-cell
    tables do not take of it (:func:`quantify_plan`) is the block of label and channel rows read
    at a time (:func:`~maskworks.codex.quantify.quantify_cells`), so memory follows it and not
    the slide's size or its number of channels.  Writes into ``out_dir``:

    - ``cell_by_marker.csv`` (Aegle: ``cell_id`` + the cell mean of every marker) and
      ``cell_metadata.csv`` (``sample``, morphology, compartment statistics, patch id);
    - ``<sample>--maskworks_cell.csv`` and ``<sample>--maskworks_nuclei.csv``
      (:func:`mcquant_tables`), MCMICRO's mcquant tables of the cell and nucleus masks;
    - ``cells.h5ad`` (AnnData: X = cell means, obs = metadata, var = the panel (marker,
      ``original_name``, ``channel``), ``obsm["spatial"]`` = centroids (x, y) in µm (pixels
      when the pixel size is unknown), ``obsp["spatial_connectivities"]`` /
      ``["spatial_distances"]``, ``uns["spatial"][sample]`` = the nuclear channel as squidpy's
      ``hires`` image with its ``scalefactors``);
    - ``quantify_stats.json`` and ``quantify_qc.png``.

    Notes
    -----
    The mcquant tables have mcquant's columns in its order: ``CellID``, the mean of every
    marker over the mask's object, then ``X_centroid``, ``Y_centroid`` (pixels), ``Area``
    (pixels), ``MajorAxisLength``, ``MinorAxisLength``, ``Eccentricity``, ``Solidity``,
    ``Extent``, ``Orientation`` (skimage regionprops; radians).  As mcquant's, the nuclei
    table lists only the objects of the nucleus mask: the cells with a nucleus, under the
    cell's id (nucleus k is cell k's).  No ``imageid`` column: scimap's
    ``mcmicro_to_scimap`` takes the file stem, or ``custom_imageid=<sample>``.
    """
    out_dir = Path(out_dir)
    sample = _sample_name(sample, image)
    outputs = {n: out_dir / n for n in (*QUANTIFY_OUTPUTS, *mcquant_tables(sample).values())}
    params = {"statistics": list(statistics), "image_mpp": image_mpp, "neighbours": neighbours,
              "neighbour_radius": neighbour_radius, "channel_axis": channel_axis, "sample": sample,
              "nuclear_channel": nuclear_channel, "threads": int(threads), "memory_mb": memory_mb}
    with transaction(*outputs.values(), inputs=[image, channels, stitch_dir]):
        return _quantify_files(image, channels, Path(stitch_dir), outputs, params)


def _sample_name(sample, image) -> str:
    """``sample``, or the image's file name without ``.ome.tif`` (mcquant's image name)."""
    if sample in (None, ""):
        stem = Path(image).stem
        sample, what = (stem[:-4] if stem.endswith(".ome") else stem), f"the sample name taken from {image}"
    else:
        sample, what = str(sample), "sample"
    return safe_name(sample, what)


def _has_stitched(stitch_dir, name) -> bool:
    return any((stitch_dir / f"{name}{ext}").exists() for ext in STITCH_FORMATS.values())


def _stitched(stitch_dir, name, lazy=False):
    for ext in STITCH_FORMATS.values():
        if (stitch_dir / f"{name}{ext}").exists():
            return read_volume(stitch_dir / f"{name}{ext}", ndim=2, lazy=lazy)
    raise InputError(f"{stitch_dir}: no {name}.ome.tif or {name}.zarr; run stitch first")


def _quantify_files(image, channels, stitch_dir, outputs, params):
    import time

    import pandas as pd

    from .quantify import quantify_cells

    t0 = time.perf_counter()
    # labels and channels are read by row blocks (memory_mb), never whole
    cell, nucleus, cyto = (_stitched(stitch_dir, k, lazy=True) for k in ("cell", "nucleus", "cytoplasm"))
    with open_multichannel(image, channel_axis=params["channel_axis"]) as img:
        originals, what = _channel_names(img, image, channels)
        names = mcquant_names(originals, what)
        if tuple(img.shape) != tuple(cell.shape):
            raise InputError(f"{image} is {img.shape} pixels but the stitched labels in {stitch_dir} are "
                             f"{cell.shape}: they must come from this image")
        mpp = params["image_mpp"]
        if mpp in (None, ""):
            mpp = cell.voxel_size[0] if cell.unit == "micrometer" else img.mpp
        mpp = float(mpp) if mpp else None
        plan = quantify_plan(_stitched_cells(stitch_dir, cell), len(names), params["statistics"],
                             params["memory_mb"])
        log.info("quantify %s: %d markers on %d x %d px, mpp %s, statistics %s; %d cells, blocks of %s MB", image,
                 len(names), *cell.shape, mpp, params["statistics"], plan["cells"], plan["block_mb"] or "all")
        markers, meta, graph, st = quantify_cells(
            cell.data, nucleus.data, ((n, _PlaneRows(img, c)) for c, n in enumerate(names)),
            cytoplasm=cyto.data, statistics=params["statistics"], image_mpp=mpp,
            neighbours=params["neighbours"], neighbour_radius=params["neighbour_radius"],
            threads=params["threads"], memory_mb=plan["block_mb"] or _ALL_ROWS_MB)
        crop = _quantify_crop(img, cell.data, names, markers, meta)
        hires = _hires_image(img, _picture_channel(params["nuclear_channel"], names, originals, what), HIRES_PIXELS)
    unrepaired = [_stitched(stitch_dir, k, lazy=True) if _has_stitched(stitch_dir, k) else None
                  for k in ("cell_original", "nucleus_original")]
    if all(o is not None for o in unrepaired):  # Aegle's repair QC per cell
        from .quantify import repair_flags

        meta.update(repair_flags(cell.data, nucleus.data, unrepaired[0].data, unrepaired[1].data, meta["cell_id"],
                                 memory_mb=plan["block_mb"] or _ALL_ROWS_MB))
        st["nuclei_trimmed"] = int(np.count_nonzero(meta["nucleus_was_trimmed"]))
    meta = {"cell_id": meta.pop("cell_id"), "sample": np.full(st["cells"], params["sample"], dtype=object), **meta,
            **_placement(stitch_dir / "cells.csv", markers["cell_id"])}
    # the columns are views of quantify_cells' tables: the frames copy none of them (one block a column)
    meta = pd.DataFrame(meta, copy=False)
    by_marker = pd.DataFrame(markers, copy=False)
    with atomic_path(outputs["cell_by_marker.csv"]) as tmp:
        by_marker.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(outputs["cell_metadata.csv"]) as tmp:
        meta.to_csv(tmp, index=False, float_format="%.6g")
    for comp, name in mcquant_tables(params["sample"]).items():
        with atomic_path(outputs[name]) as tmp:
            mcquant_table(by_marker, meta, names, comp).to_csv(tmp, index=False)
    _write_h5ad(outputs["cells.h5ad"], by_marker, meta, (names, originals), graph, mpp, params, hires)
    st.update(sample=params["sample"], channel_names=list(originals), image=str(image), stitch_dir=str(stitch_dir),
              memory=plan,
              outputs={k: str(v) for k, v in outputs.items()}, seconds=round(time.perf_counter() - t0, 3))
    if not st["cells"]:
        _warn(st, f"no cell to measure: the stitched labels in {stitch_dir} are empty; the tables have no rows")
    if "--" in params["sample"]:  # MCMICRO's table names are <sample>--<method>_<mask>
        _warn(st, f"sample {params['sample']!r} contains '--': spatialdata-io's MCMICRO reader takes the sample "
                  "name up to the first '--' of the table names")
    _save_quantify_qc(outputs["quantify_qc.png"], by_marker, names, crop,
                      f"quantify: {st['cells']} cells x {len(names)} markers, {st['edges']} neighbour edges "
                      f"({params['neighbours']})")
    write_json(outputs["quantify_stats.json"], st)
    log.info("quantify done: %s", {k: st[k] for k in ("cells", "edges", "cells_without_nucleus", "seconds")})
    return st


_ALL_ROWS_MB = 2**40  # no memory limit: one block, the whole slide


def _stitched_cells(stitch_dir, cell) -> int:
    """How many cells the stitched labels hold: the stitch's count, else the labels' largest id."""
    import json

    try:
        return int(json.loads((stitch_dir / "stitch_stats.json").read_text())["cells"])
    except (OSError, ValueError, KeyError, TypeError):
        from .quantify import cell_ids

        ids = cell_ids(cell.data)
        return int(ids.size)


def _placement(table, ids) -> dict:
    """Where each cell came from: the ``patch_id`` and ``patches`` (as ``stitched_from``) columns of
    the stitch's ``cells.csv`` (``table``) for the cells ``ids`` (a left join on ``id``: NaN for a
    cell it does not list); none without the table or its columns."""
    import pandas as pd

    if not table.is_file():
        return {}
    placed = pd.read_csv(table)
    cols = [c for c in ("patch_id", "patches") if c in placed.columns]
    if "id" not in placed.columns or not cols:
        return {}
    rows = placed.set_index("id")[cols].reindex(ids)
    return {"stitched_from" if c == "patches" else c: rows[c].to_numpy() for c in cols}


def mcquant_table(by_marker, meta, names, compartment="cell"):
    """One of MCMICRO's mcquant tables from the quantify tables (``cell_by_marker``, ``cell_metadata``).

    ``compartment`` ``cell``: every cell, the cell means and the cell's shape; ``nucleus``: the
    cells with a nucleus, the nucleus means and the nucleus' shape.  Columns: ``CellID``, the
    markers ``names``, then ``MCQUANT_SHAPES`` (mcquant's order and units: pixels, radians).
    """
    import pandas as pd

    if compartment == "cell":
        rows, means, prefix = slice(None), {n: by_marker[n].to_numpy() for n in names}, ""
    else:
        rows, prefix = meta["has_nucleus"].to_numpy(bool), "nucleus_"
        means = {n: meta[f"{n}_nucleus_mean"].to_numpy() for n in names}
    return pd.DataFrame({"CellID": meta["cell_id"].to_numpy()[rows], **{n: v[rows] for n, v in means.items()},
                         **{k: meta[prefix + v].to_numpy()[rows] for k, v in MCQUANT_SHAPES.items()}}, copy=False)


def _picture_channel(nuclear_channel, names, originals, what) -> int:
    """The channel pictured in the AnnData: ``nuclear_channel`` by its numbered or given name (the
    first of a repeated one; exact, else case-insensitive), the first channel if None."""
    if nuclear_channel in (None, ""):
        return 0
    wanted = str(nuclear_channel)
    for pool, key in ((names, wanted), (originals, wanted), ([str(n).lower() for n in originals], wanted.lower())):
        if key in pool:
            return list(pool).index(key)
    raise InputError(f"nuclear_channel {nuclear_channel!r} not found in {what}; available: {', '.join(names)}")


def _hires_image(img, channel, side):
    """One channel as squidpy's ``hires`` image: every ``factor``-th pixel (longest side at most
    ``side``), its 1st-99.5th percentiles stretched to an RGB uint8 grey, read in row blocks.
    Returns the picture, the factor and the channel."""
    h, w = img.shape
    factor = max(1, -(-max(h, w) // side))
    rows = factor * max(1, (2**24 // max(1, w)) // factor)  # blocks start on every factor-th row
    small = np.concatenate([img.region(channel, slice(y, min(h, y + rows)), slice(None))[::factor, ::factor]
                            for y in range(0, h, rows)]).astype(np.float32)
    finite = small[np.isfinite(small)]
    lo, hi = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
    grey = np.clip((np.nan_to_num(small, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, axis=2), factor, channel


def _write_h5ad(path, by_marker, meta, panel, graph, mpp, params, hires):
    import anndata
    import pandas as pd

    names, originals = panel
    obs = meta.copy(deep=False)  # a new index and sample column, the same columns
    obs.index = obs["cell_id"].astype(str)
    obs.index.name = None
    obs["sample"] = pd.Categorical(obs["sample"])  # squidpy's library_key must be categorical
    var = pd.DataFrame({"original_name": [str(n) for n in originals], "channel": np.arange(len(names))},
                       index=pd.Index(names, dtype=str))
    x = np.empty((len(obs), len(names)), np.float32)  # filled a column at a time: no float64 copy of the table
    for j, name in enumerate(names):
        x[:, j] = by_marker[name].to_numpy()
    adata = anndata.AnnData(X=x, obs=obs, var=var)
    scale = mpp or 1.0
    adata.obsm["spatial"] = np.column_stack([meta["centroid_x"], meta["centroid_y"]]).astype(np.float64) * scale
    # squidpy/scanpy draw obsm["spatial"] * tissue_hires_scalef on the hires image: picture pixel j is
    # image pixel j * factor, so the scale factor is 1 / (factor * µm per pixel)
    picture, factor, channel = hires
    area = meta["area"].to_numpy(dtype=np.float64)
    spot = 2 * np.sqrt(np.median(area) / np.pi) * scale if area.size else scale  # a median cell's diameter
    adata.uns["spatial"] = {params["sample"]: {
        "images": {"hires": picture},
        "scalefactors": {"tissue_hires_scalef": 1.0 / (factor * scale), "spot_diameter_fullres": float(spot)}}}
    if graph is not None:
        adata.obsp["spatial_connectivities"], adata.obsp["spatial_distances"] = graph
        adata.uns["spatial_neighbors"] = {
            "connectivities_key": "spatial_connectivities", "distances_key": "spatial_distances",
            "params": {"method": params["neighbours"], "radius": params["neighbour_radius"],
                       "unit": "micrometer" if mpp else "pixel"}}
    adata.uns["maskworks"] = {"image_mpp": mpp if mpp else "unknown", "spatial_unit": "micrometer" if mpp else "pixel",
                              "hires_channel": names[channel], "hires_factor": factor}
    with atomic_path(Path(path)) as tmp:
        try:
            adata.write_h5ad(tmp)
        except RuntimeError as exc:  # HDF5 reports a failed write(2) as a RuntimeError quoting errno
            code = next((e for e in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) if f"errno = {e}," in str(exc)), None)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(path)) from exc


def _quantify_crop(img, cell, names, markers, meta, side=QC_CROP):
    """A crop around the median cell centroid (where the cells are): each marker's cell means painted
    on the cells; reads only the crop of the labels."""
    if not len(markers["cell_id"]):
        return None
    cy, cx = int(np.nanmedian(meta["centroid_y"])), int(np.nanmedian(meta["centroid_x"]))
    y0, x0 = max(0, cy - side // 2), max(0, cx - side // 2)
    lab = np.asarray(cell[y0:y0 + side, x0:x0 + side]).astype(np.int64)
    maps = []
    for name in names[:4]:
        table = np.zeros(int(markers["cell_id"].max()) + 1, np.float64)
        table[markers["cell_id"]] = np.nan_to_num(markers[name])
        maps.append((name, table[lab], lab))
    return maps


def _marker_histograms(by_marker, names, bins=60):
    """Every marker's histogram of log1p(cell mean) on common bins, scaled to its own highest bin:
    shape (markers, ``bins``), and the bins' range.  A column at a time."""
    def finite(name):
        with np.errstate(invalid="ignore"):
            v = np.log1p(np.nan_to_num(by_marker[name].to_numpy()))
        return v[np.isfinite(v)]

    lo, hi = np.inf, -np.inf
    for name in names:
        v = finite(name)
        lo, hi = min(lo, v.min(initial=np.inf)), max(hi, v.max(initial=-np.inf))
    lo, hi = (0.0, 1.0) if lo > hi else (lo, max(hi, lo + 1e-9))
    out = np.zeros((len(names), bins))
    for k, name in enumerate(names):
        counts = np.histogram(finite(name), bins=bins, range=(lo, hi))[0]
        out[k] = counts / max(1, counts.max())
    return out, (lo, hi)


def _save_quantify_qc(path, by_marker, names, crop, title):
    """The marker histograms as one heat map (a row per marker: the figure's size barely grows with
    the panel) over the crops of the first markers' cell means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    shown = crop or []
    cols = max(3, len(shown))
    rows = max(2.4, 0.14 * len(names) + 0.8)  # inches of the histograms' panel
    fig = plt.figure(figsize=(3.2 * cols, rows + 3.4))
    grid = fig.add_gridspec(2, cols, height_ratios=[rows, 3.2])
    ax = fig.add_subplot(grid[0, :])
    hist, (lo, hi) = _marker_histograms(by_marker, names)
    ax.imshow(hist, aspect="auto", cmap="Greys", interpolation="nearest",
              extent=(lo, hi, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("log1p(cell mean); each marker's histogram scaled to its highest bin", fontsize=9)
    for k, (name, image, lab) in enumerate(shown):
        ax = fig.add_subplot(grid[1, k])
        ax.imshow(image, cmap="magma")
        ax.contour(find_boundaries(lab, mode="inner"), levels=[0.5], colors="cyan", linewidths=0.3)
        ax.set_title(f"{name} per cell", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    _save_figure(fig, path)


def _add_quantify(sub):

    p = sub.add_parser("quantify", help="measure every stitched cell: cell x marker table, morphology, "
                       "AnnData with spatial neighbours")
    p.add_argument("image", help="the multichannel image the cells were segmented from (all channels are measured)")
    p.add_argument("stitch_dir", help="stitch output folder (cell, nucleus, cytoplasm labels, cells.csv)")
    p.add_argument("out_dir", help="folder for cell_by_marker.csv, cell_metadata.csv, the mcquant tables "
                   "<sample>--maskworks_cell.csv and _nuclei.csv, cells.h5ad, stats, QC")
    p.add_argument("--channels", help="channel names file; if not given, the OME-XML names")
    p.add_argument("--sample", help="the slide's name in the tables and the AnnData; if not given, the image's "
                   "file name without .ome.tif")
    p.add_argument("--nuclear-channel", help="the channel pictured in the AnnData for squidpy; if not given, the first")
    p.add_argument("--statistics", default="mean", help=f"comma list of {', '.join(STATISTICS)} (mean always)")
    p.add_argument("--image-mpp", type=float, help="µm per pixel; if not given, the stitched labels' or the image's")
    p.add_argument("--neighbours", choices=NEIGHBOURS, default="delaunay", help="spatial neighbour graph")
    p.add_argument("--neighbour-radius", type=float,
                   help="µm: the radius graph's distance, or the longest Delaunay edge kept")
    p.add_argument("--threads", type=int, default=2, help="channels measured in parallel")
    p.add_argument("--memory-mb", type=float, default=QUANTIFY_MEMORY_MB,
                   help="memory budget (MB): what the per-cell tables leave of it is the block of label and "
                   "channel rows read at a time (default %(default)s)")
    p.set_defaults(run=_run_quantify)


def _run_quantify(a):
    stats = [s.strip() for s in a.statistics.split(",") if s.strip()]
    return quantify_files(a.image, a.channels, a.stitch_dir, a.out_dir, statistics=stats, image_mpp=a.image_mpp,
                          neighbours=a.neighbours, neighbour_radius=a.neighbour_radius, sample=a.sample,
                          nuclear_channel=a.nuclear_channel, threads=a.threads, memory_mb=a.memory_mb)
