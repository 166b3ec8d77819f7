"""When the losses compute their costlier diagnostics (SPARC's shortcut gap and sparsity statistics).

They cost a fraction of the loss itself (the shortcut gap is a second fine-grained loss), and only logged steps
read them, so the training loop turns them off on the other steps::

    with diagnostics(step_is_logged):
        terms = loss_fn(**model_out)

Outside any ``with`` they are on, so a direct call of a loss returns everything.
"""

from __future__ import annotations

__all__ = ["diagnostics", "diagnostics_enabled"]

_ENABLED = [True]


def diagnostics_enabled() -> bool:
    return _ENABLED[-1]


class diagnostics:
    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __enter__(self):
        _ENABLED.append(self.enabled)
        return self

    def __exit__(self, *exc):
        _ENABLED.pop()
        return False
