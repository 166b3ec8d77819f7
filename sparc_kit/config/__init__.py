"""Recipes: pydantic-validated YAML that assembles registered components.

A recipe is read through fsspec (local paths, ``s3://``, ``memory://``, ...), may ``extends:`` another recipe,
takes ``a.b.c=value`` overrides typed by the schema, and is validated in full before anything runs. Every model
forbids unknown keys; a component section ``{name: sparc, lambda_f: 5}`` is validated against the parameters that
component declares. Problems are collected and reported one line each, naming the dotted path, the value given
and what is accepted (:class:`RecipeError`).

The package: :mod:`~sparc_kit.config.schema` (the sections and the registry-built component sections),
:mod:`~sparc_kit.config.problems` (the problem lines), and here the reading: built-in recipes, ``extends:``,
``--set`` overrides, :func:`load_recipe` and :func:`dump_recipe`.
"""

from __future__ import annotations

import copy
import difflib
import os
from importlib import resources
from typing import Any

import fsspec
import yaml
from pydantic import BaseModel, ValidationError

from sparc_kit.config import schema
from sparc_kit.config.problems import format_errors, recipe_problems
from sparc_kit.config.schema import (
    COMPONENT_SECTIONS,
    RENAMED_VALUES,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
    canonical_values,
    recipe_schema,
)
from sparc_kit.data.filesystems import FilesystemUnavailableError, check_url
from sparc_kit.errors import RecipeError

__all__ = [
    "RecipeError",
    "load_recipe",
    "recipe_from_dict",
    "builtin_recipes",
    "resolve_recipe_path",
    "parse_override",
    "apply_overrides",
    "dump_recipe",
    "recipe_problems",
    *schema.__all__,
]


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names to their file paths."""
    root = resources.files("sparc_kit.recipes")
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = str(entry)
    return dict(sorted(out.items()))


def resolve_recipe_path(source: str) -> str:
    """A path or URL that exists, or the name of a built-in recipe (``sparc_tiny``)."""
    try:
        check_url(source, "recipe")  # gs:// without gcsfs: one line, not fsspec's ImportError
    except FilesystemUnavailableError as exc:
        raise RecipeError([str(exc)], source=source) from None
    fs, _, paths = fsspec.get_fs_token_paths(source)
    if fs.exists(paths[0]) and not fs.isdir(paths[0]):
        return source
    builtins = builtin_recipes()
    key = os.path.basename(source)
    key = key[: -len(".yaml")] if key.endswith(".yaml") else key
    if source in (key, key + ".yaml") and key in builtins:  # a bare name: the built-in recipe
        return builtins[key]
    if key in builtins:
        extra = f" A built-in recipe of that name exists: use {key!r}."
    else:
        hint = difflib.get_close_matches(key, list(builtins), n=1)
        extra = f" Did you mean the built-in {hint[0]!r}?" if hint else ""
    raise RecipeError(
        [f"recipe: file not found: {source}.{extra} Built-in recipes: {', '.join(builtins)}"], source=source
    )


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"recipe {path}:{where}: not valid YAML ({problem})"], source=path) from None
    except (FileNotFoundError, IsADirectoryError):
        raise RecipeError([f"recipe: file not found: {path}"], source=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            [f"recipe {path}: the top level must be a mapping of sections, got {type(data).__name__}"], source=path
        )
    return data


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a mapping whose ``name`` changes (another component) replaces the base mapping whole."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if "name" in value and value.get("name") != old.get("name"):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = _merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_raw(source: str, seen: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    path = resolve_recipe_path(source)
    key = path if "://" in path else os.path.realpath(path)  # ./a.yaml and a.yaml are one file
    if key in [k for k, _ in seen]:
        chain = " -> ".join(p for _, p in seen)
        raise RecipeError([f"recipe {path}: extends itself through {chain}"], source=path)
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError([f"extends: expected a recipe path or built-in name, got {parent!r}"], source=path)
    if "://" not in parent and not os.path.isabs(parent):
        base_dir = os.path.dirname(path)
        candidate = os.path.join(base_dir, parent) if "://" not in path else path.rsplit("/", 1)[0] + "/" + parent
        try:
            resolve_recipe_path(candidate)
            parent = candidate
        except RecipeError:
            pass  # fall back to a built-in name or a path relative to the working directory
    return _merge(_load_raw(parent, seen + ((key, path),)), data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` to (["a", "b", "c"], value); the value is read as YAML, then typed by the schema."""
    if "=" not in item:
        raise RecipeError([f"--set {item}: expected KEY=VALUE, e.g. train.steps=100"])
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError([f"--set {item}: the key must be a dotted path such as loss.lambda_f"])
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = out
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):  # a list entry by index: eval.0.max_samples=500
                if not part.isdigit() or int(part) >= len(node):
                    owner = ".".join(path[:i])
                    raise RecipeError([f"--set {item}: {owner} has {len(node)} entries; no index {part} (0-based)"])
                nxt = node[int(part)]
            else:
                nxt = node.get(part)
                if nxt is None:
                    if path[i + 1].isdigit():  # eval.0.every=... on a recipe that has no eval list
                        raise RecipeError([f"--set {item}: this recipe has no {where} list to index into"])
                    nxt = node[part] = {}
            if not isinstance(nxt, (dict, list)):
                raise RecipeError([f"--set {item}: {where} is {nxt!r}, not a section with keys"])
            node = nxt
        leaf = path[-1]
        if isinstance(node, list):
            if not leaf.isdigit() or int(leaf) >= len(node):
                owner = ".".join(path[:-1])
                raise RecipeError([f"--set {item}: {owner} has {len(node)} entries; no index {leaf} (0-based)"])
            node[int(leaf)] = value
            continue
        switching = len(path) > 1 and leaf == "name" and isinstance(node.get("name"), str)
        if switching and node.get("name") != value:
            # switching component: keep only the keys the new component accepts (checked at validation)
            node.clear()
        node[leaf] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# validation and error messages




def recipe_from_dict(raw: dict[str, Any], source: str | None = None) -> BaseModel:
    schema = recipe_schema()
    try:
        recipe = schema.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, raw, schema), source=source) from None
    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError(problems, source=source)
    return recipe




def load_recipe(
    recipe: str | dict[str, Any] | BaseModel, overrides: list[str] | tuple[str, ...] = ()
) -> BaseModel:
    """Read, merge (``extends:``), override and validate a recipe.

    ``recipe`` is a path or fsspec URL, the name of a built-in recipe, a dict, or an already-built recipe.
    Raises :class:`RecipeError` listing every problem.
    """
    if isinstance(recipe, BaseModel):
        raw, source = recipe.model_dump(mode="json"), None
    elif isinstance(recipe, dict):
        raw, source = copy.deepcopy(recipe), None
    else:
        raw, source = _load_raw(str(recipe)), str(recipe)
    raw = apply_overrides(raw, list(overrides))
    return recipe_from_dict(raw, source)


def dump_recipe(recipe: BaseModel) -> str:
    """The fully resolved recipe as YAML (every default written out, component names first)."""
    return yaml.safe_dump(_name_first(recipe.model_dump(mode="json")), sort_keys=False, default_flow_style=False)


def _name_first(node: Any) -> Any:
    if isinstance(node, dict):
        ordered = {"name": node["name"]} if "name" in node else {}
        ordered.update({k: _name_first(v) for k, v in node.items() if k != "name"})
        return ordered
    return node
