"""The earlier home of :mod:`sparc_kit.checkpoint`, which moved below the engines (they write checkpoints too);
scripts that import from here keep working."""

from sparc_kit.checkpoint import *  # noqa: F401,F403
from sparc_kit.checkpoint import __all__  # noqa: F401
