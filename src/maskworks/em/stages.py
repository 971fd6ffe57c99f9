"""File-level runners of the volume-EM stages and their ``maskworks`` commands.

``texture_mask_files`` and ``postprocess_mask_files`` are what both the Snakemake
scripts and the command line call: read through :mod:`maskworks.io`, one library
call, atomic writes of the outputs, a stats JSON and a QC PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from ..io import (
    InputError,
    atomic_path,
    convert_length,
    create_volume,
    format_of,
    read_volume,
    staged,
    strip_extension,
    transaction,
    write_json,
    write_volume,
)
from ..io.outputs import MARKER, check_outputs, fault_point
from ..io.params import Flag, Length, Number, Scale, Size, checked, specs_of
from ..io.qc import save_orthoslices
from ..io.volumes import MAX_VOXELS as MAX_VOXEL_DEFAULT
from ..io.volumes import describe_error, unit_symbol
from ..jobs import about, geometry, keyword_defaults, provenance, sibling, voxel_size_override
from .postprocess import SLICE_AXES, mask_overlap, overlap_scores, postprocess_mask
from .texture import texture_mask
from .unet import CHECKPOINT_FORMAT as UNET_FORMAT
from .unet import NORMALIZATIONS, inference_chunk_shape, predict_volume, train_unet, training_labels

log = logging.getLogger("maskworks")

# Above this many voxels a volume is processed in chunks when no chunk_shape is given.
AUTO_CHUNK_VOXELS = 2**27
AUTO_CHUNK_SHAPE = (128, 512, 512)


def _auto_chunks(shape):
    """The chunk a stage uses when none is given: None (whole volume) unless the volume is large."""
    return AUTO_CHUNK_SHAPE if np.prod(shape) > AUTO_CHUNK_VOXELS else None


# The voxel budget of the EM stages' inputs (see read_volume); None: maskworks.io.volumes.MAX_VOXELS.
MAX_VOXELS = Number(integer=True, minimum=1, nullable=True)
LEVEL = Number(integer=True, minimum=0)


# The scales a user may give as lengths ("80nm"): the runners convert them per axis from the
# volume's voxel size; the library functions take voxels (one number or three).
def _physical_scales(func) -> dict:
    """The :class:`Scale` parameters of a library function, accepting lengths as well."""
    return {name: dataclasses.replace(spec, physical=True)
            for name, spec in specs_of(func).items() if isinstance(spec, Scale)}


TEXTURE_SCALES = _physical_scales(texture_mask)
POSTPROCESS_SCALES = _physical_scales(postprocess_mask)
# Above this ratio of the longest to the shortest voxel side, a scale given as one number of voxels
# is a different physical length along each axis: the stats and the log say so.
ANISOTROPY_WARNING = 2.0


def _in_voxels(stage, params, scales, vs, unit, path):
    """``params`` with each scale given as a :class:`Length` converted to voxels per axis (z, y, x)
    from the voxel size ``vs`` (``unit``) of the volume at ``path``; returns the converted
    parameters, what each length became (for the stats) and the warnings about scales given in
    voxels on a strongly anisotropic volume."""
    out, converted, warnings = dict(params), {}, []
    vs = tuple(float(v) for v in vs)
    ratio = max(vs) / min(vs)
    short = unit_symbol(unit)
    for name, spec in scales.items():
        value = params.get(name)
        if isinstance(value, Length):
            with about(path):
                voxels = value.voxels(vs, unit, name)
            if spec.integer:
                voxels = tuple(int(round(v)) for v in voxels)
            try:  # the converted scale must still be one the library takes (a window of 3 voxels...)
                out[name] = Scale(integer=spec.integer, minimum=spec.minimum, maximum=spec.maximum,
                                  exclusive_minimum=spec.exclusive_minimum)(stage, name, voxels)
            except InputError:
                raise InputError(
                    f"{path}: {name}={value} is {_fmt_scale(voxels)} voxels (z, y, x) at voxel size "
                    f"{vs} {unit or ''}; expected {spec._item().expected()} on every axis") from None
            converted[name] = {"given": str(value), "voxels": list(voxels)}
            log.info("%s=%s is %s voxels (z, y, x) at voxel size %s %s", name, value, _fmt_scale(voxels), vs, unit)
        elif value is not None and not isinstance(value, tuple) and value != 0 and ratio > ANISOTROPY_WARNING:
            lengths = sorted({v * abs(float(value)) for v in vs})
            hint = f"'{min(vs) * float(value):g}{short}'" if short else "a length with its unit"
            warnings.append(
                f"{name}={value:g} voxels on voxels of {_fmt_scale(vs)} {unit or ''} (anisotropy "
                f"{ratio:.1f}:1) spans {' / '.join(f'{x:g}' for x in lengths)} {unit or ''} along different axes; "
                f"give it as a length ({name}: {hint}) for the same physical scale on every axis, or as three "
                "numbers (z, y, x)")
            log.warning(warnings[-1])
    return out, converted, warnings


def _fmt_scale(values):
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _score(truth_path, mask, shape, voxel_size, unit, max_voxels=None, level=0):
    """Dice/Jaccard of ``mask`` (NumPy or Zarr) against a ground-truth mask file (for demo and
    validation data; its pyramid ``level`` when the mask was made at one), counted z-slab by
    z-slab so that neither is loaded whole.  A truth whose voxel size differs from the volume's by
    more than 1 % is scored all the same (shapes match), with a warning in the result and the log."""
    truth = read_volume(truth_path, ndim=3, lazy=True, max_voxels=max_voxels, level=level)
    if truth.shape != tuple(shape):
        raise InputError(f"{truth_path}: truth shape {truth.shape} differs from the mask shape {tuple(shape)}")
    warning = None
    if any(v != 1.0 for v in truth.voxel_size):  # a truth file that carries a geometry
        theirs = np.array(convert_length(truth.voxel_size, truth.unit, unit if truth.unit and unit else None))
        if not np.allclose(theirs, voxel_size, rtol=0.01, atol=0):
            warning = (f"{truth_path} has voxel size {tuple(truth.voxel_size)} {truth.unit or ''} but the volume has "
                       f"{tuple(voxel_size)} {unit or ''}: is it the truth of this volume, at this scale?")
            log.warning(warning)
    step = max(1, (1 << 24) // max(1, int(np.prod(shape[1:]))))
    counts = {"true_positive": 0, "false_positive": 0, "false_negative": 0, "voxels": 0}
    for z0 in range(0, shape[0], step):
        part = mask_overlap(np.asarray(mask[z0:z0 + step]), np.asarray(truth.data[z0:z0 + step]))
        for k in counts:
            counts[k] += part[k]
    scores = overlap_scores(**counts)
    return {**scores, "warning": warning} if warning else scores


VOLUME_HELP = ("volume: OME-Zarr 0.4/0.5 or Zarr v2/v3 (.zarr, image.zarr/N for one level), HDF5 (file.h5:/dataset), "
               ".n5, neuroglancer precomputed, a folder of 2-D TIFF slices, .tif, .mrc/.rec, .nrrd, .nii(.gz), .npy")

@checked(texture_mask, chunk_shape=Size(8, nullable=True), max_voxels=MAX_VOXELS, level=LEVEL, **TEXTURE_SCALES)
def texture_mask_files(
    input, mask, *, confidence, stats, qc, truth=None, voxel_size=None, unit=None,
    chunk_shape=None, max_voxels=None, level=0, **params,
):
    """Run :func:`maskworks.em.texture.texture_mask` on a file and write every output.

    ``chunk_shape`` None means automatic: the whole volume at once up to
    ``AUTO_CHUNK_VOXELS`` voxels, chunks of ``AUTO_CHUNK_SHAPE`` above.  ``level``: the
    pyramid level of the input to work at (its voxel size and origin are the outputs').
    ``block_size``, ``texture_sigma`` and ``edge_sigma`` may also be lengths (``"80nm"``),
    converted per axis from the voxel size at that level.
    """
    with transaction(mask, confidence, stats, qc, inputs=[input, truth]):
        return _texture_mask_files(input, mask, confidence, stats, qc, truth, voxel_size, unit, chunk_shape,
                                   max_voxels, level, params)


def _texture_mask_files(input, mask, confidence, stats, qc, truth, voxel_size, unit, chunk_shape, max_voxels,
                        level, params):
    vol = read_volume(input, ndim=3, lazy=True, voxel_size=voxel_size_override(voxel_size), max_voxels=max_voxels,
                      level=level)
    vs, unit = geometry(vol, unit)
    params, scales, warnings = _in_voxels("texture_mask", params, TEXTURE_SCALES, vs, unit, input)
    memory_mb = params.get("memory_mb")
    # with a budget the library sizes the chunks itself (it counts the stores' chunks too)
    chunks = chunk_shape or (None if memory_mb is not None else _auto_chunks(vol.shape))
    lazy = chunks is not None or memory_mb is not None
    data = vol.data if lazy else vol.numpy()
    log.info("texture_mask %s shape=%s voxel_size=%s %s chunks=%s params=%s",
             input, vol.shape, vs, unit, chunks, params)
    prov = provenance("texture_mask", {"input": input}, {**params, "chunk_shape": chunks})
    zchunks = _zarr_chunks(chunks) if chunks else (32, 128, 128) if memory_mb is not None else (64, 256, 256)
    geom = {"unit": unit, "origin": vol.origin, "chunks": zchunks, "provenance": prov}
    # a Zarr mask is written block by block (the mask is never whole in memory when a budget is
    # set); other formats are assembled in memory
    out_of_core = format_of(mask) == "zarr" and lazy
    with create_volume(confidence, vol.shape, np.float32, vs, **geom) as out_conf, \
            (create_volume(mask, vol.shape, np.uint8, vs, labels=True, **geom) if out_of_core
             else contextlib.nullcontext()) \
            as out_mask:
        with about(input):
            m, conf, st = texture_mask(data, chunk_shape=chunks, out_confidence=out_conf, out_mask=out_mask,
                                       **params)
        if not out_of_core:
            write_volume(mask, m, vs, labels=True, **geom)
    st.update(input=str(input), level=level, shape=list(vol.shape), voxel_size=list(vs), unit=unit)
    if scales:
        st["scales"] = scales
    if truth:
        st["truth"] = _score(truth, m, vol.shape, vs, unit, max_voxels, level)
    if warnings:
        st["warnings"] = st.get("warnings", []) + warnings
    conf_vol = read_volume(staged(confidence), lazy=True, check_finite=False)
    save_orthoslices(qc, vol.data, masks={"texture mask": m}, maps={"confidence": conf_vol.data},
                     voxel_size=vs, title=f"texture_mask: {Path(str(input)).name}  "
                     f"threshold {st['threshold']:.3f}  masked {st['fraction_masked']:.1%}")
    write_json(stats, st)
    log.info("texture_mask done: %s", {k: st[k] for k in ("fraction_masked", "threshold", "device")})
    return st


@checked(postprocess_mask, max_voxels=MAX_VOXELS, **POSTPROCESS_SCALES)
def postprocess_mask_files(input, output, *, stats, qc, image=None, truth=None, max_voxels=None,
                           full_resolution_of=None, **params):
    """Run :func:`maskworks.em.postprocess.postprocess_mask` on a mask file and write every output.

    ``full_resolution_of``: an image whose level 0 the mask (made at a coarser level of it) is
    written back to, by nearest-neighbour upsampling block by block: the output then has that
    level's shape, voxel size and origin (``truth`` is scored there).  An ``output`` inside the
    ``labels/`` of an OME-Zarr image (``image.zarr/labels/tissue``) is written as a label image of
    that image (on its level-0 grid, ``full_resolution_of`` defaulting to it), listed in its
    ``labels`` group.  The radii may also be lengths (``"80nm"``,
    ``"-0.5um"`` for grow_radius), converted per axis from the input mask's voxel size."""
    from ..io.ngff import label_group

    group = label_group(output)
    if group and not full_resolution_of:
        full_resolution_of = group.image  # a label image has its image's grid: level 0's
    with transaction(output, stats, qc, *(group.files if group else ()), inputs=[input, image, truth, full_resolution_of],
                     labels_of=group.image if group else None):
        st = _postprocess_mask_files(input, output, stats, qc, image, truth, max_voxels, full_resolution_of, params,
                                     group)
        if group:
            group.register()
        return st


def _postprocess_mask_files(input, output, stats, qc, image, truth, max_voxels, full_resolution_of, params, group):
    lazy = params.get("memory_mb") is not None
    vol = read_volume(input, ndim=3, lazy=lazy, max_voxels=max_voxels)
    params, scales, warnings = _in_voxels("postprocess_mask", params, POSTPROCESS_SCALES, vol.voxel_size, vol.unit,
                                          input)
    log.info("postprocess_mask %s shape=%s params=%s", input, vol.shape, params)
    prov = provenance("postprocess_mask", {"input": input, "full_resolution_of": full_resolution_of}, params)
    target = read_volume(full_resolution_of, ndim=3, lazy=True, check_finite=False, max_voxels=max_voxels) \
        if full_resolution_of else vol
    geom = {"unit": target.unit, "origin": target.origin, "provenance": prov}
    if group:  # a label image of its image: that image's OME-Zarr version, and the way back to it
        geom.update(ome_zarr_version=group.version, source="../../", pyramid=group.pyramid())
    out_of_core = lazy and format_of(output) == "zarr" and target is vol
    with (create_volume(output, vol.shape, np.uint8, vol.voxel_size, labels=True, **geom) if out_of_core
          else contextlib.nullcontext()) as out:
        with about(input):
            m, st = postprocess_mask(vol.data if lazy else vol.numpy(), out=out, **params)
        full = None
        if target is not vol:
            full = _write_at_full_resolution(output, m, vol, target, geom)
            st["full_resolution"] = {"of": str(full_resolution_of), "shape": list(target.shape),
                                     "voxel_size": list(target.voxel_size)}
        elif not out_of_core:
            write_volume(output, m, vol.voxel_size, labels=True, **geom)
    st.update(input=str(input), shape=list(vol.shape), voxel_size=list(vol.voxel_size), unit=vol.unit)
    if scales:
        st["scales"] = scales
    if warnings:
        st["warnings"] = st.get("warnings", []) + warnings
    if truth:
        st["truth"] = _score(truth, m if full is None else full, target.shape, target.voxel_size, target.unit,
                             max_voxels)
    background = _on_grid_of(image, vol.shape, max_voxels) if image else None
    background = m if background is None else background
    save_orthoslices(qc, background, masks={"input mask": vol.data, "post-processed": m},
                     voxel_size=vol.voxel_size,
                     title=f"postprocess_mask: {Path(str(input)).name}  "
                     f"{st['fraction_in']:.1%} -> {st['fraction_out']:.1%}")
    write_json(stats, st)
    return st


def _on_grid_of(path, shape, max_voxels):
    """The level of the image at ``path`` with this ``shape`` (lazily), or None (the QC picture of a
    mask made at a coarser level is drawn on that level of the image)."""
    first = read_volume(path, ndim=3, lazy=True, check_finite=False, max_voxels=max_voxels)
    for level in range(first.attrs.get("levels", 1)):
        vol = first if level == 0 else read_volume(path, ndim=3, lazy=True, check_finite=False, level=level,
                                                   max_voxels=max_voxels)
        if vol.shape == tuple(shape):
            return vol.data
    return None


def _write_at_full_resolution(output, mask, vol, target, geom):
    """Write ``mask`` (on the grid of ``vol``) on the grid of ``target`` (nearest neighbour, z-slab by
    z-slab) to ``output``; returns the written array (read back lazily)."""
    from .postprocess import nearest_indices, upsample_nearest

    _check_same_extent(vol, target)
    maps = nearest_indices(vol.shape, vol.voxel_size, vol.origin, target.shape, target.voxel_size, target.origin,
                           vol.unit, target.unit)
    with create_volume(output, target.shape, np.uint8, target.voxel_size, labels=True, **geom) as out:
        upsample_nearest(mask, maps, out=out)
    return read_volume(staged(output), ndim=3, lazy=True).data


def _check_same_extent(vol, target) -> None:
    """``vol`` and ``target`` must cover the same region (to within one voxel of ``vol`` per axis):
    else the mask was not made from that image, or one of them lacks its voxel size or unit."""
    from ..io import convert_length

    vs, origin = vol.voxel_size, vol.origin
    if vol.unit and target.unit:
        vs, origin = convert_length(vs, vol.unit, target.unit), convert_length(origin, vol.unit, target.unit)
    elif vol.unit != target.unit:
        raise InputError(f"{target.path}: has {'no length unit' if not target.unit else 'unit ' + target.unit}, "
                         f"but the mask {vol.path} has {'none' if not vol.unit else vol.unit}; give both their "
                         "voxel size and unit to write the mask at full resolution")
    for axis, n, v, o, tn, tv, to in zip("zyx", vol.shape, vs, origin, target.shape, target.voxel_size, target.origin):
        start, end = o - v / 2, o + (n - 0.5) * v
        t_start, t_end = to - tv / 2, to + (tn - 0.5) * tv
        if abs(start - t_start) > v * 1.001 or abs(end - t_end) > v * 1.001 + tv:
            raise InputError(
                f"{vol.path}: along {axis} the mask covers {start:.6g}..{end:.6g} ({n} voxels of {v:.6g}), but "
                f"{target.path} covers {t_start:.6g}..{t_end:.6g} ({tn} voxels of {tv:.6g}) {target.unit or ''}; "
                "write a mask back only onto the image (level 0) it was made from")


def _scale_arg(text):
    """A scale on the command line: a number, three comma-separated numbers (z, y, x), or a length
    with its unit (checked, with the message, by the stage's specification)."""
    parts = [p for p in text.split(",") if p.strip()]
    try:
        numbers = [int(p) if p.strip().lstrip("-").isdigit() else float(p) for p in parts]
    except ValueError:
        return text.strip()
    return numbers[0] if len(numbers) == 1 else tuple(numbers)


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
    p.add_argument("input", help=VOLUME_HELP)
    p.add_argument("output", help="mask (uint8 0/1); .zarr writes OME-Zarr")
    p.add_argument("--confidence", help="confidence map output; if not given, <output>_confidence.zarr")
    p.add_argument("--stats", help="stats JSON; if not given, <output>_stats.json")
    p.add_argument("--qc", help="QC PNG; if not given, <output>_qc.png")
    p.add_argument("--truth", help="ground-truth mask to score the result against (Dice/Jaccard in the stats)")
    p.add_argument("--voxel-size", help="override the file's full-resolution (level 0) voxel size: 'z,y,x' or one number "
                   "(a --level gets it times its factors)")
    p.add_argument("--unit", help="length unit of --voxel-size (nanometer, angstrom, micrometer)")
    p.add_argument("--block-size", type=_scale_arg, default=d["block_size"],
                   help="local-statistics window: voxels (one number or 'z,y,x'), or a length such as 512nm")
    p.add_argument("--texture-sigma", type=_scale_arg, default=d["texture_sigma"],
                   help="DoG band-pass sigma: voxels (one number or 'z,y,x'), or a length such as 8nm")
    p.add_argument("--edge-sigma", type=_scale_arg, default=d["edge_sigma"],
                   help="gradient/structure-tensor sigma: voxels or a length, as --texture-sigma")
    p.add_argument("--min-region-size", type=int, default=d["min_region_size"],
                   help="smallest kept component and largest filled hole (voxels)")
    p.add_argument("--threshold", type=_threshold, default=d["threshold"], help="'otsu' or a value in (0, 1)")
    p.add_argument("--chunk-shape", help="'z,y,x' chunk for out-of-core processing; if not given, automatic")
    _add_level(p)
    _add_cores_and_memory(p, d)
    p.set_defaults(run=_run_texture)


def _add_cores_and_memory(p, defaults):
    p.add_argument("--device", default=defaults["device"],
                   help="auto | cpu | cuda | cuda:N (auto: a GPU when CuPy and a device are there)")
    p.add_argument("--threads", type=int, help="CPU threads; if not given, every CPU this process may use")
    p.add_argument("--memory-mb", type=float,
                   help="bound the working memory (MiB): the volume is read, processed and written (.zarr) "
                        "chunk by chunk; if not given, no bound")
    _add_max_voxels(p)


def _add_level(p):
    p.add_argument("--level", type=int, default=0,
                   help="pyramid level of the input to work at (OME-Zarr, N5, precomputed, pyramidal TIFF); "
                        "the outputs get that level's voxel size and origin")


def _add_max_voxels(p):
    p.add_argument("--max-voxels", type=int,
                   help=f"the most voxels an input may claim (a damaged header is refused before anything is "
                        f"allocated); if not given, {MAX_VOXEL_DEFAULT:.3g}")


def _run_texture(a):
    out = Path(a.output)
    return texture_mask_files(
        a.input, out, confidence=a.confidence or sibling(out, "_confidence.zarr"),
        stats=a.stats or sibling(out, "_stats.json"), qc=a.qc or sibling(out, "_qc.png"),
        truth=a.truth, voxel_size=a.voxel_size, unit=a.unit, chunk_shape=a.chunk_shape,
        block_size=a.block_size, texture_sigma=a.texture_sigma, edge_sigma=a.edge_sigma,
        min_region_size=a.min_region_size, threshold=a.threshold, threads=a.threads, memory_mb=a.memory_mb,
        device=a.device, max_voxels=a.max_voxels, level=a.level,
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
    p.add_argument("--closing-radius", type=_scale_arg, default=d["closing_radius"],
                   help="small-gap closing radius: voxels (one number or 'z,y,x') or a length such as 80nm (0: off)")
    p.add_argument("--opening-radius", type=_scale_arg, default=d["opening_radius"],
                   help="opening radius: voxels or a length, as --closing-radius (0: off)")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=d["keep_largest"],
                   help="keep only the largest 3-D connected component")
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=d["fill_holes"],
                   help="fill holes that do not touch the volume faces")
    p.add_argument("--grow-radius", type=_scale_arg, default=d["grow_radius"],
                   help="dilate (>0) or erode (<0) at the end by this radius: voxels or a length "
                   "(write --grow-radius=-40nm or --grow-radius=-1,-2,-2: a value starting with '-' follows an '=')")
    p.add_argument("--fill-holes-2d", choices=list(SLICE_AXES), default=d["fill_holes_2d"],
                   help="also fill the holes of every 2-D slice across this axis (z: each section)")
    p.add_argument("--full-resolution-of",
                   help="image whose level 0 the mask (made at a coarser level of it) is written back to, by "
                        "nearest-neighbour upsampling; an output image.zarr/labels/NAME becomes a label image "
                        "of that OME-Zarr image")
    _add_cores_and_memory(p, d)
    p.set_defaults(run=_run_postprocess)


def _run_postprocess(a):
    out = Path(a.output)
    return postprocess_mask_files(
        a.input, out, stats=a.stats or sibling(out, "_stats.json"), qc=a.qc or sibling(out, "_qc.png"),
        image=a.image, truth=a.truth, closing_radius=a.closing_radius, opening_radius=a.opening_radius,
        keep_largest=a.keep_largest, fill_holes=a.fill_holes, grow_radius=a.grow_radius,
        fill_holes_2d=a.fill_holes_2d, threads=a.threads, memory_mb=a.memory_mb, device=a.device,
        max_voxels=a.max_voxels, full_resolution_of=a.full_resolution_of,
    )


# ----------------------------------------------------------------------------- U-Net

UNET_OUTPUTS = ("best.pt", "last.pt", "history.csv", "curves.png", "metrics.json")


# Folder (inside out_dir) where a running train-unet keeps its finished epochs.
IN_PROGRESS = "in_progress"


@checked(train_unet, resume=Flag())
def train_unet_files(images=(), labels=(), *, out_dir, images_dir=None, labels_dir=None, resume=False, levels=None,
                     **params):
    """Run :func:`maskworks.em.unet.train_unet` on volume files and write its outputs to ``out_dir``.

    Training data: ``images`` and ``labels`` (lists of files, paired in order), and/or
    every volume in ``images_dir`` paired by key (the file name without its
    extension) with the one in ``labels_dir``, e.g. the cryo-ET arm's
    ``<patches>/imagesCorr/`` and its merged labels folder.

    Writes ``best.pt`` (best epoch by validation Dice), ``last.pt`` (with the optimiser
    state, for ``resume``), ``history.csv``, ``curves.png`` and ``metrics.json`` (test
    Dice/Jaccard and a summary) as one transaction when training ends: a failed or killed
    run leaves the earlier run's five outputs exactly as they were.  While it trains, the
    run keeps its finished epochs (``last.pt``, ``best.pt``, ``history.csv``,
    ``curves.png``, each written atomically after every epoch) in ``out_dir/in_progress/``,
    which is removed when the run has committed; ``resume=True`` continues from
    ``in_progress/last.pt`` (an interrupted run) or else from ``out_dir/last.pt`` (a finished
    run, to train more epochs).  A run without ``resume`` starts afresh and discards an
    interrupted run's ``in_progress/``.  ``levels``: the pyramid level of each of ``images`` and its
    label (default 0).  ``params``: the keywords of ``train_unet``.
    """
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in UNET_OUTPUTS}
    progress = out_dir / IN_PROGRESS
    with transaction(*paths.values(), inputs=[*images, *labels, images_dir, labels_dir]):
        check_outputs([progress], inputs=[*images, *labels, images_dir, labels_dir], stores=[progress])
        pairs, sources = _training_pairs(images, labels, images_dir, labels_dir, levels)
        last, source = None, None
        for where in ((progress / "last.pt", paths["last.pt"]) if resume else ()):
            if where.exists():
                last, source = load_checkpoint(where), where
                log.info("train_unet: resuming from %s (epoch %s)", where, last.get("epoch"))
                break
        else:
            if resume:
                log.warning("train_unet: resume asked for but neither %s nor %s exists; starting afresh",
                            progress / "last.pt", paths["last.pt"])
        try:
            metrics = _train_unet_files(pairs, sources, paths, progress, last, source, params)
        except BaseException:
            if progress.exists() and not (progress / "last.pt").exists():  # made, but no epoch saved in it
                shutil.rmtree(progress, ignore_errors=True)
            raise
    shutil.rmtree(progress, ignore_errors=True)
    return metrics


def _start_progress(progress: Path, source) -> None:
    """The in_progress folder of this run, made when its first epoch is done (a run that fails before
    leaves an interrupted run's progress as it was)."""
    if progress.exists() and source != progress / "last.pt":
        log.warning("train_unet: discarding the finished epochs of an interrupted run in %s (resume would have "
                    "continued them)", progress)
        shutil.rmtree(progress)
    progress.mkdir(parents=True, exist_ok=True)
    (progress / MARKER).write_bytes(b"")


def _train_unet_files(pairs, sources, paths, progress, last, source, params):
    log.info("train_unet: %d training volume(s) %s -> %s, params=%s", len(pairs),
             [tuple(np.shape(im)) for im, _ in pairs], paths["best.pt"].parent, params)
    final = {"last": last, "started": False}

    def on_epoch(row, last_ckpt, best_ckpt):
        if not final["started"]:
            _start_progress(progress, source)
            final["started"] = True
        save_checkpoint(progress / "last.pt", last_ckpt)
        if best_ckpt is not None:
            save_checkpoint(progress / "best.pt", best_ckpt)
        _write_history(progress / "history.csv", last_ckpt["history"])
        _save_curves(progress / "curves.png", last_ckpt["history"])
        final["last"] = last_ckpt
        log.info("train_unet epoch %d: %s", row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
        fault_point("train.epoch")

    best, history, metrics = train_unet(pairs, resume=last, on_epoch=on_epoch, **params)
    save_checkpoint(paths["best.pt"], best)
    save_checkpoint(paths["last.pt"], final["last"] if final["last"] is not None else best)
    _write_history(paths["history.csv"], history)
    _save_curves(paths["curves.png"], history)
    metrics.update(inputs=sources, params=dict(params), epochs_in_history=len(history),
                   resumed_from_epoch=None if last is None else int(last["epoch"]),
                   checkpoint=str(paths["best.pt"]))
    write_json(paths["metrics.json"], metrics)
    test = metrics["test"] or {}
    log.info("train_unet done on device %s: best epoch %s, val Dice %s, test Dice %s", metrics.get("device"),
             metrics["best_epoch"], metrics["best_val_dice"], test.get("dice"))
    return metrics


def save_checkpoint(path, checkpoint: dict) -> Path:
    """``torch.save`` a checkpoint dictionary atomically.

    Serialised in memory first and written with Python's own file I/O, so that a full or
    read-only disk is an ``OSError`` naming the file (torch's writer says only "basic_ios::clear").
    """
    import io

    import torch

    path = Path(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return path


def load_checkpoint(path) -> dict:
    """Read a ``best.pt``/``last.pt`` with ``torch.load(weights_only=True)``: tensors and plain
    values only, never arbitrary pickled objects."""
    import torch

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as a maskworks U-Net checkpoint ({describe_error(exc)}); "
                         "checkpoints come from `maskworks train-unet` (best.pt, last.pt)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != UNET_FORMAT:
        raise InputError(f"{path}: not a maskworks U-Net checkpoint (expected format {UNET_FORMAT!r})")
    return ckpt


def _training_pairs(images, labels, images_dir, labels_dir, levels=None):
    """Read the (image, label) pairs; ``sources`` lists their files for metrics.json."""
    images, labels = [str(p) for p in images or ()], [str(p) for p in labels or ()]
    if len(images) != len(labels):
        raise InputError(f"{len(images)} image(s) but {len(labels)} label(s); give one label per image, in order")
    levels = list(levels) if levels else [0] * len(images)
    if len(levels) != len(images):
        raise InputError(f"{len(levels)} level(s) for {len(images)} image(s); give one level per image")
    files = [(i, lab, lev) for (i, lab), lev in zip(zip(images, labels), levels)]
    if (images_dir is None) != (labels_dir is None):
        raise InputError("images_dir and labels_dir go together: patch images and their labels, paired by name")
    if images_dir is not None:
        files += [(i, lab, 0) for i, lab in _pair_folders(Path(images_dir), Path(labels_dir))]
    if not files:
        raise InputError("no training data: give images and labels, or images_dir and labels_dir")
    pairs, sources = [], []
    for image_path, label_path, level in files:
        image = read_volume(image_path, ndim=3, level=level)
        label = read_volume(label_path, ndim=3, level=level)
        if image.shape != label.shape:
            raise InputError(f"{label_path} has shape {label.shape} but its image {image_path} has {image.shape}")
        pairs.append((image.numpy(), training_labels(label.numpy(), what=str(label_path))))
        sources.append({"image": str(image_path), "label": str(label_path), "level": level, "shape": list(image.shape),
                        "voxel_size": list(image.voxel_size), "unit": image.unit})
    return pairs, sources


def _pair_folders(images_dir: Path, labels_dir: Path):
    """(image, label) files of two folders paired by key; anything that is not a volume is skipped."""
    found = {}
    for what, d in (("images_dir", images_dir), ("labels_dir", labels_dir)):
        if not d.is_dir():
            raise InputError(f"{what} {d}: no such folder")
        keys = {}
        for f in sorted(d.iterdir()):
            if f.name.startswith("."):
                continue
            try:
                format_of(f)
            except InputError:
                continue  # report.csv, corrections folders, ...
            key = strip_extension(f.name)
            if key in keys:
                raise InputError(f"{d}: {keys[key].name} and {f.name} have the same key {key!r}; keep one")
            keys[key] = f
        found[what] = keys
    imgs, labs = found["images_dir"], found["labels_dir"]
    for a, b, da, db in ((imgs, labs, images_dir, labels_dir), (labs, imgs, labels_dir, images_dir)):
        missing = sorted(set(a) - set(b))
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise InputError(f"{da} has volumes without a partner in {db}: {shown}; files pair by name "
                             "(without extension), e.g. imagesCorr/p1.nrrd with <merged>/p1.nrrd")
    if not imgs:
        raise InputError(f"{images_dir} holds no volumes")
    return [(str(imgs[k]), str(labs[k])) for k in sorted(imgs)]


def _write_history(path, rows) -> None:
    import csv
    import io

    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["epoch"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(buf.getvalue())


def _save_curves(path, rows) -> None:
    """Loss (train, val) and validation Dice against the epoch, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", ms=3, label="train")
    val = [(r["epoch"], r["val_loss"], r["val_dice"]) for r in rows if r.get("val_dice") is not None]
    if val:
        ax_loss.plot([v[0] for v in val], [v[1] for v in val], "o-", ms=3, label="validation")
        ax_dice.plot([v[0] for v in val], [v[2] for v in val], "o-", ms=3, color="C2")
    best = next((r for r in reversed(rows) if r.get("best")), None)
    if best is not None:
        for ax in (ax_loss, ax_dice):
            ax.axvline(best["epoch"], color="0.6", ls="--", lw=1)
    ax_loss.set(xlabel="epoch", ylabel="Dice + CE loss", title="loss")
    ax_loss.legend(fontsize=8)
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation Dice (dashed: best epoch)", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


@checked(predict_volume, chunk_shape=Size(8, nullable=True), max_voxels=MAX_VOXELS, level=LEVEL)
def predict_unet_files(input, checkpoint, prob, mask, *, stats, qc, truth=None, voxel_size=None, unit=None,
                       chunk_shape=None, max_voxels=None, level=0, **params):
    """Run :func:`maskworks.em.unet.predict_volume` on a volume file and write every output.

    ``prob`` (float16 probability) and ``mask`` (uint8 0/1) get the input's voxel
    size; ``.zarr`` targets are OME-Zarr written block by block, other
    extensions (``.tif``) are assembled in memory.  ``chunk_shape`` None means
    automatic: the whole volume at once up to ``AUTO_CHUNK_VOXELS`` voxels,
    blocks of ``AUTO_CHUNK_SHAPE`` above.  Also writes ``stats`` (JSON, with
    Dice/Jaccard against ``truth`` when given) and ``qc`` (PNG of mid-slices).
    """
    with transaction(prob, mask, stats, qc, inputs=[input, checkpoint, truth]):
        return _predict_unet_files(input, checkpoint, prob, mask, stats, qc, truth, voxel_size, unit,
                                   chunk_shape, max_voxels, level, params)


def _predict_unet_files(input, checkpoint, prob, mask, stats, qc, truth, voxel_size, unit, chunk_shape, max_voxels,
                        level, params):
    vol = read_volume(input, ndim=3, lazy=True, voxel_size=voxel_size_override(voxel_size), max_voxels=max_voxels,
                      level=level)
    vs, unit = geometry(vol, unit)
    ckpt = load_checkpoint(checkpoint)
    chunks = chunk_shape or _auto_chunks(vol.shape)
    d = keyword_defaults(predict_volume)
    roi, overlap = params.get("roi_size", d["roi_size"]), params.get("overlap", d["overlap"])
    used = inference_chunk_shape(vol.shape, chunks, roi, overlap)
    data = vol.data if chunks is not None else vol.numpy()
    log.info("predict_unet %s shape=%s voxel_size=%s %s checkpoint=%s (epoch %s) chunks=%s params=%s",
             input, vol.shape, vs, unit, checkpoint, ckpt.get("epoch"), used, params)
    prov = provenance("predict_unet", {"input": input, "checkpoint": checkpoint},
                      {**params, "chunk_shape": used})
    zchunks = _zarr_chunks(used) if used else None
    geom = {"unit": unit, "origin": vol.origin, "chunks": zchunks, "provenance": prov}
    with create_volume(prob, vol.shape, np.float16, vs, **geom) as out_p, \
            create_volume(mask, vol.shape, np.uint8, vs, labels=True, **geom) as out_m:
        with about(input):
            _, _, st = predict_volume(ckpt, data, chunk_shape=chunks, out_prob=out_p, out_mask=out_m, **params)
    st.update(input=str(input), level=level, checkpoint=str(checkpoint), checkpoint_epoch=ckpt.get("epoch"),
              shape=list(vol.shape), voxel_size=list(vs), unit=unit)
    mask_vol = read_volume(staged(mask), ndim=3, lazy=True)
    if truth:
        st["truth"] = _score(truth, mask_vol.numpy(), vol.shape, vs, unit, max_voxels, level)
    prob_vol = read_volume(staged(prob), ndim=3, lazy=True, check_finite=False)
    save_orthoslices(qc, vol.data, masks={"U-Net mask": mask_vol.data}, maps={"probability": prob_vol.data},
                     voxel_size=vs, title=f"predict_unet: {Path(str(input)).name}  "
                     f"foreground {st['fraction_foreground']:.1%}"
                     + (f"  Dice vs truth {st['truth']['dice']:.3f}" if truth else ""))
    write_json(stats, st)
    log.info("predict_unet done: %s", {k: st[k] for k in ("device", "fraction_foreground", "seconds", "voxels_per_second")})
    return st


def _zarr_chunks(block):
    """Zarr chunks that tile the inference block (so that no two blocks write into one chunk):
    per axis the largest divisor of the block side up to 128 voxels, if there is one of 32 or more."""
    out = []
    for b in block:
        k = max(k for k in range(1, min(b, 128) + 1) if b % k == 0)
        out.append(k if k >= 32 or k == b else min(b, 64))
    return tuple(out)


def _int_list(value):
    try:
        return tuple(int(v) for v in value.replace(" ", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {value!r}") from None


def _float_pair(value):
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'low,high', got {value!r}") from None
    return lo, hi


def _add_train(sub):

    d = keyword_defaults(train_unet)
    p = sub.add_parser("train-unet", help="train a 3-D U-Net (MONAI) on image/label volumes with ignore label 2")
    p.add_argument("out_dir", help="folder for best.pt, last.pt, history.csv, curves.png, metrics.json")
    p.add_argument("--images", nargs="+", default=[], help="image volumes (any format read_volume reads)")
    p.add_argument("--labels", nargs="+", default=[],
                   help="label volumes in the same order: 0 background, 1 foreground, 2 ignore (or 0/255)")
    p.add_argument("--images-dir", help="folder of patch images (e.g. <patches>/imagesCorr), paired by name ...")
    p.add_argument("--labels-dir", help="... with the labels in this folder (e.g. the merged corrections)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=_int_list, default=d["channels"], help="feature channels per level")
    g.add_argument("--strides", type=_int_list, default=d["strides"], help="down-sampling between levels")
    g.add_argument("--num-res-units", type=int, default=d["num_res_units"], help="residual units per block")
    g = p.add_argument_group("data")
    g.add_argument("--patch-size", default=d["patch_size"], help="training patch: 'z,y,x' or one number")
    g.add_argument("--split-block-shape", default=d["split_block_shape"],
                   help="blocks given whole to train/val/test; None: the patch size")
    g.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="share of blocks for validation")
    g.add_argument("--test-fraction", type=float, default=d["test_fraction"], help="share of blocks for the test")
    g.add_argument("--patches-per-epoch", type=int, default=d["patches_per_epoch"], help="training patches per epoch; if not given, enough to cover the train blocks once (at most 4096)")
    g.add_argument("--val-patches", type=int, default=d["val_patches"], help="fixed validation patches")
    g.add_argument("--foreground-fraction", type=float, default=d["foreground_fraction"],
                   help="share of training patches forced to contain foreground")
    g.add_argument("--normalization", choices=NORMALIZATIONS, default=d["normalization"],
                   help="z-score training patches over themselves or with their volume's statistics")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d["batch_size"])
    g.add_argument("--epochs", type=int, default=d["epochs"], help="total epochs (resumed ones included)")
    g.add_argument("--learning-rate", type=float, default=d["learning_rate"], help="Adam learning rate")
    g.add_argument("--patience", type=int, default=d["patience"],
                   help="stop after this many epochs without a better validation Dice (0: never)")
    g.add_argument("--min-delta", type=float, default=d["min_delta"], help="smallest Dice gain that counts")
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--device", default=d["device"], help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d["amp"],
                   help="mixed precision on a GPU")
    g = p.add_argument_group("augmentation (probability 0 turns a transform off)")
    g.add_argument("--flip-prob", type=float, default=d["flip_prob"], help="per axis")
    g.add_argument("--rotate-prob", type=float, default=d["rotate_prob"], help="90-degree rotation in (y, x)")
    g.add_argument("--zoom-prob", type=float, default=d["zoom_prob"])
    g.add_argument("--zoom-range", type=_float_pair, default=d["zoom_range"], help="'low,high' zoom factors")
    g.add_argument("--noise-prob", type=float, default=d["noise_prob"])
    g.add_argument("--noise-std", type=float, default=d["noise_std"], help="Gaussian noise, z-score units")
    p.set_defaults(run=_run_train)


_TRAIN_KEYS = (
    "channels", "strides", "num_res_units", "patch_size", "split_block_shape", "val_fraction", "test_fraction",
    "patches_per_epoch", "val_patches", "foreground_fraction", "normalization", "batch_size", "epochs",
    "learning_rate", "patience", "min_delta", "seed", "device", "amp", "flip_prob", "rotate_prob", "zoom_prob",
    "zoom_range", "noise_prob", "noise_std",
)


def _run_train(a):
    train_unet_files(a.images, a.labels, out_dir=a.out_dir, images_dir=a.images_dir, labels_dir=a.labels_dir,
                     resume=a.resume, **{k: getattr(a, k) for k in _TRAIN_KEYS})


def _add_predict(sub):

    d = keyword_defaults(predict_volume)
    p = sub.add_parser("predict-unet", help="whole-volume U-Net inference (sliding window, Gaussian blending)")
    p.add_argument("input", help=VOLUME_HELP)
    p.add_argument("checkpoint", help="best.pt (or last.pt) from train-unet")
    p.add_argument("output", help="mask (uint8 0/1); .zarr writes OME-Zarr, .tif TIFF")
    p.add_argument("--prob", help="probability output, float16; if not given, <output>_prob.zarr")
    p.add_argument("--stats", help="stats JSON; if not given, <output>_stats.json")
    p.add_argument("--qc", help="QC PNG; if not given, <output>_qc.png")
    p.add_argument("--truth", help="ground-truth mask to score the result against (Dice/Jaccard in the stats)")
    p.add_argument("--voxel-size", help="override the file's full-resolution (level 0) voxel size: 'z,y,x' or one number "
                   "(a --level gets it times its factors)")
    p.add_argument("--unit", help="length unit of --voxel-size (nanometer, angstrom, micrometer)")
    p.add_argument("--roi-size", default=d["roi_size"], help="window: 'z,y,x' or one number")
    p.add_argument("--overlap", type=int, default=d["overlap"], help="window overlap in voxels")
    p.add_argument("--sw-batch-size", type=int, default=d["sw_batch_size"], help="windows per forward pass")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=d["tta"],
                   help="average the logits of the 8 axis flips")
    p.add_argument("--threshold", type=float, default=d["threshold"], help="mask = probability > threshold")
    p.add_argument("--mean", type=float, default=d["mean"], help="z-score mean; if not given, from the volume")
    p.add_argument("--std", type=float, default=d["std"], help="z-score std; if not given, from the volume")
    p.add_argument("--chunk-shape", help="'z,y,x' block for out-of-core inference; if not given, automatic")
    p.add_argument("--device", default=d["device"], help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads of the network (torch); if not given, torch's default")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d["amp"], help="mixed precision on a GPU")
    p.add_argument("--blend", choices=["gaussian", "constant"], default=d["blend"],
                   help="weights of overlapping windows: gaussian (MONAI's, less seam) or constant (Catena's)")
    _add_level(p)
    _add_max_voxels(p)
    p.set_defaults(run=_run_predict)


def _run_predict(a):
    out = Path(a.output)
    return predict_unet_files(
        a.input, a.checkpoint, a.prob or sibling(out, "_prob.zarr"), out,
        stats=a.stats or sibling(out, "_stats.json"), qc=a.qc or sibling(out, "_qc.png"), truth=a.truth,
        voxel_size=a.voxel_size, unit=a.unit, chunk_shape=a.chunk_shape, roi_size=a.roi_size, overlap=a.overlap,
        sw_batch_size=a.sw_batch_size, tta=a.tta, threshold=a.threshold, mean=a.mean, std=a.std,
        device=a.device, amp=a.amp, blend=a.blend, threads=a.threads, max_voxels=a.max_voxels, level=a.level,
    )


def add_commands(sub):
    """Register ``texture-mask``, ``postprocess-mask``, ``train-unet`` and ``predict-unet``."""
    _add_texture(sub)
    _add_postprocess(sub)
    _add_train(sub)
    _add_predict(sub)
