"""The probe: one fixed image and caption whose alignment heat maps the image-taking loggers (``tensorboard``,
``wandb``) show at the evaluation steps, so a run's fine-grained alignment can be watched as it forms.

It is ``train.probe: {image: PATH, text: CAPTION}`` when the recipe sets it (a local image file), else the first
readable sample of the training data with its caption (``train.probe: {text: ...}`` alone keeps that image and
sets the caption). The maps are those of ``sparc eval --task heatmaps``
(:func:`~sparc_kit.evaluate.heatmaps.alignment_maps`, drawn by :func:`~sparc_kit.evaluate.heatmaps.overlays`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparc_kit.data.transforms import BadImageError, transform_for
from sparc_kit.errors import DataError, RecipeError
from sparc_kit.evaluate.heatmaps import alignment_maps, overlays, read_image

__all__ = ["Probe", "read_probe", "FIRST_SAMPLES"]

FIRST_SAMPLES = 100  # how many unreadable training samples may come before the first readable one


@dataclass
class Probe:
    image: Any  # a PIL image (train.probe.image) or a uint8 tensor [3, H, W] (a training sample)
    text: str

    def images(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, np.ndarray]:
        """``{tag: uint8 [S, S, 3]}``: per real token of the caption, ``heatmaps/weights/NN_PIECE`` and
        ``heatmaps/similarity/NN_PIECE`` (NN: the token's index). The model is evaluated in eval mode, without
        gradients, and put back in the mode it was in."""
        inner = getattr(model, "module", model)
        was_training = inner.training
        inner.eval()
        try:
            maps = alignment_maps(inner, tokenizer, transform_for(inner), self.image, self.text)
        finally:
            inner.train(was_training)
        _, panels = overlays(maps)
        out = {}
        for i, (piece, drawn) in enumerate(zip(maps.pieces, panels)):
            name = re.sub(r"[^\w.-]+", "_", piece.replace("\u2581", "")).strip("_") or "_"
            for kind, pixels in drawn.items():
                out[f"heatmaps/{kind}/{i:02d}_{name}"] = pixels
        return out


def _first_sample(dataset: Any) -> dict[str, Any]:
    items = iter(dataset) if isinstance(dataset, torch.utils.data.IterableDataset) else (
        dataset[i] for i in range(len(dataset))
    )
    for n, item in enumerate(items):
        if n >= FIRST_SAMPLES:
            break
        if "skip" not in item and "image" in item and item.get("caption"):
            return item
    raise DataError(
        f"train.probe: none of the first {FIRST_SAMPLES} training samples is readable, so there is no probe image "
        "for the heat maps; set train.probe.image and train.probe.text"
    )


def read_probe(recipe: Any, dataset: Any) -> Probe:
    """The recipe's probe (rank 0, before the run folder is written): its image is read now, so a wrong path
    stops the run before the first step."""
    cfg = recipe.train.probe
    if cfg is not None and cfg.image is not None:
        try:
            return Probe(read_image(cfg.image), cfg.text)
        except BadImageError as exc:
            raise RecipeError([f"train.probe.image: {exc}"]) from None
    sample = _first_sample(dataset)
    text = cfg.text if cfg is not None and cfg.text else sample["caption"]
    return Probe(sample["image"], text)
