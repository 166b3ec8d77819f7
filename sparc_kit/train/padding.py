"""``train.pad_to: longest``: cut each step's captions to the longest one in the global batch.

The tokenizer pads every caption to ``context_length`` (77 for CLIP's), while COCO captions are 14 tokens long on
average and the longest of a batch of 64 is about 25. The columns past the last real token of every caption are
padding everywhere, and dropping them changes nothing the loss sees: padded positions are masked as attention
keys (and come after every real token under a causal mask), the poolers and losses read real tokens only, and
their own outputs and gradients are zero. What goes is the text tower's work on them (``benchmarks/
vs_open_clip.py --caption-tokens``).

The cut is the same on every process (one all-reduce of one number per step), so the tokens every process
gathers (FILIP) keep one shape, and a run on N processes sees the lengths one process would. It is rounded up to
a multiple of 8 (steadier matrix shapes, and few distinct shapes for ``train.compile``). Only a text tower that
says it accepts a sequence shorter than its context (``accepts_shorter_context = True``: the built-in
``transformer``) is given one; a plugin's tower keeps the full length unless it says so too. One difference:
FILIP's token drop draws its random numbers over the cut columns, so its draws differ from a full-length run's
(the same distribution).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["PAD_MULTIPLE", "longest_caption", "cut_length", "trim_padding", "accepts_shorter_context"]

PAD_MULTIPLE = 8


def longest_caption(token_mask: torch.Tensor) -> int:
    """One past the last column of ``token_mask`` [B, L] holding a real token of any caption (0 for none)."""
    used = token_mask.bool().any(dim=0)  # [L]
    if not bool(used.any()):
        return 0
    return int(used.nonzero().max()) + 1


def cut_length(longest: int, context: int, multiple: int = PAD_MULTIPLE) -> int:
    """``longest`` rounded up to ``multiple``, at least ``multiple`` and at most ``context``."""
    return min(context, max(multiple, math.ceil(longest / multiple) * multiple))


def accepts_shorter_context(module: Any) -> bool:
    """Whether the training module's text tower takes token ids shorter than its context length."""
    model = getattr(module, "model", module)
    return bool(getattr(type(getattr(model, "text", None)), "accepts_shorter_context", False))


def trim_padding(engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with ``token_ids`` and ``token_mask`` cut to the global batch's longest caption (collective
    when the engine has several processes: every process must call it)."""
    mask = batch.get("token_mask")
    if mask is None or "token_ids" not in batch or mask.ndim != 2:
        return batch
    context = mask.shape[1]
    length = cut_length(engine.all_reduce_max(longest_caption(mask)), context)
    if length >= context:
        return batch
    return {**batch, "token_ids": batch["token_ids"][:, :length], "token_mask": mask[:, :length]}
