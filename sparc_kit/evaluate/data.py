"""Evaluation sets, read from a path or URL (anything fsspec opens).

Two functions are the whole interface the evaluators use, so the readers behind them can later be swapped for
the shared training datasets (``sparc_kit/data/manifest.py``, ``webdataset.py``) without touching the
evaluators:

- :func:`iter_labelled_images` ``(path, classnames, max_samples)`` yields ``(PIL image, label index)``;
- :func:`load_retrieval_set` ``(path, max_samples)`` gives a :class:`RetrievalSet` of image URLs and their
  captions, iterated as ``(PIL image, [captions])``.

Formats (the project's evaluation-set contract, docs/data.md):

- a manifest, JSONL (one object a line) or CSV (a header row), whose ``image`` is a path relative to the
  manifest or any fsspec URL; classification rows carry ``label`` (an index into the class names, or a class
  name); retrieval rows carry ``captions`` (a list; in CSV a JSON list) or ``caption`` (one string);
- webdataset tar shards for classification: ``KEY.jpg``/``.jpeg``/``.png``/``.webp`` with ``KEY.txt`` (the
  class name), ``KEY.cls`` (the index) or ``KEY.json`` (``{"label": ...}``); several shards as a list, or
  with brace expansion ``test-{000..003}.tar``. Tars are streamed (Python's ``tarfile`` over fsspec), so
  ``max_samples`` reads only the start of a shard.

Class names come from a list, a file with one name a line, or by default ``classnames.txt`` beside the data.
Problems raise :class:`EvalDataError` (a ``ValueError``) with a one-line message naming the file.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import fsspec

from sparc_kit.errors import SparcError

__all__ = [
    "EvalDataError",
    "expand_braces",
    "shard_urls",
    "is_manifest",
    "load_classnames",
    "default_classnames_path",
    "read_manifest",
    "iter_labelled_images",
    "RetrievalSet",
    "load_retrieval_set",
    "detect_task",
    "read_image",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MANIFEST_EXTS = (".jsonl", ".json", ".csv")


class EvalDataError(SparcError, ValueError):
    """An evaluation set that cannot be read as asked."""


# ---------------------------------------------------------------------------------------------------- paths


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept); ``{x,y}`` lists too."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        return [pattern]  # not a brace expression: a literal {..}
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for option in options for out in expand_braces(head + option + tail)]


def shard_urls(path: str | Sequence[str]) -> list[str]:
    """Shard URLs of a path or brace pattern, or of a list of them."""
    items = [path] if isinstance(path, str) else list(path)
    return [url for item in items for url in expand_braces(str(item))]


def is_manifest(path: str | Sequence[str]) -> bool:
    return isinstance(path, str) and path.lower().endswith(MANIFEST_EXTS)


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _join(base: str, relative: str) -> str:
    if "://" in relative or relative.startswith("/"):
        return relative
    return f"{base.rstrip('/')}/{relative}" if base not in ("", ".") else relative


def _isdir(url: str) -> bool:
    try:
        fs, _, paths = fsspec.get_fs_token_paths(url)
        return bool(fs.isdir(paths[0]))
    except Exception:
        return False


def read_image(source: str | bytes, name: str = ""):
    """A PIL image (RGB, EXIF orientation applied, as the training datasets read it) from a URL or from bytes;
    :class:`EvalDataError` naming ``name`` when unreadable."""
    from PIL import Image, ImageOps

    try:
        if isinstance(source, bytes):
            data = source
        else:
            name = name or source
            with fsspec.open(source, "rb") as f:
                data = f.read()
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise EvalDataError(f"{name}: image not found") from None
    except Exception as exc:
        raise EvalDataError(f"{name}: cannot read the image ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------- class names


def default_classnames_path(path: str | Sequence[str]) -> str:
    """``classnames.txt`` in the folder of the manifest or of the first shard."""
    first = path if is_manifest(path) else (shard_urls(path) or [""])[0]
    return _join(_parent(str(first)), "classnames.txt")


def load_classnames(spec: str | Sequence[str] | None, data_path: str | Sequence[str] | None = None) -> list[str]:
    """Class names from a list, a text file (one a line; blank lines ignored), or ``classnames.txt`` beside the
    data when ``spec`` is None."""
    if spec is not None and not isinstance(spec, str):
        names = [str(n) for n in spec]
    else:
        if spec is None and data_path is not None:
            _reject_folder(data_path)
        path = spec if spec is not None else (default_classnames_path(data_path) if data_path is not None else None)
        if path is None:
            raise EvalDataError("class names are needed: give a list or a classnames file")
        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            how = "" if spec is not None else " (the default, beside the data; pass class names explicitly)"
            raise EvalDataError(f"{path}: class-name file not found{how}") from None
    if not names:
        raise EvalDataError(f"{spec or data_path}: no class names")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise EvalDataError(f"{spec or data_path}: class name {dup!r} appears twice")
    return names


def _reject_folder(path: str | Sequence[str]) -> None:
    if isinstance(path, str) and not is_manifest(path) and _isdir(path):
        raise EvalDataError(
            f"{path}: is a folder; give its shards (e.g. {path.rstrip('/')}/test-{{000..001}}.tar) or a manifest"
        )


def _label_index(value: Any, lookup: dict[str, int], num_classes: int, where: str) -> int:
    if isinstance(value, bool):
        raise EvalDataError(f"{where}: label {value!r} is neither a class index nor a class name")
    if isinstance(value, str) and value.strip() in lookup:  # a class name (checked first: a class may be "7")
        return lookup[value.strip()]
    if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        index = int(value)
        if not 0 <= index < num_classes:
            raise EvalDataError(f"{where}: label {index} is outside 0..{num_classes - 1}")
        return index
    raise EvalDataError(f"{where}: label {value!r} is not one of the {num_classes} class names")


# --------------------------------------------------------------------------------------------------- manifest


def read_manifest(path: str, max_rows: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a JSONL or CSV manifest (a ``.json`` file may also hold one JSON list)."""
    try:
        f = fsspec.open(path, "r", encoding="utf-8").open()
    except FileNotFoundError:
        raise EvalDataError(f"{path}: manifest not found") from None
    except IsADirectoryError:
        raise EvalDataError(f"{path}: is a folder, not a manifest file") from None
    count = 0
    with f:
        if path.lower().endswith(".csv"):
            rows: Iterator[tuple[int, Any]] = ((i + 2, row) for i, row in enumerate(csv.DictReader(f)))
        elif path.lower().endswith(".json") and f.read(1) == "[":
            f.seek(0)
            rows = ((i + 1, row) for i, row in enumerate(json.load(f)))
        else:
            f.seek(0)
            rows = _jsonl_rows(f, path)
        for line_no, row in rows:
            if max_rows is not None and count >= max_rows:
                return
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{line_no}: expected an object with 'image', got {type(row).__name__}")
            if not row.get("image"):
                raise EvalDataError(f"{path}:{line_no}: no 'image'")
            count += 1
            yield line_no, row


def _jsonl_rows(f, path: str) -> Iterator[tuple[int, Any]]:
    for line_no, line in enumerate(f, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None


# ------------------------------------------------------------------------------------------------ webdataset


def iter_shard_samples(urls: Sequence[str]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """``(shard, key, {extension: bytes})`` for each sample of webdataset shards, streamed in order.

    A sample's files are consecutive members sharing the key (the member path up to the first dot of its
    file name), the webdataset convention.
    """
    for url in urls:
        try:
            handle = fsspec.open(url, "rb").open()
        except FileNotFoundError:
            raise EvalDataError(f"{url}: shard not found") from None
        except IsADirectoryError:
            raise EvalDataError(f"{url}: is a folder, not a tar shard") from None
        with handle:
            key, files = None, {}
            try:
                with tarfile.open(fileobj=handle, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        folder, _, name = member.name.rpartition("/")
                        stem, dot, ext = name.partition(".")
                        if not dot or stem.startswith("."):
                            continue
                        member_key = f"{folder}/{stem}" if folder else stem
                        if member_key != key:
                            if key is not None:
                                yield url, key, files
                            key, files = member_key, {}
                        data = tar.extractfile(member)
                        files[ext.lower()] = data.read() if data is not None else b""
            except tarfile.TarError as exc:
                raise EvalDataError(f"{url}: not a readable tar shard ({exc})") from None
            if key is not None:
                yield url, key, files


# ------------------------------------------------------------------------------------------------ classification


def iter_labelled_images(
    path: str | Sequence[str],
    classnames: Sequence[str] | str | None = None,
    max_samples: int | None = None,
) -> Iterator[tuple[Any, int]]:
    """``(PIL image, label index)`` for a classification set: a manifest with ``image`` + ``label``, or webdataset
    shards with a class-name ``.txt`` (or ``.cls`` index, or ``.json`` label) per sample. ``classnames`` as in
    :func:`load_classnames`; the first ``max_samples`` samples only when given."""
    _reject_folder(path)
    names = load_classnames(classnames, path)
    lookup = {n: i for i, n in enumerate(names)}
    if is_manifest(path):
        base = _parent(path)
        for line_no, row in read_manifest(path, max_samples):
            if "label" not in row:
                raise EvalDataError(f"{path}:{line_no}: no 'label' (a classification manifest needs one)")
            label = _label_index(row["label"], lookup, len(names), f"{path}:{line_no}")
            yield read_image(_join(base, str(row["image"]))), label
        return
    samples = iter_shard_samples(shard_urls(path))
    for shard, key, files in itertools.islice(samples, max_samples):
        where = f"{shard}: sample {key}"
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        if image_ext is None:
            raise EvalDataError(f"{where}: no image ({'/'.join(IMAGE_EXTS)}) among {sorted(files)}")
        if "cls" in files:
            value: Any = files["cls"].decode("utf-8").strip()
        elif "txt" in files:
            value = files["txt"].decode("utf-8").strip()
        elif "json" in files:
            value = json.loads(files["json"]).get("label")
        else:
            raise EvalDataError(f"{where}: no label (.txt class name, .cls index or .json label)")
        yield read_image(files[image_ext], f"{where} .{image_ext}"), _label_index(value, lookup, len(names), where)


# ------------------------------------------------------------------------------------------------ retrieval


@dataclass
class RetrievalSet:
    """Images (URLs) and, for each, its captions. Iterating reads the images: ``(PIL image, [captions])``."""

    source: str
    images: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[tuple[Any, list[str]]]:
        for url, caps in zip(self.images, self.captions):
            yield read_image(url), caps

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)


def load_retrieval_set(path: str, max_samples: int | None = None) -> RetrievalSet:
    """A retrieval manifest (``image`` + ``captions`` list or ``caption`` string); the first ``max_samples``
    images when given. Images are read when iterated, not here."""
    if not is_manifest(path):
        raise EvalDataError(f"{path}: a retrieval set is a manifest ({', '.join(MANIFEST_EXTS)}) with 'captions'")
    base = _parent(path)
    out = RetrievalSet(source=path)
    for line_no, row in read_manifest(path, max_samples):
        caps = row.get("captions", row.get("caption"))
        if isinstance(caps, str) and path.lower().endswith(".csv") and caps.lstrip().startswith("["):
            try:
                caps = json.loads(caps)
            except json.JSONDecodeError:
                pass
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise EvalDataError(f"{path}:{line_no}: 'captions' must be a non-empty list of non-empty strings")
        out.images.append(_join(base, str(row["image"])))
        out.captions.append(list(caps))
    if not out.images:
        raise EvalDataError(f"{path}: no images")
    return out


def detect_task(path: str | Sequence[str]) -> str:
    """``zeroshot`` or ``retrieval`` for a data path: shards are classification sets; a manifest is judged by
    its first row (``label`` -> zeroshot, ``captions``/``caption`` -> retrieval)."""
    if not is_manifest(path):
        return "zeroshot"
    for line_no, row in read_manifest(path, max_rows=1):
        if "label" in row:
            return "zeroshot"
        if "captions" in row or "caption" in row:
            return "retrieval"
        raise EvalDataError(
            f"{path}:{line_no}: cannot tell the task: a row needs 'label' (zeroshot) or 'captions' (retrieval)"
        )
    raise EvalDataError(f"{path}: empty manifest")
