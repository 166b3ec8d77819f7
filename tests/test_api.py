"""The open_clip-shaped entry points (``sparc_kit.create_model_and_transforms``, ``get_tokenizer``,
``list_recipes``) against what a real run trained with and what ``load_pretrained`` gives."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sparc_kit
from sparc_kit.data.loader import Collate
from sparc_kit.errors import SparcError
from sparc_kit.train import train

REPO = Path(__file__).resolve().parents[1]
MICRO = [
    "model.embed_dim=16", "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "train.batch_size=4", "train.steps=2",
    "train.checkpoint_every=2", "optim.warmup_steps=1",
]
CAPTIONS = [f"a {c} photo number {i}" for i, c in enumerate(["red", "blue", "green", "yellow"] * 2)]


def _photo(i: int, size=(44, 36)) -> bytes:
    """A non-square PNG, so that a centre crop, a pad and a random crop give different views."""
    pixels = np.random.default_rng(i).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run on a manifest of stored images with the random resized crop on: (run folder, recipe)."""
    root = tmp_path_factory.mktemp("api")
    (root / "img").mkdir()
    with open(root / "pairs.jsonl", "w") as f:
        for i, caption in enumerate(CAPTIONS):
            (root / "img" / f"{i}.png").write_bytes(_photo(i))
            f.write(json.dumps({"image": f"img/{i}.png", "caption": caption}) + "\n")
    recipe = sparc_kit.load_recipe("sparc_tiny", [
        *MICRO, f"data={{name: manifest, path: {root / 'pairs.jsonl'}, random_resized_crop: true, seed: 3}}",
        "tokenizer.vocab_size=128",
    ])
    out = root / "run"
    train(recipe, str(out), progress=False)
    return out, root


def test_a_run_folder_gives_load_pretrateds_model(run):
    out, root = run
    model, _, eval_transform = sparc_kit.create_model_and_transforms(out)
    loaded = sparc_kit.load_pretrained(out)
    images = torch.stack([eval_transform(Image.open(root / "img" / f"{i}.png")) for i in range(3)])
    ids, mask = loaded.tokenizer(CAPTIONS[:3])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.model.encode_image(images))
        assert torch.equal(model.encode_text(ids), loaded.model.encode_text(ids, mask))
    assert not model.training
    weights = {k: v for k, v in loaded.model.state_dict().items()}
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_the_transforms_are_the_runs(run):
    out, root = run
    _, train_transform, eval_transform = sparc_kit.create_model_and_transforms(str(out))
    loaded = sparc_kit.load_pretrained(out)
    dataset = sparc_kit.build_dataset(loaded.recipe)  # the run's own training data, from its recipe.yaml
    batches = Collate(loaded.tokenizer, 64)
    image = Image.open(root / "img" / "2.png")
    # the training view: the dataset's item i of epoch 0 is cropped with key (0, i), then normalised in the batch
    for i in range(3):
        expected = batches([dataset[i]])["images"][0]
        assert torch.equal(train_transform(Image.open(root / "img" / f"{i}.png"), key=(0, i)), expected)
    assert not torch.equal(train_transform(image, key=(0, 2)), train_transform(image, key=(1, 2)))  # it augments
    assert torch.equal(eval_transform(image), loaded.transform(image))
    assert eval_transform(image).shape == train_transform(image).shape == (3, 64, 64)
    assert not torch.equal(eval_transform(image), train_transform(image, key=(0, 2)))


def test_the_tokenizer_gives_the_ids_training_used(run):
    out, _ = run
    tokenizer = sparc_kit.get_tokenizer(out)
    loaded = sparc_kit.load_pretrained(out)
    dataset = sparc_kit.build_dataset(loaded.recipe)
    samples = [dataset[i] for i in range(len(CAPTIONS))]
    trained_on = Collate(loaded.tokenizer, 64)(samples)["token_ids"]  # what a training batch holds
    ids = tokenizer([s["caption"] for s in samples])
    assert ids.dtype == torch.long and ids.shape == (len(CAPTIONS), loaded.recipe.tokenizer.context_length)
    assert torch.equal(ids, trained_on)
    assert torch.equal(tokenizer(CAPTIONS[1]), ids[1:2])  # one text: one row
    assert [tokenizer.decode(row) for row in ids] == CAPTIONS  # lowercase already: a round trip

    # a recipe naming the run's tokenizer file tokenises the same
    named = sparc_kit.load_recipe("sparc_tiny", [f"tokenizer.path={out / 'tokenizer.model'}"])
    assert torch.equal(sparc_kit.get_tokenizer(named)(CAPTIONS), ids)


def test_list_recipes_is_the_recipes_folder():
    assert sparc_kit.list_recipes() == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_a_recipe_gives_its_model_freshly_built():
    recipe = sparc_kit.load_recipe("clip_tiny")
    for source in ("clip_tiny", str(REPO / "recipes" / "clip_tiny.yaml"), recipe):
        model, train_transform, eval_transform = sparc_kit.create_model_and_transforms(source)
        reference = sparc_kit.build_model(recipe)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert eval_transform.image_size == train_transform.image_size == recipe.model.vision.image_size
    model, _, _ = sparc_kit.create_model_and_transforms("clip_tiny", precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_arguments_are_one_line(tmp_path):
    cases = [
        (lambda: sparc_kit.create_model_and_transforms("clip_tiny", precision="fp8"),
         "precision: 'fp8' is not one of fp32, bf16, fp16"),
        (lambda: sparc_kit.create_model_and_transforms("clip_tiny", device="tpu"),
         "device: 'tpu' is not a device (cpu, cuda, cuda:1, ... or auto)"),
        (lambda: sparc_kit.create_model_and_transforms(42),
         "recipe_or_run: expected a run folder, a recipe file, a built-in recipe name or a recipe object, got int"),
        (lambda: sparc_kit.get_tokenizer("clip_tiny"),
         "clip_tiny: the recipe names no tokenizer.path (its tokenizer is trained when a run starts): give the run "
         "folder, or set tokenizer.path"),
        (lambda: sparc_kit.create_model_and_transforms(tmp_path),
         f"{tmp_path}: not a run folder (no recipe.yaml) nor a checkpoint folder (no model.safetensors)"),
    ]
    for call, line in cases:
        with pytest.raises(SparcError) as info:
            call()
        assert str(info.value) == line
