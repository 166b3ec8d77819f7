"""Real image-text data: manifests, webdataset shards (local and on S3), image transforms, bad samples, resuming.

What is checked, and why
------------------------
- ``ImageTransform``: every PIL mode (grayscale, palette, CMYK, RGBA, 16-bit) becomes RGB uint8 ``[3, S, S]``;
  centre crop keeps the middle; random-resized-crop is a pure function of ``(seed, key)``; broken bytes raise
  ``BadImageError``.
- ``manifest`` on the 363 real COCO photos (``../shared/data/coco-captions``, skipped when absent): all decode to
  ``[3, S, S]`` uint8, the 1,816 captions are all there, and with 5 captions an image shows each of them once in
  epochs 0..4 (the sampler's ``epoch * n + index``), the same in every instance, differently for another seed.
- ``webdataset`` on the real CIFAR-10 shards: 10,000 samples per training shard, captions are the class names of
  ``classnames.txt``, 32x32 images; one epoch of the endless stream covers every key exactly once.
- S3: shards and a manifest uploaded to a local moto S3 server (127.0.0.1 only) and read back through s3fs with
  ``storage_options``: the exact keys and captions.
- Resume: for 0, 2 and 3 data-loader workers and 1 or 2 processes, the stream from position 0 equals
  ``[0, k)`` + a fresh loader started at ``k`` (also across epochs and with fewer shards than readers); two
  ranks read disjoint samples that together make up each epoch. The manifest through ``make_train_loader``
  likewise, with epoch-tagged indices.
- Bad samples: a shard with a truncated JPEG, an empty caption, a missing ``.txt``, a JSON caption that is a
  number and a cut-off tar is read to the end with exactly those skips counted, through ``Collate`` (mark
  mode) and through ``skipped_before`` (drop mode); a manifest with bad lines and bad samples likewise, and a
  real training run on it counts its skips.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import socket
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sparc_kit.data import (
    BadImageError,
    Collate,
    ImageTransform,
    ManifestDataset,
    ManifestError,
    ShardError,
    Tokenizer,
    WebDataset,
    expand_urls,
    make_train_loader,
    open_dataset,
)
from sparc_kit.registry import datasets


def _keys(samples):
    return [s.get("key") if "skip" not in s else ("SKIP", s["skip"]) for s in samples]


def _key_collate(samples):
    return [s["key"] if "skip" not in s else "SKIP:" + s["skip"] for s in samples]


# ------------------------------------------------------------------------------------------------ transforms
def test_transform_converts_every_mode_to_rgb_uint8():
    t = ImageTransform(16)
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, :, 0] = 200
    images = {
        "L": Image.fromarray(np.full((20, 30), 77, np.uint8), "L"),
        "P": Image.fromarray(rgb).convert("P"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "RGBA": Image.fromarray(np.dstack([rgb, np.zeros((20, 30), np.uint8)]), "RGBA"),  # fully transparent
        "I;16": Image.fromarray(np.full((20, 30), 65535, np.uint16)),
    }
    for mode, image in images.items():
        buf = io.BytesIO()
        image.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
        out = t(buf.getvalue())
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8, mode
    assert t(_png(images["L"])).unique().tolist() == [77]
    assert t(_png(images["RGBA"])).unique().tolist() == [255]  # transparent pixels composited on white
    assert t(_tiff(images["I;16"])).unique().tolist() == [255]  # 16-bit white stays white
    assert t(_tiff(images["CMYK"]))[0].float().mean() > 190  # red stays red


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _tiff(image):
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    return buf.getvalue()


def test_transform_center_crop_squash_pad_and_seeded_random_crop():
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, 10:20] = 255  # a white middle third
    png = _png(Image.fromarray(arr))
    crop = ImageTransform(10)(png)
    assert crop.shape == (3, 10, 10) and int(crop.min()) == 255  # the middle third, exactly
    squash = ImageTransform(10, resize_mode="squash")(png)
    assert squash[:, :, 0].max() == 0 and squash[:, :, 5].min() == 255
    pad = ImageTransform(30, resize_mode="pad")(png)
    assert pad.shape == (3, 30, 30) and pad[:, 0].max() == 0 and pad[:, 15, 15].min() == 255
    big = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    rrc = ImageTransform(16, train=True, random_resized_crop=True, scale=(0.2, 0.5), seed=3)
    assert torch.equal(rrc(big, key=(0, 5)), rrc(big, key=(0, 5)))  # same (seed, key): same crop
    assert not torch.equal(rrc(big, key=(0, 5)), rrc(big, key=(1, 5)))
    other_seed = ImageTransform(16, train=True, random_resized_crop=True, scale=(0.2, 0.5), seed=4)
    assert not torch.equal(rrc(big, key=(0, 5)), other_seed(big, key=(0, 5)))
    eval_t = ImageTransform(16, train=False, random_resized_crop=True)  # no augmentation outside training
    assert torch.equal(eval_t(big, key=(0,)), eval_t(big, key=(1,)))
    jpeg = io.BytesIO()
    Image.fromarray(arr).save(jpeg, format="JPEG")
    for bad in (b"", b"not an image", jpeg.getvalue()[: len(jpeg.getvalue()) // 2]):
        with pytest.raises(BadImageError):
            ImageTransform(8)(bad)


# ------------------------------------------------------------------------------------------------ real data
def test_coco_manifest_reads_all_363_images_and_cycles_captions(shared_data):
    path = shared_data / "coco-captions" / "pairs.jsonl"
    ds = datasets.build("manifest", {"path": str(path), "image_size": 48, "seed": 0})
    assert isinstance(ds, ManifestDataset) and ds.epoch_aware
    assert len(ds) == 363 and ds.bad_rows == []
    assert len(list(ds.captions())) == 1816 and len(list(ds.captions(limit=100))) == 100
    for i in range(len(ds)):
        s = ds[i]
        assert "skip" not in s, s
        assert s["image"].shape == (3, 48, 48) and s["image"].dtype == torch.uint8
    n = len(ds)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    again = ManifestDataset(str(path), image_size=48, seed=0)
    other = ManifestDataset(str(path), image_size=48, seed=1)
    differs = 0
    for index in (0, 17, 200):
        truth = [" ".join(c.split()) for c in rows[index]["captions"]]
        m = len(truth)
        per_epoch = [ds.caption_for(index, e) for e in range(m)]
        assert sorted(per_epoch) == sorted(truth)  # each caption once per cycle of m epochs
        assert [ds[e * n + index]["caption"] for e in range(2)] == per_epoch[:2]  # the sampler's encoding
        assert per_epoch == [again.caption_for(index, e) for e in range(m)]
        differs += per_epoch != [other.caption_for(index, e) for e in range(m)]
    assert differs >= 1


def test_cifar_webdataset_counts_20000_with_class_names(shared_data):
    folder = shared_data / "cifar10"
    classes = (folder / "classnames.txt").read_text().split()
    assert len(classes) == 10
    ds = WebDataset(str(folder / "train-{000..001}.tar"), image_size=32, seed=0, shuffle_buffer=100)
    assert [u.rsplit("/", 1)[-1] for u in ds.urls] == ["train-000.tar", "train-001.tar"]
    assert [ds.count(u) for u in ds.urls] == [10000, 10000]
    assert ds._epoch_size(0, 0, 1) == 20000 and ds._epoch_size(0, 1, 2) == 10000  # one shard per reader
    seen = Counter()
    for s in itertools.islice(ds.stream(), 600):
        assert "skip" not in s
        assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.uint8
        seen[s["caption"]] += 1
    assert set(seen) == set(classes)  # shuffled across classes, captions are class names
    texts = list(ds.captions(limit=5000))
    assert len(texts) == 5000 and set(texts) == set(classes)


# ------------------------------------------------------------------------------------------------ webdataset
def test_brace_expansion_and_missing_shards(tmp_path):
    assert expand_urls("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_urls("s3://b/{x,y}-{8..10}.tar") == [
        "s3://b/x-8.tar", "s3://b/x-9.tar", "s3://b/x-10.tar", "s3://b/y-8.tar", "s3://b/y-9.tar", "s3://b/y-10.tar"
    ]
    assert expand_urls("a.tar::b-{1..2}.tar") == ["a.tar", "b-1.tar", "b-2.tar"]
    with pytest.raises(ShardError, match=r"shard not found: .*nope-001.tar \(and 1 more of 2\)"):
        WebDataset(str(tmp_path / "nope-{001..002}.tar"))


def test_one_epoch_covers_every_key_once_and_json_captions(tmp_path, datagen):
    pattern, expected = datagen.shards(tmp_path, n_shards=3, per_shard=9)
    ds = WebDataset(pattern, image_size=12, shuffle_buffer=7, seed=5)
    epoch = list(itertools.islice(ds.stream(), 27))
    assert sorted(s["key"] for s in epoch) == sorted(expected)
    assert {s["key"]: s["caption"] for s in epoch} == expected
    assert [s["key"] for s in epoch] != sorted(expected)  # shuffled
    nxt = list(itertools.islice(ds.stream(skip=27), 27))
    assert sorted(s["key"] for s in nxt) == sorted(expected)
    assert [s["key"] for s in nxt] != [s["key"] for s in epoch]  # epoch 1: reshuffled
    # pixels: PNG round trip is exact
    first = epoch[0]
    i = sorted(expected).index(first["key"])
    assert torch.equal(first["image"], torch.from_numpy(datagen.pixels(i)).permute(2, 0, 1))
    # .json captions: a "caption" field, or a "captions" list cycled over epochs
    shard = datagen.write_shard(
        tmp_path / "json-000.tar",
        [
            ("a", {"jpg": datagen.image_bytes(1, fmt="JPEG"), "json": json.dumps({"caption": "one cat"}).encode()}),
            ("b", {"png": datagen.image_bytes(2), "json": json.dumps({"captions": ["x y", "z w"]}).encode()}),
        ],
    )
    js = WebDataset(shard, image_size=8, shuffle_buffer=0)
    caps = [(s["key"], s["caption"]) for s in itertools.islice(js.stream(), 4)]
    assert caps[0] == ("a", "one cat") and caps[2] == ("a", "one cat")
    assert {caps[1][1], caps[3][1]} == {"x y", "z w"}
    assert list(js.captions()) == ["one cat", "x y", "z w"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    pytest.importorskip("s3fs", reason="s3fs is in the test extras: pip install -e .[test]")
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is in the test extras")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HTTP_PROXY",
                "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="bucket")
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    try:
        yield client, options
    finally:
        server.stop()


def test_webdataset_and_manifest_on_s3(tmp_path, datagen, s3_server):
    client, options = s3_server
    pattern, expected = datagen.shards(tmp_path / "shards", n_shards=2, per_shard=5)
    for name in ("train-000.tar", "train-001.tar"):
        client.upload_file(str(tmp_path / "shards" / name), "bucket", f"wds/{name}")
    ds = WebDataset("s3://bucket/wds/train-{000..001}.tar", image_size=12, storage_options=options, seed=2)
    epoch = list(itertools.islice(ds.stream(), 10))
    assert sorted(s["key"] for s in epoch) == sorted(expected)
    assert {s["key"]: s["caption"] for s in epoch} == expected
    assert [ds.count(u) for u in ds.urls] == [5, 5]
    # through a DataLoader with two worker processes (each opens its own S3 filesystem)
    ds.set_state(0, 0, 1, batch_size=5)
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=_key_collate)
    keys = [k for batch in itertools.islice(loader, 2) for k in batch]
    assert sorted(keys) == sorted(expected)  # 2 shards, 2 workers: one shard each, one epoch
    # a manifest on S3 with image paths relative to it
    manifest = datagen.manifest(tmp_path / "m", n=4)
    client.upload_file(manifest, "bucket", "m/pairs.jsonl")
    for i in range(4):
        client.upload_file(str(tmp_path / "m" / "img" / f"{i:04d}.png"), "bucket", f"m/img/{i:04d}.png")
    m = ManifestDataset("s3://bucket/m/pairs.jsonl", image_size=12, storage_options=options)
    assert [m[i]["caption"] for i in range(4)] == [datagen.caption(i) for i in range(4)]
    assert torch.equal(m[3]["image"], torch.from_numpy(datagen.pixels(3)).permute(2, 0, 1))
    with pytest.raises(ManifestError, match="manifest not found: s3://bucket/m/nope.jsonl"):
        ManifestDataset("s3://bucket/m/nope.jsonl", storage_options=options)


# ------------------------------------------------------------------------------------------------- resuming
def _loader_keys(pattern, workers, start, batches, batch_size=3, rank=0, world_size=1, **kw):
    ds = WebDataset(pattern, image_size=8, shuffle_buffer=kw.pop("shuffle_buffer", 5), seed=11, **kw)
    ds.set_state(start=start, rank=rank, world_size=world_size, batch_size=batch_size)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_key_collate)
    return [k for batch in itertools.islice(loader, batches) for k in batch]


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_resume_is_exact_continuation(tmp_path, datagen, workers):
    pattern, expected = datagen.shards(tmp_path, n_shards=4, per_shard=5, size=8)
    full = _loader_keys(pattern, workers, 0, 16)  # 48 samples: over two epochs of 20
    assert len(full) == 48
    if workers == 0:
        assert sorted(full[:20]) == sorted(expected)  # the first epoch: every sample once
    for b in (1, 3, 7, 10):  # odd counts rotate the workers; 7 and 10 are past an epoch boundary
        assert full[: 3 * b] + _loader_keys(pattern, workers, 3 * b, 16 - b) == full, b
    if workers == 0:  # in-process: any start, not only batch boundaries
        assert _loader_keys(pattern, 0, 5, 5) == full[5:20]


def test_webdataset_ranks_disjoint_and_more_readers_than_shards(tmp_path, datagen):
    pattern, expected = datagen.shards(tmp_path, n_shards=4, per_shard=6, size=8)
    per_rank = []
    for rank in (0, 1):
        keys = _loader_keys(pattern, 2, 0, 4, rank=rank, world_size=2)  # 4 readers, one shard each
        assert len(keys) == 12 and len(set(keys)) == 12
        per_rank.append(keys)
        b = 3
        assert keys[: 3 * b] + _loader_keys(pattern, 2, 3 * b, 4 - b, rank=rank, world_size=2) == keys
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)  # together: exactly one epoch
    # two shards but four readers: every reader keeps every fourth sample of the epoch's shards
    small, small_expected = datagen.shards(tmp_path / "small", n_shards=2, per_shard=6, size=8)
    streams = [_loader_keys(small, 2, 0, 2, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(streams[0] + streams[1]) == sorted(small_expected)
    full = _loader_keys(small, 2, 0, 6, rank=1, world_size=2)
    assert full[:6] + _loader_keys(small, 2, 6, 4, rank=1, world_size=2) == full


def test_resampled_stream_is_deterministic_and_resumable(tmp_path, datagen):
    pattern, expected = datagen.shards(tmp_path, n_shards=3, per_shard=4, size=8)
    full = _loader_keys(pattern, 2, 0, 10, resampled=True)
    assert full == _loader_keys(pattern, 2, 0, 10, resampled=True)
    assert set(full) <= set(expected) and len(set(full)) < len(full)  # drawn with replacement
    assert full[:12] + _loader_keys(pattern, 2, 12, 6, resampled=True) == full
    mid_batch = WebDataset(pattern).set_state(start=4, batch_size=3)
    assert mid_batch.worker_plan(0, 0) == (0, 1, 4)  # in-process: any start
    with pytest.raises(ValueError, match="not a multiple of batch_size"):  # workers: batch boundaries only
        mid_batch.worker_plan(0, 2)
    assert WebDataset(pattern).set_state(start=15, batch_size=3).worker_plan(1, 2) == (0, 2, 9)  # B=5: l=0


@pytest.mark.parametrize("workers", [0, 2])
def test_manifest_resume_through_sampler(tmp_path, datagen, workers):
    path = datagen.manifest(tmp_path, n=10, size=8, captions_per_image=3)
    ds = ManifestDataset(path, image_size=8, seed=1)

    def captions(start, batches):
        loader = make_train_loader(ds, _caption_collate, 4, seed=3, samples_seen=start, num_workers=workers)
        return [c for batch in itertools.islice(loader, batches) for c in batch]

    full = captions(0, 10)  # 40 samples: four epochs of 10
    for k in (4, 12, 28):
        assert full[:k] + captions(k, 10 - k // 4) == full
    by_epoch = [sorted(full[e * 10 : e * 10 + 10]) for e in range(3)]
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]  # another caption of each image each epoch
    assert sorted(by_epoch[0] + by_epoch[1] + by_epoch[2]) == sorted(ds.captions())  # all 30, once each


def _caption_collate(samples):
    return [s["caption"] for s in samples]


# ---------------------------------------------------------------------------------------------- bad samples
def test_corrupt_shards_read_to_the_end_with_exact_skip_counts(tmp_path, datagen):
    pattern = datagen.corrupt_shards(tmp_path)
    ds = WebDataset(pattern, image_size=8, shuffle_buffer=0)
    records = list(ds.scan())
    reasons = {r["key"]: r["skip"] for r in records if "skip" in r}
    good = [r["key"] for r in records if "skip" not in r]
    assert good == ["g0", "g1", "g2", "g3", "c0", "c1"]
    assert set(reasons) == {"broken", "empty", "notxt", "numeric", "c2", "__error__"}
    assert "cannot decode image" in reasons["broken"] and "empty caption" in reasons["empty"]
    assert "no caption" in reasons["notxt"] and "not text" in reasons["numeric"]
    assert "shard unreadable" in reasons["__error__"] and reasons["__error__"].startswith("bad-001.tar:")
    assert [ds.count(u) for u in ds.urls] == [8, 4]  # c0, c1, c2 (cut short), the read error

    # mark mode through Collate: two epochs (24 raw samples) = 12 good + 12 skipped, in batches of 4
    tok = Tokenizer.train([datagen.caption(i) for i in range(20)], vocab_size=40, context_length=8)
    loader = make_train_loader(ds, Collate(tok, 8), 4, num_workers=2)
    batches = list(itertools.islice(loader, 6))
    assert sum(int(b["skipped"]) for b in batches) == 12 and sum(b["images"].shape[0] for b in batches) == 12

    # drop mode: batches of good samples only, the bad ones counted in the next good one's skipped_before
    marked = list(itertools.islice(ds.stream(), 24))  # the raw stream of two epochs, bad ones marked
    expected, pending = [], 0
    for s in marked:
        if "skip" in s:
            pending += 1
        else:
            expected.append((s["key"], pending))
            pending = 0
    assert len(expected) == 12 and sum(n for _, n in expected) + pending == 12
    drop = WebDataset(pattern, image_size=8, shuffle_buffer=0, bad_samples="drop")
    stream = list(itertools.islice(drop.stream(), 12))
    assert [(s["key"], s.get("skipped_before", 0)) for s in stream] == expected
    resumed = list(itertools.islice(drop.stream(skip=5), 7))
    assert [s["key"] for s in resumed] == [s["key"] for s in stream[5:]]
    assert [s.get("skipped_before", 0) for s in resumed] == [s.get("skipped_before", 0) for s in stream[5:]]
    drop_loader = make_train_loader(drop, Collate(tok, 8), 3, num_workers=0)
    totals = [(int(b["skipped"]), b["images"].shape[0]) for b in itertools.islice(drop_loader, 4)]
    assert sum(n for _, n in totals) == 12 and all(n == 3 for _, n in totals)


def test_manifest_bad_lines_and_bad_samples(tmp_path, datagen):
    path = datagen.manifest(tmp_path, n=6, size=8)
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    (tmp_path / "img" / "0001.png").unlink()  # missing file
    (tmp_path / "img" / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # undecodable
    lines[3] = json.dumps({"image": "img/0003.png", "caption": ""})  # empty caption
    lines[4] = json.dumps({"image": "img/0004.png", "caption": ["not", "a", "string"]})
    lines += ["{not json", json.dumps({"caption": "no image"}), json.dumps(["a", "list"])]
    lines += [json.dumps({"image": "x.png"})]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="4 of 10 lines skipped"):
        ds = ManifestDataset(path, image_size=8)
    assert len(ds) == 6 and [n for n, _ in ds.bad_rows] == [7, 8, 9, 10]
    assert "not valid JSON" in ds.bad_rows[0][1] and "no 'image' path" in ds.bad_rows[1][1]
    items = [ds[i] for i in range(6)]
    skips = {i: s["skip"] for i, s in enumerate(items) if "skip" in s}
    assert sorted(skips) == [1, 2, 3, 4]
    assert "image not found" in skips[1] and "cannot decode image" in skips[2]
    assert "no usable caption" in skips[3] and "no usable caption" in skips[4]
    assert items[0]["caption"] == datagen.caption(0) and items[5]["image"].shape == (3, 8, 8)
    tok = Tokenizer.train([datagen.caption(i) for i in range(20)], vocab_size=40, context_length=8)
    batch = Collate(tok, 8)(items)
    assert int(batch["skipped"]) == 4 and batch["images"].shape == (2, 3, 8, 8)
    # unusable manifests: one clear error naming the file
    with pytest.raises(ManifestError, match=r"manifest not found: .*nothing\.jsonl"):
        ManifestDataset(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "junk.jsonl").write_text("{bad\n[1]\n")
    with pytest.raises(ManifestError, match=r"none of its 2 lines is usable \(line 1: not valid JSON"):
        ManifestDataset(str(tmp_path / "junk.jsonl"))
    # CSV with a JSON list of captions; open_dataset picks the reader by extension
    (tmp_path / "pairs.csv").write_text('image,captions\nimg/0000.png,"[""a b"", ""c d""]"\nimg/0005.png,e f\n')
    csv_ds = open_dataset(str(tmp_path / "pairs.csv"), image_size=8)
    assert isinstance(csv_ds, ManifestDataset) and list(csv_ds.captions()) == ["a b", "c d", "e f"]


@pytest.mark.slow
def test_training_on_a_manifest_with_bad_samples_counts_them(tmp_path, datagen):
    import sparc_kit
    from sparc_kit.train import read_metrics, train

    path = datagen.manifest(tmp_path / "data", n=16, size=16)
    (tmp_path / "data" / "img" / "0003.png").write_bytes(b"broken")
    recipe = sparc_kit.load_recipe(
        "sparc_tiny",
        [
            "data.name=manifest",
            f"data.path={path}",
            "model.embed_dim=16", "model.vision.image_size=16", "model.vision.patch_size=8", "model.vision.width=16",
            "model.vision.depth=1", "model.vision.heads=2", "model.text.width=16", "model.text.depth=1",
            "model.text.heads=2", "train.batch_size=8", "train.steps=4", "train.log_every=4",
            "train.checkpoint_every=4", "optim.warmup_steps=1", "train.max_skip_fraction=0.5",
        ],
    )
    assert recipe.data.image_size is None
    train(recipe, str(tmp_path / "run"), progress=False)
    rows = read_metrics(str(tmp_path / "run"))
    assert rows[-1]["step"] == 4 and rows[-1]["skipped_samples"] == 2  # 32 samples = 2 epochs, 1 bad each


@pytest.mark.slow
def test_training_on_webdataset_resumes_exactly(tmp_path, datagen):
    """A streaming run with corrupt samples and 2 workers, interrupted and resumed, ends bit-identical."""
    import shutil

    import sparc_kit
    from sparc_kit.train import TrainingInterrupted, latest_checkpoint, read_metrics, train
    from safetensors.torch import load_file

    datagen.shards(tmp_path / "s", n_shards=3, per_shard=8, size=16)
    bad = datagen.corrupt_shards(tmp_path / "bad")
    shutil.copy(bad.replace("{000..001}", "000"), tmp_path / "s" / "train-003.tar")  # 8 samples, 4 unreadable
    recipe = sparc_kit.load_recipe(
        "sparc_tiny",
        [
            "data.name=webdataset", f"data.urls={tmp_path}/s/train-{{000..003}}.tar", "data.shuffle_buffer=6",
            "model.embed_dim=16", "model.vision.image_size=16", "model.vision.patch_size=8", "model.vision.width=16",
            "model.vision.depth=1", "model.vision.heads=2", "model.text.width=16", "model.text.depth=1",
            "model.text.heads=2", "train.batch_size=4", "train.steps=6", "train.log_every=1",
            "train.checkpoint_every=2", "optim.warmup_steps=1", "train.max_skip_fraction=0.5", "train.num_workers=2",
        ],
    )

    def stop_at_3(step, values):
        if step == 3:
            raise KeyboardInterrupt

    train(recipe, str(tmp_path / "full"), progress=False)
    with pytest.raises(TrainingInterrupted):
        train(recipe, str(tmp_path / "resumed"), progress=False, callback=stop_at_3)
    train(recipe, str(tmp_path / "resumed"), progress=False)

    def weights(run):
        return load_file(str(latest_checkpoint(str(tmp_path / run / "checkpoints")) + "/model.safetensors"))

    full, resumed = weights("full"), weights("resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    a, b = read_metrics(str(tmp_path / "full")), read_metrics(str(tmp_path / "resumed"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["skipped_samples"] for r in a] == [r["skipped_samples"] for r in b]
    # the skips counted are exactly the unreadable samples among the 24 the loader handed out
    from sparc_kit.data import build_dataset

    handed_out = make_train_loader(build_dataset(recipe), _key_collate, 4, num_workers=2)
    keys = [k for batch in itertools.islice(handed_out, 6) for k in batch]
    assert a[-1]["skipped_samples"] == sum(k.startswith("SKIP") for k in keys) > 0


def test_caption_templates_wrap_label_texts_deterministically(tmp_path, datagen):
    """A shard whose texts are labels trains on templated captions; the template is fixed per (sample, epoch)."""
    from sparc_kit.data.webdataset import WebDataset

    pattern, expected = datagen.shards(tmp_path, n_shards=1, per_shard=6)
    templates = ("a photo of {}.", "a picture of {}.")
    ds = WebDataset(pattern, image_size=8, shuffle_buffer=0, caption_templates=templates)
    items = [item for item in ds.scan(decode=False)]
    assert len(items) == 6
    for item in items:
        label = expected[item["key"]]
        assert item["caption"] in {t.format(label) for t in templates}
    again = [item["caption"] for item in WebDataset(pattern, image_size=8, caption_templates=templates).scan(False)]
    assert again == [item["caption"] for item in items]
    assert len({item["caption"].split(" of ")[0] for item in items}) == 2  # both templates occur in 6 samples
    trained_on = list(ds.captions())
    assert trained_on[0] == templates[0].format(expected[items[0]["key"]]) and trained_on[1].startswith("a picture")
    with pytest.raises(ValueError, match="caption_templates"):
        WebDataset(pattern, caption_templates=("no placeholder",))
