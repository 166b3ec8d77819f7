"""What every tokenizer of a run shares, whatever its vocabulary: writing its file (atomically when local, any
fsspec URL otherwise), the truncation count and the ``(ids, mask)`` call. :class:`~sparc_kit.data.tokenizer.Tokenizer`
(SentencePiece) and :class:`~sparc_kit.data.clip_tokenizer.OpenClipTokenizer` (CLIP's BPE) build on it."""

from __future__ import annotations

from typing import Iterable

import fsspec
import torch

from sparc_kit.data.filesystems import check_url
from sparc_kit.io import atomic_write

__all__ = ["TokenizerBase"]


class TokenizerBase:
    """A subclass defines ``file_bytes()`` (what ``save`` writes and its ``load`` reads back), ``length`` (a
    text's ids before any cut, its special tokens included), ``piece`` (an id's text) and ``tokenize``; it has a
    ``context_length``."""

    context_length: int

    def file_bytes(self) -> bytes:
        raise NotImplementedError

    def length(self, text: str) -> int:
        raise NotImplementedError

    def piece(self, token_id: int) -> str:
        raise NotImplementedError

    def is_truncated(self, text: str) -> bool:
        """Whether ``text`` does not fit ``context_length`` and loses its end."""
        return self.length(text) > self.context_length

    def tokenize(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Write the tokenizer's file: atomically (temporary file, then rename) when ``path`` is local."""
        data = self.file_bytes()
        if "://" in path:
            check_url(path, "tokenizer.path")
            with fsspec.open(path, "wb") as f:
                f.write(data)
            return
        atomic_write(path, data)

    def truncated_fraction(self, texts: Iterable[str]) -> float:
        """The fraction of ``texts`` that do not fit ``context_length`` and lose their end."""
        texts = list(texts)
        return sum(self.is_truncated(t) for t in texts) / max(len(texts), 1)

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token_ids [B, context_length] long, token_mask [B, context_length] bool)``."""
        ids, mask, _ = self.tokenize(texts)
        return ids, mask
