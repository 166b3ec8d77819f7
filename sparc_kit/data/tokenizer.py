"""SentencePiece tokenizer: trained on the fly from training captions, or loaded from a file (any fsspec URL).

Ids: 0 = padding, 1 = unknown, 2 = begin, 3 = end of caption. A caption becomes ``context_length`` ids with the
end token last (kept when a long caption is truncated) and padding after it; the mask marks real tokens.
"""

from __future__ import annotations

import io
from typing import Iterable

import fsspec
import sentencepiece as spm
import torch

from sparc_kit.data.clip_tokenizer import CLIP_MAGIC, OpenClipTokenizer
from sparc_kit.data.filesystems import check_url
from sparc_kit.data.tokenizer_base import TokenizerBase
from sparc_kit.errors import DataError

__all__ = ["Tokenizer", "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(TokenizerBase):
    """A SentencePiece model plus the padding / truncation policy of the text tower."""

    def __init__(self, model_proto: bytes, context_length: int = 55, lowercase: bool = True, add_eos: bool = True):
        self.model_proto = model_proto
        self.context_length = context_length
        self.lowercase = lowercase
        self.add_eos = add_eos
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    # --------------------------------------------------------------------------------------------- building
    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int = 32000,
        context_length: int = 55,
        model_type: str = "unigram",
        lowercase: bool = True,
        add_eos: bool = True,
    ) -> "Tokenizer":
        """Train on ``captions``. ``vocab_size`` is an upper bound: a small corpus yields fewer pieces."""
        texts = [c.lower() if lowercase else c for c in captions if c and c.strip()]
        if not texts:
            raise DataError("cannot train a tokenizer: no non-empty captions")
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            hard_vocab_limit=False,
            character_coverage=1.0,
            num_threads=1,  # deterministic pieces for the same captions
            minloglevel=2,
        )
        return cls(buffer.getvalue(), context_length=context_length, lowercase=lowercase, add_eos=add_eos)

    @classmethod
    def load(cls, path: str, context_length: int = 55, lowercase: bool = True, add_eos: bool = True) -> "Tokenizer":
        check_url(path, "tokenizer.path")
        with fsspec.open(path, "rb") as f:
            proto = f.read()
        if proto.startswith(CLIP_MAGIC):  # a run of tokenizer.kind: open_clip keeps CLIP's BPE vocabulary here
            return OpenClipTokenizer.from_file_bytes(proto, context_length=context_length)  # type: ignore[return-value]
        return cls(proto, context_length=context_length, lowercase=lowercase, add_eos=add_eos)

    def file_bytes(self) -> bytes:
        """The SentencePiece model (what :meth:`save` writes)."""
        return self.model_proto

    # ------------------------------------------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Ids of one caption, truncated to ``context_length`` (the end token survives truncation)."""
        ids = self.sp.encode(text.lower() if self.lowercase else text)
        limit = self.context_length - (1 if self.add_eos else 0)
        ids = ids[:limit]
        return ids + [EOS_ID] if self.add_eos else ids

    def length(self, text: str) -> int:
        """The ids of ``text`` before any cut: its pieces, and the end token when ``add_eos``."""
        return len(self.sp.encode(text.lower() if self.lowercase else text)) + (1 if self.add_eos else 0)

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])

    def tokenize(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Like calling the tokenizer, plus how many of ``texts`` were truncated."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        limit = self.context_length - (1 if self.add_eos else 0)
        truncated = 0
        for row, text in enumerate(texts):
            pieces = self.sp.encode(text.lower() if self.lowercase else text)
            truncated += len(pieces) > limit
            encoded = pieces[:limit] + ([EOS_ID] if self.add_eos else [])
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        return ids, ids != PAD_ID, truncated

    def __getstate__(self):  # picklable for data-loader workers
        return {k: v for k, v in self.__dict__.items() if k != "sp"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
