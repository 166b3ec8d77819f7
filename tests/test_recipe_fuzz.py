"""Property-based recipe tests (hypothesis): any mutation of any built-in recipe is accepted or rejected cleanly.

What is checked, and why
------------------------
A recipe is the one input every user writes by hand, so whatever it holds must end in one of two ways:

- accepted: ``load_recipe`` returns, and for recipes small enough to build here (their towers count fewer than
  ``BUILD_LIMIT`` parameters) the model, the loss and the dataset really build from it; the paper-scale recipes
  are checked up to validation and the component checks (building a ViT-B/16 per example would take minutes);
- rejected: :class:`RecipeError` with one line per problem, each line starting with the dotted recipe field it
  is about, and at least one line naming a field the mutation touched (the field itself, its section or a
  field beside it: a batch that no longer divides reports ``train.accum_steps``).

Anything else (another exception, a line without a field, a multi-line problem) is a defect. The mutations
start from the fully resolved recipe (every default written out) and change one to three places: a value
replaced by another type, a negative, zero, a huge or non-finite number, a string, a list or a mapping; a key
deleted; an unknown key added; a component renamed to something unregistered or to another kind's name.

The same mutated recipes go through the command line: ``sparc recipes validate FILE`` (typer's CliRunner, for
speed) exits 0 with ``ok: FILE`` when the library accepts and 2 with exactly the library's problem lines
otherwise, never a traceback; ``sparc train --print-config --set KEY=TEXT`` with arbitrary keys and texts exits
0 or 2 with ``error:`` lines only; and three fixed mutations through the real ``sparc`` console script.

The number of examples is bounded (``FUZZ_EXAMPLES``, default 60 per property) so the file runs in about 20 s;
``SPARC_FUZZ_EXAMPLES=2000 pytest tests/test_recipe_fuzz.py`` searches harder.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from functools import lru_cache

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extras: pip install -e .[test]")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from sparc_cli.main import app  # noqa: E402
from sparc_kit import registry as reg  # noqa: E402
from sparc_kit.config import RecipeError, builtin_recipes, load_recipe  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("SPARC_FUZZ_EXAMPLES", "60"))
BUILD_LIMIT = 3_000_000  # tower parameters up to which an accepted recipe is built here
RECIPES = sorted(builtin_recipes())
SECTIONS = ("name", "description", "model", "tokenizer", "loss", "data", "optim", "train", "engine", "eval")
KEY = r"(?:[\w-]+|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"  # a plain key, or one quoted by repr()
FIELD = re.compile(rf"^(recipe|\(top level\)|{KEY}(?:\.{KEY})*): ")

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples in every run: CI failures reproduce
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@lru_cache(maxsize=None)
def resolved(name: str) -> dict:
    return load_recipe(name).model_dump(mode="json")


def _paths(node, prefix=()) -> list[tuple]:
    """Every place in a resolved recipe: sections, leaves and list entries."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(prefix + (key,))
            out.extend(_paths(value, prefix + (key,)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append(prefix + (i,))
            out.extend(_paths(value, prefix + (i,)))
    return out


def _parent(raw, path):
    node = raw
    for part in path[:-1]:
        node = node[part]
    return node


def dotted(path) -> str:
    """How a problem line writes a place: plain keys joined by dots, any other key quoted as Python's repr."""
    return ".".join(p if re.fullmatch(r"[\w-]+", p) else repr(p) for p in map(str, path))


def _all_component_names() -> list[str]:
    return sorted({n for k in reg.kinds() for n in reg.get_registry(k).names()})


# values of every kind, biased towards the edges a recipe's numbers have
edge_numbers = st.sampled_from([0, -1, -0.0, 1, 2, 3, 7, 10**12, 10**30, -(10**30), 1e308, float("inf"),
                                float("-inf"), float("nan"), 0.5, 1e-12, True, False])
short_text = st.text(max_size=12)
scalars = st.one_of(
    edge_numbers,
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    short_text,
    st.sampled_from(["", " ", "auto", "none", "null", "sdpa", "cpu", "cuda:7", "fp16", "8", "1e3", "{}", "[]",
                     "yes", "s3://bucket/x.tar", "nope-{000..002}.tar", "../../etc/passwd"]),
    st.none(),
)
bad_values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(short_text, scalars, max_size=2),
)


@st.composite
def mutation(draw, raw: dict):
    """One change to ``raw`` (in place); returns the dotted path it touched."""
    paths = _paths(raw)
    path = draw(st.sampled_from(paths))
    parent = _parent(raw, path)
    leaf = path[-1]
    kinds = ["replace", "replace", "delete", "unknown_key"]
    if leaf == "name" and len(path) > 1:
        kinds += ["rename", "rename"]
    kind = draw(st.sampled_from(kinds))
    where = dotted(path)
    if kind == "replace":
        parent[leaf] = draw(bad_values)
    elif kind == "delete":
        if isinstance(parent, list):
            parent.pop(leaf)
        else:
            del parent[leaf]
    elif kind == "rename":
        parent[leaf] = draw(st.one_of(st.sampled_from(_all_component_names()), short_text))
    else:
        target = parent[leaf] if isinstance(parent[leaf], dict) else parent
        owner = path if isinstance(parent[leaf], dict) else path[:-1]
        key = draw(st.one_of(st.sampled_from(["stpes", "lr_max", "widht", "nmae", "urlz"]), short_text))
        if isinstance(target, list):  # a list entry that is not a mapping: replace it instead
            target[leaf] = {key: draw(scalars)}
        else:
            target[key] = draw(scalars)
            where = dotted(owner + (key,))
    return where


@st.composite
def mutated_recipe(draw):
    name = draw(st.sampled_from(RECIPES))
    raw = copy.deepcopy(resolved(name))
    touched = [draw(mutation(raw)) for _ in range(draw(st.integers(1, 3)))]
    return name, raw, touched


def _relates(field: str, touched: str) -> bool:
    """A problem line's field is about a touched place: the same field, a section of it, a field inside it, or a
    field beside it (the same parent section)."""
    if field in ("recipe", "(top level)"):
        return True
    if field == touched or touched.startswith(field + ".") or field.startswith(touched + "."):
        return True
    return field.rsplit(".", 1)[0] == touched.rsplit(".", 1)[0] and "." in field


def _tower_parameters(recipe) -> int:
    total = 0
    for section, kind in ((recipe.model.vision, "vision_encoder"), (recipe.model.text, "text_encoder")):
        count = getattr(reg.get_registry(kind).get(section.name).builder, "parameter_count", None)
        if count is None:
            return BUILD_LIMIT + 1  # cannot tell: do not build
        total += count(section, recipe)
    return total


def check_outcome(raw: dict, touched: list[str]) -> list[str] | None:
    """Accepted (and built when small): None. Rejected: the problem lines, after checking their form."""
    try:
        recipe = load_recipe(raw)
    except RecipeError as exc:
        problems = exc.problems
        assert problems, "a RecipeError without a problem"
        for line in problems:
            assert "\n" not in line and line.strip() == line, f"not one clean line: {line!r}"
            m = FIELD.match(line)
            assert m, f"problem line does not start with the field it is about: {line!r}"
            field = m.group(1)
            top = field.split(".")[0]
            if field not in ("recipe", "(top level)"):
                assert top in SECTIONS or any(t.split(".")[0] == top for t in touched), f"not a field: {line!r}"
        fields = [FIELD.match(line).group(1) for line in problems]
        assert any(_relates(f, t) for f in fields for t in touched), (
            f"no problem names a touched field {touched}: {problems}"
        )
        return problems
    if _tower_parameters(recipe) <= BUILD_LIMIT:
        from sparc_kit.data import build_dataset
        from sparc_kit.models import build_model
        from sparc_kit.train import build_loss

        build_model(recipe)
        build_loss(recipe)
        if recipe.data.name == "synthetic":  # the others need files: their existence is not a recipe matter
            build_dataset(recipe)
    return None


# ------------------------------------------------------------------------------------------------ the library
@FUZZ
@given(mutated_recipe())
def test_any_mutation_is_accepted_and_builds_or_rejected_naming_the_field(case):
    name, raw, touched = case
    check_outcome(raw, touched)


@FUZZ
@given(st.sampled_from(RECIPES), st.data())
def test_every_leaf_of_every_recipe_takes_edge_values_cleanly(name, data):
    """Each leaf in turn (not a random one): every field of the recipe sees a bad value."""
    raw = copy.deepcopy(resolved(name))
    leaves = [p for p in _paths(raw) if not isinstance(_parent(raw, p)[p[-1]], (dict, list))]
    path = data.draw(st.sampled_from(leaves))
    _parent(raw, path)[path[-1]] = data.draw(bad_values)
    check_outcome(raw, [dotted(path)])


def test_the_unmutated_builtins_are_accepted():
    for name in RECIPES:
        assert check_outcome(copy.deepcopy(resolved(name)), []) is None, name


# ---------------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@FUZZ
@given(mutated_recipe())
def test_recipes_validate_exits_2_with_the_library_lines(tmp_path_factory, runner, case):
    name, raw, touched = case
    path = tmp_path_factory.mktemp("fuzz") / f"{name}_mutated.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        load_recipe(str(path))
        expected = None
    except RecipeError as exc:
        expected = exc.problems
    result = runner.invoke(app, ["recipes", "validate", str(path)])
    _no_traceback(result)
    if expected is None:
        assert result.exit_code == 0 and result.stdout == f"ok: {path}\n"
    else:
        assert result.exit_code == 2
        assert result.stderr.splitlines() == [f"error: {path}: {line}" for line in expected]


set_keys = st.one_of(
    st.sampled_from(["train.steps", "train.batch_size", "model.vision.width", "model.vision.name", "loss.name",
                     "loss.lambda_f", "data.num_samples", "optim.betas", "tokenizer.vocab_size", "engine.name",
                     "train.max_skip_fraction", "model.attention", "eval", "model", "train", "nope.deeper.key",
                     "eval.0.name", "optim.betas.0", "model.vision.name.x"]),
    st.lists(st.text(alphabet="abcdefgxyz_.0", min_size=1, max_size=6), min_size=1, max_size=3).map(".".join),
)
set_texts = st.one_of(
    st.text(max_size=16).filter(lambda s: "\x00" not in s),
    st.sampled_from(["-1", "0", "1e400", "[1, 2", "{a: 1}", "!!python/object:os.system", "2024-01-01", "~", ".nan",
                     "&a [*a]", "yes", "0x10", "1_000", "'unterminated"]),
)


@FUZZ
@given(st.sampled_from(RECIPES), st.lists(st.tuples(set_keys, set_texts), min_size=1, max_size=2))
def test_train_print_config_with_arbitrary_set_exits_0_or_2(runner, name, overrides):
    args = ["train", name, "--print-config"]
    for key, text in overrides:
        args += ["--set", f"{key}={text}"]
    result = runner.invoke(app, args)
    _no_traceback(result)
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), lines
        assert result.stdout == ""
    else:
        assert yaml.safe_load(result.stdout)["name"] == load_recipe(name).name


def test_real_console_script_exit_2_without_traceback(tmp_path):
    """Three fixed mutations through the installed ``sparc`` script: the exit status a shell sees."""
    exe = shutil.which("sparc") or pytest.skip("the sparc console script is not installed")
    raw = copy.deepcopy(resolved("sparc_tiny"))
    raw["train"]["steps"] = "many"
    raw["model"]["vision"]["width"] = -3
    raw["loss"]["name"] = "spark"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([exe, "recipes", "validate", str(tmp_path / "bad.yaml")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"error: {tmp_path / 'bad.yaml'}: model.vision.width: got -3;")
    assert any(" train.steps: got 'many';" in line for line in lines)
    assert any(" loss.name: unknown loss 'spark'. Did you mean 'sparc'?" in line for line in lines)
    proc = subprocess.run(
        [exe, "train", "sparc_b16", "--print-config", "--set", "train.batch_size=0", "--set", "optim.betas=[1, 2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert all(line.startswith("error: ") for line in proc.stderr.splitlines()), proc.stderr
    assert any("train.batch_size: got 0" in line for line in proc.stderr.splitlines()), proc.stderr


@pytest.mark.parametrize("name", ["sparc_tiny", "sparc_b16", "siglip_tiny", "mgca_tiny", "gloria_tiny"])
def test_a_non_finite_number_anywhere_is_rejected_naming_it(name):
    """Every float of the resolved recipe, set to inf and to nan: exactly one problem, on that field. (They
    validated as floats before and stopped at build time, "math domain error", or trained NaN.)"""
    raw = resolved(name)
    floats = [p for p in _paths(raw) if isinstance(_parent(raw, p)[p[-1]], float)]
    assert len(floats) >= 10
    for path in floats:
        for bad in (float("inf"), float("nan")):
            changed = copy.deepcopy(raw)
            _parent(changed, path)[path[-1]] = bad
            with pytest.raises(RecipeError) as info:
                load_recipe(changed)
            field = ".".join(map(str, path))
            assert [line.split(";")[0] for line in info.value.problems] == [f"{field}: got {bad!r}"], path
