"""Zero-shot classification (CLIP protocol; SPARC paper section 4.2, Tables 1 and 2).

Each class gets a text embedding: every template is filled with the class name, encoded and normalised; the
template embeddings are averaged and the mean renormalised (prompt ensembling). An image is assigned the class
whose embedding has the highest cosine with the image embedding.

Template sets: ``"label"`` is the class name alone (the paper's Table 1); ``"clip"`` is a short CLIP-style
ensemble (Table 2 ensembles CLIP's prefixes with FILIP's suffixes; this is a small subset of CLIP's 80).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from sparc_kit.data.transforms import transform_for
from sparc_kit.evaluate.data import iter_labelled_images, load_classnames
from sparc_kit.evaluate.retrieval import _device, encode_image_batches
from sparc_kit.evaluate.spec import TASK_ARGS, EvalConfig, template_problem
from sparc_kit.registry import evaluators

__all__ = [
    "LABEL_ONLY",
    "CLIP_TEMPLATES",
    "TEMPLATE_SETS",
    "resolve_templates",
    "zeroshot_classifier",
    "zeroshot_evaluate",
    "topk_correct",
]

LABEL_ONLY: tuple[str, ...] = ("{}",)
CLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"label": LABEL_ONLY, "clip": CLIP_TEMPLATES}


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A template-set name (``label``, ``clip``), a text file of templates (one a line), or a list of templates.

    Every template must contain ``{}`` where the class name goes.
    """
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]
        import fsspec

        try:
            with fsspec.open(spec, "r", encoding="utf-8") as f:
                templates = tuple(line.rstrip("\n") for line in f if line.strip())
        except (FileNotFoundError, IsADirectoryError):
            raise ValueError(
                f"templates {spec!r}: not a template set ({', '.join(TEMPLATE_SETS)}) nor a file of templates"
            ) from None
    else:
        templates = tuple(spec)
    if problem := template_problem(templates):
        raise ValueError(f"templates: {problem}")
    return templates


@torch.no_grad()
def zeroshot_classifier(
    model: Any, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str] = LABEL_ONLY, batch_size: int = 256
) -> torch.Tensor:
    """Class embeddings [C, E], unit length: the renormalised mean of the normalised template embeddings.

    ``model.encode_text(token_ids, token_mask)`` gives unit-length [B, E] embeddings; prompts are encoded in
    batches of ``batch_size`` (C * T prompts in all).
    """
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    templates = resolve_templates(templates)
    prompts = [t.replace("{}", name) for name in classnames for t in templates]  # class-major: [C * T]
    device = _device(model)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = tokenizer(prompts[start : start + batch_size])
        chunks.append(F.normalize(model.encode_text(ids.to(device), mask.to(device)).float(), dim=-1))
    embeds = torch.cat(chunks).view(len(classnames), len(templates), -1)  # [C, T, E]
    return F.normalize(embeds.mean(dim=1), dim=-1)  # [C, E]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """How many rows of ``logits`` [B, C] have their label among the ``k`` highest scores, for each k.

    Ties are broken by ``torch.topk`` (not guaranteed in favour of the label).
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = top == labels.view(-1, 1)
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def zeroshot_evaluate(
    model: Any,
    tokenizer: Any,
    samples: Iterable[tuple[Any, int]],
    classnames: Sequence[str],
    templates: str | Sequence[str] = "clip",
    batch_size: int = 64,
    transform: Any = None,
    max_samples: int | None = None,
    ks: Sequence[int] = (1, 5),
    classifier: torch.Tensor | None = None,
) -> dict[str, float | int]:
    """Top-k accuracy of zero-shot classification over ``samples`` = ``(image, label index)`` pairs.

    Images are PIL images or tensors, turned into model input by ``transform`` (default: the model's
    :class:`~sparc_kit.data.transforms.EvalTransform`); they are read and encoded ``batch_size`` at a time, so the
    set is never held in memory. Returns ``{"top1": ..., "top5": ..., "n": images, "classes": C}`` (accuracies
    as fractions). A ``top{k}`` is reported only when ``k < C`` (k = 1 always): with C <= k classes every label
    is in the top k and the number would read 100% whatever the model. ``classifier`` [C, E] skips building the
    class embeddings (e.g. when evaluating several sets with one class list).
    """
    if transform is None:
        transform = transform_for(model)
    num_classes = len(classnames)
    ks = sorted({k for k in ks if k == 1 or k < num_classes})
    weights = classifier if classifier is not None else zeroshot_classifier(model, tokenizer, classnames, templates)
    device = _device(model)
    weights = weights.to(device)
    correct = {k: 0 for k in ks}
    n = 0
    for image_embeds, batch in encode_image_batches(model, samples, transform, batch_size, max_samples):
        labels = torch.tensor([int(label) for _, label in batch], device=device)
        logits = image_embeds @ weights.T  # [B, C]
        for k, c in topk_correct(logits, labels, ks).items():
            correct[k] += c
        n += len(batch)
    if n == 0:
        raise ValueError("zero-shot evaluation read no images")
    out: dict[str, float | int] = {f"top{k}": correct[k] / n for k in ks}
    out.update(n=n, classes=num_classes)
    return out


@evaluators.register("zeroshot", config=EvalConfig, supplied=TASK_ARGS)
def zeroshot_task(model: Any, tokenizer: Any, spec: EvalConfig, transform: Any = None) -> tuple[dict, dict]:
    """Zero-shot classification: class names x prompt templates, averaged text embeddings; top-1 and top-k."""
    classnames = load_classnames(spec.classnames, spec.data)
    templates = resolve_templates(spec.templates)
    samples = iter_labelled_images(spec.data, classnames, spec.max_samples)
    metrics = zeroshot_evaluate(
        model, tokenizer, samples, classnames, templates, batch_size=spec.batch_size, transform=transform
    )
    return metrics, {"classnames": len(classnames), "templates": list(templates)}
