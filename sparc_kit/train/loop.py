"""The training loop: step-based, always resumable from its run folder (big_vision's habit).

``train(recipe, out_dir)`` builds everything from the recipe, resumes from the newest checkpoint in
``out_dir/checkpoints`` when there is one, and writes the run folder:

- ``recipe.yaml``: the fully resolved recipe;
- ``tokenizer.model``: the SentencePiece model (trained from the captions when the recipe names none);
- ``metrics.jsonl``: one JSON object per logged step (``step``, ``loss``, the loss terms and diagnostics,
  ``lr``, ``grad_norm``, ``samples_per_s``, ``samples_seen``, ``skipped_samples``, ``truncated_captions``,
  ``elapsed_s``, and ``eval/NAME/METRIC`` at the steps the recipe's evaluations run);
- ``checkpoints/step_N/``: see :mod:`sparc_kit.train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import yaml

from sparc_kit.config import dump_recipe, load_recipe
from sparc_kit.data import Collate, Tokenizer, build_dataset, make_train_loader
from sparc_kit.evaluate import check_eval_data, evaluate_during_training
from sparc_kit.models import build_model
from sparc_kit.registry import engines, losses
from sparc_kit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sparc_kit.train.schedule import lr_factor

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
    "read_metrics",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing of that step was applied."""

    def __init__(self, step: int, value: float, last_finite_step: int | None):
        self.step, self.value, self.last_finite_step = step, value, last_finite_step
        since = f"; last finite loss at step {last_finite_step}" if last_finite_step is not None else ""
        super().__init__(
            f"loss is {value} at step {step}{since}. The update was not applied and the last checkpoint is intact; "
            "try a lower optim.lr, train.precision=fp32 or a smaller model.init_temperature range"
        )


class TrainingInterrupted(RuntimeError):
    def __init__(self, step: int, out_dir: str):
        self.step, self.out_dir = step, out_dir
        super().__init__(f"interrupted after step {step}; checkpoint saved in {out_dir}; run again to resume")


class RunFolderBusyError(RuntimeError):
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


class ResumeMismatchError(ValueError):
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


def build_loss(recipe: Any) -> torch.nn.Module:
    """The recipe's loss; a loss that sizes parameters by the embedding width is told ``model.embed_dim``."""
    entry = losses.get(recipe.loss.name)
    extra = {"embed_dim": recipe.model.embed_dim} if "embed_dim" in entry.internal else {}
    return entry.build(recipe.loss, **extra)


def build_engine(recipe: Any):
    """The recipe's engine, told the device and precision of the ``train`` section."""
    return engines.get(recipe.engine.name).build(
        recipe.engine, device=recipe.train.device, precision=recipe.train.precision
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
        old = yaml.safe_load(f) or {}
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


class TooManyBadSamplesError(RuntimeError):
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


def _ckpt_step(root: str) -> int:
    path = latest_checkpoint(root)
    return int(os.path.basename(path).split("_")[1]) if path else 0


def _param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms and the temperature are not decayed (CLIP / open_clip practice)."""
    decay, no_decay = [], []
    named = [item for module in modules for item in module.named_parameters()]
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def train(
    recipe: Any,
    out_dir: str,
    *,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``recipe`` into ``out_dir``, resuming from its newest checkpoint.

    ``callback(step, values)`` is called at the end of every step, after logging and checkpointing (for tests
    and notebooks). Ctrl-C saves a checkpoint of the last completed step and raises
    :class:`TrainingInterrupted`; a non-finite loss raises :class:`NonFiniteLossError` before the update is
    applied. The run folder is locked for the duration (:class:`RunFolderBusyError` for a second trainer).
    """
    if not hasattr(recipe, "model"):
        recipe = load_recipe(recipe)
    os.makedirs(out_dir, exist_ok=True)
    with _run_lock(out_dir):
        return _train(recipe, out_dir, progress, callback)


def _train(recipe: Any, out_dir: str, progress: bool, callback) -> TrainResult:
    t0 = time.perf_counter()
    cfg_train, cfg_optim = recipe.train, recipe.optim
    if recipe.eval:
        check_eval_data(recipe.eval)
    ckpt_root = os.path.join(out_dir, "checkpoints")
    ckpt_path = latest_checkpoint(ckpt_root)
    if ckpt_path:
        _check_resume(out_dir, recipe)

    torch.manual_seed(cfg_train.seed)
    dataset = build_dataset(recipe)
    tokenizer = build_tokenizer(recipe, dataset, out_dir if ckpt_path else None)
    if tokenizer.vocab_size > recipe.tokenizer.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} pieces but tokenizer.vocab_size is {recipe.tokenizer.vocab_size}"
        )
    tokenizer.save(os.path.join(out_dir, "tokenizer.model"))
    with open(os.path.join(out_dir, "recipe.yaml.tmp"), "w") as f:
        f.write(dump_recipe(recipe))
    os.replace(os.path.join(out_dir, "recipe.yaml.tmp"), os.path.join(out_dir, "recipe.yaml"))

    model = build_model(recipe)
    loss_fn = build_loss(recipe)
    engine = build_engine(recipe)
    model.to(engine.device)
    loss_fn.to(engine.device)  # some losses own parameters (SigLIP's bias, MGCA's cross-attention)
    optimizer = torch.optim.AdamW(
        _param_groups([model, loss_fn], cfg_optim.weight_decay),
        lr=cfg_optim.lr,
        betas=cfg_optim.betas,
        eps=cfg_optim.eps,
    )
    model = engine.prepare(model, optimizer)

    start_step, samples_seen, trained_s = 0, 0, 0.0
    counts = {"read": 0, "skipped": 0, "truncated": 0}  # samples used, unreadable ones skipped, captions cut
    if ckpt_path:
        info = load_checkpoint(ckpt_path, model, {"loss": loss_fn})
        optimizer.load_state_dict(info.state["trainer"]["optimizer"])
        _set_rng_state(info.state["trainer"]["rng"])
        start_step, samples_seen = info.step, int(info.state["samples_seen"])
        trained_s = float(info.state.get("trained_s", 0.0))
        counts.update(info.state.get("counts", {}))
        started_workers = info.state.get("num_workers", cfg_train.num_workers)
        if isinstance(dataset, torch.utils.data.IterableDataset) and started_workers != cfg_train.num_workers:
            raise ResumeMismatchError(
                f"run folder {out_dir} was trained with train.num_workers={started_workers}; a streaming dataset's "
                f"sample order depends on it, so resume with --set train.num_workers={started_workers}"
            )
        _truncate_metrics(out_dir, start_step)
    elif os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        _truncate_metrics(out_dir, 0)

    total = cfg_train.steps
    global_batch = cfg_train.batch_size * engine.world_size
    image_size = getattr(model.vision, "image_size", None) or recipe.model.vision.image_size
    loader = make_train_loader(
        dataset,
        Collate(tokenizer, image_size),
        cfg_train.batch_size,
        seed=cfg_train.seed,
        samples_seen=samples_seen,
        rank=engine.rank,
        world_size=engine.world_size,
        num_workers=cfg_train.num_workers,
    )

    def checkpoint(step: int) -> None:
        if engine.is_main:
            save_checkpoint(
                ckpt_root,
                step,
                model,
                {"optimizer": optimizer.state_dict(), "rng": _rng_state()},
                {
                    "samples_seen": position,
                    "trained_s": trained_s + time.perf_counter() - t_loop,
                    "counts": committed_counts,
                    "num_workers": cfg_train.num_workers,
                },
                keep=cfg_train.keep_checkpoints,
                extra_modules={"loss": loss_fn},
            )

    reporter = _Reporter(total, start_step, progress and engine.is_main)
    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if engine.is_main else None
    window: dict[str, float] = {}
    window_n, window_t0, last_finite = 0, time.perf_counter(), None
    t_loop = time.perf_counter()
    step = start_step
    position, committed_counts = samples_seen, dict(counts)
    in_update = False
    model.train()
    loss_fn.train()
    try:
        batches = iter(loader)
        while step < total:
            lr = cfg_optim.lr * lr_factor(step, total, cfg_optim.warmup_steps, cfg_optim.schedule, cfg_optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            samples_seen += global_batch  # the stream position: every batch taken counts, usable or not
            while True:  # a batch whose every sample was unreadable is counted, then the next one is taken
                counts["skipped"] += int(batch.pop("skipped"))
                counts["truncated"] += int(batch.pop("truncated"))
                counts["read"] += batch["images"].shape[0]
                _check_skips(counts, cfg_train.max_skip_fraction, step + 1)
                if batch["images"].shape[0]:
                    break
                batch = next(batches)
                samples_seen += global_batch
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
            with engine.autocast():
                out = model(**batch)
                terms = loss_fn(**out)
            loss = terms["loss"]
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(step + 1, loss_value, last_finite)
            in_update = True  # an interrupt from here until the step is counted must not be checkpointed
            engine.backward(loss)
            grad_norm = engine.step(cfg_optim.grad_clip)
            step += 1
            position = samples_seen  # the stream position after this step, as a checkpoint records it
            committed_counts = dict(counts)
            in_update = False
            last_finite = step
            values = {k: float(v.detach()) for k, v in terms.items() if torch.is_tensor(v) and v.numel() == 1}
            values["grad_norm"] = float(grad_norm)
            for k, v in values.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            row = None
            evals = {}
            if recipe.eval and engine.is_main:
                t_eval = time.perf_counter()
                evals = evaluate_during_training(model, tokenizer, recipe.eval, step, final=step == total)
                window_t0 += time.perf_counter() - t_eval  # evaluation time does not count against samples/s
            if step % cfg_train.log_every == 0 or step == total or evals:
                now = time.perf_counter()
                row = {"step": step, **{k: v / window_n for k, v in window.items()}, **evals}
                row.update(
                    lr=lr,
                    samples_per_s=window_n * global_batch / max(now - window_t0, 1e-9),
                    samples_seen=position,
                    skipped_samples=committed_counts["skipped"],
                    truncated_captions=committed_counts["truncated"],
                    elapsed_s=round(trained_s + now - t_loop, 3),
                )
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                window, window_n, window_t0 = {}, 0, now
            elapsed = time.perf_counter() - t_loop
            eta = elapsed / max(step - start_step, 1) * (total - step)
            reporter.update(step, row, eta)
            if step % cfg_train.checkpoint_every == 0 or step == total:
                checkpoint(step)
            if callback is not None:
                callback(step, values)
    except KeyboardInterrupt:
        reporter.close()
        if in_update:  # weights may be half-updated: the newest checkpoint is the one to resume from
            raise TrainingInterrupted(_ckpt_step(ckpt_root), out_dir) from None
        if step > start_step:
            checkpoint(step)
        raise TrainingInterrupted(step, out_dir) from None
    finally:
        reporter.close()
        if metrics_file is not None:
            metrics_file.close()
    rows = read_metrics(out_dir)
    return TrainResult(
        out_dir=out_dir,
        steps=step,
        resumed_from=start_step if ckpt_path else None,
        first_loss=rows[0]["loss"] if rows else None,
        final_loss=rows[-1]["loss"] if rows else None,
        seconds=time.perf_counter() - t0,
        metrics=rows,
    )
