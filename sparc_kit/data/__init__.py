"""Data: datasets (registered), the tokenizer, and the batch pipeline."""

from __future__ import annotations

from typing import Any

from sparc_kit.data.loader import Collate, ResumableBatchSampler, make_loader
from sparc_kit.data.synthetic import SyntheticShapes
from sparc_kit.data.tokenizer import Tokenizer
from sparc_kit.registry import datasets

__all__ = ["SyntheticShapes", "Tokenizer", "Collate", "ResumableBatchSampler", "make_loader", "build_dataset"]


def build_dataset(recipe: Any):
    """The training dataset of a recipe; ``image_size`` defaults to the vision tower's."""
    spec = recipe.data
    entry = datasets.get(spec.name)
    params = spec.model_dump(exclude={"name"})
    if "image_size" in entry.config.model_fields and params.get("image_size") is None:
        params["image_size"] = getattr(recipe.model.vision, "image_size", None)
    return entry.build(params)
