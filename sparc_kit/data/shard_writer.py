"""Writing webdataset shards: :class:`ShardWriter`, and :func:`convert_manifest` (``sparc data convert``).

A local shard is written through :func:`sparc_kit.io.atomic_open` (a temporary file renamed into place when it
is complete), so a reader never sees half a shard, and a conversion that fails or is interrupted leaves only
complete local shards behind. A shard at a URL is written through fsspec, whose object stores publish an upload
when it is closed (the shard being written when a conversion fails is then closed as it is).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

import fsspec
from PIL import Image

from sparc_kit.data.factory import is_shard_pattern
from sparc_kit.data.filesystems import check_url
from sparc_kit.data.records import iter_records, open_source
from sparc_kit.data.webdataset import write_sample
from sparc_kit.errors import DataError
from sparc_kit.io import atomic_open

__all__ = ["ShardWriter", "convert_manifest", "ConvertResult", "check_pattern", "brace_pattern"]

_PRINTF = re.compile(r"%(0?)(\d*)d")
_EXT = {"jpeg": "jpg", "jpe": "jpg", "tif": "tiff"}


def check_pattern(pattern: str) -> None:
    """Raise :class:`~sparc_kit.errors.DataError` unless ``pattern`` holds exactly one ``%d``-style shard number."""
    if len(_PRINTF.findall(pattern)) != 1:
        raise DataError(
            f"OUT_PATTERN needs one %d-style shard number, e.g. shards/train-%06d.tar; got {pattern!r}"
        )


def brace_pattern(pattern: str, count: int) -> str:
    """The names of shards ``0 .. count-1`` of ``pattern`` as one brace pattern: ``train-{000..002}.tar``."""
    m = _PRINTF.search(pattern)
    width = int(m.group(2) or 0) if m.group(1) else 0
    lo, hi = str(0).zfill(width), str(count - 1).zfill(width)
    return pattern[: m.start()] + (lo if count == 1 else f"{{{lo}..{hi}}}") + pattern[m.end() :]


class ShardWriter:
    """Tar shards of ``shard_size`` samples named ``pattern % index``, each written atomically when local.

    Use as a context manager: leaving the block closes the last shard; leaving it with an error drops the shard
    being written (its temporary file), keeping the complete ones. ``written`` lists the shards in order."""

    def __init__(self, pattern: str, shard_size: int, storage_options: dict | None = None):
        check_pattern(pattern)
        check_url(pattern, "OUT_PATTERN")  # before any sample is read, not at the first shard
        self.pattern, self.shard_size = pattern, shard_size
        self.storage_options = storage_options or {}
        self.index, self.in_shard = 0, 0
        self.written: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._stack: contextlib.ExitStack | None = None  # holds the open shard file

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort(exc_type, exc, tb)

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Append sample ``key`` (``{ext: bytes}``); a full shard is closed."""
        if self._tar is None:
            self._open()
        write_sample(self._tar, key, files)
        self.in_shard += 1
        if self.in_shard >= self.shard_size:
            self.close()

    def close(self) -> None:
        """Finish the shard being written (renamed into place), if any."""
        if self._tar is None:
            return
        self._tar.close()
        self._stack.close()
        self.written.append(self.pattern % self.index)
        self._tar = self._stack = None
        self.index += 1
        self.in_shard = 0

    def _open(self) -> None:
        path = self.pattern % self.index
        stack = contextlib.ExitStack()
        if "://" in path:
            f = stack.enter_context(fsspec.open(path, "wb", **self.storage_options))
        else:
            f = stack.enter_context(atomic_open(path, "wb"))
        self._stack = stack
        self._tar = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)

    def _abort(self, exc_type, exc, tb) -> None:
        if self._tar is None:
            return
        tar, stack, self._tar, self._stack = self._tar, self._stack, None, None
        with contextlib.suppress(Exception):  # the error being raised is the one to report
            tar.close()
        stack.__exit__(exc_type, exc, tb)  # atomic_open removes its temporary file


@dataclass
class ConvertResult:
    """What :func:`convert_manifest` wrote: ``samples`` in ``shards`` (paths, in order), and the ``skipped``
    lines and samples with their reasons."""

    pattern: str
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        skipped = f" ({len(self.skipped)} skipped)" if self.skipped else ""
        return (
            f"wrote {self.samples} samples in {len(self.shards)} shard(s): "
            f"{brace_pattern(self.pattern, len(self.shards))}{skipped}"
        )


def convert_manifest(manifest: str, out_pattern: str, shard_size: int = 1000) -> ConvertResult:
    """Write a manifest as webdataset shards of ``shard_size`` samples: ``KEY.<image ext>`` (the bytes as stored)
    and ``KEY.txt`` (one caption) or ``KEY.json`` (a captions list, or extra fields such as ``label``, with
    ``caption`` / ``captions``). Samples whose image cannot be read or decoded are left out and listed."""
    check_pattern(out_pattern)
    if is_shard_pattern(manifest):
        raise DataError(f"{manifest} is already shards; convert reads a manifest (.jsonl/.csv)")
    ds = open_source(manifest)
    result = ConvertResult(out_pattern, skipped=[f"line {n}: {reason}" for n, reason in ds.bad_rows])
    with ShardWriter(out_pattern, shard_size) as writer:
        for record in iter_records(ds, decode=True):  # decoded, so a file that is not an image is left out
            if "skip" in record:
                result.skipped.append(f"{record['key']}: {record['skip']}")
                continue
            i = record["index"]
            writer.write(f"{i:08d}", _sample_files(ds, i, record["image_bytes"]))
            result.samples += 1
    result.shards = writer.written
    return result


def _sample_files(ds: Any, i: int, image_bytes: bytes) -> dict[str, bytes]:
    texts, extras = ds.valid_captions(i), ds.extras[i]
    files = {_image_ext(ds.images[i], image_bytes): image_bytes}
    if len(texts) == 1 and not extras:
        files["txt"] = texts[0].encode("utf-8")
    else:
        meta = {"caption": texts[0]} if len(texts) == 1 else {"captions": texts}
        meta.update(extras)
        files["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return files


def _image_ext(name: str, data: bytes) -> str:
    """The file's extension when it names an image format, else the format PIL reads in the bytes (``jpg``)."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
    ext = _EXT.get(ext, ext)
    if ext in ("jpg", "png", "webp", "gif", "bmp", "tiff"):
        return ext
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:  # not an image PIL knows: the common default
        fmt = ""
    return _EXT.get(fmt, fmt) or "jpg"
