"""A native text Transformer that returns one feature per token."""

from __future__ import annotations

import torch
import torch.nn as nn

from sparc_kit.models.attention import Transformer, attention_mask, init_weights
from sparc_kit.registry import text_encoders

__all__ = ["TextTransformer"]


@text_encoders.register("transformer", internal=("vocab_size", "context_length", "attention", "grad_checkpointing"))
class TextTransformer(nn.Module):
    """Pre-LN text Transformer with learned positions. ``forward`` returns token features [B, L, W].

    ``vocab_size`` and ``context_length`` default to the tokenizer's (the recipe's ``tokenizer`` section), so the
    embedding table always matches the tokenizer. ``causal`` selects a CLIP-style causal mask; the default is
    bidirectional, so every token's embedding sees the whole caption before it is grouped with patches.
    Paper size: width 768, depth 12, heads 12, 55 tokens.
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        context_length: int | None = None,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        attention: str = "sdpa",
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
        self.transformer = Transformer(width, depth, heads, mlp_ratio, attention)
        self.norm = nn.LayerNorm(width)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def output_dim(self) -> int:
        return self.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def set_attention_backend(self, backend: str) -> None:
        self.transformer.set_backend(backend)

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        n = token_ids.shape[1]
        if n > self.context_length:
            raise ValueError(f"got {n} tokens, the text encoder's context_length is {self.context_length}")
        x = self.token_embed(token_ids) + self.pos_embed[:, :n]
        mask = attention_mask(token_mask, n, self.causal, token_ids.device)
        return self.norm(self.transformer(x, mask))
