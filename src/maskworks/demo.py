"""Deterministic synthetic demo data for the workflow's arms.

Each arm has a generator that returns arrays (``make_em_volume``) and a private
writer (``_write_em``) that puts them on disk through :mod:`maskworks.io`;
:func:`write_demo_data` dispatches to the writers of the requested arms.  The
data are small enough to generate in seconds and realistic enough that the
stages have something to get wrong: the ground truth is written beside every
input so that the workflow can score itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from maskworks.cryoet.patches import plan_patches
from maskworks.io import InputError, write_volume

# Voxel geometry of the demo volumes: (z, y, x) size and unit, as written to disk.
EM_SAMPLES = {
    # An OME-Zarr (0.5 where zarr 3 is installed) with a pyramid: level 0 at 40 x 8 x 8 nm, level 1
    # (the generated volume, where the demo computes its masks) at 40 x 16 x 16 nm.
    "sample1": {"shape": (96, 160, 160), "seed": 0, "path": "sample1.zarr",
                "voxel_size": (40.0, 16.0, 16.0), "unit": "nanometer", "level": 1},
    "sample2": {"shape": (64, 128, 128), "seed": 1, "path": "sample2.mrc",
                "voxel_size": (80.0, 80.0, 80.0), "unit": "angstrom"},
    # crossing cracks and sheets, curtaining and a brightness ramp (not in the demo's volume table:
    # for `maskworks texture-mask demo_data/em/sample3.tif ... --truth demo_data/em/sample3_truth.tif`)
    "sample3": {"shape": (64, 128, 128), "seed": 2, "path": "sample3.tif", "variant": "artefacts",
                "voxel_size": (40.0, 16.0, 16.0), "unit": "nanometer"},
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


# What make_em_volume's variants add to the plain block.
EM_VARIANTS = ("plain", "artefacts")


def _crossing_planes(rng, shape, allowed: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Three discs through one point where ``allowed`` is 1, at right angles to each other (randomly
    turned): two dark cracks and a bright sheet that cut each other along three lines."""
    candidates = np.flatnonzero(allowed >= 1.0)
    if not candidates.size:
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    centre = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
    axes, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # three orthonormal normals
    zz, yy, xx = (np.arange(n, dtype=np.float32)[tuple(slice(None) if i == a else None for i in range(3))]
                  for a, n in enumerate(shape))
    dz, dy, dx = zz - centre[0], yy - centre[1], xx - centre[2]
    r2 = dz * dz + dy * dy + dx * dx
    out = []
    for normal in axes.T:
        dist = dz * normal[0] + dy * normal[1] + dx * normal[2]
        in_plane = np.sqrt(np.maximum(r2 - dist * dist, 0.0))
        disc = 1.0 / (1.0 + np.exp(np.clip((in_plane - radius) / 2.0, -30, 30), dtype=np.float32))
        out.append((_sheet(dist, 0.8) * disc * allowed).astype(np.float32))
    return np.maximum(out[0], out[1]), out[2]


def make_em_volume(shape=(96, 160, 160), seed: int = 0, variant: str = "plain") -> tuple[np.ndarray, np.ndarray]:
    """Synthetic downsampled FIB-SEM block: textured tissue next to smooth resin.

    Parameters
    ----------
    shape : tuple of int
        (z, y, x) size; at least 16 voxels per axis.
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same seed gives the same volume.
    variant : {"plain", "artefacts"}
        ``"artefacts"`` adds what a FIB-SEM block brings besides: in the resin, two cracks
        and a bright sheet that cross each other at right angles (where a single-plane test
        no longer sees a plane); curtaining over the whole block (streaks along y, random in x,
        drifting slowly in z, as ion milling leaves them); and a brightness ramp along z
        (-12 % .. +12 %, the detector drifting as the block is milled).

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
    if variant not in EM_VARIANTS:
        raise InputError(f"make_em_volume: variant={variant!r}; expected one of {', '.join(EM_VARIANTS)}")
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
    if variant == "artefacts":
        cracks, sheet = _crossing_planes(rng, shape, far * (1.0 - near_crack), radius=0.22 * max(shape))
        resin_img = resin_img - 110.0 * cracks + 80.0 * sheet

    image = np.where(tissue, tissue_img, resin_img)
    if variant == "artefacts":
        streaks = ndi.gaussian_filter(rng.standard_normal((shape[0], shape[2])).astype(np.float32), (6.0, 1.2))
        streaks *= 14.0 / max(float(streaks.std()), 1e-12)
        image = image + streaks[:, None, :]
        image = image * (0.88 + 0.24 * zz)
    image += 5.0 * rng.standard_normal(shape, dtype=np.float32)  # detector noise, everywhere
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, tissue.astype(np.uint8)


def _write_em(out_dir: Path) -> dict[str, Path]:
    """EM arm: ``em/sample1.zarr`` (OME-Zarr with a two-level pyramid: the generated volume is level
    1, level 0 has twice its y and x resolution), ``em/sample2.mrc`` and ``em/sample3.tif`` (the
    "artefacts" variant) with their truths (the OME-Zarr truth as a label image with the same levels)."""
    written = {}
    for name, spec in EM_SAMPLES.items():
        image, truth = make_em_volume(spec["shape"], seed=spec["seed"], variant=spec.get("variant", "plain"))
        target = out_dir / "em" / spec["path"]
        truth_target = target.with_name(target.name.replace(name, f"{name}_truth", 1))
        prov = {"stage": "demo-data", "generator": "maskworks.demo.make_em_volume",
                "shape": list(spec["shape"]), "seed": spec["seed"], "variant": spec.get("variant", "plain")}
        vs, pyramid = spec["voxel_size"], None
        if spec.get("level"):  # level 0 repeats each voxel in y and x; its mean (and nearest) level 1 is the volume
            factors = (1,) + (2 ** spec["level"],) * 2
            image, truth = (np.repeat(np.repeat(a, factors[1], axis=1), factors[2], axis=2) for a in (image, truth))
            vs, pyramid = tuple(v / f for v, f in zip(vs, factors)), [(1, 2, 2)] * spec["level"]
        written[name] = write_volume(target, image, vs, unit=spec["unit"], provenance=prov, pyramid=pyramid)
        written[f"{name}_truth"] = write_volume(truth_target, truth, vs, unit=spec["unit"], labels=True,
                                                provenance={**prov, "truth": True}, pyramid=pyramid)
    return written

# ----------------------------------------------------------------------------- cryo-ET patches
# A tomogram with membrane-like sheets, an imperfect membrane segmentation (a gap and
# a spurious blob in the first vesicle), patch centres (header row, floats, some near
# the edges) and Add/Remove/Ignore NRRD corrections that repair the first patch.

# Geometry and extraction settings the demo config uses (config/demo.yaml must agree).
CRYOET_PATCHES = {
    "shape": (96, 200, 200), "voxel_size": 10.0, "unit": "angstrom", "seed": 7,
    "patch_size": 64, "border": 8, "ds_token": "demo", "token": "tomo1",
}
# Patch centres, x, y, z (voxels): the first on the big vesicle, two near edges (padded).
_CENTRES = [(100.3, 99.6, 48.0), (24.5, 110.2, 44.0), (150.0, 60.4, 70.6), (180.2, 188.7, 30.0),
            (60.0, 150.0, 52.5), (100.0, 100.0, 8.4)]
# Vesicles: centre (z, y, x) and radius, in voxels.
_VESICLES = [((48, 100, 100), 20.0), ((70, 60, 150), 14.0), ((52, 150, 60), 17.0)]


def make_cryoet_tomogram(shape=CRYOET_PATCHES["shape"], seed: int = CRYOET_PATCHES["seed"]):
    """Tomogram (float32, membranes dark) and its true membrane mask (uint8 0/1)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    dist = np.full(shape, np.inf, np.float32)
    for (cz, cy, cx), r in _VESICLES:
        d = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2, dtype=np.float32) - r
        np.minimum(dist, np.abs(d), out=dist)
    sheet = np.abs(z - (26 + 6 * np.sin(2 * np.pi * x / 150.0) + 0.03 * y)).astype(np.float32)
    np.minimum(dist, sheet, out=dist)
    truth = (dist < 1.5).astype(np.uint8)
    noise = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    image = (-np.exp(-0.5 * (dist / 1.2) ** 2) + 0.3 * noise / noise.std()).astype(np.float32)
    return image, truth


def _ball(shape, centre, radius):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius**2


def _write_cryoet_patches(out_dir) -> dict[str, Path]:
    """Write the tomogram, its segmentation, the centres CSV and a corrections folder.

    The corrections folder holds masks for ``demo_tomo1_patch0`` (Remove the
    spurious blob, Add the missing piece of the vesicle, Ignore a corner) and
    ``demo_tomo1_patch4`` (lower-case file names, an Ignore slab), named as
    ``maskworks extract-patches --ds-token demo --patch-size 64`` names them
    in an empty folder.
    """
    cfg = CRYOET_PATCHES
    root = Path(out_dir) / "cryoet"
    shape, vs, unit = cfg["shape"], (cfg["voxel_size"],) * 3, cfg["unit"]
    image, truth = make_cryoet_tomogram(shape, cfg["seed"])
    seg = truth.copy()
    (cz, cy, cx), r = _VESICLES[0]
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gap = (x > cx + 12) & (np.abs(z - cz) < 6) & (truth > 0)
    seg[gap] = 0  # the segmentation misses part of the first vesicle ...
    blob = _ball(shape, (cz, cy - 4, cx - 3), 3.5)
    seg[blob] = 1  # ... and holds a blob inside it
    written = {
        "cryoet_tomogram": write_volume(root / "tomo1.mrc", image, vs, unit=unit),
        "cryoet_segmentation": write_volume(root / "tomo1_seg.mrc", seg, vs, unit=unit),
    }
    centres = root / "tomo1_centres.csv"
    centres.write_text("x,y,z\n" + "".join(f"{a:.1f},{b:.1f},{c:.1f}\n" for a, b, c in _CENTRES))
    written["cryoet_centres"] = centres

    size = cfg["patch_size"]
    plans = plan_patches(shape, np.array(_CENTRES), patch_size=size)

    def crop(arr, plan):
        sl = tuple(slice(s, s + size) for s in plan.start)
        return arr[sl]  # these two patches lie inside the tomogram

    def save(key, name, mask, plan):
        origin = tuple(s * v for s, v in zip(plan.start, vs))
        path = root / "corrections" / key / name
        write_volume(path, mask.astype(np.uint8), vs, unit=unit, origin=origin)
        return path

    p0 = plans[0]
    key0 = f"{cfg['ds_token']}_{cfg['token']}_patch0"
    corner = np.zeros((size,) * 3, np.uint8)
    corner[10:20, 10:20, 10:20] = 1
    written["cryoet_correction_remove"] = save(key0, "Remove1.nrrd", crop(_ball(shape, (cz, cy - 4, cx - 3), 5), p0), p0)
    written["cryoet_correction_add"] = save(key0, "Add1.nrrd", crop(gap, p0), p0)
    written["cryoet_correction_ignore"] = save(key0, "Ignore1.nrrd", corner, p0)
    p4 = plans[4]
    key4 = f"{cfg['ds_token']}_{cfg['token']}_patch4"
    slab = np.zeros((size,) * 3, np.uint8)
    slab[:, :, 40:48] = 1
    written["cryoet_correction_ignore_2"] = save(key4, "ignore_edge.nrrd", slab, p4)
    written["cryoet_corrections"] = root / "corrections"
    return written

# ----------------------------------------------------------------------------- cryo-ET copick
# A copick project (filesystem overlay) with organelle instance segmentations and
# membranes with spurious fragments, internal fragments and edge junk.

COPICK_SHAPE = (64, 128, 128)
COPICK_VOXEL_SIZE = 10.0  # angstrom
COPICK_RUNS = {"TS_001": 0, "TS_002": 1, "TS_003": 2}  # run name -> seed
COPICK_ORGANELLES = {"name": "organelles", "user_id": "saber", "session_id": "1"}
COPICK_MEMBRANES = {"name": "membrane", "user_id": "membrain-seg", "session_id": "1"}
MEMBRANE_THICKNESS = 3

# id, centre (z, y, x), radii (z, y, x), what it is for
_DEMO_ORGANELLES = [
    (1, (32, 36, 40), (14, 24, 24), "large: kept with its shell"),
    (2, (30, 84, 92), (13, 24, 24), "large: kept with its shell"),
    (3, (32, 110, 44), (7, 11, 38), "elongated: kept, thin dilation and opening"),
    (4, (32, 20, 100), (6, 7, 7), "too small for min_roi_relative_size"),
    (5, (6, 40, 108), (4, 10, 10), "only in z-slices without membrane after the edge trim"),
]
# Run TS_003 renumbers organelle 2 as 300, so labels above 255 go through the whole chain.
_BIG_ID = {"TS_003": {2: 300}}


def shelled_ellipsoids(shape, organelles, thickness: int = MEMBRANE_THICKNESS):
    """Axis-aligned ellipsoids and a membrane shell around each.

    Parameters
    ----------
    shape : tuple of int
        (z, y, x) of the volume.
    organelles : iterable of (id, centre, radii)
        Centre and radii in voxels, (z, y, x).  Where two overlap, the earlier one wins.
    thickness : int
        The shell is every voxel outside the organelles within this distance of one.

    Returns
    -------
    labels : ndarray of int32
    shells : ndarray of bool
    """
    labels = np.zeros(shape, dtype=np.int32)
    shells = np.zeros(shape, dtype=bool)
    for oid, centre, radii in organelles:
        box = tuple(slice(max(0, int(np.floor(c - r)) - thickness - 1), min(n, int(np.ceil(c + r)) + thickness + 2))
                    for c, r, n in zip(centre, radii, shape))
        grids = np.ogrid[box]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0
        if not inside.any():
            continue
        crop = labels[box]
        crop[inside & (crop == 0)] = oid
        shells[box] |= ndi.distance_transform_edt(~inside) <= thickness
    shells &= labels == 0
    return labels, shells


def make_cryoet_segmentations(shape=COPICK_SHAPE, seed: int = 0, renumber=None):
    """Organelle labels, a membrane mask (with junk) and a tomogram for one demo run.

    Returns
    -------
    dict
        ``organelles`` (int32 ids), ``membranes`` (uint8 0/1), ``tomogram`` (float32),
        ``membranes_truth`` (the shells alone).
    """
    rng = np.random.default_rng(seed)
    renumber = renumber or {}
    jitter = rng.integers(-2, 3, size=(len(_DEMO_ORGANELLES), 3))
    specs = [(renumber.get(oid, oid), tuple(int(c + j) for c, j in zip(centre, jit)), radii)
             for (oid, centre, radii, _), jit in zip(_DEMO_ORGANELLES, jitter)]
    labels, shells = shelled_ellipsoids(shape, specs)
    membranes = shells.copy()

    # A flat fragment inside organelle 1 (a crista), away from its shell.
    z, y, x = specs[0][1]
    yy, xx = np.ogrid[-6:7, -6:7]
    membranes[z - 1:z + 2, y - 6:y + 7, x - 6:x + 7] |= (yy**2 + xx**2 <= 36)[None]
    # Spurious blobs in the background, far below the default min_membrane_area.
    free = ndi.distance_transform_edt(labels == 0) > MEMBRANE_THICKNESS + 4
    for _ in range(6):
        c = np.array([rng.integers(8, s - 8) for s in shape])
        if not free[tuple(c)]:
            continue
        r = int(rng.integers(2, 5))
        sl = tuple(slice(int(ci) - r, int(ci) + r + 1) for ci in c)
        membranes[sl] |= free[sl]
    # Edge junk: a sheet in the first z-slices and a wall on the x = 0 face.
    membranes[: 3, 10:-10, 10:-10] = True
    membranes[10:-10, 10:-10, :2] = True

    tomogram = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.8)
    tomogram -= 0.6 * (labels > 0) + 2.5 * membranes
    return {"organelles": labels, "membranes": membranes.astype(np.uint8),
            "tomogram": tomogram.astype(np.float32), "membranes_truth": shells.astype(np.uint8)}


def _write_cryoet_copick(out_dir) -> dict[str, Path]:
    """Copick arm of the demo: ``cryoet/copick/copick_config.json`` and its runs.

    Writing again replaces the inputs (tomograms and the two segmentations) and
    leaves anything else in the project (earlier refined outputs) alone.
    """
    from maskworks.io.copick import keep_logging

    with keep_logging():
        return _write_copick_project(out_dir)


def _write_copick_project(out_dir) -> dict[str, Path]:
    import copick
    from copick.models import PickableObject

    root_dir = (Path(out_dir) / "cryoet" / "copick").resolve()
    config = root_dir / "copick_config.json"
    objects = [
        PickableObject(name="membrane", is_particle=False, label=1, color=(255, 200, 0, 255)),
        PickableObject(name="organelle", is_particle=False, label=2, color=(0, 160, 255, 255)),
        # The refined outputs: instance segmentations, which copick names after a pickable object.
        PickableObject(name="organelles-refined", is_particle=False, label=3, color=(0, 200, 120, 255)),
        PickableObject(name="membrane-refined", is_particle=False, label=4, color=(255, 120, 0, 255)),
    ]
    root = copick.new_config(str(config), overlay_root=str(root_dir), proj_name="maskworks demo",
                             proj_description="synthetic organelles and membranes for refine-membranes",
                             pickable_objects=objects)
    written = {"config": config}
    for name, seed in COPICK_RUNS.items():
        data = make_cryoet_segmentations(COPICK_SHAPE, seed=seed, renumber=_BIG_ID.get(name))
        run = root.get_run(name) or root.new_run(name, exist_ok=True)
        spacing = run.get_voxel_spacing(COPICK_VOXEL_SIZE) or run.new_voxel_spacing(COPICK_VOXEL_SIZE, exist_ok=True)
        spacing.new_tomogram("wbp", exist_ok=True).from_numpy(data["tomogram"], levels=1)
        org = run.new_segmentation(voxel_size=COPICK_VOXEL_SIZE, name=COPICK_ORGANELLES["name"],
                                   session_id=COPICK_ORGANELLES["session_id"], is_multilabel=True,
                                   user_id=COPICK_ORGANELLES["user_id"], exist_ok=True)
        org.from_numpy(data["organelles"])
        mem = run.new_segmentation(voxel_size=COPICK_VOXEL_SIZE, name=COPICK_MEMBRANES["name"],
                                   session_id=COPICK_MEMBRANES["session_id"], is_multilabel=False,
                                   user_id=COPICK_MEMBRANES["user_id"], exist_ok=True)
        mem.from_numpy(data["membranes"])
        written[name] = root_dir / "ExperimentRuns" / name
    manifest = root_dir / "demo_organelles.json"
    manifest.write_text(json.dumps({"organelles": [
        {"id": oid, "centre_zyx": list(c), "radii_zyx": list(r), "purpose": why}
        for oid, c, r, why in _DEMO_ORGANELLES], "renumbered": _BIG_ID}, indent=2) + "\n")
    written["manifest"] = manifest
    return written


PROJECT_RUN_SHAPE = (32, 64, 64)


def write_copick_project_of_runs(out_dir, n_runs: int, *, lacking: int = 0, seed: int = 0) -> dict:
    """A copick project of ``n_runs`` small runs (``PROJECT_RUN_SHAPE``, three organelles with membrane
    shells each, jittered per run), the last ``lacking`` of them without their membrane segmentation:
    the scale test of the refinement (a project of hundreds of runs, a few lacking an input).

    Returns ``{"config": path, "runs": [names], "lacking": [names]}``.
    """
    from maskworks.io.copick import keep_logging

    with keep_logging():
        import copick
        from copick.models import PickableObject

        root_dir = (Path(out_dir) / "copick").resolve()
        config = root_dir / "copick_config.json"
        objects = [PickableObject(name=n, is_particle=False, label=i + 1)
                   for i, n in enumerate(["membrane", "organelle", "organelles-refined", "membrane-refined"])]
        root = copick.new_config(str(config), overlay_root=str(root_dir), proj_name="maskworks project scale",
                                 proj_description=f"{n_runs} generated runs", pickable_objects=objects)
        rng = np.random.default_rng(seed)
        names = [f"run_{i:04d}" for i in range(n_runs)]
        base = [(1, (16, 18, 18), (8, 9, 9)), (2, (16, 44, 20), (9, 8, 10)), (3, (16, 30, 46), (8, 10, 9))]
        for k, name in enumerate(names):
            specs = [(oid, tuple(int(c + d) for c, d in zip(centre, rng.integers(-2, 3, 3))), radii)
                     for oid, centre, radii in base]
            labels, shells = shelled_ellipsoids(PROJECT_RUN_SHAPE, specs, thickness=2)
            run = root.new_run(name, exist_ok=True)
            run.new_voxel_spacing(10.0, exist_ok=True)
            org = run.new_segmentation(voxel_size=10.0, name="organelles", session_id="1", is_multilabel=True,
                                       user_id="saber", exist_ok=True)
            org.from_numpy(labels.astype(np.uint8))
            if k < n_runs - lacking:
                mem = run.new_segmentation(voxel_size=10.0, name="membrane", session_id="1", is_multilabel=False,
                                           user_id="membrain-seg", exist_ok=True)
                mem.from_numpy(shells.astype(np.uint8))
        return {"config": config, "runs": names, "lacking": names[n_runs - lacking:]}


def _write_cryoet(out_dir: Path) -> dict[str, Path]:
    """Cryo-ET arm: tomogram, segmentation, centres and corrections (the copick project is the
    ``copick`` part: it is written through copick, which lives in the cryo-ET environment)."""
    return _write_cryoet_patches(out_dir)


# ----------------------------------------------------------------------------- multiplexed tissue (CODEX)
# A synthetic CODEX slide: cells tiling irregular tissue regions, each with a membrane
# ring in one of two membrane markers and a nucleus inside; tissue-free regions (some
# patches empty) and a corner of faint detector noise (a noisy patch).

CODEX_SLIDE = {
    "name": "slide1", "shape": (1400, 1860), "seed": 0, "image_mpp": 0.5,
    "channels": ("CD45", "DAPI", "Ki67", "PanCK"), "nuclear_channel": "DAPI",
    "wholecell_channels": ("CD45", "PanCK"),
    # the tiling the demo config uses: a 3 x 4 grid, padded by 34 x 35 pixels
    "patch_height": 512, "patch_width": 512, "overlap": 0.1,
}


def make_codex_slide(shape=(1400, 1860), seed: int = 0) -> dict:
    """Synthetic multiplexed-tissue slide with known cells and nuclei.

    Parameters
    ----------
    shape : (int, int)
        (y, x) size; at least 256 per axis.
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same seed gives the same slide.

    Returns
    -------
    dict
        ``image``: uint16 (4, y, x), channels CD45, DAPI, Ki67, PanCK (the order
        of ``CODEX_SLIDE["channels"]``); ``cells`` and ``nuclei``: int32 ground
        truth, nucleus ``k`` inside cell ``k`` (every cell has one);
        ``tissue``: bool mask of where cells may be.

    Notes
    -----
    Cells (about 20 px across, 0.5 µm/px) are Voronoi regions of jittered
    seeds, cut at a per-cell radius, inside smooth tissue regions that stay
    left of 70 % of the width, so the right-hand column of 512-px patches holds
    no tissue; faint single-count noise fills the lower right corner (mean
    below 1, non-zero fraction 30 %: a noisy patch).  Each cell carries a
    membrane ring in CD45 (45 %) or PanCK (55 %), so only the maximum of the two
    shows every cell.  Nuclei are ellipses 2 px inside their cell, except 15 %
    pressed against the membrane; 8 % are so dim that a threshold misses them;
    Ki67 marks a fifth of the nuclei.
    """
    from skimage.segmentation import find_boundaries

    h, w = (int(s) for s in shape)
    if min(h, w) < 256:
        raise InputError(f"make_codex_slide: shape={tuple(shape)}; expected at least 256 pixels per axis")
    rng = np.random.default_rng(seed)
    xs = np.arange(w)[None, :]
    tissue = (_coarse_field(rng, (h, w), 260.0) > -0.6) & (xs < 0.70 * w)

    gy, gx = np.meshgrid(np.arange(12, h - 4, 20), np.arange(12, w - 4, 20), indexing="ij")
    sy = np.clip(gy + rng.integers(-5, 6, gy.shape), 0, h - 1).ravel()
    sx = np.clip(gx + rng.integers(-5, 6, gx.shape), 0, w - 1).ravel()
    keep = tissue[sy, sx] & (rng.random(sy.size) > 0.03)
    sy, sx = sy[keep], sx[keep]
    n = sy.size
    seeds = np.zeros((h, w), np.int32)
    seeds[sy, sx] = np.arange(1, n + 1)
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]
    radius = np.concatenate([[0.0], rng.uniform(9.0, 13.0, n)])
    cells = np.where(dist <= radius[owner], owner, 0).astype(np.int32)
    area = np.bincount(cells.ravel(), minlength=n + 1)
    cells[(area < 80)[cells]] = 0  # slivers at the image edge

    # Nuclei: an ellipse near the seed, at least 2 px inside the cell; 15 % sit off-centre,
    # pressed against the membrane (a segmentation easily lets those cross the cell border).
    eccentric = np.concatenate([[False], rng.random(n) < 0.15])
    shift = np.where(eccentric, rng.uniform(3.5, 5.0, n + 1), rng.uniform(0.0, 1.5, n + 1))
    angle = rng.uniform(0, 2 * np.pi, n + 1)
    cy = np.concatenate([[0.0], sy]) + shift * np.sin(angle)
    cx = np.concatenate([[0.0], sx]) + shift * np.cos(angle)
    a = np.concatenate([[1.0], rng.uniform(4.5, 6.5, n)])
    b = a * np.concatenate([[1.0], rng.uniform(0.7, 1.0, n)])
    theta = np.concatenate([[0.0], rng.uniform(0, np.pi, n)])
    yy, xx = np.indices((h, w), dtype=np.float32)
    dy, dx = yy - cy[cells], xx - cx[cells]
    c, s = np.cos(theta)[cells], np.sin(theta)[cells]
    ellipse = ((c * dx + s * dy) / a[cells]) ** 2 + ((-s * dx + c * dy) / b[cells]) ** 2 <= 1.0
    ring = find_boundaries(cells, mode="inner")
    inside = (ndi.distance_transform_edt(~ring) >= 2) | eccentric[cells]
    nuclei = np.where(ellipse & inside & (cells > 0), cells, 0).astype(np.int32)
    has = np.bincount(nuclei.ravel(), minlength=n + 1) > 0
    cells[~has[cells]] = 0  # every true cell has its nucleus
    ring = find_boundaries(cells, mode="inner")

    # Channels (counts): membrane rings + dim cytoplasm in one of the two membrane markers.
    epithelial = rng.random(n + 1) < 0.55
    bright = rng.uniform(700.0, 1600.0, n + 1)
    membrane = np.where(ring, 1.0, 0.12 * (cells > 0)) * bright[cells]
    cd45 = ndi.gaussian_filter(np.where(~epithelial[cells], membrane, 0.0).astype(np.float32), 1.0)
    panck = ndi.gaussian_filter(np.where(epithelial[cells], membrane, 0.0).astype(np.float32), 1.0)
    dim = rng.random(n + 1) < 0.08
    dapi_level = np.where(dim, rng.uniform(100.0, 180.0, n + 1), rng.uniform(1500.0, 4000.0, n + 1))
    texture = 1.0 + 0.2 * _unit_field(rng, (h, w), 1.0)
    dapi = ndi.gaussian_filter((dapi_level[nuclei] * (nuclei > 0) * texture).astype(np.float32), 1.0)
    ki67_on = rng.random(n + 1) < 0.2
    ki67 = ndi.gaussian_filter((np.where(ki67_on[nuclei], 900.0, 0.0) * (nuclei > 0)).astype(np.float32), 1.5)

    near_tissue = ndi.binary_dilation(cells > 0, iterations=6)
    noise_corner = (yy >= 1000 * h / 1400) & (xx >= 1400 * w / 1860)
    channels = []
    for ch in (cd45, dapi, ki67, panck):
        noise = rng.normal(0.0, 15.0, (h, w)).astype(np.float32) * near_tissue
        hot = (rng.random((h, w)) < 0.01) * rng.integers(1, 4, (h, w))  # sparse hot pixels everywhere
        faint = (rng.random((h, w)) < 0.3) * noise_corner
        channels.append(np.clip(np.rint(ch + noise) + hot + faint, 0, 65535).astype(np.uint16))
    return {"image": np.stack(channels), "cells": cells, "nuclei": nuclei, "tissue": tissue}


def _write_codex(out_dir: Path) -> dict[str, Path]:
    """Multiplexed-tissue arm: an OME-TIFF slide (4 channels), its channel names and the truth."""
    import tifffile

    from maskworks.io import atomic_path

    cfg = CODEX_SLIDE
    root = Path(out_dir) / "codex"
    data = make_codex_slide(cfg["shape"], cfg["seed"])
    mpp = cfg["image_mpp"]
    image = root / f"{cfg['name']}.ome.tif"
    with atomic_path(image) as tmp:
        tifffile.imwrite(
            str(tmp), data["image"], ome=True, photometric="minisblack", compression="zlib",
            metadata={"axes": "CYX", "Channel": {"Name": list(cfg["channels"])},
                      "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                      "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"},
        )
    names = root / f"{cfg['name']}_channels.txt"
    with atomic_path(names) as tmp:
        tmp.write_text("".join(f"{c}\n" for c in cfg["channels"]))
    vs = (mpp, mpp)
    return {
        "codex_image": image,
        "codex_channels": names,
        "codex_truth_cells": write_volume(root / f"{cfg['name']}_truth_cells.tif",
                                          data["cells"].astype(np.uint16), vs, unit="micrometer"),
        "codex_truth_nuclei": write_volume(root / f"{cfg['name']}_truth_nuclei.tif",
                                           data["nuclei"].astype(np.uint16), vs, unit="micrometer"),
    }


_ARMS = {"em": _write_em, "cryoet": _write_cryoet, "codex": _write_codex, "copick": _write_cryoet_copick}


def copick_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("copick") is not None


def default_arms() -> tuple[str, ...]:
    """Every part of the demo this environment can write (the copick project needs copick)."""
    return ("em", "cryoet", "codex", "copick") if copick_available() else ("em", "cryoet", "codex")


def write_demo_data(out_dir, arms=None) -> dict[str, Path]:
    """Write the synthetic demo inputs (and their ground truth) of ``arms`` under ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Directory to write into (created if missing).  Files are written
        atomically, so running this again simply replaces them.
    arms : sequence of str, optional
        Which parts to write (known: ``"em"``, ``"cryoet"`` (patches and corrections), ``"codex"``,
        ``"copick"`` (the copick project, written through copick: the cryo-ET environment));
        None: every part this environment can write (:func:`default_arms`).

    Returns
    -------
    dict
        ``{"em/sample1": Path, "em/sample1_truth": Path, ...}``: every written path.
    """
    if arms is None:
        arms = default_arms()
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


def summary(results="results"):
    """Print the demo's outputs: final masks with their scores against the ground truth,
    the other arms' main outputs, and every QC picture."""
    import json
    import sys

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
    summary = root / "cryoet" / "refine" / "refine_summary.csv"
    if summary.exists():
        import csv

        with open(summary, newline="") as fh:
            rows = list(csv.DictReader(fh))
        runs = sorted({r["run"] for r in rows})
        skipped = sorted({r["run"] for r in rows if r["reason"] in ("missing input", "input cannot be used",
                                                                     "empty result not written", "not refined")})
        kept = sum(r["kept"] == "True" for r in rows)
        print(f"  copick refinement: {len(runs) - len(skipped)}/{len(runs)} runs refined, {kept} organelles kept "
              "(instance segmentations <name>-refined in copick)"
              + (f", skipped: {', '.join(skipped)}" if skipped else "") + f"; {summary}")
    for d in sorted(root.glob("codex/*/stitch")):
        print(f"  CODEX {d.parent.name}: {d / 'cell.ome.tif'} ... cells.csv")
    for d in sorted(root.glob("codex/*/quantify")):
        print(f"  CODEX {d.parent.name} per-cell tables: {d / 'cell_by_marker.csv'}, cell_metadata.csv, "
              "cells.h5ad (AnnData with spatial neighbours)")
    print("  QC pictures:")
    for png in sorted(root.glob("**/*.png")):
        print(f"    {png}")
    return 0
