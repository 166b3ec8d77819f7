"""Recipes (``sparc_kit.config``): overrides typed by the schema, ``extends:`` merging, problem lines, round trips.

Everything here goes through the library API (``load_recipe``, ``apply_overrides``, ``dump_recipe``); the same
behaviour seen through the ``sparc`` command is in ``test_cli.py``. No model is built and nothing is trained.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
import yaml

import sparc_kit

from sparc_kit.config import (
    RecipeError,
    apply_overrides,
    builtin_recipes,
    dump_recipe,
    load_recipe,
    parse_override,
    resolve_recipe_path,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SPARC_TINY = RECIPES / "sparc_tiny.yaml"
REPO_RECIPES = RECIPES
BUILTIN_LIST = "Built-in recipes: " + ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))


def problems_of(spec, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(spec, list(overrides))
    return info.value.problems


# ----------------------------------------------------------------------------------------------------------------
# built-in recipes


def test_builtin_recipes_are_the_repo_files():
    found = builtin_recipes()
    assert list(found) == sorted(p.stem for p in REPO_RECIPES.glob("*.yaml"))
    assert Path(found["sparc_tiny"]).read_text() == SPARC_TINY.read_text()
    assert Path(found["clip_tiny"]).read_text() == (RECIPES / "clip_tiny.yaml").read_text()


def test_sparc_tiny_values_as_written_and_defaults_filled():
    r = load_recipe("sparc_tiny")
    assert r.name == "sparc_tiny"
    assert r.model.embed_dim == 64
    assert r.model.vision.model_dump() == {
        "name": "vit",
        "image_size": 64,
        "patch_size": 8,
        "width": 128,
        "depth": 4,
        "heads": 4,
        "mlp_ratio": 4.0,  # default from ViT.__init__
        "in_channels": 3,
        "class_token": False,
        "pre_norm": False,  # the options that express CLIP's and timm's ViTs, off by default
        "patch_bias": True,
        "act": "gelu",
        "norm_eps": 1e-5,
    }
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
    assert r.tokenizer.vocab_size == 256 and r.tokenizer.context_length == 16
    assert r.tokenizer.model_type == "bpe"  # one token per word of the synthetic captions
    assert r.optim.lr == 1e-3 and r.optim.warmup_steps == 50 and r.optim.betas == (0.9, 0.98)
    assert r.train.steps == 600 and r.train.batch_size == 64 and r.train.checkpoint_every == 100
    assert r.train.keep_checkpoints == 2  # default
    assert r.engine.model_dump() == {"name": "local"}  # default_factory, section absent from the file
    assert r.model.image_pooler.model_dump() == {"name": "mean"}


def test_builtin_name_file_path_and_name_with_yaml_suffix_give_the_same_recipe():
    by_name = load_recipe("sparc_tiny").model_dump()
    assert load_recipe(str(SPARC_TINY)).model_dump() == by_name
    assert load_recipe("sparc_tiny.yaml").model_dump() == by_name


def test_clip_tiny_extends_sparc_tiny_and_replaces_the_loss_whole():
    sparc = load_recipe("sparc_tiny")
    clip = load_recipe("clip_tiny")
    assert clip.name == "clip_tiny"
    assert clip.description.startswith("CLIP on synthetic shapes")
    # the component name changed, so nothing of sparc's loss section survives
    assert clip.loss.model_dump() == {"name": "clip", "local_loss": True}
    assert not hasattr(clip.loss, "lambda_f")
    for section in ("model", "tokenizer", "data", "optim", "train", "engine"):
        assert getattr(clip, section).model_dump() == getattr(sparc, section).model_dump(), section


# ----------------------------------------------------------------------------------------------------------------
# --set overrides, typed by the schema


def test_override_int_to_float_field_gives_float():
    r = load_recipe("sparc_tiny", ["loss.lambda_f=5"])
    assert r.loss.lambda_f == 5.0
    assert type(r.loss.lambda_f) is float


def test_override_int_field():
    r = load_recipe("sparc_tiny", ["train.steps=7"])
    assert r.train.steps == 7
    assert type(r.train.steps) is int


def test_override_null_gives_none():
    r = load_recipe("sparc_tiny", ["loss.sparsity_threshold=0.25"])
    assert r.loss.sparsity_threshold == 0.25
    r = load_recipe("sparc_tiny", ["loss.sparsity_threshold=0.25", "loss.sparsity_threshold=null"])
    assert r.loss.sparsity_threshold is None


def test_override_1e_minus_3_string_is_coerced_to_float():
    # PyYAML (YAML 1.1) reads "1e-3" as a string; the schema's float must coerce it
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], "1e-3")
    r = load_recipe("sparc_tiny", ["optim.lr=1e-3"])
    assert r.optim.lr == 0.001
    assert type(r.optim.lr) is float
    assert load_recipe("sparc_tiny", ["optim.lr=2.5e-4"]).optim.lr == 0.00025


def test_override_bool_literal_and_list_values():
    r = load_recipe(
        "sparc_tiny",
        ["loss.diagnostics=false", "loss.average=caption", "optim.betas=[0.8, 0.9]", "train.precision=bf16"],
    )
    assert r.loss.diagnostics is False
    assert r.loss.average == "caption"
    assert r.optim.betas == (0.8, 0.9)
    assert r.train.precision == "bf16"


def test_later_override_wins():
    assert load_recipe("sparc_tiny", ["train.steps=7", "train.steps=9"]).train.steps == 9


def test_override_value_with_equals_sign_keeps_the_rest():
    assert parse_override("description=a=b") == (["description"], "a=b")
    assert load_recipe("sparc_tiny", ["description=a=b"]).description == "a=b"


def test_override_switches_component_and_drops_its_keys():
    r = load_recipe("sparc_tiny", ["loss.name=clip"])
    assert r.loss.model_dump() == {"name": "clip", "local_loss": True}
    assert not hasattr(r.loss, "lambda_f")
    assert type(r.loss).__name__ == "loss.clip"
    # keys for the new component given after the switch are kept
    r = load_recipe("sparc_tiny", ["loss.name=clip", "loss.local_loss=false"])
    assert r.loss.model_dump() == {"name": "clip", "local_loss": False}


def test_override_same_component_name_keeps_its_keys():
    r = load_recipe("sparc_tiny", ["loss.lambda_f=3", "loss.name=sparc"])
    assert r.loss.lambda_f == 3.0


def test_override_switch_back_and_forth_gives_defaults_of_new_component():
    r = load_recipe("clip_tiny", ["loss.name=sparc", "loss.lambda_g=0.25"])
    assert r.loss.model_dump() == {
        "name": "sparc",
        "lambda_g": 0.25,
        "lambda_f": 1.0,
        "sparsity_threshold": None,
        "average": "token",
        "weighting": "sparse",
        "global_loss": "clip",
        "local_loss": True,
        "diagnostics": True,
        "chunk_size": None,
    }


def test_apply_overrides_creates_nested_sections():
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    assert apply_overrides({"a": {"x": 2}}, ["a.b.c=1"]) == {"a": {"x": 2, "b": {"c": 1}}}
    assert apply_overrides({"a": None}, ["a.b=yes"]) == {"a": {"b": True}}


def test_apply_overrides_does_not_mutate_its_input():
    raw = {"train": {"steps": 1}}
    out = apply_overrides(raw, ["train.steps=2"])
    assert raw == {"train": {"steps": 1}}
    assert out == {"train": {"steps": 2}}


def test_override_creates_a_section_absent_from_the_file():
    # sparc_tiny.yaml has no engine / image_pooler section: --set creates them
    r = load_recipe("sparc_tiny", ["engine.name=local", "model.image_pooler.name=mean"])
    assert r.engine.model_dump() == {"name": "local"}
    raw = yaml.safe_load(SPARC_TINY.read_text())
    del raw["optim"]
    r = load_recipe(raw, ["optim.lr=0.01"])
    assert r.optim.lr == 0.01
    assert r.optim.warmup_steps == 2500  # the rest of the section is OptimConfig's defaults


def test_override_into_a_scalar_is_an_error():
    assert problems_of("sparc_tiny", ["train.steps.x=1"]) == [
        "--set train.steps.x=1: train.steps is 600, not a section with keys"
    ]


@pytest.mark.parametrize(
    "item, line",
    [
        ("train.steps", "--set train.steps: expected KEY=VALUE, e.g. train.steps=100"),
        ("=1", "--set =1: the key must be a dotted path such as loss.lambda_f"),
        ("train..steps=1", "--set train..steps=1: the key must be a dotted path such as loss.lambda_f"),
    ],
)
def test_malformed_override(item, line):
    assert problems_of("sparc_tiny", [item]) == [line]


def test_override_recipe_name_keeps_the_recipe():
    r = load_recipe("sparc_tiny", ["name=my_run"])
    assert r.name == "my_run"
    assert r.model.embed_dim == 64


# ----------------------------------------------------------------------------------------------------------------
# problem lines


def test_problems_unknown_key_with_did_you_mean_and_accepted_keys():
    assert problems_of("sparc_tiny", ["train.stpes=5"]) == [
        "train.stpes: unknown key (value 5). Did you mean 'steps'? Accepted keys: steps, batch_size, accum_steps, seed, "
        "precision, device, num_workers, log_every, checkpoint_every, keep_checkpoints, max_skip_fraction, pad_to, "
        "compile, loggers, probe."
    ]


def test_problems_unknown_component_parameter_lists_that_components_keys():
    assert problems_of("sparc_tiny", ["loss.lambda_ff=1"]) == [
        "loss.lambda_ff: unknown key (value 1). Did you mean 'lambda_f'? Accepted keys: lambda_g, lambda_f, "
        "sparsity_threshold, average, weighting, global_loss, local_loss, diagnostics, chunk_size."
    ]
    assert problems_of("sparc_tiny", ["model.vision.widht=3"]) == [
        "model.vision.widht: unknown key (value 3). Did you mean 'width'? Accepted keys: image_size, patch_size, "
        "width, depth, heads, mlp_ratio, in_channels, class_token, pre_norm, patch_bias, act, norm_eps."
    ]


def test_problems_key_of_the_old_component_after_switch():
    assert problems_of("sparc_tiny", ["loss.name=clip", "loss.lambda_f=2"]) == [
        "loss.lambda_f: unknown key (value 2). Accepted keys: local_loss."
    ]


def test_problems_unknown_component_names():
    assert problems_of("sparc_tiny", ["loss.name=spark"]) == [
        "loss.name: unknown loss 'spark'. Did you mean 'sparc'? Known: clip, filip, gloria, mgca, pacl, siglip, sparc"
    ]
    assert problems_of("sparc_tiny", ["data.name=synthetik"]) == [
        "data.name: unknown dataset 'synthetik'. Did you mean 'synthetic'? Known: manifest, synthetic, webdataset"
    ]
    assert problems_of("sparc_tiny", ["engine.name=dpp"]) == [
        "engine.name: unknown engine 'dpp'. Did you mean 'ddp'? Known: ddp, deepspeed, local"
    ]
    assert problems_of("sparc_tiny", ["model.image_pooler.name=maxx"]) == [
        "model.image_pooler.name: unknown pooler 'maxx'. Did you mean 'max'? Known: attention, cls, last, max, mean"
    ]


def test_problems_wrong_type_range_and_literal_all_reported():
    assert problems_of("sparc_tiny", ["train.steps=many", "train.batch_size=0", "loss.average=tokens"]) == [
        "loss.average: got 'tokens'; input should be 'token' or 'caption'",
        "train.steps: got 'many'; input should be a valid integer, unable to parse string as an integer",
        "train.batch_size: got 0; input should be greater than 0",
    ]


def test_problems_attention_literal_and_tuple_length():
    assert problems_of("sparc_tiny", ["model.attention=flash"]) == [
        "model.attention: got 'flash'; input should be 'auto', 'math', 'matmul', 'sdpa' or 'xformers'"
    ]
    assert problems_of("sparc_tiny", ["optim.betas=[1, 2, 3]"]) == [
        "optim.betas: got [1, 2, 3]; tuple should have at most 2 items after validation, not 3"
    ]


def test_problems_missing_sections_and_component_name():
    assert problems_of({}) == [
        "model: missing required value",
        "loss: missing required value",
        "data: missing required value",
    ]
    raw = yaml.safe_load(SPARC_TINY.read_text())
    del raw["model"]["vision"]["name"]
    assert problems_of(raw) == [
        "model.vision.name: missing; a vision_encoder section needs a name, one of: timm, vit"
    ]


def test_problems_missing_component_name_lists_known_names():
    raw = yaml.safe_load(SPARC_TINY.read_text())
    del raw["loss"]["name"]
    problems = problems_of(raw)
    assert len(problems) == 1
    assert problems[0].startswith("loss.name: missing")
    assert "clip" in problems[0] and "sparc" in problems[0]


def test_problems_carry_the_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: sparc_tiny\ntrain:\n  steps: 0\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(bad))
    assert info.value.source == str(bad)
    assert info.value.problems == ["train.steps: got 0; input should be greater than 0"]
    assert str(info.value) == "train.steps: got 0; input should be greater than 0"


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 5\n    batch_size: 3\n")
    assert problems_of(str(bad)) == [
        f"recipe {bad}: line 3, column 15: not valid YAML (mapping values are not allowed here)"
    ]


def test_top_level_must_be_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    assert problems_of(str(bad)) == [f"recipe {bad}: the top level must be a mapping of sections, got list"]


def test_missing_file_mentions_builtin_recipes(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert problems_of(str(missing)) == [f"recipe: file not found: {missing}. " + BUILTIN_LIST]
    assert problems_of("sparc_tiny.yml") == [
        "recipe: file not found: sparc_tiny.yml. Did you mean the built-in 'sparc_tiny'? "
        + BUILTIN_LIST
    ]
    # a path whose basename is a built-in, but in another folder: points at the built-in name
    other = tmp_path / "sparc_tiny.yaml"
    with pytest.raises(RecipeError) as info:
        resolve_recipe_path(str(other))
    assert info.value.problems == [
        f"recipe: file not found: {other}. A built-in recipe of that name exists: use 'sparc_tiny'. "
        + BUILTIN_LIST
    ]


# ----------------------------------------------------------------------------------------------------------------
# extends:


def _write_parent(folder: Path) -> Path:
    raw = yaml.safe_load(SPARC_TINY.read_text())
    raw["name"] = "parent"
    raw["loss"] = {"name": "sparc", "lambda_g": 0.25, "weighting": "dense", "local_loss": False}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "parent.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_extends_relative_parent_merges_one_nested_key(tmp_path, monkeypatch):
    _write_parent(tmp_path / "recipes")
    child = tmp_path / "recipes" / "child.yaml"
    child.write_text("extends: parent.yaml\nname: child\nmodel:\n  vision:\n    depth: 2\nloss:\n  lambda_f: 3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the parent is found next to the child, not in the working directory

    parent = load_recipe(str(tmp_path / "recipes" / "parent.yaml"))
    r = load_recipe(str(child))
    assert r.name == "child"
    assert r.model.vision.depth == 2
    assert parent.model.vision.depth == 4
    expected_vision = parent.model.vision.model_dump() | {"depth": 2}
    assert r.model.vision.model_dump() == expected_vision
    assert r.model.text.model_dump() == parent.model.text.model_dump()
    # same component name: the loss section is merged key by key
    assert r.loss.model_dump() == parent.loss.model_dump() | {"lambda_f": 3.0}
    assert r.loss.lambda_g == 0.25 and r.loss.weighting == "dense" and r.loss.local_loss is False
    for section in ("tokenizer", "data", "optim", "train", "engine"):
        assert getattr(r, section).model_dump() == getattr(parent, section).model_dump(), section


def test_extends_component_name_change_replaces_section_whole(tmp_path):
    _write_parent(tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\nloss:\n  name: clip\n")
    r = load_recipe(str(child))
    # local_loss: false of the parent's sparc section is not carried over to clip
    assert r.loss.model_dump() == {"name": "clip", "local_loss": True}


def test_extends_chain_and_overrides_apply_last(tmp_path):
    _write_parent(tmp_path)
    (tmp_path / "mid.yaml").write_text("extends: parent.yaml\ntrain:\n  steps: 10\n  batch_size: 8\n")
    (tmp_path / "leaf.yaml").write_text("extends: mid.yaml\ntrain:\n  steps: 20\n")
    r = load_recipe(str(tmp_path / "leaf.yaml"), ["train.batch_size=4"])
    assert (r.train.steps, r.train.batch_size) == (20, 4)
    assert load_recipe(str(tmp_path / "leaf.yaml")).train.batch_size == 8


def test_extends_builtin_by_name(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: sparc_tiny\ntrain:\n  steps: 3\n")
    r = load_recipe(str(child))
    base = load_recipe("sparc_tiny")
    assert r.train.steps == 3
    assert r.model_dump() == base.model_dump() | {"train": base.train.model_dump() | {"steps": 3}}


def test_extends_cycle_is_an_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\nname: a\n")
    b.write_text("extends: a.yaml\nname: b\n")
    problems = problems_of(str(a))
    assert problems == [f"recipe {a}: extends itself through {a} -> {b}"]
    assert "extends" in problems[0]


def test_extends_self_is_an_error(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("extends: a.yaml\n")
    assert problems_of(str(a)) == [f"recipe {a}: extends itself through {a}"]


def test_extends_cycle_through_dot_relative_paths_is_an_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: ./b.yaml\n")
    b.write_text("extends: ./a.yaml\n")
    problems, recursed = None, False
    try:
        load_recipe(str(a))
    except RecipeError as exc:
        problems = exc.problems
    except RecursionError:  # caught and dropped: pytest rendering a 1000-frame traceback takes seconds
        recursed = True
    assert not recursed, "RecursionError instead of a RecipeError naming the extends cycle"
    assert problems is not None, "no error for an extends cycle"
    assert len(problems) == 1 and "extends itself" in problems[0]


def test_extends_must_be_a_string(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("extends: [sparc_tiny]\n")
    assert problems_of(str(a)) == ["extends: expected a recipe path or built-in name, got ['sparc_tiny']"]


def test_extends_missing_parent(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("extends: nothere.yaml\n")
    assert problems_of(str(a)) == ["recipe: file not found: nothere.yaml. " + BUILTIN_LIST]


# ----------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name", ["sparc_tiny", "clip_tiny"])
def test_dump_then_load_round_trip(name, tmp_path):
    r = load_recipe(name, ["loss.lambda_f=2"] if name == "sparc_tiny" else [])
    text = dump_recipe(r)
    assert load_recipe(yaml.safe_load(text)).model_dump() == r.model_dump()
    path = tmp_path / "dumped.yaml"
    path.write_text(text)
    assert load_recipe(str(path)).model_dump() == r.model_dump()
    # dumping the reloaded recipe gives the same text: the dump is a fixed point
    assert dump_recipe(load_recipe(str(path))) == text


def test_dump_writes_component_names_first_and_every_default():
    text = dump_recipe(load_recipe("clip_tiny"))
    data = yaml.safe_load(text)
    assert list(data) == ["name", "description", "model", "tokenizer", "loss", "data", "optim", "train", "engine", "eval"]
    assert list(data["model"]["vision"])[0] == "name"
    assert list(data["loss"]) == ["name", "local_loss"]
    assert data["optim"]["betas"] == [0.9, 0.98]
    assert data["train"]["keep_checkpoints"] == 2
    assert data["engine"] == {"name": "local"}
    assert data["eval"] == []
    assert "extends" not in data


def test_load_recipe_accepts_a_built_recipe_and_applies_overrides():
    r = load_recipe("sparc_tiny")
    again = load_recipe(r, ["train.steps=11"])
    assert again.train.steps == 11
    assert again.model_dump() == r.model_dump() | {"train": r.train.model_dump() | {"steps": 11}}
    assert r.train.steps == 600  # the input is not modified


@pytest.fixture
def memory_dir():
    fs = fsspec.filesystem("memory")
    root = f"/sparc-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_url_gives_same_recipe_as_disk(memory_dir):
    fs, root = memory_dir
    fs.pipe(f"{root}/sparc_tiny.yaml", SPARC_TINY.read_bytes())
    url = f"memory://{root.lstrip('/')}/sparc_tiny.yaml"
    from_memory = load_recipe(url)
    from_disk = load_recipe(str(SPARC_TINY))
    assert from_memory.model_dump() == from_disk.model_dump()
    assert dump_recipe(from_memory) == dump_recipe(from_disk)


def test_memory_url_extends_relative_parent(memory_dir):
    fs, root = memory_dir
    fs.pipe(f"{root}/parent.yaml", SPARC_TINY.read_bytes())
    fs.pipe(f"{root}/child.yaml", b"extends: parent.yaml\ntrain:\n  steps: 3\n")
    r = load_recipe(f"memory://{root.lstrip('/')}/child.yaml")
    assert r.train.steps == 3
    assert r.train.batch_size == 64
    assert r.name == "sparc_tiny"


def test_memory_url_missing_file(memory_dir):
    _, root = memory_dir
    url = f"memory://{root.lstrip('/')}/nothing.yaml"
    assert problems_of(url) == [f"recipe: file not found: {url}. " + BUILTIN_LIST]


def test_override_reaches_into_a_list_by_index():
    """`--set eval.0.max_samples=500` edits one entry of the eval list; a bad index names the list's length."""
    r = load_recipe("sparc_cifar10", ["eval.0.max_samples=500", "eval.0.every=10"])
    assert r.eval[0].max_samples == 500 and r.eval[0].every == 10
    assert r.eval[0].task == "zeroshot"
    with pytest.raises(RecipeError) as info:
        load_recipe("sparc_cifar10", ["eval.3.every=1"])
    assert info.value.problems == ["--set eval.3.every=1: eval has 1 entries; no index 3 (0-based)"]


def test_override_indexing_a_list_the_recipe_does_not_have():
    with pytest.raises(RecipeError) as info:
        load_recipe("sparc_tiny", ["eval.0.every=5"])
    assert info.value.problems == ["--set eval.0.every=5: this recipe has no eval list to index into"]


def test_tokenizer_model_types_match_the_tokenizer_command():
    """`sparc tokenizer train --model-type char` exists, so a recipe may name a char tokenizer too."""
    assert load_recipe("sparc_tiny", ["tokenizer.model_type=char"]).tokenizer.model_type == "char"


@pytest.mark.parametrize(
    "override, line",
    [
        ("model.vision.heads=3",
         "model.vision.heads: 3 heads do not divide model.vision.width=128; use a width that is a multiple of the "
         "heads (e.g. 129) or heads that divide the width"),
        ("model.text.heads=5",
         "model.text.heads: 5 heads do not divide model.text.width=128; use a width that is a multiple of the heads "
         "(e.g. 130) or heads that divide the width"),
        ("model.vision.patch_size=7",
         "model.vision.patch_size: 7 does not tile model.vision.image_size=64; use a divisor of 64 (2, 4, 8, 16, 32, "
         "64, ...)"),
        ("model.vision.width=0", "model.vision.width: got 0; input should be greater than 0"),
        ("model.text.depth=-2", "model.text.depth: got -2; input should be greater than 0"),
        ("model.vision.mlp_ratio=0", "model.vision.mlp_ratio: got 0; input should be greater than 0"),
    ],
)
def test_sizes_that_cannot_build_are_recipe_errors(override, line):
    """They validated before and failed only when the model was built (or, for zero sizes, built nonsense)."""
    assert problems_of("sparc_tiny", [override]) == [line]


def test_a_model_larger_than_this_machine_is_a_recipe_error():
    (line,) = problems_of("sparc_tiny", ["model.text.width=100000"])
    assert line.startswith("model.text.width: 100000 makes the towers hold about 4.80e+11 parameters (1,788 GiB of "
                           "fp32 weights), more than this machine's ")
    assert line.endswith("of memory; reduce it (or another model.vision / model.text width or depth)")


@pytest.mark.parametrize("recipe", ["sparc_tiny", "sparc_b16", "sparc_l14"])
def test_parameter_counts_from_the_recipe_equal_the_built_towers(recipe):
    from sparc_kit.models import TextTransformer, VisionTransformer

    r = load_recipe(recipe)
    model = sparc_kit.build_model(r) if recipe == "sparc_tiny" else None
    if model is None:  # the large towers: counted on meta tensors, nothing allocated
        import torch

        with torch.device("meta"):
            model = sparc_kit.build_model(r)
    assert VisionTransformer.parameter_count(r.model.vision, r) == sum(p.numel() for p in model.vision.parameters())
    assert TextTransformer.parameter_count(r.model.text, r) == sum(p.numel() for p in model.text.parameters())


@pytest.mark.parametrize("name", ["sparc_tiny", "filip_tiny", "pacl_tiny", "gloria_tiny", "mgca_tiny"])
def test_a_global_head_no_term_trains_is_refused_naming_both_fields(name):
    with pytest.raises(RecipeError) as info:
        load_recipe(name, ["loss.lambda_g=0", "model.image_global_head=mlp"])
    (line,) = info.value.problems
    assert line.startswith("model.image_global_head:") and "loss.lambda_g" in line
    assert load_recipe(name, ["loss.lambda_g=0", "model.image_global_head=none"]).loss.lambda_g == 0


def test_image_global_head_mlp_is_read_as_its_current_name_linear_gelu(tmp_path):
    """``mlp`` was the earlier name of the one Linear + GELU head: a recipe or a run folder of that time still
    validates, resolves to ``linear_gelu`` and resumes (its recipe.yaml compares equal); another head does not."""
    import yaml

    from sparc_kit.train.run_folder import ResumeMismatchError, check_resume

    old = load_recipe("sparc_tiny", ["model.image_global_head=mlp"])
    assert old.model.image_global_head == "linear_gelu"
    assert "image_global_head: linear_gelu" in dump_recipe(old)
    raw = old.model_dump(mode="json")
    raw["model"]["image_global_head"] = "mlp"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    check_resume(str(tmp_path), old)
    raw["model"]["image_global_head"] = "none"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ResumeMismatchError, match="image_global_head"):
        check_resume(str(tmp_path), old)


def test_clips_tokenizer_needs_a_vocabulary_of_its_49408_pieces():
    """Known from the recipe alone, so a model built without a run (the api) cannot get a too-small table."""
    problems = problems_of("sparc_tiny", ["tokenizer.kind=open_clip", "tokenizer.vocab_size=49407"])
    assert len(problems) == 1 and problems[0].endswith(
        "tokenizer.vocab_size: 49407 is smaller than CLIP's 49408 pieces (tokenizer.kind open_clip); set it to 49408"
    )
    assert load_recipe("sparc_tiny", ["tokenizer.kind=open_clip", "tokenizer.vocab_size=49408"]).tokenizer.kind == (
        "open_clip"
    )
