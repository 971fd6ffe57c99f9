"""File-level runners of the volume-EM stages and their ``maskworks`` commands.

``texture_mask_files`` and ``postprocess_mask_files`` are what both the Snakemake
scripts and the command line call: read through :mod:`maskworks.io`, one library
call, atomic writes of the outputs, a stats JSON and a QC PNG.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from ..cli import all_or_nothing, geometry, int_triple, keyword_defaults, provenance, sibling
from ..io import InputError, create_volume, read_volume, write_json, write_volume
from ..io.qc import save_orthoslices
from .postprocess import mask_overlap, postprocess_mask
from .texture import texture_mask

log = logging.getLogger("maskworks")

# Above this many voxels a volume is processed in chunks when no chunk_shape is given.
AUTO_CHUNK_VOXELS = 2**27
AUTO_CHUNK_SHAPE = (128, 512, 512)


def _score(truth_path, mask, shape):
    """Dice/Jaccard of ``mask`` against a ground-truth mask file (for demo and validation data)."""

    truth = read_volume(truth_path, ndim=3)
    if truth.shape != tuple(shape):
        raise InputError(f"{truth_path}: truth shape {truth.shape} differs from the mask shape {tuple(shape)}")
    return mask_overlap(mask, truth.numpy())


def texture_mask_files(
    input, mask, *, confidence, stats, qc, truth=None, voxel_size=None, unit=None,
    chunk_shape=None, **params,
):
    """Run :func:`maskworks.em.texture.texture_mask` on a file and write every output.

    ``chunk_shape`` None means automatic: the whole volume at once up to
    ``AUTO_CHUNK_VOXELS`` voxels, chunks of ``AUTO_CHUNK_SHAPE`` above.
    """
    with all_or_nothing(mask, confidence, stats, qc):
        return _texture_mask_files(input, mask, confidence, stats, qc, truth, voxel_size, unit, chunk_shape, params)


def _texture_mask_files(input, mask, confidence, stats, qc, truth, voxel_size, unit, chunk_shape, params):

    vol = read_volume(input, ndim=3, lazy=True)
    vs, unit = geometry(vol, voxel_size, unit)
    chunks = int_triple(chunk_shape, "chunk_shape")
    if chunks is None and np.prod(vol.shape) > AUTO_CHUNK_VOXELS:
        chunks = AUTO_CHUNK_SHAPE
    data = vol.data if chunks is not None else vol.numpy()
    log.info("texture_mask %s shape=%s voxel_size=%s %s chunks=%s params=%s",
             input, vol.shape, vs, unit, chunks, params)
    prov = provenance("texture_mask", {"input": input}, {**params, "chunk_shape": chunks})
    zchunks = chunks or (64, 256, 256)
    with create_volume(confidence, vol.shape, np.float32, vs, unit=unit, origin=vol.origin,
                       chunks=zchunks, provenance=prov) as out_conf:
        m, conf, st = texture_mask(data, chunk_shape=chunks, out_confidence=out_conf, **params)
        write_volume(mask, m, vs, unit=unit, origin=vol.origin, chunks=zchunks, provenance=prov)
    st.update(input=str(input), shape=list(vol.shape), voxel_size=list(vs), unit=unit)
    if truth:
        st["truth"] = _score(truth, m, vol.shape)
    conf_vol = read_volume(confidence, lazy=True, check_finite=False)
    save_orthoslices(qc, vol.data, masks={"texture mask": m}, maps={"confidence": conf_vol.data},
                     voxel_size=vs, title=f"texture_mask: {Path(str(input)).name}  "
                     f"threshold {st['threshold']:.3f}  masked {st['fraction_masked']:.1%}")
    write_json(stats, st)
    log.info("texture_mask done: %s", {k: st[k] for k in ("fraction_masked", "threshold")})
    return st


def postprocess_mask_files(input, output, *, stats, qc, image=None, truth=None, **params):
    """Run :func:`maskworks.em.postprocess.postprocess_mask` on a mask file and write every output."""
    with all_or_nothing(output, stats, qc):
        return _postprocess_mask_files(input, output, stats, qc, image, truth, params)


def _postprocess_mask_files(input, output, stats, qc, image, truth, params):

    vol = read_volume(input, ndim=3)
    log.info("postprocess_mask %s shape=%s params=%s", input, vol.shape, params)
    m, st = postprocess_mask(vol.numpy(), **params)
    prov = provenance("postprocess_mask", {"input": input}, params)
    write_volume(output, m, vol.voxel_size, unit=vol.unit, origin=vol.origin, provenance=prov)
    st.update(input=str(input), shape=list(vol.shape), voxel_size=list(vol.voxel_size), unit=vol.unit)
    if truth:
        st["truth"] = _score(truth, m, vol.shape)
    background = read_volume(image, ndim=3, lazy=True, check_finite=False).data if image else m
    save_orthoslices(qc, background, masks={"input mask": vol.data, "post-processed": m},
                     voxel_size=vol.voxel_size,
                     title=f"postprocess_mask: {Path(str(input)).name}  "
                     f"{st['fraction_in']:.1%} -> {st['fraction_out']:.1%}")
    write_json(stats, st)
    return st


def _threshold(value):
    if value == "otsu":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be 'otsu' or a number in (0, 1), got {value!r}") from None


def _add_texture(sub):

    d = keyword_defaults(texture_mask)
    p = sub.add_parser("texture-mask", help="classical texture-based tissue mask of a volume (Catena design)")
    p.add_argument("input", help="volume: .mrc/.rec, .tif, .zarr, .nrrd, .nii.gz, .npy")
    p.add_argument("output", help="mask (uint8 0/1); .zarr writes OME-Zarr")
    p.add_argument("--confidence", help="confidence map output; if not given, <output>_confidence.zarr")
    p.add_argument("--stats", help="stats JSON; if not given, <output>_stats.json")
    p.add_argument("--qc", help="QC PNG; if not given, <output>_qc.png")
    p.add_argument("--truth", help="ground-truth mask to score the result against (Dice/Jaccard in the stats)")
    p.add_argument("--voxel-size", help="override the file's voxel size: 'z,y,x' or one number")
    p.add_argument("--unit", help="length unit of --voxel-size (nanometer, angstrom, micrometer)")
    p.add_argument("--block-size", type=int, default=d["block_size"], help="local-statistics window (voxels)")
    p.add_argument("--texture-sigma", type=float, default=d["texture_sigma"], help="DoG band-pass sigma (voxels)")
    p.add_argument("--edge-sigma", type=float, default=d["edge_sigma"], help="gradient/structure-tensor sigma")
    p.add_argument("--min-region-size", type=int, default=d["min_region_size"],
                   help="smallest kept component and largest filled hole (voxels)")
    p.add_argument("--threshold", type=_threshold, default=d["threshold"], help="'otsu' or a value in (0, 1)")
    p.add_argument("--chunk-shape", help="'z,y,x' chunk for out-of-core processing; if not given, automatic")
    p.set_defaults(run=_run_texture)


def _run_texture(a):
    out = Path(a.output)
    return texture_mask_files(
        a.input, out, confidence=a.confidence or sibling(out, "_confidence.zarr"),
        stats=a.stats or sibling(out, "_stats.json"), qc=a.qc or sibling(out, "_qc.png"),
        truth=a.truth, voxel_size=a.voxel_size, unit=a.unit, chunk_shape=a.chunk_shape,
        block_size=a.block_size, texture_sigma=a.texture_sigma, edge_sigma=a.edge_sigma,
        min_region_size=a.min_region_size, threshold=a.threshold,
    )


def _add_postprocess(sub):

    d = keyword_defaults(postprocess_mask)
    p = sub.add_parser("postprocess-mask", help="3-D clean-up of a binary mask (opening, largest component, holes, grow/shrink)")
    p.add_argument("input", help="mask volume (nonzero = foreground)")
    p.add_argument("output", help="cleaned mask (uint8 0/1)")
    p.add_argument("--image", help="intensity volume to draw the QC picture on")
    p.add_argument("--stats", help="stats JSON; if not given, <output>_stats.json")
    p.add_argument("--qc", help="QC PNG; if not given, <output>_qc.png")
    p.add_argument("--truth", help="ground-truth mask to score the result against")
    p.add_argument("--closing-radius", type=int, default=d["closing_radius"], help="small-gap closing ball radius (0: off)")
    p.add_argument("--opening-radius", type=int, default=d["opening_radius"], help="opening ball radius (0: off)")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=d["keep_largest"],
                   help="keep only the largest 3-D connected component")
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=d["fill_holes"],
                   help="fill holes that do not touch the volume faces")
    p.add_argument("--grow-radius", type=int, default=d["grow_radius"],
                   help="dilate (>0) or erode (<0) by this many voxels at the end")
    p.set_defaults(run=_run_postprocess)


def _run_postprocess(a):
    out = Path(a.output)
    return postprocess_mask_files(
        a.input, out, stats=a.stats or sibling(out, "_stats.json"), qc=a.qc or sibling(out, "_qc.png"),
        image=a.image, truth=a.truth, closing_radius=a.closing_radius, opening_radius=a.opening_radius,
        keep_largest=a.keep_largest, fill_holes=a.fill_holes, grow_radius=a.grow_radius,
    )


def add_commands(sub):
    """Register ``texture-mask`` and ``postprocess-mask``."""
    _add_texture(sub)
    _add_postprocess(sub)
