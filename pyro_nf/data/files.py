"""Load the user's own data from ``.npy``, ``.npz`` or ``.csv`` files, with messages that say what is wrong where.

Two kinds of data come out:

* **vectors**: a float array of shape ``(N, D)`` (``N`` samples of ``D``
  features), from a CSV (one sample a row, an optional header row of column
  names) or a 2D ``.npy``/``.npz`` array;
* **images**: discrete pixel values of shape ``(N, C, H, W)`` (a 3D array
  ``(N, H, W)`` gets one channel; ``(N, H, W, C)`` with ``C`` in 1, 3, 4 is
  moved to channels first), integers in ``0 .. n_levels - 1``.

Every problem raises :class:`DataFileError` (a :class:`ValueError`) whose
message names the file and, where it applies, the row and column (counted
from 1, as a spreadsheet shows them; the header row of a CSV is row 1).
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".npz", ".csv")
"""The file types :func:`load_file` reads."""

_SPLIT_KEYS = ("train", "val", "test")
_DATA_KEYS = ("data", "x", "X", "arr_0")


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file and the place."""


@dataclass(frozen=True)
class FileData:
    """Arrays read from one file.

    Fields:

    - ``path``: the file.
    - ``arrays``: ``{"data": array}``, or ``{"train": ..., "val": ..., "test": ...}``
      (``val``/``test`` optional) for an ``.npz`` holding splits.
    - ``columns``: column names from a CSV header, else None.
    """

    path: Path
    arrays: dict[str, np.ndarray]
    columns: tuple[str, ...] | None = None


def is_data_file(name: str) -> bool:
    """Whether ``name`` looks like a path to a data file (by its suffix), rather than a dataset name."""
    return Path(name).suffix.lower() in SUFFIXES


def load_file(path: str | Path) -> FileData:
    """Read a ``.npy``, ``.npz`` or ``.csv`` file into numeric arrays, without checking their shape.

    Args:
        path: the file.

    Returns:
        The arrays (see :class:`FileData`).

    Raises:
        DataFileError: a missing, empty or unreadable file, a CSV cell that is
            not a number, a ragged CSV row, a non-numeric or object array, or an
            ``.npz`` whose arrays cannot be told apart.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = Path(tmp, "points.csv").write_text("a,b\\n1,2\\n3,4\\n")
        ...     data = load_file(Path(tmp, "points.csv"))
        >>> data.arrays["data"].tolist(), data.columns
        ([[1.0, 2.0], [3.0, 4.0]], ('a', 'b'))
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataFileError(f"{path}: expected a .npy, .npz or .csv file, got a {suffix or 'suffix-less'} file")
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    if path.is_dir():
        raise DataFileError(f"{path}: expected a file, got a directory")
    if path.stat().st_size == 0:
        raise DataFileError(f"{path}: the file is empty")
    if suffix == ".csv":
        array, columns = _read_csv(path)
        return FileData(path, {"data": array}, columns)
    if suffix == ".npy":
        return FileData(path, {"data": _numeric(path, _load_npy(path), None)})
    return FileData(path, _read_npz(path))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error) or "pickled" in str(error).lower():
            raise DataFileError(
                f"{path}: holds Python objects (a pickled object array); save a numeric array instead"
            ) from None
        raise DataFileError(f"{path}: not a readable .npy file ({error})") from None
    except (OSError, EOFError) as error:
        raise DataFileError(f"{path}: not a readable .npy file ({error})") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataFileError(f"{path}: not a readable .npz file ({error})") from None
    with archive:
        keys = list(archive.files)
        if not keys:
            raise DataFileError(f"{path}: the archive holds no arrays")
        try:
            if "train" in keys:
                return {key: _numeric(path, archive[key], key) for key in _SPLIT_KEYS if key in keys}
            if len(keys) == 1:
                return {"data": _numeric(path, archive[keys[0]], keys[0])}
            for key in _DATA_KEYS:
                if key in keys:
                    return {"data": _numeric(path, archive[key], key)}
        except ValueError as error:
            if isinstance(error, DataFileError):
                raise
            raise DataFileError(f"{path}: holds Python objects (a pickled object array); save numeric arrays") from None
    raise DataFileError(
        f"{path}: cannot tell which array holds the data among {', '.join(keys)}; "
        f"name it 'data' (or give 'train' and optionally 'val' / 'test' splits)"
    )


def _numeric(path: Path, array: np.ndarray, key: str | None) -> np.ndarray:
    where = f"{path}" + (f" (array '{key}')" if key else "")
    if array.dtype == object:
        raise DataFileError(f"{where}: holds Python objects; save a numeric array")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.number)):
        raise DataFileError(f"{where}: expected numbers, got an array of dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise DataFileError(f"{where}: expected real numbers, got complex dtype {array.dtype}")
    if array.size == 0:
        raise DataFileError(f"{where}: the array is empty (shape {array.shape})")
    return array


def _parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _csv_rows(path: Path, limit: int | None = None) -> list[tuple[int, list[str]]]:
    """The non-empty rows of a CSV (the first ``limit`` of them), numbered from 1, cells stripped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            sample = handle.read(65536)
            handle.seek(0)
            try:
                dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            rows: list[tuple[int, list[str]]] = []
            for number, row in enumerate(csv.reader(handle, dialect), start=1):
                if any(cell.strip() for cell in row):
                    rows.append((number, [cell.strip() for cell in row]))
                    if limit is not None and len(rows) >= limit:
                        break
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not a text CSV file ({error.reason} at byte {error.start})") from None
    if not rows:
        raise DataFileError(f"{path}: the file holds no rows")
    return rows


def _is_header(row: list[str]) -> bool:
    return all(_parse_number(cell) is None for cell in row)


def csv_columns(path: str | Path) -> tuple[str, ...] | None:
    """The column names of a CSV's header row (None without one), reading the first row only.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = Path(tmp, "points.csv").write_text("height,weight\\n1,2\\n")
        ...     csv_columns(Path(tmp, "points.csv"))
        ('height', 'weight')
    """
    first = _csv_rows(Path(path), limit=1)[0][1]
    return tuple(first) if _is_header(first) else None


def _read_csv(path: Path) -> tuple[np.ndarray, tuple[str, ...] | None]:
    rows = _csv_rows(path)
    columns: tuple[str, ...] | None = None
    first_number, first = rows[0]
    if _is_header(first):
        columns = tuple(first)
        rows = rows[1:]
        if not rows:
            raise DataFileError(f"{path}: the file holds a header row ({', '.join(columns)}) but no data rows")
    width = len(columns) if columns is not None else len(rows[0][1])
    reference = first_number if columns is not None else rows[0][0]
    values = np.empty((len(rows), width), dtype=np.float64)
    for index, (number, row) in enumerate(rows):
        if len(row) != width:
            raise DataFileError(
                f"{path}, row {number}: expected {width} columns (as in row {reference}), got {len(row)}"
            )
        for column, cell in enumerate(row):
            value = _parse_number(cell)
            if value is None:
                raise DataFileError(
                    f"{path}, row {number}, column {column_label(column, columns)}: expected a number, got {cell!r}"
                )
            values[index, column] = value
    bad = ~np.isfinite(values)
    if bad.any():
        index, column = (int(i) for i in np.argwhere(bad)[0])
        raise DataFileError(
            f"{path}, row {rows[index][0]}, column {column_label(column, columns)}: "
            f"expected a finite number, got {_describe(values[index, column])}; remove or fill in missing values"
        )
    return values, columns


def column_label(column: int, columns: tuple[str, ...] | None) -> str:
    """How messages name a column: counted from 1, with its CSV header name when there is one."""
    return f"{column + 1} ({columns[column]!r})" if columns is not None else str(column + 1)


def _describe(value: float) -> str:
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def as_vectors(data: FileData) -> dict[str, np.ndarray]:
    """Check that every array is ``(N, D)`` finite numbers and return them as float64.

    Raises:
        DataFileError: for a 1D array, an array of more than two dimensions,
            NaN or inf entries (naming the row and column), or splits whose
            feature counts differ.

    Example::

        >>> data = FileData(Path("x.npy"), {"data": np.arange(6).reshape(3, 2)})
        >>> as_vectors(data)["data"].dtype
        dtype('float64')
    """
    out: dict[str, np.ndarray] = {}
    for key, array in data.arrays.items():
        where = _where(data, key)
        if array.ndim == 1:
            raise DataFileError(
                f"{where}: expected a 2D array (samples, features), got a 1D array of shape {array.shape}; "
                f"for one feature save it as shape ({array.shape[0]}, 1)"
            )
        if array.ndim != 2:
            raise DataFileError(
                f"{where}: expected a 2D array (samples, features) for a vector flow, got shape {array.shape}; "
                "use an image flow (glow, realnvp-multiscale) for images"
            )
        values = array.astype(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            name = column_label(column, data.columns)
            raise DataFileError(
                f"{where}, row {row + 1}, column {name}: expected a finite number, got {_describe(values[row, column])}"
            )
        out[key] = values
    _check_same_trailing(data, out, "features")
    return out


def as_images(data: FileData, *, n_levels: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Check that every array holds images of discrete pixel values; return them as ``(N, C, H, W)`` float64.

    Accepted shapes: ``(N, H, W)`` (one channel), ``(N, C, H, W)`` and
    ``(N, H, W, C)`` with ``C`` in 1, 3 or 4. Pixel values must be integers in
    ``0 .. n_levels - 1``; without ``n_levels``, it is 256 for ``uint8`` arrays
    and otherwise the largest value plus one.

    Returns:
        The arrays and the number of levels.

    Raises:
        DataFileError: for a wrong shape, NaN or inf, negative or non-integer
            values, or values at or above ``n_levels`` (naming the first such
            sample and pixel).

    Example::

        >>> data = FileData(Path("images.npy"), {"data": np.zeros((5, 8, 8), dtype=np.uint8)})
        >>> arrays, levels = as_images(data)
        >>> arrays["data"].shape, levels
        ((5, 1, 8, 8), 256)
    """
    out: dict[str, np.ndarray] = {}
    for key, array in data.arrays.items():
        where = _where(data, key)
        if array.ndim == 3:
            array = array[:, None]
        elif array.ndim == 4:
            if array.shape[1] not in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
                array = np.moveaxis(array, -1, 1)
            elif array.shape[1] not in (1, 3, 4):
                raise DataFileError(
                    f"{where}: expected images of shape (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4 channels, "
                    f"got shape {array.shape}"
                )
        else:
            raise DataFileError(
                f"{where}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C), "
                f"got a {array.ndim}D array of shape {array.shape}"
            )
        values = array.astype(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataFileError(f"{where}, sample {index[0] + 1}, pixel {index[1:]}: got {_describe(values[index])}")
        bad = (values < 0) | (values != np.round(values))
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataFileError(
                f"{where}, sample {index[0] + 1}, pixel {index[1:]}: expected integer pixel values >= 0, "
                f"got {values[index]!r}; quantize the images (e.g. round(255 * x) for values in [0, 1])"
            )
        out[key] = values
    if n_levels is None:
        if all(array.dtype == np.uint8 for array in data.arrays.values()):
            n_levels = 256
        else:
            n_levels = int(max(array.max() for array in out.values())) + 1
    if n_levels < 2:
        raise DataFileError(f"{data.path}: expected at least 2 pixel levels, got {n_levels} (all pixels are 0?)")
    for key, values in out.items():
        if values.max() >= n_levels:
            index = tuple(int(i) for i in np.argwhere(values >= n_levels)[0])
            raise DataFileError(
                f"{_where(data, key)}, sample {index[0] + 1}, pixel {index[1:]}: expected values below "
                f"n_levels = {n_levels}, got {values[index]:g}"
            )
    _check_same_trailing(data, out, "image shape")
    return out, n_levels


def _where(data: FileData, key: str) -> str:
    return f"{data.path}" if key == "data" else f"{data.path} (array '{key}')"


def _check_same_trailing(data: FileData, arrays: dict[str, np.ndarray], what: str) -> None:
    shapes = {key: array.shape[1:] for key, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"'{key}' {shape}" for key, shape in shapes.items())
        raise DataFileError(f"{data.path}: the splits disagree in {what}: {described}")
