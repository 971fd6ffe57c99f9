"""Deterministic synthetic demo data for the workflow's arms.

Each arm has a generator that returns arrays (``make_em_volume``) and a private
writer (``_write_em``) that puts them on disk through :mod:`maskworks.io`;
:func:`write_demo_data` dispatches to the writers of the requested arms.  The
data are small enough to generate in seconds and realistic enough that the
stages have something to get wrong: the ground truth is written beside every
input so that the workflow can score itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from maskworks.io import InputError, write_volume

# Voxel geometry of the demo volumes: (z, y, x) size and unit, as written to disk.
EM_SAMPLES = {
    "sample1": {"shape": (96, 160, 160), "seed": 0, "path": "sample1.zarr",
                "voxel_size": (40.0, 16.0, 16.0), "unit": "nanometer"},
    "sample2": {"shape": (64, 128, 128), "seed": 1, "path": "sample2.mrc",
                "voxel_size": (80.0, 80.0, 80.0), "unit": "angstrom"},
}


def _unit_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Band-limited Gaussian random field, zero mean, unit standard deviation (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def _coarse_field(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    """Very smooth random field (features ~``scale`` voxels) drawn on a coarse grid, upsampled linearly."""
    coarse = tuple(max(4, int(np.ceil(s / scale)) + 3) for s in shape)
    field = _unit_field(rng, coarse, 1.0).astype(np.float64)  # float64: BLAS order cannot show
    for axis, (s, c) in enumerate(zip(shape, coarse)):  # separable: one small matrix product per axis
        u = np.clip((np.arange(s) + 0.5) * (c / s) - 0.5, 0.0, c - 1.0)
        i0 = np.minimum(u.astype(int), c - 2)
        interp = np.zeros((s, c))
        interp[np.arange(s), i0] = 1.0 - (u - i0)
        interp[np.arange(s), i0 + 1] = u - i0
        field = np.moveaxis(np.tensordot(interp, field, axes=(1, axis)), 0, axis)
    field = np.ascontiguousarray(field, dtype=np.float32)
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def _sheet(dist: np.ndarray, half_width: float) -> np.ndarray:
    """Soft profile (1 on the sheet, 0 away from it) of a surface at signed distance ``dist``."""
    return np.exp(-0.5 * (dist / half_width) ** 2, dtype=np.float32)


def _planar_artefact(rng, shape, allowed: np.ndarray, radius: float, half_width: float, avoid=None):
    """A finite tilted plane (a disc of ``radius`` voxels) where ``allowed`` (0..1) is, centred where it is 1.

    Returns the intensity profile (0..1) and the zone within 10 voxels of the disc, which a
    later artefact must ``avoid`` (two crossing planes would no longer be a plane).
    """
    candidates = np.flatnonzero(allowed >= 1.0)
    empty = np.zeros(shape, np.float32)
    if avoid is not None:
        candidates = candidates[~avoid.ravel()[candidates]]
    zz, yy, xx = (np.arange(s, dtype=np.float32)[tuple(slice(None) if i == a else None for i in range(3))]
                  for a, s in enumerate(shape))
    for _ in range(20 if candidates.size else 0):
        centre = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
        normal = rng.normal(size=3) * np.array([0.4, 1.0, 1.0])  # mostly upright, as cracks and walls are
        normal /= np.linalg.norm(normal)
        dz, dy, dx = zz - centre[0], yy - centre[1], xx - centre[2]
        dist = dz * normal[0] + dy * normal[1] + dx * normal[2]
        in_plane = np.sqrt(np.maximum(dz * dz + dy * dy + dx * dx - dist * dist, 0.0))
        disc = 1.0 / (1.0 + np.exp(np.clip((in_plane - radius) / 2.0, -30, 30), dtype=np.float32))
        profile = (_sheet(dist, half_width) * disc * allowed).astype(np.float32)
        if avoid is None or not np.any(avoid & (profile > 0.01)):
            return profile, (np.abs(dist) < 10.0) & (in_plane < radius + 10.0)
    return empty, np.zeros(shape, bool)


def make_em_volume(shape=(96, 160, 160), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic downsampled FIB-SEM block: textured tissue next to smooth resin.

    Parameters
    ----------
    shape : tuple of int
        (z, y, x) size; at least 16 voxels per axis.
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same seed gives the same volume.

    Returns
    -------
    image : ndarray of uint8
        8-bit intensities (0..255).
    truth : ndarray of uint8
        Ground-truth tissue mask (1 tissue, 0 resin).

    Notes
    -----
    The tissue is one smooth irregular blob (45-55 % of the volume) centred on
    the ``y = 0`` face, so that it touches several faces as a trimmed sample
    block does.  Inside it: dark membranes (the zero sets of two band-limited
    random fields, i.e. curved closed sheets bounding "cells" of two sizes),
    dark and bright blobs (organelles, vesicles), granular texture and detector
    noise.  The resin has about the same mean intensity (so a plain intensity
    threshold does not work) with low-frequency shading, weak fine noise and two
    artefacts a texture detector must not take for tissue: a crack (a thin dark
    planar gap) and a thin bright sheet (like the wall of a trachea), both
    finite discs kept away from the tissue.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise InputError(f"make_em_volume: shape={shape}; expected three sizes of at least 16 voxels")
    rng = np.random.default_rng(seed)
    norm = [np.linspace(0.0, 1.0, s, dtype=np.float32) for s in shape]
    zz, yy, xx = norm[0][:, None, None], norm[1][None, :, None], norm[2][None, None, :]

    # Tissue region: distance to a point on the y = 0 face, roughened by a smooth field, cut at a
    # quantile so that the tissue fraction is known; then one component without holes.
    cx = rng.uniform(0.3, 0.7)
    dist = np.sqrt(((zz - 0.5) / 1.4) ** 2 + (yy / 1.1) ** 2 + ((xx - cx) / 1.0) ** 2)
    rough = dist + 0.08 * _coarse_field(rng, shape, min(shape) / 3.0)
    fraction = rng.uniform(0.45, 0.55)
    tissue = rough < np.quantile(rough, fraction)
    labels, n = ndi.label(tissue)
    if n > 1:
        tissue = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    tissue = ndi.binary_fill_holes(tissue)

    # Tissue texture (intensities in 8-bit units; membranes and dense organelles dark).
    mem = np.maximum(_sheet(_unit_field(rng, shape, 5.0), 0.22), 0.7 * _sheet(_unit_field(rng, shape, 3.0), 0.25))
    seeds = (rng.random(shape, dtype=np.float32) < 2e-3) * rng.uniform(0.5, 2.0, shape).astype(np.float32)
    dark = np.clip(ndi.gaussian_filter(seeds, 2.0) * (2 * np.pi * 4.0) ** 1.5 * 0.5, 0, 1)
    seeds = (rng.random(shape, dtype=np.float32) < 1e-3) * rng.uniform(0.5, 1.5, shape).astype(np.float32)
    bright = np.clip(ndi.gaussian_filter(seeds, 1.5) * (2 * np.pi * 2.25) ** 1.5 * 0.5, 0, 1)
    granular = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.8)
    granular *= 1.0 / max(float(granular.std()), 1e-12)
    cell = 186.0 + 10.0 * _coarse_field(rng, shape, 12.0) + 6.0 * granular
    tissue_img = cell - 85.0 * mem - 55.0 * dark + 45.0 * bright

    # Resin: shading at the scale of the block, weak fine noise, a crack and a bright sheet.
    resin_img = 155.0 + 12.0 * _coarse_field(rng, shape, min(shape) / 2.0)
    resin_soft = ndi.gaussian_filter((~tissue).astype(np.float32), 3.0)
    far = np.clip((resin_soft - 0.98) / 0.019, 0.0, 1.0)  # 1 beyond ~6 voxels from the tissue
    crack, near_crack = _planar_artefact(rng, shape, far, radius=0.3 * max(shape), half_width=0.7)
    wall, _ = _planar_artefact(rng, shape, far, radius=0.25 * max(shape), half_width=0.8, avoid=near_crack)
    resin_img = resin_img - 110.0 * crack + 80.0 * wall

    image = np.where(tissue, tissue_img, resin_img)
    image += 5.0 * rng.standard_normal(shape, dtype=np.float32)  # detector noise, everywhere
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, tissue.astype(np.uint8)


def _write_em(out_dir: Path) -> dict[str, Path]:
    """EM arm: ``em/sample1.zarr`` (OME-Zarr) and ``em/sample2.mrc`` with their truths."""
    written = {}
    for name, spec in EM_SAMPLES.items():
        image, truth = make_em_volume(spec["shape"], seed=spec["seed"])
        target = out_dir / "em" / spec["path"]
        truth_target = target.with_name(target.name.replace(name, f"{name}_truth", 1))
        prov = {"stage": "demo-data", "generator": "maskworks.demo.make_em_volume",
                "shape": list(spec["shape"]), "seed": spec["seed"]}
        written[name] = write_volume(target, image, spec["voxel_size"], unit=spec["unit"], provenance=prov)
        written[f"{name}_truth"] = write_volume(
            truth_target, truth, spec["voxel_size"], unit=spec["unit"], provenance={**prov, "truth": True}
        )
    return written


_ARMS = {"em": _write_em}


def write_demo_data(out_dir, arms=("em",)) -> dict[str, Path]:
    """Write the synthetic demo inputs (and their ground truth) of ``arms`` under ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Directory to write into (created if missing).  Files are written
        atomically, so running this again simply replaces them.
    arms : sequence of str
        Which arms to write data for (known: ``"em"``).

    Returns
    -------
    dict
        ``{"em/sample1": Path, "em/sample1_truth": Path, ...}``: every written path.
    """
    if isinstance(arms, str):
        arms = (arms,)
    unknown = [a for a in arms if a not in _ARMS]
    if unknown:
        raise InputError(f"write_demo_data: unknown arm(s) {unknown}; expected some of {sorted(_ARMS)}")
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for arm in arms:
        written.update({f"{arm}/{key}": path for key, path in _ARMS[arm](out_dir).items()})
    return written
