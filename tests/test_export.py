"""``sparc export``: safetensors folders that load_pretrained rebuilds exactly, ONNX and TorchScript towers that match
PyTorch, and refusals (a bad path, an unfinished run, an unknown format, a pickle) that write nothing."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import sparc_kit
import sparc_kit.export as export_module
from sparc_cli.main import app
from sparc_kit.export import ExportError, ExportMismatchError, ImageTower, TextTower, export
from sparc_kit.train import train
from test_train import MICRO

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

CAPTIONS = ["a red circle", "a small blue square at the top", "two green triangles", "a yellow star", "a cross"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("exportrun") / "run")
    train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, "train.steps=2", "data.num_samples=16"]), out, progress=False)
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export(run, fmt, root / fmt) for fmt in export_module.FORMATS}


@pytest.fixture(scope="module")
def reference(run):
    return sparc_kit.load_pretrained(run)


def inputs(pretrained, batch: int):
    size = pretrained.transform.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(100 + batch))
    ids, mask = pretrained.tokenizer(CAPTIONS[:batch])
    return images, ids, mask


def expected(model, images, ids, mask) -> list[torch.Tensor]:
    with torch.no_grad():
        return [*ImageTower(model)(images), *TextTower(model)(ids, mask)]


def worst(got, want) -> float:
    got = torch.as_tensor(got)
    assert got.shape == want.shape
    return (got.double() - want.double()).abs().max().item()


def test_safetensors_export_loads_back_exactly(exported, reference):
    result = exported["safetensors"]
    assert result.files == ["config.json", "model.safetensors", "recipe.yaml", "tokenizer.model"]
    assert result.step == 2 and result.max_abs_diff == {}
    loaded = sparc_kit.load_pretrained(result.out)
    assert loaded.step == 2 and loaded.run_dir == result.out
    assert sparc_kit.dump_recipe(loaded.recipe) == sparc_kit.dump_recipe(reference.recipe)
    assert loaded.transform.image_size == reference.transform.image_size
    images, ids, mask = inputs(reference, 3)
    assert all(torch.equal(a, b) for a, b in zip(loaded.tokenizer(CAPTIONS), reference.tokenizer(CAPTIONS)))
    with torch.no_grad():
        got, want = loaded.model(images, ids, mask), reference.model(images, ids, mask)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_onnx_towers_match_pytorch_at_two_batch_sizes(exported, reference):
    import onnxruntime as ort

    result = exported["onnx"]
    assert {"image_encoder.onnx", "text_encoder.onnx", "model.safetensors", "tokenizer.model"} <= set(result.files)
    assert set(result.max_abs_diff) == {"image_embeds", "patch_embeds", "text_embeds", "token_embeds", "token_mask"}
    assert max(result.max_abs_diff.values()) <= 1e-4
    image = ort.InferenceSession(os.path.join(result.out, "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(os.path.join(result.out, "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in text.get_outputs()] == ["text_embeds", "token_embeds", "token_mask_out"]
    for batch in (1, 5):
        images, ids, mask = inputs(reference, batch)
        want = expected(reference.model, images, ids, mask)
        got = [
            *image.run(None, {"images": images.numpy()}),
            *text.run(None, {"token_ids": ids.numpy(), "token_mask": mask.numpy()}),
        ]
        assert len(got) == 5
        for g, w in zip(got, want):
            assert worst(g, w) <= 1e-4
        assert got[4].dtype == bool and (got[4] == want[4].numpy()).all()


def test_torchscript_towers_match_pytorch(exported, reference):
    result = exported["torchscript"]
    assert max(result.max_abs_diff.values()) <= 1e-5
    image = torch.jit.load(os.path.join(result.out, "image_encoder.pt"))
    text = torch.jit.load(os.path.join(result.out, "text_encoder.pt"))
    for batch in (1, 4):
        images, ids, mask = inputs(reference, batch)
        with torch.no_grad():
            got = [*image(images), *text(ids, mask)]
        for g, w in zip(got, expected(reference.model, images, ids, mask)):
            assert worst(g, w) <= 1e-5


def test_an_export_folder_exports_again(exported, tmp_path):
    again = export(exported["torchscript"].out, "safetensors", tmp_path / "again")
    assert again.step == 2
    a = sparc_kit.load_pretrained(again.out).model.state_dict()
    b = sparc_kit.load_pretrained(exported["safetensors"].out).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Planted:
    """A pickle that writes a marker file when it is unpickled."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def plant(path: Path, marker: Path) -> None:
    evil = Planted()
    evil.marker = str(marker)
    Planted.marker = str(marker)
    torch.save({"weights": evil}, path)


def test_a_pickle_is_refused_unrun(run, exported, tmp_path):
    marker = tmp_path / "marker"
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(os.path.join(run, "checkpoints", "step_00000002"), checkpoint)
    plant(checkpoint / "model.safetensors", marker)  # a torch pickle under the safetensors name
    folder = tmp_path / "folder"
    shutil.copytree(exported["safetensors"].out, folder)
    plant(folder / "extra.bin", marker)  # an export folder holding a pickle
    plant(tmp_path / "weights.pt", marker)  # a pickle as the target
    planted_run = tmp_path / "run"
    shutil.copytree(run, planted_run)
    plant(planted_run / "checkpoints" / "step_00000002" / "model.safetensors", marker)  # a run's newest checkpoint
    for target, message in (
        (checkpoint, "model.safetensors is not a safetensors file"),
        (planted_run, "model.safetensors is not a safetensors file"),
        (planted_run / "checkpoints", "model.safetensors is not a safetensors file"),
        (folder, "export folder holds a pickle (extra.bin)"),
        (tmp_path / "weights.pt", "a pickle file is never loaded"),
    ):
        out = tmp_path / "out"
        with pytest.raises(ExportError, match=re.escape(message)) as info:
            export(target, "safetensors", out)
        assert "\n" not in str(info.value)
        assert not out.exists() and not marker.exists()
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_refusals_are_one_line_exit_2_and_write_nothing(run, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text(Path(run, "recipe.yaml").read_text())
    half = unfinished / "checkpoints" / "step_00000002"
    shutil.copytree(os.path.join(run, "checkpoints", "step_00000002"), half)
    (half / "state.json").unlink()  # the checkpoint's last file was never written
    out = tmp_path / "out"
    for args, message in (
        ([str(tmp_path / "missing"), "-f", "onnx"], "no such run folder"),
        ([str(unfinished), "-f", "onnx"], "no complete checkpoint"),
        ([run, "--format", "tflite"], "--format 'tflite': unknown; choose one of safetensors, onnx, torchscript"),
    ):
        result = CliRunner().invoke(app, ["export", *args, "--out", str(out)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
        assert not out.exists()


def test_a_non_empty_out_is_refused_unless_force(run, exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export(run, "safetensors", out)
    assert os.listdir(out) == ["notes.txt"]
    result = CliRunner().invoke(app, ["export", run, "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == exported["safetensors"].files
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_an_export_over_the_tolerance_writes_nothing(run, tmp_path, monkeypatch):
    monkeypatch.setitem(export_module.TOLERANCE, "torchscript", -1.0)  # every difference, even 0, is too large
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", run, "-f", "torchscript", "--out", str(out)])
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and "differs from PyTorch by more than" in result.stderr
    assert not out.exists()
    with pytest.raises(ExportMismatchError):
        export(run, "torchscript", out)


def test_onnx_missing_names_the_extra(run, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    result = CliRunner().invoke(app, ["export", run, "-f", "onnx", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: --format onnx needs onnx and onnxruntime: pip install 'sparc-kit[onnx]'"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra")
def test_a_zero3_checkpoint_without_its_consolidated_weights_is_consolidated(tmp_path):
    run = tmp_path / "zero3"
    recipe = sparc_kit.load_recipe(
        "sparc_tiny", [*MICRO, "train.steps=2", "data.num_samples=16", "engine.name=deepspeed", "engine.zero_stage=3"]
    )
    train(recipe, str(run), progress=False)
    step = run / "checkpoints" / "step_00000002"
    saved = load_file(step / "model.safetensors")
    (step / "model.safetensors").unlink()  # the partitions alone
    for target in (run, step):
        result = export(target, "safetensors", tmp_path / f"out-{target.name}")
        assert result.step == 2
        weights = load_file(os.path.join(result.out, "model.safetensors"))
        assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    marker = tmp_path / "marker"
    states = next((step / "deepspeed").rglob("*model_states.pt"))
    plant(states, marker)
    with pytest.raises(ExportError, match="refused without running anything") as info:
        export(step, "safetensors", tmp_path / "out")
    assert "\n" not in str(info.value) and not marker.exists() and not (tmp_path / "out").exists()
