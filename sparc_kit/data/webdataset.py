"""WebDataset tar shards (``KEY.jpg`` + ``KEY.txt`` / ``KEY.json``) streamed from local disk or any fsspec URL.

Written on Python's :mod:`tarfile` in streaming mode rather than on the ``webdataset`` package: what this
project needs from shards is a sample order that is an exact, documented function of a few numbers, so that a
resumed run continues without repeats or gaps also with several data-loader workers and processes. That order
(shard split, shuffle buffer, epochs, resume offsets) is the part the ``webdataset`` package leaves to its
pipeline stages and random state, so we would reimplement it on top anyway; reading a tar stream is the easy
part. No extra dependency either.

The sample stream
-----------------
Shards come from ``urls`` (brace-expanded: ``shards/train-{000..127}.tar``; several patterns joined by
``::``; fsspec chains such as ``simplecache::s3://...`` kept whole), read member by member with
:func:`sparc_kit.data.sources.iter_tar`, the reader the evaluation sets use too. Reading is split into
``slots = world_size * W`` (W = data-loader workers, 1 when reading in-process); slot ``rank * W + l`` is
logical worker ``l`` of process ``rank``. Per slot, the stream is endless and is the concatenation of epochs
``e = 0, 1, ...``:

- shard order of epoch ``e``: a permutation of the shards seeded by ``(seed, e)``; slot ``s`` reads the shards
  at positions ``s, s + slots, ...`` of it. With fewer shards than slots, every slot reads all shards of the
  epoch and keeps the samples whose running index ``j`` has ``j % slots == s`` (correct, but each slot reads
  every byte: use at least as many shards as slots);
- ``resampled=True``: epoch ``e`` of slot ``s`` is instead ``max(1, shards // slots)`` shards drawn with
  replacement, seeded by ``(seed, slots, s, e)`` (endless sampling with replacement, as webdataset's);
- a shuffle buffer of ``shuffle_buffer`` samples, seeded by ``(seed, slots, s, e)``, emptied at the end of
  every epoch.

So a slot's stream is a pure function of ``(urls, seed, world_size, W, rank, l)`` and of the data. A process's
stream is what a DataLoader makes of its W workers: batch ``b`` (of ``batch_size`` samples) is the
``b // W``-th batch of logical worker ``b % W``.

Resuming: after ``k`` samples were consumed by this process (``B = k // batch_size`` batches),
``set_state(start=k, rank, world_size, batch_size)`` and a fresh DataLoader with the same ``batch_size`` and
``num_workers``: physical worker ``p`` plays logical worker ``l = (p + B) % W`` (DataLoader takes batches
round-robin from worker 0), and skips the ``ceil((B - l) / W) * batch_size`` samples that logical worker had
already produced. Skipping reads but does not decode; whole epochs are skipped by counting samples.

Bad samples
-----------
``bad_samples="mark"`` (default): an unreadable sample (undecodable image, no image, no caption, an empty or
non-string caption, a shard that cannot be read) takes its place in the stream as ``{"skip": reason}``, and
the collate function drops and counts it. The stream's positions then do not depend on which samples decode,
so resuming is exact without decoding what is skipped; a batch holds ``batch_size`` minus its bad samples.
``bad_samples="drop"``: bad samples are dropped inside the worker and counted in the next good sample's
``"skipped_before"``; batches are full, but resuming must decode everything it skips. In either mode a whole
epoch of a reader without one readable sample is a :class:`ShardError` (the stream would never give one).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from typing import Any, Iterator, Literal

from torch.utils.data import IterableDataset, get_worker_info

from sparc_kit.data.filesystems import FilesystemUnavailableError, check_url
from sparc_kit.data.sources import SHARD_ERROR, Opener, expand_urls, is_url, iter_tar, split_name, write_sample
from sparc_kit.data.transforms import BadImageError, ResizeMode, StoredImages, stable_seed
from sparc_kit.errors import SparcError
from sparc_kit.registry import datasets

# the shard readers live in sparc_kit.data.sources (shared with the evaluation sets); named here too
__all__ = ["WebDataset", "expand_urls", "iter_tar", "split_name", "ShardError", "write_sample"]

log = logging.getLogger(__name__)

_ERROR = SHARD_ERROR  # the key of a pseudo-sample that stands for a shard read error


class ShardError(SparcError, ValueError):
    """The shard list is unusable (empty pattern, missing local shards)."""


def _permute(items: list, rng: random.Random) -> list:
    out = list(items)
    for i in range(len(out) - 1, 0, -1):  # Fisher-Yates on random(): stable across Python versions
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


def _shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.random() * size)
        yield buf[i]
        buf[i] = item
    while buf:
        i = int(rng.random() * len(buf))
        yield buf[i]
        buf[i] = buf[-1]
        buf.pop()


# ---------------------------------------------------------------------------------------------------- dataset
@datasets.register("webdataset")
class WebDataset(StoredImages, IterableDataset):
    """Tar shards of ``KEY.jpg``/``KEY.png`` + ``KEY.txt`` (or ``KEY.json`` with ``caption`` / ``captions``).

    ``urls`` is a brace pattern, local or any fsspec URL (``s3://bucket/train-{000..127}.tar``), with
    ``storage_options`` for the filesystem (``{"client_kwargs": {"endpoint_url": ...}}`` for an S3-compatible
    store; fsspec's ``FSSPEC_S3_*`` environment variables work too; keep credentials in the environment, as
    ``storage_options`` are written to the run's recipe.yaml). Endless, shuffled, split over processes and
    data-loader workers with a deterministic, resumable order (see the module docs). ``length`` is the nominal
    number of samples per epoch, when known. Items: ``{"image": uint8 [3, S, S], "caption": str, "key": str,
    "shard": str}``, or ``{"skip": reason}`` for an unreadable one.
    """

    def __init__(
        self,
        urls: str,
        image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
        text_exts: tuple[str, ...] = ("txt", "json"),
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        image_size: int | None = None,
        seed: int = 0,
        length: int | None = None,
        max_caption_chars: int = 1000,
        bad_samples: Literal["mark", "drop"] = "mark",
        resize_mode: ResizeMode = "center_crop",
        random_resized_crop: bool = False,
        storage_options: dict[str, Any] | None = None,
        caption_templates: tuple[str, ...] = ("{}",),
    ):
        if not caption_templates or any("{}" not in t for t in caption_templates):
            raise ValueError("caption_templates: each template needs a '{}' for the sample's text, e.g. 'a photo of a {}.'")
        self.caption_templates = tuple(caption_templates)
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ShardError(f"no shards in {urls!r} (a folder or a glob is read as the .tar files it holds)")
        for url in {u.split("://", 1)[0]: u for u in self.urls if is_url(u)}.values():  # one per scheme
            check_url(url, "data.urls")
        missing = [u for u in self.urls if not is_url(u) and not os.path.isfile(u)]
        if missing:
            more = f" (and {len(missing) - 1} more of {len(self.urls)})" if len(missing) > 1 else ""
            raise ShardError(f"shard not found: {missing[0]}{more}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if bad_samples not in ("mark", "drop"):
            raise ValueError(f"bad_samples must be 'mark' or 'drop', got {bad_samples!r}")
        self.pattern = urls
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.text_exts = tuple(e.lower().lstrip(".") for e in text_exts)
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.length = length
        self.bad_samples = bad_samples
        self._keep_image_settings(image_size, seed, max_caption_chars, resize_mode, random_resized_crop, storage_options)
        self.start, self.rank, self.world_size, self.batch_size = 0, 0, 1, 1
        self._counts: dict[str, int] = {}
        self._opener = Opener(self.storage_options, field="data.urls")

    # ------------------------------------------------------------------------------------------- position
    def set_state(self, start: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> "WebDataset":
        """Where this process's stream begins: ``start`` samples already consumed by this rank (a multiple of
        ``batch_size`` when reading with data-loader workers), out of ``world_size`` processes; ``batch_size`` is
        the DataLoader's, per process. Call before creating the DataLoader."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or start < 0:
            raise ValueError(f"need batch_size >= 1 and start >= 0, got {batch_size}, {start}")
        self.start, self.rank, self.world_size, self.batch_size = int(start), rank, world_size, batch_size
        return self

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this WebDataset has no nominal length: set `length`")
        return self.length

    def worker_plan(self, worker_id: int = 0, num_workers: int = 0) -> tuple[int, int, int]:
        """``(slot, slots, skip)`` for one physical data-loader worker (0, 0 when reading in-process)."""
        w = max(num_workers, 1)
        batches, rest = divmod(self.start, self.batch_size)
        if w > 1 and rest:
            raise ValueError(
                f"start={self.start} is not a multiple of batch_size={self.batch_size}: with data-loader workers "
                "a stream can only resume at a batch boundary"
            )
        logical = (worker_id + batches) % w
        produced = (batches - logical + w - 1) // w if batches > logical else 0
        skip = produced * self.batch_size + (rest if w == 1 else 0)
        return self.rank * w + logical, self.world_size * w, skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot, slots, skip = self.worker_plan(info.id if info else 0, info.num_workers if info else 0)
        return self.stream(slot, slots, skip)

    # ------------------------------------------------------------------------------------------ the stream
    def epoch_shards(self, epoch: int, slot: int, slots: int) -> tuple[list[str], tuple[int, int] | None]:
        """The shards slot ``slot`` of ``slots`` reads in ``epoch``, and ``(slot, slots)`` when it must keep
        only every ``slots``-th sample (fewer shards than slots)."""
        if self.resampled:
            rng = random.Random(stable_seed("resample", self.seed, slots, slot, epoch))
            k = max(1, len(self.urls) // slots)
            return [self.urls[int(rng.random() * len(self.urls))] for _ in range(k)], None
        order = _permute(self.urls, random.Random(stable_seed("shards", self.seed, epoch)))
        if len(order) >= slots:
            return order[slot::slots], None
        return order, (slot, slots)

    def _raw_epoch(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        shards, stride = self.epoch_shards(epoch, slot, slots)
        j = 0  # running sample index over the epoch's shards (for the sample-level split)
        for url in shards:
            if stride is None:
                keep = None
            else:
                base = j
                keep = lambda i, base=base: (base + i) % stride[1] == stride[0]  # noqa: E731
            n = 0
            for key, files in self._read_shard(url, keep):
                n += 1
                if stride is None or (j + n - 1) % stride[1] == stride[0]:
                    yield url, key, files
            j += n

    def _epoch_size(self, epoch: int, slot: int, slots: int) -> int:
        """Samples in this slot's epoch, counted (no bytes kept; cached per shard)."""
        shards, stride = self.epoch_shards(epoch, slot, slots)
        total = sum(self.count(url) for url in shards)
        if stride is None:
            return total
        s, n = stride
        return (total - s + n - 1) // n if total > s else 0

    def count(self, url: str) -> int:
        """Samples in one shard, a read error counting as one (as in the stream)."""
        if url not in self._counts:
            self._counts[url] = sum(1 for _ in self._read_shard(url, keep=lambda i: False))
        return self._counts[url]

    def stream(self, slot: int = 0, slots: int = 1, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Slot ``slot`` of ``slots``'s endless stream, from its ``skip``-th item on (see the module docs)."""
        if not 0 <= slot < slots:
            raise ValueError(f"slot must be in [0, {slots}), got {slot}")
        epoch = 0
        if self.bad_samples == "mark":  # positions count raw samples: skip whole epochs by counting
            while skip > 0:
                size = self._epoch_size(epoch, slot, slots)
                if size == 0:
                    raise ShardError(self._empty_message(slot, slots))
                if skip < size:
                    break
                skip -= size
                epoch += 1
        pending = 0  # bad samples passed over (drop mode)
        for epoch in itertools.count(epoch):
            rng = random.Random(stable_seed("shuffle", self.seed, slots, slot, epoch))
            raw = _shuffle(self._raw_epoch(epoch, slot, slots), self.shuffle_buffer, rng)
            produced = good = 0
            judged = skip == 0  # mark mode decodes (and so can judge) only the epochs it does not skip into
            for position, (url, key, files) in enumerate(raw):
                produced += 1
                if self.bad_samples == "mark":
                    if skip > 0:
                        skip -= 1
                        continue
                    sample = self.decode(url, key, files, epoch, aug_key=(slots, slot, epoch, position))
                    good += "skip" not in sample
                    yield sample
                    continue
                sample = self.decode(url, key, files, epoch, aug_key=(slots, slot, epoch, position))
                if "skip" in sample:
                    log.debug("skipped %s", sample["skip"])
                    pending += 1
                    continue
                good += 1
                if skip > 0:
                    skip -= 1
                    pending = 0  # skipped samples before an already-consumed one were counted then
                    continue
                if pending:
                    sample["skipped_before"] = pending
                    pending = 0
                yield sample
            if produced == 0:
                raise ShardError(self._empty_message(slot, slots))
            if good == 0 and (self.bad_samples == "drop" or judged):  # else an endless stream of bad samples
                raise ShardError(
                    f"no readable sample in a whole epoch of reader {slot} of {slots} ({len(self.urls)} shards "
                    f"from {self.pattern}); check them with `sparc data verify`"
                )

    def _empty_message(self, slot: int, slots: int) -> str:
        return (
            f"reader {slot} of {slots} gets no sample from {len(self.urls)} shard(s) of {self.pattern}: fewer "
            "samples than processes x data-loader workers"
        )

    # ------------------------------------------------------------------------------------------- decoding
    def open_shard(self, url: str):
        return self._opener.open(url, buffering=1 << 20)

    def _read_shard(self, url: str, keep=None, want=None) -> Iterator[tuple[str, dict[str, bytes]]]:
        try:
            f = self.open_shard(url)
        except FileNotFoundError:
            yield _ERROR, {"error": b"shard not found"}
            return
        except FilesystemUnavailableError:  # not a bad shard: nothing of this scheme can be read here
            raise
        except Exception as exc:
            yield _ERROR, {"error": f"cannot open: {type(exc).__name__}: {exc}".encode()}
            return
        with f:
            yield from iter_tar(f, keep, want)

    def parse(self, key: str, files: dict[str, bytes], epoch: int = 0) -> tuple[bytes | None, str | None, str | None]:
        """``(image_bytes, caption, error)`` of one raw sample; ``error`` is a one-line reason or None."""
        if key == _ERROR:
            return None, None, "shard unreadable: " + files.get("error", b"").decode(errors="replace")
        image = next((files[e] for e in self.image_exts if e in files), None)
        if image is None:
            missing = f"no image ({'/'.join('.' + e for e in self.image_exts)}); has {_exts(files)}"
            return None, None, missing + _download_status(files.get("json"))
        ext = next((e for e in self.text_exts if e in files), None)
        if ext is None:
            return image, None, f"no caption ({'/'.join('.' + e for e in self.text_exts)}); has {_exts(files)}"
        try:
            text = files[ext].decode("utf-8")
        except UnicodeDecodeError:
            return image, None, f"caption .{ext} is not UTF-8"
        if ext.endswith("json"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                return image, None, f"caption .{ext} is not valid JSON ({exc.msg})"
            text = _json_caption(obj, self.seed, epoch, key)
        if text is None:
            return image, None, f"no 'caption' or 'captions' in .{ext}"
        if not isinstance(text, str):
            return image, None, f"caption is not text but {type(text).__name__}"
        if not text.strip():
            return image, None, "empty caption"
        return image, self._template(" ".join(text.split()), key, epoch)[: self.max_caption_chars], None

    def _template(self, text: str, key: str, epoch: int) -> str:
        """Wrap a label-like text in one of ``caption_templates`` (fixed per sample and epoch), so a set whose
        texts are class names ("airplane") trains on captions ("a photo of an airplane.")."""
        if self.caption_templates == ("{}",):
            return text
        rng = random.Random(stable_seed("template", self.seed, key, epoch))
        return rng.choice(self.caption_templates).format(text)

    def decode(self, url: str, key: str, files: dict[str, bytes], epoch: int = 0, aug_key: tuple = ()) -> dict:
        name = f"{_short(url)}:{key}"
        image, caption, error = self.parse(key, files, epoch)
        if error is None:
            try:
                tensor = self.transform(image, key=aug_key)
            except BadImageError as exc:
                error = str(exc)
        if error is not None:
            return {"skip": f"{name}: {error}", "key": key, "shard": url}
        return {"image": tensor, "caption": caption, "key": key, "shard": url}

    # ---------------------------------------------------------------------------------------- single passes
    def scan(self, decode: bool = True) -> Iterator[dict[str, Any]]:
        """Every sample once, shards in the listed order, no shuffle (for inspection and verification).

        Items carry ``key``, ``shard`` and either ``skip`` or ``caption`` plus ``image`` (a tensor) when
        ``decode``, else ``image_bytes``."""
        for url in self.urls:
            for key, files in self._read_shard(url):
                if decode:
                    yield self.decode(url, key, files)
                    continue
                image, caption, error = self.parse(key, files)
                if error is not None:
                    yield {"skip": f"{_short(url)}:{key}: {error}", "key": key, "shard": url}
                else:
                    yield {"image_bytes": image, "caption": caption, "key": key, "shard": url}

    def captions(self, limit: int | None = None) -> Iterator[str]:
        """Captions in shard order, up to ``limit``; image bytes are not read."""
        count = 0

        def want(ext: str) -> bool:
            return ext in self.text_exts

        for url in self.urls:
            for key, files in self._read_shard(url, want=want):
                if limit is not None and count >= limit:
                    return
                if key == _ERROR:
                    continue
                ext = next((e for e in self.text_exts if e in files), None)
                if ext is None:
                    continue
                try:
                    text = files[ext].decode("utf-8")
                    if ext.endswith("json"):
                        obj = json.loads(text)
                        texts = obj.get("captions") if isinstance(obj, dict) and "captions" in obj else [
                            obj.get("caption") if isinstance(obj, dict) else None
                        ]
                    else:
                        texts = [text]
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                for t in texts or []:
                    if isinstance(t, str) and t.strip():
                        if limit is not None and count >= limit:
                            return
                        template = self.caption_templates[count % len(self.caption_templates)]
                        yield template.format(" ".join(t.split()))[: self.max_caption_chars]
                        count += 1


def _json_caption(obj: Any, seed: int, epoch: int, key: str) -> Any:
    if not isinstance(obj, dict):
        return None
    captions = obj.get("captions")
    if isinstance(captions, list):
        valid = [c for c in captions if isinstance(c, str) and c.strip()]
        if valid:
            cycle, slot = divmod(epoch, len(valid))
            order = _permute(list(range(len(valid))), random.Random(stable_seed("captions", seed, key, cycle)))
            return valid[order[slot]]
    return obj.get("caption")


def _download_status(meta: bytes | None) -> str:
    """What a downloader's ``KEY.json`` says about a sample it could not fetch (img2dataset's ``status`` and
    ``error_message``), as a suffix of the skip reason; empty when it says nothing."""
    try:
        obj = json.loads(meta) if meta else None
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(obj, dict) or obj.get("status") in (None, "success"):
        return ""
    error = obj.get("error_message")
    return f" (status {obj['status']}{': ' + str(error).splitlines()[0] if error else ''})"


def _exts(files: dict[str, bytes]) -> str:
    return ", ".join("." + e for e in sorted(files)) or "no files"


def _short(url: str) -> str:
    return url.rsplit("/", 1)[-1]
