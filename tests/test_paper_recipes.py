"""The paper's recipes (recipes/*_b16.yaml, sparc_b32, sparc_l14) and their tiny CPU twins (recipes/*_tiny.yaml).

- every recipe file validates through ``sparc recipes validate`` and starts with its launch command;
- the paper-scale towers, built on the meta device (no memory, no weights), have the paper's sizes: parameter
  counts checked against closed forms, patch counts, and the sparsity threshold 1/P each recipe resolves to;
- each baseline differs from sparc_b16 (each tiny twin from sparc_tiny) only where it is documented to;
- a short CPU run of every tiny recipe, shrunk further by overrides, lowers its loss (marked ``smoke``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import sparc_kit
from sparc_cli.main import app
from sparc_kit.registry import losses as loss_registry
from sparc_kit.train import build_loss, train

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

PAPER_RECIPES = ["sparc_b16", "sparc_b32", "sparc_l14"]
BASELINES_B16 = ["clip_b16", "siglip_b16", "filip_b16", "pacl_b16", "gloria_b16", "mgca_b16"]
TINY_RECIPES = ["sparc_tiny", "clip_tiny", "siglip_tiny", "filip_tiny", "pacl_tiny", "gloria_tiny", "mgca_tiny"]


def recipe(name: str, overrides: tuple[str, ...] = ()) -> Any:
    return sparc_kit.load_recipe(str(RECIPES / f"{name}.yaml"), list(overrides))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: node}


def differing_keys(a: Any, b: Any) -> set[str]:
    """Dotted keys whose values differ between two recipes' full dumps (a key present in one only counts)."""
    fa, fb = flatten(a.model_dump(mode="json")), flatten(b.model_dump(mode="json"))
    return {k for k in set(fa) | set(fb) if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# every recipe file: validates, starts with its launch command


def test_the_paper_and_tiny_recipes_are_all_there():
    found = {p.stem for p in RECIPES.glob("*.yaml")}
    assert set(PAPER_RECIPES + BASELINES_B16 + TINY_RECIPES) <= found
    assert len(found) >= 16


def test_every_recipe_validates_through_the_cli():
    files = sorted(str(p) for p in RECIPES.glob("*.yaml"))
    result = CliRunner().invoke(app, ["recipes", "validate", *files])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"ok: {f}" for f in files]
    assert result.stderr == ""


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_starts_with_its_launch_command(path: Path):
    first = path.read_text().splitlines()[0]
    assert first == f"# sparc train recipes/{path.name}"
    assert recipe(path.stem).name == path.stem  # the default run folder is runs/<file name>


# ----------------------------------------------------------------------------------------------------------------
# the paper's setup, as numbers


def vit_params(width: int, depth: int, patch: int, num_patches: int, channels: int = 3) -> int:
    """Native ViT without class token or head: patch conv + positions + depth pre-LN blocks + final norm.

    One block: 2 LayerNorms (2 * 2W), qkv (3W^2 + 3W), out proj (W^2 + W), MLP 4W (4W^2 + 4W, 4W^2 + W)
    = 12 W^2 + 13 W.
    """
    w = width
    return (channels * patch * patch * w + w) + num_patches * w + depth * (12 * w * w + 13 * w) + 2 * w


def text_params(vocab: int, context: int, width: int, depth: int) -> int:
    w = width
    return vocab * w + context * w + depth * (12 * w * w + 13 * w) + 2 * w


def test_sparc_b16_is_the_papers_setup():
    r = recipe("sparc_b16")
    v, t = r.model.vision, r.model.text
    assert (v.name, v.image_size, v.patch_size, v.width, v.depth, v.heads, v.class_token) == (
        "vit", 224, 16, 768, 12, 12, False
    )
    assert (t.name, t.width, t.depth, t.heads) == ("transformer", 768, 12, 12)
    assert r.model.embed_dim == 512 and r.model.image_global_head == "linear_gelu"
    assert (r.tokenizer.vocab_size, r.tokenizer.context_length, r.tokenizer.model_type) == (32000, 55, "unigram")
    assert (r.optim.name, r.optim.schedule, r.optim.warmup_steps) == ("adamw", "cosine", 2500)
    assert (r.optim.lr, r.optim.weight_decay) == (7e-4, 0.2)
    assert (r.train.batch_size, r.train.steps, r.train.precision) == (16384, 200_000, "bf16")
    assert r.loss.model_dump() == {
        "name": "sparc",
        "lambda_g": 0.5,
        "lambda_f": 1.0,
        "sparsity_threshold": None,
        "average": "token",
        "weighting": "sparse",
        "global_loss": "clip",
        "local_loss": True,
        "diagnostics": True,
        "chunk_size": None,
    }


def test_sparc_b16_tower_sizes_on_the_meta_device():
    with torch.device("meta"):
        model = sparc_kit.build_model(recipe("sparc_b16"))
    vision, text = count(model.vision), count(model.text)
    assert vision == vit_params(768, 12, 16, 196) == 85_797_120
    assert 85_500_000 <= vision <= 86_500_000  # ViT-B/16 without class token and head
    assert text == text_params(32000, 55, 768, 12) == 109_674_240
    assert model.text.token_embed.weight.shape == (32000, 768)
    assert model.text.pos_embed.shape == (1, 55, 768)
    assert model.embed_dim == 512
    assert model.vision_adapter.weight.shape == (512, 768)  # g_v
    assert model.text_adapter.weight.shape == (512, 768)  # g_t
    assert count(model.image_global_head) == 768 * 768 + 768  # h_v
    # towers + g_v + g_t + h_v + the learned log temperature
    assert count(model) == vision + text + 2 * 768 * 512 + 768 * 768 + 768 + 1 == 196_848_385


def test_sparc_l14_vision_tower_size_on_the_meta_device():
    with torch.device("meta"):
        model = sparc_kit.build_model(recipe("sparc_l14"))
    vision = count(model.vision)
    assert vision == vit_params(1024, 24, 14, 256) == 303_176_704
    assert 302_000_000 <= vision <= 305_000_000  # ViT-L/14 without class token and head
    assert count(model.text) == text_params(32000, 55, 768, 12)  # the same text tower at every image size
    assert model.vision_adapter.weight.shape == (512, 1024)
    assert count(model.image_global_head) == 1024 * 1024 + 1024


def test_sparc_b32_vision_tower_size_on_the_meta_device():
    with torch.device("meta"):
        model = sparc_kit.build_model(recipe("sparc_b32"))
    assert count(model.vision) == vit_params(768, 12, 32, 49) == 87_453_696


@pytest.mark.parametrize(
    "name, patches", [("sparc_b32", 49), ("sparc_b16", 196), ("sparc_l14", 256)], ids=["b32", "b16", "l14"]
)
def test_patches_and_the_threshold_one_over_p(name: str, patches: int):
    r = recipe(name)
    with torch.device("meta"):
        model = sparc_kit.build_model(r)
    assert model.vision.num_patches == (224 // r.model.vision.patch_size) ** 2 == patches
    assert r.loss.sparsity_threshold is None  # null = 1/P

    # The recipe's loss, fed one token whose min-max normalised similarities to the P patches are
    # [1, 1.01/P, 0.99/P, 0, ..., 0]: sigma = 1/P keeps the first two and zeroes the third.
    loss = build_loss(r)
    sigma = 1.0 / patches
    scores = torch.zeros(patches, dtype=torch.float64)
    scores[0], scores[1], scores[2] = 1.0, 1.01 * sigma, 0.99 * sigma
    dim = 4
    patch_embeds = torch.zeros(1, patches, dim, dtype=torch.float64)
    patch_embeds[0, :, 0] = scores  # s[l, p] = t . v_p with t = e_0
    token_embeds = torch.zeros(1, 1, dim, dtype=torch.float64)
    token_embeds[0, 0, 0] = 1.0
    _, weights = loss.fine_loss(
        patch_embeds, token_embeds, torch.ones(1, 1, dtype=torch.bool), torch.tensor(10.0), return_weights=True
    )
    row = weights[0, 0]
    assert row.shape == (patches,)
    assert int((row > 0).sum()) == 2
    assert row[2] == 0
    assert row[0].item() == pytest.approx(1.0 / (1.0 + 1.01 * sigma), rel=1e-6)
    assert row[1].item() == pytest.approx(1.01 * sigma / (1.0 + 1.01 * sigma), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# baselines differ from SPARC only in the loss (and the documented exceptions)

B16_EXCEPTIONS = {
    "gloria_b16": {"train.batch_size": 4096, "train.steps": 800_000},  # the paper's GLoRIA schedule (memory)
    "siglip_b16": {"model.init_temperature": 0.1},  # SigLIP's initial scale 10
    # lambda_g 0 trains no h_v: the global image embedding is the (trained) mean of the projected patches
    "filip_b16": {"model.image_global_head": "none"},
    "pacl_b16": {"model.image_global_head": "none"},
}
TINY_EXCEPTIONS = {
    "siglip_tiny": {"model.init_temperature": 0.1},
    "filip_tiny": {"model.image_global_head": "none"},
    "pacl_tiny": {"model.image_global_head": "none"},
}


def loss_keys(r: Any) -> set[str]:
    return {f"loss.{k}" for k in r.loss.model_dump()}


@pytest.mark.parametrize("name", BASELINES_B16)
def test_baseline_b16_differs_from_sparc_b16_only_in_the_loss(name: str):
    base, r = recipe("sparc_b16"), recipe(name)
    exceptions = B16_EXCEPTIONS.get(name, {})
    allowed = {"name", "description"} | loss_keys(base) | loss_keys(r) | set(exceptions)
    assert differing_keys(base, r) <= allowed
    assert differing_keys(base, r) >= {"name", "description", "loss.name"} | set(exceptions)
    flat = flatten(r.model_dump(mode="json"))
    for key, value in exceptions.items():
        assert flat[key] == value
    assert r.loss.name == name.split("_")[0]  # clip_b16 -> clip, ...


@pytest.mark.parametrize("name", [n for n in TINY_RECIPES if n != "sparc_tiny"])
def test_tiny_twin_differs_from_sparc_tiny_only_in_the_loss(name: str):
    base, r = recipe("sparc_tiny"), recipe(name)
    exceptions = TINY_EXCEPTIONS.get(name, {})
    allowed = {"name", "description"} | loss_keys(base) | loss_keys(r) | set(exceptions)
    assert differing_keys(base, r) <= allowed
    assert differing_keys(base, r) >= {"name", "description", "loss.name"} | set(exceptions)
    twin = recipe(name.replace("_tiny", "_b16"))
    assert r.loss.model_dump() == twin.loss.model_dump()  # the same objective as its paper-scale recipe


@pytest.mark.parametrize("name", BASELINES_B16)
def test_baseline_losses_use_the_registered_defaults(name: str):
    r = recipe(name)
    defaults = loss_registry.get(r.loss.name).config().model_dump()
    assert r.loss.model_dump(exclude={"name"}) == defaults


def test_documented_baseline_settings():
    assert recipe("filip_b16").loss.token_drop == 0.2  # SPARC App. D.3-D.4: 20% token dropping
    assert recipe("filip_b16").loss.lambda_g == 0.0  # FILIP trained alone (Tables 1-6)
    assert recipe("mgca_b16").loss.attn_dim == 128  # 1 head, 128-d
    g = recipe("gloria_b16")
    assert (g.train.batch_size, g.train.steps) == (4096, 800_000)
    assert g.train.batch_size * g.train.steps == 16384 * 200_000  # the same number of samples seen
    assert recipe("pacl_b16").loss.lambda_g == 0.0
    s = recipe("siglip_b16")
    assert s.loss.init_bias == -10.0 and s.model.init_temperature == 0.1


def test_b32_and_l14_differ_from_b16_only_in_the_vision_tower_and_steps():
    base = recipe("sparc_b16")
    assert differing_keys(base, recipe("sparc_b32")) == {"name", "description", "model.vision.patch_size"}
    l14 = recipe("sparc_l14")
    assert differing_keys(base, l14) == {
        "name",
        "description",
        "model.vision.patch_size",
        "model.vision.width",
        "model.vision.depth",
        "model.vision.heads",
        "train.steps",
    }
    v = l14.model.vision
    assert (v.patch_size, v.width, v.depth, v.heads, l14.train.steps) == (14, 1024, 24, 16, 250_000)


# ----------------------------------------------------------------------------------------------------------------
# smoke: every tiny recipe, shrunk further, trains on CPU and its loss falls

SHRINK = (
    "model.embed_dim=32",
    "model.vision.image_size=32",  # patch 8: 16 patches
    "model.vision.width=32",
    "model.vision.depth=1",
    "model.text.width=32",
    "model.text.depth=1",
    "train.batch_size=16",
    "train.steps=30",
    "train.log_every=5",
    "train.checkpoint_every=1000",
    "train.device=cpu",
    "optim.lr=2e-3",
    "optim.warmup_steps=3",
    "data.num_samples=256",
)


@pytest.fixture
def one_thread():
    """One intra-op thread: these models are tiny, and a second thread only contends with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.smoke
@pytest.mark.parametrize("name", TINY_RECIPES)
def test_smoke_tiny_recipe_trains(name: str, tmp_path: Path, one_thread):
    r = recipe(name, SHRINK)
    result = train(r, str(tmp_path), progress=False)
    losses = [row["loss"] for row in result.metrics]
    assert result.steps == 30
    assert [row["step"] for row in result.metrics] == [5, 10, 15, 20, 25, 30]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    resolved = sparc_kit.load_recipe(str(tmp_path / "recipe.yaml"))
    assert resolved.loss.name == r.loss.name
