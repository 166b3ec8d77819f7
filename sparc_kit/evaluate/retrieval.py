"""Zero-shot image-text retrieval, Recall@K both ways (SPARC paper section 4.3, Table 3; COCO / Flickr30k style:
several captions per image).

- image -> text (``i2t``): an image counts as retrieved at K when ANY of its captions is among the K captions
  most similar to it;
- text -> image (``t2i``): a caption counts when its own image is among the K images most similar to it.

Ranks are computed chunk by chunk (``chunk_size`` queries at a time), so memory is O(chunk_size * max(N, M)),
never the full N x M similarity matrix. Ties count against the query: the rank of the right answer is the
number of wrong candidates scoring greater than *or equal to* it. A collapsed model that scores everything the
same therefore gets R@K of about 0, not 1, and the result does not depend on sort order or chunking.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from sparc_kit.data.transforms import transform_for
from sparc_kit.evaluate.data import load_retrieval_set
from sparc_kit.evaluate.spec import TASK_ARGS, EvalOptions
from sparc_kit.registry import evaluators

__all__ = ["retrieval_metrics", "retrieval_ranks", "retrieval_evaluate", "encode_texts"]


def _scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Similarities [q, n] of one chunk of queries [q, E] with all candidates [n, E]."""
    return queries @ candidates.T


def retrieval_ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_index: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the right answer: ``(i2t [N], t2i [M])``.

    ``i2t[i]``: how many captions of other images score >= the best-scoring caption of image ``i`` (-1 for an
    image without captions). ``t2i[j]``: how many other images score >= caption ``j``'s own image.
    """
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"expected image_embeds [N, E] and text_embeds [M, E], got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n_images, n_texts = image_embeds.shape[0], text_embeds.shape[0]
    owner = torch.as_tensor(text_image_index, dtype=torch.long, device=text_embeds.device).view(-1)  # [M]
    if owner.numel() != n_texts:
        raise ValueError(f"text_image_index has {owner.numel()} entries for {n_texts} texts")
    if n_texts and (owner.min() < 0 or owner.max() >= n_images):
        raise ValueError(f"text_image_index must lie in 0..{n_images - 1}")

    i2t = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        scores = _scores(image_embeds[start:stop], text_embeds)  # [c, M]
        own = owner.view(1, -1) == torch.arange(start, stop, device=owner.device).view(-1, 1)  # [c, M]
        best_own = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [c, 1]
        rank = ((scores >= best_own) & ~own).sum(dim=1)
        i2t[start:stop] = torch.where(own.any(dim=1), rank, torch.full_like(rank, -1)).cpu()

    t2i = torch.empty(n_texts, dtype=torch.long)
    for start in range(0, n_texts, chunk_size):
        stop = min(start + chunk_size, n_texts)
        scores = _scores(text_embeds[start:stop], image_embeds)  # [c, N]
        right = scores.gather(1, owner[start:stop].view(-1, 1))  # [c, 1]: the very value in the row
        t2i[start:stop] = ((scores >= right).sum(dim=1) - 1).cpu()  # minus the right image itself
    return i2t, t2i


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_index: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float | int]:
    """Recall@K image->text and text->image from embeddings (normalise them first for cosine similarity).

    ``image_embeds`` [N, E], ``text_embeds`` [M, E], ``text_image_index`` [M]: the image each text describes.
    Returns ``{"i2t_R@1": ..., ..., "t2i_R@10": ..., "images": N', "texts": M}`` with recalls as fractions;
    images without any caption are left out of i2t (``images`` counts those kept).
    """
    i2t, t2i = retrieval_ranks(image_embeds, text_embeds, torch.as_tensor(text_image_index), chunk_size)
    i2t = i2t[i2t >= 0]
    if i2t.numel() == 0 or t2i.numel() == 0:
        raise ValueError("retrieval needs at least one image with a caption")
    out: dict[str, float | int] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = int((i2t < k).sum()) / i2t.numel()
    for k in ks:
        out[f"t2i_R@{k}"] = int((t2i < k).sum()) / t2i.numel()
    out.update(images=int(i2t.numel()), texts=int(t2i.numel()))
    return out


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def encode_image_batches(
    model: Any, samples: Iterable[tuple[Any, Any]], transform: Any, batch_size: int, max_samples: int | None = None
) -> Iterator[tuple[torch.Tensor, list[tuple[Any, Any]]]]:
    """Unit-length image embeddings [B, E] (on the model's device) of ``(image, target)`` pairs, ``batch_size``
    at a time, with the pairs they came from: the one image pass both evaluations share."""
    device = _device(model)
    stream = iter(samples if max_samples is None else itertools.islice(samples, max_samples))
    while batch := list(itertools.islice(stream, batch_size)):
        images = torch.stack([transform(image) for image, _ in batch]).to(device)
        yield F.normalize(model.encode_image(images).float(), dim=-1), batch


@torch.no_grad()
def encode_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-length text embeddings [len(texts), E] on the CPU, encoded ``batch_size`` at a time."""
    device = _device(model)
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenizer(list(texts[start : start + batch_size]))
        out.append(F.normalize(model.encode_text(ids.to(device), mask.to(device)).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def retrieval_evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Iterable[tuple[Any, Sequence[str]]],
    batch_size: int = 64,
    transform: Any = None,
    max_samples: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float | int]:
    """Recall@K on ``dataset`` = ``(image, [captions])`` pairs (a :class:`~sparc_kit.evaluate.data.RetrievalSet`
    or any iterable of them; the first ``max_samples`` images when given).

    Images are transformed (default: the model's :class:`~sparc_kit.data.transforms.EvalTransform`) and encoded
    ``batch_size`` at a time; only the [N, E] and [M, E] embeddings are kept. Returns :func:`retrieval_metrics`'
    dict.
    """
    if transform is None:
        transform = transform_for(model)
    image_chunks: list[torch.Tensor] = []
    captions: list[str] = []
    owner: list[int] = []
    n = 0
    for image_embeds, batch in encode_image_batches(model, dataset, transform, batch_size, max_samples):
        image_chunks.append(image_embeds.cpu())  # [B, E]
        for _, caps in batch:
            caps = [caps] if isinstance(caps, str) else list(caps)
            captions.extend(caps)
            owner.extend([n] * len(caps))
            n += 1
    if n == 0:
        raise ValueError("retrieval evaluation read no images")
    text_embeds = encode_texts(model, tokenizer, captions, batch_size=max(batch_size, 256))
    return retrieval_metrics(torch.cat(image_chunks), text_embeds, torch.tensor(owner), ks=ks, chunk_size=chunk_size)


@evaluators.register("retrieval", config=EvalOptions, supplied=TASK_ARGS)
def retrieval_task(model: Any, tokenizer: Any, spec: EvalOptions, transform: Any = None) -> tuple[dict, dict]:
    """Image-text retrieval: R@1/5/10 image-to-text and text-to-image, several captions per image, in chunks."""
    dataset = load_retrieval_set(spec.data, spec.max_samples)
    return retrieval_evaluate(model, tokenizer, dataset, batch_size=spec.batch_size, transform=transform), {}
