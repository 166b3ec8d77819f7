"""Poolers: a sequence of features [B, N, W] (and a mask) to one vector [B, W].

Every pooler is called the same way, ``pooler(x, mask, cls_token=...)``:

- ``x`` [B, N, W]: patch tokens (image tower) or token features (text tower);
- ``mask`` [B, N] bool, True at real positions, or None when every position is real (images);
- ``cls_token`` [B, W] or None: the encoder's class token, kept out of ``x`` so that the patch tokens SPARC
  aligns with words are patches only. Text towers have none.

So the dual encoder can swap poolers without knowing which one it holds. Padding never leaks into the result:
each masked pooler's output is independent of what padded positions contain (tested). A row with no real
position at all (an empty caption) gives a finite value; the losses drop such rows.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparc_kit.errors import SparcError
from sparc_kit.models.attention import init_weights
from sparc_kit.registry import poolers

__all__ = [
    "MeanPooler",
    "ClsPooler",
    "LastTokenPooler",
    "AttentionPooler",
    "MaxPooler",
    "masked_mean",
    "masked_max",
    "last_token_index",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of the positions where ``mask`` is True (all positions when ``mask`` is None)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-channel max over dim 1 of the real positions; zeros for a row with no real position."""
    if mask is None:
        return x.amax(dim=1)
    m = mask.bool().unsqueeze(-1)  # [B, N, 1]
    filled = x.masked_fill(~m, torch.finfo(x.dtype).min)
    out = filled.amax(dim=1)  # [B, W]
    return torch.where(m.any(dim=1), out, torch.zeros_like(out))


def last_token_index(mask: torch.Tensor | None, n: int, batch: int, device: torch.device) -> torch.Tensor:
    """Index [B] of the last True position of each mask row (N - 1 when no mask, 0 for an all-padding row).

    "Last True" rather than "length - 1" so the answer stays right for masks that are not a prefix run.
    """
    if mask is None:
        return torch.full((batch,), n - 1, dtype=torch.long, device=device)
    positions = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=1).clamp_min(0)


@poolers.register("mean", supplied=("width",))
class MeanPooler(nn.Module):
    """Masked mean over real positions: SPARC's average pooling for both towers (padding excluded)."""

    def __init__(self, width: int | None = None):
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_token=None) -> torch.Tensor:
        return masked_mean(x, mask)


class MissingClassTokenError(SparcError, ValueError):
    """The ``cls`` pooler was given an encoder output without a class token."""


CLS_ADVICE = (
    "pooler 'cls' needs the encoder's class token, and this encoder returned none (native vit: set "
    "class_token: true; timm: pick a model with a class token; text towers have none: use mean or last)"
)


@poolers.register("cls", supplied=("width",))
class ClsPooler(nn.Module):
    """The encoder's class token as the global feature (CLIP / timm ViT style).

    The class token attended to every patch but is not a patch, so SPARC's patch-level alignment is unaffected
    by this choice; only the global embedding changes. Text towers here return no class token: choosing ``cls``
    for the text side is an error (``build_model`` refuses it before training starts).
    """

    def __init__(self, width: int | None = None):
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_token=None) -> torch.Tensor:
        if cls_token is None:
            raise MissingClassTokenError(CLS_ADVICE)
        return cls_token


@poolers.register("last", supplied=("width",))
class LastTokenPooler(nn.Module):
    """The feature at the last real position of each row.

    For a causal text tower only the last token has seen the whole caption, so its feature (the end-of-text
    token, appended by the tokenizer) is the caption summary, as in CLIP. With a bidirectional tower it is
    one token among many and ``mean`` is the paper's choice. On patches (no mask) it picks the last patch, which
    is rarely what you want.
    """

    def __init__(self, width: int | None = None):
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_token=None) -> torch.Tensor:
        b, n, _ = x.shape
        idx = last_token_index(mask, n, b, x.device)  # [B]
        return x[torch.arange(b, device=x.device), idx]  # [B, W]


@poolers.register("max", supplied=("width",))
class MaxPooler(nn.Module):
    """Per-channel max over real positions (padding excluded); zeros for an all-padding row."""

    def __init__(self, width: int | None = None):
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_token=None) -> torch.Tensor:
        return masked_max(x, mask)


@poolers.register("attention", supplied=("width",))
class AttentionPooler(nn.Module):
    """A learned query attending over the real positions (the attentional pooler of CoCa / SigLIP's MAP head).

    ``out = W_o · softmax_over_real(q · k_n / sqrt(d)) · v_n`` per head, with ``q = W_q · query`` (one learned
    vector), ``k_n = W_k x_n``, ``v_n = W_v x_n``. It lets the global embedding weight informative patches or
    tokens instead of averaging them. Output width equals input width. Unlike SigLIP's MAP head there is no
    LayerNorm + MLP residual after the attention: the dual encoder already has ``h_v`` and the adapters for that.

    Without positional information in ``x`` the result is invariant to the order of positions (tested); an
    all-padding row attends to every position instead of producing NaN.
    """

    def __init__(self, width: int | None = None, heads: int = 1):
        super().__init__()
        if width is None:
            raise ValueError("pooler 'attention' needs the encoder width (build_model fills it in)")
        if heads < 1 or width % heads:
            raise ValueError(f"pooler 'attention': width {width} must be divisible by heads {heads}")
        self.width = width
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, width))  # [1, 1, W]
        self.q_proj = nn.Linear(width, width)
        # no key bias: with one query it adds the same constant to every score, which the softmax cancels, so it
        # could never learn anything (its gradient is zero up to rounding)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.apply(init_weights)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_token=None) -> torch.Tensor:
        b, n, w = x.shape
        h, d = self.heads, w // self.heads
        q = self.q_proj(self.query).reshape(1, 1, h, d).transpose(1, 2).expand(b, h, 1, d)  # [B, H, 1, Dh]
        k = self.k_proj(x).reshape(b, n, h, d).transpose(1, 2)  # [B, H, N, Dh]
        v = self.v_proj(x).reshape(b, n, h, d).transpose(1, 2)  # [B, H, N, Dh]
        attn_mask = None
        if mask is not None:
            keep = mask.bool()
            keep = keep | ~keep.any(dim=1, keepdim=True)  # an empty row attends everywhere: finite, not NaN
            attn_mask = keep[:, None, None, :]  # [B, 1, 1, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, 1, Dh]
        return self.out_proj(out.reshape(b, w))  # [B, W]
