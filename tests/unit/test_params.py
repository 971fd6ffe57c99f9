"""The parameter layer (maskworks.io.params): known answers for each kind of specification, and
the decorator that checks every call, inside ``**kwargs`` too, before the body runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maskworks.io import InputError
from maskworks.io.params import (
    DEVICE,
    Choice,
    Choices,
    Flag,
    Mapping,
    Number,
    NumberList,
    Size,
    Text,
    checked,
    specs_of,
)


@pytest.mark.parametrize("spec,good,bad", [
    (Number(integer=True, minimum=3), [3, 4.0, np.int64(7)], [2, 3.5, True, "4", None, math.inf]),
    (Number(exclusive_minimum=0), [1e-9, 2, np.float32(0.5)], [0, -1, math.nan, math.inf, False]),
    (Number(exclusive_minimum=0, exclusive_maximum=1, words=("otsu",)), ["otsu", 0.5], ["Otsu", 0, 1, 1.5]),
    (Number(minimum=-50, maximum=50, integer=True), [-50, 0, 50], [-51, 51]),
    (Number(nullable=True), [None, -3.0, 0], [math.nan, "x"]),
    (NumberList(Number(exclusive_minimum=0), 2, 2, increasing=True), [(0.9, 1.1), [1, 1]], [(1.2, 0.8), (1,), (0, 1)]),
    (Size(8), [8, "16", "8,16,32", (8, 8, 8), [9]], [7, "7", (8, 8), "a", 8.5, None]),
    (Choice(("a", "b"), nullable=True), ["a", None], ["c", 1]),
    (Choices(("mean", "sum")), [["mean"], ("sum", "mean")], [[], ["median"]]),
    (Text(r"^[^_]+$", "a word"), ["abc"], ["", "a_b", 3]),
    (DEVICE, ["auto", "cpu", "cuda", "cuda:1"], ["gpu", "cuda:", ""]),
    (Flag(), [True, np.bool_(False)], [1, "true", None]),
    (Mapping(), [{}, {"a": 1}, None], [[], "x"]),
])
def test_specs_accept_and_refuse(spec, good, bad):
    for v in good:
        spec("f", "p", v)
    for v in bad:
        with pytest.raises(InputError, match=r"^f: p=.*; expected "):
            spec("f", "p", v)


def test_checked_values_come_back_normalised():
    assert Size(8)("f", "s", "16") == (16, 16, 16) and Size(8)("f", "s", "8x16x32") == (8, 16, 32)
    assert Size(8, nullable=True)("f", "s", "auto") is None
    assert Number(integer=True)("f", "n", 4.0) == 4 and isinstance(Number(integer=True)("f", "n", 4.0), int)
    assert Mapping()("f", "m", None) == {}


def test_expected_texts_and_schema_fragments():
    n = Number(integer=True, minimum=0, maximum=50, unit="voxels")
    assert n.expected() == "an integer in [0, 50] (voxels)"
    assert n.schema() == {"type": "integer", "minimum": 0, "maximum": 50}
    t = Number(exclusive_minimum=0, exclusive_maximum=1, words=("otsu",))
    assert t.expected() == "'otsu' or a finite number in (0, 1)"
    assert t.schema() == {"oneOf": [{"type": "string", "enum": ["otsu"]},
                                    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}]}
    assert Choice(("a",), nullable=True).schema() == {"type": ["string", "null"], "enum": ["a", None]}
    assert Size(8, nullable=True).schema()["oneOf"][0] == {"type": "null"}


def test_the_decorator_checks_every_call_and_kwargs_passed_on():
    calls = []

    @checked(sigma=Number(exclusive_minimum=0))
    def library(x, *, sigma=1.0):
        calls.append(sigma)
        return x

    @checked(library, chunk=Size(8, nullable=True))
    def stage(path, *, chunk=None, **params):
        return library(path, **params), chunk

    assert stage("p", chunk="8", sigma=2) == ("p", (8, 8, 8)) and calls == [2]
    with pytest.raises(InputError, match=r"^stage: sigma=-1; expected a finite number > 0$"):
        stage("p", sigma=-1)  # refused by the stage before its body runs
    with pytest.raises(InputError, match="stage: chunk='4'"):
        stage("p", chunk="4")
    with pytest.raises(InputError, match="library: sigma=0"):
        library("p", sigma=0)
    assert calls == [2]
    assert set(specs_of(stage)) == {"sigma", "chunk"}


def test_a_spec_for_a_keyword_the_function_lacks_is_a_programming_error():
    with pytest.raises(TypeError, match="no keyword"):
        @checked(nothing=Flag())
        def f(*, something=True):
            return something
