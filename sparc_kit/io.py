"""Files: the one way the package writes a file atomically and the one way it reads a torch file.

:func:`atomic_write` / :func:`atomic_open` write to a hidden temporary file in the target's folder
(``.tmp-NAME-XXXX``) and rename it into place, so a reader (or a resume after a crash or SIGKILL) sees the old
file or the new one, never half of one; a failed write removes its temporary file. :func:`load_torch_file` is
``torch.load(weights_only=True)`` with one-line errors: a pickle that would run code is refused unrun.
:func:`is_number` / :func:`numbers`: which values of a metrics row (or an evaluation file) are measurements.

This module imports nothing of the package but :mod:`sparc_kit.errors`: every layer may use it.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import tempfile
from typing import IO, Any, Iterator

from sparc_kit.errors import SparcError

__all__ = [
    "atomic_path", "atomic_open", "atomic_write", "load_torch_file", "WeightsFileError", "TMP_PREFIX", "is_number",
    "numbers",
]

#: every temporary name the package writes starts with this; a clean-up of a folder may remove such leftovers
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """``with atomic_path(path) as tmp: writer(tmp)``: a temporary name beside ``path`` for a writer that takes a
    file name (safetensors, torch.save), renamed onto ``path`` when the block ends without an error (permissions
    0644); on an error the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.path.basename(path)}-")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """``with atomic_open(path) as f: ...`` writes ``f`` to a temporary file beside ``path`` and renames it onto
    ``path`` when the block ends without an error (permissions 0644, as ``open`` would leave them); on an error the
    temporary file is removed and ``path`` is untouched. ``mode`` is ``"w"`` or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}; use 'w' or 'wb'")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
        yield f


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically (:func:`atomic_open`)."""
    if isinstance(data, str):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(data)
    else:
        with atomic_open(path, "wb") as f:
            f.write(data)


class WeightsFileError(SparcError, ValueError):
    """A torch file that cannot be loaded as tensors only: a pickle that would run code or build other objects,
    or a file that is not a torch file at all."""


def load_torch_file(source: Any, name: str | None = None) -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU: tensors, numbers, strings and containers only.

    A file whose pickle names anything else (a class whose ``__reduce__`` calls ``os.system``) is refused by the
    unpickler before any of it runs; that, and a file that is not a torch file, raise :class:`WeightsFileError`
    with one line naming the file (``name``, default ``str(source)``). Meant for every torch file the package
    reads (timm weights, a checkpoint's ``trainer.pt``).
    """
    import torch

    name = name or str(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
        if found:
            what = f"it would call {found.group(1)}"
        else:
            what = "its pickle holds more than tensors" + (f": {detail.group(1)[:100]}" if detail else "")
        raise WeightsFileError(
            f"{name}: not a weights-only file ({what}); refused without running anything: only tensors, numbers, "
            "strings and containers are loaded (torch.load weights_only=True)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:  # not a zip / legacy torch file, or cut short
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise WeightsFileError(f"{name}: not a readable torch file ({first})") from None


def is_number(value: Any) -> bool:
    """A finite int or float (booleans and text are not measurements)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a row, as floats."""
    return {k: float(v) for k, v in row.items() if is_number(v)}
