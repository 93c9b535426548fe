"""Arrow side of `from_dataframe`: the function a Spark task runs (through mapInArrow) to write
its DataFrame partition once as an Arrow IPC file, and the reader phalanx workers use.

A split file holds two columns: ``features``, a fixed-size list of float64 (one row of X per
record), and ``label`` (the label column's own type) when there is a label. The conversion to
float64 happens here, once per partition, so workers only map the file into arrays.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

RESULT_SCHEMA = "partition int, rows long, width int"
"""What each partition's writer reports back to the driver (one row per partition)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Layout:
    """Where and how the splits of one DataFrame are written."""

    directory: str
    features: tuple[str, ...]
    label: str | None


def split_path(directory: str, partition: int) -> str:
    return os.path.join(directory, f"part-{partition:05d}.arrow")


def _matrix(batch: object, names: Sequence[str]) -> np.ndarray:
    """The feature columns of one record batch as a float64 (rows, width) array."""
    import pyarrow as pa
    import pyarrow.compute as pc
    blocks = []
    for name in names:
        col = batch.column(name)  # type: ignore[attr-defined]
        if col.null_count:
            raise ValueError(f"feature column {name!r} holds {col.null_count} null value(s); "
                             "fill or drop them (e.g. df.na.drop()) before from_dataframe")
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or \
                pa.types.is_fixed_size_list(col.type):
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths.min() != lengths.max()):
                raise ValueError(f"array column {name!r} holds arrays of lengths "
                                 f"{int(lengths.min())}..{int(lengths.max())}; every record "
                                 "needs the same number of features")
            width = int(lengths[0]) if len(lengths) else 0
            values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
            blocks.append(np.asarray(values, dtype=np.float64).reshape(len(col), width))
        else:
            values = col.to_numpy(zero_copy_only=False)
            blocks.append(np.asarray(values, dtype=np.float64).reshape(len(col), 1))
    if not blocks:
        raise ValueError("no feature columns to convert")
    return np.hstack(blocks)


def writer(layout: Layout) -> Callable[[Iterator[object]], Iterator[object]]:
    """The mapInArrow function: write this partition's file, yield (partition, rows, width)."""
    def write(batches: Iterator[object]) -> Iterator[object]:
        import pyarrow as pa
        from pyspark import TaskContext
        ctx = TaskContext.get()
        part = ctx.partitionId() if ctx is not None else 0
        os.makedirs(layout.directory, exist_ok=True)
        path = split_path(layout.directory, part)
        tmp = f"{path}.{ctx.attemptNumber() if ctx is not None else 0}.{os.getpid()}.tmp"
        sink, rows, width = None, 0, -1
        try:
            for batch in batches:
                X = _matrix(batch, layout.features)
                if width >= 0 and X.shape[1] != width:
                    raise ValueError(f"partition {part} has records with {width} and "
                                     f"{X.shape[1]} features; array columns must have one length")
                width = X.shape[1]
                if width == 0:
                    raise ValueError(f"columns={list(layout.features)} give records with no "
                                     "features (empty arrays)")
                flat = pa.array(X.reshape(-1), type=pa.float64())
                cols = [pa.FixedSizeListArray.from_arrays(flat, width)]
                names = ["features"]
                if layout.label is not None:
                    label = batch.column(layout.label)  # type: ignore[attr-defined]
                    if label.null_count:
                        raise ValueError(f"label column {layout.label!r} holds "
                                         f"{label.null_count} null value(s); drop those rows")
                    cols.append(label)
                    names.append("label")
                out = pa.record_batch(cols, names=names)
                if out.num_rows == 0:
                    continue
                if sink is None:
                    sink = pa.ipc.new_file(tmp, out.schema)
                sink.write_batch(out)
                rows += out.num_rows
            if sink is not None:
                sink.close()
                sink = None
                os.replace(tmp, path)
        finally:
            if sink is not None:
                sink.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
        yield pa.record_batch([pa.array([part], pa.int32()), pa.array([rows], pa.int64()),
                               pa.array([width], pa.int32())],
                              names=["partition", "rows", "width"])
    return write


def read_split(path: str, width: int, with_label: bool) -> tuple[np.ndarray, ...]:
    """One split file as (X float64 (rows, width), y) or (X,), in this process's memory."""
    import pyarrow as pa
    with pa.OSFile(path, "rb") as f:
        table = pa.ipc.open_file(f).read_all()
    feats = table.column("features").combine_chunks()
    X = np.asarray(feats.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
    X = np.ascontiguousarray(X.reshape(table.num_rows, width))
    if not with_label:
        return (X,)
    y = table.column("label").combine_chunks().to_numpy(zero_copy_only=False)
    return X, np.asarray(y)
