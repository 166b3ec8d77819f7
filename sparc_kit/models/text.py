"""A native text Transformer that returns one feature per token."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import PositiveFloat, PositiveInt

from sparc_kit.models.attention import (
    TransformerTower,
    Transformer,
    attention_mask,
    divisibility_problems,
    init_weights,
    transformer_parameter_count,
)
from sparc_kit.registry import text_encoders


def check_text_transformer(recipe: Any, path: str) -> list[str]:
    t = recipe.model.text
    return divisibility_problems(path, t.width, t.heads)

__all__ = [
    "TextTransformer", "PAD_MULTIPLE", "longest_caption", "cut_length", "cut_padding", "accepts_shorter_context",
]

#: a cut length is rounded up to this (steadier matrix shapes; few distinct shapes for torch.compile)
PAD_MULTIPLE = 8


def longest_caption(token_mask: torch.Tensor) -> int:
    """One past the last column of ``token_mask`` [B, L] holding a real token of any caption (0 for none); one
    device-to-host read."""
    used = token_mask.bool().any(dim=0)  # [L]
    columns = torch.arange(1, used.numel() + 1, device=used.device)
    return int((columns * used).max()) if used.numel() else 0


def accepts_shorter_context(text_tower: Any) -> bool:
    """Whether a text tower takes token ids shorter than its context length (its class says so)."""
    return bool(getattr(type(text_tower), "accepts_shorter_context", False))


def cut_length(longest: int, context: int, multiple: int = PAD_MULTIPLE) -> int:
    """``longest`` rounded up to ``multiple``, at least ``multiple`` and at most ``context``."""
    return min(context, max(multiple, -(-longest // multiple) * multiple))


def cut_padding(token_ids: torch.Tensor, token_mask: torch.Tensor, length: int | None = None):
    """``token_ids`` and ``token_mask`` [B, L] without the columns that are padding in every caption (cut at
    ``length`` when given, else at :func:`cut_length` of this batch's longest caption). For a text tower that
    accepts a shorter sequence (``accepts_shorter_context``) the real tokens' features are the same: padded
    positions are masked as keys, and come after every real token under a causal mask."""
    context = token_ids.shape[1]
    if length is None:
        length = cut_length(longest_caption(token_mask), context)
    if length >= context:
        return token_ids, token_mask
    return token_ids[:, :length], token_mask[:, :length]


@text_encoders.register(
    "transformer",
    supplied=("vocab_size", "context_length", "attention", "grad_checkpointing"),
    check=check_text_transformer,
)
class TextTransformer(TransformerTower):
    """Pre-LN text Transformer with learned positions. ``forward`` returns token features [B, L, W].

    ``vocab_size`` and ``context_length`` default to the tokenizer's (the recipe's ``tokenizer`` section), so the
    embedding table always matches the tokenizer. ``causal`` selects a CLIP-style causal mask; the default is
    bidirectional, so every token's embedding sees the whole caption before it is grouped with patches.
    ``embed_init_std``: the standard deviation of the token embedding's normal initialisation. CLIP's 0.02 makes
    a token's own identity small beside what attention mixes in from the rest of the caption under this pre-LN
    tower; see docs/results.md for what it costs at small scale.
    ``act`` (``quick_gelu`` for OpenAI's CLIP weights) and ``norm_eps`` as in the native ViT. The final LayerNorm
    is applied to every token (CLIP's ``ln_final``). Paper size: width 768, depth 12, heads 12, 55 tokens.
    """

    accepts_shorter_context = True  # token ids [B, n] with n < context_length: train.pad_to: longest cuts them

    def __init__(
        self,
        vocab_size: int | None = None,
        context_length: int | None = None,
        width: PositiveInt = 768,
        depth: PositiveInt = 12,
        heads: PositiveInt = 12,
        mlp_ratio: PositiveFloat = 4.0,
        causal: bool = False,
        embed_init_std: PositiveFloat = 0.02,
        act: Literal["gelu", "quick_gelu"] = "gelu",
        norm_eps: PositiveFloat = 1e-5,
        attention: str = "auto",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if vocab_size is None or context_length is None:
            raise ValueError("TextTransformer needs vocab_size and context_length (build_model fills them in)")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.causal = causal
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio, attention, act, norm_eps)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.apply(init_weights)
        nn.init.normal_(self.token_embed.weight, std=embed_init_std)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.set_grad_checkpointing(grad_checkpointing)

    @staticmethod
    def parameter_count(section: Any, recipe: Any) -> int:
        """The parameters of a ``transformer`` recipe section (vocabulary and context from the tokenizer section),
        counted from its layers without building it."""
        w = section.width
        vocab, context = recipe.tokenizer.vocab_size, recipe.tokenizer.context_length
        return vocab * w + context * w + 2 * w + transformer_parameter_count(w, section.depth, section.mlp_ratio)

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        n = token_ids.shape[1]
        if n > self.context_length:
            raise ValueError(f"got {n} tokens, the text encoder's context_length is {self.context_length}")
        x = self.token_embed(token_ids) + self.pos_embed[:, :n]
        mask = attention_mask(token_mask, n, self.causal, token_ids.device)
        return self.norm(self.transformer(x, mask))
