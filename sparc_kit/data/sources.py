"""The readers of the stored data formats, shared by the training datasets and the evaluation sets.

Training (:mod:`sparc_kit.data.manifest`, :mod:`sparc_kit.data.webdataset`) and evaluation
(:mod:`sparc_kit.evaluate.data`) read through these functions only, so a shard pattern, a manifest line, a path
inside a manifest and a tar member mean the same to both:

- shard names: :func:`expand_urls` (``::`` between patterns, fsspec ``::`` chains kept whole) over
  :func:`expand_braces` (``{000..127}`` and ``{a,b}``, zero padding as bash pads it) and :func:`local_shards` (a
  local folder or glob as the tar files in it);
- manifests: :func:`manifest_format` and :func:`read_manifest_rows` (JSONL, a JSON array in a ``.json``, CSV,
  TSV; ``.gz``/``.bz2``/``.xz``/``.zst`` decompressed), :func:`row_captions` for the caption cells;
- paths inside a manifest: :func:`folder_of` and :func:`join_path`, which work on the part of a chained URL
  (``simplecache::s3://b/m.jsonl``, ``zip://m.jsonl::s3://b/set.zip``) that holds the path;
- tar shards: :func:`iter_tar` (the webdataset grouping of members into samples) and :func:`write_sample`;
- opening: :class:`Opener` (local files, fsspec URLs, chained URLs), after
  :func:`~sparc_kit.data.filesystems.check_url`.

Images are decoded by :func:`sparc_kit.data.transforms.decode_image` in both. These readers report problems and
leave the policy to their callers: training turns a bad line or sample into a skipped one, evaluation stops with
one line.
"""

from __future__ import annotations

import csv
import functools
import glob
import inspect
import io
import json
import os
import posixpath
import re
import tarfile
from typing import Any, Callable, Iterator

import fsspec
from fsspec.core import split_protocol
from fsspec.registry import known_implementations

from sparc_kit.data.filesystems import check_url, filesystem
from sparc_kit.errors import SparcError

__all__ = [
    "ManifestError",
    "SHARD_ERROR",
    "expand_braces",
    "expand_urls",
    "local_shards",
    "SHARD_SUFFIXES",
    "split_patterns",
    "is_url",
    "folder_of",
    "join_path",
    "manifest_format",
    "is_manifest_path",
    "read_manifest_rows",
    "parse_captions",
    "row_captions",
    "split_name",
    "iter_tar",
    "write_sample",
    "Opener",
]

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # the names of tar shards
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv"}
SHARD_ERROR = "__error__"  # the key of the pseudo-sample iter_tar yields for a read error


class ManifestError(SparcError, ValueError):
    """The manifest as a whole is unusable (missing, unreadable, or no line has the needed keys).

    ``problem`` is the same without the path, for a caller that names the file its own way."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


# ---------------------------------------------------------------------------------------------- shard names
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` alternatives; several braces multiply.

    Numbers are padded as bash pads them: when either end has a leading zero, every number gets the width of the
    wider end (``{01..100}`` -> ``001 ... 100``, ``{1..05}`` -> ``01 ... 05``); else none (``{8..10}``). Braces
    that are neither (``{x}``) stay as they are."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, inner, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = _RANGE.fullmatch(inner)
    if r:
        lo_s, hi_s = r.group(1), r.group(2)
        lo, hi = int(lo_s), int(hi_s)
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (lo_s, hi_s))
        width = max(len(lo_s), len(hi_s)) if padded else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in inner:
        options = inner.split(",")
    else:  # not a pattern: keep the braces, expand what follows
        return [head + "{" + inner + "}" + rest for rest in expand_braces(tail)]
    return [x for option in options for x in expand_braces(head + option + tail)]


@functools.lru_cache(maxsize=None)
def _layers_over_next(protocol: str) -> bool:
    """Whether fsspec's ``protocol`` filesystem reads through another (a cache, ``zip``, ``tar``, ``dir``): its
    class, or a class it extends, takes ``target_protocol``. Only fsspec's own classes are imported to tell."""
    entry = known_implementations.get(protocol)
    if entry is None or not entry["class"].startswith("fsspec."):
        return False
    try:
        cls = fsspec.get_filesystem_class(protocol)
        return any("target_protocol" in inspect.signature(c.__init__).parameters for c in cls.__mro__[:-1])
    except Exception:  # a dependency missing: check_url reports it when the URL is opened
        return False


def _chains_on(part: str) -> bool:
    """Whether ``part`` of a ``::`` string is an fsspec layer over the next part (``simplecache``,
    ``zip://member``) rather than a pattern of its own."""
    if "://" in part:
        return _layers_over_next(part.split("://", 1)[0])
    return part in known_implementations and _layers_over_next(part)


def split_patterns(text: str) -> list[str]:
    """The patterns of ``a/x-{0..3}.tar::b/y-{0..9}.tar`` (``::`` joins several), with fsspec chains kept whole:
    after a filesystem that reads through another (``simplecache::s3://b/x.tar``, ``zip://m.jsonl::s3://b/z.zip``)
    ``::`` is fsspec's chain, not a separator."""
    parts = [p.strip() for p in str(text).split("::") if p.strip()]
    out: list[str] = []
    chain: list[str] = []
    for i, part in enumerate(parts):
        chain.append(part)
        if i == len(parts) - 1 or not _chains_on(part):  # the last part is never asked (nothing to import)
            out.append("::".join(chain))
            chain = []
    return out


def expand_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """Every shard name of a pattern (:func:`split_patterns`, then :func:`expand_braces`, then
    :func:`local_shards`), or of a list of them."""
    if isinstance(urls, (list, tuple)):
        return [u for item in urls for u in expand_urls(item)]
    return [u for pattern in split_patterns(str(urls)) for name in expand_braces(pattern) for u in local_shards(name)]


def local_shards(name: str) -> list[str]:
    """A local folder as the tar shards in it, a local glob (``*``, ``?``) as the tar shards it matches, each
    sorted by name; anything else (a file, a URL) as it is. Only files named as shards are taken (``.tar``,
    ``.tar.gz``, ...), so the files other tools write beside their shards (img2dataset's ``00000.parquet`` and
    ``00000_stats.json``) are not read as shards."""
    if is_url(name):
        return [name]
    if os.path.isdir(name):
        found = [os.path.join(name, f) for f in os.listdir(name)]
    elif "*" in name or "?" in name:
        found = glob.glob(name)
    else:
        return [name]
    return sorted(f for f in found if f.lower().endswith(SHARD_SUFFIXES) and os.path.isfile(f))


# ------------------------------------------------------------------------------------- paths inside manifests
def is_url(path: str) -> bool:
    """A URL fsspec opens (``s3://...``, a chain ``simplecache::...``), as opposed to a local path."""
    return "://" in path or "::" in path


def _path_part(parts: list[str]) -> int:
    """Which part of a chained URL holds the path: the first that is not a bare layer name (``simplecache``)."""
    return next((i for i, p in enumerate(parts) if "://" in p or p not in known_implementations), 0)


def _with_path(url: str, change: Callable[[str, bool], str]) -> str:
    parts = url.split("::")
    i = _path_part(parts)
    protocol, path = split_protocol(parts[i])
    parts[i] = f"{protocol}://{change(path, True)}" if protocol else change(path, False)
    return "::".join(parts)


def folder_of(path: str) -> str:
    """The folder of a manifest: absolute for a local path; for a URL the folder of its path part, the rest of a
    chain kept (``zip://sub/m.jsonl::s3://b/z.zip`` -> ``zip://sub::s3://b/z.zip``)."""
    if not is_url(path):
        return os.path.dirname(os.path.abspath(path))
    return _with_path(path, lambda p, remote: posixpath.dirname(p.rstrip("/")) if remote else os.path.dirname(p))


def join_path(root: str, path: str) -> str:
    """``path`` if absolute or a URL, else ``path`` inside ``root`` (for a chained ``root``, inside its path part)."""
    if is_url(path) or os.path.isabs(path):
        return path
    if not is_url(root):
        return os.path.join(root, path)
    return _with_path(root, lambda p, remote: posixpath.join(p, path) if remote else os.path.join(p, path))


# ---------------------------------------------------------------------------------------------------- manifests
def _uncompressed_name(path: str) -> str:
    parts = path.split("::")
    name = parts[_path_part(parts)].lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _suffix(path: str) -> str | None:
    name = _uncompressed_name(path)
    return next((s for s in MANIFEST_SUFFIXES if name.endswith(s)), None)


def is_manifest_path(path: Any) -> bool:
    """Whether ``path`` names a manifest by its extension (``.jsonl``, ``.json``, ``.ndjson``, ``.csv``, ``.tsv``,
    each also compressed)."""
    return isinstance(path, str) and _suffix(path) is not None


def manifest_format(path: str, fmt: str = "auto") -> str:
    """``jsonl`` or ``csv``: ``fmt`` itself, or told from the extension when ``auto``."""
    if fmt != "auto":
        if fmt not in ("jsonl", "csv"):
            raise ManifestError(f"manifest format must be jsonl, csv or auto, got {fmt!r}")
        return fmt
    suffix = _suffix(path)
    if suffix is None:
        raise ManifestError(
            f"manifest {path}: cannot tell the format from the extension; set format: jsonl or csv",
            "cannot tell the format from the extension (.jsonl, .json, .csv, .tsv)",
        )
    return MANIFEST_SUFFIXES[suffix]


def read_manifest_rows(
    path: str, fmt: str = "auto", storage_options: dict | None = None, field: str = "data.path"
) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line_number, row, error)`` for each non-blank line; ``row`` is None when the line is unusable.

    JSONL is one object a line; a ``.json`` file may instead hold one JSON array of objects (numbered from 1).
    CSV has a header row (``.tsv``: tab-separated). ``field`` names the setting in the error for a URL whose
    filesystem package is missing. :class:`ManifestError` when the file cannot be opened or is not UTF-8."""
    fmt = manifest_format(path, fmt)
    check_url(path, field)
    try:
        f = fsspec.open(path, "rt", encoding="utf-8", compression="infer", **(storage_options or {})).open()
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}", "manifest not found") from None
    except IsADirectoryError as exc:
        raise ManifestError(f"cannot open manifest {path}: {exc}", "is a folder, not a manifest file") from None
    except Exception as exc:
        raise ManifestError(f"cannot open manifest {path}: {exc}", f"cannot open the manifest ({exc})") from None
    with f:
        try:
            if fmt == "jsonl":
                yield from _jsonl_rows(f, may_be_array=_suffix(path) == ".json")
            else:
                yield from _csv_rows(f, delimiter="\t" if _suffix(path) == ".tsv" else ",")
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
            raise ManifestError(f"manifest {path} is {reason}", reason) from None


def _jsonl_rows(f, may_be_array: bool) -> Iterator[tuple[int, dict | None, str | None]]:
    first = True
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        if first and may_be_array and line.lstrip().startswith("["):
            yield from _array_rows(line + f.read())
            return
        first = False
        try:
            yield _checked(number, json.loads(line))
        except json.JSONDecodeError as exc:
            yield number, None, f"not valid JSON ({exc.msg})"


def _array_rows(text: str) -> Iterator[tuple[int, dict | None, str | None]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        yield exc.lineno, None, f"not valid JSON ({exc.msg})"
        return
    for number, item in enumerate(items, 1):
        yield _checked(number, item)


def _checked(number: int, row: Any) -> tuple[int, dict | None, str | None]:
    if not isinstance(row, dict):
        return number, None, f"not a JSON object but {type(row).__name__}"
    return number, row, None


def _csv_rows(f, delimiter: str) -> Iterator[tuple[int, dict | None, str | None]]:
    reader = csv.DictReader(f, delimiter=delimiter)
    for row in reader:
        if None in row:  # more cells than header columns
            yield reader.line_num, None, "more cells than the header has columns"
            continue
        yield reader.line_num, dict(row), None


def parse_captions(value: Any) -> list[Any]:
    """A captions cell as a list: a list as is, a JSON list written in a string (CSV), else the one value."""
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [value]
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def row_captions(row: dict, caption_key: str = "caption", captions_key: str = "captions") -> list[Any] | None:
    """The raw caption values of a manifest row: its ``captions_key`` list when present and not empty, else its
    ``caption_key`` value; None when it has neither. The caller judges the values."""
    if row.get(captions_key) not in (None, ""):
        return parse_captions(row[captions_key])
    if caption_key in row:
        return [row[caption_key]]
    return None


# ---------------------------------------------------------------------------------------------------- tar shards
_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``): the key is everything before the basename's first dot.
    A name without an extension, or whose basename starts with a dot, gives ``(name, "")``."""
    m = _NAME.match(name)
    if not m:
        return name, ""
    return m.group(1), m.group(2).lower()


def iter_tar(
    fileobj,
    keep: Callable[[int], bool] | None = None,
    want: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a tar stream, in file order (consecutive files of one key).

    Members that belong to no sample are passed over, as webdataset does: folders, links, and files without an
    extension or whose name starts with a dot (``README``, ``._0001.jpg`` from a macOS archive).
    ``keep(j)`` says whether the ``j``-th sample's bytes are read (else its dict is empty: counted, not read);
    ``want(ext)`` filters members. A read error mid-stream ends the shard with
    ``(SHARD_ERROR, {"error": b"Type: message"})``, after the sample it fell in (incomplete).
    """
    key: str | None = None
    files: dict[str, bytes] = {}
    index = -1
    reading = False
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                if not ext:
                    continue
                if k != key:
                    if key is not None:
                        yield key, files
                    key, files, index = k, {}, index + 1
                    reading = keep is None or keep(index)
                if reading and (want is None or want(ext)):
                    f = tar.extractfile(member)
                    files[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if key is not None:
            yield key, files
            key = None
        yield SHARD_ERROR, {"error": f"{type(exc).__name__}: {exc}".encode()}
    if key is not None:
        yield key, files


def write_sample(tar: tarfile.TarFile, key: str, files: dict[str, bytes]) -> None:
    """Append ``KEY.EXT`` members with fixed metadata (reproducible shards)."""
    for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------------------ opening
class Opener:
    """Opens the files of one data set for reading bytes: local paths with :func:`open`, URLs through fsspec with
    one filesystem per scheme built with ``storage_options`` (chained URLs through :func:`fsspec.open`, which
    hands the options to the outermost layer unless keyed by scheme). ``field`` names the setting in the one-line
    error for a scheme whose package is missing.

    Filesystems are not fork-safe: a forked data-loader worker builds its own, and pickling drops them."""

    def __init__(self, storage_options: dict[str, Any] | None = None, field: str = "path"):
        self.storage_options = dict(storage_options or {})
        self.field = field
        self._filesystems: dict[str, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_filesystems"] = {}
        return state

    def _filesystem(self, url: str):
        if os.getpid() != self._pid:
            self._filesystems, self._pid = {}, os.getpid()
        protocol = url.split("://", 1)[0]
        fs = self._filesystems.get(protocol)
        if fs is None:
            fs = filesystem(url, self.storage_options, field=self.field)
            self._filesystems[protocol] = fs
        return fs

    def open(self, url: str, buffering: int = -1):
        """A binary file object; ``FileNotFoundError`` and the like as the filesystem raises them."""
        if not is_url(url):
            return open(url, "rb", buffering=buffering)
        if "::" in url:
            check_url(url, self.field)
            return fsspec.open(url, "rb", **self.storage_options).open()
        return self._filesystem(url).open(url, "rb")

    def read(self, url: str) -> bytes:
        with self.open(url) as f:
            return f.read()
