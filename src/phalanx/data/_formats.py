"""Readers for the file formats of `FileDataset`: listing a file's input splits, counting their
rows cheaply (headers and metadata only), and reading one split as a tuple of numpy arrays."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError

FORMATS = ("npy", "npz", "csv", "parquet")
_EXTENSIONS = {".npy": "npy", ".npz": "npz", ".csv": "csv", ".parquet": "parquet",
               ".pq": "parquet"}

Columns = Sequence[str | int] | None


def format_of(path: Path) -> str | None:
    """The format a file's extension names, or None for files that are not data."""
    return _EXTENSIONS.get(path.suffix.lower())


def _pyarrow_parquet():  # type: ignore[no-untyped-def]
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("format='parquet' needs pyarrow; install it with "
                          "`pip install pyarrow`") from exc
    return pq


def list_parts(path: Path, fmt: str, header: bool | None = None,
               delimiter: str = ",") -> list[tuple[int, int]]:
    """(part, rows) for each input split of one file: row groups for parquet, else the file."""
    if fmt == "parquet":
        meta = _pyarrow_parquet().ParquetFile(path).metadata
        return [(g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    if fmt == "npy":
        return [(0, _leading(np.load(path, mmap_mode="r").shape, path))]
    if fmt == "npz":
        return [(0, _npz_rows(path))]
    if fmt == "csv":
        return [(0, _csv_rows(path, header, delimiter))]
    raise ConfigError(f"format={fmt!r} is not one of {FORMATS}")


def _leading(shape: tuple[int, ...], path: Path) -> int:
    if not shape:
        raise ConfigError(f"{path} holds a 0-d array; a split needs a first (record) dimension")
    return int(shape[0])


def _npz_rows(path: Path) -> int:
    rows: set[int] = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, _ = read(f)
                rows.add(_leading(shape, path))
    if len(rows) > 1:
        raise ConfigError(f"{path} holds arrays with different first dimensions {sorted(rows)}; "
                          "every array of a split must have one row per record")
    return rows.pop() if rows else 0


def csv_has_header(path: Path, delimiter: str) -> bool:
    """True when the first line does not parse as numbers."""
    with open(path) as f:
        first = f.readline().strip()
    try:
        [float(v) for v in first.split(delimiter) if v.strip()]
    except ValueError:
        return True
    return False


def _csv_rows(path: Path, header: bool | None, delimiter: str) -> int:
    with open(path) as f:
        lines = sum(1 for line in f if line.strip())
    has_header = csv_has_header(path, delimiter) if header is None else header
    return max(0, lines - (1 if has_header else 0))


def read_part(path: Path, fmt: str, part: int, columns: Columns, header: bool | None,
              delimiter: str) -> tuple[np.ndarray, ...]:
    """One input split as a tuple of arrays sharing the first dimension."""
    if fmt == "npy":
        return (np.load(path),)
    if fmt == "npz":
        with np.load(path) as data:
            keys = list(columns) if columns is not None else list(data.files)
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise ConfigError(f"columns={keys} names arrays {missing} that {path} lacks; "
                                  f"it holds {data.files}")
            return tuple(data[str(k)] for k in keys)
    if fmt == "csv":
        return (_read_csv(path, columns, header, delimiter),)
    if fmt == "parquet":
        table = _pyarrow_parquet().ParquetFile(path).read_row_group(
            part, columns=None if columns is None else [str(c) for c in columns])
        return tuple(_column_to_numpy(table.column(i)) for i in range(table.num_columns))
    raise ConfigError(f"format={fmt!r} is not one of {FORMATS}")


def _read_csv(path: Path, columns: Columns, header: bool | None,
              delimiter: str) -> np.ndarray:
    has_header = csv_has_header(path, delimiter) if header is None else header
    names: list[str] = []
    if has_header:
        with open(path) as f:
            names = [v.strip() for v in f.readline().strip().split(delimiter)]
    usecols = None
    if columns is not None:
        usecols = []
        for c in columns:
            if isinstance(c, str):
                if c not in names:
                    raise ConfigError(f"columns={list(columns)} names {c!r}, which is not in the "
                                      f"header of {path}: {names}")
                usecols.append(names.index(c))
            else:
                usecols.append(int(c))
    data = np.genfromtxt(path, delimiter=delimiter, skip_header=1 if has_header else 0,
                         usecols=usecols, dtype=np.float64, ndmin=2)
    return data


def _column_to_numpy(column: object) -> np.ndarray:
    values = column.to_numpy(zero_copy_only=False)  # type: ignore[attr-defined]
    if values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
        return np.stack(values)  # list-typed columns (e.g. a feature vector per row)
    return values
