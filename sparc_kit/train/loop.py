"""The training loop: step-based, always resumable from its run folder (big_vision's habit).

``train(recipe, out_dir)`` builds everything from the recipe, resumes from the newest checkpoint in
``out_dir/checkpoints`` when there is one, and writes the run folder:

- ``recipe.yaml``: the fully resolved recipe;
- ``tokenizer.model``: the SentencePiece model (trained from the captions when the recipe names none);
- ``metrics.jsonl``: one JSON object per logged step (``step``, ``loss``, the loss terms and diagnostics,
  ``lr``, ``grad_norm``, ``samples_per_s``, ``samples_seen``, ``skipped_samples``, ``truncated_captions``,
  ``elapsed_s``, and ``eval/NAME/METRIC`` at the steps the recipe's evaluations run);
- ``checkpoints/step_N/``: see :mod:`sparc_kit.checkpoint`.

The loop keeps one :class:`~sparc_kit.train.state.TrainState` and calls one
:func:`~sparc_kit.train.step.train_step` per step; everything about devices and processes is the engine's
(:mod:`sparc_kit.engines`). With several processes only rank 0 writes the run folder (recipe, tokenizer,
metrics, progress, the checkpoint's files) and evaluates; every process reads the same checkpoint back.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import yaml

from sparc_kit.config import canonical_values, dump_recipe
from sparc_kit.errors import require_recipe
from sparc_kit.data import Collate, Tokenizer, build_dataset, make_train_loader
from sparc_kit.engines.base import BatchLayout, Engine, EngineSetupError, OptimizerSpec, param_groups
from sparc_kit.errors import RunError
from sparc_kit.evaluate import check_eval_data, evaluate_during_training
from sparc_kit.evaluate.runner import evaluations_due
from sparc_kit.losses import build_loss
from sparc_kit.losses.diagnostics import diagnostics
from sparc_kit.losses.distributed import local_only
from sparc_kit.models import build_model
from sparc_kit.registry import engines
from sparc_kit.checkpoint import (
    WRITE_DELAY_ENV,
    ResumeWarning,
    latest_checkpoint,
    read_checkpoint_state,
    resume_checkpoint,
    save_train_checkpoint,
    write_pause,
)
from sparc_kit.train.module import TrainModule
from sparc_kit.train.schedule import lr_factor
from sparc_kit.train.state import TrainState
from sparc_kit.train.step import NonFiniteLossError, train_step

__all__ = [
    "train",
    "TrainResult",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "ResumeMismatchError",
    "RunFolderBusyError",
    "TooManyBadSamplesError",
    "build_tokenizer",
    "build_loss",
    "build_engine",
    "read_metrics",
]


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


class RunFolderBusyError(RunError, RuntimeError):
    """Another process is training into the same run folder."""


@contextlib.contextmanager
def _run_lock(out_dir: str):
    """An exclusive lock on ``out_dir/.lock`` for the whole run: two trainers in one folder would interleave
    their checkpoints and metrics. The lock is released by the OS if the process dies."""
    import fcntl

    path = os.path.join(out_dir, ".lock")
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise RunFolderBusyError(
                f"run folder {out_dir} is in use by another training process (pid {owner}); wait for it, or use "
                "another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ResumeMismatchError(RunError, ValueError):
    """The run folder holds a checkpoint of a different model or tokenizer than the recipe asks for."""


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    resumed_from: int | None
    first_loss: float | None
    final_loss: float | None
    seconds: float
    metrics: list[dict[str, Any]] = field(default_factory=list)


def build_engine(recipe: Any) -> Engine:
    """The recipe's engine, told the device and precision of the ``train`` section."""
    return engines.get(recipe.engine.name).build(
        recipe.engine, offer={"device": recipe.train.device, "precision": recipe.train.precision}
    )


def build_tokenizer(recipe: Any, dataset: Any = None, run_dir: str | None = None) -> Tokenizer:
    """The recipe's tokenizer file, else the run folder's (on resume), else one trained on the captions."""
    t = recipe.tokenizer
    kwargs = dict(context_length=t.context_length, lowercase=t.lowercase, add_eos=t.add_eos)
    if t.path:
        return Tokenizer.load(t.path, **kwargs)
    if run_dir and os.path.exists(os.path.join(run_dir, "tokenizer.model")):
        return Tokenizer.load(os.path.join(run_dir, "tokenizer.model"), **kwargs)
    if dataset is None:
        dataset = build_dataset(recipe)
    if hasattr(dataset, "captions"):
        captions = list(dataset.captions(t.train_captions))
    else:
        captions = [dataset[i]["caption"] for i in range(min(len(dataset), t.train_captions))]
    tokenizer = Tokenizer.train(captions, vocab_size=t.vocab_size, model_type=t.model_type, **kwargs)
    cut = tokenizer.truncated_fraction(captions)
    if cut > 0.05:
        warnings.warn(
            f"{cut:.0%} of the training captions are longer than tokenizer.context_length={t.context_length} "
            f"with {tokenizer.vocab_size} {t.model_type} pieces and lose their end; raise context_length or "
            "vocab_size",
            stacklevel=2,
        )
    return tokenizer


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
    return rows


def _append_row(f, row: dict[str, Any]) -> None:
    """One metrics row, flushed (a crash can cut the line short: the next start drops a cut line)."""
    line = json.dumps(row) + "\n"
    if os.environ.get(WRITE_DELAY_ENV):  # fault tests: hold the row half-written for a while
        f.write(line[: len(line) // 2])
        f.flush()
        write_pause()
        line = line[len(line) // 2 :]
    f.write(line)
    f.flush()


def _truncate_metrics(run_dir: str, last_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from: those steps are trained again."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    path = os.path.join(run_dir, "metrics.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _check_resume(run_dir: str, recipe: Any) -> None:
    path = os.path.join(run_dir, "recipe.yaml")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = canonical_values(yaml.safe_load(f) or {})
    new = recipe.model_dump(mode="json")
    diffs = []
    for section in ("model", "tokenizer"):
        for key, (a, b) in _diff(old.get(section), new.get(section), section).items():
            diffs.append(f"{key} (checkpoint: {a!r}, recipe: {b!r})")
    if diffs:
        raise ResumeMismatchError(
            f"run folder {run_dir} holds a checkpoint of another model: {'; '.join(diffs[:4])}. "
            "Use a new --out folder, or the recipe the run was started with"
        )


def _diff(a: Any, b: Any, prefix: str) -> dict[str, tuple[Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(a) | set(b)):
            out.update(_diff(a.get(key), b.get(key), f"{prefix}.{key}"))
        return out
    return {} if a == b else {prefix: (a, b)}


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # a stream of unknown length
        return None


class TooManyBadSamplesError(RunError, RuntimeError):
    """More than ``train.max_skip_fraction`` of the samples read were unreadable."""


def _check_skips(counts: dict[str, int], max_fraction: float, step: int) -> None:
    total = counts["read"] + counts["skipped"]
    # judged once a few hundred samples were read, so one bad sample early on cannot stop a run
    if total >= 200 and counts["skipped"] > max_fraction * total:
        raise TooManyBadSamplesError(
            f"{counts['skipped']} of {total} samples read by step {step} were unreadable "
            f"({counts['skipped'] / total:.1%} > train.max_skip_fraction={max_fraction}); "
            "check the data with `sparc data verify`, or raise train.max_skip_fraction"
        )


def _resume_point(root: str) -> str | None:
    """The checkpoint to resume from; a warning of one line when a newer one had to be passed over."""
    path, note = resume_checkpoint(root)
    if note:
        warnings.warn(note, ResumeWarning, stacklevel=2)
    return path


def _ckpt_step(root: str) -> int:
    path = latest_checkpoint(root)
    return int(os.path.basename(path).split("_")[1]) if path else 0


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _Reporter:
    """A live progress bar on a terminal; one plain line per logged step elsewhere (CI logs, files)."""

    def __init__(self, total: int, start: int, enabled: bool, live: bool | None = None):
        self.total, self.start = total, start
        self.enabled = enabled
        self.live = sys.stderr.isatty() if live is None else live
        self.progress = None
        if enabled and self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, row: dict[str, Any] | None, eta_s: float) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            info = _summary(row) if row else None
            self.progress.update(self.task, completed=step, **({"info": info} if info else {}))
        elif row is not None:
            print(f"step {step}/{self.total}  {_summary(row)}  eta {_duration(eta_s)}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _summary(row: dict[str, Any]) -> str:
    parts = [f"loss {row['loss']:.4f}"]
    for key, label in (("global_loss", "global"), ("fine_loss", "fine")):
        if key in row:
            parts.append(f"{label} {row[key]:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['samples_per_s']:.0f} samples/s")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# several processes: rank 0 does the run folder's work, and everyone learns how it went


class FromMainProcess(RuntimeError):
    """An error rank 0 met that cannot travel to the other processes as itself (it did not pickle)."""


def _portable(exc: BaseException) -> BaseException:
    try:
        clone = pickle.loads(pickle.dumps(exc))
        if type(clone) is type(exc) and str(clone) == str(exc):
            return exc
    except Exception:
        pass
    return FromMainProcess(str(exc))


def _on_main(engine: Engine, fn: Callable[[], Any]) -> Any:
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
    error, result = engine.broadcast_object((_portable(error) if error is not None else None, result))
    if error is not None:
        if not engine.is_main:
            error.from_main = True
        raise error
    return result


class _StopSignals:
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


# ---------------------------------------------------------------------------------------------------------------


def train(
    recipe: Any,
    out_dir: str,
    *,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``recipe`` into ``out_dir``, resuming from its newest checkpoint.

    Every process of a multi-process run calls this with the same arguments (``sparc train --nproc``, torchrun,
    srun: the engine finds its process group). ``callback(step, values)`` is called at the end of every step,
    after logging and checkpointing (for tests and notebooks). Ctrl-C or SIGTERM lets the current step finish,
    saves a checkpoint of it and raises :class:`TrainingInterrupted` (a second Ctrl-C stops at once); a non-finite loss raises :class:`NonFiniteLossError` before the
    update is applied. The run folder is locked for the duration (:class:`RunFolderBusyError` for a second
    trainer).
    """
    require_recipe(recipe, "train")
    engine = build_engine(recipe)  # fails before the run folder is touched (e.g. DeepSpeed not installed)
    try:
        engine.start()
        layout = BatchLayout(recipe.train.batch_size, engine.world_size, recipe.train.accum_steps)
        with contextlib.ExitStack() as stack:
            if not engine.is_main:  # rank 0 speaks for the run
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")

            def take_lock() -> None:  # held by rank 0 until the run ends
                os.makedirs(out_dir, exist_ok=True)
                stack.enter_context(_run_lock(out_dir))

            _on_main(engine, take_lock)
            return _train(recipe, out_dir, engine, layout, progress, callback)
    finally:
        engine.close()


def _prepare_run_folder(recipe: Any, out_dir: str, dataset: Any, ckpt_path: str | None, engine: Engine) -> None:
    """Rank 0's part of starting a run: every check first (so a refused run changes nothing in the folder),
    then the tokenizer and ``recipe.yaml``."""
    if recipe.eval:
        check_eval_data(recipe.eval)
    saved = read_checkpoint_state(ckpt_path) if ckpt_path else None
    if saved is not None:
        _check_resume(out_dir, recipe)
        _check_engine_resume(saved, recipe, engine, dataset, out_dir)
    tokenizer = build_tokenizer(recipe, dataset, out_dir if ckpt_path else None)
    if tokenizer.vocab_size > recipe.tokenizer.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} pieces but tokenizer.vocab_size is {recipe.tokenizer.vocab_size}"
        )
    tokenizer.save(os.path.join(out_dir, "tokenizer.model"))
    with open(os.path.join(out_dir, "recipe.yaml.tmp"), "w") as f:
        f.write(dump_recipe(recipe))
    os.replace(os.path.join(out_dir, "recipe.yaml.tmp"), os.path.join(out_dir, "recipe.yaml"))
    if saved is not None:
        _truncate_metrics(out_dir, int(saved["step"]))
    elif os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        _truncate_metrics(out_dir, 0)


def _check_engine_resume(saved: dict[str, Any], recipe: Any, engine: Engine, dataset: Any, out_dir: str) -> None:
    """What a checkpoint of another engine, process count or worker count can and cannot be resumed with."""
    old_engine = saved.get("engine", "local")
    old_world = int(saved.get("world_size", 1))
    torch_format = {"local", "ddp"}
    if (old_engine in torch_format) != (engine.name in torch_format):
        raise EngineSetupError(
            f"run folder {out_dir} was trained with engine {old_engine!r}, whose checkpoints engine "
            f"{engine.name!r} cannot resume; resume with --set engine.name={old_engine}, or use a new --out"
        )
    if engine.name == "deepspeed" and old_engine == "deepspeed":
        old_stage = saved.get("zero_stage")
        if old_world != engine.world_size or (old_stage is not None and old_stage != recipe.engine.zero_stage):
            raise EngineSetupError(
                f"run folder {out_dir} holds a DeepSpeed ZeRO-{old_stage} checkpoint of {old_world} processes; "
                f"resume it with {old_world} processes (--nproc {old_world}) and engine.zero_stage={old_stage}, "
                "or use a new --out"
            )
    started_workers = saved.get("num_workers", recipe.train.num_workers)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if started_workers != recipe.train.num_workers:
            raise ResumeMismatchError(
                f"run folder {out_dir} was trained with train.num_workers={started_workers}; a streaming dataset's "
                f"sample order depends on it, so resume with --set train.num_workers={started_workers}"
            )
        if old_world != engine.world_size:
            raise EngineSetupError(
                f"run folder {out_dir} was trained by {old_world} process(es) on a streaming dataset, whose sample "
                f"order depends on the process count; resume with {old_world} process(es)"
            )


def _next_batch(
    batches, engine: Engine, state: TrainState, global_batch: int, max_skip: float, epoch_size: int | None = None
):
    """The next usable batch, all processes together. A batch whose every sample on some process was
    unreadable is counted and passed over by every process (they must step together). Passing over a whole
    epoch's worth of samples (``epoch_size``) without one usable batch stops the run, whatever
    ``train.max_skip_fraction`` allows: the data holds nothing to train on, and the loop would never end."""
    passed_over = 0
    while True:
        batch = next(batches)
        state.samples_seen += global_batch  # the stream position: every batch taken counts, usable or not
        local = torch.tensor(
            [batch["images"].shape[0], int(batch.pop("skipped")), int(batch.pop("truncated")),
             float(batch["images"].shape[0] == 0)]
        )
        if engine.world_size > 1:
            local = engine.all_reduce_mean(local) * engine.world_size
        read, skipped, truncated, empty = (int(round(float(v))) for v in local)
        for key, value in (("read", read), ("skipped", skipped), ("truncated", truncated)):
            state.counts[key] += value
        _check_skips(state.counts, max_skip, state.step + 1)
        if not empty:
            return batch
        passed_over += global_batch
        if epoch_size and passed_over >= epoch_size:
            raise TooManyBadSamplesError(
                f"no usable batch in {passed_over} samples read by step {state.step + 1}, a whole pass over the "
                f"{epoch_size} samples of the data ({state.counts['skipped']} unreadable so far); check the data "
                "with `sparc data verify`"
            )


def _train(recipe: Any, out_dir: str, engine: Engine, layout: BatchLayout, progress: bool, callback) -> TrainResult:
    t0 = time.perf_counter()
    cfg_train, cfg_optim = recipe.train, recipe.optim
    ckpt_root = os.path.join(out_dir, "checkpoints")
    ckpt_path = _on_main(engine, lambda: _resume_point(ckpt_root))  # every process gets rank 0's answer

    torch.manual_seed(cfg_train.seed)  # the same initial weights on every process
    dataset = build_dataset(recipe)
    _on_main(engine, lambda: _prepare_run_folder(recipe, out_dir, dataset, ckpt_path, engine))
    tokenizer = build_tokenizer(recipe, dataset, out_dir)  # every process reads rank 0's tokenizer.model

    model = build_model(recipe)
    module = TrainModule(model, build_loss(recipe))  # some losses own parameters (SigLIP's bias, MGCA's attention)
    optimizer = OptimizerSpec(
        param_groups(module, cfg_optim.weight_decay),
        lr=cfg_optim.lr,
        betas=tuple(cfg_optim.betas),
        eps=cfg_optim.eps,
        weight_decay=cfg_optim.weight_decay,
    )
    engine.setup(module, optimizer, layout, cfg_optim.grad_clip)

    state = TrainState()
    if ckpt_path:
        saved = read_checkpoint_state(ckpt_path)
        engine.load(ckpt_path, saved["trainer"])
        rngs = saved["trainer"]["rng"]
        rngs = rngs if isinstance(rngs, list) else [rngs]  # one state before multi-process runs
        _set_rng_state(rngs[engine.rank] if engine.rank < len(rngs) else rngs[0])
        state = TrainState.from_json(saved)
    start_step = state.step

    total = cfg_train.steps
    global_batch = layout.global_batch
    image_size = getattr(model.vision, "image_size", None) or recipe.model.vision.image_size
    loader = make_train_loader(
        dataset,
        Collate(tokenizer, image_size),
        layout.per_rank,
        seed=cfg_train.seed,
        samples_seen=state.samples_seen,
        rank=engine.rank,
        world_size=engine.world_size,
        num_workers=cfg_train.num_workers,
    )
    committed = TrainState(**{**state.__dict__, "counts": dict(state.counts)})  # what a checkpoint records
    t_loop = time.perf_counter()

    def checkpoint(step_state: TrainState) -> None:
        save_train_checkpoint(
            ckpt_root,
            step_state.step,
            engine,
            {
                **step_state.to_json(),
                "trained_s": step_state.trained_s + time.perf_counter() - t_loop,
                "num_workers": cfg_train.num_workers,
                "engine": engine.name,
                "world_size": engine.world_size,
                "accum_steps": layout.accum_steps,
                **({"zero_stage": recipe.engine.zero_stage} if engine.name == "deepspeed" else {}),
            },
            _rng_state(),
            keep=cfg_train.keep_checkpoints,
        )

    eval_model: list[torch.nn.Module] = []  # the fp32 copy evaluated when the engine shards or casts weights

    def evaluate(step: int) -> dict[str, Any]:
        final = step == total
        if not evaluations_due(recipe.eval, step, final):
            return {}
        if engine.module_holds_full_weights:
            target = engine.unwrap().model
        else:
            weights = engine.full_state_dict()  # collective
            if engine.is_main:
                if not eval_model:
                    with torch.random.fork_rng(devices=[]):
                        eval_model.append(build_model(recipe).to(engine.device))
                eval_model[0].load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
            target = eval_model[0] if eval_model else None

        def run() -> dict[str, Any]:
            # no collective inside, and no draw from the training RNG (a resumed run must draw the same)
            with local_only(), torch.random.fork_rng(devices=[]):
                return evaluate_during_training(target, tokenizer, recipe.eval, step, final=final)

        return _on_main(engine, run) or {}

    reporter = _Reporter(total, start_step, progress and engine.is_main)
    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if engine.is_main else None
    window: dict[str, float] = {}
    window_counts: dict[str, int] = {}
    window_n, window_t0 = 0, time.perf_counter()
    in_update = False
    module.train()
    stop = _StopSignals(force_after=2 if engine.world_size == 1 else 3)
    try:
        with stop:
            batches = iter(loader)
            while state.step < total:
                lr = cfg_optim.lr * lr_factor(
                    state.step, total, cfg_optim.warmup_steps, cfg_optim.schedule, cfg_optim.min_lr_ratio
                )
                engine.set_lr(lr)
                batch = _next_batch(
                    batches, engine, state, global_batch, cfg_train.max_skip_fraction, _length(dataset)
                )
                batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
                in_update = True  # an interrupt from here until the step is counted must not be checkpointed
                upcoming = state.step + 1
                logged = (
                    upcoming % cfg_train.log_every == 0
                    or upcoming == total
                    or bool(recipe.eval and evaluations_due(recipe.eval, upcoming, upcoming == total))
                )
                with diagnostics(logged):  # the costlier diagnostics only where a row is written
                    result = train_step(
                        engine,
                        batch,
                        accum_steps=layout.accum_steps,
                        grad_clip=cfg_optim.grad_clip,
                        step=upcoming,
                        last_finite=state.last_finite,
                        extras={"stop": float(stop.requested)},
                    )
                state.step += 1
                state.last_finite = state.step
                committed = TrainState(**{**state.__dict__, "counts": dict(state.counts)})
                in_update = False
                values = dict(result.values)
                values["grad_norm"] = result.grad_norm
                for k, v in values.items():  # per key: diagnostics come from logged steps only
                    window[k] = window.get(k, 0.0) + v
                    window_counts[k] = window_counts.get(k, 0) + 1
                window_n += 1
                step = state.step
                t_eval = time.perf_counter()
                evals = evaluate(step) if recipe.eval else {}
                if evals:
                    window_t0 += time.perf_counter() - t_eval  # evaluation time does not count against samples/s
                row = None
                if step % cfg_train.log_every == 0 or step == total or evals:
                    now = time.perf_counter()
                    row = {"step": step, **{k: v / window_counts[k] for k, v in window.items()}, **evals}
                    row.update(
                        lr=lr,
                        samples_per_s=window_n * global_batch / max(now - window_t0, 1e-9),
                        samples_seen=state.samples_seen,
                        skipped_samples=state.counts["skipped"],
                        truncated_captions=state.counts["truncated"],
                        elapsed_s=round(state.trained_s + now - t_loop, 3),
                    )
                    if metrics_file is not None:
                        _append_row(metrics_file, row)
                    window, window_counts, window_n, window_t0 = {}, {}, 0, now
                elapsed = time.perf_counter() - t_loop
                eta = elapsed / max(step - start_step, 1) * (total - step)
                reporter.update(step, row, eta)
                # one process may stop on its own flag; several stop on the flag they agreed on in the step
                stopping = result.extras.get("stop", 0.0) > 0 or (engine.world_size == 1 and stop.requested)
                if step % cfg_train.checkpoint_every == 0 or step == total or stopping:
                    checkpoint(committed)
                if stopping:
                    raise TrainingInterrupted(step, out_dir)
                if callback is not None:
                    callback(step, values)
    except KeyboardInterrupt:  # a forced stop (Ctrl-C twice), or one raised by a callback
        reporter.close()
        if in_update or engine.world_size > 1:  # weights may be half-updated; or the others are mid-step
            raise TrainingInterrupted(_ckpt_step(ckpt_root), out_dir, saved=False) from None
        if committed.step > _ckpt_step(ckpt_root):
            checkpoint(committed)
            raise TrainingInterrupted(committed.step, out_dir) from None
        raise TrainingInterrupted(committed.step, out_dir, saved=committed.step > 0) from None
    finally:
        reporter.close()
        if metrics_file is not None:
            metrics_file.close()
    rows = read_metrics(out_dir) if engine.is_main else []
    return TrainResult(
        out_dir=out_dir,
        steps=state.step,
        resumed_from=start_step if ckpt_path else None,
        first_loss=rows[0]["loss"] if rows else None,
        final_loss=rows[-1]["loss"] if rows else None,
        seconds=time.perf_counter() - t0,
        metrics=rows,
    )
