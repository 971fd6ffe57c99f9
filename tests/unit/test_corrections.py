"""merge_corrections and plan_corrections: precedence, stats and folder pairing by hand."""

from __future__ import annotations

import numpy as np
import pytest

from maskworks.cryoet.corrections import merge_corrections, plan_corrections
from maskworks.io import InputError


def _row(values):
    """A (1, 1, n) label from a list, so that a whole case fits on one line."""
    return np.array(values, dtype=np.uint8).reshape(1, 1, -1)


def test_precedence_remove_then_add_then_ignore():
    label = _row([0, 1, 1, 0, 1, 0, 1, 2])
    remove = _row([0, 1, 1, 1, 0, 0, 1, 0])
    add = _row([0, 0, 1, 1, 0, 1, 1, 0])
    ignore = _row([0, 0, 0, 0, 1, 1, 1, 0])
    merged, st = merge_corrections(label, remove=[remove], add=[add], ignore=[ignore], border=0)
    # voxel:  0  1  2  3  4  5  6  7
    # remove    0  0  0           0
    # add          1  1     1  1
    # ignore             2  2  2
    np.testing.assert_array_equal(merged, _row([0, 0, 1, 1, 2, 2, 2, 2]))
    assert st["removed_voxels"] == 3  # voxels 1, 2, 6 were 1 (voxel 3 was already 0)
    assert st["added_voxels"] == 4  # voxels 2, 3, 5, 6 (voxel 2 and 6 after their removal)
    assert st["ignored_voxels"] == 3  # voxels 4, 5, 6
    assert st["border_voxels"] == 0 and (st["n_remove"], st["n_add"], st["n_ignore"]) == (1, 1, 1)
    assert (st["background_voxels"], st["foreground_voxels"], st["ignore_voxels"]) == (2, 2, 4)
    assert label.tolist() == [[[0, 1, 1, 0, 1, 0, 1, 2]]]  # input untouched


def test_several_masks_of_a_kind_and_bool_or_float_masks():
    label = _row([1, 1, 1, 1])
    merged, st = merge_corrections(label, remove=[_row([1, 0, 0, 0]).astype(bool),
                                                  np.array([[[0, 0.5, 0, 1]]]), _row([1, 0, 0, 0])],
                                   border=0)
    np.testing.assert_array_equal(merged, _row([0, 0, 1, 0]))
    assert st["removed_voxels"] == 3 and st["n_remove"] == 3


def test_border_wins_over_add_and_counts():
    label = np.zeros((5, 5, 5), np.uint8)
    add = np.ones((5, 5, 5), np.uint8)
    merged, st = merge_corrections(label, add=[add], border=1)
    assert (merged[1:4, 1:4, 1:4] == 1).all() and np.count_nonzero(merged == 2) == 125 - 27
    assert st["border_voxels"] == 98 and st["added_voxels"] == 125


def test_no_masks_applies_the_border_only():
    label = np.ones((4, 4, 4), np.uint8)
    merged, st = merge_corrections(label, border=1)
    assert np.count_nonzero(merged == 1) == 8 and st["removed_voxels"] == st["added_voxels"] == 0


def test_values_other_than_0_1_2_need_binarize():
    label = _row([0, 1, 2, 5, 255])
    with pytest.raises(InputError) as e:
        merge_corrections(label, border=0)
    assert "5, 255" in str(e.value) and "binarize" in str(e.value)
    merged, _ = merge_corrections(label, border=0, binarize=True)
    np.testing.assert_array_equal(merged, _row([0, 1, 2, 1, 1]))  # the ignore label survives


def test_mask_of_another_shape():
    with pytest.raises(InputError, match=r"add mask 0 has shape \(1, 1, 3\).*\(1, 1, 4\)"):
        merge_corrections(_row([0, 0, 0, 0]), add=[_row([1, 1, 1])], border=0)


def test_plan_pairs_and_reports_everything_else():
    labels = ["p0.nrrd", "p1.nii.gz", "p2.mrc", "notes.txt", ".DS_Store", "p3.ome.zarr"]
    folders = {
        "p0": ["Add1.nrrd", "add_more.nrrd", "REMOVE.nrrd", "ADDX.nii.gz", "aDd.nrrd", "Remove2.nrrd",
               "ignoreThis.nii.gz", "Fix.nrrd", "Add.txt", "._Add1.nrrd"],
        "p1": ["Remove1.nrrd"],
        "p3": [],
        "p9": ["Add.nrrd"],
    }
    plan = plan_corrections(labels, folders)
    assert plan.pairs == [
        ("p0.nrrd", "p0", {"remove": ["Remove2.nrrd"], "add": ["Add1.nrrd", "add_more.nrrd"],
                           "ignore": ["ignoreThis.nii.gz"]}),
        ("p1.nii.gz", "p1", {"remove": ["Remove1.nrrd"], "add": [], "ignore": []}),
        ("p3.ome.zarr", "p3", {"remove": [], "add": [], "ignore": []}),
    ]
    assert plan.labels_without_folder == [("p2.mrc", "p2")]
    assert plan.folders_without_label == ["p9"]
    # MemBrain-seg's prefixes, case-sensitive as it matches them: "ADDX" or "REMOVE" are not merged there
    assert plan.unknown_prefix == ["p0/ADDX.nii.gz", "p0/Fix.nrrd", "p0/REMOVE.nrrd", "p0/aDd.nrrd"]
    assert plan.unknown_type == [".DS_Store", "notes.txt", "p0/._Add1.nrrd", "p0/Add.txt"]


def test_plan_rejects_two_labels_for_one_folder():
    with pytest.raises(InputError, match="p0.nii.gz and p0.nrrd both belong"):
        plan_corrections(["p0.nrrd", "p0.nii.gz"], {})
