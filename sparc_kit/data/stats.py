"""Numbers that describe a data set: counts, caption lengths, image sizes (``sparc data inspect``).

:func:`inspect_dataset` returns them as a JSON-ready dict; :func:`format_report` as the lines the command prints.
"""

from __future__ import annotations

import io
import math
import statistics
from collections import Counter
from typing import Any

from PIL import Image

from sparc_kit.data.manifest import ManifestDataset
from sparc_kit.data.tokenizer import Tokenizer
from sparc_kit.data.records import iter_records, open_source
from sparc_kit.errors import DataError

__all__ = ["inspect_dataset", "format_report", "summary", "histogram"]


def summary(values: list[int]) -> dict[str, float]:
    """``min``, ``median``, ``mean`` (2 decimals), ``p95`` (nearest rank) and ``max`` of non-empty ``values``."""
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "mean": round(statistics.fmean(ordered), 2),
        "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


def histogram(values: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """``(low, high, count)`` of about ``bins`` equal integer ranges from the smallest value to the largest."""
    lo, hi = min(values), max(values)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = Counter((v - lo) // width for v in values)
    return [(lo + b * width, lo + (b + 1) * width - 1, counts.get(b, 0)) for b in range((hi - lo) // width + 1)]


def inspect_dataset(
    path: str, *, limit: int | None = 2000, tokenizer: str | None = None, context_length: int = 55
) -> dict[str, Any]:
    """Counts, caption lengths (words, or pieces of the SentencePiece model ``tokenizer`` plus its end token,
    untruncated, with how many exceed ``context_length``) and the sizes, modes and formats of the images of the
    first ``limit`` samples (None: all)."""
    ds = open_source(path)
    try:
        tok = Tokenizer.load(tokenizer, context_length=context_length) if tokenizer else None
    except FileNotFoundError:
        raise DataError(f"tokenizer not found: {tokenizer}") from None
    captions = list(ds.captions())
    if tok:  # untruncated piece counts, so captions longer than the context can be reported
        lengths = [tok.length(c) for c in captions]
    else:
        lengths = [len(c.split()) for c in captions]
    report: dict[str, Any] = {"path": path, "kind": "manifest" if isinstance(ds, ManifestDataset) else "webdataset"}
    if isinstance(ds, ManifestDataset):
        report.update(samples=len(ds), bad_lines=len(ds.bad_rows))
        report["captions_per_sample"] = summary([len(ds.valid_captions(i)) for i in range(len(ds))])
    else:
        counts = [ds.count(u) for u in ds.urls]
        report.update(shards=len(ds.urls), samples=sum(counts), samples_per_shard=summary(counts))
    report["captions"] = len(captions)
    if lengths:
        report["caption_length"] = {"unit": "tokens" if tok else "words", **summary(lengths)}
        report["caption_length_histogram"] = [[a, b, n] for a, b, n in histogram(lengths)]
    if tok:
        report["longer_than_context"] = sum(n > context_length for n in lengths)
    report["images"] = _image_stats(ds, limit)
    return report


def _image_stats(ds, limit: int | None) -> dict[str, Any]:
    widths, heights, modes, formats, unreadable, measured = [], [], Counter(), Counter(), 0, 0
    for record in iter_records(ds, decode=False, limit=limit):
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
        except Exception:  # whatever PIL cannot open counts as unreadable
            unreadable += 1
    return {
        "measured": measured,
        "unreadable": unreadable,
        **({"width": summary(widths), "height": summary(heights)} if widths else {}),
        "modes": dict(modes.most_common()),
        "formats": dict(formats.most_common()),
    }


def format_report(r: dict[str, Any]) -> list[str]:
    """The lines ``sparc data inspect`` prints for a report of :func:`inspect_dataset`."""
    head = f"{r['path']}: {r['kind']}, {r['samples']} samples"
    if r["kind"] == "webdataset":
        head += f" in {r['shards']} shard(s)"
    elif r["bad_lines"]:
        head += f", {r['bad_lines']} unusable line(s) (see `sparc data verify`)"
    lines = [head, f"captions: {r['captions']}"]
    if "caption_length" in r:
        s = r["caption_length"]
        lines.append(
            f"caption length ({s['unit']}): min {s['min']}  median {s['median']}  mean {s['mean']}  "
            f"p95 {s['p95']}  max {s['max']}"
        )
        top = max(n for _, _, n in r["caption_length_histogram"]) or 1
        for a, b, n in r["caption_length_histogram"]:
            label = f"{a}" if a == b else f"{a}-{b}"
            lines.append(f"  {label:>9} {'#' * max(1 if n else 0, round(40 * n / top)):<40} {n}")
    if "longer_than_context" in r:
        lines.append(f"longer than the context length: {r['longer_than_context']}")
    im = r["images"]
    line = f"images (first {im['measured']}): {im['unreadable']} unreadable"
    if "width" in im:
        w, h = im["width"], im["height"]
        line += (
            f"; width {w['min']}-{w['max']} (median {w['median']}), height {h['min']}-{h['max']} "
            f"(median {h['median']}); modes {', '.join(f'{k} {v}' for k, v in im['modes'].items())}"
        )
    return lines + [line]
