"""Training a SentencePiece tokenizer on the captions of a data set (``sparc tokenizer train``).

:func:`train_tokenizer` reads the captions of a manifest or of webdataset shards (no image), trains
:class:`~sparc_kit.data.Tokenizer` on them and saves it; what SentencePiece refuses (a vocabulary too small for
the captions' characters) is a :class:`~sparc_kit.errors.DataError` in one line, like any other bad input.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparc_kit.data.records import open_source
from sparc_kit.data.tokenizer import Tokenizer
from sparc_kit.errors import DataError

__all__ = ["train_tokenizer", "TrainedTokenizer", "MODEL_TYPES"]

MODEL_TYPES = ("unigram", "bpe", "word", "char")


@dataclass
class TrainedTokenizer:
    tokenizer: Tokenizer
    captions: int  # how many it was trained on
    truncated_fraction: float  # of those captions, the share longer than the context length


def train_tokenizer(
    data: str,
    out: str,
    *,
    vocab_size: int = 32000,
    model_type: str = "unigram",
    context_length: int = 55,
    limit: int | None = None,
    lowercase: bool = True,
) -> TrainedTokenizer:
    """Train on the first ``limit`` captions (None: all) of the data set at ``data`` and write the model to
    ``out`` (a path or URL); ``vocab_size`` is an upper bound."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    captions = list(open_source(data).captions(limit))
    if not captions:
        raise DataError(f"no captions in {data}")
    try:
        tok = Tokenizer.train(
            captions, vocab_size=vocab_size, context_length=context_length, model_type=model_type, lowercase=lowercase
        )
    except RuntimeError as exc:  # SentencePiece's refusal, e.g. "Vocabulary size is smaller than required_chars"
        raise DataError(str(exc).splitlines()[0] if str(exc) else "SentencePiece refused") from None
    tok.save(out)
    return TrainedTokenizer(tok, len(captions), tok.truncated_fraction(captions))
