"""Recipes: pydantic-validated YAML that assembles registered components.

A recipe is read through fsspec (local paths, ``s3://``, ``memory://``, ...), may ``extends:`` another recipe,
takes ``a.b.c=value`` overrides typed by the schema, and is validated in full before anything runs. Every model
forbids unknown keys; a component section ``{name: sparc, lambda_f: 5}`` is validated against the parameters that
component declares. Problems are collected and reported one line each, naming the dotted path, the value given
and what is accepted (:class:`RecipeError`).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any, Literal, Optional, Union

import fsspec
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

# the component packages: importing them registers the built-in components the schema is built from
import sparc_kit.data  # noqa: F401
import sparc_kit.engines  # noqa: F401
import sparc_kit.evaluate  # noqa: F401
import sparc_kit.losses  # noqa: F401
import sparc_kit.models  # noqa: F401
from sparc_kit import registry as reg
from sparc_kit.data.filesystems import FilesystemUnavailableError, check_url
from sparc_kit.errors import RecipeError
from sparc_kit.evaluate.spec import EvalConfig
from sparc_kit.plugins import PluginError, ensure_plugins

__all__ = [
    "RecipeError",
    "load_recipe",
    "recipe_from_dict",
    "builtin_recipes",
    "resolve_recipe_path",
    "apply_overrides",
    "dump_recipe",
    "recipe_schema",
    "recipe_problems",
    "canonical_values",
    "RENAMED_VALUES",
]


class Strict(BaseModel):
    # numbers are finite: an infinite temperature or learning rate validates as a float but cannot train
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_default=True, allow_inf_nan=False)


class TokenizerConfig(Strict):
    """SentencePiece tokenizer: loaded from ``path``, or trained on the training captions when ``path`` is null."""

    path: str | None = None
    vocab_size: int = Field(32000, gt=3)
    context_length: int = Field(55, gt=1)
    model_type: Literal["unigram", "bpe", "word", "char"] = "unigram"
    lowercase: bool = True
    add_eos: bool = True
    train_captions: int = Field(100_000, gt=0, description="how many training captions to train it on")


class OptimConfig(Strict):
    """AdamW with linear warm-up then cosine (or constant) decay, counted in steps."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(2500, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)


class TrainConfig(Strict):
    """Step-based training. ``batch_size`` is the global batch: the same number on 1 or N processes (each
    process takes ``batch_size / N``); ``accum_steps`` splits each process's part into that many micro-batches,
    contrastive-correct (the loss and gradients of the whole batch)."""

    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0, description="the global batch, all processes and micro-batches together")
    accum_steps: int = Field(1, gt=0, description="micro-batches per process and step (gradient accumulation)")
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_skip_fraction: float = Field(
        0.1, ge=0, le=1, description="stop when more than this fraction of the samples read so far were unreadable"
    )


#: values a field accepted under an earlier name, read as the current one (recipes and run folders of that time
#: keep working; the resolved recipe writes the current name)
RENAMED_VALUES: dict[str, dict[Any, Any]] = {"model.image_global_head": {"mlp": "linear_gelu"}}


def _canonical(field: str):
    renamed = RENAMED_VALUES[field]
    return lambda value: renamed.get(value, value) if isinstance(value, str) else value


def canonical_values(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw recipe dict (a run folder's recipe.yaml) with the values of :data:`RENAMED_VALUES` under their
    current names, for comparing it with a validated recipe."""
    out = copy.deepcopy(raw)
    for field, renamed in RENAMED_VALUES.items():
        *parents, leaf = field.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = renamed.get(node[leaf], node[leaf])
    return out


def _tagged(kind: str, name: str, config: type[BaseModel]) -> type[BaseModel]:
    return create_model(
        f"{kind}.{name}",
        __base__=config,
        name=(Literal[name], ...),  # type: ignore[valid-type]
    )


def _component_type(registry: reg.Registry) -> Any:
    members = [_tagged(registry.kind, e.name, e.config) for e in registry.entries()]
    if not members:
        raise RuntimeError(f"no {registry.kind} is registered")
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator="name")]  # type: ignore[valid-type]


def _registry_versions() -> tuple[int, ...]:
    _ensure_components()
    return tuple(reg.get_registry(k).version for k in reg.kinds())


def _ensure_components() -> None:
    """Load the plugins (the ``sparc_kit.plugins`` entry points and ``SPARC_PLUGINS``; :mod:`sparc_kit.plugins`);
    the built-in components registered themselves when this module imported their packages."""
    try:
        ensure_plugins()
    except PluginError as exc:
        raise RecipeError([str(exc)]) from None


@lru_cache(maxsize=4)
def _build_schema(versions: tuple[int, ...]) -> type[BaseModel]:
    vision_t = _component_type(reg.vision_encoders)
    text_t = _component_type(reg.text_encoders)
    pooler_t = _component_type(reg.poolers)
    attention_t = Literal[tuple(reg.attention_backends.names())]  # type: ignore[valid-type]

    model_config = create_model(
        "ModelConfig",
        __base__=Strict,
        __doc__="The dual encoder: two towers, linear adapters into a shared space, poolers, one temperature.",
        embed_dim=(int, Field(512, gt=0)),
        vision=(vision_t, ...),
        text=(text_t, ...),
        image_pooler=(pooler_t, Field(default_factory=lambda: {"name": "mean"})),
        text_pooler=(pooler_t, Field(default_factory=lambda: {"name": "mean"})),
        image_global_head=(
            Annotated[Literal["linear_gelu", "none"], BeforeValidator(_canonical("model.image_global_head"))],
            Field(
                "linear_gelu",
                description="h_v on the pooled patches for the global image embedding: 'linear_gelu' (one Linear + "
                "GELU, the paper's text; 'mlp' is its earlier name) or 'none' (the mean of the projected patches)",
            ),
        ),
        text_end_token=(
            Literal["include", "exclude"],
            Field(
                "include",
                description="whether the end-of-caption token is one of the caption's tokens for the text pooler "
                "and the token-level losses (the text tower attends to it either way)",
            ),
        ),
        attention=(attention_t, "sdpa"),
        init_temperature=(float, Field(0.07, gt=0)),
        max_logit_scale=(float, Field(100.0, gt=1)),
        grad_checkpointing=(bool, False),
    )
    return create_model(
        "Recipe",
        __base__=Strict,
        __doc__="A whole training recipe: model, tokenizer, loss, data, optimizer, training and engine.",
        name=(Optional[str], None),
        description=(Optional[str], None),
        model=(model_config, ...),
        tokenizer=(TokenizerConfig, Field(default_factory=TokenizerConfig)),
        loss=(_component_type(reg.losses), ...),
        data=(_component_type(reg.datasets), ...),
        optim=(OptimConfig, Field(default_factory=OptimConfig)),
        train=(TrainConfig, Field(default_factory=TrainConfig)),
        engine=(_component_type(reg.engines), Field(default_factory=lambda: {"name": "local"})),
        eval=(list[EvalConfig], Field(default_factory=list)),
    )


def recipe_schema() -> type[BaseModel]:
    """The Recipe pydantic model for the components registered now."""
    return _build_schema(_registry_versions())


# --------------------------------------------------------------------------------------------------------------
# reading


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names to their file paths."""
    root = resources.files("sparc_kit.recipes")
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = str(entry)
    return dict(sorted(out.items()))


def resolve_recipe_path(spec: str) -> str:
    """A path or URL that exists, or the name of a built-in recipe (``sparc_tiny``)."""
    try:
        check_url(spec, "recipe")  # gs:// without gcsfs: one line, not fsspec's ImportError
    except FilesystemUnavailableError as exc:
        raise RecipeError([str(exc)], source=spec) from None
    fs, _, paths = fsspec.get_fs_token_paths(spec)
    if fs.exists(paths[0]) and not fs.isdir(paths[0]):
        return spec
    builtins = builtin_recipes()
    key = os.path.basename(spec)
    key = key[: -len(".yaml")] if key.endswith(".yaml") else key
    if spec in (key, key + ".yaml") and key in builtins:  # a bare name: the built-in recipe
        return builtins[key]
    if key in builtins:
        extra = f" A built-in recipe of that name exists: use {key!r}."
    else:
        hint = difflib.get_close_matches(key, list(builtins), n=1)
        extra = f" Did you mean the built-in {hint[0]!r}?" if hint else ""
    raise RecipeError(
        [f"recipe: file not found: {spec}.{extra} Built-in recipes: {', '.join(builtins)}"], source=spec
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


def _load_raw(spec: str, seen: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    path = resolve_recipe_path(spec)
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
        raise RecipeError(_format_errors(exc, raw, schema), source=source) from None
    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def recipe_problems(recipe: BaseModel) -> list[str]:
    """Problems of a recipe whose every field is valid but whose fields disagree: the batch and the
    accumulation steps, and what each component's ``check`` finds (a DeepSpeed pass-through key that
    contradicts the train section)."""
    problems = []
    t = recipe.train
    if t.batch_size % t.accum_steps:
        problems.append(
            f"train.accum_steps: {t.accum_steps} micro-batches do not divide train.batch_size={t.batch_size}; "
            f"use a batch size that is a multiple of {t.accum_steps}"
        )
    for path, kind in COMPONENT_SECTIONS.items():
        node: Any = recipe
        for part in path.split("."):
            node = getattr(node, part, None)
        name = getattr(node, "name", None)
        if name is None:
            continue
        problems.extend(
            f"{path}.{key}: got {value!r}; input should be a finite number"  # a NaN weight validates, then trains NaN
            for key, value in node
            if isinstance(value, float) and not math.isfinite(value)
        )
        entry = reg.get_registry(kind).get(name)
        if entry.check is not None:
            problems.extend(entry.check(recipe, path))
    problems.extend(_memory_problems(recipe))
    return problems


def _host_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _memory_problems(recipe: BaseModel) -> list[str]:
    """A model whose fp32 weights alone exceed this machine's memory cannot even be built here (models are built
    on the CPU before an engine moves or shards them). Towers that can count their parameters from their
    settings say how many (``parameter_count``); others (timm) are not counted. The line names the size that
    matters most: the one whose reduction to 1 would shrink the model the most (a width, a depth, the
    tokenizer's vocabulary or context length, ``model.embed_dim``)."""
    if any(isinstance(v, float) and not math.isfinite(v) for _, v in _size_fields(recipe)):
        return []  # reported as not finite
    total = _parameter_count(recipe)
    memory = _host_memory_bytes()
    if memory is None or total * 4 <= memory:
        return []
    field, value = min(_size_fields(recipe), key=lambda fv: _parameter_count(_with_size(recipe, fv[0], 1)))
    size = f"about {total:.2e} parameters ({total * 4 / 2**30:,.0f} GiB of fp32 weights)" if total < math.inf else (
        "more parameters than can be counted"
    )
    return [
        f"{field}: {value!r} makes the towers hold {size}, more than this machine's {memory / 2**30:,.0f} GiB of "
        "memory; reduce it (or another model.vision / model.text width or depth)"
    ]


def _parameter_count(recipe: BaseModel) -> float:
    """The towers' parameters (those that can count them) and the adapters into the shared space; ``inf`` when
    a size is too large to count (``mlp_ratio: 1e308``)."""
    total = 0
    for path, kind in (("model.vision", "vision_encoder"), ("model.text", "text_encoder")):
        section = getattr(recipe.model, path.split(".")[1])
        builder = reg.get_registry(kind).get(section.name).builder
        count = getattr(builder, "parameter_count", None)
        if count is None:
            continue
        try:
            total += int(count(section, recipe))
            total += recipe.model.embed_dim * int(getattr(section, "width", 0) or 0)  # g_v, g_t
        except (OverflowError, ValueError):
            return math.inf
    return total


def _size_fields(recipe: BaseModel) -> list[tuple[str, Any]]:
    fields = [("model.embed_dim", recipe.model.embed_dim)]
    for part in ("vision", "text"):
        section = getattr(recipe.model, part)
        for key, value in section:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                fields.append((f"model.{part}.{key}", value))
    fields += [("tokenizer.vocab_size", recipe.tokenizer.vocab_size)]
    fields += [("tokenizer.context_length", recipe.tokenizer.context_length)]
    return fields


def _with_size(recipe: BaseModel, field: str, value: Any) -> BaseModel:
    """A copy of ``recipe`` with one dotted field replaced (not validated: only counted)."""
    head, _, rest = field.partition(".")
    node = getattr(recipe, head)
    if rest:
        return recipe.model_copy(update={head: _with_size(node, rest, value)})
    return recipe.model_copy(update={head: value})


def load_recipe(
    spec: str | dict[str, Any] | BaseModel, overrides: list[str] | tuple[str, ...] = ()
) -> BaseModel:
    """Read, merge (``extends:``), override and validate a recipe.

    ``spec`` is a path or fsspec URL, the name of a built-in recipe, a dict, or an already-built recipe.
    Raises :class:`RecipeError` listing every problem.
    """
    if isinstance(spec, BaseModel):
        raw, source = spec.model_dump(mode="json"), None
    elif isinstance(spec, dict):
        raw, source = copy.deepcopy(spec), None
    else:
        raw, source = _load_raw(str(spec)), str(spec)
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


def _walk_raw(raw: Any, loc: tuple[Any, ...]) -> tuple[list[str], Any, bool]:
    """Drop discriminator tags from a pydantic error location; return (dotted parts, raw value, found)."""
    parts: list[str] = []
    node = raw
    found = True
    for item in loc:
        if isinstance(node, dict) and isinstance(item, str) and item not in node and node.get("name") == item:
            continue  # the tag pydantic inserts for a discriminated union member
        parts.append(str(item))
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            node = node[item]
        else:
            node, found = None, False
    return parts, node, found


def _dotted(parts: list[str]) -> str:
    """``model.vision.width``; a key that is empty or holds other characters is quoted (``train.'my key'``), so
    a problem line always starts with a field that can be read back."""
    shown = [p if p and all(c.isalnum() or c in "_-" for c in p) else repr(p) for p in parts]
    return ".".join(shown) or "(top level)"


def _schema_at(schema: type[BaseModel], raw: Any, parts: list[str]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``parts`` (following component names in ``raw``)."""
    model: Any = schema
    node = raw
    for part in parts:
        model = _resolve_model(model, node)
        if model is None or part not in model.model_fields:
            return None
        model = model.model_fields[part].annotation
        node = node.get(part) if isinstance(node, dict) else None
    return _resolve_model(model, node)


def _resolve_model(annotation: Any, node: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = getattr(annotation, "__args__", None) or getattr(annotation, "__metadata__", None)
    origin_args = getattr(annotation, "__origin__", None)
    candidates = []
    if origin_args is not None and hasattr(annotation, "__metadata__"):  # Annotated[Union[...], ...]
        candidates = list(getattr(origin_args, "__args__", ()) or [origin_args])
    elif args:
        candidates = list(args)
    for cand in candidates:
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            tag = cand.model_fields.get("name")
            if tag is None or not isinstance(node, dict):
                if tag is None:
                    return cand
                continue
            if node.get("name") in getattr(tag.annotation, "__args__", ()):
                return cand
    return None


def _own(kind: str, did_you_mean: str) -> str:
    """For a component name that is not a typo of a known one: how a user's own component gets registered."""
    if did_you_mean:
        return ""
    return (
        f". Your own {kind}? Load the module that registers it: sparc --plugin FILE.py or MODULE (in Python: import it)"
    )


def _format_errors(exc: ValidationError, raw: dict[str, Any], schema: type[BaseModel]) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        parts, value, found = _walk_raw(raw, tuple(err["loc"]))
        path = _dotted(parts)
        etype = err["type"]
        if etype == "extra_forbidden":
            owner = _schema_at(schema, raw, parts[:-1])
            fields = owner.model_fields if owner else {}
            tagged = "name" in fields and getattr(fields["name"].annotation, "__origin__", None) is Literal
            accepted = [f for f in fields if not (tagged and f == "name")]
            hint = difflib.get_close_matches(parts[-1], accepted, n=1)
            dym = f" Did you mean {hint[0]!r}?" if hint else ""
            acc = f" Accepted keys: {', '.join(accepted)}." if accepted else ""
            lines.append(f"{path}: unknown key (value {value!r}).{dym}{acc}")
        elif etype == "union_tag_invalid":
            kind = COMPONENT_SECTIONS.get(path, "component")
            known = err.get("ctx", {}).get("expected_tags", "")
            known_list = [t.strip(" '") for t in str(known).split(",")]
            given = err.get("ctx", {}).get("tag")
            hint = difflib.get_close_matches(str(given), known_list, n=1)
            dym = f" Did you mean {hint[0]!r}?" if hint else ""
            lines.append(f"{path}.name: unknown {kind} {given!r}.{dym} Known: {', '.join(known_list)}{_own(kind, dym)}")
        elif etype == "union_tag_not_found":
            kind = COMPONENT_SECTIONS.get(path)
            known = ", ".join(reg.get_registry(kind).names()) if kind else "see `sparc components`"
            lines.append(f"{path}.name: missing; a {kind or 'component'} section needs a name, one of: {known}")
        elif etype == "missing":
            lines.append(f"{path}: missing required value")
        elif etype == "literal_error" and parts and parts[-1] == "name":  # a kind with a single component
            known_list = [t.strip(" '") for t in str(err.get("ctx", {}).get("expected", "")).split(" or ")]
            kind = COMPONENT_SECTIONS.get(".".join(parts[:-1]), "component")
            hint = difflib.get_close_matches(str(value), known_list, n=1)
            dym = f" Did you mean {hint[0]!r}?" if hint else ""
            lines.append(f"{path}: unknown {kind} {value!r}.{dym} Known: {', '.join(known_list)}{_own(kind, dym)}")
        else:
            shown = repr(value) if found else repr(err.get("input"))
            msg = err["msg"]
            lines.append(f"{path}: got {shown}; {msg[0].lower() + msg[1:]}")
    return lines


COMPONENT_SECTIONS = {  # recipe path of each component section -> its registry kind
    "model.vision": "vision_encoder",
    "model.text": "text_encoder",
    "model.image_pooler": "pooler",
    "model.text_pooler": "pooler",
    "loss": "loss",
    "data": "dataset",
    "engine": "engine",
}
