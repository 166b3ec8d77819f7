"""Plugins: a user's own components, registered by importing the module that defines them.

A component registers itself where it is defined (``@losses.register("my_loss")``), so using one from a recipe
only needs its module imported before the recipe is validated. Three ways, all of which end in
:func:`load_plugin`:

- ``sparc --plugin my_loss.py ...`` (a ``.py`` file) or ``sparc --plugin my_pkg.my_loss ...`` (a module importable
  from the current folder or the installed packages); repeatable. The command also adds each one to
  ``SPARC_PLUGINS``, so the processes it starts (``sparc train --nproc``, ``sparc ablate --jobs``) load them too.
- ``SPARC_PLUGINS=my_loss.py,other_module``: comma-separated, read wherever the registries are populated (the
  ``sparc`` command, and :func:`sparc_kit.load_recipe` and everything built on it).
- the entry-point group ``sparc_kit.plugins`` of an installed package (``[project.entry-points."sparc_kit.plugins"]
  my_losses = "my_pkg.losses"``), loaded automatically in the same places. An entry point that names a function
  is called with no arguments.

A plugin that cannot be imported raises :class:`PluginError`, whose message is one line naming the plugin, the
exception and where it was raised.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import traceback
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Iterable

from sparc_kit.errors import SparcError

__all__ = [
    "ENV_VAR",
    "ENTRY_POINT_GROUP",
    "PluginError",
    "load_plugin",
    "load_plugins",
    "ensure_plugins",
    "env_plugins",
]

ENV_VAR = "SPARC_PLUGINS"
ENTRY_POINT_GROUP = "sparc_kit.plugins"

_loaded: dict[str, Any] = {}  # normalised spec (or entry-point value) -> module
_entry_points_loaded = False

_ACCEPTED = "a .py file, or a module importable from the current folder or the installed packages (my_pkg.my_loss)"


class PluginError(SparcError, ImportError):
    """A plugin that could not be imported; ``str()`` is one line naming it and what went wrong."""

    def __init__(self, plugin: str, problem: str):
        self.plugin, self.problem = plugin, problem
        super().__init__(f"plugin {plugin}: {problem}")

    def __reduce__(self):
        return (PluginError, (self.plugin, self.problem))


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _normalise(spec: str) -> str:
    """Files by absolute path (the same file named two ways loads once, and child processes started elsewhere
    find it); module names as given."""
    return os.path.abspath(spec) if _is_file(spec) else spec


def _failure(spec: str, exc: BaseException, path: str | None) -> PluginError:
    """One line: the exception and where it was raised: the innermost line of the plugin's own file when there is
    one, else the innermost line of the traceback."""
    if isinstance(exc, SyntaxError):
        text, where = exc.msg, (os.path.basename(exc.filename or spec), exc.lineno)
    else:
        text = str(exc).splitlines()[0].strip() if str(exc).strip() else ""
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
        inside = [f for f in frames if path is not None and os.path.abspath(f.filename) == path]
        frame = (inside or frames or [None])[-1]
        where = (os.path.basename(frame.filename), frame.lineno) if frame is not None else (None, None)
    line = type(exc).__name__ + (f": {text}" if text else "")
    if where[0] and where[1]:
        line += f" ({where[0]}, line {where[1]})"
    return PluginError(spec, line)


def _module_name_for(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    name = re.sub(r"\W", "_", stem)
    if name.isidentifier() and name not in sys.modules:
        return name  # importable by its own name, as a script's sibling module would be
    return f"sparc_plugin_{abs(hash(path)):x}_{name}"


def _import_file(spec: str, path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise PluginError(spec, f"file not found; expected {_ACCEPTED}")
    name = _module_name_for(path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise PluginError(spec, f"cannot be imported as Python; expected {_ACCEPTED}")
    module = importlib.util.module_from_spec(module_spec)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.append(folder)  # the plugin's own helper modules beside it import as they would for a script
    sys.modules[name] = module  # before running it: dataclasses, pickling and re-entrant imports need it
    _loaded[path] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        _loaded.pop(path, None)
        raise _failure(spec, exc, path) from exc
    return module


def _import_module(spec: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # after the installed packages: a folder of the same name never shadows them
    try:
        found = importlib.util.find_spec(spec)
    except ModuleNotFoundError as exc:  # a parent package that is not there
        found, missing = None, exc.name or spec
    except Exception as exc:  # a parent package that fails to import
        raise _failure(spec, exc, None) from exc
    else:
        missing = spec
    if found is None:
        raise PluginError(spec, f"no module named {missing!r}; expected {_ACCEPTED}")
    origin = os.path.abspath(found.origin) if found.origin and os.path.exists(found.origin) else None
    try:
        module = importlib.import_module(spec)
    except Exception as exc:
        raise _failure(spec, exc, origin) from exc
    _loaded[spec] = module
    return module


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin: the path of a ``.py`` file, or a dotted module name looked up on ``sys.path`` and then
    in the current folder (the ``sparc`` console script does not put the current folder on ``sys.path``; this
    adds it, at the end). Importing the same plugin again returns the module already imported."""
    spec = spec.strip()
    if not spec:
        raise PluginError("''", f"empty name; expected {_ACCEPTED}")
    key = _normalise(spec)
    if key in _loaded:  # loaded already, or being loaded right now (a plugin that loads recipes when imported)
        return _loaded[key]
    return _import_file(spec, key) if _is_file(spec) else _import_module(spec)


def load_plugins(specs: Iterable[str], export: bool = False) -> list[ModuleType]:
    """Import each plugin in order. ``export``: also add them to ``SPARC_PLUGINS`` (files by absolute path), so
    that processes started from this one load them too."""
    specs = [s.strip() for s in specs if s and s.strip()]
    modules = [load_plugin(spec) for spec in specs]
    if export and specs:
        known = env_plugins()
        extra = [_normalise(s) for s in specs if _normalise(s) not in [_normalise(k) for k in known]]
        os.environ[ENV_VAR] = ",".join(known + extra)
    return modules


def env_plugins() -> list[str]:
    """The plugins named by ``SPARC_PLUGINS`` (comma-separated)."""
    return [s.strip() for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]


def ensure_plugins() -> None:
    """Load the installed packages' ``sparc_kit.plugins`` entry points and the plugins ``SPARC_PLUGINS`` names,
    those not loaded yet. Called wherever the registries are populated; raises :class:`PluginError`."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            key = f"entry point {ep.value}"
            if key in _loaded:
                continue
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, type):
                    obj()
            except Exception as exc:
                raise _failure(f"{ep.name} (entry point {ep.value!r}, group {ENTRY_POINT_GROUP})", exc, None) from exc
            _loaded[key] = obj if isinstance(obj, ModuleType) else sys.modules.get(getattr(obj, "__module__", ""), obj)
        _entry_points_loaded = True
    for spec in env_plugins():
        try:
            load_plugin(spec)
        except PluginError as exc:
            raise PluginError(f"{exc.plugin} (from {ENV_VAR})", exc.problem) from exc.__cause__
