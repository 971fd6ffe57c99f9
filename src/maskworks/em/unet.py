"""3-D U-Net for binary masks (MONAI): training with an ignore label, whole-volume inference.

The model module knows nothing about files: training takes (image, label) arrays and
returns checkpoints as dictionaries of tensors; inference takes a model and an array
(NumPy, memory map or ``zarr.Array``) and writes into the arrays it is given.  The
file-level runners are in :mod:`maskworks.em.stages`.

torch and MONAI are imported inside the functions that use them, so that the
command line (which reads the defaults of these functions) starts without them.

Labels follow the training convention of the workflow: 0 background,
1 foreground, 2 ignore (no loss, not scored); 0/255 masks are read as 0/1.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from maskworks.io import InputError, iter_blocks, progress_reporter
from maskworks.io.params import DEVICE, Choice, Flag, Number, NumberList, Size, checked

log = logging.getLogger("maskworks")

NORMALIZATIONS = ("patch", "volume")
IGNORE = 2  # training label meaning "no loss here" (patch borders, padding, Ignore masks)
SPLITS = ("train", "val", "test")
CHECKPOINT_FORMAT = "maskworks-unet/1"
CHANNELS = (16, 32, 64, 128, 256)
STRIDES = (2, 2, 2, 2)
DEVICES = "auto | cpu | cuda | cuda:N"
# Every subset of the three spatial axes of a (batch, channel, z, y, x) tensor: the 8 flips of TTA.
_FLIPS = [axes for k in range(4) for axes in itertools.combinations((2, 3, 4), k)]


# ----------------------------------------------------------------------------- model and device


def build_unet(*, channels=CHANNELS, strides=STRIDES, num_res_units: int = 2):
    """MONAI ``UNet`` for one-channel volumes and one output channel (logits of foreground).

    Parameters
    ----------
    channels : sequence of int
        Feature channels per level, from the top.
    strides : sequence of int
        Down-sampling factor between levels (one fewer than ``channels``); patch and
        window sizes must be divisible by their product.
    num_res_units : int
        Residual units per block (0: plain convolutions).

    Returns
    -------
    monai.networks.nets.UNet
    """
    from monai.networks.nets import UNet

    channels, strides = _ints(channels, "channels"), _ints(strides, "strides")
    if len(strides) != len(channels) - 1:
        raise InputError(
            f"channels={list(channels)} has {len(channels)} levels, so strides needs {len(channels) - 1} "
            f"values, got strides={list(strides)}"
        )
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=channels, strides=strides,
                num_res_units=int(num_res_units))


def torch_device(device="auto"):
    """The ``torch.device`` for a ``device`` setting: ``auto`` (the first GPU torch sees, else
    the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises
    ------
    InputError
        For an unknown value, or a GPU asked for where torch sees none (or fewer).
    """
    import torch

    d = str(device if device is not None else "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    head, _, tail = (d + ":0" if d == "cuda" else d).partition(":")
    if head != "cuda" or not tail.isdigit():
        raise InputError(f"device={device!r} is not one of {DEVICES}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(tail) >= n:
        seen = f"torch sees only {n} CUDA device(s)" if n else "torch sees no CUDA device (CPU-only build or no driver)"
        raise InputError(f"device={device!r} asks for GPU {tail} but {seen}; use device=cpu or auto")
    return torch.device(f"cuda:{tail}")


def load_unet(checkpoint: dict, *, device="cpu"):
    """Rebuild the model saved in a checkpoint dictionary (see :func:`train_unet`), in eval mode.

    ``checkpoint`` is what ``torch.load(path, weights_only=True)`` returns for
    ``best.pt`` or ``last.pt``.
    """
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise InputError(f"not a maskworks U-Net checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    cfg = checkpoint["config"]
    model = build_unet(channels=cfg["channels"], strides=cfg["strides"], num_res_units=cfg["num_res_units"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"checkpoint weights do not fit its own model settings {cfg}: {exc}") from None
    return model.to(torch_device(device)).eval()


# ----------------------------------------------------------------------------- labels and loss


def training_labels(label, *, what: str = "label") -> np.ndarray:
    """Training labels as uint8 0/1/2: 0 background, 1 foreground, 2 ignore.

    A mask holding only 0 and 255 (an 8-bit binary image) is read as 0/1.  Any
    other value is an error (naming ``what``): 2 is the ignore label, so a
    segmentation with more classes would be silently misread.
    """
    arr = np.asarray(label)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    values = np.unique(arr)
    if np.isin(values, (0, 1, IGNORE)).all():
        return arr.astype(np.uint8)
    if np.isin(values, (0, 255)).all():
        return (arr == 255).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:10]) + (" ..." if values.size > 10 else "")
    raise InputError(
        f"{what} holds the values {shown}; expected 0 (background), 1 (foreground) and 2 (ignore), "
        "or a 0/255 mask. Binarise multi-class labels before training"
    )


def masked_dice_ce_loss(logits, label, *, ignore_label: int = IGNORE):
    """Dice + binary cross-entropy on one logit channel, with ``ignore_label`` voxels left out.

    Parameters
    ----------
    logits : torch.Tensor, shape (batch, 1, z, y, x)
        Raw network output; the sigmoid is applied here.
    label : torch.Tensor, same shape
        0 background, 1 foreground, ``ignore_label`` ignore.

    Returns
    -------
    torch.Tensor
        Scalar: Dice loss (MONAI ``MaskedDiceLoss``, sigmoid, over the whole batch)
        plus the cross-entropy summed over the non-ignored voxels and divided by
        their count.  Ignored voxels enter neither term, so any prediction there
        gives the same loss; a batch with nothing but ignored voxels gives 0.

    Notes
    -----
    Without ignored voxels this equals MONAI's ``DiceCELoss(sigmoid=True, batch=True)``.
    """
    import torch
    import torch.nn.functional as F
    from monai.losses import MaskedDiceLoss

    logits = logits.float()
    keep = (label != ignore_label).to(logits.dtype)
    target = (label == 1).to(logits.dtype)
    dice = MaskedDiceLoss(sigmoid=True, batch=True)(logits, target, mask=keep)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    ce = (bce * keep).sum() / torch.clamp(keep.sum(), min=1.0)
    return dice + ce


# ----------------------------------------------------------------------------- leakage-free split


def split_blocks(shapes, *, patch_size=64, split_block_shape=None, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, seed: int = 0) -> list[list[tuple[tuple[slice, ...], str]]]:
    """Cut every volume into blocks and give each block to one split: train, val or test.

    Parameters
    ----------
    shapes : sequence of (z, y, x)
        Shapes of the training volumes.
    patch_size : int or (z, y, x)
        Training patch; every volume must be at least this large.
    split_block_shape : int or (z, y, x), optional
        Block size, at least ``patch_size`` (default: ``patch_size``).  Blocks
        tile each volume from its first voxel; the last ones along an axis may
        be thinner.  A block as large as a volume splits by volume.
    val_fraction, test_fraction : float
        Share of the blocks that can hold a whole patch ("full" blocks) given
        to validation and test (at least one each when the fraction is > 0);
        the rest trains.  Thinner blocks are drawn at random with the same
        proportions.
    seed : int
        Seed of the assignment.

    Returns
    -------
    list
        Per volume, ``[(slices, split), ...]`` over its blocks in C order.

    Notes
    -----
    Patches are drawn afterwards only where all of the patch lies in blocks of
    one split (:class:`PatchSampler`), so no training voxel is ever validated or
    tested on; Catena and MemBrain-seg draw random crops first and split them,
    which puts neighbouring (overlapping) crops on both sides.
    """
    patch = _triple_int(patch_size, "patch_size")
    bshape = patch if split_block_shape is None else _triple_int(split_block_shape, "split_block_shape")
    if any(b < p for b, p in zip(bshape, patch)):
        raise InputError(f"split_block_shape={list(bshape)} is smaller than patch_size={list(patch)}; "
                         "a block must hold a whole patch")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= float(f) < 1:
            raise InputError(f"{name}={f}: expected a fraction in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise InputError(f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves nothing to train on")
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    for i, shape in enumerate(shapes):
        if len(shape) != 3 or any(s < p for s, p in zip(shape, patch)):
            raise InputError(f"training volume {i} has shape {shape}, smaller than patch_size={list(patch)}; "
                             "use a smaller patch_size")
    blocks = [[b.inner for b in iter_blocks(shape, bshape)] for shape in shapes]
    full = [(i, j) for i, bl in enumerate(blocks) for j, sl in enumerate(bl)
            if all(s.stop - s.start >= p for s, p in zip(sl, patch))]
    n = len(full)
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    n_test = 0 if test_fraction == 0 else max(1, round(test_fraction * n))
    if n - n_val - n_test < 1:
        raise InputError(
            f"the training data hold only {n} block(s) of {list(bshape)} voxels that fit a whole patch of "
            f"{list(patch)}, too few for train + {n_val} val + {n_test} test; use a smaller patch_size or "
            "split_block_shape, more or larger volumes, or val_fraction/test_fraction 0"
        )
    rng = np.random.default_rng(seed)
    split = {}
    for k, idx in enumerate(rng.permutation(n)):
        split[full[idx]] = "val" if k < n_val else "test" if k < n_val + n_test else "train"
    p = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction], dtype=float)
    for i, bl in enumerate(blocks):
        for j in range(len(bl)):
            if (i, j) not in split:
                split[(i, j)] = SPLITS[int(rng.choice(3, p=p / p.sum()))]
    return [[(sl, split[(i, j)]) for j, sl in enumerate(bl)] for i, bl in enumerate(blocks)]


# The automatic patches_per_epoch is capped here (an epoch of a huge volume still ends).
MAX_AUTO_PATCHES = 4096


def auto_patches_per_epoch(blocks, patch, batch_size: int = 1) -> int:
    """Patches per epoch that cover the train blocks of ``blocks`` (:func:`split_blocks`) about once:
    their voxels over a patch's voxels, at least one batch, at most ``MAX_AUTO_PATCHES``."""
    voxels = sum(int(np.prod([s.stop - s.start for s in box])) for vol in blocks for box, split in vol
                 if split == "train")
    n = -(-voxels // int(np.prod(patch)))
    return int(min(MAX_AUTO_PATCHES, max(int(batch_size), n)))


def split_map(shape, blocks) -> np.ndarray:
    """uint8 volume of ``shape`` with each voxel's split: 0 train, 1 val, 2 test."""
    out = np.zeros(shape, np.uint8)
    for sl, split in blocks:
        out[sl] = SPLITS.index(split)
    return out


class PatchSampler:
    """Random patch positions that lie wholly inside one split's blocks.

    Parameters
    ----------
    shapes, blocks
        Volume shapes and the output of :func:`split_blocks`.
    split : "train", "val" or "test"
    patch_size : int or (z, y, x)
    labels : sequence of arrays, optional
        Training labels, for foreground oversampling in :meth:`draw`.
    max_foreground : int
        Foreground voxels remembered per volume as patch anchors (a random subset).
    seed : int
        Seed of that subset.

    Notes
    -----
    The valid start positions are kept as a list of boxes, exactly: along each
    axis the starts are grouped into intervals that touch the same blocks, and a
    product of intervals is kept when all the blocks it touches belong to the
    split.  Draws are uniform over all valid starts.
    """

    def __init__(self, shapes, blocks, split, patch_size, *, labels=None, max_foreground: int = 2**16,
                 seed: int = 0):
        self.patch = np.array(_triple_int(patch_size, "patch_size"))
        self.split = split
        vol, lo, hi = [], [], []
        for i, (shape, bl) in enumerate(zip(shapes, blocks)):
            for a, b in _start_boxes(shape, bl, split, self.patch):
                vol.append(i)
                lo.append(a)
                hi.append(b)
        self.volume = np.array(vol, dtype=np.int64)
        self.lo = np.array(lo, dtype=np.int64).reshape(-1, 3)
        self.hi = np.array(hi, dtype=np.int64).reshape(-1, 3)
        self.sizes = np.prod(self.hi - self.lo, axis=1)
        self.foreground = np.zeros((0, 4), np.int64)
        if labels is not None and len(self.sizes):
            rng = np.random.default_rng([seed, 7])
            found = []
            for i, (shape, bl) in enumerate(zip(shapes, blocks)):
                fg = np.argwhere((np.asarray(labels[i]) == 1) & (split_map(shape, bl) == SPLITS.index(split)))
                if len(fg) > max_foreground:
                    fg = fg[np.sort(rng.choice(len(fg), max_foreground, replace=False))]
                found.append(np.column_stack([np.full(len(fg), i), fg]))
            self.foreground = np.concatenate(found).astype(np.int64)

    @property
    def positions(self) -> int:
        """Number of distinct valid patch starts."""
        return int(self.sizes.sum())

    def draw(self, n: int, rng: np.random.Generator, foreground_fraction: float = 0.0):
        """``n`` patches as ``[(volume index, (z, y, x) start), ...]``.

        With probability ``foreground_fraction`` a patch is drawn among the valid
        ones containing a random foreground voxel of the split (when there is one).
        """
        if not self.positions:
            raise InputError(f"no {self.split} patch of {self.patch.tolist()} voxels fits the {self.split} blocks")
        out = []
        for _ in range(int(n)):
            lo, hi, weights = self.lo, self.hi, self.sizes
            if len(self.foreground) and foreground_fraction > 0 and rng.random() < foreground_fraction:
                v = self.foreground[rng.integers(len(self.foreground))]
                flo = np.maximum(self.lo, v[1:] - self.patch + 1)
                fhi = np.minimum(self.hi, v[1:] + 1)
                fsize = np.where(self.volume == v[0], np.prod(np.clip(fhi - flo, 0, None), axis=1), 0)
                if fsize.sum() > 0:
                    lo, hi, weights = flo, fhi, fsize
            k = rng.choice(len(weights), p=weights / weights.sum())
            start = tuple(int(rng.integers(a, b)) for a, b in zip(lo[k], hi[k]))
            out.append((int(self.volume[k]), start))
        return out


def _start_boxes(shape, blocks, split, patch):
    """Boxes ``[lo, hi)`` of patch starts whose patch touches only blocks of ``split``."""
    starts = [sorted({sl[k].start for sl, _ in blocks}) for k in range(3)]
    edges = [np.array(s + [shape[k]]) for k, s in enumerate(starts)]
    grid = np.zeros([len(s) for s in starts], np.uint8)
    for sl, sp in blocks:
        grid[tuple(st.index(s.start) for st, s in zip(starts, sl))] = SPLITS.index(sp)
    code = SPLITS.index(split)
    axes = []
    for k in range(3):
        last = shape[k] - int(patch[k])  # largest valid start
        cuts = {0, last + 1}
        cuts.update(int(e) for e in edges[k] if 0 < e <= last)
        cuts.update(int(e) - int(patch[k]) + 1 for e in edges[k] if 0 < e - patch[k] + 1 <= last)
        cuts = sorted(cuts)
        ivals = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            b0 = int(np.searchsorted(edges[k], a, side="right")) - 1
            b1 = int(np.searchsorted(edges[k], a + patch[k] - 1, side="right")) - 1
            ivals.append((a, b, b0, b1))
        axes.append(ivals)
    boxes = []
    for iz, iy, ix in itertools.product(*axes):
        touched = grid[iz[2]:iz[3] + 1, iy[2]:iy[3] + 1, ix[2]:ix[3] + 1]
        if np.all(touched == code):
            boxes.append(((iz[0], iy[0], ix[0]), (iz[1], iy[1], ix[1])))
    return boxes


# ----------------------------------------------------------------------------- training


def training_transforms(*, normalization: str = "patch", flip_prob: float = 0.5, rotate_prob: float = 0.5,
                        zoom_prob: float = 0.2, zoom_range=(0.9, 1.1), noise_prob: float = 0.2,
                        noise_std: float = 0.1):
    """MONAI dictionary transforms for ``{"image", "label"}`` patches of shape (1, z, y, x).

    In this order: z-score of the image over the patch (``normalization="patch"``;
    with ``"volume"`` the patches arrive z-scored already); a flip along each axis
    (each with ``flip_prob``); a 90-degree rotation in the (y, x) plane
    (``rotate_prob``; z keeps its place because EM voxels are often anisotropic
    in z); an isotropic zoom by a factor in ``zoom_range`` (``zoom_prob``;
    trilinear for the image, nearest for the label, patch size kept); Gaussian
    noise of standard deviation up to ``noise_std`` (in z-score units,
    ``noise_prob``).  A probability of 0 leaves that transform out.

    The label must be encoded as ``label + 1`` (so that 0 means "outside"):
    where the zoom pads, the label becomes 0, which :func:`train_unet` maps to
    the ignore label; padding therefore never teaches "background".
    """
    from monai.transforms import (
        Compose,
        NormalizeIntensityd,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandZoomd,
    )

    keys = ["image", "label"]
    if normalization not in NORMALIZATIONS:
        raise InputError(f"normalization={normalization!r}: expected one of {', '.join(NORMALIZATIONS)}")
    ts = [NormalizeIntensityd(keys="image")] if normalization == "patch" else []
    if flip_prob > 0:
        ts += [RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    if rotate_prob > 0:
        ts.append(RandRotate90d(keys=keys, prob=rotate_prob, max_k=3, spatial_axes=(1, 2)))
    if zoom_prob > 0:
        lo, hi = (float(z) for z in zoom_range)
        ts.append(RandZoomd(keys=keys, prob=zoom_prob, min_zoom=lo, max_zoom=hi, mode=("trilinear", "nearest"),
                            padding_mode=("constant", "constant"), keep_size=True))
    if noise_prob > 0 and noise_std > 0:
        ts.append(RandGaussianNoised(keys="image", prob=noise_prob, std=noise_std))
    return Compose(ts)


class _PatchData:
    """Map-style data for a torch ``DataLoader``: patch ``k`` cut, encoded, transformed.

    Each patch's random transforms are seeded with its own seed, so the batches
    do not depend on the loader's workers or batch size.
    """

    def __init__(self, images, labels, items, seeds, patch, transform, stats=None):
        self.images, self.labels, self.items, self.seeds = images, labels, items, seeds
        self.patch, self.transform, self.stats = patch, transform, stats

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        from monai.utils import convert_to_tensor

        vol, start = self.items[k]
        sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        image = np.asarray(self.images[vol][sl], dtype=np.float32)[None]
        if self.stats is not None:  # normalization="volume": the z-score inference uses
            image = (image - np.float32(self.stats[vol][0])) / np.float32(self.stats[vol][1])
        code = np.asarray(self.labels[vol][sl], dtype=np.float32)[None] + 1.0
        self.transform.set_random_state(seed=int(self.seeds[k]))
        out = self.transform({"image": image, "label": code})
        image = convert_to_tensor(out["image"], track_meta=False).float()
        code = convert_to_tensor(out["label"], track_meta=False)
        label = code - 1.0
        label[code < 0.5] = IGNORE
        return image, label


_PROB = Number(minimum=0, maximum=1)


@checked(
    channels=NumberList(Number(integer=True, minimum=1), 2),
    strides=NumberList(Number(integer=True, minimum=1), 1),
    num_res_units=Number(integer=True, minimum=0),
    patch_size=Size(8),
    split_block_shape=Size(8, nullable=True),
    val_fraction=Number(minimum=0, maximum=0.5),
    test_fraction=Number(minimum=0, maximum=0.5),
    patches_per_epoch=Number(integer=True, minimum=1, nullable=True),
    val_patches=Number(integer=True, minimum=1),
    foreground_fraction=_PROB,
    normalization=Choice(NORMALIZATIONS),
    batch_size=Number(integer=True, minimum=1),
    epochs=Number(integer=True, minimum=1),
    learning_rate=Number(exclusive_minimum=0),
    patience=Number(integer=True, minimum=0),
    min_delta=Number(minimum=0),
    flip_prob=_PROB, rotate_prob=_PROB, zoom_prob=_PROB, noise_prob=_PROB,
    zoom_range=NumberList(Number(exclusive_minimum=0), 2, 2, increasing=True),
    noise_std=Number(minimum=0),
    seed=Number(integer=True, minimum=0),
    device=DEVICE,
    amp=Flag(),
)
def train_unet(
    pairs,
    *,
    channels=CHANNELS,
    strides=STRIDES,
    num_res_units: int = 2,
    patch_size=64,
    split_block_shape=None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    patches_per_epoch: int | None = None,
    val_patches: int = 16,
    foreground_fraction: float = 0.0,
    normalization: str = "patch",
    batch_size: int = 2,
    epochs: int = 50,
    learning_rate: float = 1e-4,
    patience: int = 10,
    min_delta: float = 0.0,
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
    zoom_prob: float = 0.2,
    zoom_range=(0.9, 1.1),
    noise_prob: float = 0.2,
    noise_std: float = 0.1,
    seed: int = 0,
    device: str = "auto",
    amp: bool = True,
    resume: dict | None = None,
    on_epoch: Callable | None = None,
    progress: Callable | bool | None = None,
):
    """Train a 3-D U-Net on (image, label) volumes with an ignore label.

    Parameters
    ----------
    pairs : sequence of (image, label)
        3-D arrays of equal shape per pair; labels 0/1/2 (2 = ignore) or 0/255.
        Read into memory.
    channels, strides, num_res_units
        The model (:func:`build_unet`).
    patch_size : int or (z, y, x)
        Training patch; divisible by the product of ``strides``.
    split_block_shape, val_fraction, test_fraction
        The leakage-free split (:func:`split_blocks`).
    patches_per_epoch : int or None
        Training patches per epoch, drawn anew every epoch inside the train blocks.
        None: as many as the train blocks hold patches side by side (their voxels
        over the patch's, at least ``batch_size`` and at most ``MAX_AUTO_PATCHES``),
        so that an epoch sees the training data about once whatever its size.
    val_patches : int
        Validation patches, drawn once inside the val blocks (0: no validation).
    foreground_fraction : float
        Share of training patches forced to contain a foreground voxel (0: plain
        uniform draws).
    normalization : "patch" or "volume"
        Z-score each training patch over itself, or with its volume's global
        mean and standard deviation (:func:`intensity_stats`), which is what
        inference uses.  "volume" keeps contrast differences between regions
        (smooth resin against textured tissue) that a per-patch z-score
        flattens.
    batch_size, epochs, learning_rate
        Adam with ``learning_rate``; ``epochs`` is the total, resumed epochs included.
    patience, min_delta : int, float
        Early stopping: stop after ``patience`` epochs in which the validation
        Dice did not beat the best by more than ``min_delta`` (0: never stop early).
    flip_prob, rotate_prob, zoom_prob, zoom_range, noise_prob, noise_std
        Augmentation (:func:`training_transforms`).
    seed : int
        Seeds the model's initial weights, the split, the patches and the
        augmentation.  On the CPU two runs with the same seed and data give
        identical weights.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; mixed precision on a GPU when ``amp``.
    resume : dict, optional
        A ``last`` checkpoint of an earlier run: weights, optimiser state, epoch
        counter, early-stopping state and history continue from it.
    on_epoch : callable, optional
        Called after every epoch as ``on_epoch(row, last, best)``: the history row,
        the ``last`` checkpoint and the ``best`` one (None unless this epoch is the
        new best).  The runner saves them; nothing here touches files.
    progress : callable, bool or None
        None: a tqdm bar on stderr; False: none; a callable: ``progress(done, total)``
        after each training step.

    Returns
    -------
    best : dict
        Checkpoint of the best epoch (by validation Dice; by training loss without
        validation): ``format``, ``config`` (model settings, patch size,
        normalisation), ``state_dict`` (CPU tensors), ``epoch``, ``metrics``.
        Load it with :func:`load_unet`.
    history : list of dict
        One row per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_dice``,
        ``best``, ``seconds``, ``learning_rate``.
    metrics : dict
        ``test``: Dice and Jaccard over all test blocks together, ignored voxels
        excluded, plus the Dice of each block (empty against empty counts as 1)
        and their mean and minimum; None without test blocks.  Test voxels are
        predicted by :func:`predict_volume` (the volume's global z-score) with
        one patch of surrounding image as context, as whole-volume inference
        would see them; their labels never enter training or model selection.  Also ``best_epoch``, ``best_val_dice``,
        ``epochs_run``, ``stopped_early``, ``split`` (blocks and voxels per
        split), ``device``.

    Notes
    -----
    Model and loss follow Catena's EM-mask U-Net (MONAI ``UNet``, Dice + CE,
    Adam 1e-4) and MemBrain-seg's use of label 2 as "ignore"; unlike both, the
    split comes before patch drawing and inference normalises as training does.
    Inference always z-scores with one global mean and standard deviation per
    volume; ``normalization="volume"`` trains with exactly that, the default
    "patch" z-scores each training patch on its own, which matches it for
    patches representative of the volume.  The checkpoint dictionaries hold only
    tensors and plain Python values: save them with ``torch.save`` and load
    them with ``torch.load(..., weights_only=True)``.
    """
    import torch

    images, labels = _check_pairs(pairs)
    patch = _triple_int(patch_size, "patch_size")
    channels, strides = _ints(channels, "channels"), _ints(strides, "strides")
    _check_divisible(patch, strides, "patch_size")
    shapes = [im.shape for im in images]
    blocks = split_blocks(shapes, patch_size=patch, split_block_shape=split_block_shape,
                          val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    train_sampler = PatchSampler(shapes, blocks, "train", patch, labels=labels if foreground_fraction > 0 else None,
                                 seed=seed)
    val_sampler = PatchSampler(shapes, blocks, "val", patch)
    if patches_per_epoch is None:
        patches_per_epoch = auto_patches_per_epoch(blocks, patch, batch_size)
        log.info("train_unet: %d patches per epoch (the train blocks' volume over a patch's)", patches_per_epoch)
    dev = torch_device(device)
    use_amp = bool(amp) and dev.type == "cuda"
    config = {"channels": list(channels), "strides": list(strides), "num_res_units": int(num_res_units),
              "patch_size": list(patch), "normalization": normalization, "ignore_label": IGNORE}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_unet(channels=channels, strides=strides, num_res_units=num_res_units)
    model.to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = {"epoch": 0, "best_score": None, "best_epoch": None, "bad_epochs": 0, "history": []}
    split = {"shapes": [list(s) for s in shapes], "patch_size": list(patch),
             "split_block_shape": None if split_block_shape is None else list(_triple_int(split_block_shape, "")),
             "val_fraction": float(val_fraction), "test_fraction": float(test_fraction), "seed": int(seed)}
    best_weights = None
    if resume is not None:
        best_weights = _restore(resume, model, optimizer, scaler, config, split, state)
    transform = training_transforms(normalization=normalization, flip_prob=flip_prob, rotate_prob=rotate_prob,
                                    zoom_prob=zoom_prob, zoom_range=zoom_range, noise_prob=noise_prob,
                                    noise_std=noise_std)
    stats = [intensity_stats(im) for im in images] if normalization == "volume" else None
    val_data = None
    if val_fraction > 0 and val_patches > 0:
        items = val_sampler.draw(val_patches, np.random.default_rng([seed, 1]))
        plain = training_transforms(normalization=normalization, flip_prob=0, rotate_prob=0, zoom_prob=0,
                                    noise_prob=0)
        val_data = _PatchData(images, labels, items, np.zeros(len(items), np.int64), patch, plain, stats)
    steps = -(-int(patches_per_epoch) // int(batch_size))
    first = state["epoch"] + 1
    bar, report = progress_reporter(progress, steps * max(0, int(epochs) - first + 1), "train_unet", "step")
    stopped = bool(patience) and state["bad_epochs"] >= patience
    done = 0
    try:
        for epoch in range(first, int(epochs) + 1):
            if stopped:
                break
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, 0, epoch])
            items = train_sampler.draw(patches_per_epoch, rng, foreground_fraction)
            data = _PatchData(images, labels, items, rng.integers(0, 2**31, len(items)), patch, transform, stats)
            loader = torch.utils.data.DataLoader(data, batch_size=int(batch_size), shuffle=False)
            model.train()
            total, count = 0.0, 0
            for image, label in loader:
                image, label = image.to(dev, non_blocking=True), label.to(dev, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
                    logits = model(image)
                loss = masked_dice_ce_loss(logits, label)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += float(loss.detach()) * len(image)
                count += len(image)
                done += 1
                report(done)
            row = {"epoch": epoch, "train_loss": total / count, "val_loss": None, "val_dice": None}
            if val_data is not None:
                row["val_loss"], row["val_dice"] = _validate(model, val_data, batch_size, dev, use_amp)
            score = row["val_dice"] if val_data is not None else -row["train_loss"]
            improved = state["best_score"] is None or score > state["best_score"] + float(min_delta)
            if improved:
                state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
                best_weights = _cpu_state(model)
            else:
                state["bad_epochs"] += 1
            row.update(best=improved, seconds=round(time.perf_counter() - t0, 3),
                       learning_rate=float(optimizer.param_groups[0]["lr"]))
            state["history"].append(row)
            state["epoch"] = epoch
            stopped = bool(patience) and state["bad_epochs"] >= patience
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{row['train_loss']:.4f}",
                                val_dice="-" if row["val_dice"] is None else f"{row['val_dice']:.4f}")
            if on_epoch is not None:
                best = _checkpoint(best_weights, config, epoch, row) if improved else None
                last = {**_checkpoint(_cpu_state(model), config, epoch, row),
                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "train_state": {k: state[k] for k in ("best_score", "best_epoch", "bad_epochs")},
                        "history": list(state["history"]), "best_state_dict": best_weights, "split": split}
                on_epoch(row, last, best)
    finally:
        if bar is not None:
            bar.close()
    if best_weights is None:  # resumed a finished run: nothing new was trained
        best_weights = _cpu_state(model)
    best_row = next((r for r in state["history"] if r["epoch"] == state["best_epoch"]), {})
    best = _checkpoint(best_weights, config, state["best_epoch"], best_row)
    model.load_state_dict(best_weights)
    test = _test_metrics(model, images, labels, blocks, patch, batch_size, dev, use_amp)
    metrics = {
        "test": test, "best_epoch": state["best_epoch"],
        "best_val_dice": best_row.get("val_dice"), "epochs_run": state["epoch"], "stopped_early": stopped,
        "split": _split_counts(blocks), "device": str(dev), "amp": use_amp,
        "train_positions": train_sampler.positions, "val_positions": val_sampler.positions,
    }
    return best, state["history"], metrics


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _checkpoint(weights, config, epoch, row) -> dict:
    return {"format": CHECKPOINT_FORMAT, "config": dict(config), "state_dict": weights, "epoch": epoch,
            "metrics": dict(row)}


def _restore(last, model, optimizer, scaler, config, split, state):
    """Load a ``last`` checkpoint into the training objects; return the best weights it carries."""
    if not isinstance(last, dict) or last.get("format") != CHECKPOINT_FORMAT or "optimizer" not in last:
        raise InputError("resume: not a 'last' checkpoint of train_unet (it needs the optimiser state)")
    old = {k: last["config"].get(k) for k in ("channels", "strides", "num_res_units")}
    new = {k: config[k] for k in old}
    if old != new:
        raise InputError(f"resume: the checkpoint's model {old} differs from the requested {new}; "
                         "resume with the same channels/strides/num_res_units or start afresh")
    if last.get("split") != split:
        raise InputError(f"resume: the checkpoint was trained on the split {last.get('split')} but this run "
                         f"asks for {split}; a different split would validate and test on trained voxels, "
                         "so resume with the same data, patch_size, split settings and seed, or start afresh")
    model.load_state_dict(last["state_dict"])
    optimizer.load_state_dict(last["optimizer"])
    if last.get("scaler"):
        scaler.load_state_dict(last["scaler"])
    state.update(last["train_state"], epoch=int(last["epoch"]), history=list(last["history"]))
    return last.get("best_state_dict")


def _validate(model, data, batch_size, dev, use_amp):
    """Loss and Dice (ignored voxels excluded) over the fixed validation patches."""
    import torch

    model.eval()
    total, count, tp, fp, fn = 0.0, 0, 0, 0, 0
    with torch.inference_mode():
        for image, label in torch.utils.data.DataLoader(data, batch_size=int(batch_size), shuffle=False):
            image, label = image.to(dev), label.to(dev)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
                logits = model(image)
            total += float(masked_dice_ce_loss(logits, label)) * len(image)
            count += len(image)
            keep = label != IGNORE
            pred, truth = (logits.float() > 0) & keep, (label == 1) & keep
            tp += int((pred & truth).sum())
            fp += int((pred & ~truth).sum())
            fn += int((~pred & truth).sum())
    denom = 2 * tp + fp + fn
    return total / count, 1.0 if denom == 0 else 2 * tp / denom


def _test_metrics(model, images, labels, blocks, patch, batch_size, dev, use_amp):
    """Dice/Jaccard on the test blocks, predicted as whole-volume inference predicts them: the
    region around the test blocks (one patch of image context on every side) goes through
    :func:`predict_volume`; only test voxels are scored, and their labels were never trained on."""
    from .postprocess import mask_overlap

    tp = fp = fn = voxels = 0
    per_block = []
    for i, (image, label) in enumerate(zip(images, labels)):
        tests = [sl for sl, split in blocks[i] if split == "test"]
        if not tests:
            continue
        mean, std = intensity_stats(image)
        box = tuple(slice(max(0, min(sl[k].start for sl in tests) - patch[k]),
                          min(image.shape[k], max(sl[k].stop for sl in tests) + patch[k])) for k in range(3))
        _, mask, _ = predict_volume(model, image[box], roi_size=patch, overlap=[p // 4 for p in patch],
                                    sw_batch_size=batch_size, mean=mean, std=std, device=dev, amp=use_amp,
                                    progress=False)
        for sl in tests:
            local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sl, box))
            m = mask_overlap(mask[local], label[sl], ignore_label=IGNORE)
            tp, fp, fn = tp + m["true_positive"], fp + m["false_positive"], fn + m["false_negative"]
            voxels += m["voxels"]
            per_block.append({"volume": i, "start": [s.start for s in sl], "stop": [s.stop for s in sl],
                              "dice": m["dice"], "jaccard": m["jaccard"], "voxels": m["voxels"]})
    if not per_block:
        return None
    denom = 2 * tp + fp + fn
    dices = [b["dice"] for b in per_block]
    return {"dice": 1.0 if denom == 0 else 2 * tp / denom, "jaccard": 1.0 if denom == 0 else tp / (tp + fp + fn),
            "voxels": voxels, "true_positive": tp, "false_positive": fp, "false_negative": fn,
            "blocks": len(per_block), "block_dice_mean": float(np.mean(dices)), "block_dice_min": float(min(dices)),
            "per_block": per_block}


def _split_counts(blocks) -> dict:
    out = {s: {"blocks": 0, "voxels": 0} for s in SPLITS}
    for bl in blocks:
        for sl, split in bl:
            out[split]["blocks"] += 1
            out[split]["voxels"] += int(np.prod([s.stop - s.start for s in sl]))
    return out


def _check_pairs(pairs):
    images, labels = [], []
    if not len(pairs):
        raise InputError("no training data: give at least one (image, label) pair")
    for i, (image, label) in enumerate(pairs):
        image = np.asarray(image)
        if image.ndim != 3:
            raise InputError(f"training image {i} has shape {image.shape}; a 3-D (z, y, x) volume is needed")
        if np.shape(label) != image.shape:
            raise InputError(f"training label {i} has shape {np.shape(label)} but its image has {image.shape}")
        images.append(image)
        labels.append(training_labels(label, what=f"training label {i}"))
    return images, labels


# ----------------------------------------------------------------------------- inference


def intensity_stats(volume, *, max_voxels: int = 2**24) -> tuple[float, float]:
    """Mean and standard deviation of a volume, from a regular subsample of at most ~``max_voxels``.

    ``volume`` is read in slabs (a ``zarr.Array`` is never loaded whole).  A
    constant volume gets standard deviation 1, so that z-scoring it is harmless.
    """
    shape = tuple(volume.shape)
    n = int(np.prod(shape))
    k = max(1, math.ceil((n / max_voxels) ** (1 / len(shape)))) if n > max_voxels else 1
    plane = int(np.prod([-(-s // k) for s in shape[1:]]))
    rows = max(1, 2**22 // max(plane, 1))  # subsampled z-planes per read
    count, mean, m2 = 0, 0.0, 0.0
    for z0 in range(0, shape[0], rows * k):
        sub = np.asarray(volume[z0:min(shape[0], z0 + rows * k):k, ::k, ::k], dtype=np.float64)
        c = sub.size
        if not c:
            continue
        mu = float(sub.mean())
        delta = mu - mean
        m2 += float(((sub - mu) ** 2).sum()) + delta * delta * count * c / (count + c)
        mean += delta * c / (count + c)
        count += c
    std = math.sqrt(m2 / count) if count else 0.0
    return mean, std if std > 0 else 1.0


def inference_chunk_shape(shape, chunk_shape, roi_size=64, overlap=16):
    """The block shape :func:`predict_volume` uses for ``chunk_shape``: rounded down to a whole
    number of window steps (``roi_size - overlap``, at least one step) and capped by ``shape``;
    None stays None (one block)."""
    if chunk_shape is None:
        return None
    roi, ov = _triple_int(roi_size, "roi_size"), _triple_int(overlap, "overlap", minimum=0)
    out = []
    for s, c, r, o in zip(shape, _triple_int(chunk_shape, "chunk_shape"), roi, ov):
        step = r - o
        out.append(min(int(s), max(step, c // step * step)))
    return tuple(out)


@checked(
    roi_size=Size(8),
    overlap=Size(0),
    sw_batch_size=Number(integer=True, minimum=1),
    tta=Flag(),
    mean=Number(nullable=True),
    std=Number(exclusive_minimum=0, nullable=True),
    chunk_shape=Size(8, nullable=True),
    threshold=Number(exclusive_minimum=0, exclusive_maximum=1),
    device=DEVICE,
    amp=Flag(),
    blend=Choice(("gaussian", "constant")),
    threads=Number(integer=True, minimum=1, nullable=True, unit="CPU threads of the network on the CPU; null: torch's"),
)
def predict_volume(
    model,
    volume,
    *,
    roi_size=(64, 64, 64),
    overlap=16,
    sw_batch_size: int = 4,
    tta: bool = False,
    mean: float | None = None,
    std: float | None = None,
    chunk_shape=None,
    out_prob=None,
    out_mask=None,
    threshold: float = 0.5,
    device: str = "auto",
    amp: bool = True,
    blend: str = "gaussian",
    progress: Callable | bool | None = None,
    threads: int | None = None,
):
    """Foreground probability and mask of a whole volume by sliding-window inference.

    Parameters
    ----------
    model : torch.nn.Module or dict
        A one-output-channel network (logits) or a checkpoint for :func:`load_unet`.
        It is moved to ``device`` and put in eval mode.
    volume : array_like, shape (z, y, x)
        NumPy array, memory map or ``zarr.Array``; with ``chunk_shape`` it is only
        read block by block.
    roi_size : int or (z, y, x)
        Window size; divisible by the model's total stride.
    overlap : int or (z, y, x)
        Overlap of neighbouring windows in voxels (MONAI's fraction is derived
        from it so that the step is exactly ``roi_size - overlap``).
    sw_batch_size : int
        Windows per forward pass.
    tta : bool
        Test-time augmentation: every window is also predicted flipped along each
        subset of the three axes (8 passes) and the logits are averaged.
    mean, std : float, optional
        Global z-score statistics, both given (finite, std > 0) or both None:
        computed once with :func:`intensity_stats`.
    chunk_shape : int or (z, y, x), optional
        Process the volume in blocks of about this shape (see
        :func:`inference_chunk_shape`); each window is evaluated once, in the block
        where it starts, and the parts of its weighted logits that reach into later
        blocks are held until those are computed (:class:`_SlidingWindows`).  Every
        chunking gives the same probabilities and mask, to the bit, at the same cost;
        peak memory follows the block, not the volume.  None: the whole volume at once.
    out_prob, out_mask : array_like, optional
        Preallocated arrays of the volume's shape (e.g. Zarr arrays) that receive
        the probability (float16) and the mask (uint8) block by block.
    threshold : float
        Mask = probability > ``threshold`` (compared before rounding to float16).
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; mixed precision on a GPU when ``amp``.
    blend : "gaussian" or "constant"
        How overlapping windows are combined (MONAI's ``mode``).
    progress : callable, bool or None
        None: a tqdm bar on stderr when there is more than one block; False: none;
        a callable: ``progress(done, total)`` after each block.
    threads : int or None
        Threads of torch's CPU operators during the call (``torch.set_num_threads``, set
        back afterwards); None: torch's own setting.

    Returns
    -------
    prob : array of float16
        Foreground probability in [0, 1] (``out_prob`` when given).  float16
        keeps about three decimal digits, plenty for a probability, at half
        the size of float32.
    mask : array of uint8
        0/1 (``out_mask`` when given).
    stats : dict
        ``voxels``, ``foreground_voxels``, ``fraction_foreground``, ``mean``,
        ``std``, ``roi_size``, ``overlap``, ``sw_batch_size``, ``tta``, ``blend``,
        ``threshold``, ``chunk_shape`` (as used), ``blocks``, ``windows``
        (distinct windows, before TTA), ``evaluations`` (windows run through the network,
        with the repeats that fill a block's last batch), ``seconds``,
        ``voxels_per_second``, ``device``, ``probability_dtype``.

    Notes
    -----
    MONAI ``sliding_window_inference``'s result, computed block by block with its arithmetic
    (window placement, importance map, float32 sums in its order; see :class:`_SlidingWindows`),
    by default with Gaussian blending (``sigma_scale`` 0.125), which down-weights the window
    borders where a U-Net sees least context; Catena blends with constant weights.  Windows are
    placed as MONAI places them over the whole volume (every ``roi_size - overlap`` voxels from
    the first, the last flush with the end), so every voxel is covered.  The result equals
    MONAI's on the whole volume to the bit where MONAI's batches are the full ones
    used here (tested on the CPU); otherwise it differs by the float noise of another batch size.
    """
    import torch

    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 3:
        raise InputError(f"volume has shape {shape}; a 3-D (z, y, x) volume is needed")
    roi = _triple_int(roi_size, "roi_size")
    ov = _triple_int(overlap, "overlap", minimum=0)
    if any(o >= r for o, r in zip(ov, roi)):
        raise InputError(f"overlap={list(ov)} must be smaller than roi_size={list(roi)}")
    dev = device if isinstance(device, torch.device) else torch_device(device)
    if isinstance(model, dict):
        model = load_unet(model, device=dev)
    if getattr(model, "strides", None) is not None:
        _check_divisible(roi, model.strides, "roi_size")
    model = model.to(dev).eval()
    use_amp = bool(amp) and dev.type == "cuda"
    if (mean is None) != (std is None):
        raise InputError(f"mean={mean!r}, std={std!r}: give both z-score statistics or neither "
                         "(neither: computed from the volume)")
    if mean is None:
        mean, std = intensity_stats(volume)
    mean, std = float(mean), float(std) if float(std) > 0 else 1.0  # a constant volume: std 0
    chunks = inference_chunk_shape(shape, chunk_shape, roi, ov)
    prob = out_prob if out_prob is not None else np.zeros(shape, np.float16)
    mask = out_mask if out_mask is not None else np.zeros(shape, np.uint8)
    for name, arr in (("out_prob", prob), ("out_mask", mask)):
        if tuple(arr.shape) != shape:
            raise InputError(f"{name} has shape {tuple(arr.shape)} but the volume has {shape}")
    blocks = list(iter_blocks(shape, chunks))
    bar, report = progress_reporter(progress, len(blocks), "predict_unet", "block")

    def read(region):  # z-scored float32 input of a region
        return (np.asarray(volume[region], dtype=np.float32) - np.float32(mean)) / np.float32(std)

    t0 = time.perf_counter()
    foreground = 0
    torch_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with torch.inference_mode():
            run = _SlidingWindows(shape, chunks, roi, ov, blend, _window_predictor(model, tta, use_amp),
                                  int(sw_batch_size), dev)
            for done, block in enumerate(blocks, start=1):
                p = torch.sigmoid_(run.block_logits(block.inner, read)).cpu().numpy()
                m = (p > threshold).astype(np.uint8)
                prob[block.inner] = p.astype(np.float16)
                mask[block.inner] = m
                foreground += int(np.count_nonzero(m))
                report(done)
    finally:
        torch.set_num_threads(torch_threads)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    n = int(np.prod(shape))
    stats = {
        "voxels": n, "foreground_voxels": foreground, "fraction_foreground": foreground / n if n else 0.0,
        "mean": mean, "std": std, "roi_size": list(roi), "overlap": list(ov), "sw_batch_size": int(sw_batch_size),
        "tta": bool(tta), "blend": blend, "threshold": float(threshold), "chunk_shape": list(chunks) if chunks else None,
        "blocks": len(blocks), "windows": run.windows, "evaluations": run.evaluations, "seconds": round(seconds, 3), "voxels_per_second": n / seconds if seconds else None,
        "device": str(dev), "amp": use_amp, "probability_dtype": "float16",
        "threads": int(threads) if threads is not None else torch_threads,
    }
    return prob, mask, stats


def _window_predictor(model, tta: bool, use_amp: bool):
    """The per-window network call: logits in float32, averaged over the 8 flips with ``tta``."""
    import torch

    def predict(x):
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=use_amp):
            if not tta:
                return model(x).float()
            total = None
            for axes in _FLIPS:
                y = model(torch.flip(x, axes)) if axes else model(x)
                y = (torch.flip(y, axes) if axes else y).float()
                total = y if total is None else total + y
            return total / len(_FLIPS)

    return predict


def _window_starts(size: int, roi: int, step: int) -> list[int]:
    """Window starts along one axis, as MONAI's ``dense_patch_slices`` places them."""
    if size <= roi:
        return [0]
    return list(range(0, size - roi, step)) + [size - roi]


class _SlidingWindows:
    """MONAI's sliding-window inference, block by block, with MONAI's arithmetic to the bit.

    MONAI's ``sliding_window_inference`` places the windows over the whole volume (zero-padded
    to ``roi`` where it is smaller, half before), multiplies every window's logits by the
    importance map, adds them into a float32 sum window after window in raster order, adds the
    importance map likewise into a count, and divides.  Each voxel's value is thus a sequence of
    float32 additions over the windows covering it, in their raster order.  This class computes
    exactly that sequence for one block at a time:

    - each window is evaluated once, by the block its start lies in (its *owner*); its weighted
      logits are added to the owner's sum, and the parts that reach into later blocks are held
      (``pending``) until those blocks are computed: slabs of about ``overlap`` voxels;
    - a block adds its own windows and the held parts of earlier ones merged in raster order of
      the windows, so that every voxel sees the additions of the whole-volume run, in its order;
    - the network always gets full batches of ``batch`` windows (the last of a block is filled with
      repeats of its last window, which are dropped): a convolution's result may depend on the
      batch size it is run at (on the CPU, one window alone differs from two), never on the
      chunking.

    The result is the same for any chunking, and equals MONAI's whole-volume result wherever
    MONAI's own batches are full (or hold two or more windows, on the CPU).
    """

    def __init__(self, shape, chunks, roi, overlap, blend, predictor, batch, dev):
        import torch
        from monai.data.utils import compute_importance_map

        self.shape, self.roi, self.predictor, self.batch, self.dev = shape, roi, predictor, batch, dev
        self.chunks = tuple(chunks) if chunks else shape
        self.pad = [max(r - s, 0) // 2 for s, r in zip(shape, roi)]  # MONAI pads half the shortfall before
        self.starts = [_window_starts(max(s, r), r, r - o) for s, r, o in zip(shape, roi, overlap)]
        self.importance = compute_importance_map(tuple(roi), mode=blend, sigma_scale=0.125, device=dev,
                                                 dtype=torch.float32)
        self.pending: dict[tuple, list] = {}
        self.windows = self.evaluations = 0

    def span(self, axis, start) -> slice:
        """The voxels of the volume a window starting at ``start`` (padded coordinates) covers."""
        s = start - self.pad[axis]
        return slice(max(s, 0), min(s + self.roi[axis], self.shape[axis]))

    def block_logits(self, inner, read):
        """The blended logits of the block ``inner`` (a torch float32 tensor on the device);
        ``read(region)`` gives the z-scored input of a region of the volume."""
        import torch

        size = tuple(sl.stop - sl.start for sl in inner)
        num = torch.zeros(size, dtype=torch.float32, device=self.dev)
        held = sorted(self.pending.pop(tuple(sl.start for sl in inner), []), key=lambda h: h[0])
        own = [[w for w in st if sl.start <= self.span(a, w).start < sl.stop]
               for a, (st, sl) in enumerate(zip(self.starts, inner))]
        k = 0
        if all(own):
            region = tuple(slice(self.span(a, w[0]).start, self.span(a, w[-1]).stop) for a, w in enumerate(own))
            x = torch.from_numpy(np.ascontiguousarray(read(region)))
            windows = list(itertools.product(*own))
            self.windows += len(windows)
            for b0 in range(0, len(windows), self.batch):
                starts = windows[b0:b0 + self.batch]
                fill = starts + [starts[-1]] * (self.batch - len(starts))
                inputs = torch.stack([self._input(x, region, w) for w in fill]).to(self.dev)
                self.evaluations += len(fill)
                out = self.predictor(inputs)[:len(starts), 0] * self.importance  # MONAI: logits *= importance
                for w, piece in zip(starts, out):
                    while k < len(held) and held[k][0] < w:
                        self._add(num, held[k][1], held[k][2])
                        k += 1
                    self._place(num, inner, w, piece)
        for _, at, piece in held[k:]:
            self._add(num, at, piece)
        return num.div_(self._count(inner, size))

    def _input(self, x, region, start):
        """One window's input, zero-padded where the volume is smaller than the window (MONAI's padding)."""
        import torch

        local, at = self._cut(start, region)
        part = x[at]
        if tuple(part.shape) == tuple(self.roi):
            return part[None]
        out = torch.zeros((1, *self.roi), dtype=x.dtype)
        out[(0, *local)] = part
        return out

    def _cut(self, start, box):
        """The window at ``start`` where it overlaps ``box`` (slices of the volume): its slices in the
        window and in the box."""
        spans = [self.span(a, w) for a, w in enumerate(start)]
        part = [slice(max(b.start, s.start), min(b.stop, s.stop)) for b, s in zip(box, spans)]
        offset = [w - p for w, p in zip(start, self.pad)]  # the window's first voxel in volume coordinates
        return (tuple(slice(q.start - o, q.stop - o) for q, o in zip(part, offset)),
                tuple(slice(q.start - b.start, q.stop - b.start) for q, b in zip(part, box)))

    def _place(self, num, inner, start, piece) -> None:
        """Add a window's weighted logits to its owner ``inner`` and hold the parts in later blocks."""
        spans = [self.span(a, w) for a, w in enumerate(start)]
        keys = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(spans, self.chunks)]
        for key in itertools.product(*keys):
            target = [slice(i * c, min(n, (i + 1) * c)) for i, c, n in zip(key, self.chunks, self.shape)]
            local, at = self._cut(start, target)
            if all(t.start == i.start for t, i in zip(target, inner)):
                self._add(num, at, piece[local])
            else:  # a later block's share: a copy, so that the batch's output is freed
                self.pending.setdefault(tuple(t.start for t in target), []).append(
                    (start, at, piece[local].to("cpu", copy=True)))

    @staticmethod
    def _add(num, at, piece) -> None:
        num[at] += piece.to(num.device)

    def _count(self, inner, size):
        """MONAI's count: the importance maps of all windows over the block, added in raster order."""
        import torch

        count = torch.zeros(size, dtype=torch.float32, device=self.dev)
        over = [[w for w in st if self.span(a, w).start < sl.stop and self.span(a, w).stop > sl.start]
                for a, (st, sl) in enumerate(zip(self.starts, inner))]
        for start in itertools.product(*over):
            local, at = self._cut(start, inner)
            count[at] += self.importance[local]
        return count


# ----------------------------------------------------------------------------- small helpers


def _ints(values, name) -> tuple[int, ...]:
    if isinstance(values, str):
        values = [v for v in values.replace(" ", ",").split(",") if v]
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{name}={values!r}: expected a list of whole numbers") from None
    if not out or any(v < 1 for v in out):
        raise InputError(f"{name}={values!r}: expected a non-empty list of positive whole numbers")
    return out


def _triple_int(value, name, minimum: int = 1) -> tuple[int, int, int]:
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    if np.isscalar(value):
        value = [value]
    try:
        out = tuple(int(v) for v in value)
        whole = all(float(v) == i for v, i in zip(value, out))
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise InputError(f"{name}={value!r}: expected a whole number of voxels or three (z, y, x)")
    out = out * 3 if len(out) == 1 else out
    if len(out) != 3 or any(v < minimum for v in out):
        raise InputError(f"{name}={value!r}: expected one or three whole numbers >= {minimum}")
    return out


def _check_divisible(size: Sequence[int], strides, name: str) -> None:
    """``size`` must pass through every down-sampling whole and reach the bottom level with more
    than one voxel per axis (instance normalisation needs at least two)."""
    factor = int(np.prod(strides))
    if any(s % factor or s < 2 * factor for s in size):
        raise InputError(f"{name}={list(size)} must be a multiple of {factor} (the product of strides "
                         f"{list(strides)}) and at least {2 * factor} on every axis, "
                         f"e.g. {[max(2 * factor, s // factor * factor) for s in size]}")
