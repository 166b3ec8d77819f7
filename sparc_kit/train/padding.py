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

from typing import Any

import torch

from sparc_kit.models.text import accepts_shorter_context, cut_length, cut_padding, longest_caption

__all__ = ["trims_padding", "trim_padding"]


def trims_padding(module: Any) -> bool:
    """Whether the training module's (or model's) text tower takes token ids shorter than its context length."""
    return accepts_shorter_context(getattr(getattr(module, "model", module), "text", None))


def trim_padding(engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with ``token_ids`` and ``token_mask`` cut to the global batch's longest caption (collective
    when the engine has several processes: every process must call it)."""
    mask = batch.get("token_mask")
    if mask is None or "token_ids" not in batch or mask.ndim != 2:
        return batch
    length = cut_length(engine.all_reduce_max(longest_caption(mask)), mask.shape[1])
    token_ids, token_mask = cut_padding(batch["token_ids"], mask, length)
    return {**batch, "token_ids": token_ids, "token_mask": token_mask}
