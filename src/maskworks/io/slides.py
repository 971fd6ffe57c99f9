"""Multichannel slides (CODEX/PhenoCycler, OME-TIFF, QPTIFF) as (channels, y, x): channel names,
channel selection, lazy region reads.  The slide half of the I/O layer (volumes: :mod:`.volumes`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

# A source image up to this many bytes (all its channels, 256 MiB) is read into memory whole.
# Above it, it is read lazily: memory-mapped when its data are uncompressed and contiguous
# (a patch touches only its own pixels), else tile by tile (or strip by strip) through
# tifffile's Zarr view: a read decodes the tiles of the channel and region it asks for, and
# keeps nothing, so memory does not grow with the number of channels.
IN_MEMORY_BYTES = 2**28

ZARR_HEADERS = ("zarr.json", ".zattrs", ".zgroup", ".zarray")
FILE_TABLE_SUFFIXES = (".csv", ".tsv")
FILE_COLUMNS = ("path", "file", "filename", "file_name", "image")
TIFF_SUFFIXES = (".tif", ".tiff")

# Header names (case-insensitive, spaces = underscores) recognised in a channel table,
# in order of preference.
CHANNEL_NAME_COLUMNS = (
    "channel_name", "marker_name", "antibody_name", "marker", "antibody", "target", "name", "channel",
)


# ----------------------------------------------------------------------------- channels


def read_channel_names(path) -> list[str]:
    """Channel names, in channel order, from a text or table file.

    Accepted forms
    --------------
    - one name per line (``channels.txt``); blank lines and lines starting with ``#``
      are skipped;
    - a table with a header row, tab-separated (any extension) or comma-separated
      (``.csv``), one row per channel in channel order, like an antibodies TSV
      (``version  channel_id  antibody_name ...``): the names come from the first
      column called one of ``channel_name``, ``marker_name``, ``antibody_name``,
      ``marker``, ``antibody``, ``target``, ``name``, ``channel``
      (case-insensitive);
    - one name per line under a single header word from that list.

    Raises
    ------
    InputError
        Missing or empty file, a table without a recognised name column, or a
        row too short to hold it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: channel names file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#x} at position {exc.start}); "
                         "save the channel names file as UTF-8") from None
    lines = [ln.rstrip("\r\n") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{path}: no channel names (expected one per line, or a table with a header)")
    sep = "\t" if "\t" in lines[0] else "," if path.suffix.lower() == ".csv" and "," in lines[0] else None
    if sep is None:
        first = _column_key(lines[0])
        return [ln.strip() for ln in (lines[1:] if first in CHANNEL_NAME_COLUMNS else lines)]
    header = [_column_key(h) for h in lines[0].split(sep)]
    col = next((header.index(c) for c in CHANNEL_NAME_COLUMNS if c in header), None)
    if col is None:
        raise InputError(
            f"{path}: table header {lines[0].split(sep)} has no channel-name column; "
            f"name one of {', '.join(CHANNEL_NAME_COLUMNS)} (or give one name per line)"
        )
    names = []
    for n, ln in enumerate(lines[1:], start=2):
        fields = ln.split(sep)
        if len(fields) <= col:
            raise InputError(f"{path}: line {n} {ln!r} has no column {lines[0].split(sep)[col]!r}")
        names.append(fields[col].strip())
    if not names:
        raise InputError(f"{path}: the table has a header but no rows")
    return names


def _column_key(text: str) -> str:
    return text.strip().strip('"').lower().replace(" ", "_")


def select_channels(names, nuclear_channel, wholecell_channels, *, what="the channel names") -> tuple[int, list[int]]:
    """Indices of the nuclear channel and of the whole-cell channel(s) by name.

    Names match exactly, else case-insensitively.  ``wholecell_channels`` is a
    name, a comma-separated string of names or a list.

    Raises
    ------
    InputError
        A name that is missing (the message lists the available names) or that
        occurs more than once.
    """
    names = [str(n) for n in names]
    if isinstance(wholecell_channels, str):
        wholecell_channels = [w for w in wholecell_channels.split(",")]
    wanted = [str(w).strip() for w in (wholecell_channels or []) if str(w).strip()]
    if not wanted:
        raise InputError("wholecell_channels is empty: give at least one whole-cell (membrane) channel name")

    def index(name):
        hits = [i for i, n in enumerate(names) if n == name]
        if not hits:
            hits = [i for i, n in enumerate(names) if n.lower() == name.lower()]
        if not hits:
            raise InputError(f"channel {name!r} not found in {what}; available: {', '.join(names)}")
        if len(hits) > 1:
            raise InputError(f"channel {name!r} occurs {len(hits)} times in {what} (channels {hits}); "
                             "names must be unique to select by name")
        return hits[0]

    return index(str(nuclear_channel).strip()), [index(w) for w in wanted]


@dataclass
class MultichannelImage:
    """A (channels, y, x) view of a multichannel TIFF, read whole or lazily.

    ``data`` is the series as stored (NumPy array when read into memory, a Zarr
    array over the TIFF otherwise); ``channel_axis``, ``y_axis`` and ``x_axis``
    index its axes (``channel_axis`` None: a single-channel image).
    """

    data: object
    axes: str
    channel_axis: int | None
    y_axis: int
    x_axis: int
    path: Path | None = None
    channel_names: list | None = None  # from OME-XML, when the file has them
    mpp: float | None = None  # microns per pixel (x), when the file says
    _handle: object = None

    @property
    def n_channels(self) -> int:
        return 1 if self.channel_axis is None else int(self.data.shape[self.channel_axis])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[self.y_axis]), int(self.data.shape[self.x_axis])

    @property
    def lazy(self) -> bool:
        return not isinstance(self.data, np.ndarray) or isinstance(self.data, np.memmap)

    def region(self, channel: int, ys: slice, xs: slice) -> np.ndarray:
        """One channel's (y, x) region as a NumPy array.  When lazy, only the TIFF tiles or strips
        of that channel that the region touches are decoded, and nothing is kept after the read."""
        idx = [slice(None)] * len(self.data.shape)
        idx[self.y_axis], idx[self.x_axis] = ys, xs
        if self.channel_axis is not None:
            idx[self.channel_axis] = int(channel)
        out = np.asarray(self.data[tuple(idx)])
        return out.T if self.x_axis < self.y_axis else out

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_multichannel(path, *, channel_axis=None, lazy=None) -> MultichannelImage:
    """Open a multichannel slide as (channels, y, x).

    Parameters
    ----------
    path : str or Path
        One of:

        - a TIFF, OME-TIFF or Akoya QPTIFF (pyramids: the full-resolution level is used);
          channel names from the OME-XML or the QPTIFF's per-channel ``Biomarker`` (else
          ``Name``) description, the pixel size from ``PhysicalSizeX``, the resolution tags
          or the QPTIFF's ``PixelSizeMicrons``;
        - an OME-Zarr image (0.4 or 0.5; level 0; a ``c`` axis and ``y``, ``x``, other axes of
          length 1), channel names from ``omero.channels[].label``, pixel size from the
          level's scale;
        - one file per channel: a folder of single-channel TIFFs (in natural order of their
          names, e.g. HuBMAP's raw layout), or a ``.csv``/``.tsv`` table of files with a
          ``path`` (or ``file``) column and optionally a channel name column (as in
          :func:`read_channel_names`; default the file names without extension); paths
          relative to the table's folder.
    channel_axis : int or str, optional
        The channel axis, as an index into the file's series axes or as its
        tifffile axis letter (``"C"``, ``"Q"``, ``"I"``, ``"S"``, ...).  Default:
        the only axis other than Y and X of length > 1 (length-1 axes are
        squeezed); none means a single-channel image.
    lazy : bool, optional
        Read lazily instead of into memory: memory-mapped when the data are
        uncompressed and contiguous, else through tifffile's Zarr view of the
        file, which decodes only the tiles (or strips) a region touches and
        keeps none of them: memory is that of the region read, whatever the
        number of channels.  Default: lazily when the series holds more than
        ``IN_MEMORY_BYTES`` bytes.

    Returns
    -------
    MultichannelImage
        Close it (or use it as a context manager) when lazy.
    """
    import tifffile

    path = Path(path)
    if path.is_dir():
        if any((path / m).is_file() for m in ZARR_HEADERS):
            return _open_zarr_slide(path, channel_axis)
        return _open_channel_files(path, _channel_tiffs(path), lazy)
    if path.suffix.lower() in FILE_TABLE_SUFFIXES and path.is_file():
        return _open_channel_files(path, _file_table(path), lazy)
    if not path.is_file():
        raise InputError(f"{path}: no such image file or folder")
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as TIFF ({type(exc).__name__}: {exc})") from exc
    try:
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        if "Y" not in axes or "X" not in axes:
            raise InputError(f"{path}: series axes {axes!r} (shape {shape}) have no Y and X")
        cax = _channel_axis(path, axes, shape, channel_axis)
        nbytes = int(np.prod(shape)) * np.dtype(series.dtype).itemsize
        lazy = nbytes > IN_MEMORY_BYTES if lazy is None else bool(lazy)
        names, mpp = _ome_channels(tif.ome_metadata, axes, shape, cax)
        qpi_mpp = None
        if names is None and tif.pages.first.is_qpi and cax == 0:
            names, qpi_mpp = _qptiff_channels(series)
        if mpp is None:
            mpp = _tiff_mpp(tif) or qpi_mpp
        data, handle = (_lazy_data(path, series, axes, shape, cax) if lazy else None), None
        if data is None:
            data = series.asarray(level=0) if len(series.levels) > 1 else series.asarray()
        if data is not None and not isinstance(data, np.ndarray):
            handle = tif
        else:
            tif.close()
        if any(s < 1 for s in data.shape):
            raise InputError(f"{path}: empty image of shape {tuple(data.shape)}")
    except BaseException:
        tif.close()
        raise
    return MultichannelImage(data, axes, cax, axes.index("Y"), axes.index("X"), path, names, mpp, handle)


def slide_pixels(path) -> int:
    """Pixels (y x x) of a slide that :func:`open_multichannel` opens, from its header alone (TIFF
    tags, Zarr metadata, the first file of one file per channel): what a job's memory request is
    sized by."""
    import tifffile

    path = Path(path)
    if path.is_dir() and any((path / m).is_file() for m in ZARR_HEADERS):
        from . import ngff

        im = ngff.open_image(path, 0)
        axes = [a.lower() for a in im.axes]
        return int(im.array.shape[axes.index("y")]) * int(im.array.shape[axes.index("x")])
    if path.is_dir():
        path = _channel_tiffs(path)[0][1]
    elif path.suffix.lower() in FILE_TABLE_SUFFIXES:
        path = _file_table(path)[0][1]
    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        return int(series.shape[series.axes.index("Y")]) * int(series.shape[series.axes.index("X")])


def channel_files(path) -> list[Path]:
    """The files a one-file-per-channel slide is read from (a folder's TIFFs, a table's listed files),
    so that a workflow reruns when one of them changes; [] for a single-file or OME-Zarr slide."""
    path = Path(path)
    if path.is_dir() and not any((path / m).is_file() for m in ZARR_HEADERS):
        return [p for _, p in _channel_tiffs(path)]
    if path.suffix.lower() in FILE_TABLE_SUFFIXES and path.is_file():
        return [p for _, p in _file_table(path)]
    return []


def _lazy_data(path, series, axes, shape, cax):
    """A memory map of the series, or a Zarr array over its tiles/strips (decoded on read, never
    cached), or None (then it is read whole)."""
    import logging

    import tifffile

    try:
        mm = tifffile.memmap(str(path), mode="r", series=0, level=0)
        return mm.reshape(shape) if tuple(mm.shape) != tuple(shape) else mm
    except (ValueError, OSError):
        pass
    try:
        import zarr

        arr = zarr.open(series.aszarr(level=0), mode="r")
        if tuple(arr.shape) == tuple(shape):
            return arr
    except Exception as exc:  # an old zarr or an unusual layout: fall back to a whole read
        logging.getLogger("maskworks").warning("%s: no tile-lazy view (%s: %s): read whole", path,
                                               type(exc).__name__, exc)
        return None
    logging.getLogger("maskworks").warning("%s: the Zarr view's shape differs from the series (axes %s): "
                                           "read whole", path, axes)
    return None


def _channel_axis(path, axes: str, shape, channel_axis):
    if channel_axis not in (None, ""):
        if isinstance(channel_axis, str) and not channel_axis.lstrip("-").isdigit():
            if channel_axis.upper() not in axes:
                raise InputError(f"{path}: channel_axis={channel_axis!r} is not one of the series axes {axes!r}")
            cax = axes.index(channel_axis.upper())
        else:
            cax = int(channel_axis)
            if not -len(axes) <= cax < len(axes):
                raise InputError(f"{path}: channel_axis={channel_axis} is out of range for axes {axes!r}")
            cax %= len(axes)
        if axes[cax] in "YX":
            raise InputError(f"{path}: channel_axis={channel_axis!r} names the {axes[cax]} axis")
        rest = [a for i, a in enumerate(axes) if i != cax and a not in "YX" and shape[i] > 1]
        if rest:
            raise InputError(f"{path}: axes {axes!r} shape {shape}: besides the channel axis, "
                             f"{rest} have more than one plane; give a 2-D multichannel image")
        return cax
    others = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] > 1]
    if len(others) > 1:
        raise InputError(f"{path}: axes {axes!r} shape {shape} have several non-spatial axes; "
                         "set channel_axis (an index or a letter such as 'C')")
    return others[0] if others else None


def _ome_channels(xml, axes, shape, cax):
    """Channel names and PhysicalSizeX (in µm) from OME-XML, when present and consistent."""
    if not xml:
        return None, None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None, None
    names = [ch.get("Name") for ch in pixels if ch.tag.endswith("Channel")]
    n = 1 if cax is None else shape[cax]
    names = names if len(names) == n and all(names) else None
    mpp = None
    size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
    if size:
        factor = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
        mpp = float(size) * factor if factor else None
    return names, mpp


def _tiff_mpp(tif):
    """Microns per pixel from the TIFF resolution tags, when the unit is centimetre or inch."""
    page = tif.pages[0]
    res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if res is None or unit is None or res.value[0] <= 0:
        return None
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre in µm
    return per_unit * res.value[1] / res.value[0] if per_unit else None


# ----------------------------------------------------------------------------- other layouts


def _qptiff_channels(series):
    """Channel names (``Biomarker``, else ``Name``) and ``PixelSizeMicrons`` from the XML that Akoya
    (PerkinElmer) scanners write in each channel page's ImageDescription of a QPTIFF."""
    import re
    import xml.etree.ElementTree as ET

    names, mpp = [], None
    for page in series.pages:
        text = re.sub(r"^\s*<\?xml[^>]*\?>", "", getattr(page, "description", "") or "")
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            return None, None
        name = next((el.text.strip() for tag in ("Biomarker", "Name") for el in root.iter(tag)
                     if el.text and el.text.strip()), None)
        names.append(name)
        size = next((el.text for el in root.iter("PixelSizeMicrons") if el.text), None)
        if mpp is None and size:
            try:
                mpp = float(size)
            except ValueError:
                pass
    return (names if names and all(names) else None), mpp


class _ChannelFiles:
    """Single-channel images of one slide as a lazy (channels, y, x) array: ``[c, ys, xs]`` reads a
    region of file ``c`` (tile-lazy as :func:`open_multichannel` reads a TIFF)."""

    def __init__(self, images):
        self.images = images
        self.shape = (len(images), *images[0].shape)
        self.dtype = np.dtype(images[0].data.dtype)

    def __getitem__(self, key):
        c, ys, xs = key
        return self.images[int(c)].region(0, ys, xs)

    def close(self):
        for im in self.images:
            im.close()


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return path.stem


def _channel_tiffs(folder: Path) -> list[tuple[str, Path]]:
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES)
                    and not p.name.startswith(".")), key=lambda p: _natural_key(p.name))
    if not files:
        raise InputError(f"{folder}: a folder that is neither an OME-Zarr image nor holds one TIFF per channel "
                         f"(no .tif/.tiff file in it)")
    return [(_stem(p), p) for p in files]


def _file_table(table: Path) -> list[tuple[str, Path]]:
    import csv

    try:
        text = table.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{table}: not UTF-8 text; save the table of channel files as UTF-8") from None
    sep = "\t" if table.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=sep))
    header = {_column_key(k): k for k in (rows[0].keys() if rows else [])}
    path_col = next((header[c] for c in FILE_COLUMNS if c in header), None)
    if path_col is None:
        raise InputError(f"{table}: a table of channel files needs a column {' or '.join(FILE_COLUMNS[:2])!r} "
                         f"(its header is {list(header.values()) or 'empty'})")
    name_col = next((header[c] for c in CHANNEL_NAME_COLUMNS if c in header and header[c] != path_col), None)
    out = []
    for n, row in enumerate(rows, start=2):
        value = (row.get(path_col) or "").strip()
        if not value:
            raise InputError(f"{table}: line {n} has an empty {path_col!r}")
        p = Path(value) if Path(value).is_absolute() else table.parent / value
        name = (row.get(name_col) or "").strip() if name_col else ""
        out.append((name or _stem(p), p))
    if not out:
        raise InputError(f"{table}: a table of channel files without rows")
    return out


def _open_channel_files(source: Path, files, lazy) -> MultichannelImage:
    images = []
    lazy = True if lazy is None else lazy  # each file's size says nothing of the slide's: never read whole
    try:
        for _, p in files:
            img = open_multichannel(p, lazy=lazy)
            images.append(img)
            if img.n_channels != 1:
                raise InputError(f"{p}: {img.n_channels} channels (axes {img.axes!r}), but {source} lists one "
                                 "file per channel; each file must hold one channel")
            if img.shape != images[0].shape or img.data.dtype != images[0].data.dtype:
                raise InputError(f"{p}: {img.shape} pixels of {img.data.dtype}, but {files[0][1]} has "
                                 f"{images[0].shape} of {images[0].data.dtype}; the channels of one slide "
                                 "must match")
    except BaseException:
        for img in images:
            img.close()
        raise
    data = _ChannelFiles(images)
    return MultichannelImage(data, "CYX", 0, 1, 2, source, [n for n, _ in files], images[0].mpp, data)


def _open_zarr_slide(path: Path, channel_axis) -> MultichannelImage:
    from . import ngff
    from .volumes import convert_length

    im = ngff.open_image(path, 0)
    axes = [a.lower() for a in im.axes]
    if "y" not in axes or "x" not in axes:
        raise InputError(f"{path}: OME-Zarr axes {axes} have no y and x")
    c = axes.index(str(channel_axis).lower()) if channel_axis not in (None, "") and str(channel_axis).lower() in axes \
        else (axes.index("c") if "c" in axes else None)
    if channel_axis not in (None, "") and (c is None or axes[c] != str(channel_axis).lower()):
        raise InputError(f"{path}: channel_axis={channel_axis!r} is not one of the OME-Zarr axes {axes}")
    y, x = axes.index("y"), axes.index("x")
    others = [i for i in range(len(axes)) if i not in (c, y, x)]
    deep = [f"{axes[i]}={im.array.shape[i]}" for i in others if im.array.shape[i] > 1]
    if deep:
        raise InputError(f"{path}: axes {axes} shape {tuple(im.array.shape)}: {', '.join(deep)} planes; "
                         "a slide has one plane per channel")
    order = ([c] if c is not None else []) + [y, x]
    data = ngff.View(im.array, order, {i: 0 for i in others})
    ome, _ = ngff._ome(im.attrs)
    labels = [ch.get("label") for ch in (ome.get("omero") or {}).get("channels", []) if isinstance(ch, dict)]
    n = data.shape[0] if c is not None else 1
    names = labels if len(labels) == n and all(labels) else None
    mpp = None
    if im.unit:
        try:
            mpp = convert_length([im.scale[x]], im.unit, "micrometer")[0]
        except Exception:  # noqa: BLE001 - a unit that is not a length: the pixel size stays unknown
            mpp = None
    if any(s < 1 for s in data.shape):
        raise InputError(f"{path}: empty image of shape {tuple(data.shape)}")
    if c is None:
        return MultichannelImage(data, "YX", None, 0, 1, path, names, mpp)
    return MultichannelImage(data, "CYX", 0, 1, 2, path, names, mpp)

