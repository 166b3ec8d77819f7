"""``sparc tokenizer train``: a thin layer over :func:`sparc_kit.data.tokenizer_training.train_tokenizer`."""

from __future__ import annotations

from typing import Optional

import typer

from sparc_cli._errors import fail, reported

ORDER = 70

tokenizer_app = typer.Typer(help="Train a SentencePiece tokenizer on captions.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    data: str = typer.Option(..., "--data", help="A manifest or a shard pattern whose captions to train on."),
    vocab_size: int = typer.Option(32000, "--vocab-size", min=8, help="Upper bound on the number of pieces."),
    out: str = typer.Option(..., "--out", "-o", help="Where to write the SentencePiece model (path or URL)."),
    model_type: str = typer.Option("unigram", "--model-type", help="unigram, bpe, word or char."),
    context_length: int = typer.Option(55, "--context-length", min=2, help="Report captions longer than this."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Train on at most this many captions."),
    lowercase: bool = typer.Option(True, "--lowercase/--no-lowercase", help="Lowercase captions (the default)."),
) -> None:
    """Train a SentencePiece tokenizer on the captions of a dataset (no image is read)."""
    from sparc_kit.data.tokenizer_training import MODEL_TYPES, train_tokenizer

    if model_type not in MODEL_TYPES:  # before the data is read
        fail(f"--model-type must be unigram, bpe, word or char, got {model_type!r}")
    with reported():
        trained = train_tokenizer(
            data,
            out,
            vocab_size=vocab_size,
            model_type=model_type,
            context_length=context_length,
            limit=limit,
            lowercase=lowercase,
        )
    typer.echo(
        f"wrote {out}: {model_type} tokenizer with {trained.tokenizer.vocab_size} pieces from {trained.captions} "
        f"captions; {trained.truncated_fraction:.1%} longer than context length {context_length}"
    )
