"""Stopping a run: Ctrl-C or SIGTERM lets the current step finish and saves it (:class:`StopSignals`,
:class:`TrainingInterrupted`), and work only the main process does (writing the run folder, evaluating) either
succeeds on every process or fails on every process with the main process's error (:func:`on_main`)."""

from __future__ import annotations

import contextlib
import pickle
import signal
from typing import Any, Callable

from sparc_kit.engines.base import Engine

__all__ = ["TrainingInterrupted", "FromMainProcess", "StopSignals", "SetupInterrupts", "check_interrupted", "on_main", "portable"]


class TrainingInterrupted(RuntimeError):
    """A run stopped by Ctrl-C or SIGTERM. ``saved``: a checkpoint of ``step`` was written now; otherwise
    ``step`` is the newest checkpoint on disk (0: none), which a rerun resumes from."""

    def __init__(self, step: int, out_dir: str, saved: bool = True):
        self.step, self.out_dir, self.saved = step, out_dir, saved
        if saved:
            message = f"interrupted after step {step}; checkpoint saved in {out_dir}; run again to resume"
        elif step:
            message = (
                f"interrupted inside a step; nothing new was saved: run again to resume from the checkpoint of step "
                f"{step} in {out_dir}"
            )
        else:
            message = f"interrupted before the first checkpoint; nothing was saved in {out_dir}"
        super().__init__(message)

    def __reduce__(self):
        return (TrainingInterrupted, (self.step, self.out_dir, self.saved))


class FromMainProcess(RuntimeError):
    """An error rank 0 met that cannot travel to the other processes as itself (it did not pickle)."""


def portable(exc: BaseException) -> BaseException:
    try:
        clone = pickle.loads(pickle.dumps(exc))
        if type(clone) is type(exc) and str(clone) == str(exc):
            return exc
    except Exception:
        pass
    return FromMainProcess(str(exc))


def on_main(engine: Engine, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; every process returns its result or raises its error (so no process waits for
    a rank 0 that has given up). Errors raised on the other processes carry ``from_main = True``."""
    if engine.world_size == 1:
        return fn()
    result, error = None, None
    if engine.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every process
            error = exc
    error, result = engine.broadcast_object((portable(error) if error is not None else None, result))
    if error is not None:
        if not engine.is_main:
            error.from_main = True
        raise error
    return result


class SetupInterrupts:
    """Ctrl-C while a run is being set up (data, tokenizer, model, engine) stops it at once, as Python's own handler
    does, by raising ``KeyboardInterrupt``. Some C code clears an exception raised from a signal handler and goes
    on (numpy picking from a list does, seen while the synthetic captions are drawn for the tokenizer), which would
    lose the interrupt and train the whole run; the handler also records it, and :func:`check_interrupted` raises
    it again at the set-up's next step (before the tokenizer is trained, before the run folder is written, before
    the first step)."""

    active: list["SetupInterrupts"] = []

    def __init__(self):
        self.seen, self.previous = False, None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: Python's own handling stays
            self.previous = signal.signal(signal.SIGINT, self._handle)
        SetupInterrupts.active.append(self)
        return self

    def _handle(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        SetupInterrupts.active.remove(self)
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def check_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when a Ctrl-C during the set-up was swallowed on its way (:class:`SetupInterrupts`)."""
    for setup in SetupInterrupts.active:
        setup.check()


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C, a scheduler's preemption, torchrun stopping the job) ask for a stop at the end
    of the current step, whatever the step was doing (most of its time is backward and the update): the step
    completes, a checkpoint is saved, the run stops. With several processes they agree on it in that step's
    all-reduce and save together. Pressing Ctrl-C again stops at once (a terminal's Ctrl-C reaches each process
    of a launched run twice, directly and passed on by the launcher, so there it is the third)."""

    def __init__(self, force_after: int):
        self.force_after, self.requested, self.previous = force_after, False, {}
        self.interrupts = 0

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: Python's own handling stays
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= self.force_after:
                raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
