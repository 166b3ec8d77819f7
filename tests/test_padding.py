"""``train.pad_to: longest``: the columns no caption of the step uses are cut, with the loss and gradients of the
full length (within float rounding: the matrix products change shape), and the text tower really sees fewer."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import sparc_kit
from sparc_kit.engines import BatchLayout, LocalEngine, OptimizerSpec, param_groups
from sparc_kit.models.text import TextTransformer
from sparc_kit.train import read_metrics, train
from sparc_kit.models.text import cut_length, longest_caption
from sparc_kit.train.step import compute_gradients
from test_train import MICRO, weights

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("distributed_worker", HERE / "distributed_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TOL = 1e-5
CONTEXT = "tokenizer.context_length=32"  # the tiny recipes' 16, doubled, so a caption of 11 leaves columns to cut


def short_batch(recipe, batch_size: int, longest: int, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random images and captions of 2..``longest`` tokens, padded (id 0) to the context length."""
    g = torch.Generator().manual_seed(seed)
    size, context = recipe.model.vision.image_size, recipe.tokenizer.context_length
    lengths = torch.randint(2, longest + 1, (batch_size,), generator=g)
    lengths[0] = longest
    mask = torch.arange(context)[None, :] < lengths[:, None]
    ids = torch.randint(4, recipe.tokenizer.vocab_size, (batch_size, context), generator=g).masked_fill(~mask, 0)
    return {"images": torch.randn(batch_size, 3, size, size, generator=g), "token_ids": ids, "token_mask": mask}


def gradients(recipe, batch, pad_to: str, accum_steps: int = 1):
    """The loss terms, the gradients and the token lengths the text tower was given."""
    module = worker.build_module(recipe)
    seen: list[int] = []
    module.model.text.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    engine = LocalEngine(device="cpu")
    engine.setup(module, OptimizerSpec(param_groups(module, 0.0), lr=1e-3), BatchLayout(batch["images"].shape[0]))
    values, _ = compute_gradients(engine, batch, accum_steps, pad_to=pad_to)
    return values, worker.gradients_of(engine), seen


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_longest_caption_and_cut_length_against_a_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = torch.rand(5, 40, generator=g) < 0.1  # not only prefixes: any column with a real token counts
        expected = 0
        for col in range(40):
            if any(bool(mask[row, col]) for row in range(5)):
                expected = col + 1
        assert longest_caption(mask) == expected
    assert longest_caption(torch.zeros(3, 9, dtype=torch.bool)) == 0
    assert [cut_length(n, 77) for n in (0, 1, 8, 9, 17, 70, 72, 77)] == [8, 8, 8, 16, 24, 72, 72, 77]
    assert cut_length(3, 5) == 5  # never past the context


@pytest.mark.parametrize(
    "recipe_name,extra",
    [
        ("sparc_tiny", []),
        ("sparc_tiny", ["model.text.causal=true"]),
        ("clip_tiny", []),
        ("siglip_tiny", []),
        ("mgca_tiny", []),
        ("pacl_tiny", []),
        ("gloria_tiny", []),
        ("filip_tiny", ["loss.token_drop=0.0"]),  # its token drop draws over the columns: compared without it
    ],
)
def test_cut_padding_gives_the_loss_and_gradients_of_the_full_length(recipe_name, extra):
    recipe = sparc_kit.load_recipe(recipe_name, [*MICRO, CONTEXT, *extra])
    context = recipe.tokenizer.context_length
    batch = short_batch(recipe, 8, longest=11)
    full_values, full_grads, full_seen = gradients(recipe, batch, "context_length")
    cut_values, cut_grads, cut_seen = gradients(recipe, batch, "longest")
    assert full_seen == [context] and cut_seen == [cut_length(11, context)] and cut_seen[0] < context
    assert full_values.keys() == cut_values.keys()
    for key in full_values:
        assert cut_values[key] == pytest.approx(full_values[key], rel=1e-5, abs=1e-6), key
    assert max_difference(cut_grads, full_grads) < TOL
    # the unused positions get no gradient either way: the cut changes nothing the optimizer sees
    pos = full_grads["model.text.pos_embed"][0, cut_seen[0]:]
    assert float(pos.abs().max()) == 0.0


def test_accumulated_steps_cut_once_for_the_whole_batch():
    """The micro-batches share the whole batch's length (the feature cache is concatenated along rows)."""
    recipe = sparc_kit.load_recipe("sparc_tiny", [*MICRO, CONTEXT])
    batch = short_batch(recipe, 8, longest=13)
    full_values, full_grads, _ = gradients(recipe, batch, "context_length", accum_steps=1)
    cut_values, cut_grads, seen = gradients(recipe, batch, "longest", accum_steps=4)
    assert set(seen) == {cut_length(13, recipe.tokenizer.context_length)} and len(seen) == 8  # 4 cached + 4 live
    assert cut_values["loss"] == pytest.approx(full_values["loss"], rel=1e-5)
    assert max_difference(cut_grads, full_grads) < TOL


def test_a_text_tower_that_does_not_say_it_accepts_shorter_ids_keeps_the_full_length(monkeypatch):
    monkeypatch.setattr(TextTransformer, "accepts_shorter_context", False)
    recipe = sparc_kit.load_recipe("sparc_tiny", MICRO)
    _, _, seen = gradients(recipe, short_batch(recipe, 8, longest=5), "longest")
    assert seen == [recipe.tokenizer.context_length]


def test_a_run_with_pad_to_longest_trains_the_weights_of_the_full_length(tmp_path, monkeypatch):
    """The loop passes the recipe's choice on: 6 steps on the synthetic captions, both ways."""
    import sparc_kit.train.step as step_module

    cut: list[tuple[int, int]] = []

    def recording(engine, batch):
        out = step_module.trim_padding.__wrapped__(engine, batch)
        cut.append((batch["token_ids"].shape[1], out["token_ids"].shape[1]))
        return out

    recording.__wrapped__ = step_module.trim_padding
    monkeypatch.setattr(step_module, "trim_padding", recording)
    runs = {}
    for pad_to in ("longest", "context_length"):
        out = str(tmp_path / pad_to)
        train(sparc_kit.load_recipe("sparc_tiny", [*MICRO, CONTEXT, "train.steps=6", f"train.pad_to={pad_to}"]), out,
              progress=False)
        runs[pad_to] = out
    assert len(cut) == 6 and all(after < before for before, after in cut)  # only the longest run cut, each step
    assert max_difference(weights(runs["longest"]), weights(runs["context_length"])) < TOL
    a = [row["loss"] for row in read_metrics(os.path.join(runs["longest"], "metrics.jsonl")) if "loss" in row]
    b = [row["loss"] for row in read_metrics(os.path.join(runs["context_length"], "metrics.jsonl")) if "loss" in row]
    assert a == pytest.approx(b, rel=1e-5)


def test_encode_text_cuts_the_padding_with_the_embeddings_of_the_full_length(monkeypatch):
    """What the evaluators and ``load_pretrained`` users call: the same unit embeddings, fewer columns."""
    recipe = sparc_kit.load_recipe("sparc_tiny", [*MICRO, CONTEXT, "model.text.causal=true"])
    model = worker.build_module(recipe).model.eval()
    batch = short_batch(recipe, 6, longest=9)
    seen: list[int] = []
    model.text.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        cut = model.encode_text(batch["token_ids"], batch["token_mask"])
        monkeypatch.setattr(TextTransformer, "accepts_shorter_context", False)
        full = model.encode_text(batch["token_ids"], batch["token_mask"])
    assert seen == [16, 32]
    assert float((cut - full).abs().max()) < 1e-6


def test_a_traced_encode_text_does_not_keep_the_example_batchs_length():
    """torch.jit.trace records a data-dependent length as a constant, so tracing leaves the cut out: a trace made
    on short captions still embeds long ones as the eager model does."""
    recipe = sparc_kit.load_recipe("sparc_tiny", [*MICRO, CONTEXT])
    model = worker.build_module(recipe).model.eval()

    class Text(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m.encode_text(ids, mask)

    short, long = short_batch(recipe, 4, longest=5), short_batch(recipe, 4, longest=30, seed=8)
    with torch.no_grad():
        traced = torch.jit.trace(Text(model), (short["token_ids"], short["token_mask"]), check_trace=False)
        eager = model.encode_text(long["token_ids"], long["token_mask"])
        got = traced(long["token_ids"], long["token_mask"])
    assert float((got - eager).abs().max()) < 1e-6
