"""What a ``--vary`` parameter names and which values it sweeps: dotted paths, short names, default grids, and the
exact text of a value.

A parameter is a dotted recipe path (``loss.lambda_f``) or a short name that matches the end of exactly one path
(``lambda_f``, ``vision.width``). Without values it sweeps its default grid (:func:`default_values`), which a
component declares on its own parameter, in the signature its config model is derived from (``json_schema_extra``
of a pydantic ``Field``)::

    lambda_f: Annotated[float, Field(json_schema_extra={"ablate_grid": [0.5, 1.0, 5.0, 10.0]})] = 1.0

and, for values relative to the patch count P, with a unit: ``{"ablate_grid": [0.0, 0.5, 1.0, 2.0, 4.0],
"ablate_grid_unit": "1/num_patches"}`` is 0, 0.5/P, 1/P, 2/P, 4/P. A user's plugin loss declares the grids of its
own parameters the same way.
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any, Callable, Literal

import torch
import yaml
from pydantic import BaseModel

from sparc_kit.config import COMPONENT_SECTIONS
from sparc_kit.errors import SparcError
from sparc_kit.registry import get_registry, vision_encoders

__all__ = [
    "AblationError",
    "GRID_KEY",
    "GRID_UNIT_KEY",
    "GRID_UNITS",
    "parameter_paths",
    "resolve_param",
    "num_patches",
    "default_values",
    "parse_vary",
]


#: the ``json_schema_extra`` key of a field that holds its default ablation grid
GRID_KEY = "ablate_grid"
#: the ``json_schema_extra`` key that gives the grid's unit (absent: the values are the values)
GRID_UNIT_KEY = "ablate_grid_unit"


class AblationError(SparcError, ValueError):
    """A sweep that cannot run; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def parameter_paths(recipe: BaseModel) -> list[str]:
    """Every settable value of a recipe as a dotted path (component ``name`` keys included; the recipe's own
    ``name`` and ``description`` are not parameters)."""
    out: list[str] = []

    def walk(node: BaseModel, prefix: str) -> None:
        for key in type(node).model_fields:
            if not prefix and key in ("name", "description"):
                continue
            value = getattr(node, key)
            path = f"{prefix}{key}"
            if isinstance(value, BaseModel):
                walk(value, path + ".")
            else:
                out.append(path)

    walk(recipe, "")
    return out


def _sections(recipe: BaseModel) -> list[str]:
    out: list[str] = []

    def walk(node: BaseModel, prefix: str) -> None:
        for key in type(node).model_fields:
            value = getattr(node, key)
            if isinstance(value, BaseModel):
                out.append(prefix + key)
                walk(value, f"{prefix}{key}.")

    walk(recipe, "")
    return out


def resolve_param(recipe: BaseModel, name: str) -> str:
    """The one dotted path ``name`` means: itself, or the only path whose last parts are ``name``.

    Raises :class:`AblationError` (one line) for an ambiguous name (listing the candidates), a section, or an
    unknown name (with the closest paths).
    """
    paths = parameter_paths(recipe)
    query = name.strip()
    if query in paths:
        return query
    parts = query.split(".")
    matches = [p for p in paths if p.split(".")[-len(parts) :] == parts]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AblationError([f"--vary {name}: ambiguous, it matches {', '.join(matches)}; give the dotted path"])
    sections = _sections(recipe)
    section = [s for s in sections if s == query or s.split(".")[-len(parts) :] == parts]
    if len(section) == 1:
        keys = [p[len(section[0]) + 1 :] for p in paths if p.startswith(section[0] + ".")]
        raise AblationError(
            [f"--vary {name}: {section[0]} is a section, not a value; its keys: {', '.join(keys)}"]
        )
    leaves = sorted({p.split(".")[-1] for p in paths})
    close = difflib.get_close_matches(parts[-1], leaves, n=3, cutoff=0.6)
    suggestions = [p for c in close for p in paths if p.split(".")[-1] == c]
    suggestions += [p for p in difflib.get_close_matches(query, paths, n=3, cutoff=0.6) if p not in suggestions]
    hint = f" Did you mean {' or '.join(suggestions[:4])}?" if suggestions else ""
    where = f" of recipe {recipe.name}" if getattr(recipe, "name", None) else ""
    raise AblationError(
        [f"--vary {name}: unknown parameter{where}.{hint} See `sparc recipes show RECIPE` for every path"]
    )


def get_value(recipe: BaseModel, path: str) -> Any:
    """The recipe's value at a dotted path."""
    node: Any = recipe
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _field(recipe: BaseModel, path: str) -> Any:
    """The pydantic field (``FieldInfo``) of a dotted path: its annotation and the metadata it was declared with."""
    parent_path, _, leaf = path.rpartition(".")
    parent = get_value(recipe, parent_path) if parent_path else recipe
    return type(parent).model_fields[leaf]


def _choices(annotation: Any) -> list[Any] | None:
    """The values of a Literal or bool type (None allowed around it: ``Literal[...] | None``)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if annotation is bool:
        return [False, True]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is not None and len(args) == 1 and len(typing.get_args(annotation)) == 2:  # Optional[X]
        return _choices(args[0])
    return None


def num_patches(recipe: BaseModel) -> int:
    """P, the vision tower's patch count: ``(image_size // patch_size) ** 2`` for ``vit``; other towers are built
    on the meta device (no memory, no weights) and asked."""
    vision = recipe.model.vision
    if vision.name == "vit":
        return (vision.image_size // vision.patch_size) ** 2
    params = vision.model_dump(exclude={"name"})
    if "weights" in params:
        params["weights"] = None
    with torch.device("meta"):
        encoder = vision_encoders.get(vision.name).build(params)
    count = getattr(encoder, "num_patches", None)
    if count is None:
        raise AblationError([f"model.vision: {vision.name!r} does not say how many patches it makes (num_patches)"])
    return int(count)


#: the units a declared grid may be given in, each the divisor of the grid's values for a recipe
GRID_UNITS: dict[str, Callable[[BaseModel], float]] = {"1/num_patches": num_patches}


def grid_declaration(recipe: BaseModel, path: str) -> tuple[list[Any] | None, str | None]:
    """(grid, unit) as the field at ``path`` declares them (``json_schema_extra``), each None when it does not."""
    extra = _field(recipe, path).json_schema_extra
    if not isinstance(extra, dict):
        return None, None
    grid = extra.get(GRID_KEY)
    return (None if grid is None else list(grid)), extra.get(GRID_UNIT_KEY)


def default_values(recipe: BaseModel, path: str) -> list[Any]:
    """The grid a parameter sweeps when ``--vary`` gives no values, the first of:

    - the grid its field declares (``ablate_grid`` in the field's ``json_schema_extra``, e.g. on a loss's
      ``__init__`` argument), divided by its ``ablate_grid_unit`` when it has one: ``"1/num_patches"`` makes the
      built-in ``loss.sparsity_threshold`` grid 0, 0.5/P, 1/P, 2/P, 4/P with P the recipe's patch count (the
      paper's 1/P in the middle, so it follows image and patch size); ``loss.lambda_f`` declares the paper's
      0.5, 1, 5, 10;
    - a component's ``name``: every registered component of that kind;
    - any Literal or bool parameter: its choices (``loss.weighting``: sparse, dense, softmax).

    Anything else raises :class:`AblationError` asking for values.
    """
    grid, unit = grid_declaration(recipe, path)
    if grid is not None:
        if unit is None:
            return grid
        if unit not in GRID_UNITS:
            raise AblationError(
                [f"--vary {path}: its {GRID_UNIT_KEY} {unit!r} is not one of {', '.join(GRID_UNITS)}; give values"]
            )
        divisor = GRID_UNITS[unit](recipe)
        return [float(v) / divisor for v in grid]
    parent, _, leaf = path.rpartition(".")
    if leaf == "name" and parent in COMPONENT_SECTIONS:
        return list(get_registry(COMPONENT_SECTIONS[parent]).names())
    annotation = _field(recipe, path).annotation
    choices = _choices(annotation)
    if choices:
        return choices
    shown = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    short = path.split(".")[-1]
    raise AblationError(
        [f"--vary {path}: a {shown} parameter has no default grid; give values, e.g. --vary {short}=V1,V2,V3"]
    )


def _split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` to ``["a", "b", "[c,d]"]``: commas inside brackets or quotes do not split."""
    out, buf, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    out.append("".join(buf).strip())
    return out


def parse_vary(text: str) -> tuple[str, list[str] | None]:
    """``PARAM`` to (PARAM, None); ``PARAM=v1,v2`` to (PARAM, ["v1", "v2"])."""
    name, eq, values = text.partition("=")
    name = name.strip()
    if not name or any(not part for part in name.split(".")):
        raise AblationError([f"--vary {text}: expected PARAM or PARAM=V1,V2,... e.g. --vary loss.lambda_f=1,5"])
    if not eq:
        return name, None
    items = _split_values(values)
    if any(not item for item in items):
        raise AblationError([f"--vary {text}: empty value; expected PARAM=V1,V2,... e.g. --vary {name}=1,5"])
    return name, items


#: a value given relative to the patch count: ``1/P``, ``0.5/P``
PER_PATCH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)?\s*/\s*P\s*$")


def yaml_text(value: Any) -> str:
    """A value as the YAML text of an override (``1.0e-05``, ``null``, ``true``, ``[0.9, 0.98]``)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def value_label(value: Any) -> str:
    """A short exact text for a value: floats keep 4 significant digits when that reads back the same number."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:.4g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(value_label(v) for v in value)
    return str(value)


def safe_name(text: str) -> str:
    """``text`` with every character a folder name should not hold replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._,+\-]", "_", text) or "_"
