"""What every stage accepts: one checked specification per parameter.

A library function declares the type and range of its keywords with :func:`checked`; every call
(from Python, from the CLI, from a Snakemake script) then goes through the same check before any
work starts, and a bad value is an :class:`~maskworks.io.InputError` naming the function, the
keyword, the value and what was expected.  The file-level stage runners declare the same keywords
by inheriting the specifications of the library functions they call, so they refuse a bad value
before reading or writing anything.  Each specification also renders itself as the JSON-schema
fragment that ``config/schema.yaml`` must hold for the key of the same name (a test compares them),
so library, CLI and config never disagree on what is allowed.

Bounds that depend on the data (a sigma against the volume, a patch against the image) are checked
by the functions themselves, with :func:`bad_value` for the same message.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .volumes import InputError

__all__ = ["Choice", "Choices", "Flag", "Length", "Mapping", "Number", "NumberList", "Scale", "Size", "Text", "bad_value",
           "checked", "per_axis", "specs_of"]


def bad_value(owner: str, name: str, value, expected: str) -> InputError:
    """The error for keyword ``name`` of ``owner`` given ``value`` where ``expected`` was needed."""
    return InputError(f"{owner}: {name}={value!r}; expected {expected}")


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class _Spec:
    nullable: bool = False

    def __call__(self, owner, name, value):
        if value is None:
            if self.nullable:
                return None
            raise bad_value(owner, name, value, self.expected())
        return self._check(owner, name, value)

    def schema(self) -> dict:
        """The JSON-schema fragment (type and range keywords) that the config must hold."""
        node = self._schema()
        if self.nullable:
            if "oneOf" in node:
                node = {"oneOf": [{"type": "null"}, *node["oneOf"]]}
            else:
                node = {**node, "type": [node["type"], "null"]}
                if "enum" in node:
                    node["enum"] = [*node["enum"], None]
        return node

    def expected(self) -> str:
        text = self._expected()
        return f"{text}, or null" if self.nullable else text


@dataclass(frozen=True)
class Number(_Spec):
    """A finite integer or real number within bounds; ``words`` are strings accepted as well
    (``"otsu"``)."""

    integer: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    nullable: bool = False
    words: tuple = ()
    unit: str = ""

    def _check(self, owner, name, value):
        if isinstance(value, str) and value in self.words:
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise bad_value(owner, name, value, self.expected())
        v = float(value)
        if not math.isfinite(v) or (self.integer and v != int(v)) or not self._inside(v):
            raise bad_value(owner, name, value, self.expected())
        return int(v) if self.integer else (value if isinstance(value, int) else v)

    def _inside(self, v) -> bool:
        return ((self.minimum is None or v >= self.minimum) and (self.maximum is None or v <= self.maximum)
                and (self.exclusive_minimum is None or v > self.exclusive_minimum)
                and (self.exclusive_maximum is None or v < self.exclusive_maximum))

    def _bounds(self) -> str:
        lo = (("[", self.minimum) if self.minimum is not None else
              ("(", self.exclusive_minimum) if self.exclusive_minimum is not None else None)
        hi = ((self.maximum, "]") if self.maximum is not None else
              (self.exclusive_maximum, ")") if self.exclusive_maximum is not None else None)
        if lo and hi:
            return f" in {lo[0]}{_fmt(lo[1])}, {_fmt(hi[0])}{hi[1]}"
        if lo:
            return f" {'>=' if lo[0] == '[' else '>'} {_fmt(lo[1])}"
        if hi:
            return f" {'<=' if hi[1] == ']' else '<'} {_fmt(hi[0])}"
        return ""

    def _expected(self) -> str:
        text = ("an integer" if self.integer else "a finite number") + self._bounds()
        if self.unit:
            text += f" ({self.unit})"
        if self.words:
            text = " or ".join(repr(w) for w in self.words) + " or " + text
        return text

    def _schema(self) -> dict:
        node = {"type": "integer" if self.integer else "number"}
        for key, v in (("minimum", self.minimum), ("maximum", self.maximum),
                       ("exclusiveMinimum", self.exclusive_minimum), ("exclusiveMaximum", self.exclusive_maximum)):
            if v is not None:
                node[key] = v
        if self.words:
            return {"oneOf": [{"type": "string", "enum": list(self.words)}, node]}
        return node


@dataclass(frozen=True)
class NumberList(_Spec):
    """A list of numbers (each checked by ``item``) with a length in [min_items, max_items];
    ``increasing`` asks for values in increasing order (a range such as ``zoom_range``)."""

    item: Number
    min_items: int = 1
    max_items: int | None = None
    nullable: bool = False
    increasing: bool = False

    def _check(self, owner, name, value):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise bad_value(owner, name, value, self.expected())
        n = len(value)
        if n < self.min_items or (self.max_items is not None and n > self.max_items):
            raise bad_value(owner, name, value, self.expected())
        try:
            out = [self.item(owner, name, v) for v in value]
        except InputError:
            raise bad_value(owner, name, value, self.expected()) from None
        if self.increasing and any(b < a for a, b in zip(out, out[1:])):
            raise bad_value(owner, name, value, self.expected())
        return tuple(out) if isinstance(value, tuple) else out

    def _expected(self) -> str:
        if self.max_items == self.min_items:
            count = f"{self.min_items}"
        elif self.max_items is None:
            count = f"{self.min_items} or more"
        else:
            count = f"{self.min_items} to {self.max_items}"
        what = self.item.expected().replace("an integer", "integers").replace("a finite number", "finite numbers")
        return f"{count} {what}" + (", in increasing order" if self.increasing else "")

    def _schema(self) -> dict:
        node = {"type": "array", "items": self.item.schema(), "minItems": self.min_items}
        if self.max_items is not None:
            node["maxItems"] = self.max_items
        return node


@dataclass(frozen=True)
class Size(_Spec):
    """A size in voxels: one integer (a cube) or ``ndim`` integers (z, y, x), each >= minimum;
    as text (the command line) ``"64"`` or ``"32,64,64"`` (``"auto"`` or empty: None, where
    allowed).  Checked values are returned as ``ndim`` integers."""

    minimum: int = 1
    ndim: int = 3
    nullable: bool = False

    def __call__(self, owner, name, value):
        given = value
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("", "auto", "none", "null"):
                value = None
            else:
                try:
                    value = [int(v) for v in re.split(r"[,x\s]+", text) if v]
                except ValueError:
                    raise bad_value(owner, name, given, self.expected()) from None
        try:
            out = super().__call__(owner, name, value)
        except InputError:
            raise bad_value(owner, name, given, self.expected()) from None
        return out if out is None or isinstance(out, tuple) else (out,) * self.ndim

    def _check(self, owner, name, value):
        item = Number(integer=True, minimum=self.minimum)
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) not in (1, self.ndim):
                raise bad_value(owner, name, value, self.expected())
            try:
                out = [item(owner, name, v) for v in value]
            except InputError:
                raise bad_value(owner, name, value, self.expected()) from None
            return tuple(out) * (self.ndim if len(out) == 1 else 1)
        try:
            return item(owner, name, value)
        except InputError:
            raise bad_value(owner, name, value, self.expected()) from None

    def _expected(self) -> str:
        return f"an integer >= {self.minimum} or {self.ndim} of them (z, y, x voxels)"

    def _schema(self) -> dict:
        item = {"type": "integer", "minimum": self.minimum}
        return {"oneOf": [item, {"type": "array", "items": item, "minItems": self.ndim, "maxItems": self.ndim}]}


@dataclass(frozen=True)
class Length:
    """A physical length a user gave for a scale (``"80nm"``): converted to voxels per axis, from the
    volume's voxel size, by the stage that reads the volume (:meth:`voxels`)."""

    value: float
    unit: str

    def __str__(self) -> str:
        return f"{self.value:g} {self.unit}"

    def voxels(self, voxel_size, unit, what: str) -> tuple[float, ...]:
        from .volumes import convert_length, normalize_unit

        if normalize_unit(unit) is None:
            raise InputError(f"{what}={self}: the volume's voxel size {tuple(voxel_size)} has no length unit to "
                             "convert it with; give the voxel size and its unit (--voxel-size, --unit), or the "
                             "scale in voxels")
        (length,) = convert_length([self.value], self.unit, unit)
        return tuple(length / float(v) for v in voxel_size)


_LENGTH = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµμÅå]+)\s*$")


@dataclass(frozen=True)
class Scale(_Spec):
    """The scale of a filter or a structuring element: in voxels, one number (every axis) or three
    (z, y, x); or, where ``physical``, a length with its unit (``"80nm"``, ``"0.5 um"``), which the
    stage converts per axis from the volume's voxel size (a :class:`Length`).  Checked values are
    a number, a tuple of three, or a Length."""

    integer: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    physical: bool = False
    unit: str = "voxels"

    def _item(self) -> Number:
        return Number(integer=self.integer, minimum=self.minimum, maximum=self.maximum,
                      exclusive_minimum=self.exclusive_minimum, unit=self.unit)

    def _check(self, owner, name, value):
        from .volumes import normalize_unit

        if isinstance(value, Length):
            return value
        if isinstance(value, str) and self.physical:
            m = _LENGTH.match(value)
            if m and normalize_unit(m.group(2)) is not None and self._length_ok(float(m.group(1))):
                return Length(float(m.group(1)), normalize_unit(m.group(2)))
            raise bad_value(owner, name, value, self.expected())
        item = self._item()
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) != 3:
                raise bad_value(owner, name, value, self.expected())
            try:
                out = tuple(item(owner, name, v) for v in value)
            except InputError:
                raise bad_value(owner, name, value, self.expected()) from None
            return out
        try:
            return item(owner, name, value)
        except InputError:
            raise bad_value(owner, name, value, self.expected()) from None

    def _signed(self) -> bool:
        return self.minimum is not None and self.minimum < 0

    def _length_ok(self, value: float) -> bool:
        # a length is never 0 (0 is "off", given as a number); negative only where the scale may be
        return value > 0 or (self._signed() and value < 0)

    def _expected(self) -> str:
        text = f"{self._item().expected()}, or three of them (z, y, x)"
        return text + (", or a length with its unit such as '80nm' (converted per axis from the voxel size)"
                       if self.physical else "")

    def _schema(self) -> dict:
        item = self._item().schema()
        options = [item, {"type": "array", "items": item, "minItems": 3, "maxItems": 3}]
        if self.physical:
            sign = "-?" if self._signed() else ""
            options.append({"type": "string",
                            "pattern": rf"^\s*{sign}[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?\s*[A-Za-zµμÅå]+\s*$"})
        return {"oneOf": options}


def per_axis(value, integer: bool = False) -> tuple:
    """A scale (one number or three) as three numbers (z, y, x)."""
    values = tuple(value) if isinstance(value, (list, tuple, np.ndarray)) else (value,) * 3
    return tuple(int(v) for v in values) if integer else tuple(float(v) for v in values)


@dataclass(frozen=True)
class Choice(_Spec):
    """One of a fixed set of strings."""

    choices: tuple
    nullable: bool = False

    def _check(self, owner, name, value):
        if value not in self.choices:
            raise bad_value(owner, name, value, self.expected())
        return value

    def _expected(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def _schema(self) -> dict:
        return {"type": "string", "enum": list(self.choices)}


@dataclass(frozen=True)
class Choices(_Spec):
    """A list of strings, each one of ``choices``, at least ``min_items`` of them."""

    choices: tuple
    min_items: int = 1
    nullable: bool = False

    def _check(self, owner, name, value):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or len(value) < self.min_items \
                or any(v not in self.choices for v in value):
            raise bad_value(owner, name, value, self.expected())
        return list(value)

    def _expected(self) -> str:
        return f"{self.min_items} or more of " + ", ".join(repr(c) for c in self.choices)

    def _schema(self) -> dict:
        return {"type": "array", "items": {"type": "string", "enum": list(self.choices)}, "minItems": self.min_items}


@dataclass(frozen=True)
class Text(_Spec):
    """A string matching ``pattern``; ``what`` says in words what it is."""

    pattern: str = r"^.+$"
    what: str = "a non-empty string"
    nullable: bool = False

    def _check(self, owner, name, value):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not re.match(self.pattern, value):
            raise bad_value(owner, name, value, self.expected())
        return value

    def _expected(self) -> str:
        return self.what

    def _schema(self) -> dict:
        return {"type": "string", "pattern": self.pattern}


@dataclass(frozen=True)
class Mapping(_Spec):
    """A mapping of keyword arguments passed on to a library (None: an empty one)."""

    def __call__(self, owner, name, value):
        return {} if value is None else self._check(owner, name, value)

    def _check(self, owner, name, value):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad_value(owner, name, value, self.expected())
        return value

    def _expected(self) -> str:
        return "a mapping of keyword arguments (e.g. {\"key\": value})"

    def _schema(self) -> dict:
        return {"type": "object"}


@dataclass(frozen=True)
class Flag(_Spec):
    """True or False."""

    nullable: bool = False

    def _check(self, owner, name, value):
        if not isinstance(value, (bool, np.bool_)):
            raise bad_value(owner, name, value, self.expected())
        return bool(value)

    def _expected(self) -> str:
        return "true or false"

    def _schema(self) -> dict:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Device(Text):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a ``torch.device`` passes as it is."""

    def _check(self, owner, name, value):
        if type(value).__name__ == "device" and type(value).__module__.startswith("torch"):
            return value
        return super()._check(owner, name, value)


DEVICE = Device(r"^(auto|cpu|cuda(:[0-9]+)?)$", "'auto', 'cpu', 'cuda' or 'cuda:N'")


def specs_of(func) -> dict[str, Any]:
    """The parameter specifications a :func:`checked` function declares (inherited ones included)."""
    return dict(getattr(func, "params", {}))


def checked(*inherit, **specs):
    """Declare and enforce the type and range of a function's keywords.

    ``specs`` maps keyword names to specifications; ``inherit`` names other checked functions
    whose specifications apply to keywords of the same name (a stage runner that passes
    ``**params`` on to a library function).  The wrapped function checks every declared keyword
    it is given, inside ``**kwargs`` too, before its body runs.
    """
    def decorate(func):
        merged = {}
        for other in inherit:
            merged.update(specs_of(other))
        merged.update(specs)
        sig = inspect.signature(func)
        varkw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        unknown = set(specs) - set(sig.parameters)
        if unknown and varkw is None:
            raise TypeError(f"checked({func.__name__}): no keyword(s) {sorted(unknown)}")
        owner = func.__name__.removesuffix("_files")

        def check(arguments: dict) -> dict:
            extra = arguments.get(varkw, {}) if varkw else {}
            for name, spec in merged.items():
                if name in arguments and name != varkw and name in sig.parameters:
                    arguments[name] = spec(owner, name, arguments[name])
                elif name in extra:
                    extra[name] = spec(owner, name, extra[name])
            return arguments

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            check(bound.arguments)
            return func(*bound.args, **bound.kwargs)

        wrapper.params = merged
        return wrapper

    return decorate
