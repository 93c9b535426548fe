"""The DataLoaders the phalanx Lightning strategy trains and evaluates with.

Lightning hands the strategy each loader after injecting its `DistributedSampler`; the strategy
rebuilds it around phalanx's samplers, keeping the user's dataset, batch size, collate function
and worker settings.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from phalanx.data.batch_sampler import ElasticBatchSampler, LiveShardSampler
from phalanx.errors import ConfigError

_KEEP = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
         "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device")


def _settings(loader: DataLoader) -> dict[str, Any]:
    kw = {k: getattr(loader, k) for k in _KEEP if hasattr(loader, k)}
    if loader.num_workers > 0:
        kw["prefetch_factor"] = loader.prefetch_factor
    return kw


def _shuffled(loader: DataLoader) -> bool:
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle)
    return isinstance(sampler, RandomSampler)


def training_loader(loader: DataLoader, world: int,
                    seed: int) -> tuple[DataLoader, ElasticBatchSampler]:
    """`loader` with an ElasticBatchSampler: global batch = its batch size x `world`."""
    if loader.batch_size is None:
        raise ConfigError("PhalanxStrategy needs the training DataLoader's batch_size (it "
                          "splits each global batch of batch_size x workers among the ranks "
                          "alive); pass DataLoader(..., batch_size=N) rather than a custom "
                          "batch_sampler")
    sampler_seed = getattr(loader.sampler, "seed", seed) if isinstance(
        loader.sampler, DistributedSampler) else seed
    batches = ElasticBatchSampler(len(loader.dataset), loader.batch_size * world,
                                  seed=int(sampler_seed), shuffle=_shuffled(loader),
                                  drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_sampler=batches, **_settings(loader)), batches


def evaluation_loader(loader: DataLoader) -> DataLoader:
    """`loader` sharded by the rank and world size at the start of each pass."""
    if loader.batch_size is None:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=LiveShardSampler(len(loader.dataset)), drop_last=loader.drop_last,
                      **_settings(loader))
