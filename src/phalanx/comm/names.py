"""The collective vocabulary, torch-free so every layer (the data layer, the launcher) can
share it: reduction op names and collective kinds. `ops.py` adds the dtype tables."""

REDUCE_OPS = ("sum", "avg", "min", "max", "prod")
"""Reductions every collective path supports (avg needs a floating or complex dtype)."""

COLLECTIVES = ("allreduce", "allgather", "broadcast", "reducescatter", "alltoall", "barrier",
               "broadcast_object", "allgather_object")
"""Collective kinds, in the order their signatures encode them."""
