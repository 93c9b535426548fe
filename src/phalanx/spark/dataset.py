"""`from_dataframe`: a Spark DataFrame as a phalanx split dataset, one input split per partition.

One Spark job (mapInArrow) converts each partition through Arrow once and writes it as an
Arrow IPC file (features as float64 rows, plus the label) in a job directory. The result is a
`SplitDataset` like `FileDataset`: phalanx workers wrap it in a `PartitionedDataset`, read the
splits they own and keep them in memory across iterations; the summation-form estimators in
`phalanx.data.ml` fit on it as on any other split dataset.

Lineage: each split remembers the DataFrame partition it came from. In the driver (the object
`from_dataframe` returned), a split whose file is missing is recomputed from that partition
by a Spark job over that partition alone, and `phalanx.spark.run` does so for every dataset
passed to fn before it starts the workers. Inside a running job nothing can recompute it (the
workers hold every task slot, and executors cannot start Spark jobs), so a worker that finds
a file missing raises `SplitMissing` naming it. Recomputing needs a deterministic DataFrame:
a recomputed partition whose row count changed is an error.

The job directory must be visible to every executor: a fresh temporary directory by default
with local masters (local[N], local-cluster[...]), a shared `path` (NFS, a mounted bucket)
on a real cluster. The driver's object removes the directory it created on `close()` or when
it is garbage-collected.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..data.dataset import Split, SplitDataset, Transform
from ..errors import ConfigError, PhalanxError
from . import _arrow, cluster

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger("phalanx.spark")

__all__ = ["SparkDataset", "SplitMissing", "from_dataframe"]


class SplitMissing(PhalanxError, FileNotFoundError):
    """A split's Arrow file is gone and cannot be recomputed here (only the driver can)."""


class _Lineage:
    """The DataFrame that writes the split files; held only by the driver's object."""

    def __init__(self, writing: DataFrame) -> None:
        self.writing = writing
        self.num_partitions = writing.rdd.getNumPartitions()

    def write(self, partitions: list[int] | None) -> list[tuple[int, int, int]]:
        """Run the writer over `partitions` (None: all); (partition, rows, width) for each."""
        rdd = self.writing.rdd
        if rdd.getNumPartitions() != self.num_partitions:
            raise PhalanxError(f"the DataFrame now has {rdd.getNumPartitions()} partitions, not "
                               f"{self.num_partitions}: its partitions cannot be recomputed one "
                               "by one; build a new dataset with from_dataframe")
        sc = self.writing.sparkSession.sparkContext
        rows = sc.runJob(rdd, lambda it: [(int(r[0]), int(r[1]), int(r[2])) for r in it],
                         partitions)
        return sorted(rows)


class SparkDataset(SplitDataset):
    """The partitions of a Spark DataFrame as input splits: fields (X, y), or (X,) without a
    label; X is float64 (records, features). Built by `from_dataframe`."""

    def __init__(self, *, directory: str, features: Sequence[str], label: str | None,
                 width: int, parts: list[tuple[int, int]], num_partitions: int,
                 transform: Transform | None = None, lineage: _Lineage | None = None,
                 owns_directory: bool = False) -> None:
        self.directory = directory
        self.features = tuple(features)
        self.label = label
        self.width = width
        self.parts = list(parts)
        """(DataFrame partition, records) of each split; empty partitions have no split."""
        self.num_partitions = num_partitions
        self.transform = transform
        self.reads = 0
        """How many times a split was read from its file (for cache checks)."""
        self.recomputed: list[int] = []
        """DataFrame partitions whose files were rewritten from the DataFrame (lineage)."""
        self._lineage = lineage
        self._finalizer = (weakref.finalize(self, shutil.rmtree, directory, True)
                           if owns_directory else None)

    # ------------------------------------------------------------------ SplitDataset
    def split_sizes(self) -> list[int]:
        return [rows for _, rows in self.parts]

    def describe_split(self, i: int) -> str:
        part = self.parts[i][0]
        return f"DataFrame partition {part} ({os.path.basename(self.path(part))})"

    def path(self, partition: int) -> str:
        """The Arrow file of one DataFrame partition."""
        return _arrow.split_path(self.directory, partition)

    def _read_split(self, i: int) -> Split:
        part, rows = self.parts[i]
        path = self.path(part)
        if not os.path.exists(path):
            self._restore([part])
        try:
            split = _arrow.read_split(path, self.width, self.label is not None)
        except FileNotFoundError:
            raise self._missing([part]) from None
        self.reads += 1
        if len(split[0]) != rows:
            raise PhalanxError(f"split {i} ({self.describe_split(i)}) holds {len(split[0])} "
                               f"records, not {rows}; was {self.directory} rewritten?")
        return split

    # ------------------------------------------------------------------ lineage
    def missing(self) -> list[int]:
        """DataFrame partitions whose split files are gone."""
        return [p for p, _ in self.parts if not os.path.exists(self.path(p))]

    def ensure(self) -> list[int]:
        """Recompute every missing split file from its DataFrame partition (driver only);
        returns the partitions recomputed."""
        gone = self.missing()
        if gone:
            self._restore(gone)
        return gone

    def _restore(self, partitions: list[int]) -> None:
        if self._lineage is None:
            raise self._missing(partitions)
        want = dict(self.parts)
        got = self._lineage.write(partitions)
        changed = [(p, want.get(p), rows) for p, rows, _ in got if rows != want.get(p)]
        if changed:
            raise PhalanxError(f"recomputed DataFrame partition(s) {changed[:3]} (partition, "
                               "records before, records now) differ: the DataFrame is not "
                               "deterministic; cache() or checkpoint() it before from_dataframe")
        self.recomputed.extend(partitions)
        log.warning("recomputed the split file(s) of DataFrame partition(s) %s from the "
                    "DataFrame (lineage): they were missing from %s", partitions, self.directory)

    def _missing(self, partitions: list[int]) -> SplitMissing:
        return SplitMissing(
            f"the split file(s) of DataFrame partition(s) {partitions} are missing from "
            f"{self.directory}, and only the driver's dataset (the one from_dataframe returned) "
            "can recompute them from the DataFrame; call ds.ensure() there, or pass the dataset "
            "to phalanx.spark.run, which does so before it starts the workers")

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove the job directory, if this object created it."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> SparkDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the files' description only: the DataFrame stays in the driver, and a
        # copy never removes the directory.
        return {k: v for k, v in self.__dict__.items() if k not in ("_lineage", "_finalizer")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lineage=None, _finalizer=None)


def _prepare(df: DataFrame, columns: Sequence[str] | None, label: str | None) -> DataFrame:
    """Check the columns' types and select them (ML vectors as arrays)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, BooleanType, NumericType, StringType
    fields = {f.name: f.dataType for f in df.schema.fields}
    if label is not None and label not in fields:
        raise ConfigError(f"label={label!r} is not a column of the DataFrame; it has "
                          f"{list(fields)}")
    if label is not None and not isinstance(fields[label], (NumericType, BooleanType,
                                                            StringType)):
        raise ConfigError(f"label={label!r} has type {fields[label].simpleString()}; a label "
                          "must be a number, boolean or string column")
    if columns is None:
        columns = [c for c in fields if c != label]
    elif isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
        raise ConfigError(f"columns={columns!r} must be a list of column names")
    if not columns:
        raise ConfigError(f"columns={list(columns)!r} names no feature column; the DataFrame "
                          f"has {list(fields)}")
    exprs = []
    for c in columns:
        if c not in fields:
            raise ConfigError(f"columns names {c!r}, which is not a column of the DataFrame; "
                              f"it has {list(fields)}")
        t = fields[c]
        if isinstance(t, (NumericType, BooleanType)) or (
                isinstance(t, ArrayType) and isinstance(t.elementType, NumericType)):
            exprs.append(F.col(c))
        elif type(t).__name__ == "VectorUDT":  # pyspark.ml / pyspark.mllib vectors
            from pyspark.ml.functions import vector_to_array
            exprs.append(vector_to_array(F.col(c)).alias(c))
        else:
            raise ConfigError(f"feature column {c!r} has type {t.simpleString()}; features "
                              "must be numeric, boolean, numeric arrays or ML vectors")
    if label is not None:
        exprs.append(F.col(label))
    return df.select(*exprs)


def from_dataframe(df: DataFrame, columns: Sequence[str] | None = None,
                   label: str | None = None, *, path: str | None = None,
                   transform: Transform | None = None) -> SparkDataset:
    """Write each partition of `df` once as an Arrow file; return them as input splits.

    `columns`: feature columns (numeric, boolean, numeric arrays or ML vectors; default every
    column but the label), concatenated into X in this order. `label`: the target column, the
    dataset's second field. `path`: a directory every executor reaches, under which a fresh
    job directory is made (default: a temporary directory, local masters only). Runs one
    Spark job now; needs pyarrow.
    """
    from pyspark.sql import DataFrame
    if not isinstance(df, DataFrame):
        raise ConfigError(f"df={type(df).__name__} is not a pyspark.sql.DataFrame")
    sc = cluster.session(df.sparkSession).sparkContext
    prepared = _prepare(df, columns, label)
    features = prepared.columns[:-1] if label is not None else prepared.columns
    if path is not None:
        directory = os.path.join(os.fspath(path), f"phalanx-df-{secrets.token_hex(4)}")
        os.makedirs(directory)
    elif cluster.is_local(sc):
        directory = tempfile.mkdtemp(prefix="phalanx-df-")
    else:
        raise ConfigError(f"path=None with master {sc.master!r}: pass path=, a directory "
                          "every executor can read and write (the split files go there)")
    layout = _arrow.Layout(directory=directory, features=tuple(features), label=label)
    try:
        write: Any = _arrow.writer(layout)
        lineage = _Lineage(prepared.mapInArrow(write, _arrow.RESULT_SCHEMA))
        written = lineage.write(None)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    widths = {w for _, rows, w in written if rows}
    if not widths:
        shutil.rmtree(directory, ignore_errors=True)
        raise ConfigError("df has no rows; there is nothing to make splits of")
    if len(widths) > 1:
        shutil.rmtree(directory, ignore_errors=True)
        raise ConfigError(f"the partitions of df have records of {sorted(widths)} features; "
                          "array and vector columns must have one length throughout")
    return SparkDataset(directory=directory, features=features, label=label,
                        width=widths.pop(), parts=[(p, rows) for p, rows, _ in written if rows],
                        num_partitions=lineage.num_partitions, transform=transform,
                        lineage=lineage, owns_directory=True)
