"""Opening fsspec filesystems by URL, with one-line errors for a scheme that cannot be used here.

fsspec knows many schemes (``s3://``, ``gs://``, ``az://``, ``hf://``, ...) but each needs its own package
(``s3fs``, ``gcsfs``, ...), imported only when a filesystem is first opened. Without it fsspec raises an
``ImportError`` deep inside a data-loader worker, or inside the code that reads a recipe. Every URL the data
pipeline reads is checked here first (:func:`check_url`) and opened here (:func:`filesystem`), so a missing
package is one line naming the recipe field and what to install::

    data.urls: s3:// needs the s3fs package: pip install "sparc-kit[s3]"

The package and the message come from fsspec's own registry (``fsspec.registry.known_implementations``), so
every scheme fsspec knows is covered; a scheme fsspec does not know is one line too.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.core import split_protocol
from fsspec.registry import known_implementations

from sparc_kit.errors import SparcError

__all__ = ["FilesystemUnavailableError", "check_url", "filesystem", "protocols"]

# packages sparc-kit has an extra for (pyproject.toml): `pip install "sparc-kit[s3]"`
EXTRAS = {"s3fs": "s3", "gcsfs": "gcs"}


class FilesystemUnavailableError(SparcError, ValueError):
    """A URL whose scheme fsspec does not know, or whose filesystem package is not installed."""


def protocols(url: str) -> list[str]:
    """The schemes of a URL, outermost first (``simplecache::s3://b/x`` -> ``["simplecache", "s3"]``); none for a
    local path."""
    out = []
    for part in str(url).split("::"):
        protocol, _ = split_protocol(part)
        if protocol and protocol not in ("file", "local"):
            out.append(protocol)
    return out


def _unavailable(protocol: str, field: str) -> str | None:
    """Why ``protocol`` cannot be used here (one line), or None when its filesystem class imports."""
    try:
        fsspec.get_filesystem_class(protocol)
        return None
    except ValueError:
        return (
            f"{field}: unknown URL scheme {protocol}://; fsspec knows s3://, gs://, az://, hf://, https://, memory:// "
            "and more (fsspec.available_protocols())"
        )
    except ImportError as exc:
        entry = known_implementations.get(protocol, {})
        package = entry.get("class", "").split(".")[0]
        if package in EXTRAS:
            return f'{field}: {protocol}:// needs the {package} package: pip install "sparc-kit[{EXTRAS[package]}]"'
        reason = entry.get("err") or str(exc).splitlines()[0]
        if package and package != "fsspec":
            return f"{field}: {protocol}:// needs the {package} package ({reason})"
        return f"{field}: {protocol}:// needs a package that is not installed ({reason})"
    except Exception as exc:  # an installed package that fails to import (broken install, wrong version)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{field}: {protocol}:// cannot be used here: its filesystem failed to load ({type(exc).__name__}: {first})"


def check_url(url: str, field: str) -> None:
    """Raise :class:`FilesystemUnavailableError` (one line naming ``field``) when ``url`` cannot be opened here
    for want of a filesystem package, or because fsspec does not know its scheme. Local paths always pass."""
    for protocol in protocols(url):
        problem = _unavailable(protocol, field)
        if problem:
            raise FilesystemUnavailableError(problem)


def filesystem(url: str, storage_options: dict[str, Any] | None = None, field: str = "path"):
    """The fsspec filesystem of ``url``'s scheme (``file`` for a local path), built with ``storage_options``,
    after :func:`check_url`."""
    check_url(url, field)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = (storage_options or {}) if protocol != "file" else {}
    return fsspec.filesystem(protocol, **options)
