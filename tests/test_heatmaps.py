"""Alignment heat maps (``sparc_kit.evaluate.heatmaps``, ``sparc eval --task heatmaps``): the weights equal an
independent computation of SPARC's eqs. 2-4 from the model's own patch and token embeddings, sum to 1 per token,
come on the patch grid, only for the caption's real tokens; the PNGs decode to the expected sizes and are not blank;
the command writes them for a tiny trained run (SPARC and CLIP), and refuses bad input with one line and exit 2.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import sparc_kit
from sparc_kit.evaluate.heatmaps import SHEET, SUMMARY, alignment_maps, write_heatmaps
from sparc_kit.pretrained import load_pretrained
from sparc_kit.train import train

sys.path.insert(0, os.path.dirname(__file__))
from test_train import MICRO  # noqa: E402  (image 32, patch 8: a 4 x 4 grid)

CAPTION = "a red circle above a blue square"
GRID = 4


def picture() -> Image.Image:
    """A wide synthetic picture (80 x 64): the evaluation transform resizes and centre-crops it."""
    image = Image.new("RGB", (80, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((25, 2, 55, 30), fill="red")
    draw.rectangle((25, 34, 55, 62), fill="blue")
    return image


def make_run(root, name: str, *extra: str) -> str:
    out = str(root / name)
    train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=2", "data.num_samples=16", *extra]), out,
          progress=False)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    return make_run(tmp_path_factory.mktemp("heatmaps"), "sparc")


@pytest.fixture(scope="module")
def loaded(run):
    return load_pretrained(run)


@pytest.fixture(scope="module")
def maps(loaded):
    model, tokenizer, transform = loaded
    return alignment_maps(model, tokenizer, transform, picture(), CAPTION)


def reference_weights(similarity: torch.Tensor) -> torch.Tensor:
    """Eqs. 2-4 written out, for [L, P] similarities: min-max over the patches, zero below 1/P, divide by the sum."""
    patches = similarity.shape[-1]
    low = similarity.min(dim=-1, keepdim=True).values
    high = similarity.max(dim=-1, keepdim=True).values
    normalised = (similarity - low) / (high - low)
    kept = normalised * (normalised >= 1.0 / patches)
    return kept / kept.sum(dim=-1, keepdim=True)


def test_weights_equal_an_independent_computation_from_the_embeddings(loaded, maps):
    model, tokenizer, transform = loaded
    ids, mask = tokenizer([CAPTION])
    with torch.no_grad():
        out = model(transform(picture()).unsqueeze(0), ids, mask)
    real = out["token_mask"][0]
    tokens = out["token_embeds"][0][real].double()  # [L, E]
    patches = out["patch_embeds"][0].double()  # [P, E]
    similarity = tokens @ patches.T  # [L, P]
    assert patches.shape[0] == GRID * GRID
    assert maps.weights.shape == maps.similarity.shape == (int(real.sum()), GRID, GRID)  # the grid, not upsampled
    torch.testing.assert_close(maps.similarity.double().flatten(1), similarity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.weights.double().flatten(1), reference_weights(similarity), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps.weights.sum(dim=(1, 2)).double(), torch.ones(len(maps.pieces), dtype=torch.float64))
    assert maps.threshold == 1 / 16 and (maps.weights == 0).any()  # the threshold zeroes some patch
    # a patch is ranked as its similarity is: weight order follows similarity order (min-max is monotone)
    for w, s in zip(maps.weights.flatten(1), maps.similarity.flatten(1)):
        assert int(w.argmax()) == int(s.argmax())


class FixedEmbeddings(torch.nn.Module):
    """A dual encoder's interface with chosen embeddings: 2 x 2 patches, and one token row per caption position."""

    def __init__(self, patches: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor):
        super().__init__()
        self.patches, self.tokens, self.real = torch.nn.Parameter(patches), tokens, real
        self.vision = type("Vision", (), {"image_size": 32, "patch_size": 16})()

    def image_features(self, images):
        return {"patch_embeds": self.patches[None]}

    def text_features(self, token_ids, token_mask):
        return {"token_embeds": self.tokens[None], "token_mask": self.real[None]}


def test_the_threshold_is_one_over_p_on_chosen_embeddings(loaded):
    """Token A's similarities 0, 0.1, 1, 10 (min-max: 0, 0.01, 0.1, 1): the threshold 1/4 keeps only the best patch
    (no threshold would keep three). Token B's -1, 1, 1, 3 (0, 0.5, 0.5, 1): three kept, 0.25, 0.25, 0.5. The token
    between them is not a real one: it gets no map."""
    _, tokenizer, transform = loaded
    patches = torch.tensor([[0.0, -1.0], [0.1, 1.0], [1.0, 1.0], [10.0, 3.0]])  # [P=4, E=2]
    tokens = torch.zeros(tokenizer.context_length, 2)
    tokens[0], tokens[1], tokens[2] = torch.tensor([1.0, 0.0]), torch.tensor([5.0, 5.0]), torch.tensor([0.0, 1.0])
    real = torch.zeros(tokenizer.context_length, dtype=torch.bool)
    real[[0, 2]] = True
    maps = alignment_maps(FixedEmbeddings(patches, tokens, real), tokenizer, transform, picture(), "a cat")
    assert maps.positions == [0, 2] and maps.weights.shape == (2, 2, 2) and maps.threshold == 0.25
    torch.testing.assert_close(maps.similarity.flatten(1), torch.tensor([[0.0, 0.1, 1.0, 10.0], [-1.0, 1.0, 1.0, 3.0]]))
    torch.testing.assert_close(maps.weights.flatten(1), torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.25, 0.25, 0.5]]))


def test_only_the_captions_real_tokens_get_maps(loaded, maps):
    model, tokenizer, _ = loaded
    ids, mask = tokenizer([CAPTION])
    real = model.text_features(ids, mask)["token_mask"][0]
    assert int(mask.sum()) < tokenizer.context_length  # padding that must not appear
    assert maps.positions == torch.nonzero(real).flatten().tolist()
    assert maps.token_ids == ids[0, real].tolist()
    assert maps.pieces == [tokenizer.sp.id_to_piece(i) for i in maps.token_ids]
    assert "".join(maps.pieces).replace("\u2581", " ").strip() == CAPTION  # sparc_tiny excludes the end token


def test_written_pngs_have_the_expected_sizes_and_are_not_blank(maps, tmp_path):
    paths = write_heatmaps(maps, tmp_path / "out")
    tokens = len(maps.pieces)
    assert len(paths) == 2 * tokens + 2 and paths[-1].endswith(SUMMARY) and paths[-2].endswith(SHEET)
    for i in range(tokens):
        for kind in ("weights", "similarity"):
            path = tmp_path / "out" / f"token_{i:02d}_{kind}.png"
            with Image.open(path) as png:
                pixels = np.asarray(png.convert("RGB"), dtype=np.float64)
            assert pixels.shape == (224, 224, 3)  # 32 x 32 shown 7 times as large
            assert pixels.var() > 0
    with Image.open(tmp_path / "out" / SHEET) as sheet:
        assert sheet.size == (750, int(round((2.5 * tokens + 0.5) * 100)))  # 3 columns, one row per token
        assert np.asarray(sheet.convert("RGB"), dtype=np.float64).var() > 0
    summary = json.loads((tmp_path / "out" / SUMMARY).read_text())
    assert summary["pieces"] == maps.pieces and summary["grid"] == [GRID, GRID] and summary["threshold"] == 1 / 16
    for i, token in enumerate(summary["tokens"]):
        assert token["weight_sum"] == pytest.approx(1.0, abs=1e-5)
        assert token["files"] == {"weights": f"token_{i:02d}_weights.png", "similarity": f"token_{i:02d}_similarity.png"}
        best = token["top_patches"][0]
        assert best["weight"] == pytest.approx(float(maps.weights[i].max()))
        assert (best["row"], best["col"]) == divmod(int(maps.similarity[i].flatten().argmax()), GRID)
        assert len(token["top_patches"]) == 5


def test_a_custom_size_is_the_overlay_size(maps, tmp_path):
    write_heatmaps(maps, tmp_path, size=64)
    with Image.open(tmp_path / "token_00_weights.png") as png:
        assert png.size == (64, 64)


# ---------------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def eval_app():
    from sparc_cli.main import app  # the real `sparc` app: `sparc eval ...`

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["eval", *args])


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("img") / "shapes.png")
    picture().save(path)
    return path


def test_command_writes_the_maps_into_the_run_folder(eval_app, run, image_file):
    result = eval_app(run, "--task", "heatmaps", "--image", image_file, "--text", CAPTION)
    assert result.exit_code == 0, (result.output, result.exception)
    folder = os.path.join(os.path.abspath(run), "heatmaps", "shapes")
    assert f"wrote {os.path.join(folder, SHEET)}" in result.stdout
    summary = json.loads(open(os.path.join(folder, SUMMARY)).read())
    assert summary["text"] == CAPTION and summary["step"] == 2 and summary["image"] == image_file
    assert sorted(os.listdir(folder)) == sorted(
        [SHEET, SUMMARY] + [f"token_{i:02d}_{k}.png" for i in range(len(summary["pieces"])) for k in ("weights", "similarity")]
    )


def test_command_draws_a_clip_run_and_several_captions(eval_app, tmp_path, image_file):
    clip_run = make_run(tmp_path, "clip", "loss={name: clip}")
    out = tmp_path / "maps"
    result = eval_app(clip_run, "-t", "heatmaps", "--image", image_file, "--text", CAPTION, "--text", "a blue square",
                      "--out", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    for n, caption in ((1, CAPTION), (2, "a blue square")):
        summary = json.loads((out / f"text_{n}" / SUMMARY).read_text())
        assert summary["text"] == caption
        assert all(t["weight_sum"] == pytest.approx(1.0, abs=1e-5) for t in summary["tokens"])


@pytest.mark.parametrize(
    "args, line",
    [
        (["-t", "heatmaps"], "error: --task heatmaps needs --image PATH and --text CAPTION"),
        (["-t", "heatmaps", "--image", "{image}"], "error: --task heatmaps needs --image PATH and --text CAPTION"),
        (["-t", "heatmaps", "--text", "a cat"], "error: --task heatmaps needs --image PATH and --text CAPTION"),
        (
            ["-t", "heatmaps", "--image", "{tmp}/missing.png", "--text", "a cat"],
            "error: {tmp}/missing.png: cannot read the image (No such file or directory)",
        ),
        (
            ["-t", "heatmaps", "--image", "{tmp}/bad.png", "--text", "a cat"],
            "error: {tmp}/bad.png: cannot decode image: UnidentifiedImageError: cannot identify image file",
        ),
        (
            ["-t", "heatmaps", "--image", "{image}", "--text", "a cat", "-d", "x.jsonl"],
            "error: --task heatmaps takes no --data (it draws one --image with each --text)",
        ),
        (["--image", "{image}", "--text", "a cat"], "error: --image and --text are for --task heatmaps"),
        (["-t", "zeroshot", "--text", "a cat"], "error: --image and --text are for --task heatmaps"),
    ],
)
def test_command_refuses_bad_input_with_one_line(eval_app, run, image_file, tmp_path, args, line):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    fill = {"image": image_file, "tmp": str(tmp_path)}
    result = eval_app(run, *[a.format(**fill) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.splitlines() == [line.format(**fill)]
