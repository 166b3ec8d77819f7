"""Data: datasets (registered), the readers of the stored formats they share with evaluation (``sources``), image
transforms, the tokenizer, and the batch pipeline."""

from __future__ import annotations

from sparc_kit.data.factory import build_dataset, is_shard_pattern, make_train_loader, open_dataset
from sparc_kit.data.loader import Collate, Loader, ResumableBatchSampler, make_loader
from sparc_kit.data.manifest import ManifestDataset, ManifestError  # registers "manifest"
from sparc_kit.data.sources import expand_urls
from sparc_kit.data.synthetic import SyntheticShapes  # registers "synthetic"
from sparc_kit.data.tokenizer import Tokenizer
from sparc_kit.data.transforms import BadImageError, ImageTransform
from sparc_kit.data.webdataset import ShardError, WebDataset  # registers "webdataset"
from sparc_kit.registry import import_submodules

__all__ = [
    "SyntheticShapes",
    "ManifestDataset",
    "WebDataset",
    "ImageTransform",
    "BadImageError",
    "ManifestError",
    "ShardError",
    "Tokenizer",
    "Collate",
    "ResumableBatchSampler",
    "make_loader",
    "make_train_loader",
    "build_dataset",
    "open_dataset",
    "is_shard_pattern",
    "expand_urls",
]


import_submodules(__name__, __path__)  # every module registers its components: a new one is one new file
