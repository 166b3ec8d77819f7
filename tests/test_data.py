"""Tests of the data pipeline (``sparc_kit.data``): synthetic shapes, tokenizer, resumable sampler, collate, loader.

What is checked, and why
------------------------
- ``SyntheticShapes`` is a pure function of ``(seed, index)`` (same across instances and access orders, different
  across seeds), and its ground truth is consistent with its captions: every caption parses with the known word
  lists; each named shape is present in the mask with its class; the pixels under a shape have the named colour;
  a single shape sits in the named place; for "X above / below / to the left of / to the right of Y" the
  centroid of X's mask is on the named side of Y's. The captions are parsed here with an independent grammar.
- ``Tokenizer``: encode/decode round trip (lowercased), padding id 0 with ``mask == ids != 0``, the end token at
  the last real position and kept by truncation, the vocabulary bound, deterministic training, save/load through
  local paths and fsspec URLs, pickling.
- ``ResumableBatchSampler``: against the documented stream (epoch ``e`` = ``randperm(n)`` seeded ``seed * 1_000_003 + e``):
  concatenated batches equal the stream, a start position resumes exactly the continuation (also across an epoch
  boundary), epochs are permutations, and ranks split each global batch into disjoint halves.
- ``Collate``: normalisation by the given mean/std, resizing, token tensors; and a loader with worker processes
  yields exactly the batches of the single-process loader.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import uuid

import fsspec
import pytest
import torch

from sparc_kit.data import Collate, ResumableBatchSampler, SyntheticShapes, Tokenizer, make_loader

# The caption grammar, written out here (not imported) so the test pins the vocabulary.
SIZE_WORDS = ("small", "large")
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPE_CLASS = {"circle": 1, "square": 2, "triangle": 3, "cross": 4}
RELATION_WORDS = ("above", "below", "to the left of", "to the right of")
PLACE_WORDS = ("in the top left", "in the top right", "in the bottom left", "in the bottom right", "in the centre")

_OBJ = r"a (?P<size{i}>{sizes}) (?P<colour{i}>{colours}) (?P<shape{i}>{shapes})"


def _obj(i: int) -> str:
    return _OBJ.format(
        i=i, sizes="|".join(SIZE_WORDS), colours="|".join(COLOUR_RGB), shapes="|".join(SHAPE_CLASS)
    )


SINGLE = re.compile(rf"^{_obj(1)} (?P<place>{'|'.join(PLACE_WORDS)})$")
DOUBLE = re.compile(rf"^{_obj(1)} (?P<relation>{'|'.join(RELATION_WORDS)}) {_obj(2)}$")

IMAGE_SIZE = 32
N_CHECK = 200


def parse(caption: str) -> dict:
    m = SINGLE.match(caption) or DOUBLE.match(caption)
    assert m is not None, f"caption outside the grammar: {caption!r}"
    return m.groupdict()


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    """(x, y) centroid of the True pixels, in pixel-centre coordinates."""
    ys, xs = mask.nonzero(as_tuple=True)
    return xs.float().mean().item() + 0.5, ys.float().mean().item() + 0.5


@pytest.fixture(scope="module")
def dataset() -> SyntheticShapes:
    return SyntheticShapes(num_samples=1000, image_size=IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def samples(dataset) -> list[dict]:
    return [dataset[i] for i in range(N_CHECK)]


# --------------------------------------------------------------------------------------------------------------
# synthetic shapes
# --------------------------------------------------------------------------------------------------------------


def test_synthetic_is_a_pure_function_of_seed_and_index():
    a = SyntheticShapes(num_samples=30, image_size=IMAGE_SIZE, seed=3)
    b = SyntheticShapes(num_samples=30, image_size=IMAGE_SIZE, seed=3)
    order = list(range(30))
    forward = [a[i] for i in order]
    backward = {i: b[i] for i in reversed(order)}  # another instance, another access order
    for i in order:
        assert forward[i]["caption"] == backward[i]["caption"]
        assert torch.equal(forward[i]["image"], backward[i]["image"])
        assert torch.equal(forward[i]["mask"], backward[i]["mask"])
        assert a.caption(i) == forward[i]["caption"]
    assert list(a.captions()) == [s["caption"] for s in forward]
    assert list(a.captions(limit=7)) == [s["caption"] for s in forward[:7]]


def test_synthetic_different_seeds_differ():
    a = SyntheticShapes(num_samples=20, image_size=IMAGE_SIZE, seed=3)
    c = SyntheticShapes(num_samples=20, image_size=IMAGE_SIZE, seed=4)
    image_differs = [not torch.equal(a[i]["image"], c[i]["image"]) for i in range(20)]
    assert all(image_differs)
    assert sum(a.caption(i) != c.caption(i) for i in range(20)) >= 15


def test_synthetic_item_types_and_range(dataset, samples):
    assert len(dataset) == 1000
    assert SyntheticShapes.classnames == ("background", "circle", "square", "triangle", "cross")
    for s in samples[:20]:
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert s["mask"].dtype == torch.uint8 and s["mask"].shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert int(s["mask"].max()) <= 4
    with pytest.raises(IndexError):
        dataset[1000]
    with pytest.raises(IndexError):
        dataset[-1]


def test_captions_use_the_known_vocabulary_and_both_forms(samples):
    parsed = [parse(s["caption"]) for s in samples]
    n_single = sum("place" in p for p in parsed)
    assert 0.25 * N_CHECK < n_single < 0.75 * N_CHECK  # one or two shapes, about evenly
    assert {p["relation"] for p in parsed if "relation" in p} == set(RELATION_WORDS)
    assert {p["place"] for p in parsed if "place" in p} == set(PLACE_WORDS)
    vocab = set("a".split()) | set(SIZE_WORDS) | set(COLOUR_RGB) | set(SHAPE_CLASS)
    vocab |= {w for phrase in RELATION_WORDS + PLACE_WORDS for w in phrase.split()}
    for s in samples:
        assert set(s["caption"].split()) <= vocab


def test_max_shapes_one_gives_single_shape_captions():
    ds = SyntheticShapes(num_samples=50, image_size=IMAGE_SIZE, seed=1, max_shapes=1)
    assert all(SINGLE.match(c) for c in ds.captions())


def test_named_shapes_are_in_the_mask_with_their_class(samples):
    for s in samples:
        p = parse(s["caption"])
        present = set(s["mask"].unique().tolist())
        named = {SHAPE_CLASS[p["shape1"]]} | ({SHAPE_CLASS[p["shape2"]]} if "shape2" in p else set())
        assert present == {0} | named, (s["caption"], present)
        for cls in named:
            assert int((s["mask"] == cls).sum()) > 0


def test_single_shape_has_named_colour_and_place(samples):
    checked = 0
    for s in samples:
        p = parse(s["caption"])
        if "place" not in p:
            continue
        checked += 1
        region = s["mask"] == SHAPE_CLASS[p["shape1"]]
        mean_rgb = s["image"].float()[:, region].mean(dim=1)
        target = torch.tensor(COLOUR_RGB[p["colour1"]], dtype=torch.float32)
        assert (mean_rgb - target).abs().max() < 20, (s["caption"], mean_rgb.tolist())
        x, y = centroid(region)
        half = IMAGE_SIZE / 2
        place = p["place"]
        if place == "in the centre":
            assert abs(x - half) < 0.15 * IMAGE_SIZE and abs(y - half) < 0.15 * IMAGE_SIZE, (s["caption"], x, y)
        else:
            assert (y < half) == ("top" in place) and (x < half) == ("left" in place), (s["caption"], x, y)
    assert checked >= 50


def test_relation_captions_match_mask_centroids(samples):
    checked = {r: 0 for r in RELATION_WORDS}
    for s in samples:
        p = parse(s["caption"])
        if "relation" not in p or p["shape1"] == p["shape2"]:
            continue  # masks hold shape classes, so two shapes of one class cannot be told apart
        x1, y1 = centroid(s["mask"] == SHAPE_CLASS[p["shape1"]])
        x2, y2 = centroid(s["mask"] == SHAPE_CLASS[p["shape2"]])
        rel = p["relation"]
        ok = {
            "above": y1 < y2,
            "below": y1 > y2,
            "to the left of": x1 < x2,
            "to the right of": x1 > x2,
        }[rel]
        assert ok, (s["caption"], (x1, y1), (x2, y2))
        # and each shape has its named colour (where it is not painted over)
        for i, (cls, colour) in enumerate(((p["shape1"], p["colour1"]), (p["shape2"], p["colour2"]))):
            region = s["mask"] == SHAPE_CLASS[cls]
            mean_rgb = s["image"].float()[:, region].mean(dim=1)
            target = torch.tensor(COLOUR_RGB[colour], dtype=torch.float32)
            assert (mean_rgb - target).abs().max() < 20, (s["caption"], i, mean_rgb.tolist())
        checked[rel] += 1
    assert all(n >= 5 for n in checked.values()), checked


# --------------------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_captions() -> list[str]:
    return list(SyntheticShapes(num_samples=1500, image_size=8, seed=11).captions())


@pytest.fixture(scope="module")
def tokenizer(train_captions) -> Tokenizer:
    return Tokenizer.train(train_captions, vocab_size=64, context_length=48)


def test_tokenizer_vocab_bound_and_special_ids(tokenizer):
    assert 4 < tokenizer.vocab_size <= 64
    sp = tokenizer.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)


def test_tokenizer_round_trip(tokenizer, samples):
    captions = [s["caption"] for s in samples[:100]]
    for c in captions:
        ids = tokenizer.encode(c)
        assert len(ids) < tokenizer.context_length  # no truncation at 48 tokens
        assert tokenizer.decode(ids) == c
        assert 1 not in ids  # no unknown pieces: the corpus covers every character
    mixed = "A Large RED Circle Above a small Blue SQUARE"
    assert tokenizer.decode(tokenizer.encode(mixed)) == mixed.lower()
    assert tokenizer.encode(mixed) == tokenizer.encode(mixed.lower())


def test_tokenizer_batch_padding_mask_and_eos(tokenizer, samples):
    captions = [s["caption"] for s in samples[:50]] + [""]
    ids, mask = tokenizer(captions)
    assert ids.shape == (51, 48) and ids.dtype == torch.long
    assert mask.dtype == torch.bool and torch.equal(mask, ids != 0)
    for row, c in enumerate(captions):
        encoded = tokenizer.encode(c)
        n = int(mask[row].sum())
        assert n == len(encoded)
        assert ids[row, :n].tolist() == encoded
        assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())  # padding only after the caption
        assert ids[row, n - 1] == 3 and (ids[row, : n - 1] != 3).all()  # EOS exactly at the last real position
        assert (ids[row, :n] != 2).all()  # no begin token
    assert ids[-1].tolist() == [3] + [0] * 47  # the empty caption is only the end token
    single_ids, single_mask = tokenizer(captions[0])
    assert torch.equal(single_ids, ids[:1]) and torch.equal(single_mask, mask[:1])


def test_tokenizer_truncation_keeps_eos_last(tokenizer, samples):
    short = Tokenizer(tokenizer.model_proto, context_length=8)
    long_caption = samples[0]["caption"] + " " + samples[1]["caption"]
    full = tokenizer.encode(long_caption)
    assert len(full) > 8
    ids, mask = short([long_caption])
    assert ids.shape == (1, 8) and bool(mask.all())
    assert ids[0, 7] == 3
    assert ids[0, :7].tolist() == full[:7]
    no_eos = Tokenizer(tokenizer.model_proto, context_length=8, add_eos=False)
    assert no_eos.encode(long_caption) == full[:8]


def test_tokenizer_training_is_deterministic(tokenizer, train_captions, samples):
    again = Tokenizer.train(train_captions, vocab_size=64, context_length=48)
    assert again.model_proto == tokenizer.model_proto
    captions = [s["caption"] for s in samples[:30]]
    assert torch.equal(again(captions)[0], tokenizer(captions)[0])


def test_tokenizer_save_load_local_and_memory_url(tokenizer, samples, tmp_path):
    captions = [s["caption"] for s in samples[:50]]
    expected = tokenizer(captions)[0]

    local = tmp_path / "nested" / "dir" / "tok.model"
    tokenizer.save(str(local))
    assert sorted(os.listdir(local.parent)) == ["tok.model"]  # no temporary file left behind
    loaded = Tokenizer.load(str(local), context_length=48)
    assert loaded.model_proto == tokenizer.model_proto
    assert torch.equal(loaded(captions)[0], expected)

    url = f"memory://sparc-kit-tests/{uuid.uuid4().hex}/tok.model"
    try:
        tokenizer.save(url)
        loaded_mem = Tokenizer.load(url, context_length=48)
        assert torch.equal(loaded_mem(captions)[0], expected)
    finally:
        fs = fsspec.filesystem("memory")
        fs.rm(url.split("://", 1)[1], recursive=True)


def test_tokenizer_pickles(tokenizer, samples):
    captions = [s["caption"] for s in samples[:50]]
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.model_proto == tokenizer.model_proto
    assert (clone.context_length, clone.lowercase, clone.add_eos) == (48, True, True)
    assert clone.vocab_size == tokenizer.vocab_size
    assert torch.equal(clone(captions)[0], tokenizer(captions)[0])
    assert [clone.decode(clone.encode(c)) for c in captions] == captions


def test_sparc_tiny_tokenizer_fits_the_synthetic_captions():
    from sparc_kit.config import load_recipe
    from sparc_kit.data import build_dataset

    recipe = load_recipe("sparc_tiny", overrides=["data.num_samples=2000"])
    t = recipe.tokenizer
    captions = list(build_dataset(recipe).captions(t.train_captions))
    tok = Tokenizer.train(captions, vocab_size=t.vocab_size, context_length=t.context_length, model_type=t.model_type)
    truncated = [c for c in captions if len(tok.sp.encode(c)) + 1 > t.context_length]
    assert truncated == []


# --------------------------------------------------------------------------------------------------------------
# resumable batch sampler
# --------------------------------------------------------------------------------------------------------------


def reference_stream(n: int, seed: int, length: int) -> list[int]:
    """The documented stream: epoch e is randperm(n) seeded by seed * 1_000_003 + e, epochs concatenated."""
    out: list[int] = []
    epoch = 0
    while len(out) < length:
        out += torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        epoch += 1
    return out[:length]


def take(sampler, k: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), k))


def test_sampler_batches_concatenate_to_the_stream():
    n, bs, seed = 10, 4, 7
    batches = take(ResumableBatchSampler(n, bs, seed=seed), 8)
    assert all(len(b) == bs for b in batches)
    flat = [i for b in batches for i in b]
    assert flat == reference_stream(n, seed, 32)
    sampler = ResumableBatchSampler(n, bs, seed=seed)
    assert list(itertools.islice(sampler.indices(0), 32)) == flat


def test_sampler_epochs_are_permutations_and_reshuffled():
    n, bs = 12, 4
    flat = [i for b in take(ResumableBatchSampler(n, bs, seed=0), 12) for i in b]
    epochs = [flat[e * n : (e + 1) * n] for e in range(4)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert len({tuple(e) for e in epochs}) == 4  # each epoch reshuffled
    other_seed = [i for b in take(ResumableBatchSampler(n, bs, seed=1), 3) for i in b]
    assert other_seed != epochs[0]


@pytest.mark.parametrize("start", [0, 4, 8, 12, 20, 36])
def test_sampler_resume_gives_exact_continuation(start):
    n, bs, seed, k = 10, 4, 3, 5
    stream = reference_stream(n, seed, start + k * bs)
    resumed = take(ResumableBatchSampler(n, bs, seed=seed, start=start), k)
    assert [i for b in resumed for i in b] == stream[start:]
    # equally: the uninterrupted run's batches after start // bs batches
    uninterrupted = take(ResumableBatchSampler(n, bs, seed=seed), start // bs + k)
    assert resumed == uninterrupted[start // bs :]


def test_sampler_resume_across_epoch_boundary_mid_batch():
    """start=8 with n=10, bs=4: the first resumed batch holds the last 2 samples of epoch 0 and 2 of epoch 1."""
    n, bs, seed = 10, 4, 5
    first = take(ResumableBatchSampler(n, bs, seed=seed, start=8), 1)[0]
    e0 = reference_stream(n, seed, n)
    e1 = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 1)).tolist()
    assert first == e0[8:] + e1[:2]


@pytest.mark.parametrize("start", [0, 12, 18])
def test_sampler_ranks_split_the_global_batch(start):
    n, bs, seed, k = 12, 3, 2, 8
    global_batches = take(ResumableBatchSampler(n, 2 * bs, seed=seed, start=start), k)
    r0 = take(ResumableBatchSampler(n, bs, seed=seed, start=start, rank=0, world_size=2), k)
    r1 = take(ResumableBatchSampler(n, bs, seed=seed, start=start, rank=1, world_size=2), k)
    for g, a, b in zip(global_batches, r0, r1):
        assert len(a) == len(b) == bs
        assert not set(a) & set(b)
        assert a + b == g


# --------------------------------------------------------------------------------------------------------------
# collate and loader
# --------------------------------------------------------------------------------------------------------------


MEAN, STD = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)


@pytest.mark.parametrize("source_size", [16, 32, 8])
def test_collate_normalises_constant_images(tokenizer, source_size):
    collate = Collate(tokenizer, image_size=16, mean=MEAN, std=STD)
    values = torch.tensor([51, 102, 255], dtype=torch.uint8)  # 0.2, 0.4, 1.0
    image = values.view(3, 1, 1).expand(3, source_size, source_size).contiguous()
    batch = collate([{"image": image, "caption": "a red circle"}, {"image": image, "caption": "a blue cross"}])
    x = batch["images"]
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    expected = [(0.2 - 0.5) / 0.5, (0.4 - 0.25) / 0.25, (1.0 - 0.0) / 2.0]
    for c, e in enumerate(expected):
        torch.testing.assert_close(x[:, c], torch.full((2, 16, 16), e), rtol=0, atol=1e-5)


def test_collate_default_stats_are_clips_and_float_images_are_not_rescaled(tokenizer):
    collate = Collate(tokenizer, image_size=4)
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    image = torch.full((1, 3, 4, 4), 0.7)  # already in [0, 1], float
    torch.testing.assert_close(
        collate.images(image), ((0.7 - clip_mean) / clip_std).view(1, 3, 1, 1).expand(1, 3, 4, 4), rtol=0, atol=1e-6
    )


def test_collate_resize_and_tokens(tokenizer, dataset):
    collate = Collate(tokenizer, image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    items = [dataset[i] for i in range(5)]
    batch = collate(items)
    assert set(batch) == {"images", "token_ids", "token_mask", "skipped", "truncated"}
    assert int(batch["skipped"]) == 0 and int(batch["truncated"]) == 0
    assert batch["images"].shape == (5, 3, 16, 16)
    # with mean 0 / std 1 the values stay in [0, 1] and the spatial mean survives the (antialiased) downsizing
    assert batch["images"].min() >= 0 and batch["images"].max() <= 1
    original_mean = torch.stack([s["image"] for s in items]).float().div(255).mean(dim=(2, 3))
    torch.testing.assert_close(batch["images"].mean(dim=(2, 3)), original_mean, rtol=0, atol=0.01)
    ids, mask = tokenizer([s["caption"] for s in items])
    assert batch["token_ids"].shape == (5, 48) and batch["token_ids"].dtype == torch.long
    assert torch.equal(batch["token_ids"], ids) and torch.equal(batch["token_mask"], mask)


def test_loader_with_workers_matches_single_process(tokenizer):
    ds = SyntheticShapes(num_samples=24, image_size=16, seed=5)
    collate = Collate(tokenizer, image_size=16)
    k = 8  # 8 batches of 4 = 32 samples: crosses the epoch boundary at 24

    def batches(num_workers: int) -> list[dict]:
        loader = make_loader(ds, collate, ResumableBatchSampler(len(ds), 4, seed=9, start=4), num_workers)
        it = iter(loader)
        try:
            return [next(it) for _ in range(k)]
        finally:
            del it

    single, multi = batches(0), batches(2)
    manual = take(ResumableBatchSampler(len(ds), 4, seed=9, start=4), k)
    for a, b, idx in zip(single, multi, manual):
        for key in ("images", "token_ids", "token_mask"):
            assert torch.equal(a[key], b[key]), key
        expected = collate([ds[i] for i in idx])
        assert torch.equal(a["images"], expected["images"])
        assert torch.equal(a["token_ids"], expected["token_ids"])


def test_collate_drops_and_counts_bad_samples(tokenizer, dataset):
    """A map-style dataset's {"skip": why} and an iterable one's skipped_before both end up in `skipped`."""
    collate = Collate(tokenizer, image_size=16)
    good = [dataset[i] for i in range(3)]
    batch = collate([good[0], {"skip": "undecodable image"}, {**good[1], "skipped_before": 2}, good[2]])
    assert batch["images"].shape[0] == 3 and batch["token_ids"].shape[0] == 3
    assert int(batch["skipped"]) == 3
    empty = collate([{"skip": "missing file"}, {"skip": "empty caption"}])
    assert empty["images"].shape == (0, 3, 16, 16) and int(empty["skipped"]) == 2


def test_collate_counts_truncated_captions(tokenizer, dataset):
    collate = Collate(tokenizer, image_size=16)
    item = dataset[0]
    long_caption = " ".join([item["caption"]] * 20)
    batch = collate([item, {**item, "caption": long_caption}])
    assert int(batch["truncated"]) == 1
    assert tokenizer.is_truncated(long_caption) and not tokenizer.is_truncated(item["caption"])


def test_neighbouring_seeds_do_not_share_epochs():
    """Seed 1's first epoch must not be seed 0's second (runs that differ by seed see different orders)."""
    a = ResumableBatchSampler(50, 10, seed=0)
    b = ResumableBatchSampler(50, 10, seed=1)
    epochs_a = [list(itertools.islice(a.indices(e * 50), 50)) for e in range(3)]
    epoch0_b = list(itertools.islice(b.indices(0), 50))
    assert all(epoch0_b != e for e in epochs_a)
