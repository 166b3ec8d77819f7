"""The training loop: resume gives the same weights as an uninterrupted run, failures stop cleanly, loss falls.

All runs use a micro version of sparc_tiny (one block per tower, 32 px, batch 8) so the file runs in seconds.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import sparc_kit
from sparc_kit.train import NonFiniteLossError, TrainingInterrupted, latest_checkpoint, read_metrics, train

MICRO = [
    "model.embed_dim=32",
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.width=32",
    "model.vision.depth=1",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=2",
    "data.num_samples=64",
    "train.batch_size=8",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "optim.warmup_steps=2",
]


def micro_recipe(*extra: str):
    return sparc_kit.load_recipe("sparc_tiny", [*MICRO, *extra])


def weights(run_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(latest_checkpoint(os.path.join(run_dir, "checkpoints")), "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


class Interrupt:
    """A callback that raises ``exc`` once step ``at`` has completed."""

    def __init__(self, at: int, exc: BaseException):
        self.at, self.exc = at, exc

    def __call__(self, step, values):
        if step == self.at:
            raise self.exc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    result = train(micro_recipe("train.steps=12"), out, progress=False)
    return out, result


def test_interrupted_run_resumes_to_identical_weights(uninterrupted, tmp_path):
    """Ctrl-C after step 6 saves a checkpoint there; the rerun continues and ends bit-identical."""
    ref_dir, ref = uninterrupted
    out = str(tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as info:
        train(micro_recipe("train.steps=12"), out, progress=False, callback=Interrupt(6, KeyboardInterrupt()))
    assert info.value.step == 6
    assert latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step_00000006")
    resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert resumed.resumed_from == 6
    assert_same_weights(weights(ref_dir), weights(out))
    assert [(r["step"], r["loss"]) for r in read_metrics(out)] == [(r["step"], r["loss"]) for r in ref.metrics]


def test_crashed_run_resumes_from_last_periodic_checkpoint(uninterrupted, tmp_path):
    """A crash (no checkpoint at the crash) resumes from step 4, retrains 5-6 and still ends identical."""
    ref_dir, ref = uninterrupted
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom"):
        train(micro_recipe("train.steps=12"), out, progress=False, callback=Interrupt(6, RuntimeError("boom")))
    assert latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step_00000004")
    resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert resumed.resumed_from == 4
    assert_same_weights(weights(ref_dir), weights(out))
    # the rows logged after step 4 by the crashed run were dropped and logged again, once
    assert [r["step"] for r in read_metrics(out)] == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in ref.metrics]


def test_rerunning_a_finished_run_changes_nothing(uninterrupted):
    ref_dir, _ = uninterrupted
    before = weights(ref_dir)
    again = train(micro_recipe("train.steps=12"), ref_dir, progress=False)
    assert again.resumed_from == 12 and again.steps == 12
    assert_same_weights(before, weights(ref_dir))


def test_resuming_with_another_model_is_refused(uninterrupted):
    from sparc_kit.train import ResumeMismatchError

    ref_dir, _ = uninterrupted
    with pytest.raises(ResumeMismatchError, match="model.text.depth"):
        train(micro_recipe("train.steps=12", "model.text.depth=2"), ref_dir, progress=False)


def test_checkpoint_holds_safetensors_weights_and_data_position(uninterrupted):
    ref_dir, _ = uninterrupted
    ckpts = sorted(os.listdir(os.path.join(ref_dir, "checkpoints")))
    assert ckpts == ["latest", "step_00000008", "step_00000012"]  # keep_checkpoints: 2
    # the pointer names the newest folder (resume must not depend on the fallback scan)
    assert open(os.path.join(ref_dir, "checkpoints", "latest")).read().strip() == "step_00000012"
    state = json.load(open(os.path.join(ref_dir, "checkpoints", "step_00000012", "state.json")))
    assert state["step"] == 12 and state["samples_seen"] == 12 * 8
    model = sparc_kit.build_model(micro_recipe())
    assert set(weights(ref_dir)) == set(model.state_dict())


def test_non_finite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    """The loss turns NaN at step 3: the run stops before applying it, naming the step; step 2 is intact."""
    import sparc_kit.train.loop as loop

    real_build = loop.build_loss

    class PoisonAfter(torch.nn.Module):
        def __init__(self, inner, at):
            super().__init__()
            self.inner, self.at, self.calls = inner, at, 0

        def forward(self, **kw):
            self.calls += 1
            out = self.inner(**kw)
            if self.calls >= self.at:
                out["loss"] = out["loss"] * float("nan")
            return out

    monkeypatch.setattr(loop, "build_loss", lambda recipe: PoisonAfter(real_build(recipe), 3))
    out = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as info:
        train(micro_recipe("train.steps=10", "train.checkpoint_every=2"), out, progress=False)
    assert info.value.step == 3 and info.value.last_finite_step == 2
    assert "step 3" in str(info.value)
    assert latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step_00000002")


def test_loss_decreases_on_a_short_run(tmp_path):
    """A learning curve: 40 steps of SPARC on synthetic shapes lower the loss by a clear margin."""
    result = train(micro_recipe("train.steps=40", "train.log_every=5", "optim.lr=2e-3"), str(tmp_path), progress=False)
    losses = [r["loss"] for r in result.metrics]
    assert len(losses) == 8
    assert losses[-1] < 0.85 * losses[0], losses


def test_bf16_autocast_trains_with_finite_float32_loss(tmp_path):
    result = train(micro_recipe("train.steps=4", "train.precision=bf16"), str(tmp_path), progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.metrics)
    assert result.final_loss is not None


@pytest.mark.smoke
def test_smoke_train_command_in_process(tmp_path):
    """`sparc train` through the real CLI writes the promised run folder."""
    from sparc_cli.main import app

    out = tmp_path / "run"
    args = ["train", "sparc_tiny", "--out", str(out), "--quiet", "--set", "train.steps=4"]
    for item in MICRO:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("recipe.yaml", "metrics.jsonl", "tokenizer.model", "checkpoints/latest"):
        assert (out / name).exists(), name
    reloaded = sparc_kit.load_recipe(str(out / "recipe.yaml"))
    assert reloaded.train.steps == 4 and reloaded.model.vision.width == 32
    assert [r["step"] for r in read_metrics(str(out))] == [2, 4]


def test_second_trainer_on_the_same_run_folder_is_refused(tmp_path):
    """Two processes training into one folder would interleave checkpoints; the second is refused at once."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys, time
            h = open({str(out / '.lock')!r}, 'a+'); fcntl.flock(h, fcntl.LOCK_EX); h.write('4242'); h.flush()
            print('locked', flush=True); time.sleep(30)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        from sparc_kit.train import RunFolderBusyError

        with pytest.raises(RunFolderBusyError, match="pid 4242"):
            train(micro_recipe("train.steps=2"), str(out), progress=False)
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    result = train(micro_recipe("train.steps=2"), str(out), progress=False)  # free again once the holder is gone
    assert result.steps == 2


def test_loss_parameters_are_optimised_checkpointed_and_resumed(uninterrupted, tmp_path):
    """MGCA's cross-attention lives in the loss: it is built at the model's width, trained, saved as
    loss.safetensors and restored, so an interrupted MGCA run also resumes bit-identical."""
    from sparc_kit.train import build_loss

    recipe = micro_recipe("train.steps=8", "loss.name=mgca")
    loss_fn = build_loss(recipe)
    assert loss_fn.word_attention.q_proj.shape == (128, recipe.model.embed_dim)
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}

    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    train(recipe, ref, progress=False)
    with pytest.raises(TrainingInterrupted):
        train(recipe, out, progress=False, callback=Interrupt(5, KeyboardInterrupt()))
    train(recipe, out, progress=False)
    ckpt = latest_checkpoint(os.path.join(ref, "checkpoints"))
    trained = load_file(os.path.join(ckpt, "loss.safetensors"))
    assert set(trained) == set(before)
    assert any(not torch.equal(trained[k], before[k]) for k in before), "the loss parameters never moved"
    other = load_file(os.path.join(latest_checkpoint(os.path.join(out, "checkpoints")), "loss.safetensors"))
    assert_same_weights(trained, other)
    assert_same_weights(weights(ref), weights(out))


class _Flaky(torch.utils.data.Dataset):
    """Wraps a dataset; every ``every``-th sample is unreadable."""

    def __init__(self, inner, every):
        self.inner, self.every = inner, every

    def __len__(self):
        return len(self.inner)

    def captions(self, limit=None):
        return self.inner.captions(limit)

    def __getitem__(self, i):
        return {"skip": "broken"} if i % self.every == 0 else self.inner[i]


def _flaky_dataset(monkeypatch, every):
    import sparc_kit.train.loop as loop

    real = loop.build_dataset
    monkeypatch.setattr(loop, "build_dataset", lambda recipe: _Flaky(real(recipe), every))


def test_unreadable_samples_are_skipped_counted_and_logged(tmp_path, monkeypatch):
    _flaky_dataset(monkeypatch, every=16)  # 4 of the 64 indices: 6.25%, under the default 10%
    result = train(micro_recipe("train.steps=16"), str(tmp_path), progress=False)
    rows = result.metrics
    last = rows[-1]
    # 16 steps x 8 positions = 128 positions = two passes over the 64 samples; 4 bad ones each pass
    assert last["skipped_samples"] == 8
    assert last["samples_seen"] == 128
    assert all(r["skipped_samples"] <= last["skipped_samples"] for r in rows)


def test_too_many_unreadable_samples_stop_the_run(tmp_path, monkeypatch):
    from sparc_kit.train import TooManyBadSamplesError

    _flaky_dataset(monkeypatch, every=4)  # 25% unreadable
    with pytest.raises(TooManyBadSamplesError, match="max_skip_fraction=0.1"):
        train(micro_recipe("train.steps=60"), str(tmp_path), progress=False)


def _synthetic_retrieval_manifest(folder) -> str:
    """A small retrieval set written as PNG files + a JSONL manifest, from the synthetic shapes."""
    from PIL import Image

    from sparc_kit.data import SyntheticShapes

    folder.mkdir()
    data = SyntheticShapes(num_samples=12, image_size=32, seed=123)
    lines = []
    for i in range(len(data)):
        item = data[i]
        Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "captions": [item["caption"]]}))
    (folder / "val.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "val.jsonl")


def test_evaluation_during_training_is_logged_and_matches_sparc_eval(tmp_path):
    """`eval:` in a recipe runs every N steps into metrics.jsonl; the final numbers equal a later evaluation of
    the saved checkpoint, so what training reports is what `sparc eval` reproduces."""
    from sparc_kit import load_pretrained
    from sparc_kit.evaluate import run_evaluations

    manifest = _synthetic_retrieval_manifest(tmp_path / "val")
    recipe = sparc_kit.load_recipe(
        {
            **micro_recipe("train.steps=6", "train.log_every=4").model_dump(mode="json"),
            "eval": [{"task": "retrieval", "data": manifest, "every": 3}],
        }
    )
    out = str(tmp_path / "run")
    result = train(recipe, out, progress=False)
    rows = {r["step"]: r for r in result.metrics}
    assert sorted(rows) == [3, 4, 6]  # eval steps 3 and 6 force a row; step 4 is the ordinary log step
    assert "eval/retrieval/i2t_R@1" in rows[3] and "eval/retrieval/i2t_R@1" not in rows[4]
    assert all("loss" in r for r in rows.values())
    later = run_evaluations(load_pretrained(out), recipe.eval, write=False)[0]
    for key, value in later.metrics.items():
        if isinstance(value, float):
            assert rows[6][f"eval/retrieval/{key}"] == pytest.approx(value, abs=1e-6), key


def test_missing_evaluation_data_fails_before_training(tmp_path):
    """A wrong eval: path is reported at once, not at the first evaluation hundreds of steps in."""
    from sparc_kit.evaluate import EvalDataError

    recipe = sparc_kit.load_recipe(
        {
            **micro_recipe("train.steps=4").model_dump(mode="json"),
            "eval": [{"task": "retrieval", "data": str(tmp_path / "nowhere.jsonl"), "every": 2}],
        }
    )
    with pytest.raises(EvalDataError, match="data not found: .*nowhere.jsonl"):
        train(recipe, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_folder_from_before_the_engine_seam_resumes(uninterrupted, tmp_path):
    """Checkpoints written before multi-process training held one RNG state and no engine fields in state.json;
    such a folder resumes and ends with the weights of an uninterrupted run."""
    ref_dir, _ = uninterrupted
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom"):
        train(micro_recipe("train.steps=12"), out, progress=False, callback=Interrupt(4, RuntimeError("boom")))
    ckpt = latest_checkpoint(os.path.join(out, "checkpoints"))
    trainer = torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=True)
    torch.save({"optimizer": trainer["optimizer"], "rng": trainer["rng"][0]}, os.path.join(ckpt, "trainer.pt"))
    state = json.load(open(os.path.join(ckpt, "state.json")))
    for key in ("engine", "world_size", "accum_steps"):
        state.pop(key)
    json.dump(state, open(os.path.join(ckpt, "state.json"), "w"))
    resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert resumed.resumed_from == 4
    assert_same_weights(weights(ref_dir), weights(out))


def test_a_save_killed_halfway_leaves_the_last_checkpoint_and_is_cleaned_up(uninterrupted, tmp_path):
    """A process killed inside a save leaves a partial hidden folder: the resume ignores it, starts from the
    last complete checkpoint, ends with the uninterrupted weights, and the next save removes the leftover."""
    ref_dir, _ = uninterrupted
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom"):
        train(micro_recipe("train.steps=12"), out, progress=False, callback=Interrupt(6, RuntimeError("boom")))
    partial = os.path.join(out, "checkpoints", ".tmp-step_00000008")
    os.makedirs(partial)
    with open(os.path.join(partial, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 100)  # cut short
    resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert resumed.resumed_from == 4
    assert_same_weights(weights(ref_dir), weights(out))
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith(".tmp")]


def test_the_latest_pointer_names_the_step_folder_for_modules_with_extra_files(tmp_path):
    """save_checkpoint with a loss module wrote the loop variable's last value ('loss') into the pointer."""
    from sparc_kit.train import save_checkpoint

    root = str(tmp_path / "checkpoints")
    save_checkpoint(root, 3, torch.nn.Linear(2, 2), {}, {"samples_seen": 0}, extra_modules={"loss": torch.nn.Linear(1, 1)})
    assert open(os.path.join(root, "latest")).read().strip() == "step_00000003"


class _DuringBackward(torch.nn.Module):
    """Wraps a loss; at call ``at`` its backward runs ``action`` (send a signal, raise): an interrupt that lands
    inside a step, where most of a step's time is spent."""

    def __init__(self, inner, at, action):
        super().__init__()
        self.inner, self.at, self.action, self.calls = inner, at, action, 0

    def forward(self, **kw):
        out = self.inner(**kw)
        self.calls += 1
        if self.calls == self.at:
            out["loss"].register_hook(lambda g: (self.action(), g)[1])
        return out


def _interrupt_in_backward(monkeypatch, at, action):
    import sparc_kit.train.loop as loop

    real_build = loop.build_loss
    monkeypatch.setattr(loop, "build_loss", lambda recipe: _DuringBackward(real_build(recipe), at, action))


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_during_backward_finishes_the_step_saves_it_and_resumes_identically(
    uninterrupted, tmp_path, monkeypatch, signum
):
    """Ctrl-C (or a scheduler's SIGTERM) inside step 3's backward: the step completes, step 3 is saved (not
    a periodic checkpoint: those are every 4), and the rerun ends bit-identical to an uninterrupted run."""
    import signal

    ref_dir, _ = uninterrupted
    out = str(tmp_path / "run")
    _interrupt_in_backward(monkeypatch, 3, lambda: os.kill(os.getpid(), getattr(signal, signum)))
    with pytest.raises(TrainingInterrupted) as info:
        train(micro_recipe("train.steps=12"), out, progress=False)
    assert info.value.step == 3 and info.value.saved
    assert str(info.value) == f"interrupted after step 3; checkpoint saved in {out}; run again to resume"
    assert latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step_00000003")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    monkeypatch.undo()
    resumed = train(micro_recipe("train.steps=12"), out, progress=False)
    assert resumed.resumed_from == 3
    assert_same_weights(weights(ref_dir), weights(out))


def test_a_forced_stop_inside_a_step_never_claims_a_checkpoint(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside step 2's backward (a second Ctrl-C) before any checkpoint: nothing is saved
    and the message says so."""
    out = str(tmp_path / "run")

    def boom():
        raise KeyboardInterrupt

    _interrupt_in_backward(monkeypatch, 2, boom)
    with pytest.raises(TrainingInterrupted) as info:
        train(micro_recipe("train.steps=12"), out, progress=False)
    assert not info.value.saved and latest_checkpoint(os.path.join(out, "checkpoints")) is None
    assert str(info.value) == f"interrupted before the first checkpoint; nothing was saved in {out}"


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    """Step 3's loss is finite but the gradient reaching the image embeddings is NaN: the run stops naming the
    step and the first parameter (in the model's order) whose gradient is not finite; step 2 is the resume point."""
    import sparc_kit.train.loop as loop
    from sparc_kit.train import NonFiniteGradientError

    class NanGradientAt(torch.nn.Module):
        def __init__(self, inner, at):
            super().__init__()
            self.inner, self.at, self.calls = inner, at, 0

        def forward(self, **kw):
            self.calls += 1
            if self.calls == self.at:
                kw["image_embeds"].register_hook(lambda g: torch.full_like(g, float("nan")))
            return self.inner(**kw)

    real_build = loop.build_loss
    monkeypatch.setattr(loop, "build_loss", lambda recipe: NanGradientAt(real_build(recipe), 3))
    out = str(tmp_path / "run")
    with pytest.raises(NonFiniteGradientError) as info:
        train(micro_recipe("train.steps=12", "train.checkpoint_every=2"), out, progress=False)
    assert info.value.step == 3 and not info.value.applied
    # the NaN reaches the image tower only: the first of its parameters in the model's order is named
    first = next(k for k in sparc_kit.build_model(micro_recipe()).state_dict() if k.startswith("vision."))
    assert first == "vision.pos_embed" and info.value.parameter == "model.vision.pos_embed"
    assert "gradient is not finite at step 3 in model.vision.pos_embed while the loss is finite" in str(info.value)
    assert latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step_00000002")


@pytest.mark.parametrize("name", ["local", "ddp"])
def test_the_engine_leaves_the_weights_alone_on_a_non_finite_gradient(name):
    from sparc_kit.engines import BatchLayout, NonFiniteGradient, OptimizerSpec, param_groups
    from sparc_kit.registry import engines

    engine = engines.build(name, {}, device="cpu", precision="fp32")
    try:
        module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        engine.setup(module, OptimizerSpec(param_groups(module, 0.0), lr=0.1), BatchLayout(2))
        before = {k: v.clone() for k, v in engine.unwrap().state_dict().items()}
        loss = engine(torch.ones(2, 3)).sum()
        engine.unwrap()[1].weight.register_hook(lambda g: g * float("inf"))
        engine.backward(loss)
        with pytest.raises(NonFiniteGradient) as info:
            engine.step(1.0)
        assert info.value.parameter == "1.weight"
        assert_same_weights(before, engine.unwrap().state_dict())
    finally:
        engine.close()


def test_diagnostics_are_computed_on_logged_steps_only_and_every_row_has_the_same_columns(tmp_path, monkeypatch):
    from sparc_kit.losses import SparcLoss

    calls = []
    real = SparcLoss._sparsity_stats
    monkeypatch.setattr(SparcLoss, "_sparsity_stats", lambda self, *a: (calls.append(1), real(self, *a))[1])
    result = train(micro_recipe("train.steps=6", "train.log_every=3"), str(tmp_path / "run"), progress=False)
    assert len(calls) == 2  # steps 3 and 6, not every step
    assert [r["step"] for r in result.metrics] == [3, 6]
    assert result.metrics[0].keys() == result.metrics[1].keys()
    assert {"shortcut_gap", "zeroed_fraction", "patches_per_token", "loss", "grad_norm"} <= result.metrics[0].keys()


def test_a_ctrl_c_swallowed_during_set_up_is_raised_again():
    """Some C code clears the KeyboardInterrupt a signal handler raised inside it (numpy, drawing the synthetic
    captions); the set-up's handler records it and the next check raises it, so the run does not train on."""
    import os
    import signal

    from sparc_kit.train.stopping import SetupInterrupts, check_interrupted

    with SetupInterrupts():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
        except KeyboardInterrupt:
            pass  # what the C code did
        with pytest.raises(KeyboardInterrupt):
            check_interrupted()
    check_interrupted()  # outside a set-up nothing is pending
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_optimizer_impl_auto_is_fused_and_gives_the_for_loop_update():
    """optim.impl: auto builds torch's fused AdamW for floating-point CPU parameters, and its updates equal the
    one-parameter-at-a-time implementation (torch's CPU default) within float32 rounding over several steps."""
    from sparc_kit.engines import OptimizerSpec

    torch.manual_seed(0)
    start = [torch.randn(33, 17), torch.randn(17)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    results = {}
    for impl in ("auto", "for_loop", "foreach"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        spec = OptimizerSpec([{"params": params, "names": ["w", "b"]}], lr=1e-2, weight_decay=0.2, impl=impl)
        opt = spec.build()
        assert bool(opt.defaults["fused"]) is (impl == "auto")
        assert spec.implementation() == ("fused" if impl == "auto" else impl)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results[impl] = [p.detach() for p in params]
    for impl in ("auto", "foreach"):
        for a, b in zip(results[impl], results["for_loop"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert sparc_kit.load_recipe("sparc_tiny").optim.impl == "auto"
