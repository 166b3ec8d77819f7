"""The ``sparc`` command: bad input exits 2 with one line per problem and no traceback; recipes, components.

Run in-process with typer's CliRunner (click >= 8.2 keeps stderr apart: ``result.stdout`` / ``result.stderr``),
plus one real subprocess for the exit status. ``sparc train`` is only run with ``--print-config`` or with a recipe
that fails validation here: the training run itself is tested elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sparc_cli.main import app
from sparc_kit.config import dump_recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

BUILTINS = "Built-in recipes: " + ", ".join(
    sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
)


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    return invoke


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_bad_input(result, lines: list[str]) -> None:
    """Exit 2, nothing on stdout, exactly ``lines`` on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == lines
    # typer.Exit(2), not an uncaught exception
    assert isinstance(result.exception, SystemExit)


# ----------------------------------------------------------------------------------------------------------------
# bad recipes: one line per problem, exit 2


def test_unknown_key_line(cli, in_tmp):
    (in_tmp / "bad.yaml").write_text("extends: sparc_tiny\ntrain:\n  stpes: 5\n")
    assert_bad_input(
        cli("train", "bad.yaml"),
        [
            "error: bad.yaml: train.stpes: unknown key (value 5). Did you mean 'steps'? Accepted keys: steps, "
            "batch_size, accum_steps, seed, precision, device, num_workers, log_every, checkpoint_every, keep_checkpoints, max_skip_fraction, pad_to, compile, loggers, probe."
        ],
    )
    assert not (in_tmp / "runs").exists()


def test_wrong_type_line(cli, in_tmp):
    (in_tmp / "bad.yaml").write_text("extends: sparc_tiny\ntrain:\n  steps: many\n")
    assert_bad_input(
        cli("train", "bad.yaml"),
        [
            "error: bad.yaml: train.steps: got 'many'; input should be a valid integer, unable to parse string as an "
            "integer"
        ],
    )


def test_unknown_component_line(cli, in_tmp):
    (in_tmp / "bad.yaml").write_text("extends: sparc_tiny\nloss:\n  name: spark\n")
    assert_bad_input(
        cli("train", "bad.yaml"),
        ["error: bad.yaml: loss.name: unknown loss 'spark'. Did you mean 'sparc'? Known: clip, filip, gloria, mgca, pacl, siglip, sparc"],
    )


def test_out_of_range_line(cli, in_tmp):
    (in_tmp / "bad.yaml").write_text("extends: sparc_tiny\ntrain:\n  batch_size: 0\n")
    assert_bad_input(
        cli("train", "bad.yaml"), ["error: bad.yaml: train.batch_size: got 0; input should be greater than 0"]
    )


def test_invalid_literal_line(cli, in_tmp):
    (in_tmp / "bad.yaml").write_text("extends: sparc_tiny\nloss:\n  average: tokens\n")
    assert_bad_input(
        cli("train", "bad.yaml"), ["error: bad.yaml: loss.average: got 'tokens'; input should be 'token' or 'caption'"]
    )


def test_several_problems_each_on_its_own_line(cli, in_tmp):
    (in_tmp / "bad.yaml").write_text(
        "extends: sparc_tiny\n"
        "train:\n  steps: many\n  batch_size: 0\n  stpes: 5\n"
        "loss:\n  average: tokens\n"
        "model:\n  vision:\n    widht: 3\n"
    )
    assert_bad_input(
        cli("train", "bad.yaml"),
        [
            "error: bad.yaml: model.vision.widht: unknown key (value 3). Did you mean 'width'? Accepted keys: "
            "image_size, patch_size, width, depth, heads, mlp_ratio, in_channels, class_token, pre_norm, patch_bias, act, norm_eps.",
            "error: bad.yaml: loss.average: got 'tokens'; input should be 'token' or 'caption'",
            "error: bad.yaml: train.steps: got 'many'; input should be a valid integer, unable to parse string as an "
            "integer",
            "error: bad.yaml: train.batch_size: got 0; input should be greater than 0",
            "error: bad.yaml: train.stpes: unknown key (value 5). Did you mean 'steps'? Accepted keys: steps, "
            "batch_size, accum_steps, seed, precision, device, num_workers, log_every, checkpoint_every, keep_checkpoints, max_skip_fraction, pad_to, compile, loggers, probe.",
        ],
    )


def test_bad_override_value_line(cli, in_tmp):
    assert_bad_input(
        cli("train", "sparc_tiny", "--set", "train.steps=many", "--set", "loss.lambda_f=2"),
        [
            "error: sparc_tiny: train.steps: got 'many'; input should be a valid integer, unable to parse string as an "
            "integer"
        ],
    )


def test_yaml_syntax_error_line(cli, in_tmp):
    (in_tmp / "bad.yaml").write_text("train:\n  steps: 5\n    batch_size: 3\n")
    assert_bad_input(
        cli("train", "bad.yaml"),
        ["error: recipe bad.yaml: line 3, column 15: not valid YAML (mapping values are not allowed here)"],
    )


def test_missing_file_line_mentions_builtins(cli, in_tmp):
    assert_bad_input(cli("train", "missing.yaml"), [f"error: recipe: file not found: missing.yaml. {BUILTINS}"])
    assert_bad_input(
        cli("train", "sparc_tiny.yml"),
        [f"error: recipe: file not found: sparc_tiny.yml. Did you mean the built-in 'sparc_tiny'? {BUILTINS}"],
    )


def test_set_without_equals_line(cli, in_tmp):
    assert_bad_input(
        cli("train", "sparc_tiny", "--set", "train.steps"),
        ["error: --set train.steps: expected KEY=VALUE, e.g. train.steps=100"],
    )
    assert not (in_tmp / "runs").exists()


def test_bad_recipe_in_recipes_show(cli, in_tmp):
    assert_bad_input(
        cli("recipes", "show", "sparc_tiny", "--set", "loss.name=spark"),
        ["error: sparc_tiny: loss.name: unknown loss 'spark'. Did you mean 'sparc'? Known: clip, filip, gloria, mgca, pacl, siglip, sparc"],
    )


def test_real_process_exit_status_and_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("extends: sparc_tiny\ntrain:\n  steps: many\n  batch_size: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sparc_cli.main", "train", "bad.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: bad.yaml: train.steps: got 'many'; input should be a valid integer, unable to parse string as an "
        "integer",
        "error: bad.yaml: train.batch_size: got 0; input should be greater than 0",
    ]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------
# recipes validate / list / show / cp, train --print-config


def test_recipes_validate_real_files(cli):
    files = sorted(str(p) for p in RECIPES.glob("*.yaml"))
    assert {"clip_tiny.yaml", "sparc_tiny.yaml", "sparc_b16.yaml"} <= {Path(f).name for f in files}
    result = cli("recipes", "validate", *files)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"ok: {f}" for f in files]
    assert result.stderr == ""


def test_recipes_validate_names_only_the_bad_file(cli, in_tmp):
    (in_tmp / "bad.yaml").write_text("extends: sparc_tiny\noptim:\n  lr: 0\n")
    good = sorted(str(p) for p in RECIPES.glob("*.yaml"))
    result = cli("recipes", "validate", good[0], "bad.yaml", good[1])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stdout.splitlines() == [f"ok: {good[0]}", f"ok: {good[1]}"]
    assert result.stderr.splitlines() == ["error: bad.yaml: optim.lr: got 0; input should be greater than 0"]


def test_recipes_validate_with_set(cli):
    result = cli("recipes", "validate", "sparc_tiny", "clip_tiny", "--set", "train.steps=0")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: sparc_tiny: train.steps: got 0; input should be greater than 0",
        "error: clip_tiny: train.steps: got 0; input should be greater than 0",
    ]


def test_recipes_list(cli):
    result = cli("recipes", "list")
    assert result.exit_code == 0
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert result.stdout.splitlines() == [f"{name:<16} {load_recipe(name).description}" for name in names]
    assert "sparc_tiny       SPARC on synthetic shapes; tiny ViT and text Transformer for CPU." in result.stdout.splitlines()


def test_recipes_show_with_override(cli):
    result = cli("recipes", "show", "sparc_tiny", "--set", "train.steps=3")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["train"]["steps"] == 3
    assert data["train"]["batch_size"] == 64
    assert result.stdout == dump_recipe(load_recipe("sparc_tiny", ["train.steps=3"]))


def test_recipes_show_clip_tiny_is_resolved(cli):
    result = cli("recipes", "show", "clip_tiny")
    assert result.exit_code == 0
    data = yaml.safe_load(result.stdout)
    assert "extends" not in data
    assert data["loss"] == {"name": "clip", "local_loss": True}
    assert data["model"]["embed_dim"] == 64


def test_train_print_config_prints_resolved_yaml_and_creates_nothing(cli, in_tmp):
    result = cli("train", "sparc_tiny", "--print-config", "--set", "train.steps=5", "-s", "loss.lambda_f=2")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    data = yaml.safe_load(result.stdout)
    assert data["train"]["steps"] == 5
    assert data["loss"]["lambda_f"] == 2.0
    expected = load_recipe("sparc_tiny", ["train.steps=5", "loss.lambda_f=2"])
    assert load_recipe(data).model_dump() == expected.model_dump()
    assert list(in_tmp.iterdir()) == []  # no run folder, nothing else either


def test_recipes_cp_writes_a_loadable_copy_and_refuses_to_overwrite(cli, in_tmp):
    result = cli("recipes", "cp", "sparc_tiny", "mine.yaml")
    assert result.exit_code == 0, result.output
    assert result.stdout == "wrote mine.yaml\n"
    assert (in_tmp / "mine.yaml").read_text() == (RECIPES / "sparc_tiny.yaml").read_text()
    assert load_recipe("mine.yaml").model_dump() == load_recipe("sparc_tiny").model_dump()

    (in_tmp / "mine.yaml").write_text("edited\n")
    assert_bad_input(cli("recipes", "cp", "sparc_tiny", "mine.yaml"), ["error: mine.yaml exists; not overwriting it"])
    assert (in_tmp / "mine.yaml").read_text() == "edited\n"


def test_recipes_cp_into_a_folder_keeps_extends_working(cli, in_tmp):
    (in_tmp / "mine").mkdir()
    result = cli("recipes", "cp", "clip_tiny", "mine")
    assert result.exit_code == 0, result.output
    dest = Path("mine") / "clip_tiny.yaml"
    assert result.stdout == f"wrote {dest}\n"
    # its "extends: sparc_tiny.yaml" is not next to it: it falls back to the built-in
    assert load_recipe(str(dest)).model_dump() == load_recipe("clip_tiny").model_dump()
    assert_bad_input(cli("recipes", "cp", "clip_tiny", "mine"), [f"error: {dest} exists; not overwriting it"])


def test_recipes_cp_unknown_builtin(cli, in_tmp):
    assert_bad_input(
        cli("recipes", "cp", "spark_tiny", "x.yaml"),
        [f"error: recipe: file not found: spark_tiny. Did you mean the built-in 'sparc_tiny'? {BUILTINS}"],
    )
    assert list(in_tmp.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# components


def test_components_lists_every_kind_with_parameters_and_defaults(cli):
    result = cli("components")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    headers = [line.split(":")[0] for line in lines if line and not line.startswith(" ")]
    assert headers == [
        "vision_encoder", "text_encoder", "pooler", "loss", "dataset", "engine", "attention", "evaluator", "logger"
    ]
    assert "loss: training objectives: global, fine-grained and combined" in lines
    component_names = [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("    ")]
    assert component_names == [
        "timm", "vit",
        "transformer",
        "attention", "cls", "last", "max", "mean",
        "clip", "filip", "gloria", "mgca", "pacl", "siglip", "sparc",
        "manifest", "synthetic", "webdataset",
        "ddp", "deepspeed", "local",
        "auto", "math", "matmul", "sdpa", "xformers",
        "retrieval", "segmentation", "zeroshot",
        "jsonl", "tensorboard", "wandb",
    ]
    assert "      lambda_g: float = 0.5" in lines
    assert "      lambda_f: float = 1.0" in lines
    assert "      sparsity_threshold: float | None = None" in lines
    assert "      average: Literal['token', 'caption'] = 'token'" in lines
    assert "      patch_size: int > 0 = 16" in lines
    assert "      num_samples: int = 10000" in lines
    # the internal arguments of vit (attention, grad_checkpointing) are not listed
    vit = lines[lines.index(next(line for line in lines if line.startswith("  vit "))) + 1 :]
    vit = vit[: next(i for i, line in enumerate(vit) if not line.startswith("      "))]
    assert [line.split(":")[0].strip() for line in vit] == [
        "image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "in_channels", "class_token",
        "pre_norm", "patch_bias", "act", "norm_eps",
    ]


def test_components_one_kind(cli):
    result = cli("components", "loss")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "loss: training objectives: global, fine-grained and combined"
    assert [line for line in lines if line and not line.startswith(" ")] == [lines[0]]
    assert [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("    ")] == [
        "clip", "filip", "gloria", "mgca", "pacl", "siglip", "sparc",
    ]
    assert lines[1].startswith("  clip  CLIP's symmetric InfoNCE")
    assert lines[2] == "      local_loss: bool = True"
    assert "      lambda_g: float = 0.5" in lines
    assert "vit" not in result.stdout
    # the plural is accepted too
    assert cli("components", "losses").stdout == result.stdout


def test_components_shows_a_newly_registered_component_and_marks_required_parameters(cli):
    from sparc_kit.registry import losses

    def needs_margin(margin: float, scale: int = 3):
        """A loss that exists only in this test."""

    assert "margin_test" not in losses
    losses.register("margin_test")(needs_margin)
    try:
        lines = cli("components", "loss").stdout.splitlines()
    finally:  # there is no unregister API
        losses._entries.pop("margin_test", None)
        losses.version += 1
    start = lines.index("  margin_test  A loss that exists only in this test.")
    assert lines[start + 1 : start + 3] == ["      margin: float (required)", "      scale: int = 3"]


def test_components_unknown_kind(cli):
    known = "vision_encoder, text_encoder, pooler, loss, dataset, engine, attention, evaluator, logger"
    assert_bad_input(cli("components", "nonsense"), [f"error: unknown component kind 'nonsense'. Known: {known}"])
    assert_bad_input(
        cli("components", "los"), [f"error: unknown component kind 'los'. Did you mean 'loss'? Known: {known}"]
    )


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_smoke_help(cli):
    for args in (("--help",), ("train", "--help"), ("recipes", "--help"), ("components", "--help")):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_on_a_device_that_is_not_there_is_one_line_and_exit_2(cli, tmp_path):
    result = cli("eval", str(tmp_path), "--device", "cuda")
    assert_bad_input(result, ["error: --device is 'cuda' but CUDA is not available here (use 'auto' or 'cpu')"])
    assert_bad_input(cli("eval", str(tmp_path), "--device", "gpu0"),
                     ["error: --device: 'gpu0' is not a device (cpu, cuda, cuda:1, ... or auto)"])
