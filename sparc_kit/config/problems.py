"""What is wrong with a recipe, one line per problem: pydantic's errors said with the dotted path, the value
given and what is accepted (:func:`format_errors`), and the problems of a recipe whose fields are each valid but
disagree (:func:`recipe_problems`: the batch and the accumulation steps, each component's ``check``, a model
too large for this machine's memory)."""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from sparc_kit import registry as reg
from sparc_kit.config.schema import COMPONENT_SECTIONS

__all__ = ["recipe_problems", "format_errors"]


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




def _walk_raw(raw: Any, loc: tuple[Any, ...]) -> tuple[list[str], Any, bool]:
    """Drop discriminator tags from a pydantic error location; return (dotted parts, raw value, found)."""
    parts: list[str] = []
    node = raw
    found = True
    for item in loc:
        if isinstance(node, dict) and isinstance(item, str) and item not in node and item in _tags(node):
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
            key = next((k for k in TAG_KEYS if _is_tag(cand, k)), None)
            if key is None or not isinstance(node, dict):
                if key is None:
                    return cand
                continue
            if node.get(key) in getattr(cand.model_fields[key].annotation, "__args__", ()):
                return cand
    return None


#: the keys a recipe section is chosen by: a component's ``name``, an evaluation's ``task``
TAG_KEYS = ("name", "task")


def _tags(node: dict) -> list[Any]:
    return [node.get(k) for k in TAG_KEYS if isinstance(node.get(k), str)]


def _is_tag(model: type[BaseModel], key: str) -> bool:
    field = model.model_fields.get(key)
    return field is not None and getattr(field.annotation, "__origin__", None) is Literal


def _own(kind: str, did_you_mean: str) -> str:
    """For a component name that is not a typo of a known one: how a user's own component gets registered."""
    if did_you_mean:
        return ""
    return (
        f". Your own {kind}? Load the module that registers it: sparc --plugin FILE.py or MODULE (in Python: import it)"
    )


def format_errors(exc: ValidationError, raw: dict[str, Any], schema: type[BaseModel]) -> list[str]:
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
        elif etype in ("union_tag_invalid", "union_tag_not_found") and "task" in str(err.get("ctx", {})):
            known = ", ".join(reg.evaluators.names())
            given = err.get("ctx", {}).get("tag")
            if etype == "union_tag_not_found":
                lines.append(f"{path}.task: missing; an eval entry needs a task, one of: {known}")
            else:
                hint = difflib.get_close_matches(str(given), reg.evaluators.names(), n=1)
                dym = f" Did you mean {hint[0]!r}?" if hint else ""
                lines.append(f"{path}.task: unknown evaluation task {given!r}.{dym} Known: {known}{_own('evaluator', dym)}")
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
