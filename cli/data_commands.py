"""``sparc data inspect|verify|convert`` and ``sparc tokenizer train``.

PATH is a manifest (``.jsonl`` / ``.csv``) or a webdataset shard pattern (``shards/train-{000..009}.tar``), local
or any fsspec URL (S3 endpoints and credentials through fsspec's usual environment variables, e.g.
``FSSPEC_S3_ENDPOINT_URL``). Bad input is one ``error:`` line and exit 2; ``verify`` exits 1 when any sample is
unreadable.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import statistics
import tarfile
import warnings
from collections import Counter
from typing import Any, Iterator, Optional

import typer

data_app = typer.Typer(
    help="Inspect, verify and convert image-text data (manifests and webdataset shards).", no_args_is_help=True
)
tokenizer_app = typer.Typer(help="Train a SentencePiece tokenizer on captions.", no_args_is_help=True)

__all__ = ["data_app", "tokenizer_app", "add_to"]


def add_to(app: typer.Typer) -> None:
    """Mount ``sparc data`` and ``sparc tokenizer`` on the main app."""
    app.add_typer(data_app, name="data")
    app.add_typer(tokenizer_app, name="tokenizer")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors():
    """Known problems with the input become one ``error:`` line (exit 2), never a traceback."""
    from sparc_kit.data import ManifestError, ShardError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bad manifest lines are reported by the commands themselves
            yield
    except (ManifestError, ShardError) as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(f"not found: {exc.filename or exc}")
    except (ValueError, OSError, ImportError, RuntimeError) as exc:
        _fail(f"{exc}".splitlines()[0] if str(exc) else type(exc).__name__)


def _open(path: str):
    from sparc_kit.data import open_dataset

    return open_dataset(path, image_size=None, shuffle_buffer=0) if _is_shards(path) else open_dataset(path)


def _is_shards(path: str) -> bool:
    from sparc_kit.data import is_shard_pattern

    return is_shard_pattern(path)


# ------------------------------------------------------------------------------------------------ records
def _records(ds, decode: bool, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One record per sample in file order: ``key``, then ``skip`` or ``caption`` + ``image_bytes`` / ``image``."""
    from sparc_kit.data import ManifestDataset
    from sparc_kit.data.transforms import BadImageError

    if isinstance(ds, ManifestDataset):
        for i in range(len(ds) if limit is None else min(limit, len(ds))):
            key = f"{ds.keys[i]} ({ds.images[i]})"
            caption = ds.caption_for(i, 0)
            if caption is None:
                yield {"key": key, "skip": "no usable caption (empty or not a string)"}
                continue
            try:
                data = ds.read_bytes(i)
            except FileNotFoundError:
                yield {"key": key, "skip": f"image not found: {ds.image_path(i)}"}
                continue
            except Exception as exc:
                yield {"key": key, "skip": f"cannot read {ds.image_path(i)}: {exc}"}
                continue
            record = {"key": key, "caption": caption, "image_bytes": data, "index": i}
            if decode:
                try:
                    record["image"] = ds.transform(data)
                except BadImageError as exc:
                    record = {"key": key, "skip": str(exc)}
            yield record
        return
    count = 0
    for record in ds.scan(decode=False):
        if limit is not None and count >= limit:
            return
        count += 1
        shard = record["shard"].rsplit("/", 1)[-1]
        out = {"key": f"{shard}:{record['key']}"}
        if "skip" in record:
            out["skip"] = record["skip"].split(": ", 1)[1] if ": " in record["skip"] else record["skip"]
        else:
            out.update(caption=record["caption"], image_bytes=record["image_bytes"])
            if decode:
                try:
                    out["image"] = ds.transform(record["image_bytes"])
                except BadImageError as exc:
                    out = {"key": out["key"], "skip": str(exc)}
        yield out


def _describe(ds) -> str:
    from sparc_kit.data import ManifestDataset

    if isinstance(ds, ManifestDataset):
        return f"manifest ({ds.format}), {len(ds)} samples"
    return f"webdataset, {len(ds.urls)} shard(s)"


# ---------------------------------------------------------------------------------------------------- inspect
def _histogram(values: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    lo, hi = min(values), max(values)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = Counter((v - lo) // width for v in values)
    return [(lo + b * width, lo + (b + 1) * width - 1, counts.get(b, 0)) for b in range((hi - lo) // width + 1)]


def _stats(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "mean": round(statistics.fmean(ordered), 2),
        "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


@data_app.command("inspect")
def inspect(
    path: str = typer.Argument(..., help="A manifest (.jsonl/.csv) or a shard pattern (train-{000..009}.tar)."),
    limit: int = typer.Option(2000, "--limit", "-n", help="Samples whose images are measured (0: all)."),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="A tokenizer.model: caption lengths in its tokens instead of words."
    ),
    context_length: int = typer.Option(55, "--context-length", help="With --tokenizer: report longer captions."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Counts, caption length histogram and image size statistics."""
    from PIL import Image

    from sparc_kit.data import ManifestDataset, Tokenizer

    with _errors():
        ds = _open(path)
        tok = Tokenizer.load(tokenizer, context_length=context_length) if tokenizer else None
        captions = list(ds.captions())
        unit = "tokens" if tok else "words"
        # untruncated piece counts (+1 for the end token), so captions longer than the context can be reported
        lengths = [len(tok.sp.encode(c.lower() if tok.lowercase else c)) + tok.add_eos if tok else len(c.split()) for c in captions]
        report: dict[str, Any] = {"path": path, "kind": "manifest" if isinstance(ds, ManifestDataset) else "webdataset"}
        if isinstance(ds, ManifestDataset):
            report.update(samples=len(ds), bad_lines=len(ds.bad_rows))
            per_image = [len(ds.valid_captions(i)) for i in range(len(ds))]
            report["captions_per_sample"] = _stats(per_image)
        else:
            counts = [ds.count(u) for u in ds.urls]
            report.update(shards=len(ds.urls), samples=sum(counts), samples_per_shard=_stats(counts))
        report["captions"] = len(captions)
        if lengths:
            report["caption_length"] = {"unit": unit, **_stats(lengths)}
            report["caption_length_histogram"] = [[a, b, n] for a, b, n in _histogram(lengths)]
        if tok:
            report["longer_than_context"] = sum(n > context_length for n in lengths)
        widths, heights, modes, formats, unreadable, measured = [], [], Counter(), Counter(), 0, 0
        for record in _records(ds, decode=False, limit=limit or None):
            measured += 1
            if "skip" in record:
                unreadable += 1
                continue
            try:
                with Image.open(io.BytesIO(record["image_bytes"])) as im:
                    widths.append(im.size[0])
                    heights.append(im.size[1])
                    modes[im.mode] += 1
                    formats[im.format or "?"] += 1
            except Exception:
                unreadable += 1
        report["images"] = {
            "measured": measured,
            "unreadable": unreadable,
            **({"width": _stats(widths), "height": _stats(heights)} if widths else {}),
            "modes": dict(modes.most_common()),
            "formats": dict(formats.most_common()),
        }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(report)


def _print_report(r: dict[str, Any]) -> None:
    head = f"{r['path']}: {r['kind']}, {r['samples']} samples"
    if r["kind"] == "webdataset":
        head += f" in {r['shards']} shard(s)"
    elif r["bad_lines"]:
        head += f", {r['bad_lines']} unusable line(s) (see `sparc data verify`)"
    typer.echo(head)
    typer.echo(f"captions: {r['captions']}")
    if "caption_length" in r:
        s = r["caption_length"]
        typer.echo(
            f"caption length ({s['unit']}): min {s['min']}  median {s['median']}  mean {s['mean']}  "
            f"p95 {s['p95']}  max {s['max']}"
        )
        top = max(n for _, _, n in r["caption_length_histogram"]) or 1
        for a, b, n in r["caption_length_histogram"]:
            label = f"{a}" if a == b else f"{a}-{b}"
            typer.echo(f"  {label:>9} {'#' * max(1 if n else 0, round(40 * n / top)):<40} {n}")
    if "longer_than_context" in r:
        typer.echo(f"longer than the context length: {r['longer_than_context']}")
    im = r["images"]
    line = f"images (first {im['measured']}): {im['unreadable']} unreadable"
    if "width" in im:
        w, h = im["width"], im["height"]
        line += (
            f"; width {w['min']}-{w['max']} (median {w['median']}), height {h['min']}-{h['max']} "
            f"(median {h['median']}); modes {', '.join(f'{k} {v}' for k, v in im['modes'].items())}"
        )
    typer.echo(line)


# ----------------------------------------------------------------------------------------------------- verify
@data_app.command("verify")
def verify(
    path: str = typer.Argument(..., help="A manifest (.jsonl/.csv) or a shard pattern (train-{000..009}.tar)."),
) -> None:
    """Decode every sample; list the unreadable ones with reasons (exit 1 if there are any)."""
    from sparc_kit.data import ManifestDataset

    bad: list[str] = []
    total = 0
    with _errors():
        ds = _open(path)
        if isinstance(ds, ManifestDataset):
            bad += [f"line {n}: {reason}" for n, reason in ds.bad_rows]
        for record in _records(ds, decode=True):
            total += 1
            if "skip" in record:
                bad.append(f"{record['key']}: {record['skip']}")
    for line in bad:
        typer.echo(f"unreadable: {line}")
    what = "lines and samples" if isinstance(ds, ManifestDataset) else "samples"
    typer.echo(f"{path}: {total} samples checked, {len(bad)} unreadable {what}")
    if bad:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------- convert
_PRINTF = re.compile(r"%(0?)(\d*)d")


def _shard_names(pattern: str) -> tuple[str, str]:
    m = _PRINTF.search(pattern)
    if not m or len(_PRINTF.findall(pattern)) != 1:
        raise ValueError(f"OUT_PATTERN needs one %d-style shard number, e.g. shards/train-%06d.tar; got {pattern!r}")
    return pattern, m.group(0)


def _brace(pattern: str, count: int) -> str:
    m = _PRINTF.search(pattern)
    width = int(m.group(2) or 0) if m.group(1) else 0
    lo, hi = str(0).zfill(width), str(count - 1).zfill(width)
    return pattern[: m.start()] + (lo if count == 1 else f"{{{lo}..{hi}}}") + pattern[m.end() :]


class _ShardWriter:
    """Tar shards of ``shard_size`` samples; local ones written to a temporary name then renamed."""

    def __init__(self, pattern: str, shard_size: int, storage_options: dict | None = None):
        from sparc_kit.data.filesystems import check_url

        check_url(pattern, "OUT_PATTERN")  # before any sample is read, not at the first shard
        self.pattern, self.shard_size = pattern, shard_size
        self.storage_options = storage_options or {}
        self.index, self.in_shard = 0, 0
        self.tar = self.file = None
        self.path = self.tmp = None
        self.written: list[str] = []

    def _open(self) -> None:
        import fsspec

        self.path = self.pattern % self.index
        if "://" in self.path:
            self.tmp = None
            self.file = fsspec.open(self.path, "wb", **self.storage_options).open()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.tmp = self.path + ".tmp"
            self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)

    def _close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()
        if self.tmp:
            os.replace(self.tmp, self.path)
        self.written.append(self.path)
        self.tar = self.file = None
        self.index += 1
        self.in_shard = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        from sparc_kit.data.webdataset import write_sample

        if self.tar is None:
            self._open()
        write_sample(self.tar, key, files)
        self.in_shard += 1
        if self.in_shard >= self.shard_size:
            self._close()

    def close(self) -> None:
        self._close()


_EXT = {"jpeg": "jpg", "jpe": "jpg", "tif": "tiff"}


def _image_ext(name: str, data: bytes) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
    ext = _EXT.get(ext, ext)
    if ext in ("jpg", "png", "webp", "gif", "bmp", "tiff"):
        return ext
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:
        fmt = ""
    return _EXT.get(fmt, fmt) or "jpg"


@data_app.command("convert")
def convert(
    manifest: str = typer.Argument(..., help="The manifest (.jsonl/.csv) to convert."),
    out_pattern: str = typer.Argument(..., help="Shard names with one %d-style number: shards/train-%06d.tar."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Samples per shard."),
) -> None:
    """Write a manifest as webdataset shards: KEY.<image ext> (bytes as stored) + KEY.txt or KEY.json.

    One caption becomes KEY.txt; a captions list, or extra fields (label, ...), become KEY.json with
    ``caption`` / ``captions`` and those fields. Unreadable samples are left out and listed."""
    from sparc_kit.data import ManifestDataset

    with _errors():
        _shard_names(out_pattern)
        if _is_shards(manifest):
            raise ValueError(f"{manifest} is already shards; convert reads a manifest (.jsonl/.csv)")
        ds = ManifestDataset(manifest)
        writer = _ShardWriter(out_pattern, shard_size)
        skipped: list[str] = [f"line {n}: {reason}" for n, reason in ds.bad_rows]
        written = 0
        try:
            for record in _records(ds, decode=True):  # decoded, so a file that is not an image is left out
                if "skip" in record:
                    skipped.append(f"{record['key']}: {record['skip']}")
                    continue
                i = record["index"]
                texts, extras = ds.valid_captions(i), ds.extras[i]
                files = {_image_ext(ds.images[i], record["image_bytes"]): record["image_bytes"]}
                if len(texts) == 1 and not extras:
                    files["txt"] = texts[0].encode("utf-8")
                else:
                    meta = {"caption": texts[0]} if len(texts) == 1 else {"captions": texts}
                    meta.update(extras)
                    files["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                writer.write(f"{i:08d}", files)
                written += 1
        finally:
            writer.close()
    for line in skipped:
        typer.echo(f"skipped: {line}", err=True)
    if not written:
        _fail(f"no readable sample in {manifest}; nothing written", 1)
    typer.echo(
        f"wrote {written} samples in {len(writer.written)} shard(s): {_brace(out_pattern, len(writer.written))}"
        + (f" ({len(skipped)} skipped)" if skipped else "")
    )


# -------------------------------------------------------------------------------------------------- tokenizer
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
    from sparc_kit.data import Tokenizer

    if model_type not in ("unigram", "bpe", "word", "char"):
        _fail(f"--model-type must be unigram, bpe, word or char, got {model_type!r}")
    with _errors():
        ds = _open(data)
        captions = list(ds.captions(limit))
        if not captions:
            raise ValueError(f"no captions in {data}")
        tok = Tokenizer.train(
            captions, vocab_size=vocab_size, context_length=context_length, model_type=model_type, lowercase=lowercase
        )
        tok.save(out)
        cut = tok.truncated_fraction(captions)
    typer.echo(
        f"wrote {out}: {model_type} tokenizer with {tok.vocab_size} pieces from {len(captions)} captions; "
        f"{cut:.1%} longer than context length {context_length}"
    )
