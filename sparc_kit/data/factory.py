"""Building data from a recipe or a path: the recipe's training dataset, a dataset for any manifest or shard
pattern, and the resumable training loader over either kind."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from sparc_kit.data.loader import Collate, Loader, ResumableBatchSampler, make_loader
from sparc_kit.data.manifest import ManifestDataset
from sparc_kit.data.sources import SHARD_SUFFIXES, expand_urls
from sparc_kit.data.webdataset import WebDataset
from sparc_kit.registry import datasets

__all__ = ["build_dataset", "is_shard_pattern", "open_dataset", "make_train_loader"]


def build_dataset(recipe: Any):
    """The training dataset of a recipe; ``image_size`` defaults to the vision tower's."""
    section = recipe.data
    entry = datasets.get(section.name)
    params = section.model_dump(exclude={"name"})
    if "image_size" in entry.config.model_fields and params.get("image_size") is None:
        params["image_size"] = getattr(recipe.model.vision, "image_size", None)
    return entry.build(params)


def is_shard_pattern(path: str) -> bool:
    """Whether ``path`` names webdataset shards (``.tar`` files, brace patterns) rather than a manifest."""
    first = expand_urls(path)[:1]
    return bool(first) and first[0].lower().endswith(SHARD_SUFFIXES)


def open_dataset(path: str, image_size: int | None = None, **params: Any):
    """A manifest (``.jsonl`` / ``.csv``) or webdataset shards (``.tar`` pattern) from a path alone.

    ``params`` go to the dataset (``storage_options``, ``seed``, ...); ``image_size=None`` keeps native sizes.
    """
    if is_shard_pattern(path):
        return WebDataset(path, image_size=image_size, **params)
    return ManifestDataset(path, image_size=image_size, **params)


def make_train_loader(
    dataset,
    collate: Collate,
    batch_size: int,
    *,
    seed: int = 0,
    samples_seen: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """The training loader of any dataset, starting after ``samples_seen`` samples (all processes together).

    A map-style dataset goes through :class:`ResumableBatchSampler` (with epoch-tagged indices when the dataset
    is ``epoch_aware``); an iterable one (:class:`WebDataset`) is told its position with
    ``set_state(start=samples_seen // world_size, rank, world_size, batch_size)`` and batched by the DataLoader.
    Either way a resumed run sees exactly the continuation of the stream, with the same ``num_workers``.
    """
    if isinstance(dataset, IterableDataset):
        if not hasattr(dataset, "set_state"):
            raise TypeError(f"{type(dataset).__name__} is iterable but cannot resume (no set_state)")
        dataset.set_state(start=samples_seen // world_size, rank=rank, world_size=world_size, batch_size=batch_size)
        return Loader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate,
            num_workers=num_workers,
            persistent_workers=False,
        )
    sampler = ResumableBatchSampler(
        len(dataset),
        batch_size,
        seed,
        samples_seen,
        rank,
        world_size,
        with_epoch=bool(getattr(dataset, "epoch_aware", False)),
    )
    return make_loader(dataset, collate, sampler, num_workers)
