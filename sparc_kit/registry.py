"""Component registries.

One :class:`Registry` type, one instance per component kind. A component registers itself where it is
defined::

    from sparc_kit.registry import losses

    @losses.register("sparc")
    class SparcLoss(nn.Module):
        def __init__(self, lambda_g: float = 0.5, lambda_f: float = 1.0): ...

Each entry carries a pydantic config model. When none is given it is derived from the builder's signature
(typed arguments with defaults), so the defaults live in one place: the component's own ``__init__``. A recipe's
``{name: sparc, lambda_f: 5.0}`` is validated against that model with ``extra="forbid"``, so a typo in a
parameter name is an error, never silently ignored.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import pkgutil
import re
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, create_model

from sparc_kit.errors import ComponentError, SparcError

__all__ = [
    "Registry",
    "Entry",
    "UnknownComponentError",
    "vision_encoders",
    "text_encoders",
    "poolers",
    "losses",
    "datasets",
    "engines",
    "attention_backends",
    "evaluators",
    "loggers",
    "kinds",
    "get_registry",
    "suggest",
    "import_submodules",
]


class UnknownComponentError(SparcError, KeyError):
    """A component name that is not registered under its kind."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(self.message)

    @property
    def message(self) -> str:
        hint = suggest(self.name, self.known)
        did_you_mean = f" Did you mean {hint!r}?" if hint else ""
        return f"unknown {self.kind} {self.name!r}.{did_you_mean} Known: {', '.join(self.known) or '(none)'}"

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def suggest(name: str, known: list[str]) -> str | None:
    """The closest known name, or None when nothing is close."""
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return match[0] if match else None


class ComponentConfig(BaseModel):
    """Base of every component's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    builder: Callable[..., Any]
    config: type[ComponentConfig]
    doc: str
    #: arguments the code that builds the component supplies (the model builder passes the recipe's attention
    #: switch, a pooler gets its tower's width): not recipe parameters, left out of :attr:`config`
    supplied: tuple[str, ...] = ()
    #: ``check(recipe, path) -> list[str]``: problems of a whole validated recipe that this component, found at
    #: the dotted ``path`` of the recipe (``model.vision``, ``engine``), can see and a field-level schema cannot
    #: (heads that do not divide the width, a DeepSpeed pass-through key that contradicts the train section); one
    #: line each, reported with the recipe's other errors.
    check: Callable[[Any, str], list[str]] | None = None

    def build(
        self, params: dict[str, Any] | BaseModel | None = None, offer: dict[str, Any] | None = None, **extra: Any
    ) -> Any:
        """Validate ``params`` against the config model and call the builder.

        ``offer``: values the caller can supply (``{"attention": ..., "width": ...}``); the builder gets those it
        declares in :attr:`supplied` and no others, so one offer serves every component of a kind. ``extra`` is
        passed as it is."""
        if isinstance(params, BaseModel):
            params = params.model_dump(exclude={"name"})
        values = self.config.model_validate(dict(params or {})).model_dump()
        values.update({k: v for k, v in (offer or {}).items() if k in self.supplied})
        values.update(extra)
        try:
            return self.builder(**values)
        except ComponentError:
            raise
        except ValueError as exc:  # the builder refused the recipe's values: bad input, not a bug
            raise ComponentError(str(exc)) from exc

    def parameters(self) -> list[tuple[str, str, Any]]:
        """(name, type, default) for each parameter, for listings."""
        rows = []
        for field_name, field in self.config.model_fields.items():
            bounds = [
                f"{op} {getattr(m, attr)}"
                for m in field.metadata
                for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                if getattr(m, attr, None) is not None
            ]  # PositiveInt and friends: "int > 0"
            rows.append((field_name, " ".join([_type_name(field.annotation), *bounds]), field.default))
        return rows


def _type_name(annotation: Any) -> str:
    if annotation is None:
        return "None"

    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def config_from_signature(
    name: str, builder: Callable[..., Any], supplied: tuple[str, ...] = ()
) -> type[ComponentConfig]:
    """A pydantic model whose fields are the builder's keyword arguments.

    Arguments without a default are required; arguments without an annotation accept anything. ``*args``,
    ``**kwargs`` and the ``supplied`` arguments (filled in by whoever builds the component, e.g. the model
    builder passes the recipe's one attention switch) are not parameters a recipe can set.
    """
    target = builder.__init__ if inspect.isclass(builder) else builder
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target, include_extras=True)  # keep Annotated constraints (PositiveInt)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    fields: dict[str, Any] = {}
    for pname, param in sig.parameters.items():
        if pname == "self" or pname in supplied or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(pname, param.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = Any
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, default)
    model_name = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) + "Config"
    return create_model(model_name, __base__=ComponentConfig, **fields)


class Registry:
    """Named builders of one kind of component."""

    def __init__(self, kind: str, description: str = ""):
        self.kind = kind
        self.description = description
        self._entries: dict[str, Entry] = {}
        self.version = 0  # bumped on every registration so cached recipe schemas know to rebuild

    def register(
        self,
        name: str,
        config: type[BaseModel] | None = None,
        *,
        supplied: tuple[str, ...] = (),
        override: bool = False,
        check: Callable[[Any, str], list[str]] | None = None,
        internal: tuple[str, ...] = (),
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``builder`` under ``name``.

        ``config`` is the parameter model; by default it is derived from the builder's signature, leaving out
        the ``supplied`` arguments (those its builder is given by the code that builds it; ``internal`` is their
        earlier name, still accepted from plugins). ``check(recipe, path)`` returns the problems of a whole recipe that uses this
        component (see :attr:`Entry.check`). Registering a name twice warns (as timm does) unless
        ``override=True``; the later registration wins.
        """

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and not override:
                old = self._entries[name].builder
                if getattr(old, "__qualname__", None) != getattr(builder, "__qualname__", None) or (
                    getattr(old, "__module__", None) != getattr(builder, "__module__", None)
                ):
                    warnings.warn(
                        f"{self.kind} {name!r} is registered again ({_where(builder)} replaces {_where(old)})",
                        stacklevel=2,
                    )
            given = tuple(supplied) + tuple(internal)
            cfg = config or config_from_signature(name, builder, given)
            if not issubclass(cfg, BaseModel):
                raise TypeError(f"config for {self.kind} {name!r} must be a pydantic model")
            doc = inspect.getdoc(builder) or ""
            summary = _plain(doc.split("\n\n")[0].replace("\n", " "))
            self._entries[name] = Entry(self.kind, name, builder, cfg, summary, given, check)
            self.version += 1
            return builder

        return decorator

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self.kind, name, self.names()) from None

    def build(
        self, name: str, params: dict[str, Any] | BaseModel | None = None, offer: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Any:
        return self.get(name).build(params, offer, **extra)

    def names(self, pattern: str | None = None) -> list[str]:
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _plain(text: str) -> str:
    """A docstring's reStructuredText markup as plain text, for listings: ``x`` and :mod:`a.b` become x and a.b."""
    text = re.sub(r":[\w.]+:`~?([^`<]+?)(?:\s*<[^>]*>)?`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def _where(builder: Callable[..., Any]) -> str:
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', '?')}"


vision_encoders = Registry("vision_encoder", "image towers returning patch tokens")
text_encoders = Registry("text_encoder", "text towers returning token features")
poolers = Registry("pooler", "turn a sequence of features into one global embedding")
losses = Registry("loss", "training objectives: global, fine-grained and combined")
datasets = Registry("dataset", "image-text training data")
engines = Registry("engine", "how the training loop runs: device, precision, backward and optimizer step")
attention_backends = Registry("attention", "scaled dot-product attention kernels")
evaluators = Registry("evaluator", "evaluations run by sparc eval and during training (options: the eval: entries)")
loggers = Registry("logger", "where a run's metrics go while it trains (train.loggers; jsonl is always on)")

_REGISTRIES: dict[str, Registry] = {
    r.kind: r
    for r in (
        vision_encoders, text_encoders, poolers, losses, datasets, engines, attention_backends, evaluators, loggers
    )
}


def kinds() -> list[str]:
    return list(_REGISTRIES)


def get_registry(kind: str) -> Registry:
    """The registry of one kind; accepts the plural too (``losses``)."""
    key = kind
    if key not in _REGISTRIES:
        for k in _REGISTRIES:
            if kind in (k + "s", k + "es", k.replace("_", "-"), k.replace("_", "-") + "s"):
                key = k
    if key not in _REGISTRIES:
        raise UnknownComponentError("component kind", kind, kinds())
    return _REGISTRIES[key]


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a component package (``import_submodules(__name__, __path__)`` at the end of its
    ``__init__``), so that each registers its components: a new loss, encoder or evaluator is one new file in its
    package and nothing else to edit. Modules whose name starts with ``_`` are left alone."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
