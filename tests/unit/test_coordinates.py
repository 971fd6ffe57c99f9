"""read_centres: the CSV of patch centres, as people and IMOD write it."""

from __future__ import annotations

import numpy as np
import pytest

from maskworks.io import InputError
from maskworks.io.coordinates import read_centres


def _read(tmp_path, text, name="c.csv"):
    p = tmp_path / name
    p.write_text(text)
    return read_centres(p)


@pytest.mark.parametrize("text", [
    "x,y,z\n1.5,2,3\n10,20,30.25\n",
    "1.5,2,3\n10,20,30.25\n",
    "1.5 2 3\n10\t20\t30.25\n",  # IMOD model2point
    "1.5;2;3\n10 ; 20 ; 30.25\n",
    "# centres\n\nX, Y, Z\n1.5, 2, 3,\n\n10,20,30.25\n",  # comment, blank lines, trailing comma
    '"x","y","z"\n"1.5","2","3"\n10,20,30.25\n',
    "\ufeffx,y,z\r\n1.5,2,3\r\n10,20,30.25\r\n",  # Excel: BOM and CRLF
])
def test_formats_with_and_without_header(tmp_path, text):
    c = _read(tmp_path, text)
    assert c.dtype == np.float64 and c.shape == (2, 3)
    np.testing.assert_array_equal(c, [[1.5, 2, 3], [10, 20, 30.25]])


def test_header_names_choose_the_columns(tmp_path):
    c = _read(tmp_path, "id,Z,Y,X,score\n7,3,2,1,0.9\n8,30,20,10,0.1\n")
    np.testing.assert_array_equal(c, [[1, 2, 3], [10, 20, 30]])


def test_napari_points_csv_is_read_in_its_z_y_x_order(tmp_path):
    """napari's "Save selected layer" of a points layer over a 3-D tomogram: index,axis-0,axis-1,axis-2 with
    axis-0 = z; with a time axis, the last three axes."""
    c = _read(tmp_path, "index,axis-0,axis-1,axis-2\n0,30.0,20.0,10.5\n1,3.0,2.0,1.0\n")
    np.testing.assert_array_equal(c, [[10.5, 20, 30], [1, 2, 3]])
    c = _read(tmp_path, "index,axis-0,axis-1,axis-2,axis-3\n0,0,30,20,10\n")
    np.testing.assert_array_equal(c, [[10, 20, 30]])


def test_three_unnamed_header_columns_are_x_y_z(tmp_path):
    np.testing.assert_array_equal(_read(tmp_path, "cx cy cz\n4 5 6\n"), [[4, 5, 6]])


def test_bad_row_names_file_line_and_text(tmp_path):
    with pytest.raises(InputError) as e:
        _read(tmp_path, "x,y,z\n1,2,3\n\n4,five,6\n")
    msg = str(e.value)
    assert "c.csv" in msg and "line 4" in msg and "'4,five,6'" in msg


@pytest.mark.parametrize("text, line", [
    ("1,2\n", 1),  # two values
    ("1,2,3,4\n", 1),  # four without a header saying which are x, y, z
    ("1,,2,3\n", 1),  # an empty field is not skipped
    ("x,y,z\n1,2,3\n4,5\n", 3),
    ("1,2,3O\n4,5,6\n", 1),  # a typo in the first row is not taken for a header
    ("x,y,z\n1,2,nan\n", 2),
    ("a,b,c,d\n1,2,3,4\n", 1),  # a header without x, y, z and not three columns
])
def test_malformed_rows(tmp_path, text, line):
    with pytest.raises(InputError, match=f"line {line}:"):
        _read(tmp_path, text)


@pytest.mark.parametrize("text", ["", "\n\n", "x,y,z\n", "# nothing\n"])
def test_no_centres_is_an_error(tmp_path, text):
    with pytest.raises(InputError, match="holds no centres"):
        _read(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.csv: no such file"):
        read_centres(tmp_path / "nope.csv")
