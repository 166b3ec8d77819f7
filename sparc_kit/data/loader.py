"""Turning a dataset into batches: a resumable sampler, image normalisation and caption tokenisation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from sparc_kit.data.tokenizer import Tokenizer
from sparc_kit.data.transforms import IMAGE_MEAN, IMAGE_STD
from sparc_kit.errors import DataError

__all__ = [
    "ResumableBatchSampler", "epoch_seed", "Collate", "make_loader", "Loader", "worker_error", "IMAGE_MEAN", "IMAGE_STD"
]



def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's permutation. Not ``seed + epoch``: with that, seed 1's first epoch would
    be seed 0's second, and runs meant to differ by seed (``sparc ablate --seeds``) would share their data order."""
    return seed * 1_000_003 + epoch


@dataclass
class ResumableBatchSampler(Sampler[list[int]]):
    """An endless stream of batches over reshuffled epochs, that can start at any sample position.

    Epoch ``e`` is the permutation ``randperm(n)`` seeded by :func:`epoch_seed` ``(seed, e)``; the stream is their
    concatenation, so
    the sample at global position ``k`` is a pure function of ``(seed, k)``. A run that has consumed ``k``
    samples resumes with ``start=k`` and sees exactly the samples an uninterrupted run would have seen next.
    With several processes, each global batch of ``batch_size * world_size`` is split by rank.

    With ``with_epoch=True`` an index is yielded as ``epoch * n + index``, for datasets that vary a sample by
    epoch (a manifest with several captions per image picks one per epoch); such a dataset declares
    ``epoch_aware = True`` and reads ``index % n`` and ``index // n``.
    """

    num_samples: int
    batch_size: int
    seed: int = 0
    start: int = 0
    rank: int = 0
    world_size: int = 1
    with_epoch: bool = False

    def __post_init__(self):
        if self.num_samples <= 0:
            raise DataError("the dataset is empty")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    def _epoch(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def indices(self, start: int) -> Iterator[int]:
        epoch, offset = divmod(start, self.num_samples)
        while True:
            perm = self._epoch(epoch)
            if self.with_epoch:
                perm = perm + epoch * self.num_samples
            yield from perm[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        stream = self.indices(self.start)
        global_batch = self.batch_size * self.world_size
        lo = self.rank * self.batch_size
        while True:
            batch = [next(stream) for _ in range(global_batch)]
            yield batch[lo : lo + self.batch_size]


class Collate:
    """Stack uint8 images into normalised float tensors (resized when needed) and tokenise the captions.

    Bad samples never stop a run. A dataset marks one it could not read as ``{"skip": "why"}`` (a map-style
    dataset) or counts the ones it passed over in a good sample's ``"skipped_before"`` (an iterable dataset);
    the batch then carries ``skipped`` (how many) and ``truncated`` (captions cut at the context length), which
    the training loop adds up and logs.
    """

    def __init__(self, tokenizer: Tokenizer, image_size: int, mean=IMAGE_MEAN, std=IMAGE_STD):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return (x - self.mean) / self.std

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "skip" not in s]
        skipped = len(samples) - len(good) + sum(int(s.get("skipped_before", 0)) for s in good)
        captions = [s["caption"] for s in good]
        if good:
            images = self.images(torch.stack([s["image"] for s in good]))
        else:
            images = torch.empty(0, 3, self.image_size, self.image_size)
        token_ids, token_mask, truncated = self.tokenizer.tokenize(captions)
        return {
            "images": images,
            "token_ids": token_ids,
            "token_mask": token_mask,
            "skipped": torch.tensor(skipped),
            "truncated": torch.tensor(truncated),
        }


_WORKER_LINE = re.compile(r"^(?:[\w.]+\.)?\w+: (.+)$")  # "sparc_kit.data.webdataset.ShardError: message"


def worker_error(exc: Exception) -> Exception:
    """The error a data-loader worker raised, as its own one line. DataLoader re-raises it in the main process as
    ``Caught ShardError in DataLoader worker process 0.`` followed by the worker's traceback, so a one-line report
    (``sparc train``'s) would say nothing; the original message is the traceback's last line."""
    text = str(exc)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return exc
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    match = _WORKER_LINE.match(last)
    message = match.group(1) if match else last
    try:
        return type(exc)(message)
    except Exception:  # an error type that cannot be built from a message
        return RuntimeError(message)


class Loader(DataLoader):
    """A DataLoader whose workers' errors reach the caller as themselves (:func:`worker_error`)."""

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:
                error = worker_error(exc)
                if error is exc:
                    raise
                raise error from None
            yield batch


def make_loader(dataset, collate: Collate, batch_sampler: ResumableBatchSampler, num_workers: int = 0) -> DataLoader:
    return Loader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
    )
