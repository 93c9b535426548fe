"""map_reduce and aggregate over a dataset's input splits, across every rank.

Each rank maps its own splits, combines the results locally, then the ranks combine theirs: numeric
results (numpy arrays, torch tensors, numbers, nested in tuples and dicts) with allreduce,
anything else with allgather_object and a Python reduction. Every rank gets the result.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from ..comm.names import REDUCE_OPS
from ..errors import CollectiveMismatch, ConfigError
from . import _collective
from .dataset import SplitDataset, is_torch
from .partition import PartitionedDataset

_NUMPY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add, "avg": operator.add, "prod": operator.mul,
    "min": np.minimum, "max": np.maximum}
_PY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add, "prod": operator.mul, "min": min, "max": max}


def as_partitioned(dataset: SplitDataset | PartitionedDataset) -> PartitionedDataset:
    """`dataset` as this rank's partition (a plain dataset gets an uncached one)."""
    if isinstance(dataset, PartitionedDataset):
        return dataset
    if isinstance(dataset, SplitDataset):
        return PartitionedDataset(dataset, cache=False)
    raise ConfigError(f"dataset={type(dataset).__name__} is not a dataset; pass an ArrayDataset, "
                      "FileDataset or PartitionedDataset")


# Trees of results: containers are (exact) tuples and dicts; leaves are arrays, numbers and any
# other object (a list or Counter is a leaf: 'sum' concatenates or adds it on the object path).

def _flatten(obj: Any) -> tuple[Any, list[Any]]:
    if type(obj) is tuple:
        defs, leaves = [], []
        for item in obj:
            d, ls = _flatten(item)
            defs.append(d)
            leaves += ls
        return ("tuple", defs), leaves
    if type(obj) is dict:
        try:
            keys = sorted(obj)
        except TypeError:
            keys = list(obj)
        d, leaves = _flatten(tuple(obj[k] for k in keys))
        return ("dict", keys, d), leaves
    return "*", [obj]


def _unflatten(treedef: Any, leaves: list[Any]) -> Any:
    it = iter(leaves)

    def build(d: Any) -> Any:
        if d == "*":
            return next(it)
        if d[0] == "dict":
            return dict(zip(d[1], build(d[2])))
        return tuple(build(c) for c in d[1])
    return build(treedef)


def _leaf_spec(x: Any) -> tuple[str, tuple[int, ...], str] | None:
    """(kind, shape, dtype) of a numeric leaf, None for anything else."""
    if is_torch(x):
        return ("torch", tuple(x.shape), str(x.dtype))
    if isinstance(x, np.ndarray) and x.dtype.kind in "biufc":
        return ("numpy", x.shape, x.dtype.str)
    if isinstance(x, np.generic) and x.dtype.kind in "biufc":
        return ("npscalar", (), x.dtype.str)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return ("py", (), np.asarray(x).dtype.str)
    return None


def _combine(a: Any, b: Any, op: str | Callable[[Any, Any], Any]) -> Any:
    if callable(op):
        return op(a, b)
    ta, la = _flatten(a)
    tb, lb = _flatten(b)
    if ta != tb:
        raise ConfigError(f"map_fn returned results of different structures {ta} and {tb}; it "
                          "must return the same structure for every split")
    out = []
    for x, y in zip(la, lb):
        spec = _leaf_spec(x)
        if spec is not None and spec != _leaf_spec(y):
            raise ConfigError(f"map_fn returned {spec} for one split and {_leaf_spec(y)} for "
                              "another; return arrays of one shape and dtype from every split")
        if spec is None:
            out.append(_PY_OPS[op](x, y) if op in _PY_OPS else _bad_avg(x))
        elif spec[0] == "py":
            out.append(_PY_OPS["sum" if op == "avg" else op](x, y))
        elif is_torch(x):
            import torch
            fn = {"min": torch.minimum, "max": torch.maximum}.get(op, _NUMPY_OPS[op])
            out.append(fn(x, y))
        else:
            out.append(_NUMPY_OPS[op](x, y))
    return _unflatten(ta, out)


def _bad_avg(x: Any) -> Any:
    raise ConfigError(f"reduce='avg' needs numeric results but map_fn returned "
                      f"{type(x).__name__}; use 'sum', 'min', 'max' or a callable")


def map_reduce(dataset: SplitDataset | PartitionedDataset, map_fn: Callable[..., Any],
               reduce: str | Callable[[Any, Any], Any] = "sum") -> Any:
    """Apply `map_fn(*split_fields)` to every split of every rank and reduce the results.

    `reduce` is 'sum', 'min', 'max', 'prod', 'avg' (the mean over all splits) or a binary
    callable (always takes the object path). Returns None when the dataset has no splits.
    """
    if not callable(reduce) and reduce not in REDUCE_OPS:
        raise ConfigError(f"reduce={reduce!r} is not one of {REDUCE_OPS} or a callable(a, b)")
    part = as_partitioned(dataset)
    local: Any = None
    count = 0
    step_op: str | Callable[[Any, Any], Any] = reduce
    for _, split in part.local_splits():
        result = map_fn(*split)
        local = result if count == 0 else _combine(local, result, step_op)
        count += 1
    treedef, leaves = _flatten(local) if count else (None, [])
    specs = [_leaf_spec(x) for x in leaves]
    numeric = count > 0 and not callable(reduce) and all(s is not None for s in specs)
    shared = _collective.allgather_object(
        (count, treedef, specs if numeric else None, None if numeric else local))
    present = [s for s in shared if s[0] > 0]
    if not present:
        return None
    if any((s[1], s[2]) != (present[0][1], present[0][2]) for s in present):
        raise CollectiveMismatch(
            "map_fn returned different result structures, shapes or dtypes on different ranks: "
            f"{[(s[1], s[2]) for s in shared]}; return the same arrays from every split")
    total = sum(s[0] for s in shared)
    if present[0][2] is None:
        values = [s[3] for s in present]
        return functools.reduce(lambda a, b: _combine(a, b, reduce), values)
    if not count:
        treedef, specs = present[0][1], present[0][2]
        leaves = [_identity(s, reduce) for s in specs]  # type: ignore[arg-type]
    reduced = _allreduce_leaves(leaves, specs, reduce)  # type: ignore[arg-type]
    if reduce == "avg":
        reduced = [r / total for r in reduced]
    return _unflatten(treedef, reduced)


def _identity(spec: tuple[str, tuple[int, ...], str], op: str) -> Any:
    kind, shape, dtype = spec
    np_dtype = np.dtype(dtype) if kind != "torch" else _torch_np_dtype(dtype)
    if op in ("sum", "avg"):
        value = np.zeros(shape, np_dtype)
    elif op == "prod":
        value = np.ones(shape, np_dtype)
    else:
        info = np.finfo(np_dtype) if np_dtype.kind in "fc" else np.iinfo(np_dtype)
        value = np.full(shape, info.max if op == "min" else info.min, np_dtype)
    if kind == "torch":
        import torch
        return torch.as_tensor(value, dtype=getattr(torch, dtype.removeprefix("torch.")))
    return value if kind == "numpy" else value[()]


def _torch_np_dtype(dtype: str) -> np.dtype[Any]:
    import torch
    return torch.empty(0, dtype=getattr(torch, dtype.removeprefix("torch."))).numpy().dtype


def _allreduce_leaves(leaves: list[Any], specs: list[tuple[str, tuple[int, ...], str]],
                      op: str) -> list[Any]:
    """Allreduce the leaves with one collective per dtype (fusion), restoring each leaf's type."""
    arrays = [x.detach().cpu().numpy() if is_torch(x) else np.asarray(x) for x in leaves]
    wire_op = "sum" if op == "avg" else op
    out: list[Any] = [None] * len(leaves)
    for dtype in sorted({a.dtype.str for a in arrays}):
        members = [i for i, a in enumerate(arrays) if a.dtype.str == dtype]
        flat = np.concatenate([arrays[i].ravel() for i in members])
        flat = np.asarray(_collective.allreduce(flat, op=wire_op))
        offset = 0
        for i in members:
            size = arrays[i].size
            out[i] = flat[offset:offset + size].reshape(arrays[i].shape)
            offset += size
    for i, (kind, _, _) in enumerate(specs):
        if kind == "torch":
            import torch
            out[i] = torch.as_tensor(out[i], dtype=leaves[i].dtype, device=leaves[i].device)
        elif kind == "npscalar":
            out[i] = out[i][()]
        elif kind == "py":
            out[i] = out[i].item()
    return out


def aggregate(dataset: SplitDataset | PartitionedDataset, zero: Any,
              seq_op: Callable[..., Any], comb_op: Callable[[Any, Any], Any]) -> Any:
    """Spark's aggregate over splits: fold each split with `seq_op(acc, *split_fields)` starting
    from a copy of `zero`, then merge the accumulators of all splits and ranks with `comb_op`."""
    part = as_partitioned(dataset)
    local = copy.deepcopy(zero)
    for _, split in part.local_splits():
        local = comb_op(local, seq_op(copy.deepcopy(zero), *split))
    result = copy.deepcopy(zero)
    for acc in _collective.allgather_object(local):
        result = comb_op(result, acc)
    return result
