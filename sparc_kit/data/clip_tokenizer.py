"""CLIP's BPE tokenizer (``tokenizer.kind: open_clip``): the ids open_clip's CLIP weights were trained with.

It uses open_clip's own tokenizer and the BPE vocabulary bundled inside the ``open_clip_torch`` package (nothing
is downloaded); open_clip is imported only when such a tokenizer is made. A caption becomes
``[start] words [end]`` then padding 0, the end token last also when a long caption is cut (open_clip's
convention); the mask marks the positions up to the end token, since id 0 is also a word of CLIP's vocabulary.

A run folder keeps the vocabulary in its ``tokenizer.model`` (a header line, then the gzipped BPE merges), so
:meth:`sparc_kit.data.tokenizer.Tokenizer.load` reads it back as this tokenizer.
"""

from __future__ import annotations

import io
from typing import Iterable

import torch

from sparc_kit.data.tokenizer_base import TokenizerBase
from sparc_kit.errors import DataError

__all__ = ["OpenClipTokenizer", "CLIP_MAGIC", "CLIP_VOCAB_SIZE", "CLIP_SOT_ID", "CLIP_EOT_ID"]

CLIP_MAGIC = b"sparc-kit open_clip bpe tokenizer\n"
CLIP_VOCAB_SIZE = 49408
CLIP_SOT_ID, CLIP_EOT_ID = 49406, 49407


def _open_clip_tokenizer_module():
    try:
        from open_clip import tokenizer as module
    except ImportError as exc:
        raise DataError(
            "tokenizer.kind: open_clip needs the open_clip_torch package (pip install 'open_clip_torch>=3.0'); its "
            f"bundled BPE vocabulary is used, nothing is downloaded ({exc})"
        ) from None
    return module


class OpenClipTokenizer(TokenizerBase):
    """CLIP's BPE with the interface of :class:`~sparc_kit.data.tokenizer.Tokenizer` (``tokenize``, ``__call__``,
    ``encode``, ``decode``, ``save``, ``vocab_size``, ``context_length``)."""

    lowercase = True  # CLIP's text cleaning lower-cases
    add_eos = True

    def __init__(self, context_length: int = 77, merges: bytes | None = None):
        module = _open_clip_tokenizer_module()
        if merges is None:
            with open(module.default_bpe(), "rb") as f:
                merges = f.read()
        self.merges = merges
        self.context_length = context_length
        self._make()

    def _make(self) -> None:
        module = _open_clip_tokenizer_module()
        self.bpe = module.SimpleTokenizer(bpe_path=io.BytesIO(self.merges), context_length=self.context_length)
        if (self.bpe.sot_token_id, self.bpe.eot_token_id) != (CLIP_SOT_ID, CLIP_EOT_ID):
            raise DataError(f"open_clip's BPE vocabulary has unexpected special ids {self.bpe.all_special_ids}")

    @classmethod
    def from_file_bytes(cls, data: bytes, context_length: int = 77) -> "OpenClipTokenizer":
        """From what :meth:`save` wrote (a run folder's ``tokenizer.model``)."""
        return cls(context_length=context_length, merges=data[len(CLIP_MAGIC):])

    def file_bytes(self) -> bytes:
        """A header line, then the gzipped BPE merges (what :meth:`save` writes)."""
        return CLIP_MAGIC + self.merges

    @property
    def vocab_size(self) -> int:
        return int(self.bpe.vocab_size)

    def _pieces(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def _wrap(self, pieces: list[int]) -> list[int]:
        """``[start] pieces [end]``, cut to ``context_length`` with the end token kept last."""
        return [CLIP_SOT_ID, *pieces][: self.context_length - 1] + [CLIP_EOT_ID]

    def encode(self, text: str) -> list[int]:
        """``[start] words [end]``, cut to ``context_length`` with the end token kept last."""
        return self._wrap(self._pieces(text))

    def length(self, text: str) -> int:
        """The ids of ``text`` before any cut: its pieces, the start and the end token."""
        return len(self._pieces(text)) + 2

    def piece(self, token_id: int) -> str:
        return self.bpe.decoder.get(int(token_id), "")

    def decode(self, ids: Iterable[int]) -> str:
        kept = [int(i) for i in ids]
        if CLIP_EOT_ID in kept:
            kept = kept[: kept.index(CLIP_EOT_ID)]
        return self.bpe.decode([i for i in kept if i != CLIP_SOT_ID]).strip()

    def tokenize(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(ids [B, context_length], mask [B, context_length], how many were cut)``; padding is 0 after the end
        token, and the mask is True up to and including it."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        mask = torch.zeros(len(texts), self.context_length, dtype=torch.bool)
        truncated = 0
        for row, text in enumerate(texts):
            pieces = self._pieces(text)  # once: BPE is the costly part, run per caption of every batch
            truncated += len(pieces) + 2 > self.context_length
            encoded = self._wrap(pieces)
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
            mask[row, : len(encoded)] = True
        return ids, mask, truncated

    def __getstate__(self):  # picklable for data-loader workers
        return {"merges": self.merges, "context_length": self.context_length}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._make()
