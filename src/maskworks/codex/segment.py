"""Whole-cell and nuclear instance segmentation of two-channel patches: Mesmer (DeepCell), InstanSeg (PyTorch),
a classical watershed, or nuclei grown by a fixed distance (expansion)."""

from __future__ import annotations

import contextlib
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from maskworks.io import InputError, atomic_path
from maskworks.io.params import Number, checked

log = logging.getLogger("maskworks")

# Mesmer runs in the DeepCell environment (TensorFlow), InstanSeg in the torch one, the others anywhere
# (rules/common.smk: SEGMENT_ENVS).
BACKENDS = ("watershed", "mesmer", "expansion", "instanseg")

# Where deepcell 0.12's Mesmer() keeps the model: fetch_data() downloads
# models/MultiplexSegmentation-9.tar.gz into ~/.deepcell/models/ and Mesmer.__init__
# extracts it there, giving ~/.deepcell/models/MultiplexSegmentation (a SavedModel).
DEEPCELL_MODELS = Path.home() / ".deepcell" / "models"
MESMER_MODEL_KEY = "models/MultiplexSegmentation-9.tar.gz"
MESMER_MODEL_NAME = "MultiplexSegmentation"
MESMER_MODEL_HASH = "a1dfbce2594f927b9112f23a0a1739e0"  # md5 of the tarball, as deepcell checks it
_TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def smallest_uint(labels: np.ndarray) -> np.ndarray:
    """Labels as the smallest unsigned integer dtype that holds their largest id."""
    top = int(labels.max()) if labels.size else 0
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if top <= np.iinfo(dt).max:
            return labels.astype(dt, copy=False)
    raise InputError(f"label id {top} does not fit 64 bits")


def label_boundaries(labels) -> np.ndarray:
    """``skimage.segmentation.find_boundaries(labels, mode="inner")`` as uint8 0/1."""
    from .repair import boundaries

    return boundaries(labels).astype(np.uint8)


# ----------------------------------------------------------------------------- watershed


# The nuclear step's parameters (segment_watershed, segment_expansion).
NUCLEAR_PARAMETERS = dict(
    smoothing_sigma=Number(minimum=0, unit="pixels"),
    threshold_scale=Number(exclusive_minimum=0),
    min_nucleus_distance=Number(integer=True, minimum=1, unit="pixels"),
    min_nucleus_area=Number(integer=True, minimum=0, unit="pixels"),
)


@checked(
    **NUCLEAR_PARAMETERS,
    foreground_sigma=Number(minimum=0, unit="pixels"),
    max_expansion=Number(minimum=0, unit="pixels"),
    min_cell_area=Number(integer=True, minimum=0, unit="pixels"),
)
def segment_watershed(
    image,
    *,
    smoothing_sigma=1.0,
    threshold_scale=1.0,
    min_nucleus_distance=5,
    min_nucleus_area=20,
    foreground_sigma=3.0,
    max_expansion=10,
    min_cell_area=40,
):
    """Nuclei and whole cells of one patch by classical watershed (no model weights).

    Parameters
    ----------
    image : array-like, shape (h, w, 2)
        Channel 0 nuclear, channel 1 whole-cell (membrane).
    smoothing_sigma : float
        Gaussian smoothing of both channels before anything else (pixels).
    threshold_scale : float
        Multiplies both Otsu thresholds (nuclear foreground, cell foreground);
        above 1 is stricter.
    min_nucleus_distance : int
        Smallest distance between two nucleus seeds (maxima of the distance
        transform of the nuclear foreground, ``peak_local_max(min_distance=...)``),
        pixels; larger values merge touching nuclei.
    min_nucleus_area : int
        Nuclear foreground components and nuclei smaller than this are dropped (pixels).
    foreground_sigma : float
        Smoothing of the whole-cell channel for the cell foreground (pixels): wide
        enough to fill a cell between its membrane outline.
    max_expansion : float
        Cells grow from their nucleus by at most this distance (pixels).
    min_cell_area : int
        Cells without nucleus smaller than this are dropped (pixels).

    Returns
    -------
    cell, nucleus : ndarray of int32, shape (h, w)
        Instance labels (0 background), ids 1..n each; they are not paired.
    stats : dict
        ``nuclei``, ``cells``, ``cells_without_nucleus``, ``nuclei_split``
        (nuclei lying in more than one cell or partly outside every cell).

    Notes
    -----
    1. Nuclei: Otsu threshold of the smoothed nuclear channel, holes filled,
       seeds at the maxima of its distance transform, watershed of the negated
       distance within the foreground.
    2. Cells: seeded watershed of the smoothed whole-cell channel (membranes are
       ridges) from the nucleus seeds, within the cell foreground (Otsu threshold
       of log(1 + the widely smoothed whole-cell channel), holes filled, nuclei
       included) and within ``max_expansion`` of a nucleus.
    3. Cells without a nucleus: what is left of the cell foreground after an
       opening (radius 2), split at the maxima of its distance transform.

    Like any segmentation it is imperfect in the ways the repair stage expects:
    dim nuclei are missed (their cells come out without nucleus, or are claimed by
    a neighbour), cell borders follow the membrane rather than the nucleus, so a
    nucleus near a membrane is shared between two cells.
    """
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 2:
        raise InputError(f"segment_watershed: expected a (h, w, 2) image, got shape {img.shape}")
    shape = img.shape[:2]
    nuc = ndi.gaussian_filter(img[..., 0].astype(np.float32), smoothing_sigma)
    wc = ndi.gaussian_filter(img[..., 1].astype(np.float32), smoothing_sigma)
    empty = np.zeros(shape, np.int32)
    stats = {"nuclei": 0, "cells": 0, "cells_without_nucleus": 0, "nuclei_split": 0}
    if not np.ptp(nuc) > 0:
        return empty, empty.copy(), stats

    nucleus, seeds = _nuclei(nuc, threshold_scale, min_nucleus_distance, min_nucleus_area)

    # log: the split wanted is signal vs background, not membrane vs the dimmer cytoplasm
    wide = np.log1p(np.maximum(ndi.gaussian_filter(img[..., 1].astype(np.float32), foreground_sigma), 0))
    cell_fg = nucleus > 0
    if np.ptp(wide) > 0:
        cell_fg = cell_fg | ndi.binary_fill_holes(wide > threshold_otsu(wide) * threshold_scale)
    reach = ndi.distance_transform_edt(nucleus == 0) <= max_expansion
    cell = watershed(wc, seeds, mask=cell_fg & reach) if seeds.any() else empty.copy()

    rest = ndi.binary_opening(cell_fg & (cell == 0), structure=_disk(2))
    orphans = np.zeros(shape, np.int32)
    if rest.any():
        rest_lab = _drop_small(ndi.label(rest)[0], min_cell_area)
        rdist = ndi.distance_transform_edt(rest_lab > 0)
        rpeaks = peak_local_max(rdist, min_distance=max(1, int(max_expansion)), labels=rest_lab, exclude_border=False)
        rmark = np.zeros(shape, np.int32)
        rmark[tuple(rpeaks.T)] = np.arange(1, len(rpeaks) + 1, dtype=np.int32)
        orphans = _sequential(_drop_small(watershed(wc, rmark, mask=rest_lab > 0), min_cell_area))
    n_main = int(cell.max())
    cell = _sequential(np.where(orphans > 0, orphans + n_main, cell).astype(np.int32))

    stats.update(nuclei=int(nucleus.max()), cells=int(cell.max()),
                 cells_without_nucleus=_cells_without_nucleus(cell, nucleus),
                 nuclei_split=_nuclei_split(cell, nucleus))
    return cell.astype(np.int32), nucleus.astype(np.int32), stats


def _nuclei(nuc, threshold_scale, min_nucleus_distance, min_nucleus_area):
    """Nuclei of a smoothed nuclear channel (which has some contrast) and their seeds: Otsu foreground,
    holes filled, watershed of the negated distance transform from its maxima."""
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    fg = nuc > threshold_otsu(nuc) * threshold_scale
    fg = ndi.binary_fill_holes(_drop_small(ndi.label(fg)[0], min_nucleus_area) > 0)
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=max(1, int(min_nucleus_distance)), labels=ndi.label(fg)[0],
                           exclude_border=False)
    markers = np.zeros(nuc.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    nucleus = _sequential(_drop_small(watershed(-dist, markers, mask=fg), min_nucleus_area))
    return nucleus, np.where(markers > 0, nucleus, 0).astype(np.int32)


# ----------------------------------------------------------------------------- expansion


@checked(**NUCLEAR_PARAMETERS, expansion_distance=Number(minimum=0, unit="pixels"))
def segment_expansion(
    image,
    *,
    smoothing_sigma=1.0,
    threshold_scale=1.0,
    min_nucleus_distance=5,
    min_nucleus_area=20,
    expansion_distance=10.0,
):
    """Nuclei of the nuclear channel, and cells grown from them by a fixed distance (no model weights).

    Parameters
    ----------
    image : array-like, shape (h, w, 2) or (h, w)
        Channel 0 nuclear (channel 1, whole-cell, is not used).
    smoothing_sigma, threshold_scale, min_nucleus_distance, min_nucleus_area
        The nuclear step of :func:`segment_watershed`, with the same meaning.
    expansion_distance : float
        Each nucleus grows by up to this many pixels into the background
        (``skimage.segmentation.expand_labels``); 0: the cells are the nuclei.

    Returns
    -------
    cell, nucleus : ndarray of int32, shape (h, w)
        Instance labels, ids 1..n, paired: nucleus k lies inside cell k.
    stats : dict
        ``nuclei``, ``cells``.

    Notes
    -----
    The usual fallback where no membrane marker is good enough (e.g. QuPath's
    cell expansion, ``expand_labels`` in scikit-image): neighbouring cells
    meet half-way between their nuclei, never overlap, and a cell is as
    round as its nucleus allows.
    """
    from skimage.segmentation import expand_labels

    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] >= 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise InputError(f"segment_expansion: expected a (h, w, 2) image, got shape {np.shape(image)}")
    nuc = ndi.gaussian_filter(img.astype(np.float32), smoothing_sigma)
    if not np.ptp(nuc) > 0:
        empty = np.zeros(img.shape, np.int32)
        return empty, empty.copy(), {"nuclei": 0, "cells": 0}
    nucleus, _ = _nuclei(nuc, threshold_scale, min_nucleus_distance, min_nucleus_area)
    cell = expand_labels(nucleus, distance=float(expansion_distance)).astype(np.int32)
    return cell, nucleus.astype(np.int32), {"nuclei": int(nucleus.max()), "cells": int(cell.max())}


def pair_by_overlap(cell, nucleus) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei renumbered after the cell they overlap most, and trimmed to it: nucleus k lies in cell k.

    Parameters
    ----------
    cell, nucleus : array-like of int, shape (h, w)
        Instance labels of one image, 0 background, not paired.

    Returns
    -------
    cell, nucleus : ndarray of int32
        ``cell`` as given (ids made 1..n); ``nucleus`` with, for every cell, the
        pixels of the nucleus that overlaps it most (ties: the lower nucleus id)
        that lie inside it, labelled with the cell's id.  A nucleus no cell
        claims, and the parts of a nucleus outside its cell, are dropped.
    """
    cell = _sequential(np.asarray(cell).astype(np.int64))
    nucleus = np.asarray(nucleus).astype(np.int64)
    out = np.zeros(cell.shape, np.int32)
    both = (cell > 0) & (nucleus > 0)
    if not both.any():
        return cell.astype(np.int32), out
    n_nuc = int(nucleus.max()) + 1
    key = cell[both] * n_nuc + nucleus[both]
    pairs, counts = np.unique(key, return_counts=True)
    c, n = pairs // n_nuc, pairs % n_nuc
    # per cell the nucleus with most pixels in it: sort by cell, count (descending), nucleus id
    order = np.lexsort((n, -counts, c))
    c, n = c[order], n[order]
    first = np.r_[True, c[1:] != c[:-1]]
    best = np.zeros(int(cell.max()) + 1, np.int64)
    best[c[first]] = n[first]
    keep = both & (best[cell] == nucleus)
    out[keep] = cell[keep]
    return cell.astype(np.int32), out


# ----------------------------------------------------------------------------- InstanSeg

INSTANSEG_MODEL_FILE = "instanseg.pt"  # the TorchScript file of a bioimage.io InstanSeg model


def find_instanseg_model(model_path) -> Path:
    """The TorchScript file of an InstanSeg model: ``model_path`` itself, or ``instanseg.pt`` in that folder
    (an extracted bioimage.io model, as InstanSeg's own download leaves it)."""
    if model_path in (None, ""):
        raise InputError(
            "backend instanseg needs model_path (--model-path): an InstanSeg TorchScript model (instanseg.pt) or "
            "the folder of an extracted InstanSeg bioimage.io model; maskworks downloads no weights (README: "
            "InstanSeg weights on an offline cluster)")
    p = Path(model_path).expanduser()
    if p.is_dir():
        found = sorted(p.rglob(INSTANSEG_MODEL_FILE))
        if not found:
            raise InputError(f"model_path {p}: holds no {INSTANSEG_MODEL_FILE} (expected an extracted InstanSeg "
                             "bioimage.io model)")
        return found[0]
    if not p.is_file():
        raise InputError(f"model_path {p}: no such file or directory (expected an InstanSeg {INSTANSEG_MODEL_FILE})")
    return p


def load_instanseg_model(model_path, device="cpu"):
    """``instanseg.InstanSeg`` around the TorchScript model at ``model_path`` (:func:`find_instanseg_model`)."""
    import torch
    from instanseg import InstanSeg

    path = find_instanseg_model(model_path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise InputError(f"model_path {path}: not a TorchScript model that torch {torch.__version__} can load "
                         f"({str(exc).splitlines()[0]})") from None
    for attribute in ("pixel_size", "cells_and_nuclei"):
        if not hasattr(module, attribute):
            raise InputError(f"model_path {path}: a TorchScript model, but not InstanSeg's (no {attribute})")
    return InstanSeg(module, device=device, verbosity=0)


def segment_instanseg(batch, *, model, image_mpp=None):
    """Whole-cell and nuclear labels of a batch of patches with InstanSeg.

    Parameters
    ----------
    batch : array-like, shape (n, h, w, 2)
        Channel 0 nuclear, channel 1 whole-cell; any real dtype (sent as float32).
    model : instanseg.InstanSeg
        :func:`load_instanseg_model`; a model that segments nuclei and cells
        (``cells_and_nuclei``, e.g. ``fluorescence_nuclei_and_cells``).
    image_mpp : float, optional
        Microns per pixel of the patches; InstanSeg rescales to its model's pixel
        size and back.  None: no rescaling.

    Returns
    -------
    cell, nucleus : ndarray of int32, shape (n, h, w)
        Instance labels per patch, paired by :func:`pair_by_overlap` (nucleus k
        inside cell k); none in a flat patch (both channels constant), which is
        not sent to the model.

    Notes
    -----
    Calls ``InstanSeg.eval_small_image(image, pixel_size=image_mpp, normalise=True,
    target="all_outputs")`` of instanseg-torch 0.1 per patch (its own per-channel
    percentile normalisation), whose output channel 0 is the nuclear and channel
    1 the whole-cell segmentation.
    """
    import torch

    x = np.asarray(batch)
    if x.ndim != 4 or x.shape[-1] != 2:
        raise InputError(f"segment_instanseg: expected a (n, h, w, 2) batch, got shape {x.shape}")
    if not bool(model.instanseg.cells_and_nuclei):
        raise InputError("segment_instanseg: the InstanSeg model segments one compartment only; use a model of "
                         "nuclei and cells (e.g. fluorescence_nuclei_and_cells)")
    cells, nuclei = [], []
    with torch.no_grad():
        for patch in x:
            if not (np.ptp(patch[..., 0]) > 0 or np.ptp(patch[..., 1]) > 0):
                # a flat patch holds no object (and InstanSeg's clustering is not safe on one)
                cells.append(np.zeros(patch.shape[:2], np.int32))
                nuclei.append(np.zeros(patch.shape[:2], np.int32))
                continue
            image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(patch, -1, 0), dtype=np.float32))
            labels = model.eval_small_image(image, pixel_size=image_mpp, normalise=True, return_image_tensor=False,
                                            target="all_outputs")
            labels = labels.detach().cpu().numpy().reshape(-1, *patch.shape[:2])
            cell, nucleus = pair_by_overlap(labels[1], labels[0])
            cells.append(cell)
            nuclei.append(nucleus)
    return np.stack(cells), np.stack(nuclei)


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return y * y + x * x <= r * r


def _drop_small(labels: np.ndarray, min_area) -> np.ndarray:
    if labels.max() == 0 or min_area <= 1:
        return labels
    small = np.bincount(labels.ravel()) < min_area
    small[0] = False
    return np.where(small[labels], 0, labels)


def _sequential(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0 or ids[-1] == ids.size:
        return labels.astype(np.int32, copy=False)
    lut = np.zeros(int(ids[-1]) + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels]


def _cells_without_nucleus(cell, nucleus) -> int:
    with_nucleus = np.unique(cell[(nucleus > 0) & (cell > 0)])
    return int(cell.max()) - int(with_nucleus.size)


def _nuclei_split(cell, nucleus) -> int:
    """Nuclei whose pixels fall in more than one cell, or partly in none."""
    m = nucleus > 0
    if not m.any():
        return 0
    key = nucleus[m].astype(np.int64) * (int(cell.max()) + 1) + cell[m]
    pairs = np.unique(key) // (int(cell.max()) + 1)
    return int(np.count_nonzero(np.bincount(pairs) > 1))


# ----------------------------------------------------------------------------- Mesmer


def segment_mesmer(
    batch,
    *,
    model,
    image_mpp=None,
    batch_size=4,
    preprocess_kwargs=None,
    postprocess_kwargs_whole_cell=None,
    postprocess_kwargs_nuclear=None,
):
    """Whole-cell and nuclear labels of a batch of patches with DeepCell's Mesmer.

    Parameters
    ----------
    batch : array-like, shape (n, h, w, 2)
        Channel 0 nuclear, channel 1 whole-cell; any real dtype (sent as float32).
    model : tf.keras.Model or deepcell.applications.Mesmer
        The loaded model (:func:`load_mesmer_model`) or an application around it.
    image_mpp : float, optional
        Microns per pixel of the patches; Mesmer rescales to its 0.5 µm/px.
        None: no rescaling.
    batch_size : int
        Model tiles per forward pass (``Mesmer.predict(batch_size=...)``).
    preprocess_kwargs, postprocess_kwargs_whole_cell, postprocess_kwargs_nuclear : dict, optional
        Passed through to ``Mesmer.predict`` (defaults: Mesmer's own; e.g.
        ``{"percentile": 99.9}``, ``{"maxima_threshold": 0.075}``).

    Returns
    -------
    cell, nucleus : ndarray of int32, shape (n, h, w)
        Instance labels per patch.

    Notes
    -----
    Calls ``Mesmer(model=model).predict(batch, image_mpp=..., compartment="both",
    batch_size=..., preprocess_kwargs=..., postprocess_kwargs_whole_cell=...,
    postprocess_kwargs_nuclear=...)`` of deepcell 0.12, whose output channel 0 is
    the whole-cell and channel 1 the nuclear segmentation.
    """
    from deepcell.applications import Mesmer

    x = np.asarray(batch)
    if x.ndim != 4 or x.shape[-1] != 2:
        raise InputError(f"segment_mesmer: expected a (n, h, w, 2) batch, got shape {x.shape}")
    app = model if isinstance(model, Mesmer) else Mesmer(model=model)
    labels = app.predict(
        x.astype(np.float32, copy=False), batch_size=int(batch_size), image_mpp=image_mpp,
        compartment="both", preprocess_kwargs=dict(preprocess_kwargs or {}),
        postprocess_kwargs_whole_cell=dict(postprocess_kwargs_whole_cell or {}),
        postprocess_kwargs_nuclear=dict(postprocess_kwargs_nuclear or {}),
    )
    labels = np.asarray(labels)
    return labels[..., 0].astype(np.int32), labels[..., 1].astype(np.int32)


def _no_model_message(tried) -> str:
    return (
        "no Mesmer model found (looked at: " + "; ".join(str(t) for t in tried) + "). Provide one of:\n"
        "  1. model_path in the config (--model-path): a Keras SavedModel directory, or the "
        f"{Path(MESMER_MODEL_KEY).name} tarball (extracted once next to it);\n"
        f"  2. the deepcell cache: {DEEPCELL_MODELS / MESMER_MODEL_NAME} (what deepcell's Mesmer() downloads);\n"
        "  3. a DEEPCELL_ACCESS_TOKEN (from https://users.deepcell.org) in the environment of the "
        "download rule (download_mesmer_model), run once on a host with internet access."
    )


def _is_saved_model(path: Path) -> bool:
    return path.is_dir() and ((path / "saved_model.pb").is_file() or (path / "keras_metadata.pb").is_file())


def _saved_model_in(folder: Path) -> Path | None:
    """The SavedModel directory at or below ``folder`` (a tarball's top folder, usually)."""
    if _is_saved_model(folder):
        return folder
    found = sorted(p.parent for p in folder.rglob("saved_model.pb"))
    return found[0] if found else None


def _extract_tarball(tarball: Path, cache_dir=None) -> Path:
    """Extract a model tarball once; later calls reuse the extracted folder.

    The folder is ``<tarball without extension>`` next to the tarball, or under
    ``cache_dir`` (default ``$XDG_CACHE_HOME/maskworks/mesmer``) when the
    tarball's folder is not writable.  Extraction is atomic.
    """
    stem = tarball.name
    for suffix in _TARBALL_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if os.access(tarball.parent, os.W_OK):
        target = tarball.parent / stem
    else:
        base = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskworks" / "mesmer"
        target = base / stem
    if target.is_dir() and _saved_model_in(target) is not None:
        return target
    if not tarfile.is_tarfile(tarball):
        raise InputError(f"model_path {tarball}: not a tar archive (expected a SavedModel directory or "
                         f"the {Path(MESMER_MODEL_KEY).name} tarball)")
    log.info("extracting %s into %s", tarball, target)
    with atomic_path(target) as tmp, tarfile.open(tarball) as archive:
        tmp.mkdir(parents=True)
        for member in archive.getmembers():
            if member.name.startswith(("/", "..")) or "/../" in member.name or member.issym() or member.islnk():
                raise InputError(f"model_path {tarball}: unsafe archive member {member.name!r}")
        if hasattr(tarfile, "data_filter"):
            archive.extractall(tmp, filter="data")
        else:  # Python without extraction filters; members were checked above
            archive.extractall(tmp)
    return target


def find_mesmer_model(model_path=None, *, cache_dir=None) -> Path:
    """The SavedModel directory to load, in the documented order.

    1. ``model_path``: a SavedModel directory, a folder holding one, or the
       MultiplexSegmentation tarball (extracted once, see ``_extract_tarball``);
    2. the deepcell cache ``~/.deepcell/models/MultiplexSegmentation`` (or its
       downloaded tarball ``~/.deepcell/models/MultiplexSegmentation-9.tar.gz``,
       extracted there as deepcell does);
    3. otherwise an :class:`InputError` naming the three ways to provide it.
    """
    tried = []
    if model_path not in (None, ""):
        p = Path(model_path).expanduser()
        if not p.exists():
            raise InputError(f"model_path {p}: no such file or directory\n" + _no_model_message([p]))
        if p.is_file():
            folder = _extract_tarball(p, cache_dir)
        else:
            folder = p
        found = _saved_model_in(folder)
        if found is None:
            raise InputError(f"model_path {p}: holds no Keras SavedModel (saved_model.pb)")
        return found
    cached = DEEPCELL_MODELS / MESMER_MODEL_NAME
    tried.append(cached)
    if _is_saved_model(cached):
        return cached
    tarball = DEEPCELL_MODELS / Path(MESMER_MODEL_KEY).name
    tried.append(tarball)
    if tarball.is_file():
        _extract_into(tarball, DEEPCELL_MODELS)
        if _is_saved_model(cached):
            return cached
    raise InputError(_no_model_message(tried))


def _extract_into(tarball: Path, folder: Path) -> None:
    from deepcell.utils import extract_archive

    extract_archive(tarball, folder)


def tensorflow_device(device="auto") -> str:
    """Choose the device Mesmer's TensorFlow runs on: ``"cpu"`` or ``"cuda:N"``.

    ``cpu`` hides every GPU from TensorFlow; ``auto`` takes the first GPU TensorFlow sees,
    else the CPU; ``cuda``/``cuda:N`` must get that GPU.  Call before the model is loaded.

    Raises
    ------
    InputError
        For an unknown value, or a GPU asked for that TensorFlow cannot use (TensorFlow 2.8
        needs CUDA 11.2 and cuDNN 8.1: the GPU DeepCell env, envs/gpu/deepcell.yaml).
    """
    d = str(device if device is not None else "auto").strip().lower()
    d = "cuda:0" if d == "cuda" else d
    head, _, tail = d.partition(":")
    if d not in ("cpu", "auto") and not (head == "cuda" and tail.isdigit()):
        raise InputError(f"device={device!r} is not one of auto | cpu | cuda | cuda:N")
    if d == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before TensorFlow initialises CUDA
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise InputError(f"the mesmer backend needs TensorFlow and deepcell ({exc}); run it with the deepcell "
                         "environment (.venv-deepcell/bin/python -m maskworks.cli, or envs/deepcell.yaml)") from None
    gpus = tf.config.list_physical_devices("GPU")
    if d == "cpu" or (d == "auto" and not gpus):
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return "cpu"
    index = 0 if d == "auto" else int(tail)
    if index >= len(gpus):
        built = tf.test.is_built_with_cuda()
        raise InputError(
            f"device={device!r}: this job was given a GPU, but TensorFlow {tf.__version__} sees "
            f"{len(gpus)} GPU(s)" + ("" if built else " (a CPU-only build)") + "; TensorFlow 2.8 needs CUDA 11.2 "
            "and cuDNN 8.1 (the GPU DeepCell env: software.gpu: true builds envs/gpu/deepcell.yaml), "
            "or run with device: cpu"
        )
    tf.config.set_visible_devices([gpus[index]], "GPU")
    return f"cuda:{index}"


def load_mesmer_model(model_path=None, *, cache_dir=None):
    """Load the Mesmer Keras model found by :func:`find_mesmer_model` (TensorFlow imported here)."""
    path = find_mesmer_model(model_path, cache_dir=cache_dir)
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise InputError(f"the mesmer backend needs TensorFlow and deepcell ({exc}); run it with the deepcell "
                         "environment (.venv-deepcell/bin/python -m maskworks.cli, or envs/deepcell.yaml)") from None
    _refuse_code_in_model(path)
    log.info("loading Mesmer model %s", path)
    model = tf.keras.models.load_model(str(path), compile=False)
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 2:
        raise InputError(f"model {path}: input shape {shape}; a Mesmer model takes (batch, y, x, 2)")
    if len(model.outputs) != 4:
        raise InputError(f"model {path}: {len(model.outputs)} outputs; a Mesmer model has 4 "
                         "(whole-cell inner distance and pixelwise, nuclear inner distance and pixelwise)")
    return model


def _layer_classes(path: Path) -> list[str]:
    """The class names of every layer a saved Keras model holds, read from its metadata without
    loading it (``keras_metadata.pb`` of a SavedModel, ``model_config`` of an HDF5 file)."""
    import json

    names = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("class_name"), str):
                names.append(node["class_name"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    meta = path / "keras_metadata.pb"
    if path.is_dir() and meta.is_file():
        try:
            from keras.protobuf import saved_metadata_pb2
        except ImportError:  # another Keras layout: the class names are JSON text inside the protobuf
            import re

            return re.findall(r'"class_name": "([A-Za-z0-9_>.]+)"', meta.read_bytes().decode("utf-8", "replace"))
        saved = saved_metadata_pb2.SavedMetadata()
        saved.ParseFromString(meta.read_bytes())
        for node in saved.nodes:
            with contextlib.suppress(ValueError):
                walk(json.loads(node.metadata))
    elif path.is_file() and path.suffix.lower() in (".h5", ".hdf5", ".keras"):
        import h5py

        with h5py.File(path, "r") as f:
            config = f.attrs.get("model_config")
        if config is not None:
            walk(json.loads(config.decode() if isinstance(config, bytes) else config))
    return names


# Layers whose saved form is Python code that Keras runs when it rebuilds the model.
CODE_LAYERS = ("Lambda",)


def _refuse_code_in_model(path: Path) -> None:
    """A model from elsewhere must not run code when it is loaded: Keras deserialises a Lambda layer's
    Python bytecode and runs it while rebuilding the model, so such a model is refused unread."""
    found = sorted({n for n in _layer_classes(Path(path)) if n in CODE_LAYERS})
    if found:
        raise InputError(f"model {path}: holds {', '.join(found)} layer(s), whose Python code Keras would run when "
                         "loading it; maskworks loads only models built from known layers (as DeepCell's Mesmer "
                         "is) - use the Mesmer model, or save the model without Lambda layers")


def download_mesmer_model(dest=None) -> Path:
    """Download the Mesmer model with deepcell's own fetcher and extract it.

    Parameters
    ----------
    dest : str or Path, optional
        Folder to extract into (default: the deepcell cache ``~/.deepcell/models``,
        where ``Mesmer()`` and :func:`find_mesmer_model` look).  The tarball itself
        always lands in the deepcell cache (``deepcell.utils.fetch_data``).

    Returns
    -------
    Path
        The SavedModel directory, usable as ``model_path``.

    Raises
    ------
    InputError
        ``DEEPCELL_ACCESS_TOKEN`` is not set, or the download fails.
    """
    if not os.environ.get("DEEPCELL_ACCESS_TOKEN"):
        raise InputError(
            "DEEPCELL_ACCESS_TOKEN is not set: create a token at https://users.deepcell.org and "
            "`export DEEPCELL_ACCESS_TOKEN=...` before downloading the Mesmer model (on a host with "
            "internet access), or give model_path (a SavedModel directory or the "
            f"{Path(MESMER_MODEL_KEY).name} tarball) instead"
        )
    from deepcell.utils import fetch_data

    try:
        tarball = fetch_data(asset_key=MESMER_MODEL_KEY, cache_subdir="models", file_hash=MESMER_MODEL_HASH)
    except Exception as exc:  # network and authentication errors come as several types
        raise InputError(f"downloading {MESMER_MODEL_KEY} failed ({type(exc).__name__}: {exc})") from exc
    dest = Path(dest) if dest is not None else DEEPCELL_MODELS
    dest.mkdir(parents=True, exist_ok=True)
    _extract_into(Path(tarball), dest)
    found = _saved_model_in(dest / MESMER_MODEL_NAME) if (dest / MESMER_MODEL_NAME).is_dir() else _saved_model_in(dest)
    if found is None:
        raise InputError(f"{tarball} was extracted into {dest} but holds no SavedModel")
    return found
