"""Evaluation: retrieval Recall@K against hand-computed ranks and a slow reference, chunking that never builds the
N x M matrix, zero-shot accuracy on a stub model whose answers are known, prompt averaging, the eval-set readers,
``load_pretrained`` on a real (micro) run, the JSON results, and ``sparc eval``'s errors.

Real data (``../shared/data``) is used when present and skipped with a reason otherwise.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import sparc_kit
from sparc_kit.data import Collate
from sparc_kit.evaluate import (
    EvalConfig,
    EvalDataError,
    EvalTaskError,
    build_eval_specs,
    evaluate_during_training,
    iter_labelled_images,
    load_retrieval_set,
    retrieval_evaluate,
    retrieval_metrics,
    retrieval_ranks,
    run_evaluations,
    zeroshot_classifier,
    zeroshot_evaluate,
)
from sparc_kit.evaluate.data import detect_task, expand_braces
from sparc_kit.evaluate.spec import spec_names
from sparc_kit.pretrained import EvalTransform, Pretrained, PretrainedError, load_pretrained
from sparc_kit.train import save_checkpoint, train

sys.path.insert(0, os.path.dirname(__file__))
from test_train import MICRO  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR = SHARED / "cifar10"
COCO = SHARED / "coco-captions"
needs_cifar = pytest.mark.skipif(not (CIFAR / "test-000.tar").exists(), reason=f"{CIFAR} is absent (shared data)")
needs_coco = pytest.mark.skipif(not (COCO / "pairs.jsonl").exists(), reason=f"{COCO} is absent (shared data)")


# ---------------------------------------------------------------------------------------------------- retrieval

# Similarities of 3 images (rows) with 5 captions (columns); captions 0, 1 describe image 0, caption 2 image 1,
# captions 3, 4 image 2. With image_embeds = identity, text_embeds = S.T gives exactly these scores.
S = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.3, 0.2],
        [0.8, 0.7, 0.6, 0.1, 0.0],
        [0.4, 0.2, 0.3, 0.1, 0.4],
    ],
    dtype=torch.float64,
)
OWNER = torch.tensor([0, 0, 1, 2, 2])


def test_retrieval_ranks_by_hand():
    """i2t: image 0's best caption (0.9) beats all -> 0; image 1's (0.6) is beaten by 0.8, 0.7 -> 2; image 2's best
    (0.4, caption 4) ties with caption 0's 0.4 and a tie counts against it -> 1.
    t2i: caption 1 (0.1 for image 0) is beaten by 0.7 and 0.2 -> 2; caption 3 (0.1 for image 2) is beaten by 0.3
    and tied by image 1's 0.1 -> 2; the others are top -> 0."""
    i2t, t2i = retrieval_ranks(torch.eye(3, dtype=torch.float64), S.T.contiguous(), OWNER)
    assert i2t.tolist() == [0, 2, 1]
    assert t2i.tolist() == [0, 2, 0, 2, 0]
    m = retrieval_metrics(torch.eye(3, dtype=torch.float64), S.T.contiguous(), OWNER, ks=(1, 2, 3))
    assert m == {
        "i2t_R@1": 1 / 3, "i2t_R@2": 2 / 3, "i2t_R@3": 1.0,
        "t2i_R@1": 3 / 5, "t2i_R@2": 3 / 5, "t2i_R@3": 1.0,
        "images": 3, "texts": 5,
    }


def test_retrieval_image_without_captions_is_a_candidate_not_a_query():
    """A 4th image with no caption is left out of i2t but still competes in t2i (it outscores caption 1's image)."""
    image_embeds = torch.eye(4, dtype=torch.float64)
    extra = torch.tensor([[0.0, 0.95, 0.0, 0.0, 0.0]], dtype=torch.float64)  # image 3's scores with the 5 captions
    text_embeds = torch.cat([S, extra]).T.contiguous()
    i2t, t2i = retrieval_ranks(image_embeds, text_embeds, OWNER)
    assert i2t.tolist() == [0, 2, 1, -1]
    assert t2i.tolist() == [0, 3, 0, 2, 0]
    m = retrieval_metrics(image_embeds, text_embeds, OWNER, ks=(1,))
    assert m["images"] == 3 and m["i2t_R@1"] == 1 / 3 and m["t2i_R@1"] == 3 / 5


def test_collapsed_model_gets_no_recall():
    """All scores equal: every wrong candidate ties with the right one, so nothing is retrieved at 1."""
    m = retrieval_metrics(torch.ones(4, 2), torch.ones(8, 2), torch.arange(8) // 2, ks=(1, 4))
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0
    assert m["t2i_R@4"] == 1.0  # 3 wrong images tie: rank 3 < 4
    assert m["i2t_R@4"] == 0.0  # 6 captions of other images tie: rank 6


def reference_ranks(image_embeds, text_embeds, owner):
    """Slow reference: the full matrix, one Python loop per query."""
    sims = (image_embeds @ text_embeds.T).tolist()
    n, m = len(sims), len(sims[0])
    i2t = []
    for i in range(n):
        best = max(sims[i][j] for j in range(m) if owner[j] == i)
        i2t.append(sum(1 for j in range(m) if owner[j] != i and sims[i][j] >= best))
    t2i = [sum(1 for i in range(n) if i != owner[j] and sims[i][j] >= sims[owner[j]][j]) for j in range(m)]
    return i2t, t2i


def random_set(seed: int, n: int = 23, m: int = 57, e: int = 6, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    owner = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=g)])  # every image has a caption
    owner = owner[torch.randperm(m, generator=g)]
    if ties:  # small integers: exact arithmetic and many exact ties
        images = torch.randint(-1, 2, (n, e), generator=g).double()
        texts = torch.randint(-1, 2, (m, e), generator=g).double()
    else:
        images = torch.randn(n, e, generator=g, dtype=torch.float64)
        texts = torch.randn(m, e, generator=g, dtype=torch.float64)
    return images, texts, owner


@pytest.mark.parametrize("ties", [False, True])
def test_chunked_ranks_equal_unchunked_and_the_reference(ties):
    images, texts, owner = random_set(1, ties=ties)
    ref_i2t, ref_t2i = reference_ranks(images, texts, owner.tolist())
    full = retrieval_metrics(images, texts, owner, chunk_size=10_000)
    for chunk in (1, 2, 5, 22, 23, 24, 57, 1000):
        i2t, t2i = retrieval_ranks(images, texts, owner, chunk_size=chunk)
        assert i2t.tolist() == ref_i2t, chunk
        assert t2i.tolist() == ref_t2i, chunk
        assert retrieval_metrics(images, texts, owner, chunk_size=chunk) == full
    assert full["i2t_R@10"] == sum(r < 10 for r in ref_i2t) / 23
    assert full["t2i_R@5"] == sum(r < 5 for r in ref_t2i) / 57


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_retrieval_never_materialises_the_full_matrix():
    n, m, e, chunk = 40, 120, 8, 4
    images, texts, owner = random_set(2, n=n, m=m, e=e)
    with LargestTensor() as small:
        chunked = retrieval_metrics(images, texts, owner, chunk_size=chunk)
    assert small.largest <= max(chunk * max(n, m), m * e) < n * m  # [chunk, M] scores at most
    with LargestTensor() as big:  # the control: one chunk does build [N, M], and the recorder sees it
        whole = retrieval_metrics(images, texts, owner, chunk_size=n)
    assert big.largest >= n * m
    assert chunked == whole


# ---------------------------------------------------------------------------------------------------- zero-shot


class StubTokenizer:
    """Each known prompt becomes one id: its row in the table."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __call__(self, texts):
        ids = torch.tensor([[self.prompts.index(t)] for t in texts])
        return ids, torch.ones_like(ids, dtype=torch.bool)


class StubModel(nn.Module):
    """Text embeddings from a table; an "image" is its own embedding vector."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def encode_text(self, ids, mask=None):
        return F.normalize(self.table[ids[:, 0]], dim=-1)

    def encode_image(self, images):
        return F.normalize(images.float(), dim=-1)


def identity(x):
    return x


def test_zeroshot_exact_top1_top5():
    """Six classes with one-hot text embeddings; an image's class ranking is the order of its components."""
    classes = [f"c{i}" for i in range(6)]
    model = StubModel(torch.eye(6))
    tokenizer = StubTokenizer(classes)  # label-only template: the prompt is the class name
    down, up = torch.tensor([5.0, 4, 3, 2, 1, 0]), torch.tensor([1.0, 2, 3, 4, 5, 6])
    samples = [
        (down, 0),  # rank 1
        (down, 1),  # rank 2
        (down, 5),  # rank 6
        (torch.tensor([0.0, 0, 0, 1, 0, 0]), 3),  # rank 1
        (up, 0),  # rank 6
        (up, 1),  # rank 5
    ]
    m = zeroshot_evaluate(model, tokenizer, samples, classes, "label", batch_size=4, transform=identity)
    assert m == {"top1": 2 / 6, "top5": 4 / 6, "n": 6, "classes": 6}
    # max_samples reads the first ones only
    m3 = zeroshot_evaluate(
        model, tokenizer, iter(samples), classes, "label", batch_size=2, transform=identity, max_samples=3
    )
    assert m3 == {"top1": 1 / 3, "top5": 2 / 3, "n": 3, "classes": 6}


def test_zeroshot_with_fewer_classes_than_k_reports_top1_only():
    classes = ["a", "b", "c"]
    model, tokenizer = StubModel(torch.eye(3)), StubTokenizer(classes)
    samples = [(torch.tensor([1.0, 0, 0]), 0), (torch.tensor([1.0, 0, 0]), 2)]
    m = zeroshot_evaluate(model, tokenizer, samples, classes, "label", transform=identity)
    assert m == {"top1": 0.5, "n": 2, "classes": 3}  # top5 would be 100% whatever the model: left out


def test_template_embeddings_are_normalised_then_averaged_then_renormalised():
    """Class x: template A gives [3, 4, 0] (unit: [.6, .8, 0]), template B [0, 0, 2] (unit: [0, 0, 1]); the mean
    [.3, .4, .5] has norm sqrt(.5). Averaging before normalising would give [1.5, 2, 1] / |.| instead."""
    prompts = ["A x", "B x", "A y", "B y"]
    table = torch.tensor([[3.0, 4, 0], [0, 0, 2], [1, 0, 0], [1, 0, 0]])
    weights = zeroshot_classifier(StubModel(table), StubTokenizer(prompts), ["x", "y"], ["A {}", "B {}"])
    expected_x = torch.tensor([0.3, 0.4, 0.5]) / math.sqrt(0.5)
    torch.testing.assert_close(weights[0], expected_x)
    torch.testing.assert_close(weights[1], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(2))


def test_templates_must_hold_the_class_slot():
    with pytest.raises(ValueError, match="no '{}'"):
        zeroshot_classifier(StubModel(torch.eye(2)), StubTokenizer(["a"]), ["a"], ["a photo"])
    with pytest.raises(ValueError, match="not a template set"):
        zeroshot_classifier(StubModel(torch.eye(2)), StubTokenizer(["a"]), ["a"], "clipp")


# ---------------------------------------------------------------------------------------------------- readers


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_image(i: int, size: int = 12) -> np.ndarray:
    return np.full((size, size, 3), (10 * i, 255 - 10 * i, 7 * i), dtype=np.uint8)


def test_brace_expansion():
    assert expand_braces("s/test-{000..002}.tar") == ["s/test-000.tar", "s/test-001.tar", "s/test-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def write_shard(path: Path, samples: list[tuple[str, np.ndarray, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, label in samples:
            for name, data in ((f"{key}.png", png_bytes(image)), (f"{key}.txt", label.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_class_name_txt(tmp_path):
    names = ["cat", "dog", "ship"]
    (tmp_path / "classnames.txt").write_text("\n".join(names) + "\n")
    write_shard(tmp_path / "s-000.tar", [("a0", colour_image(0), "dog"), ("a1", colour_image(1), "ship")])
    write_shard(tmp_path / "s-001.tar", [("b0", colour_image(2), "cat"), ("b1", colour_image(3), "dog")])
    pattern = str(tmp_path / "s-{000..001}.tar")
    got = list(iter_labelled_images(pattern))  # classnames.txt beside the shards
    assert [label for _, label in got] == [1, 2, 0, 1]
    assert all(np.array_equal(np.asarray(img), colour_image(i)) for i, (img, _) in enumerate(got))
    assert [label for _, label in iter_labelled_images(pattern, names, max_samples=3)] == [1, 2, 0]
    with pytest.raises(EvalDataError, match="label 'dog' is not one of the 2 class names"):
        list(iter_labelled_images(pattern, ["cat", "ship"]))


@pytest.fixture
def tiny_sets(tmp_path) -> dict[str, str]:
    """Six PNGs with a classification manifest (int and name labels), a CSV twin, and a retrieval manifest."""
    (tmp_path / "img").mkdir()
    names = ["red", "green", "blue"]
    rows, caps = [], []
    for i in range(6):
        Image.fromarray(colour_image(i, 40)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "label": i % 3 if i % 2 else names[i % 3]})
        caps.append({"image": f"img/{i}.png", "captions": [f"a {names[i % 3]} square", f"picture {i}"][: 1 + i % 2]})
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cls.csv").write_text("image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in rows))
    (tmp_path / "ret.jsonl").write_text("".join(json.dumps(r) + "\n" for r in caps))
    (tmp_path / "classnames.txt").write_text("\n".join(names) + "\n")
    return {"cls": str(tmp_path / "cls.jsonl"), "csv": str(tmp_path / "cls.csv"), "ret": str(tmp_path / "ret.jsonl")}


def test_manifest_readers(tiny_sets):
    labels = [label for _, label in iter_labelled_images(tiny_sets["cls"])]
    assert labels == [0, 1, 2, 0, 1, 2]
    assert [label for _, label in iter_labelled_images(tiny_sets["csv"])] == labels
    first, _ = next(iter_labelled_images(tiny_sets["cls"]))
    assert np.array_equal(np.asarray(first), colour_image(0, 40))
    ret = load_retrieval_set(tiny_sets["ret"], max_samples=4)
    assert len(ret) == 4 and ret.num_captions == 1 + 2 + 1 + 2
    assert ret.captions[1] == ["a green square", "picture 1"]
    assert detect_task(tiny_sets["cls"]) == "zeroshot" and detect_task(tiny_sets["ret"]) == "retrieval"
    assert detect_task("x/test-{000..001}.tar") == "zeroshot"


def test_manifest_errors_name_the_line(tmp_path):
    Image.fromarray(colour_image(0)).save(tmp_path / "a.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "label": 0}\n{"image": "b.png", "label": 7}\n{"image": "c.png", "label": 1}\n')
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: label 7 is outside 0..1"):
        list(iter_labelled_images(str(bad), ["x", "y"]))
    bad.write_text('{"image": "a.png", "label": 0}\n{"image": "c.png", "label": 1}\n')
    with pytest.raises(EvalDataError, match=r"c.png: image not found"):
        list(iter_labelled_images(str(bad), ["x", "y"]))
    assert len(list(iter_labelled_images(str(bad), ["x", "y"], max_samples=1))) == 1
    with pytest.raises(EvalDataError, match="class-name file not found"):
        list(iter_labelled_images(str(bad)))
    with pytest.raises(EvalDataError, match="is a folder; give its shards"):
        list(iter_labelled_images(str(tmp_path)))


# ---------------------------------------------------------------------------------------------------- transform


def test_transform_matches_training_normalisation_and_center_crops():
    size = 16
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    transform = EvalTransform(size)
    collate = Collate(tokenizer=None, image_size=size)
    assert torch.equal(transform(image), collate.images(image[None])[0])
    # a wide image whose shorter side is already `size`: no resampling, the middle third is kept exactly
    wide = torch.cat([torch.full((3, size, size), v, dtype=torch.uint8) for v in (0, 200, 40)], dim=2)
    torch.testing.assert_close(transform(wide), collate.images(wide[:, :, size : 2 * size][None])[0])
    pil = Image.fromarray(wide.permute(1, 2, 0).numpy())
    assert torch.equal(transform(pil), transform(wide))
    assert transform(torch.zeros(2, 3, 40, 50, dtype=torch.uint8)).shape == (2, 3, size, size)
    # a constant image stays constant through resizing (antialiased bicubic, clamped)
    grey = transform(torch.full((3, 50, 40), 128, dtype=torch.uint8))
    torch.testing.assert_close(grey, collate.images(torch.full((1, 3, size, size), 128, dtype=torch.uint8))[0])


def test_transform_of_a_photo_equals_the_training_datasets_resize_then_collate():
    transforms = pytest.importorskip("sparc_kit.data.transforms")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    training = transforms.ImageTransform(24)(photo)  # uint8 [3, 24, 24]: shorter side, bicubic, centre crop
    expected = Collate(tokenizer=None, image_size=24).images(training[None])[0]
    assert torch.equal(EvalTransform(24)(photo), expected)


# ---------------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("evalrun") / "run")
    recipe = sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=2", "data.num_samples=16"])
    train(recipe, out, progress=False)
    return out


def test_load_pretrained_accepts_run_checkpoint_and_file(micro_run):
    ckpt = os.path.join(micro_run, "checkpoints", "step_00000002")
    loaded = [
        load_pretrained(p)
        for p in (micro_run, os.path.join(micro_run, "checkpoints"), ckpt, os.path.join(ckpt, "model.safetensors"))
    ]
    reference = loaded[0].model.state_dict()
    for p in loaded:
        assert p.step == 2 and p.run_dir == os.path.abspath(micro_run)
        assert not p.model.training
        assert p.tokenizer.context_length == 16 and p.transform.image_size == 32
        assert all(torch.equal(reference[k], v) for k, v in p.model.state_dict().items())
    model, tokenizer, transform = loaded[0]  # unpacks as a triple
    assert model is loaded[0].model and isinstance(loaded[0], Pretrained)


def test_loaded_model_encodes_like_the_model_that_was_saved(micro_run, tmp_path):
    recipe = sparc_kit.load_recipe(os.path.join(micro_run, "recipe.yaml"))
    torch.manual_seed(3)
    model = sparc_kit.build_model(recipe).eval()
    run = tmp_path / "saved"
    run.mkdir()
    (run / "recipe.yaml").write_text(sparc_kit.dump_recipe(recipe))
    (run / "tokenizer.model").write_bytes(Path(micro_run, "tokenizer.model").read_bytes())
    save_checkpoint(str(run / "checkpoints"), 7, model, {}, {"samples_seen": 0})
    model2, tokenizer, transform = load_pretrained(run)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = torch.stack([transform(im) for im in images])
    ids, mask = tokenizer(["a red circle in the centre", "a small blue square"])
    with torch.no_grad():
        assert torch.equal(model2.encode_image(x), model.encode_image(x))
        assert torch.equal(model2.encode_text(ids, mask), model.encode_text(ids, mask))
    assert load_pretrained(run).step == 7


def test_load_pretrained_errors_are_one_line(micro_run, tmp_path):
    (tmp_path / "empty").mkdir()
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "recipe.yaml").write_text(Path(micro_run, "recipe.yaml").read_text())
    (tmp_path / "notes.txt").write_text("hi")
    cases = {
        tmp_path / "missing": "no such run folder",
        tmp_path / "empty": "not a run folder (no recipe.yaml)",
        no_ckpt: "run folder has no complete checkpoint",
        tmp_path / "notes.txt": "expected a run folder, a checkpoint folder or a .safetensors file",
    }
    for path, message in cases.items():
        with pytest.raises(PretrainedError, match=re.escape(message)) as info:
            load_pretrained(path)
        assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def test_run_evaluations_writes_json_per_task(micro_run, tiny_sets, tmp_path):
    pretrained = load_pretrained(micro_run)
    specs = [
        EvalConfig(task="zeroshot", data=tiny_sets["cls"], templates="label", batch_size=4),
        {"task": "retrieval", "data": tiny_sets["ret"], "max_samples": 5},
    ]
    results = run_evaluations(pretrained, specs, out_dir=str(tmp_path / "eval"))
    assert [r.name for r in results] == ["zeroshot", "retrieval"]
    zs = json.loads((tmp_path / "eval" / "zeroshot.json").read_text())
    assert zs["n"] == 6 and zs["metrics"]["n"] == 6 and zs["step"] == 2 and zs["data"] == tiny_sets["cls"]
    assert zs["settings"]["templates"] == ["{}"] and "timestamp" in zs
    # the file holds what a direct call computes
    samples = iter_labelled_images(tiny_sets["cls"])
    direct = zeroshot_evaluate(pretrained.model, pretrained.tokenizer, samples, ["red", "green", "blue"], "label")
    assert zs["metrics"] == direct
    ret = json.loads((tmp_path / "eval" / "retrieval.json").read_text())
    assert ret["n"] == 5 and ret["metrics"]["texts"] == 1 + 2 + 1 + 2 + 1
    direct = retrieval_evaluate(pretrained.model, pretrained.tokenizer, load_retrieval_set(tiny_sets["ret"], 5))
    assert ret["metrics"] == direct


def test_evaluate_during_training_runs_what_is_due_and_restores_train_mode(micro_run, tiny_sets):
    pretrained = load_pretrained(micro_run)
    model = pretrained.model.train()
    specs = [
        {"task": "zeroshot", "data": tiny_sets["cls"], "templates": "label", "every": 2},
        {"task": "retrieval", "data": tiny_sets["ret"], "every": 3},
    ]
    at2 = evaluate_during_training(model, pretrained.tokenizer, specs, step=2)
    assert sorted(at2) == ["eval/zeroshot/classes", "eval/zeroshot/n", "eval/zeroshot/top1"]
    assert model.training
    at3 = evaluate_during_training(model, pretrained.tokenizer, specs, step=3)
    assert at3["eval/retrieval/images"] == 6 and "eval/zeroshot/top1" not in at3
    assert evaluate_during_training(model, pretrained.tokenizer, specs, step=5) == {}
    final = evaluate_during_training(model, pretrained.tokenizer, specs, step=5, final=True)
    assert final == {**at2, **at3}  # same weights, same numbers
    model.eval()
    samples = iter_labelled_images(tiny_sets["cls"])
    direct = zeroshot_evaluate(model, pretrained.tokenizer, samples, ["red", "green", "blue"], "label")
    assert at2["eval/zeroshot/top1"] == direct["top1"]


@needs_cifar
@needs_coco
def test_real_eval_sets(micro_run, tmp_path):
    """CIFAR-10's test shard (first 200) and a COCO-captions subset (first 30 images and all their captions)."""
    pretrained = load_pretrained(micro_run)
    specs = [
        EvalConfig(task="zeroshot", data=str(CIFAR / "test-000.tar"), max_samples=200),
        EvalConfig(task="retrieval", data=str(COCO / "pairs.jsonl"), max_samples=30),
    ]
    zs, ret = run_evaluations(pretrained, specs, out_dir=str(tmp_path))
    saved = json.loads((tmp_path / "zeroshot.json").read_text())
    assert saved["n"] == 200 and saved["metrics"]["classes"] == 10
    assert 0.0 <= saved["metrics"]["top1"] <= saved["metrics"]["top5"] <= 1.0
    with open(COCO / "pairs.jsonl") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(30))]
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert saved["n"] == 30 and saved["metrics"]["texts"] == sum(len(r["captions"]) for r in rows)
    assert ret.metrics["i2t_R@1"] <= ret.metrics["i2t_R@5"] <= ret.metrics["i2t_R@10"]


# ---------------------------------------------------------------------------------------------------- specs


def test_eval_config_and_spec_building(tiny_sets):
    with pytest.raises(ValueError, match="epochs"):
        EvalConfig(task="zeroshot", data="x.tar", epochs=3)
    with pytest.raises(ValueError, match="has no"):
        EvalConfig(task="zeroshot", data="x.tar", templates=["a photo"])
    folder = os.path.dirname(tiny_sets["cls"])
    shards = os.path.join(folder, "y-{0..1}.tar")
    specs = build_eval_specs("all", [tiny_sets["cls"], tiny_sets["ret"], f"zeroshot={shards}"], templates="label")
    # each evaluator owns its options: retrieval has no prompt templates (None), the zero-shot sets get --templates
    assert [(s.task, s.data, getattr(s, "templates", None)) for s in specs] == [
        ("zeroshot", tiny_sets["cls"], "label"), ("retrieval", tiny_sets["ret"], None), ("zeroshot", shards, "label")
    ]
    # two unnamed zeroshot sets: the data's folder name is appended, then a counter (both sit in one folder)
    name = os.path.basename(folder)
    assert spec_names(specs) == [f"zeroshot_{name}", "retrieval", f"zeroshot_{name}_2"]
    two = [EvalConfig(task="zeroshot", data="a/c10/t.tar"), EvalConfig(task="zeroshot", data="b/c100/t.tar")]
    assert spec_names(two) == ["zeroshot_c10", "zeroshot_c100"]
    recipe_specs = [{"task": "retrieval", "data": "r.jsonl"}, {"task": "zeroshot", "data": "z.tar", "max_samples": 5}]
    only = build_eval_specs("zeroshot", [], max_samples=9, recipe_specs=recipe_specs)
    assert [(s.data, s.max_samples) for s in only] == [("z.tar", 9)]
    # segmentation is available (it was named but not available before): the prompt options and ignore_index reach
    # it; ignore_index is not given to a task whose options lack it
    seg = build_eval_specs("all", ["segmentation=m.jsonl", "zeroshot=z.tar"], "c.txt", "label", ignore_index=11)
    assert [(s.task, s.classnames, s.templates, getattr(s, "ignore_index", None)) for s in seg] == [
        ("segmentation", "c.txt", "label", 11), ("zeroshot", "c.txt", "label", None)
    ]
    with pytest.raises(EvalTaskError, match="no retrieval evaluation data"):
        build_eval_specs("retrieval", [], recipe_specs=recipe_specs[1:])


# ---------------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def eval_app():
    from sparc_cli.eval import eval_command

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("eval")(eval_command)

    @app.callback()
    def root() -> None:  # a group, so the command is invoked as `eval`, as in `sparc eval`
        pass

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["eval", *args])


@pytest.mark.parametrize(
    "args, line",
    [
        (["{missing}"], "error: {missing}: no such run folder, checkpoint folder or .safetensors file"),
        (
            ["{run}", "--task", "zershot"],
            "error: unknown task 'zershot'. Did you mean 'zeroshot'? Known: zeroshot, retrieval, segmentation, all",
        ),
        (  # available now (it exited 2 with "not available yet" before); this run's recipe has no eval: section
            ["{run}", "--task", "segmentation"],
            "error: no segmentation evaluation data: pass --data PATH (a manifest or webdataset shards), or add an "
            "eval: section to the recipe",
        ),
        (
            ["{run}"],
            "error: no evaluation data: pass --data PATH (a manifest or webdataset shards), or add an eval: section "
            "to the recipe",
        ),
        (["{run}", "--data", "{tmp}/nothing.jsonl"], "error: {tmp}/nothing.jsonl: manifest not found"),
        (
            ["{run}", "--task", "retrieval", "--data", "zeroshot=x.tar"],
            "error: --data zeroshot=x.tar: a zeroshot set, but --task is retrieval",
        ),
    ],
)
def test_eval_command_bad_input_exits_2_with_one_line(eval_app, micro_run, tmp_path, args, line):
    fill = {"run": micro_run, "missing": str(tmp_path / "missing"), "tmp": str(tmp_path)}
    result = eval_app(*[a.format(**fill) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.splitlines() == [line.format(**fill)]


def test_eval_command_prints_a_table_and_writes_json(eval_app, micro_run, tiny_sets, tmp_path):
    out = tmp_path / "all.json"
    result = eval_app(
        micro_run, "--data", tiny_sets["cls"], "--data", tiny_sets["ret"], "--templates", "label", "--out", str(out)
    )
    assert result.exit_code == 0, (result.output, result.exception)
    for metric in ("top1", "i2t_R@1", "t2i_R@10"):
        assert metric in result.stdout
    assert f"wrote {os.path.join(os.path.abspath(micro_run), 'eval', 'zeroshot.json')}" in result.stdout
    combined = json.loads(out.read_text())["results"]
    assert [r["task"] for r in combined] == ["zeroshot", "retrieval"] and [r["n"] for r in combined] == [6, 6]
    saved = json.loads(Path(micro_run, "eval", "zeroshot.json").read_text())
    assert saved["metrics"] == combined[0]["metrics"] and saved["step"] == 2
