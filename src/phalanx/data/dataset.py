"""Datasets as lists of input splits (MapReduce's unit of work and Spark's partition).

A split is a tuple of arrays that share their first (record) dimension. `load_split(i)` reads a
split from its source and applies the per-record transform: that pair is the split's lineage, so a
split lost with its worker is rebuilt anywhere by calling `load_split` again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from . import _formats

Array = Any  # numpy.ndarray or torch.Tensor
Split = tuple[Array, ...]
Transform = Callable[..., Any]
PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def is_torch(x: object) -> bool:
    """True for a torch.Tensor, without importing torch."""
    return type(x).__module__.startswith("torch")


def nbytes(split: Split) -> int:
    """Bytes the arrays of a split hold."""
    return sum(int(a.element_size() * a.nelement()) if is_torch(a) else int(np.asarray(a).nbytes)
               for a in split)


class SplitDataset:
    """A dataset made of input splits; subclasses provide `split_sizes` and `_read_split`."""

    transform: Transform | None = None

    def split_sizes(self) -> list[int]:
        """Records in each split, in split order."""
        raise NotImplementedError

    def _read_split(self, i: int) -> Split:
        raise NotImplementedError

    @property
    def num_splits(self) -> int:
        return len(self.split_sizes())

    def __len__(self) -> int:
        return int(sum(self.split_sizes()))

    def offsets(self) -> np.ndarray:
        """Global index of each split's first record, plus the total at the end."""
        return np.concatenate([[0], np.cumsum(self.split_sizes(), dtype=np.int64)])

    def load_split(self, i: int) -> Split:
        """Read split `i` from its source and apply the per-record transform."""
        if not 0 <= i < self.num_splits:
            raise ConfigError(f"split index i={i} is out of range; this dataset has "
                              f"{self.num_splits} splits (0..{self.num_splits - 1})")
        split = self._read_split(i)
        return apply_transform(split, self.transform) if self.transform is not None else split

    def take(self, indices: Sequence[int] | np.ndarray,
             get_split: Callable[[int], Split] | None = None) -> Split:
        """The records at global `indices`, in that order, one array per field."""
        return take_records(self, np.asarray(indices, dtype=np.int64),
                            get_split or self.load_split)

    def __getitem__(self, indices: Sequence[int] | np.ndarray) -> Split:
        return self.take(indices)


def apply_transform(split: Split, transform: Transform) -> Split:
    """Run `transform(*fields_of_one_record)` on every record and stack the results by field."""
    n = len(split[0]) if split else 0
    if n == 0:
        return split
    rows = []
    for i in range(n):
        out = transform(*(a[i] for a in split))
        rows.append(out if isinstance(out, tuple) else (out,))
    width = {len(r) for r in rows}
    if len(width) != 1:
        raise ConfigError(f"transform returned tuples of different lengths {sorted(width)}; it "
                          "must return the same fields for every record")
    if is_torch(rows[0][0]):
        import torch
        return tuple(torch.stack([r[k] for r in rows]) for k in range(len(rows[0])))
    return tuple(np.stack([np.asarray(r[k]) for r in rows]) for k in range(len(rows[0])))


def take_records(dataset: SplitDataset, indices: np.ndarray,
                 get_split: Callable[[int], Split]) -> Split:
    offsets = dataset.offsets()
    total = int(offsets[-1])
    if indices.size and (indices.min() < 0 or indices.max() >= total):
        raise ConfigError(f"indices range {int(indices.min())}..{int(indices.max())} falls "
                          f"outside the dataset's {total} records")
    which = np.searchsorted(offsets, indices, side="right") - 1
    pieces: list[Split] = []
    positions: list[np.ndarray] = []
    for s in np.unique(which):
        mask = which == s
        split = get_split(int(s))
        local = indices[mask] - offsets[s]
        pieces.append(tuple(_index(a, local) for a in split))
        positions.append(np.flatnonzero(mask))
    if not pieces:
        first = get_split(0) if dataset.num_splits else ()
        return tuple(_index(a, np.empty(0, dtype=np.int64)) for a in first)
    if len(pieces) == 1:
        return pieces[0]
    order = np.argsort(np.concatenate(positions), kind="stable")
    return tuple(_index(_concat([p[k] for p in pieces]), order) for k in range(len(pieces[0])))


def _index(a: Array, idx: np.ndarray) -> Array:
    if is_torch(a):
        import torch
        return a[torch.from_numpy(idx)]
    return a[idx]


def _concat(arrays: list[Array]) -> Array:
    if is_torch(arrays[0]):
        import torch
        return torch.cat(arrays)
    return np.concatenate(arrays)


class ArrayDataset(SplitDataset):
    """In-memory arrays (numpy or torch, same first dimension) cut into `num_splits` contiguous
    splits (default: min(len, 64)) so map_reduce can spread them over ranks."""

    def __init__(self, *arrays: Array, num_splits: int | None = None,
                 transform: Transform | None = None) -> None:
        if not arrays:
            raise ConfigError("ArrayDataset() needs at least one array, e.g. ArrayDataset(X, y)")
        lengths = [len(a) for a in arrays]
        if len(set(lengths)) != 1:
            raise ConfigError(f"ArrayDataset arrays have first dimensions {lengths}; they must "
                              "all have one row per record")
        self.arrays: Split = tuple(a if is_torch(a) else np.asarray(a) for a in arrays)
        n = lengths[0]
        k = min(n, 64) if num_splits is None else num_splits
        if isinstance(k, bool) or not isinstance(k, int) or k < (1 if n else 0) or k > max(n, 1):
            raise ConfigError(f"num_splits={num_splits!r} must be an integer in 1..{max(n, 1)} "
                              f"(the number of records)")
        self._bounds = [i * n // max(k, 1) for i in range(k + 1)] if n else [0]
        self.transform = transform
        self.is_torch = is_torch(self.arrays[0])

    def split_sizes(self) -> list[int]:
        return [b - a for a, b in zip(self._bounds, self._bounds[1:])]

    def _read_split(self, i: int) -> Split:
        lo, hi = self._bounds[i], self._bounds[i + 1]
        return tuple(a[lo:hi] for a in self.arrays)

    def take(self, indices: Sequence[int] | np.ndarray,
             get_split: Callable[[int], Split] | None = None) -> Split:
        if self.transform is not None or get_split is not None:
            return super().take(indices, get_split)
        idx = np.asarray(indices, dtype=np.int64)
        return tuple(_index(a, idx) for a in self.arrays)


class FileDataset(SplitDataset):
    """Files (.npy, .npz, .csv, .parquet) as input splits: one split per file, one per row group
    for parquet. `columns` picks npz arrays, csv columns (names need a header) or parquet
    columns; `header=None` detects a csv header (a first line that is not numbers)."""

    def __init__(self, directory_or_files: PathOrPaths,
                 format: str | None = None, transform: Transform | None = None, *,
                 columns: Sequence[str | int] | None = None, header: bool | None = None,
                 delimiter: str = ",") -> None:
        if format is not None and format not in _formats.FORMATS:
            raise ConfigError(f"format={format!r} is not one of {_formats.FORMATS} (or None to "
                              "infer it from the file extensions)")
        paths = _expand(directory_or_files, format)
        formats = {format or _formats.format_of(p) for p in paths}
        if None in formats or len(formats) != 1:
            raise ConfigError(f"files {[p.name for p in paths][:5]} have formats "
                              f"{sorted(map(str, formats))}; pass files of one format or name it "
                              f"with format= (one of {_formats.FORMATS})")
        self.format: str = formats.pop()  # type: ignore[assignment]
        self.paths = paths
        self.transform = transform
        self.columns = columns
        self.header = header
        self.delimiter = delimiter
        self._parts: list[tuple[Path, int, int]] = [
            (p, part, rows) for p in paths
            for part, rows in _formats.list_parts(p, self.format, header, delimiter)]
        self.reads = 0
        """How many times a split was read from its source (for cache checks)."""

    def split_sizes(self) -> list[int]:
        return [rows for _, _, rows in self._parts]

    def describe_split(self, i: int) -> str:
        path, part, _ = self._parts[i]
        return f"{path.name}#rowgroup{part}" if self.format == "parquet" else path.name

    def _read_split(self, i: int) -> Split:
        path, part, rows = self._parts[i]
        self.reads += 1
        split = _formats.read_part(path, self.format, part, self.columns, self.header,
                                   self.delimiter)
        if any(len(a) != rows for a in split):
            raise ConfigError(f"split {i} ({self.describe_split(i)}) read {[len(a) for a in split]}"
                              f" records but its metadata said {rows}; was the file changed?")
        return split


def _expand(source: PathOrPaths, fmt: str | None) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            paths = sorted(p for p in root.iterdir() if p.is_file() and (
                _formats.format_of(p) == fmt if fmt else _formats.format_of(p) is not None))
        else:
            paths = [root]
    else:
        paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise ConfigError(f"directory_or_files={source!r} gives no readable data files "
                          f"(missing: {missing[:5]}); pass a directory holding .npy/.npz/.csv/"
                          ".parquet files or a list of such files")
    return paths
