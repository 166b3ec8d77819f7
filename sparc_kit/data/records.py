"""Every sample of a data set as it is stored, readable or not: what ``sparc data inspect|verify|convert`` walk.

:func:`open_source` opens a manifest or webdataset shards from a path alone, at native image size and in file
order; :func:`iter_records` yields one record per sample with the reason when it cannot be used;
:func:`verify` decodes every sample and lists the unusable lines and samples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from sparc_kit.data.factory import is_shard_pattern, open_dataset
from sparc_kit.data.manifest import ManifestDataset
from sparc_kit.data.transforms import BadImageError

__all__ = ["open_source", "iter_records", "verify", "VerifyReport"]


def open_source(path: str):
    """The manifest (``.jsonl`` / ``.csv``) or webdataset shards at ``path`` (local or any fsspec URL), images at
    their native size, shards in file order (no shuffle buffer). A manifest's unusable lines are in its
    ``bad_rows``, which the callers report, so its warning about them is not raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_shard_pattern(path):
            return open_dataset(path, image_size=None, shuffle_buffer=0)
        return open_dataset(path)


def iter_records(ds, decode: bool = False, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One record per sample of ``ds`` (from :func:`open_source`) in file order, up to ``limit``: ``key`` (a
    manifest's ``line N (IMAGE)``, a shard's ``SHARD:KEY``), then ``skip`` (the reason it cannot be used) or
    ``caption`` and ``image_bytes`` (a manifest's also ``index``), plus ``image`` (a tensor) when ``decode``; a
    sample whose image does not decode is then a ``skip``."""
    if isinstance(ds, ManifestDataset):
        yield from _manifest_records(ds, decode, limit)
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
                out = _decoded(ds, out)
        yield out


def _manifest_records(ds: ManifestDataset, decode: bool, limit: int | None) -> Iterator[dict[str, Any]]:
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
        except Exception as exc:  # network errors, permissions, a folder where an image should be
            yield {"key": key, "skip": f"cannot read {ds.image_path(i)}: {exc}"}
            continue
        record = {"key": key, "caption": caption, "image_bytes": data, "index": i}
        yield _decoded(ds, record) if decode else record


def _decoded(ds, record: dict[str, Any]) -> dict[str, Any]:
    try:
        return {**record, "image": ds.transform(record["image_bytes"])}
    except BadImageError as exc:
        return {"key": record["key"], "skip": str(exc)}


@dataclass
class VerifyReport:
    """What :func:`verify` found: ``checked`` samples decoded, ``unreadable`` lines (``KEY: reason``)."""

    path: str
    kind: str  # "manifest" or "webdataset"
    checked: int = 0
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "lines and samples" if self.kind == "manifest" else "samples"
        return f"{self.path}: {self.checked} samples checked, {len(self.unreadable)} unreadable {what}"


def verify(path: str) -> VerifyReport:
    """Decode every sample of the data set at ``path``; a manifest's unusable lines come first."""
    ds = open_source(path)
    manifest = isinstance(ds, ManifestDataset)
    report = VerifyReport(path, "manifest" if manifest else "webdataset")
    if manifest:
        report.unreadable += [f"line {n}: {reason}" for n, reason in ds.bad_rows]
    for record in iter_records(ds, decode=True):
        report.checked += 1
        if "skip" in record:
            report.unreadable.append(f"{record['key']}: {record['skip']}")
    return report
