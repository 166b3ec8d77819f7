"""A manifest dataset: one line per image (JSONL or CSV) with its caption or captions, read through fsspec.

The file is read by :func:`sparc_kit.data.sources.read_manifest_rows` and image paths are joined by
:func:`~sparc_kit.data.sources.join_path`, the same readers the evaluation sets use.

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

import random
import warnings
from typing import Any, Iterator, Literal

from torch.utils.data import Dataset

from sparc_kit.data.filesystems import check_url
from sparc_kit.data.sources import (
    ManifestError,
    Opener,
    folder_of,
    is_url,
    join_path,
    manifest_format,
    read_manifest_rows,
    row_captions,
)
from sparc_kit.data.transforms import BadImageError, ResizeMode, StoredImages, stable_seed
from sparc_kit.registry import datasets

# the manifest readers live in sparc_kit.data.sources (shared with the evaluation sets); named here too
__all__ = ["ManifestDataset", "ManifestError", "read_manifest_rows", "is_url", "join_path"]


@datasets.register("manifest")
class ManifestDataset(StoredImages, Dataset):
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
        self._keep_image_settings(
            image_size, seed, max_caption_chars, resize_mode, random_resized_crop, storage_options
        )
        self.path = path
        self.image_key = image_key
        self.caption_key = caption_key
        self.captions_key = captions_key
        self.image_root = image_root if image_root is not None else folder_of(path)
        self.format = manifest_format(path, format)
        self.images: list[str] = []
        self.texts: list[list[Any]] = []  # the raw caption values of each row, validated when read
        self.keys: list[str] = []
        self.extras: list[dict[str, Any]] = []
        self.bad_rows: list[tuple[int, str]] = []  # (line number, reason) of lines dropped at load time
        self._opener = Opener(self.storage_options, field=f"data.path (the images {path} lists)")
        self._load()

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
            texts = row_captions(row, self.caption_key, self.captions_key)
            if texts is None:
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
            check_url(url, self._opener.field)
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

    def read_bytes(self, index: int) -> bytes:
        return self._opener.read(self.image_path(index))

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
