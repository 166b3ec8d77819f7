"""Evaluation sets, read from a path or URL (anything fsspec opens).

Three functions are the whole interface the evaluators use:

- :func:`iter_labelled_images` ``(path, classnames, max_samples)`` yields ``(PIL image, label index)``;
- :func:`load_retrieval_set` ``(path, max_samples)`` gives a :class:`RetrievalSet` of image URLs and their
  captions, iterated as ``(PIL image, [captions])``;
- :func:`iter_segmentation_samples` ``(path, max_samples)`` yields ``(PIL image, mask)``, the mask a uint8
  array of class indices.

Manifests, shard patterns, paths inside a manifest, tar members and image bytes are read by the same code as the
training data (:mod:`sparc_kit.data.sources`, :func:`sparc_kit.data.transforms.decode_image`), so both read a
set the same way; what is evaluation's own is the policy (a set must be clean: the first problem stops it) and
the labels. Formats (the project's evaluation-set contract, docs/data.md):

- a manifest, JSONL (one object a line; a ``.json`` may hold one JSON array), CSV or TSV (a header row), maybe
  compressed (``.jsonl.gz``), whose ``image`` is a path relative to the manifest or any fsspec URL;
  classification rows carry ``label`` (an index into the class names, or a class name); retrieval rows carry
  ``captions`` (a list; in CSV a JSON list) or ``caption`` (one string); segmentation rows carry ``mask``, a
  single-channel PNG of class indices the size of the image;
- webdataset tar shards for classification: ``KEY.jpg``/``.jpeg``/``.png``/``.webp`` with ``KEY.txt`` (the
  class name), ``KEY.cls`` (the index) or ``KEY.json`` (``{"label": ...}``); several shards as a list, or
  with brace expansion ``test-{000..003}.tar`` and ``::`` between patterns, as for training. Tars are streamed,
  so ``max_samples`` reads only the start of a shard.

Class names come from a list, a file with one name a line, or by default ``classnames.txt`` beside the data.
Problems raise :class:`EvalDataError` (a ``ValueError``) with a one-line message naming the file.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np

from sparc_kit.data.sources import (
    SHARD_ERROR,
    ManifestError,
    Opener,
    expand_braces,
    expand_urls,
    folder_of,
    is_manifest_path,
    iter_tar,
    join_path,
    read_manifest_rows,
    row_captions,
)
from sparc_kit.data.transforms import BadImageError, decode_image
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
    "iter_segmentation_samples",
    "read_mask",
    "detect_task",
    "read_image",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MANIFEST_EXTS = (".jsonl", ".json", ".csv")  # named in messages; .ndjson, .tsv and compressed ones are read too
_OPENER = Opener(field="eval data")


class EvalDataError(SparcError, ValueError):
    """An evaluation set that cannot be read as asked."""


# ---------------------------------------------------------------------------------------------------- paths


def shard_urls(path: str | Sequence[str]) -> list[str]:
    """Shard URLs of a path or brace pattern, or of a list of them (:func:`sparc_kit.data.sources.expand_urls`)."""
    return expand_urls([path] if isinstance(path, str) else [str(p) for p in path])


def is_manifest(path: str | Sequence[str]) -> bool:
    return is_manifest_path(path)


def _isdir(url: str) -> bool:
    try:
        fs, _, paths = fsspec.get_fs_token_paths(url)
        return bool(fs.isdir(paths[0]))
    except Exception:
        return False


def read_image(source: str | bytes, name: str = ""):
    """A PIL image decoded as the training datasets decode it (RGB, transparency on white, EXIF orientation
    applied) from a URL or from bytes; :class:`EvalDataError` naming ``name`` when unreadable."""
    try:
        if isinstance(source, bytes):
            data = source
        else:
            name = name or source
            data = _OPENER.read(source)
        return decode_image(data)
    except FileNotFoundError:
        raise EvalDataError(f"{name}: image not found") from None
    except BadImageError as exc:
        raise EvalDataError(f"{name}: {exc}") from None
    except SparcError:  # a URL scheme whose package is missing: its own one line
        raise
    except Exception as exc:
        raise EvalDataError(f"{name}: cannot read the image ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------- class names


def default_classnames_path(path: str | Sequence[str]) -> str:
    """``classnames.txt`` in the folder of the manifest or of the first shard."""
    first = path if is_manifest(path) else (shard_urls(path) or [""])[0]
    return join_path(folder_of(str(first)), "classnames.txt")


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
    """``(line number, row)`` of a manifest (:func:`sparc_kit.data.sources.read_manifest_rows`); the first line
    that is not an object with an ``image`` raises :class:`EvalDataError` naming it."""
    count = 0
    try:
        for line_no, row, error in read_manifest_rows(path, field="eval data"):
            if max_rows is not None and count >= max_rows:
                return
            if row is None:
                raise EvalDataError(f"{path}:{line_no}: {error}")
            if not row.get("image"):
                raise EvalDataError(f"{path}:{line_no}: no 'image'")
            count += 1
            yield line_no, row
    except ManifestError as exc:
        raise EvalDataError(f"{path}: {exc.problem}") from None


# ------------------------------------------------------------------------------------------------ webdataset


def iter_shard_samples(urls: Sequence[str]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """``(shard, key, {extension: bytes})`` for each sample of webdataset shards, streamed in order
    (:func:`sparc_kit.data.sources.iter_tar`: a sample's files are consecutive members sharing the key, the
    member path up to the first dot of its file name). A shard that breaks off raises, rather than give the
    incomplete sample it broke in."""
    for url in urls:
        try:
            handle = _OPENER.open(url)
        except FileNotFoundError:
            raise EvalDataError(f"{url}: shard not found") from None
        except IsADirectoryError:
            raise EvalDataError(f"{url}: is a folder, not a tar shard") from None
        with handle:
            pending = None  # held back one step: a read error makes the sample it fell in incomplete
            for key, files in iter_tar(handle):
                if key == SHARD_ERROR:
                    reason = files["error"].decode(errors="replace")
                    raise EvalDataError(f"{url}: not a readable tar shard ({reason})")
                if pending is not None:
                    yield url, *pending
                pending = key, files
            if pending is not None:
                yield url, *pending


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
        base = folder_of(path)
        for line_no, row in read_manifest(path, max_samples):
            if "label" not in row:
                raise EvalDataError(f"{path}:{line_no}: no 'label' (a classification manifest needs one)")
            label = _label_index(row["label"], lookup, len(names), f"{path}:{line_no}")
            yield read_image(join_path(base, str(row["image"]))), label
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
    base = folder_of(path)
    out = RetrievalSet(source=path)
    for line_no, row in read_manifest(path, max_samples):
        caps = row_captions(row)
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise EvalDataError(f"{path}:{line_no}: 'captions' must be a non-empty list of non-empty strings")
        out.images.append(join_path(base, str(row["image"])))
        out.captions.append(list(caps))
    if not out.images:
        raise EvalDataError(f"{path}: no images")
    return out


# ------------------------------------------------------------------------------------------------ segmentation


def read_mask(url: str) -> np.ndarray:
    """A label mask: a single-channel PNG (8-bit grey or palette, or 16-bit with values up to 255) of class
    indices, as a uint8 array [H, W]; :class:`EvalDataError` naming the file otherwise."""
    from PIL import Image

    try:
        data = _OPENER.read(url)
    except FileNotFoundError:
        raise EvalDataError(f"{url}: mask not found") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            array = np.asarray(image)
    except Exception as exc:
        raise EvalDataError(f"{url}: cannot read the mask ({type(exc).__name__}: {exc})") from None
    if mode not in ("L", "P", "I", "I;16") or array.ndim != 2:
        raise EvalDataError(f"{url}: a mask is a single-channel image of class indices, not {mode}")
    if array.size and int(array.max()) > 255:
        raise EvalDataError(f"{url}: class index {int(array.max())} is over 255")
    return array.astype(np.uint8)


def iter_segmentation_samples(path: str, max_samples: int | None = None) -> Iterator[tuple[Any, np.ndarray]]:
    """``(PIL image, mask)`` for a segmentation manifest of ``image`` + ``mask`` rows (paths relative to the
    manifest, or URLs); the mask a uint8 array [H, W] of class indices (:func:`read_mask`) the size of its image.
    The first ``max_samples`` rows only when given."""
    if not is_manifest(path):
        raise EvalDataError(f"{path}: a segmentation set is a manifest ({', '.join(MANIFEST_EXTS)}) with 'mask'")
    base = folder_of(path)
    for line_no, row in read_manifest(path, max_samples):
        if not row.get("mask"):
            raise EvalDataError(f"{path}:{line_no}: no 'mask' (a segmentation manifest needs one)")
        image = read_image(join_path(base, str(row["image"])))
        mask_url = join_path(base, str(row["mask"]))
        mask = read_mask(mask_url)
        if mask.shape != (image.height, image.width):
            raise EvalDataError(
                f"{mask_url}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {image.width}x{image.height}"
            )
        yield image, mask


def detect_task(path: str | Sequence[str]) -> str:
    """``zeroshot``, ``retrieval`` or ``segmentation`` for a data path: shards are classification sets; a
    manifest is judged by its first row (``mask`` -> segmentation, ``label`` -> zeroshot, ``captions``/``caption``
    -> retrieval)."""
    if not is_manifest(path):
        return "zeroshot"
    for line_no, row in read_manifest(path, max_rows=1):
        if "mask" in row:
            return "segmentation"
        if "label" in row:
            return "zeroshot"
        if "captions" in row or "caption" in row:
            return "retrieval"
        raise EvalDataError(
            f"{path}:{line_no}: cannot tell the task: a row needs 'label' (zeroshot), 'captions' (retrieval) or "
            "'mask' (segmentation)"
        )
    raise EvalDataError(f"{path}: empty manifest")
