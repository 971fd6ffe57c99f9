"""Merge a person's Add/Remove/Ignore correction masks into label patches.

The folder layout is MemBrain-seg's "patch corrections": one label patch per
file, and beside them a folder per patch, named after the label file without its
extension(s), holding masks whose names start with ``Add``, ``Remove`` or
``Ignore`` (MITK saves them as NRRD).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from maskworks.io import FORMATS, InputError, strip_extension
from maskworks.io.params import Flag, Number, checked

from .patches import IGNORE, _check_border, _set_border, binary_label, class_counts

# The order in which masks are applied (later wins), the label each one writes, and its stats key.
MASK_KINDS = (("remove", 0, "removed_voxels"), ("add", 1, "added_voxels"), ("ignore", IGNORE, "ignored_voxels"))
# The name prefixes MemBrain-seg's merge accepts, exactly (case-sensitive: "ADD1.nrrd" or "IGNORE.nrrd" are
# skipped there as "not fitting the Add/Remove/Ignore naming"; a merge that took them would train on other labels).
MASK_PREFIXES = {"remove": ("Remove", "remove"), "add": ("Add", "add"), "ignore": ("Ignore", "ignore")}


def mask_kind(name: str) -> str | None:
    """``add``, ``remove`` or ``ignore`` for a correction file name MemBrain-seg merges, else None."""
    return next((kind for kind, prefixes in MASK_PREFIXES.items() if name.startswith(prefixes)), None)


@checked(border=Number(integer=True, minimum=0, unit="voxels"), binarize=Flag())
def merge_corrections(
    label,
    *,
    add: Iterable = (),
    remove: Iterable = (),
    ignore: Iterable = (),
    border: int = 16,
    binarize: bool = False,
) -> tuple[np.ndarray, dict]:
    """Apply correction masks to a label patch.

    Parameters
    ----------
    label : array-like of int, shape (z, y, x)
        Label patch: 0 background, 1 foreground, 2 ignore.
    add, remove, ignore : sequences of array-like, each of the label's shape
        Correction masks; a voxel is marked where a mask is > 0.
    border : int
        Shell of voxels on all six faces set to 2 (ignore) at the end; 0: none.
    binarize : bool
        Set label values other than 0/1/2 to 1.  Without it they are an error.

    Returns
    -------
    merged : ndarray of uint8
        The corrected label (0/1/2), ready for training with ignore label 2.
    stats : dict
        ``removed_voxels``, ``added_voxels``, ``ignored_voxels``,
        ``border_voxels``: voxels whose value each step changed;
        ``n_remove``, ``n_add``, ``n_ignore``: masks applied; and the final
        ``background_voxels``, ``foreground_voxels``, ``ignore_voxels``.

    Notes
    -----
    The order follows MemBrain-seg's patch-corrections merge, later steps
    winning where masks overlap: Remove (-> 0), then Add (-> 1), then Ignore
    (-> 2), then the border shell (-> 2).
    """
    merged = binary_label(label, binarize=binarize, what="the label patch", allowed=(0, 1, 2))
    border = _check_border(border, merged.shape)
    stats = {}
    for kind, value, key in MASK_KINDS:
        masks = list({"remove": remove, "add": add, "ignore": ignore}[kind])
        changed = 0
        for j, mask in enumerate(masks):
            mask = np.asarray(mask)
            if mask.shape != merged.shape:
                raise InputError(
                    f"{kind} mask {j} has shape {mask.shape} but the label patch has shape {merged.shape}"
                )
            where = mask > 0
            changed += int(np.count_nonzero(where & (merged != value)))
            merged[where] = value
        stats[f"n_{kind}"] = len(masks)
        stats[key] = changed
    stats["border_voxels"] = _set_border(merged, border)
    stats.update(class_counts(merged))
    return merged, stats


# A mask without geometry "looks transposed" when, among the axis orders that keep its shape, another one
# puts at least this share of its voxels where a correction of its kind acts (and twice the share of its own
# order, plus this margin): Remove voxels on the label's foreground, Add voxels within ADD_REACH of it.
TRANSPOSED_SHARE = 0.5
TRANSPOSED_MARGIN = 0.1
ADD_REACH = 2  # voxels
MIN_EVIDENCE_VOXELS = 20


def transposition_evidence(label, mask, kind: str) -> dict | None:
    """How well a correction mask fits its label patch in its own axis order and in the best other order
    that keeps the shape (``transpose(perm)``), or None when there is nothing to compare (an Ignore mask,
    fewer than ``MIN_EVIDENCE_VOXELS`` voxels, no foreground, or no other order keeps the shape).

    The share of a Remove mask's voxels on the label's foreground (1), or of an Add mask's voxels within
    ``ADD_REACH`` voxels of it (corrections continue or cut the membranes that are there).  Returns
    ``{"own": share, "best": share, "perm": axes, "transposed": bool}``; ``transposed`` when the best other
    order reaches ``TRANSPOSED_SHARE`` and more than twice the own share plus ``TRANSPOSED_MARGIN``.
    """
    import itertools

    from scipy import ndimage

    label, mask = np.asarray(label), np.asarray(mask) > 0
    if kind not in ("add", "remove") or mask.ndim != 3 or np.count_nonzero(mask) < MIN_EVIDENCE_VOXELS:
        return None
    perms = [p for p in itertools.permutations(range(3)) if p != (0, 1, 2)
             and tuple(mask.shape[i] for i in p) == mask.shape]
    foreground = label == 1
    if not perms or not foreground.any():
        return None
    target = foreground if kind == "remove" else ndimage.binary_dilation(
        foreground, ndimage.generate_binary_structure(3, 3), iterations=ADD_REACH)
    total = np.count_nonzero(mask)

    def share(m):
        return np.count_nonzero(m & target) / total

    own = share(mask)
    best, perm = max((share(mask.transpose(p)), p) for p in perms)
    transposed = best >= TRANSPOSED_SHARE and best > 2 * own + TRANSPOSED_MARGIN
    return {"own": own, "best": best, "perm": perm, "transposed": transposed}


def volume_format(name: str) -> str | None:
    """The volume format of a file name by its extension, or None if it is not one we read."""
    low = name.lower()
    return next((fmt for fmt, exts in FORMATS.items() if low.endswith(exts)), None)


@dataclasses.dataclass
class CorrectionPlan:
    """Which label file goes with which correction masks, and what fits nowhere.

    ``pairs``: ``(label file, key, {"remove": [...], "add": [...], "ignore": [...]})``
    with mask file names, for every label that has a folder;
    ``labels_without_folder``: ``(label file, key)``;
    ``folders_without_label``: folder names;
    ``unknown_prefix``: ``folder/file`` of masks whose name starts with none of
    Add/Remove/Ignore; ``unknown_type``: label files and ``folder/file`` masks
    that are not a volume format (or are hidden files, e.g. ``._x.nrrd``).
    Every list is sorted.
    """

    pairs: list = dataclasses.field(default_factory=list)
    labels_without_folder: list = dataclasses.field(default_factory=list)
    folders_without_label: list = dataclasses.field(default_factory=list)
    unknown_prefix: list = dataclasses.field(default_factory=list)
    unknown_type: list = dataclasses.field(default_factory=list)


def _readable(name: str) -> bool:
    return not name.startswith(".") and volume_format(name) is not None


def plan_corrections(label_files: Iterable[str], correction_files: Mapping[str, Iterable[str]]) -> CorrectionPlan:
    """Pair label files with their correction folders, from the names alone.

    Parameters
    ----------
    label_files : iterable of str
        Names of the entries of the labels folder (``patch3.nii.gz``).
    correction_files : mapping of str to iterable of str
        Correction folder name (``patch3``) -> names of the files in it.

    Returns
    -------
    CorrectionPlan

    Notes
    -----
    A folder belongs to the label whose name without its extension(s) it
    carries (``patch3.nii.gz`` -> ``patch3/``).  Mask names are matched on
    their prefix exactly as MemBrain-seg does: ``Add``/``add``, ``Remove``/``remove``,
    ``Ignore``/``ignore`` (``Add1.nrrd``, ``remove_blob.nrrd``); any other name,
    ``ADD1.nrrd`` or ``IGNORE.nrrd`` included, is listed in ``unknown_prefix`` and not
    merged.  Hidden files (names starting with a dot) are listed as unknown types,
    never read.
    """
    plan = CorrectionPlan()
    labels: dict[str, str] = {}
    for name in sorted(label_files):
        if not _readable(name):
            plan.unknown_type.append(name)
            continue
        key = strip_extension(name)
        if key in labels:
            raise InputError(
                f"label files {labels[key]} and {name} both belong to the corrections folder {key}/; "
                "keep one of them"
            )
        labels[key] = name
    folders = {k: sorted(v) for k, v in correction_files.items()}
    for key, name in labels.items():
        if key not in folders:
            plan.labels_without_folder.append((name, key))
            continue
        masks: dict[str, list[str]] = {kind: [] for kind, _, _ in MASK_KINDS}
        for f in folders[key]:
            kind = mask_kind(f)
            if not _readable(f):
                plan.unknown_type.append(f"{key}/{f}")
            elif kind is None:
                plan.unknown_prefix.append(f"{key}/{f}")
            else:
                masks[kind].append(f)
        plan.pairs.append((name, key, masks))
    plan.folders_without_label = sorted(k for k in folders if k not in labels)
    plan.unknown_type.sort()
    plan.unknown_prefix.sort()
    return plan
