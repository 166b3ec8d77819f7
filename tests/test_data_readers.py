"""Training and evaluation read a data set the same way: one reader per format (``sparc_kit.data.sources``).

Each case below is a place where the two used to differ; every test reads real files (in ``tmp_path``, or in
fsspec's ``memory://`` filesystem) through BOTH paths, the training datasets (``WebDataset``,
``ManifestDataset``) and the evaluation readers (``iter_labelled_images``, ``load_retrieval_set``), and asserts
the exact names, captions, labels or pixels read:

- shard patterns: zero padding as bash pads it (``{01..100}`` -> ``001 ... 100``; ``{1..002}``), ``::``
  between patterns (evaluation read ``a.tar::b.tar`` as one name), fsspec chains kept whole
  (``simplecache::memory://...``: training split them at ``::``);
- manifests: compressed (``.jsonl.gz``, ``.tsv.gz``), a JSON array in a ``.json``, a CSV with both ``caption``
  and ``captions`` columns; a manifest behind a chained URL (``simplecache::``, ``zip://...::``) with image
  paths relative to it;
- tar members that belong to no sample (``README``, ``._0.png``);
- image decoding: a transparent PNG decodes alike (on white) in both.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
import zipfile

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

import sparc_kit.data.manifest as manifest
import sparc_kit.data.sources as sources
import sparc_kit.data.webdataset as webdataset
import sparc_kit.evaluate.data as eval_data
from sparc_kit.data import ManifestDataset, WebDataset, expand_urls
from sparc_kit.evaluate.data import (
    EvalDataError,
    detect_task,
    expand_braces,
    iter_labelled_images,
    load_retrieval_set,
    shard_urls,
)

CLASSES = ["cat", "dog", "ship"]


@pytest.fixture
def memory_root():
    """A fresh folder in fsspec's in-memory filesystem, removed afterwards."""
    root = f"memory://readers-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def write_label_shard(datagen, path, keys_and_labels) -> str:
    """A shard of ``KEY.png`` (pixels of index i) + ``KEY.txt`` (the class name)."""
    return datagen.write_shard(
        path, [(key, {"png": datagen.image_bytes(i), "txt": label.encode()}) for i, (key, label) in keys_and_labels]
    )


def training_captions(pattern: str, **kw) -> list[tuple[str, str]]:
    """``(key, caption)`` of every sample, in shard order, through the training dataset (no sample skipped)."""
    records = list(WebDataset(pattern, image_size=None, shuffle_buffer=0, **kw).scan())
    assert [r for r in records if "skip" in r] == []
    return [(r["key"], r["caption"]) for r in records]


def eval_labels(pattern, **kw) -> list[int]:
    return [label for _, label in iter_labelled_images(pattern, CLASSES, **kw)]


# ---------------------------------------------------------------------------------------------- shard names
def test_zero_padding_is_bash_padding_in_both():
    """``{01..100}``: both ends padded to the wider one, as bash does (training gave 1..100, evaluation 01..99,
    100)."""
    expected = [f"s-{i:03d}.tar" for i in range(1, 101)]
    assert expand_urls("s-{01..100}.tar") == expected
    assert shard_urls("s-{01..100}.tar") == expected
    assert expand_braces("s-{01..100}.tar") == expected
    assert expand_urls("x{1..05}") == ["x01", "x02", "x03", "x04", "x05"]  # a leading zero on either end
    assert shard_urls("x{10..08}") == ["x10", "x09", "x08"]
    assert expand_urls("{-05..1}") == ["-05", "-04", "-03", "-02", "-01", "000", "001"]  # bash: sign counts
    assert shard_urls("{8..10}") == ["8", "9", "10"] == expand_urls("{8..10}")  # no leading zero: no padding
    assert expand_urls("a{x}b{1..2}") == ["a{x}b1", "a{x}b2"] == shard_urls("a{x}b{1..2}")  # {x} is literal


def test_padded_shards_on_disk_read_by_both(tmp_path, datagen):
    """``t-{1..002}.tar`` names ``t-001.tar`` and ``t-002.tar`` (both readers looked for ``t-1.tar``)."""
    write_label_shard(datagen, tmp_path / "t-001.tar", [(0, ("a", "dog")), (1, ("b", "ship"))])
    write_label_shard(datagen, tmp_path / "t-002.tar", [(2, ("c", "cat"))])
    pattern = str(tmp_path / "t-{1..002}.tar")
    assert training_captions(pattern) == [("a", "dog"), ("b", "ship"), ("c", "cat")]
    assert eval_labels(pattern) == [1, 2, 0]


def test_double_colon_joins_patterns_in_both(tmp_path, datagen):
    """``a.tar::b-{000..001}.tar`` is three shards for evaluation too (it read the whole as one URL)."""
    write_label_shard(datagen, tmp_path / "a.tar", [(0, ("a0", "ship"))])
    write_label_shard(datagen, tmp_path / "b-000.tar", [(1, ("b0", "cat"))])
    write_label_shard(datagen, tmp_path / "b-001.tar", [(2, ("b1", "dog")), (3, ("b2", "dog"))])
    pattern = f"{tmp_path}/a.tar::{tmp_path}/b-{{000..001}}.tar"
    names = [str(tmp_path / n) for n in ("a.tar", "b-000.tar", "b-001.tar")]
    assert expand_urls(pattern) == names == shard_urls(pattern)
    assert training_captions(pattern) == [("a0", "ship"), ("b0", "cat"), ("b1", "dog"), ("b2", "dog")]
    assert eval_labels(pattern) == [2, 0, 1, 1]


def test_fsspec_chained_shards_read_by_both(memory_root, datagen, tmp_path):
    """``simplecache::memory://.../s-{000..001}.tar`` stays one chained URL per shard (training split it at ``::``
    into ``simplecache`` and the rest, and found no shard ``simplecache``); a chain then a second pattern too."""
    fs = fsspec.filesystem("memory")
    for s, samples in enumerate([[(0, ("k0", "dog"))], [(1, ("k1", "cat")), (2, ("k2", "ship"))]]):
        local = write_label_shard(datagen, tmp_path / f"s-{s:03d}.tar", samples)
        fs.pipe(f"{memory_root}/s-{s:03d}.tar", open(local, "rb").read())
    pattern = f"simplecache::{memory_root}/s-{{000..001}}.tar"
    urls = [f"simplecache::{memory_root}/s-000.tar", f"simplecache::{memory_root}/s-001.tar"]
    assert expand_urls(pattern) == urls == shard_urls(pattern)
    assert expand_urls(f"{pattern}::{tmp_path}/s-000.tar") == [*urls, f"{tmp_path}/s-000.tar"]
    assert training_captions(pattern) == [("k0", "dog"), ("k1", "cat"), ("k2", "ship")]
    assert eval_labels(pattern) == [1, 0, 2]
    first = next(iter(WebDataset(pattern, image_size=None, shuffle_buffer=0).scan()))
    assert torch.equal(first["image"], torch.from_numpy(datagen.pixels(0)).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------------- manifests
def write_images(folder, n: int, datagen) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / "img" / f"{i}.png").write_bytes(datagen.image_bytes(i))


def pixels_of(image) -> np.ndarray:
    return np.asarray(image) if not isinstance(image, torch.Tensor) else image.permute(1, 2, 0).numpy()


def test_gzipped_jsonl_manifests_read_by_both(tmp_path, datagen):
    """``.jsonl.gz``: evaluation took it for a shard pattern."""
    write_images(tmp_path, 3, datagen)
    rows = [{"image": f"img/{i}.png", "label": CLASSES[i], "caption": f"a {CLASSES[i]} here"} for i in range(3)]
    path = tmp_path / "set.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    train = ManifestDataset(str(path), image_size=None)
    assert [train[i]["caption"] for i in range(3)] == ["a cat here", "a dog here", "a ship here"]
    assert detect_task(str(path)) == "zeroshot"
    got = list(iter_labelled_images(str(path), CLASSES))
    assert [label for _, label in got] == [0, 1, 2]
    for i, (image, _) in enumerate(got):
        assert np.array_equal(pixels_of(image), datagen.pixels(i))
        assert np.array_equal(pixels_of(train[i]["image"]), datagen.pixels(i))
    retrieval = load_retrieval_set(str(path))
    assert retrieval.captions == [["a cat here"], ["a dog here"], ["a ship here"]]
    assert retrieval.images == [str(tmp_path / "img" / f"{i}.png") for i in range(3)]


def test_gzipped_tsv_manifest_is_split_at_tabs_in_both(tmp_path, datagen):
    """``.tsv.gz``: training split it at commas, evaluation did not read it."""
    write_images(tmp_path, 2, datagen)
    text = "image\tcaption\tlabel\nimg/0.png\tone, two\tship\nimg/1.png\tthree\tcat\n"
    (tmp_path / "set.tsv.gz").write_bytes(gzip.compress(text.encode()))
    path = str(tmp_path / "set.tsv.gz")
    train = ManifestDataset(path, image_size=None)
    assert [train[i]["caption"] for i in range(2)] == ["one, two", "three"] and train.bad_rows == []
    assert [label for _, label in iter_labelled_images(path, CLASSES)] == [2, 0]
    assert load_retrieval_set(path).captions == [["one, two"], ["three"]]


def test_json_array_manifest_read_by_both(tmp_path, datagen):
    """A ``.json`` holding one JSON array: evaluation read it, training took each line for a JSONL row."""
    write_images(tmp_path, 2, datagen)
    rows = [{"image": "img/0.png", "captions": ["x y", "z"], "label": 1}, {"image": "img/1.png", "caption": "w"}]
    (tmp_path / "set.json").write_text(json.dumps(rows, indent=2))
    path = str(tmp_path / "set.json")
    train = ManifestDataset(path, image_size=None)
    assert train.bad_rows == [] and [train.valid_captions(i) for i in range(2)] == [["x y", "z"], ["w"]]
    assert train.keys == ["line 1", "line 2"]  # the array's items, numbered from 1
    assert load_retrieval_set(path).captions == [["x y", "z"], ["w"]]
    with pytest.raises(EvalDataError, match=r"set\.json:2: no 'label'"):
        list(iter_labelled_images(path, CLASSES))


def test_csv_with_caption_and_captions_columns_read_by_both(tmp_path, datagen):
    """The documented CSV layout: one of ``caption`` / ``captions`` filled per row (evaluation took the empty
    ``captions`` cell for the row's captions and stopped)."""
    write_images(tmp_path, 2, datagen)
    (tmp_path / "set.csv").write_text(
        'image,caption,captions\nimg/0.png,,"[""a cat on a sofa"", ""a sleeping cat""]"\nimg/1.png,a red bus,\n'
    )
    path = str(tmp_path / "set.csv")
    train = ManifestDataset(path, image_size=None)
    expected = [["a cat on a sofa", "a sleeping cat"], ["a red bus"]]
    assert [train.valid_captions(i) for i in range(2)] == expected
    assert load_retrieval_set(path).captions == expected
    assert detect_task(path) == "retrieval"


def test_manifest_behind_a_cache_chain_with_relative_images(memory_root, datagen):
    """``simplecache::memory://.../pairs.jsonl``: images relative to it are ``simplecache::memory://.../img/i.png``
    (training opened them with a bare ``simplecache`` filesystem and skipped every sample)."""
    fs = fsspec.filesystem("memory")
    for i in range(2):
        fs.pipe(f"{memory_root}/m/img/{i}.png", datagen.image_bytes(i))
    rows = [{"image": f"img/{i}.png", "caption": f"c{i}", "label": CLASSES[i]} for i in range(2)]
    fs.pipe(f"{memory_root}/m/pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    path = f"simplecache::{memory_root}/m/pairs.jsonl"
    train = ManifestDataset(path, image_size=None)
    assert train.image_path(1) == f"simplecache::{memory_root}/m/img/1.png"
    items = [train[i] for i in range(2)]
    assert [it.get("skip") for it in items] == [None, None]
    assert all(np.array_equal(pixels_of(it["image"]), datagen.pixels(i)) for i, it in enumerate(items))
    retrieval = load_retrieval_set(path)
    assert retrieval.images == [f"simplecache::{memory_root}/m/img/{i}.png" for i in range(2)]
    assert all(np.array_equal(pixels_of(image), datagen.pixels(i)) for i, (image, _) in enumerate(retrieval))
    assert [label for _, label in iter_labelled_images(path, CLASSES)] == [0, 1]


def test_manifest_inside_a_zip_with_relative_images(memory_root, datagen):
    """``zip://sub/pairs.jsonl::memory://.../set.zip``: the path is the first part of the chain, so images are
    joined there (``zip://sub/img/0.png::...``); neither reader could read it (an unknown extension ``.zip``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        rows = [{"image": f"img/{i}.png", "captions": [f"c{i}"], "label": i} for i in range(2)]
        z.writestr("sub/pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        for i in range(2):
            z.writestr(f"sub/img/{i}.png", datagen.image_bytes(i))
    fsspec.filesystem("memory").pipe(f"{memory_root}/set.zip", buffer.getvalue())
    path = f"zip://sub/pairs.jsonl::{memory_root}/set.zip"
    images = [f"zip://sub/img/{i}.png::{memory_root}/set.zip" for i in range(2)]
    train = ManifestDataset(path, image_size=None)
    assert [train.image_path(i) for i in range(2)] == images
    assert np.array_equal(pixels_of(train[1]["image"]), datagen.pixels(1)) and train[1]["caption"] == "c1"
    retrieval = load_retrieval_set(path)
    assert retrieval.images == images and retrieval.captions == [["c0"], ["c1"]]
    assert [label for _, label in iter_labelled_images(path, CLASSES)] == [0, 1]


def test_join_and_folder_keep_chains():
    assert sources.folder_of("simplecache::s3://b/m/x.jsonl") == "simplecache::s3://b/m"
    assert sources.folder_of("zip://a/b/m.jsonl::s3://b/z.zip") == "zip://a/b::s3://b/z.zip"
    assert sources.folder_of("s3://bucket/m.jsonl") == "s3://bucket"
    assert sources.join_path("zip://a::s3://b/z.zip", "img/0.png") == "zip://a/img/0.png::s3://b/z.zip"
    assert sources.join_path("zip://::s3://b/z.zip", "0.png") == "zip://0.png::s3://b/z.zip"
    assert sources.join_path("s3://b/m", "gs://other/x.png") == "gs://other/x.png"  # a URL stays as it is
    assert sources.join_path("s3://b/m", "simplecache::s3://c/x.png") == "simplecache::s3://c/x.png"
    assert sources.join_path("/data/m", "img/0.png") == "/data/m/img/0.png"


# -------------------------------------------------------------------------------------------------- tar members
def test_members_of_no_sample_are_passed_over_by_both(tmp_path, datagen):
    """``README`` (no extension) and ``._b.png`` (a macOS resource file) belong to no sample, as in webdataset
    (training made each a bad sample; evaluation made ``._b.png`` a sample without a label)."""
    path = tmp_path / "odd-000.tar"
    members = [
        ("README", b"made by hand"),
        ("a.png", datagen.image_bytes(0)),
        ("._b.png", b"\x00\x05\x16\x07 resource fork"),
        ("a.txt", b"ship"),
        ("b.png", datagen.image_bytes(1)),
        ("b.txt", b"cat"),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert training_captions(str(path)) == [("a", "ship"), ("b", "cat")]
    assert WebDataset(str(path)).count(str(path)) == 2
    assert eval_labels(str(path)) == [2, 0]


def test_a_shard_that_breaks_off_stops_evaluation_naming_it(tmp_path, datagen):
    """Evaluation reports the break itself, not the incomplete sample it fell in; training keeps the samples
    before it. (Not a former difference: this pins that the shared tar reader kept evaluation's behaviour.)"""
    full = write_label_shard(datagen, tmp_path / "full.tar", [(i, (f"k{i}", "dog")) for i in range(3)])
    with tarfile.open(full) as tar:
        cut = tar.getmember("k2.png").offset_data + 20
    (tmp_path / "cut.tar").write_bytes(open(full, "rb").read()[:cut])
    with pytest.raises(EvalDataError, match=r"cut\.tar: not a readable tar shard \(.*unexpected end of data"):
        list(iter_labelled_images(str(tmp_path / "cut.tar"), CLASSES))
    assert eval_labels(str(tmp_path / "cut.tar"), max_samples=2) == [1, 1]
    records = list(WebDataset(str(tmp_path / "cut.tar"), image_size=None, shuffle_buffer=0).scan())
    assert [r["key"] for r in records if "skip" not in r] == ["k0", "k1"]


# ------------------------------------------------------------------------------------------------------- images
def test_transparent_png_decodes_alike_in_both(tmp_path):
    """Transparency on white, as the training datasets decode it (evaluation dropped the alpha channel, keeping
    whatever colour the transparent pixels stored)."""
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (200, 10, 10, 255)  # opaque red top half; the bottom half is transparent black
    (tmp_path / "img").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "img" / "0.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"image": "img/0.png", "caption": "red", "label": "cat"}) + "\n")
    expected = np.zeros((4, 4, 3), dtype=np.uint8)
    expected[:2] = (200, 10, 10)
    expected[2:] = 255
    train = ManifestDataset(str(tmp_path / "set.jsonl"), image_size=None)
    assert np.array_equal(pixels_of(train[0]["image"]), expected)
    (image, label), = iter_labelled_images(str(tmp_path / "set.jsonl"), CLASSES)
    assert np.array_equal(pixels_of(image), expected) and label == 0


def test_evaluation_reads_through_the_training_readers():
    """One function each: evaluation's names are the shared readers themselves."""
    assert eval_data.expand_braces is sources.expand_braces
    assert eval_data.read_manifest_rows is sources.read_manifest_rows
    assert eval_data.iter_tar is sources.iter_tar
    assert manifest.read_manifest_rows is sources.read_manifest_rows and manifest.join_path is sources.join_path
    assert webdataset.expand_urls is sources.expand_urls and webdataset.iter_tar is sources.iter_tar
