"""A quantified slide as one SpatialData store: ``maskworks write-spatialdata`` (rule ``spatialdata``).

The store (``<out>.zarr``, SpatialData's on-disk format, OME-NGFF underneath) holds

``images/image``
    the source slide, (c, y, x) with the channel names of the quantify table, as a pyramid
    (``scale0`` the full resolution, then halves until every side is at most
    :data:`maskworks.io.ngff.PYRAMID_MIN` pixels; xarray's coarsening, the mean);
``labels/cell_labels``, ``labels/nucleus_labels``
    the stitched cell and nucleus labels, as pyramids of the same levels (nearest neighbour);
``tables/table``
    quantify's AnnData (``cells.h5ad``: cell x marker means, morphology, centroids in
    ``obsm["spatial"]``, the neighbour graph) annotating ``cell_labels``: ``obs["region"]`` is
    ``"cell_labels"`` and ``obs["cell_id"]`` the label of each cell.

Every element maps to the ``"global"`` coordinate system: by a scale of the pixel size (µm per pixel)
when it is known, so ``global`` is in micrometres like ``obsm["spatial"]``, else by the identity
(pixels).  ``spatialdata.read_zarr`` opens it; napari-spatialdata shows it (``Interactive(sdata)``).

Nothing is read whole: the slide and the labels enter as dask arrays over the lazy readers, and
spatialdata writes them chunk by chunk.  The store and ``<out>_stats.json`` are committed together
(:func:`maskworks.io.transaction`).  spatialdata 0.8 needs Python 3.12, anndata 0.13 and zarr 3: this
stage runs in the scverse environment (``envs/scverse.yaml``, ``make setup-scverse``); the module
imports anywhere, spatialdata only when the stage runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..io import InputError, atomic_path, read_volume, transaction, write_json
from ..io.params import Number, checked
from ..jobs import sibling
from .tiling import open_multichannel

log = logging.getLogger("maskworks")

REGION = "cell_labels"  # the labels element the table annotates
REGION_KEY, INSTANCE_KEY = "region", "cell_id"
COORDINATE_SYSTEM = "global"
LABELS = {"cell_labels": "cell", "nucleus_labels": "nucleus"}  # element -> stitched labels


@checked(image_mpp=Number(exclusive_minimum=0, nullable=True, unit="µm"),
         chunk=Number(integer=True, minimum=64, unit="pixels"))
def write_spatialdata_files(image, stitch_dir, quantify, out, *, image_mpp=None, chunk=1024, channel_axis=None):
    """Write the SpatialData store of a quantified slide: the ``spatialdata`` rule.

    Parameters
    ----------
    image : path
        The multichannel slide the cells were segmented from and measured on (TIFF/OME-TIFF).
    stitch_dir : path
        The stitch output: ``cell`` and ``nucleus`` labels (``.ome.tif`` or ``.zarr``).
    quantify : path
        quantify's ``cells.h5ad``, or the quantify folder holding it.  Its var names (one per
        channel, unique) name the image's channels.
    out : path
        The store to write, ``<name>.zarr``; its stats go to ``<name>_stats.json`` beside it.
    image_mpp : float, optional
        µm per pixel.  Default: the one quantify used (``uns["maskworks"]["image_mpp"]`` of the
        table), else the stitched labels', else the image's; unknown: the store is in pixels.
    chunk : int
        Side of the stored chunks (pixels; one channel per image chunk).
    channel_axis : int or str, optional
        As for :func:`maskworks.codex.tiling.open_multichannel`.

    Returns
    -------
    dict
        The stats written (shape, channels, cells, levels, pixel size, seconds).

    Notes
    -----
    The layout is SpatialData's (``Image2DModel``, ``Labels2DModel``, ``TableModel`` with
    ``region``/``region_key``/``instance_key``), the one spatialdata-io's readers write for
    segmented multiplexed images (MCMICRO's: image, cell and nucleus labels, a table of cells).
    """
    _require_spatialdata()
    out = Path(out)
    if out.suffix != ".zarr":
        raise InputError(f"{out}: the SpatialData store must be a .zarr folder (e.g. {out.stem}.zarr)")
    quantify = Path(quantify)
    h5ad = quantify / "cells.h5ad" if quantify.is_dir() else quantify
    stats_path = sibling(out, "_stats.json")
    with transaction(out, stats_path, inputs=[image, stitch_dir, h5ad]):
        return _write_spatialdata(Path(image), Path(stitch_dir), h5ad, out, stats_path,
                                  image_mpp=image_mpp, chunk=chunk, channel_axis=channel_axis)


def _write_spatialdata(image, stitch_dir, h5ad, out, stats_path, *, image_mpp, chunk, channel_axis):
    import time

    import anndata
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, TableModel
    from spatialdata.transformations import Identity, Scale

    from ..io.ngff import pyramid_factors

    t0 = time.perf_counter()
    if not h5ad.is_file():
        raise InputError(f"{h5ad}: no such file; run quantify first (its cells.h5ad is the table)")
    table = anndata.read_h5ad(h5ad)
    if INSTANCE_KEY not in table.obs:
        raise InputError(f"{h5ad}: its obs has no {INSTANCE_KEY!r} column (the cell labels); write it with "
                         "maskworks quantify")
    labels = {element: _stitched_lazy(stitch_dir, name) for element, name in LABELS.items()}
    with open_multichannel(image, channel_axis=channel_axis, lazy=True) as img:  # read by tiles, whatever its size
        names = _unique_names(table, img, image, h5ad)
        for vol in labels.values():
            if tuple(vol.shape) != tuple(img.shape):
                raise InputError(f"{image} is {img.shape} pixels but {vol.path} is {vol.shape}: the stitched "
                                 "labels must come from this image")
        mpp = _pixel_size(image_mpp, table, labels["cell_labels"], img)
        transform = {COORDINATE_SYSTEM: Scale([mpp, mpp], axes=("y", "x")) if mpp else Identity()}
        factors = [f[0] for f in pyramid_factors(img.shape, (1.0, 1.0))]
        log.info("write-spatialdata %s: %d channels, %d x %d px, %d cells, mpp %s, %d levels", image, len(names),
                 *img.shape, table.n_obs, mpp, len(factors) + 1)
        images = {"image": Image2DModel.parse(
            _slide_dask(img, chunk), dims=("c", "y", "x"), c_coords=names, transformations=transform,
            scale_factors=factors or None, chunks=(1, chunk, chunk))}
        elements = {element: Labels2DModel.parse(
            _dask(vol.data, (chunk, chunk)), dims=("y", "x"), transformations=transform,
            scale_factors=factors or None, chunks=(chunk, chunk)) for element, vol in labels.items()}
        table.obs[REGION_KEY] = np.full(table.n_obs, REGION)
        table.obs[INSTANCE_KEY] = table.obs[INSTANCE_KEY].astype(np.int64)
        table.obs[REGION_KEY] = table.obs[REGION_KEY].astype("category")
        tables = {"table": TableModel.parse(table, region=REGION, region_key=REGION_KEY, instance_key=INSTANCE_KEY)}
        sdata = SpatialData(images=images, labels=elements, tables=tables)
        with atomic_path(out) as tmp:
            sdata.write(tmp, update_sdata_path=False)
    st = {"image": str(image), "stitch_dir": str(stitch_dir), "table": str(h5ad), "store": str(out),
          "shape": list(img.shape), "channels": names, "cells": int(table.n_obs), "levels": len(factors) + 1,
          "image_mpp": mpp, "coordinate_system": COORDINATE_SYSTEM, "unit": "micrometer" if mpp else "pixel",
          "chunk": chunk, "seconds": round(time.perf_counter() - t0, 3)}
    write_json(stats_path, st)
    log.info("write-spatialdata done: %s (%d cells, %d levels, %.1f s)", out, st["cells"], st["levels"], st["seconds"])
    return st


def _require_spatialdata() -> None:
    try:
        import spatialdata  # noqa: F401
    except ImportError as exc:
        raise InputError(f"write-spatialdata needs spatialdata 0.8 ({exc}); run it with the scverse environment "
                         "(.venv-scverse/bin/python -m maskworks.cli, made by `make setup-scverse`, or "
                         "envs/scverse.yaml)") from None


def _stitched_lazy(stitch_dir, name):
    from .stages import STITCH_FORMATS

    for ext in STITCH_FORMATS.values():
        path = stitch_dir / f"{name}{ext}"
        if path.exists():
            return read_volume(path, ndim=2, lazy=True)
    raise InputError(f"{stitch_dir}: no {name}.ome.tif or {name}.zarr; run stitch first")


def _unique_names(table, img, image, h5ad) -> list[str]:
    """The channel names: the table's var names (quantify measured every channel; ``var["channel"]``,
    where present, is each marker's channel index, else the markers are in channel order)."""
    names = [str(n) for n in table.var_names]
    if len(names) != img.n_channels:
        raise InputError(f"{h5ad} has {len(names)} markers but {image} has {img.n_channels} channel(s): the table "
                         "must be quantify's of this image")
    if len(set(names)) != len(names):  # quantify numbers repeats (DAPI_1, DAPI_2); an older table may not
        import pandas as pd
        from anndata.utils import make_index_unique

        unique = [str(n) for n in make_index_unique(pd.Index(names))]
        log.warning("%s: repeated marker names %s made unique as %s", h5ad, names, unique)
        table.var_names = names = unique
    if "channel" in table.var:
        index = [int(c) for c in table.var["channel"]]
        if sorted(index) != list(range(len(names))):
            raise InputError(f"{h5ad}: var['channel'] {index} is not one index per channel of {image}")
        names = [names[index.index(c)] for c in range(len(names))]
    return names


def _pixel_size(given, table, cell, img) -> float | None:
    if given not in (None, ""):
        return float(given)
    used = table.uns.get("maskworks", {}).get("image_mpp")
    if isinstance(used, (int, float, np.integer, np.floating)) and float(used) > 0:
        return float(used)
    if cell.unit == "micrometer":
        return float(cell.voxel_size[0])
    return float(img.mpp) if img.mpp else None


class _SlideCYX:
    """The open slide as a (c, y, x) array: each read is one channel's region at a time."""

    def __init__(self, img):
        self.img, self.dtype, self.ndim = img, np.dtype(img.data.dtype), 3
        self.shape = (img.n_channels, *img.shape)

    def __getitem__(self, key):
        cs, ys, xs = key
        return np.stack([self.img.region(c, ys, xs) for c in range(*cs.indices(self.shape[0]))])


def _slide_dask(img, chunk):
    return _dask(_SlideCYX(img), (1, chunk, chunk), lock=img.lazy)


def _dask(data, chunks, lock=None):
    """A dask array over a lazy reader; reads through an open TIFF are serialised (one file handle)."""
    import dask.array as da

    if lock is None:
        lock = not isinstance(data, np.ndarray)
    return da.from_array(data, chunks=chunks, lock=lock, asarray=True,
                         meta=np.empty((0,) * len(chunks), dtype=np.dtype(data.dtype)))


def add_commands(sub):
    """Register ``write-spatialdata``."""
    p = sub.add_parser("write-spatialdata", help="the SpatialData store of a quantified slide: image, cell and "
                       "nucleus labels (pyramids) and the cell table (needs spatialdata: .venv-scverse)")
    p.add_argument("image", help="the multichannel image the cells were segmented from")
    p.add_argument("stitch_dir", help="stitch output folder (cell, nucleus labels)")
    p.add_argument("quantify", help="quantify's cells.h5ad, or its folder")
    p.add_argument("out", help="the store to write, NAME.zarr (stats: NAME_stats.json beside it)")
    p.add_argument("--image-mpp", type=float, help="µm per pixel; if not given, quantify's, else the labels' or "
                   "the image's")
    p.add_argument("--chunk", type=int, default=1024, help="side of the stored chunks (pixels)")
    p.add_argument("--channel-axis", help="the image's channel axis (index or tifffile letter); if not given, "
                   "the only non-spatial axis")
    p.set_defaults(run=_run_write_spatialdata)


def _run_write_spatialdata(a):
    return write_spatialdata_files(a.image, a.stitch_dir, a.quantify, a.out, image_mpp=a.image_mpp, chunk=a.chunk,
                                   channel_axis=a.channel_axis)
