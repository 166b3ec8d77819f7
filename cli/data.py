"""``sparc data inspect|verify|convert``: thin layers over :func:`sparc_kit.data.stats.inspect_dataset`,
:func:`sparc_kit.data.records.verify` and :func:`sparc_kit.data.shard_writer.convert_manifest`.

PATH is a manifest (``.jsonl`` / ``.csv``) or a webdataset shard pattern (``shards/train-{000..009}.tar``), local
or any fsspec URL (S3 endpoints and credentials through fsspec's usual environment variables, e.g.
``FSSPEC_S3_ENDPOINT_URL``). Bad input is one ``error:`` line and exit 2; ``verify`` exits 1 when any sample is
unreadable, ``convert`` when it could write nothing.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from sparc_cli._errors import fail, reported

ORDER = 60

data_app = typer.Typer(
    help="Inspect, verify and convert image-text data (manifests and webdataset shards).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


PATH_HELP = "A manifest (.jsonl/.csv) or a shard pattern (train-{000..009}.tar)."


@data_app.command("inspect")
def inspect(
    path: str = typer.Argument(..., help=PATH_HELP),
    limit: int = typer.Option(2000, "--limit", "-n", help="Samples whose images are measured (0: all)."),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="A tokenizer.model: caption lengths in its tokens instead of words."
    ),
    context_length: int = typer.Option(55, "--context-length", help="With --tokenizer: report longer captions."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Counts, caption length histogram and image size statistics."""
    from sparc_kit.data.stats import format_report, inspect_dataset

    with reported():
        report = inspect_dataset(path, limit=limit or None, tokenizer=tokenizer, context_length=context_length)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for line in format_report(report):
        typer.echo(line)


@data_app.command("verify")
def verify(path: str = typer.Argument(..., help=PATH_HELP)) -> None:
    """Decode every sample; list the unreadable ones with reasons (exit 1 if there are any)."""
    from sparc_kit.data.records import verify as verify_dataset

    with reported():
        report = verify_dataset(path)
    for line in report.unreadable:
        typer.echo(f"unreadable: {line}")
    typer.echo(report.summary())
    if report.unreadable:
        raise typer.Exit(1)


@data_app.command("convert")
def convert(
    manifest: str = typer.Argument(..., help="The manifest (.jsonl/.csv) to convert."),
    out_pattern: str = typer.Argument(..., help="Shard names with one %d-style number: shards/train-%06d.tar."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Samples per shard."),
) -> None:
    """Write a manifest as webdataset shards: KEY.<image ext> (bytes as stored) + KEY.txt or KEY.json.

    One caption becomes KEY.txt; a captions list, or extra fields (label, ...), become KEY.json with
    ``caption`` / ``captions`` and those fields. Unreadable samples are left out and listed."""
    from sparc_kit.data.shard_writer import convert_manifest

    with reported():
        result = convert_manifest(manifest, out_pattern, shard_size)
    for line in result.skipped:
        typer.echo(f"skipped: {line}", err=True)
    if not result.samples:
        fail(f"no readable sample in {manifest}; nothing written", 1)
    typer.echo(result.summary())
