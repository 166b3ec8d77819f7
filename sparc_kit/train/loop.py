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
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sparc_kit.checkpoint import CHECKPOINTS, METRICS, RECIPE, TOKENIZER, read_checkpoint_state, save_train_checkpoint
from sparc_kit.config import dump_recipe
from sparc_kit.data import Collate, Tokenizer, build_dataset, make_train_loader
from sparc_kit.data.clip_tokenizer import OpenClipTokenizer
from sparc_kit.engines.base import BatchLayout, Engine, OptimizerSpec
from sparc_kit.errors import RecipeError, RunError, require_recipe
from sparc_kit.evaluate import check_eval_data, evaluate_during_training
from sparc_kit.evaluate.runner import evaluations_due
from sparc_kit.io import atomic_write
from sparc_kit.loggers import build_loggers, check_loggers, heatmaps_due, read_probe, wants_images
from sparc_kit.losses import build_loss
from sparc_kit.losses.diagnostics import diagnostics
from sparc_kit.losses.distributed import local_only
from sparc_kit.models import build_model
from sparc_kit.registry import engines
from sparc_kit.train.init_from import apply_init_weights, read_init_weights
from sparc_kit.train.module import TrainModule
from sparc_kit.train.progress import Reporter
from sparc_kit.train.run_folder import (
    ResumeMismatchError,
    RunFolderBusyError,
    check_engine_resume,
    check_resume,
    checkpoint_step,
    read_metrics,
    resume_point,
    run_lock,
    truncate_metrics,
)
from sparc_kit.train.schedule import lr_factor
from sparc_kit.train.state import TrainState
from sparc_kit.train.step import NonFiniteLossError, train_step
from sparc_kit.train.stopping import SetupInterrupts, StopSignals, check_interrupted, TrainingInterrupted, on_main

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
    """CLIP's BPE for ``tokenizer.kind: open_clip``; else the recipe's tokenizer file, else the run folder's (on
    resume), else one trained on the captions."""
    t = recipe.tokenizer
    if t.kind == "open_clip":  # CLIP's BPE, the same on every process: nothing to train or read
        return OpenClipTokenizer(context_length=t.context_length)  # type: ignore[return-value]
    kwargs = dict(context_length=t.context_length, lowercase=t.lowercase, add_eos=t.add_eos)
    if t.path:
        return Tokenizer.load(t.path, **kwargs)
    if run_dir and os.path.exists(os.path.join(run_dir, TOKENIZER)):
        return Tokenizer.load(os.path.join(run_dir, TOKENIZER), **kwargs)
    if dataset is None:
        dataset = build_dataset(recipe)
    if hasattr(dataset, "captions"):
        captions = list(dataset.captions(t.train_captions))
    else:
        captions = [dataset[i]["caption"] for i in range(min(len(dataset), t.train_captions))]
    check_interrupted()
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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _silent(line: str) -> None:
    pass


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


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# several processes: rank 0 does the run folder's work, and everyone learns how it went


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
    check_loggers(recipe)  # a logger whose package is missing, too
    try:
        engine.start()
        layout = BatchLayout(recipe.train.batch_size, engine.world_size, recipe.train.accum_steps)
        with contextlib.ExitStack() as stack:
            if not engine.is_main:  # rank 0 speaks for the run
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")

            def take_lock() -> None:  # held by rank 0 until the run ends
                os.makedirs(out_dir, exist_ok=True)
                stack.enter_context(run_lock(out_dir))

            on_main(engine, take_lock)
            stack.enter_context(SetupInterrupts())
            return _train(recipe, out_dir, engine, layout, progress, callback)
    finally:
        engine.close()


def _prepare_run_folder(
    recipe: Any, out_dir: str, dataset: Any, ckpt_path: str | None, engine: Engine, draws_maps: bool
) -> Any:
    """Rank 0's part of starting a run: every check first (so a refused run changes nothing in the folder),
    then the tokenizer and ``recipe.yaml``. Returns the heat maps' probe when a logger draws them, else None."""
    if recipe.eval:
        check_eval_data(recipe.eval)
    probe = read_probe(recipe, dataset) if draws_maps else None
    saved = read_checkpoint_state(ckpt_path) if ckpt_path else None
    if saved is not None:
        check_resume(out_dir, recipe)
        check_engine_resume(saved, recipe, engine, dataset, out_dir)
    tokenizer = build_tokenizer(recipe, dataset, out_dir if ckpt_path else None)
    if tokenizer.vocab_size > recipe.tokenizer.vocab_size:
        raise RecipeError([
            f"tokenizer.vocab_size: the tokenizer has {tokenizer.vocab_size} pieces but tokenizer.vocab_size is "
            f"{recipe.tokenizer.vocab_size}; set it to at least {tokenizer.vocab_size}"
        ])
    check_interrupted()
    tokenizer.save(os.path.join(out_dir, TOKENIZER))
    atomic_write(os.path.join(out_dir, RECIPE), dump_recipe(recipe))
    if saved is not None:
        truncate_metrics(out_dir, int(saved["step"]))
    elif os.path.exists(os.path.join(out_dir, METRICS)):
        truncate_metrics(out_dir, 0)
    return probe


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


def _train(
    recipe: Any, out_dir: str, engine: Engine, layout: BatchLayout, progress: bool, callback
) -> TrainResult:
    t0 = time.perf_counter()
    cfg_train, cfg_optim = recipe.train, recipe.optim
    ckpt_root = os.path.join(out_dir, CHECKPOINTS)
    ckpt_path = on_main(engine, lambda: resume_point(ckpt_root))  # every process gets rank 0's answer

    torch.manual_seed(cfg_train.seed)  # the same initial weights on every process
    # model.init_from: read before the run folder is written; a resumed run loads its own checkpoint instead
    initial = None if ckpt_path else read_init_weights(recipe)
    dataset = build_dataset(recipe)
    draws_maps = wants_images(recipe)  # the same answer on every process, asked once
    probes: list[Any] = []  # rank 0's probe, kept on rank 0 (on_main sends its return value to every process)
    on_main(engine, lambda: probes.append(_prepare_run_folder(recipe, out_dir, dataset, ckpt_path, engine,
                                                              draws_maps)))
    probe = probes[0] if probes else None
    tokenizer = build_tokenizer(recipe, dataset, out_dir)  # every process reads rank 0's tokenizer.model

    model = build_model(recipe)
    if initial is not None:  # on every process, before the engine wraps (DDP) or shards (DeepSpeed) the model
        apply_init_weights(model, recipe, initial, echo=_stderr if engine.is_main else _silent)
        del initial
    if recipe.train.compile:
        model.compile_blocks()  # compiled on the first step; the weights and their names stay as they are
    module = TrainModule(model, build_loss(recipe))  # some losses own parameters (SigLIP's bias, MGCA's attention)
    optimizer = OptimizerSpec.from_recipe(cfg_optim, module)
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

    def evaluate(step: int) -> dict[str, Any]:  # the recipe's evaluations, and the probe's heat maps
        final = step == total
        evals_due = bool(recipe.eval) and evaluations_due(recipe.eval, step, final)
        maps_due = draws_maps and heatmaps_due(recipe, step)
        if not (evals_due or maps_due):
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
                if maps_due:
                    run_log.log_images(step, probe.images(target, tokenizer))
                return evaluate_during_training(target, tokenizer, recipe.eval, step, final=final) if evals_due else {}

        return on_main(engine, run) or {}

    reporter = Reporter(total, start_step, progress and engine.is_main)
    run_log = build_loggers(recipe, out_dir, start_step) if engine.is_main else None  # metrics.jsonl and the rest
    window: dict[str, float] = {}
    window_counts: dict[str, int] = {}
    window_n, window_t0 = 0, time.perf_counter()
    in_update = False
    module.train()
    stop = StopSignals(force_after=2 if engine.world_size == 1 else 3)
    check_interrupted()  # an interrupt some C code swallowed during the set-up
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
                        pad_to=cfg_train.pad_to,
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
                evals = evaluate(step)
                window_t0 += time.perf_counter() - t_eval  # evaluation time does not count against samples/s
                row = None
                if step % cfg_train.log_every == 0 or step == total or evals:
                    now = time.perf_counter()
                    row = {**{k: v / window_counts[k] for k, v in window.items()}, **evals}
                    row.update(
                        lr=lr,
                        samples_per_s=window_n * global_batch / max(now - window_t0, 1e-9),
                        samples_seen=state.samples_seen,
                        skipped_samples=state.counts["skipped"],
                        truncated_captions=state.counts["truncated"],
                        elapsed_s=round(state.trained_s + now - t_loop, 3),
                    )
                    if run_log is not None:
                        run_log.log(step, row)
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
            raise TrainingInterrupted(checkpoint_step(ckpt_root), out_dir, saved=False) from None
        if committed.step > checkpoint_step(ckpt_root):
            checkpoint(committed)
            raise TrainingInterrupted(committed.step, out_dir) from None
        raise TrainingInterrupted(committed.step, out_dir, saved=committed.step > 0) from None
    finally:
        reporter.close()
        if run_log is not None:
            run_log.close()
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
