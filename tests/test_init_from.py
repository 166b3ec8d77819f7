"""``model.init_from``: training starts from open_clip, timm or sparc-kit weights.

The references are open_clip's and timm's own models, built here with random weights (nothing is downloaded) and
saved to files the way their users save them; the sparc-kit model loads the file through ``model.init_from`` and
must give the same embeddings. Fine-tuning from a tiny open_clip file lowers the loss; bad files are one-line
errors and exit 2 from ``sparc train``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

import sparc_kit
from sparc_kit.errors import RecipeError
from sparc_kit.train import build_tokenizer, train
from sparc_kit.train.init_from import load_init_weights
from test_train import MICRO  # the micro sparc_tiny every training test uses

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

def clip_tokens(lengths: list[int], context: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-style ids: start token, words, end-of-text (the largest id: open_clip pools at the argmax), padding 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = vocab - 2
        ids[row, 1 : n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=g)
        ids[row, n - 1] = vocab - 1
    return ids, ids != 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny or run at batch 2: on a shared 2-core machine one thread was measured 30x faster
    than two for the fine-tuning steps (0.9 s against 35 s for 20 steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def load(recipe, model=None):
    model = model or sparc_kit.build_model(recipe)
    lines: list[str] = []
    fitted = load_init_weights(model, recipe, echo=lines.append)
    return model.eval(), fitted, lines


# --------------------------------------------------------------------------------------------- open_clip parity


def test_open_clip_vit_b16_gives_open_clips_embeddings(tmp_path):
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    file = tmp_path / "ViT-B-16.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, file)
    recipe = sparc_kit.load_recipe("sparc_b16_from_openclip", [f"model.init_from.path={file}"])
    model, fitted, lines = load(recipe)
    assert fitted.unmapped == [] and fitted.unset == [] and fitted.kept == []
    assert lines == [f"init_from: loaded {len(model.state_dict())} tensors from {file} (open_clip, strict=true)"]

    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    captions = ["a photo of a dog!", "two cats on a sofa, one asleep and one looking at the camera"]
    ids, mask = build_tokenizer(recipe)(captions)  # tokenizer.kind open_clip: CLIP's BPE
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-16")(captions))
    assert torch.equal(sparc_kit.get_tokenizer("sparc_b16_from_openclip")(captions), ids)
    with torch.no_grad():
        image_diff = max_diff(model.encode_image(images), reference.encode_image(images, normalize=True))
        text_diff = max_diff(model.encode_text(ids, mask), reference.encode_text(ids, normalize=True))
        scale_diff = abs(model.logit_scale.item() - reference.logit_scale.exp().item())
    assert image_diff < 1e-5 and text_diff < 1e-5, (image_diff, text_diff)
    assert scale_diff < 1e-4


def tiny_open_clip(quick_gelu: bool = False, seed: int = 0, vocab: int = 256):
    """A tiny open_clip CLIP (32 px, patch 8, two blocks per tower, 256-word vocabulary), random weights."""
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={"context_length": 16, "vocab_size": vocab, "width": 64, "heads": 2, "layers": 2},
        quick_gelu=quick_gelu,
    ).eval()


def tiny_recipe(file, *extra: str):
    return sparc_kit.load_recipe("sparc_tiny_from_openclip", [f"model.init_from.path={file}", *extra])


def reference_grid(pos: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip positions [1 + g*g, W] to [1 + size*size, W]: the class position kept, the grid resampled
    bicubically, written here apart from the library's code."""
    cls, grid = pos[:1], pos[1:]
    g = int(math.sqrt(grid.shape[0]))
    image = grid.T.reshape(1, -1, g, g)
    image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
    return torch.cat([cls, image.reshape(-1, size * size).T], dim=0)


def test_another_image_size_resamples_the_grid_as_open_clip_would_run_it(tmp_path):
    """A 48 px recipe (6 x 6 patches) on a 32 px file (4 x 4): the same as open_clip run at 48 px with its
    positions resampled by the reference above; the QuickGELU of OpenAI-style weights is expressed too."""
    reference = tiny_open_clip(quick_gelu=True)
    file = tmp_path / "tiny.safetensors"
    save_file(reference.state_dict(), str(file))
    acts = ["model.vision.act=quick_gelu", "model.text.act=quick_gelu"]
    model, fitted, lines = load(tiny_recipe(file, *acts, "model.vision.image_size=48"))
    assert fitted.resampled == {"vision.pos_embed": "patch grid 4x4 -> 6x6 (bicubic)"}
    assert "init_from: vision.pos_embed resampled: patch grid 4x4 -> 6x6 (bicubic)" in lines
    with torch.no_grad():
        reference.visual.positional_embedding = torch.nn.Parameter(
            reference_grid(reference.visual.positional_embedding, 6)
        )
        images = torch.randn(3, 3, 48, 48)
        diff = max_diff(model.encode_image(images), reference.encode_image(images, normalize=True))
        ids, mask = clip_tokens([16, 4, 7], 16, 256)
        text_diff = max_diff(model.encode_text(ids, mask), reference.encode_text(ids, normalize=True))
    assert diff < 1e-5 and text_diff < 1e-5, (diff, text_diff)


def test_a_shorter_context_keeps_the_first_positions(tmp_path):
    reference = tiny_open_clip()
    file = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), file)
    model, fitted, _ = load(tiny_recipe(file, "tokenizer.context_length=8"))
    assert fitted.resampled == {"text.pos_embed": "context 16 -> 8 (first 8 kept)"}
    assert torch.equal(model.text.pos_embed[0], reference.positional_embedding[:8])
    ids, mask = clip_tokens([6, 8], 8, 256)
    padded = F.pad(ids, (0, 8))  # open_clip at its own 16 positions; causal, so the padding changes nothing
    with torch.no_grad():
        diff = max_diff(model.encode_text(ids, mask), reference.encode_text(padded, normalize=True))
    assert diff < 1e-5


# ----------------------------------------------------------------------------------------------------------- timm


def test_timm_vit_weights_give_timms_patch_features(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    file = tmp_path / "vit_tiny.safetensors"
    save_file(reference.state_dict(), str(file))
    vit = (
        "model.vision={name: vit, image_size: 224, patch_size: 16, width: 192, depth: 12, heads: 3, "
        "class_token: true, norm_eps: 1.0e-6}"
    )
    recipe = sparc_kit.load_recipe("sparc_tiny", [vit, f"model.init_from={{format: timm, path: {file}}}"])
    model, fitted, lines = load(recipe)
    assert fitted.unmapped == [] and fitted.unset == []  # the classification head is set aside
    assert all(name.startswith(("text", "vision_adapter", "image_global_head", "log_logit")) for name in fitted.kept)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(images)
        feats = model.vision.forward_features(images)
    assert max_diff(feats["patch_tokens"], expected[:, 1:]) < 1e-5
    assert max_diff(feats["cls_token"], expected[:, 0]) < 1e-5

    # the timm vision encoder: timm's own names
    timm_recipe = sparc_kit.load_recipe(
        "sparc_tiny",
        ["model.vision={name: timm, model_name: vit_tiny_patch16_224}", f"model.init_from={{format: timm, path: {file}}}"],
    )
    wrapped, fitted, _ = load(timm_recipe)
    assert fitted.unmapped == [] and fitted.unset == []
    with torch.no_grad():
        assert max_diff(wrapped.vision.forward_features(images)["patch_tokens"], expected[:, 1:]) < 1e-5


# ------------------------------------------------------------------------------------------ training from weights


def test_fine_tuning_from_a_tiny_open_clip_file_lowers_the_loss_and_resumes_without_it(tmp_path):
    file = tmp_path / "tiny_open_clip.pt"
    torch.save(tiny_open_clip().state_dict(), file)
    out = str(tmp_path / "run")
    recipe = tiny_recipe(file, "train.steps=50", "train.log_every=10", "train.checkpoint_every=25")
    result = train(recipe, out, progress=False)
    losses = [row["loss"] for row in result.metrics]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0], losses

    # a resumed run loads its own checkpoint: the file is not read again, and may have moved
    file.rename(tmp_path / "moved.pt")
    (tmp_path / "moved.pt").write_bytes(b"not weights")  # it would be refused, were it read
    longer = tiny_recipe(tmp_path / "moved.pt", "train.steps=52", "train.log_every=10", "train.checkpoint_every=25")
    assert train(longer, out, progress=False).resumed_from == 50


def test_the_first_step_starts_from_the_files_weights(tmp_path):
    reference = tiny_open_clip(seed=3)
    file = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), file)
    seen = {}

    def first(step, values):
        seen.setdefault("step", step)

    recipe = tiny_recipe(file, "train.steps=1", "optim.lr=1e-12", "optim.warmup_steps=0")
    train(recipe, str(tmp_path / "run"), progress=False, callback=first)
    loaded = sparc_kit.load_pretrained(str(tmp_path / "run")).model
    assert max_diff(loaded.vision.cls_token.flatten(), reference.visual.class_embedding) < 1e-6
    assert max_diff(loaded.text_adapter.weight, reference.text_projection.T) < 1e-6


def test_clips_tokenizer_trains_and_comes_back_with_the_run(tmp_path):
    """tokenizer.kind open_clip: CLIP's BPE ids (open_clip's own tokenizer at the recipe's 16 positions), the
    run folder's tokenizer.model reads back as it, and the text tower pools at CLIP's end-of-text token."""
    reference = tiny_open_clip(vocab=49408)
    file = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), file)
    clip = ["tokenizer.kind=open_clip", "tokenizer.vocab_size=49408", "train.steps=2", "optim.lr=1e-12"]
    recipe = tiny_recipe(file, *clip)
    train(recipe, str(tmp_path / "run"), progress=False)
    model, tokenizer, _ = sparc_kit.load_pretrained(str(tmp_path / "run"))
    captions = ["a red circle above a blue square", "! " * 30]
    ids, mask = tokenizer(captions)
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-16")(captions, context_length=16))
    assert mask.sum(1).tolist() == [9, 16]  # up to the end token (the second caption is cut at 16)
    with torch.no_grad():  # the learning rate was negligible: still the file's model
        diff = max_diff(model.encode_text(ids, mask), reference.encode_text(ids, normalize=True))
    assert diff < 1e-4


def test_a_sparc_run_is_a_starting_point(tmp_path):
    file = tmp_path / "tiny.pt"
    torch.save(tiny_open_clip().state_dict(), file)
    first = str(tmp_path / "first")
    train(tiny_recipe(file, "train.steps=2"), first, progress=False)
    trained = sparc_kit.load_pretrained(first).model
    recipe = sparc_kit.load_recipe(
        "sparc_tiny_from_openclip", [f"model.init_from={{format: sparc, path: {first}}}", "model.vision.image_size=48"]
    )
    model, fitted, _ = load(recipe)
    assert fitted.unmapped == [] and fitted.unset == [] and list(fitted.resampled) == ["vision.pos_embed"]
    assert torch.equal(model.text.token_embed.weight, trained.text.token_embed.weight)


# --------------------------------------------------------------------------------------------------- bad input


def test_strict_refuses_unmapped_tensors_and_lenient_logs_each(tmp_path):
    state = tiny_open_clip().state_dict()
    state["visual.extra_head.weight"] = torch.zeros(3)
    file = tmp_path / "extra.pt"
    torch.save(state, file)
    with pytest.raises(RecipeError) as info:
        load(tiny_recipe(file))
    assert info.value.problems == [
        f"model.init_from: 1 tensor of {file} with no place in the model: visual.extra_head.weight (is the format "
        "right? model.init_from.strict=false loads the rest)"
    ]
    _, fitted, lines = load(tiny_recipe(file, "model.init_from.strict=false"))
    assert fitted.unmapped == ["visual.extra_head.weight"]
    assert f"init_from: visual.extra_head.weight [3] of {file} maps to nothing in the model: not loaded" in lines

    # a model with a patch bias the file does not have: a tensor the file leaves unset
    with pytest.raises(RecipeError, match=r"holds no value for 1 tensor of the model: vision.patch_embed.bias"):
        load(tiny_recipe(tmp_path / "extra.pt", "model.vision.patch_bias=true", "model.init_from.strict=true"))


def sparc_train(args: list[str]):
    from sparc_cli.main import app

    return CliRunner().invoke(app, ["train", *args])


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny_open_clip().state_dict(), file)
    return file


@pytest.mark.parametrize(
    "case, overrides, expected",
    [
        ("missing", ["model.init_from.path={missing}"], "error: model.init_from.path: {missing}: no such file or folder"),
        (
            "timm file as open_clip",
            ["model.init_from.path={timm}"],
            "error: model.init_from.format: open_clip, but {timm} looks like a timm state dict (e.g. cls_token, "
            "pos_embed, patch_embed.proj.weight); set model.init_from.format=timm",
        ),
        (
            "another width",
            ["model.init_from.path={tiny}", "model.vision.width=96", "model.vision.heads=3"],
            "error: model.init_from: visual.class_embedding [1, 1, 64] in {tiny} does not fit vision.cls_token "
            "[1, 1, 96] of the model (and 31 more tensors); make the recipe's sizes (width, mlp_ratio, patch_size, embed_dim, "
            "tokenizer.vocab_size) those of the file",
        ),
        ("not weights", ["model.init_from.path={text}"], "error: model.init_from.path: {text}: not a weights-only file"),
    ],
    ids=["missing", "wrong format", "another width", "not weights"],
)
def test_bad_init_from_is_one_line_and_exit_2(tmp_path, tiny_file, case, overrides, expected):
    files = {"missing": tmp_path / "nope.pt", "tiny": tiny_file, "timm": tmp_path / "vit.pt", "text": tmp_path / "a.pt"}
    if case.startswith("timm"):
        torch.manual_seed(0)
        torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).state_dict(), files["timm"])
    files["text"].write_text("not a torch file")
    args = ["sparc_tiny_from_openclip", "--out", str(tmp_path / "run"), "--quiet", "--set", "train.steps=1"]
    for item in overrides:
        args += ["--set", item.format(**files)]
    result = sparc_train(args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(expected.format(**files)), result.output
    assert "Traceback" not in result.output


def test_a_run_folder_written_before_the_new_model_options_resumes(tmp_path, tiny_file):
    """A recipe.yaml without the fields added since (pre_norm, act, norm_eps, init_from...) reads with their
    defaults, so the resume is not refused as another model; and the weights file may have moved."""
    import yaml

    out = tmp_path / "run"
    train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=2"]), str(out), progress=False)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    for field in ("pre_norm", "patch_bias", "act", "norm_eps"):
        del saved["model"]["vision"][field]
    del saved["model"]["init_from"]
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved))
    assert train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=3"]), str(out), progress=False).steps == 3


@pytest.mark.slow
def test_a_two_process_ddp_run_starts_from_the_file_as_one_process_does(tmp_path, tiny_file):
    """Every process loads the file before DDP wraps the model: two processes end where one process ends, and
    rank 0 alone reports what was loaded."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from sparc_kit.train import latest_checkpoint

    sets = [f"model.init_from.path={tiny_file}", "train.steps=3", "train.batch_size=8", "data.num_samples=64"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "sparc_cli", "train", "sparc_tiny_from_openclip", "--nproc", "2", "--quiet",
           "--out", str(tmp_path / "ddp"), "--set", "engine.name=ddp", *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (done.stdout + done.stderr).count("init_from: loaded 62 tensors") == 1
    train(tiny_recipe(tiny_file, *sets[1:]), str(tmp_path / "one"), progress=False)

    def final(run):
        return load_file(os.path.join(latest_checkpoint(str(tmp_path / run / "checkpoints")), "model.safetensors"))

    two, one = final("ddp"), final("one")
    assert max(max_diff(two[k], one[k]) for k in one) < 1e-5


def test_the_papers_mean_pooled_tower_loads_clip_without_its_class_token(tmp_path, tiny_file):
    """class_token false: the class token has no place (strict refuses; lenient reports it) and its position is
    dropped, the patch positions kept as they are."""
    mean = ["model.vision.class_token=false", "model.image_pooler.name=mean"]
    with pytest.raises(RecipeError, match=r"1 tensor of .* with no place in the model: visual.class_embedding"):
        load(tiny_recipe(tiny_file, *mean))
    model, fitted, lines = load(tiny_recipe(tiny_file, *mean, "model.init_from.strict=false"))
    assert fitted.unmapped == ["visual.class_embedding"]
    assert "init_from: vision.pos_embed resampled: class-token position dropped (the model has no class token)" in lines
    positions = torch.load(tiny_file, weights_only=True)["visual.positional_embedding"]
    assert torch.equal(model.vision.pos_embed[0], positions[1:])
