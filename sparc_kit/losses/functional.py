"""The SPARC objective as plain functions (Bica et al., ICML 2024).

Shapes: B batch, P patches, L tokens, D embedding width. ``token_mask`` is True for real tokens.
``logit_scale`` is the multiplier 1/tau (a tensor, usually the exp of the model's learned log scale).

All normalisation runs in float32 or wider (float64 inputs stay float64), also under bf16 autocast: min-max normalisation divides by a range that can be
tiny, and the softmax over a caption's tokens is sensitive to rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparc_kit.losses.distributed import batch_share

__all__ = [
    "clip_loss",
    "sparc_alignment_weights",
    "sparc_fine_grained_loss",
    "masked_pairwise_contrastive_loss",
    "average_denominator",
    "contrastive_accuracy",
    "symmetric_cross_entropy",
    "wide",
    "scale_like",
]

Average = Literal["token", "caption"]
Weighting = Literal["sparse", "dense", "softmax"]

_RANGE_EPS = 1e-6


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 or wider: bf16 / fp16 are promoted, float64 is kept (never demoted), so the losses are
    exact against a float64 reference."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t.float()


def scale_like(logit_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """The logit scale (a tensor, with its gradient, or a plain number) in ``like``'s (widened) dtype and device."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    if torch.is_tensor(logit_scale):
        return logit_scale.to(device=like.device, dtype=torch.promote_types(logit_scale.dtype, dtype))
    return torch.tensor(float(logit_scale), dtype=dtype, device=like.device)


def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [wide(t) for t in tensors]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def clip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch on cosine similarities (eq. 1).

    ``image_embeds`` [B, D] and ``text_embeds`` [B, D] need not be normalised: this function l2-normalises them.
    Returns ``0.5 * (CE(image->text) + CE(text->image))``, each a mean over the batch.
    """
    with _no_autocast(image_embeds.device):
        image, text = _float32(image_embeds, text_embeds)
        image = F.normalize(image, dim=-1)
        text = F.normalize(text, dim=-1)
        logits = scale_like(logit_scale, image) * image @ text.t()
        return symmetric_cross_entropy(logits, logits.t())


def symmetric_cross_entropy(logits_i2t: torch.Tensor, logits_t2i: torch.Tensor) -> torch.Tensor:
    """``0.5 * (CE(image->text) + CE(text->image))`` for square logit matrices whose diagonal holds the
    positives (the two need not be transposes of each other: FILIP scores the directions differently)."""
    targets = torch.arange(logits_i2t.shape[0], device=logits_i2t.device)
    return 0.5 * (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets))


def contrastive_accuracy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (i2t) and column-wise (t2i) top-1 accuracy of a square logit matrix."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    i2t = (logits.argmax(dim=1) == targets).float().mean()
    t2i = (logits.argmax(dim=0) == targets).float().mean()
    return i2t, t2i


def sparc_alignment_weights(
    similarity: torch.Tensor,
    threshold: float | None = None,
    weighting: Weighting = "sparse",
) -> torch.Tensor:
    """Token-to-patch alignment weights from raw similarities ``similarity`` [B, L, P] (eqs. 2-4).

    - ``sparse`` (the method): min-max normalise each token's row over patches (eq. 2), zero the entries below
      ``threshold`` (eq. 3; None means 1/P), divide by the row sum (eq. 4).
    - ``dense``: the same without the threshold (the paper's "no sparsity" ablation row).
    - ``softmax``: a softmax over patches instead of min-max and threshold (the paper's "softmax" ablation row).

    A constant row (all patches equally similar, e.g. an all-zero padding token) has no range to normalise; it is
    treated as "every patch is the best patch", which gives uniform weights and finite gradients.
    """
    num_patches = similarity.shape[-1]
    if weighting == "softmax":
        return similarity.softmax(dim=-1)
    if weighting not in ("sparse", "dense"):
        raise ValueError(f"weighting must be 'sparse', 'dense' or 'softmax', got {weighting!r}")
    row_min = similarity.amin(dim=-1, keepdim=True)
    row_max = similarity.amax(dim=-1, keepdim=True)
    row_range = row_max - row_min
    # relative test, so the weights do not depend on the scale of the embeddings (min-max is scale invariant)
    flat = row_range <= _RANGE_EPS * torch.maximum(row_max.abs(), row_min.abs())
    normalised = torch.where(
        flat, torch.ones_like(similarity), (similarity - row_min) / torch.where(flat, 1.0, row_range)
    )  # eq. 2, in [0, 1]; the best patch of every row is exactly 1
    if weighting == "sparse":
        sigma = 1.0 / num_patches if threshold is None else float(threshold)
        normalised = torch.where(normalised >= sigma, normalised, torch.zeros_like(normalised))  # eq. 3
    # eq. 4: L1 renormalisation (no softmax). The row sum is >= 1 because the best patch keeps its 1.
    return normalised / normalised.sum(dim=-1, keepdim=True)


def average_denominator(token_mask: torch.Tensor, average: Average = "token") -> torch.Tensor:
    """What :func:`masked_pairwise_contrastive_loss` divides its sum by: the number of real tokens
    (``"token"``) or of captions with at least one real token (``"caption"``), as this process's share of the
    global batch when there are several processes (:func:`~sparc_kit.losses.distributed.batch_share`), so the
    mean over processes is the mean over the global batch. Never 0 (the sum is then 0 too)."""
    mask = token_mask.bool()
    if average == "token":
        count = mask.sum()
    elif average == "caption":
        count = mask.any(dim=1).sum()
    else:
        raise ValueError(f"average must be 'token' or 'caption', got {average!r}")
    share = batch_share(count, mask.device)
    return torch.where(share > 0, share, torch.ones_like(share))


def masked_pairwise_contrastive_loss(
    logits: torch.Tensor,
    token_mask: torch.Tensor,
    average: Average = "token",
    denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Within-sample contrast of an [B, L, L] logit matrix whose diagonal holds the positives.

    Padded columns are excluded from each softmax; padded rows are dropped (with ``where``, so NaN or inf in a
    dropped row cannot leak into the result). ``average="token"`` averages over all real tokens of the batch
    (the paper's pseudo-code); ``"caption"`` averages within each caption, then over captions that have at
    least one real token (eq. 6).

    ``denominator`` replaces the count the sum is divided by (:func:`average_denominator` of these rows): a
    caller that scores only some rows of a batch (one micro-batch of an accumulated step) passes the count of
    the whole batch, so the parts add up to the whole.
    """
    mask = token_mask.bool()
    # A finite fill value rather than -inf: a caption with no real token would otherwise give an all -inf row,
    # whose softmax (and gradient) is NaN even when the row is dropped afterwards.
    fill = torch.finfo(logits.dtype).min
    masked = logits.masked_fill(~mask[:, None, :], fill)
    positives = torch.diagonal(logits, dim1=1, dim2=2)  # [B, L]
    per_token = torch.logsumexp(masked, dim=-1) - positives  # [B, L]
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if denominator is None:
        denominator = average_denominator(mask, average)
    if average == "token":
        return per_token.sum() / denominator
    if average == "caption":
        lengths = mask.sum(dim=1)
        per_caption = per_token.sum(dim=1) / lengths.clamp_min(1)
        has_tokens = lengths > 0
        return (per_caption * has_tokens).sum() / denominator
    raise ValueError(f"average must be 'token' or 'caption', got {average!r}")


def sparc_fine_grained_loss(
    patch_embeds: torch.Tensor,
    token_embeds: torch.Tensor,
    token_mask: torch.Tensor,
    logit_scale: torch.Tensor | float,
    threshold: float | None = None,
    average: Average = "token",
    weighting: Weighting = "sparse",
    return_weights: bool = False,
    denominator: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SPARC's fine-grained sequence-wise loss (eqs. 2-6).

    ``patch_embeds`` [B, P, D] and ``token_embeds`` [B, L, D] are the projected, *un-normalised* embeddings;
    ``token_mask`` [B, L] is True for real tokens. For each pair separately:

    1. ``s[l, p] = t[l] . v[p]`` (raw inner products);
    2. alignment weights from :func:`sparc_alignment_weights` (min-max, threshold ``1/P`` by default, L1);
    3. language-grouped vision embeddings ``c[l] = sum_p a[l, p] v[p]`` (eq. 5);
    4. an L x L contrast between l2-normalised ``c`` and ``t`` in both directions (eq. 6), averaged by
       ``average`` ("token" or "caption", see :func:`masked_pairwise_contrastive_loss`).

    No other sample of the batch is used, so the loss of one pair does not depend on the rest of the batch.
    With ``return_weights`` the alignment weights [B, L, P] are returned too. ``denominator``: see
    :func:`masked_pairwise_contrastive_loss` (the count of a whole batch when these are only some of its rows).

    ``chunk_size``: compute the term over groups of this many pairs, each recomputed in the backward pass
    (activation checkpointing), so what the backward keeps of the [B, L, P] intermediates is one chunk's, not the
    batch's; the loss and gradients are the same (the pairs are independent and share one denominator).
    """
    if denominator is None:
        denominator = average_denominator(token_mask, average)
    batch = patch_embeds.shape[0]
    if chunk_size is None or batch <= chunk_size or not torch.is_grad_enabled():
        loss, weights = _fine_grained_terms(
            patch_embeds, token_embeds, token_mask, logit_scale, threshold, average, weighting, denominator
        )
    else:
        parts = [
            checkpoint(
                _fine_grained_terms,
                patch_embeds[start : start + chunk_size],
                token_embeds[start : start + chunk_size],
                token_mask[start : start + chunk_size],
                logit_scale,
                threshold,
                average,
                weighting,
                denominator,
                use_reentrant=False,
            )
            for start in range(0, batch, chunk_size)
        ]
        loss = torch.stack([part[0] for part in parts]).sum()
        weights = torch.cat([part[1] for part in parts]) if return_weights else None
    if return_weights:
        return loss, weights
    return loss


def _fine_grained_terms(patch_embeds, token_embeds, token_mask, logit_scale, threshold, average, weighting, denominator):
    """The loss of these pairs over ``denominator`` and their alignment weights (eqs. 2-6, in float32)."""
    with _no_autocast(patch_embeds.device):
        patches, tokens = _float32(patch_embeds, token_embeds)
        similarity = torch.einsum("bld,bpd->blp", tokens, patches)  # [B, L, P]
        weights = sparc_alignment_weights(similarity, threshold=threshold, weighting=weighting)
        grouped = torch.einsum("blp,bpd->bld", weights, patches)  # [B, L, D], eq. 5
        grouped = F.normalize(grouped, dim=-1)
        tokens_n = F.normalize(tokens, dim=-1)
        scale = scale_like(logit_scale, patches)
        logits = scale * torch.einsum("bjd,bkd->bjk", grouped, tokens_n)  # [B, L, L]: grouped j vs token k
        loss_vl = masked_pairwise_contrastive_loss(logits, token_mask, average, denominator)
        loss_lv = masked_pairwise_contrastive_loss(logits.transpose(1, 2), token_mask, average, denominator)
    return 0.5 * (loss_vl + loss_lv), weights
