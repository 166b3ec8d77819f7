"""Zero-shot semantic segmentation (the SPARC paper's section 4 protocol: mIoU from patch-text similarities).

Every class name gets a text embedding as in zero-shot classification (the templates filled with the name,
encoded, normalised, averaged, renormalised: :func:`~sparc_kit.evaluate.zeroshot.zeroshot_classifier`). Every
patch gets its projected embedding ``g_v(f_v(x))``, normalised (``model.encode_patches``: the head the global
image embedding is built from), and takes the class with the highest cosine. With ``open_vocabulary: false``
(the paper's protocol) only the classes present in that image's ground truth compete; with ``true`` all of them.

The image goes through the model's evaluation transform (shorter side resized, centre crop); its mask is cut to
the same pixels with NEAREST resampling (:func:`~sparc_kit.data.transforms.center_crop_mask`), so the metric is
computed at the crop's resolution, on the crop. The patch map (sqrt(P) x sqrt(P)) is upsampled to the mask by
nearest neighbour: each patch's class covers the pixels under it, with no interpolation between patches.
Intersections and unions are counted per class over the whole set (pixels equal to ``ignore_index`` are left
out); IoU = intersection / union; mIoU is the mean over the classes present in the set's ground truth, a class
present but never predicted counting 0.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from sparc_kit.data.transforms import center_crop_mask, model_image_size, transform_for
from sparc_kit.evaluate.data import EvalDataError, iter_segmentation_samples, load_classnames
from sparc_kit.evaluate.retrieval import _device
from sparc_kit.evaluate.spec import TASK_ARGS, EvalConfig
from sparc_kit.evaluate.zeroshot import resolve_templates, zeroshot_classifier
from sparc_kit.registry import evaluators

__all__ = ["SegmentationConfig", "segmentation_evaluate", "iou_from_confusion", "predict_patch_classes"]


class SegmentationConfig(EvalConfig):
    """A ``task: segmentation`` entry: a manifest of ``image`` + ``mask`` rows, its class names (index i of a
    mask = the i-th name) and prompt templates, and how pixels are scored."""

    ignore_index: int = Field(255, ge=0, le=255, description="mask value of unlabelled pixels, not scored (CamVid: 11)")
    open_vocabulary: bool = Field(
        False,
        description="false: only the classes in each image's ground truth compete (the paper's protocol); "
        "true: every class name does",
    )

    @field_validator("data")
    @classmethod
    def _one_manifest(cls, value: str | list[str]) -> str | list[str]:
        if not isinstance(value, str):
            raise ValueError("a segmentation set is one manifest, not a list of paths")
        return value


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU [C] (float64) and which classes are in the ground truth [C] (bool), from a confusion
    matrix [C, C] of pixel counts (rows: ground truth, columns: prediction). A class absent from the ground
    truth gets IoU 0 and ``present`` False."""
    confusion = confusion.to(torch.float64)
    tp = confusion.diagonal()
    truth, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    union = truth + predicted - tp
    present = truth > 0
    return torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp)), present


@torch.no_grad()
def predict_patch_classes(
    patch_embeds: torch.Tensor, class_embeds: torch.Tensor, candidates: torch.Tensor | None = None
) -> torch.Tensor:
    """The class index [P] each patch's embedding [P, E] is most similar to (both unit length: cosine), among
    ``candidates`` (class indices) or all classes. Ties go to the lower class index."""
    if candidates is None:
        candidates = torch.arange(class_embeds.shape[0], device=class_embeds.device)
    scores = patch_embeds @ class_embeds[candidates].T  # [P, K]
    return candidates[scores.argmax(dim=1)]


def _upsample(patch_classes: torch.Tensor, size: int) -> torch.Tensor:
    """A patch map [P] (P = g * g, row-major) to a [size, size] class map by nearest neighbour."""
    grid = math.isqrt(patch_classes.numel())
    if grid * grid != patch_classes.numel():
        raise ValueError(f"{patch_classes.numel()} patches do not form a square grid")
    cells = patch_classes.view(1, 1, grid, grid).float()
    return F.interpolate(cells, size=(size, size), mode="nearest")[0, 0].long()


@torch.no_grad()
def segmentation_evaluate(
    model: Any,
    tokenizer: Any,
    samples: Iterable[tuple[Any, np.ndarray]],
    classnames: Sequence[str],
    templates: str | Sequence[str] = "clip",
    ignore_index: int = 255,
    open_vocabulary: bool = False,
    batch_size: int = 64,
    transform: Any = None,
    max_samples: int | None = None,
    class_embeds: torch.Tensor | None = None,
    source: str = "",
) -> tuple[dict[str, float | int], dict[str, float | None]]:
    """mIoU of zero-shot segmentation over ``samples`` = ``(image, mask)`` pairs, the mask [H, W] of class
    indices the size of its image (see the module's protocol).

    Returns ``(metrics, per-class IoU)``: ``{"miou", "pixel_accuracy", "n": images, "classes": classes in the
    ground truth}``, and ``{class name: IoU}`` (None for a class absent from the ground truth). A mask value
    that is neither ``ignore_index`` nor a class index raises :class:`EvalDataError`. ``class_embeds`` [C, E]
    skips building the class embeddings; ``source`` (the data's path) is named in errors.
    """
    if transform is None:
        transform = transform_for(model)
    size = int(getattr(transform, "image_size", 0) or model_image_size(model))
    num_classes = len(classnames)
    weights = class_embeds if class_embeds is not None else zeroshot_classifier(model, tokenizer, classnames, templates)
    device = _device(model)
    weights = F.normalize(weights.to(device).float(), dim=-1)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)
    n = 0
    stream = iter(samples if max_samples is None else itertools.islice(samples, max_samples))
    while batch := list(itertools.islice(stream, batch_size)):
        images = torch.stack([transform(image) for image, _ in batch]).to(device)
        patches = F.normalize(model.encode_patches(images).float(), dim=-1)  # [B, P, E]
        for (_, mask), embeds in zip(batch, patches):
            truth = torch.from_numpy(center_crop_mask(mask, size).astype(np.int64)).view(-1)
            valid = truth != ignore_index
            truth = truth[valid]
            if truth.numel() and int(truth.max()) >= num_classes:
                raise EvalDataError(
                    f"{source + ': ' if source else ''}the mask of image {n + 1} holds class index {int(truth.max())}, "
                    f"but there are {num_classes} class names (0..{num_classes - 1}); if it marks unlabelled pixels "
                    f"set ignore_index: {int(truth.max())}"
                )
            n += 1
            if not truth.numel():
                continue
            candidates = None if open_vocabulary else torch.unique(truth).to(device)
            predicted = _upsample(predict_patch_classes(embeds, weights, candidates).cpu(), size).view(-1)[valid]
            confusion += torch.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    if n == 0:
        raise ValueError("segmentation evaluation read no images")
    confusion = confusion.view(num_classes, num_classes)
    iou, present = iou_from_confusion(confusion)
    scored = int(confusion.sum())
    metrics: dict[str, float | int] = {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(confusion.diagonal().sum()) / scored if scored else 0.0,
        "n": n,
        "classes": int(present.sum()),
    }
    per_class = {name: (float(iou[i]) if present[i] else None) for i, name in enumerate(classnames)}
    return metrics, per_class


@evaluators.register("segmentation", config=SegmentationConfig, supplied=TASK_ARGS)
def segmentation_task(model: Any, tokenizer: Any, spec: SegmentationConfig, transform: Any = None) -> tuple[dict, dict]:
    """Zero-shot segmentation: each patch takes the best class name (prompt-ensembled); mIoU over the set."""
    classnames = load_classnames(spec.classnames, spec.data)
    templates = resolve_templates(spec.templates)
    samples = iter_segmentation_samples(spec.data, spec.max_samples)
    options = dict(ignore_index=spec.ignore_index, open_vocabulary=spec.open_vocabulary)
    options.update(batch_size=spec.batch_size, source=spec.data)
    metrics, per_class = segmentation_evaluate(model, tokenizer, samples, classnames, templates, transform=transform, **options)
    settings = {
        "classnames": len(classnames),
        "templates": list(templates),
        "ignore_index": spec.ignore_index,
        "open_vocabulary": spec.open_vocabulary,
        "upsampling": "nearest",
        "per_class_iou": per_class,
    }
    return metrics, settings
