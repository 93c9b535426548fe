"""What `phalanx.spark` needs to know about the Spark cluster: the session, how many tasks can
run at once, how often Spark retries a failed task, and where the driver's coordinator listens.

Only pyspark's public API, plus two JVM calls (the scheduler's count of concurrent task slots,
the one barrier mode checks) with a fallback when a Spark version lacks them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

log = logging.getLogger("phalanx.spark")

SLOT_WAIT = 60.0
"""Default seconds `run` waits for executors to register while the cluster has fewer task
slots than the call needs (`phalanx.spark.run(slot_timeout=...)`)."""
SLOT_LOG_EVERY = 10.0
"""Seconds between the 'waiting for N task slots, have M' lines while the count holds."""


def session(spark: SparkSession | None) -> SparkSession:
    """`spark`, or the active SparkSession; a clear error without one or on Spark Connect."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("phalanx.spark needs pyspark; install it with "
                          "`pip install 'phalanx[spark]'` (or `pip install pyspark`)") from None
    if spark is None:
        spark = SparkSession.getActiveSession()
        if spark is None:
            raise ConfigError("spark=None and there is no active SparkSession; create one "
                              "(SparkSession.builder...getOrCreate()) or pass spark=...")
    elif not isinstance(spark, SparkSession):
        raise ConfigError(f"spark={spark!r} is not a pyspark.sql.SparkSession (Spark Connect "
                          "sessions are not supported: phalanx needs the SparkContext)")
    try:
        _ = spark.sparkContext
    except Exception as e:  # Spark Connect: no SparkContext on the client
        raise ConfigError(f"spark={spark!r} has no SparkContext ({e}); phalanx.spark needs a "
                          "classic (non-Connect) SparkSession to run tasks") from None
    if os.environ.get("PYSPARK_PIN_THREAD", "true").strip().lower() == "false":
        # Job groups are per JVM thread: unpinned, the workers' jobs could not be cancelled.
        raise ConfigError("PYSPARK_PIN_THREAD=false is set; phalanx.spark needs PySpark's "
                          "pinned thread mode (the default) to cancel its jobs; unset it")
    return spark


def _context(spark_or_sc: Any) -> SparkContext:
    return getattr(spark_or_sc, "sparkContext", spark_or_sc)


def task_slots(spark: Any = None) -> int:
    """How many tasks the cluster can run at once now (registered executors' cores divided
    by spark.task.cpus), as Spark counts it for barrier stages."""
    sc = _context(spark if spark is not None else session(None))
    jsc = sc._jsc.sc()  # type: ignore[attr-defined]
    try:
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:  # a Spark without these (private) calls: count cores instead
        cpus = int(sc.getConf().get("spark.task.cpus", "1") or 1)
        return int(sc.defaultParallelism) // max(1, cpus)


def wait_for_slots(sc: SparkContext, needed: int, *, timeout: float = SLOT_WAIT) -> int:
    """Return the slot count once it reaches `needed`, waiting up to `timeout` seconds for
    executors to register (logging why it waits); a ConfigError if it does not, at once when
    a local master can never have that many."""
    t0 = time.monotonic()
    slots = task_slots(sc)
    if slots >= needed:
        return slots
    most = most_slots(sc)
    if most is not None and most < needed:
        raise _short(sc, needed, most, f"and master {sc.master!r} never has more. Pass "
                     f"num_workers <= {most}, or start Spark with more cores")
    log.info("waiting for %d task slots, have %d (executors still registering; up to "
             "slot_timeout=%gs)", needed, slots, timeout)
    last, said = slots, t0
    while slots < needed:
        now = time.monotonic()
        if now - t0 >= timeout:
            raise _short(sc, needed, slots, f"after waiting slot_timeout={timeout:g}s. Pass "
                         f"slot_timeout=... (seconds) to wait longer for executors to "
                         f"register, or add executors or cores, or pass num_workers <= "
                         f"{slots}")
        if slots != last or now - said >= SLOT_LOG_EVERY:
            log.info("waiting for %d task slots, have %d (%.0fs of slot_timeout=%gs)", needed,
                     slots, now - t0, timeout)
            last, said = slots, now
        time.sleep(0.2)
        slots = task_slots(sc)
    log.info("have %d task slots after %.1fs", slots, time.monotonic() - t0)
    return slots


def most_slots(sc: SparkContext) -> int | None:
    """The most task slots a local master will ever have (None for a cluster manager, where
    more executors may register): local[N] has them at once, local-cluster[E,C,M] E*C."""
    master = str(sc.master).strip()
    m = _LOCAL_CLUSTER.match(master)
    if m is not None:
        cpus = int(sc.getConf().get("spark.task.cpus", "1") or 1)
        return int(m.group(1)) * int(m.group(2)) // max(1, cpus)
    return task_slots(sc) if _LOCAL.match(master) else None


def _short(sc: SparkContext, needed: int, slots: int, fix: str) -> ConfigError:
    conf = sc.getConf()
    cpus = conf.get("spark.task.cpus", "1")
    dynamic = (conf.get("spark.dynamicAllocation.enabled", "false") or "").lower()
    hint = (" With dynamic allocation, set spark.dynamicAllocation.minExecutors so the slots "
            "exist before the job starts." if dynamic == "true" else "")
    return ConfigError(
        f"num_workers={needed} needs {needed} Spark task slots running at once (every worker "
        f"of a phalanx job runs at the same time), but the cluster has {slots} (executor cores "
        f"/ spark.task.cpus={cpus}, master {sc.master!r}) {fix}.{hint}")


_LOCAL = re.compile(r"local(\[(?P<n>[0-9*]+)(\s*,\s*(?P<f>[0-9]+))?\])?$")
_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]$")


def max_task_attempts(sc: SparkContext) -> int:
    """How many times Spark runs a task before failing its job (local[N] never retries
    unless written local[N,F]; clusters use spark.task.maxFailures, default 4)."""
    m = _LOCAL.match(str(sc.master).strip())
    if m is not None:
        return int(m.group("f")) if m.group("f") else 1
    return max(1, int(sc.getConf().get("spark.task.maxFailures", "4") or 4))


def is_local(sc: SparkContext) -> bool:
    """Driver and executors share one machine (local[...] or local-cluster[...])."""
    return str(sc.master).strip().startswith("local")


def coordinator_addresses(sc: SparkContext) -> tuple[str, str]:
    """(where the coordinator listens, the host executors dial): loopback for local masters,
    else what Spark gave the driver (spark.driver.bindAddress / spark.driver.host)."""
    if is_local(sc):
        return "127.0.0.1", "127.0.0.1"
    conf = sc.getConf()
    host = str(conf.get("spark.driver.host", None) or "")
    if not host:
        raise ConfigError("spark.driver.host is not set; phalanx's coordinator runs in the "
                          "driver and executors must reach it there")
    return str(conf.get("spark.driver.bindAddress", None) or host), host
