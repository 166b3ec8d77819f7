"""A manifest dataset: one line per image (JSONL or CSV) with its caption or captions, read through fsspec.

::

    {"image": "val2017/000000427034.jpg", "captions": ["a cat on a sofa", "a sleeping cat"]}
    {"image": "s3://bucket/images/1.jpg", "caption": "a red bus"}

Image paths are relative to ``image_root`` (default: the manifest's folder) unless absolute or a URL
(``s3://``, ``gs://``, ``https://``, ...). With a ``captions`` list, one caption is used per epoch: the
dataset is ``epoch_aware`` (the sampler passes ``epoch * n + index``) and the choice is a pure function of
``(seed, epoch, index)`` that goes through every caption of an image once before repeating one.

Unreadable samples never raise: a missing or undecodable image, or no usable caption, gives
``{"skip": "<key>: <reason>"}``, which the collate function counts. Lines that are not JSON objects or lack
the keys are dropped at load time and listed in :attr:`ManifestDataset.bad_rows`; a manifest with no usable
line at all is an error.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import random
import warnings
from typing import Any, Iterator, Literal

import fsspec
from torch.utils.data import Dataset

from sparc_kit.data.filesystems import check_url, filesystem
from sparc_kit.data.transforms import BadImageError, ImageTransform, ResizeMode, stable_seed
from sparc_kit.errors import SparcError
from sparc_kit.registry import datasets

__all__ = ["ManifestDataset", "ManifestError", "read_manifest_rows", "is_url", "join_path"]

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class ManifestError(SparcError, ValueError):
    """The manifest as a whole is unusable (missing, unreadable, or no line has the needed keys)."""


def is_url(path: str) -> bool:
    return "://" in path


def join_path(root: str, path: str) -> str:
    """``path`` if absolute or a URL, else ``root/path`` (URL-aware)."""
    if is_url(path) or os.path.isabs(path):
        return path
    if is_url(root):
        return root.rstrip("/") + "/" + path
    return os.path.join(root, path)


def _parent(path: str) -> str:
    if is_url(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def manifest_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in ("jsonl", "csv"):
            raise ManifestError(f"manifest format must be jsonl, csv or auto, got {fmt!r}")
        return fmt
    name = path.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".csv") or name.endswith(".tsv"):
        return "csv"
    if name.endswith(".jsonl") or name.endswith(".json") or name.endswith(".ndjson"):
        return "jsonl"
    raise ManifestError(f"manifest {path}: cannot tell the format from the extension; set format: jsonl or csv")


def read_manifest_rows(
    path: str, fmt: str = "auto", storage_options: dict | None = None, field: str = "data.path"
) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line_number, row, error)`` for each non-blank line; ``row`` is None when the line is unusable.
    ``field`` names the setting in the error for a URL whose filesystem package is missing."""
    fmt = manifest_format(path, fmt)
    check_url(path, field)
    try:
        f = fsspec.open(path, "rt", encoding="utf-8", compression="infer", **(storage_options or {})).open()
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except Exception as exc:
        raise ManifestError(f"cannot open manifest {path}: {exc}") from None
    with f:
        try:
            if fmt == "jsonl":
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield number, None, f"not valid JSON ({exc.msg})"
                        continue
                    if not isinstance(row, dict):
                        yield number, None, f"not a JSON object but {type(row).__name__}"
                        continue
                    yield number, row, None
            else:
                delimiter = "\t" if path.lower().split(".")[-1] == "tsv" else ","
                reader = csv.DictReader(f, delimiter=delimiter)
                for row in reader:
                    number = reader.line_num
                    if None in row:  # more cells than header columns
                        yield number, None, "more cells than the header has columns"
                        continue
                    yield number, dict(row), None
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse_captions(value: Any) -> list[Any]:
    """A captions cell: a list, or (CSV) a JSON list in a string."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return [value]
        else:
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


@datasets.register("manifest")
class ManifestDataset(Dataset):
    """Images and captions listed in a JSONL or CSV manifest, local or on any fsspec filesystem.

    Each line names an image (``image_key``; relative to ``image_root``, by default the manifest's folder, or
    an absolute path / URL) and a ``caption_key`` string or a ``captions_key`` list (one caption per epoch).
    Item ``i`` is ``{"image": uint8 [3, S, S], "caption": str, "key": str, "index": int}``, or
    ``{"skip": reason}`` when the sample is unreadable. ``storage_options`` go to fsspec for URLs (credentials
    belong in the environment: the options are written to the run's recipe.yaml).
    """

    epoch_aware = True

    def __init__(
        self,
        path: str,
        image_key: str = "image",
        caption_key: str = "caption",
        captions_key: str = "captions",
        image_root: str | None = None,
        format: Literal["auto", "jsonl", "csv"] = "auto",
        image_size: int | None = None,
        seed: int = 0,
        max_caption_chars: int = 1000,
        resize_mode: ResizeMode = "center_crop",
        random_resized_crop: bool = False,
        storage_options: dict[str, Any] | None = None,
    ):
        if max_caption_chars <= 0:
            raise ValueError(f"max_caption_chars must be positive, got {max_caption_chars}")
        self.path = path
        self.image_key = image_key
        self.caption_key = caption_key
        self.captions_key = captions_key
        self.image_root = image_root if image_root is not None else _parent(path)
        self.format = manifest_format(path, format)
        self.image_size = image_size
        self.seed = seed
        self.max_caption_chars = max_caption_chars
        self.storage_options = dict(storage_options or {})
        self.transform = ImageTransform(
            image_size, train=True, resize_mode=resize_mode, random_resized_crop=random_resized_crop, seed=seed
        )
        self.images: list[str] = []
        self.texts: list[list[Any]] = []  # the raw caption values of each row, validated when read
        self.keys: list[str] = []
        self.extras: list[dict[str, Any]] = []
        self.bad_rows: list[tuple[int, str]] = []  # (line number, reason) of lines dropped at load time
        self._load()
        self._fs_cache: dict[str, Any] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------------------- loading
    def _load(self) -> None:
        lines = 0
        for number, row, error in read_manifest_rows(self.path, self.format, self.storage_options):
            lines += 1
            if row is None:
                self.bad_rows.append((number, error or "unusable"))
                continue
            image = row.get(self.image_key)
            if not isinstance(image, str) or not image.strip():
                self.bad_rows.append((number, f"no {self.image_key!r} path"))
                continue
            if self.captions_key in row and row[self.captions_key] not in (None, ""):
                texts = _parse_captions(row[self.captions_key])
            elif self.caption_key in row:
                texts = [row[self.caption_key]]
            else:
                self.bad_rows.append((number, f"neither {self.caption_key!r} nor {self.captions_key!r}"))
                continue
            self.images.append(image.strip())
            self.texts.append(texts)
            self.keys.append(f"line {number}")
            self.extras.append(
                {k: v for k, v in row.items() if k not in (self.image_key, self.caption_key, self.captions_key)}
            )
        schemes = {}  # one image URL per scheme: its filesystem package must be importable
        for image in self.images:
            path = join_path(self.image_root, image)
            if is_url(path):
                schemes.setdefault(path.split("://", 1)[0], path)
        for url in schemes.values():
            check_url(url, f"data.path (the images {self.path} lists)")
        if not self.images:
            if not lines:
                raise ManifestError(f"manifest {self.path} is empty")
            number, reason = self.bad_rows[0]
            raise ManifestError(
                f"manifest {self.path}: none of its {lines} lines is usable (line {number}: {reason}); "
                f"expected {self.image_key!r} and {self.caption_key!r} or {self.captions_key!r}"
            )
        if self.bad_rows:
            number, reason = self.bad_rows[0]
            warnings.warn(
                f"manifest {self.path}: {len(self.bad_rows)} of {lines} lines skipped (first: line {number}: "
                f"{reason})",
                stacklevel=3,
            )

    # --------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs_cache"] = {}
        return state

    def image_path(self, index: int) -> str:
        return join_path(self.image_root, self.images[index])

    def valid_captions(self, index: int) -> list[str]:
        out = []
        for text in self.texts[index]:
            if isinstance(text, str):
                text = " ".join(text.split())
                if text:
                    out.append(text[: self.max_caption_chars])
        return out

    def caption_for(self, index: int, epoch: int = 0) -> str | None:
        """The caption of ``index`` in ``epoch``: each caption once per cycle of ``len(captions)`` epochs."""
        texts = self.valid_captions(index)
        if not texts:
            return None
        m = len(texts)
        if m == 1:
            return texts[0]
        cycle, slot = divmod(epoch, m)
        order = list(range(m))
        rng = random.Random(stable_seed("captions", self.seed, index, cycle))
        for i in range(m - 1, 0, -1):  # Fisher-Yates with random(), stable across Python versions
            j = int(rng.random() * (i + 1))
            order[i], order[j] = order[j], order[i]
        return texts[order[slot]]

    def captions(self, limit: int | None = None) -> Iterator[str]:
        """Every usable caption (all of a row's list), up to ``limit``; no image is read."""
        count = 0
        for index in range(len(self)):
            for text in self.valid_captions(index):
                if limit is not None and count >= limit:
                    return
                yield text
                count += 1

    def _fs(self, url: str):
        if os.getpid() != self._pid:  # a forked data-loader worker: filesystems are not fork-safe
            self._fs_cache, self._pid = {}, os.getpid()
        protocol = url.split("://", 1)[0] if is_url(url) else "file"
        fs = self._fs_cache.get(protocol)
        if fs is None:
            fs = filesystem(url, self.storage_options, field=f"data.path (the images {self.path} lists)")
            self._fs_cache[protocol] = fs
        return fs

    def read_bytes(self, index: int) -> bytes:
        path = self.image_path(index)
        if not is_url(path):
            with open(path, "rb") as f:
                return f.read()
        fs = self._fs(path)
        with fs.open(path, "rb") as f:
            return f.read()

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.images)
        if index < 0:
            raise IndexError(index)
        epoch, index = divmod(int(index), n)
        key = self.keys[index]
        caption = self.caption_for(index, epoch)
        if caption is None:
            return {"skip": f"{key}: no usable caption (empty or not a string)", "key": key, "index": index}
        try:
            data = self.read_bytes(index)
        except FileNotFoundError:
            return {"skip": f"{key}: image not found: {self.image_path(index)}", "key": key, "index": index}
        except Exception as exc:  # network errors, permissions, directories
            return {"skip": f"{key}: cannot read {self.image_path(index)}: {exc}", "key": key, "index": index}
        try:
            image = self.transform(data, key=(epoch, index))
        except BadImageError as exc:
            return {"skip": f"{key}: {self.images[index]}: {exc}", "key": key, "index": index}
        return {"image": image, "caption": caption, "key": key, "index": index}
