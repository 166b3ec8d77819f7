"""Poolers: a sequence of features [B, N, W] (and a mask) to one vector [B, W]."""

from __future__ import annotations

import torch
import torch.nn as nn

from sparc_kit.registry import poolers

__all__ = ["MeanPooler", "masked_mean"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of the positions where ``mask`` is True (all positions when ``mask`` is None)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


@poolers.register("mean", internal=("width",))
class MeanPooler(nn.Module):
    """Masked mean over real positions: SPARC's average pooling for both towers (padding excluded)."""

    def __init__(self, width: int | None = None):
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_token=None) -> torch.Tensor:
        return masked_mean(x, mask)
