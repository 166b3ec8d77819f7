"""Properties every registered component must have, parametrised over the *whole* registry (timm-style).

The other test files check each built-in component in detail against references. This file checks the contract
that every component of a kind shares, and it is parametrised with ``registry.names()`` collected at import time,
so a component registered tomorrow is covered without touching this file -- except for one line: the tiny
settings it is built with (``VISION_TINY``, ``TEXT_TINY``, ``DATASET_TINY``) and, for a loss, which locality class
it belongs to (``PER_SAMPLE_FINE`` / ``ALL_PAIRS_FINE`` / ``GLOBAL_ONLY``). A component missing from those tables
fails with a message saying where to add it, so nothing new slips through untested.

What is checked, per kind
-------------------------
- vision encoders: finite ``forward_features``; patch tokens [B, P, output_dim] with P = (image_size/patch)^2,
  class token [B, output_dim] or None; ``forward`` = the patch tokens; every parameter gets a non-zero finite
  gradient; gradient checkpointing (train mode) really recomputes in backward and gives the same outputs (1e-6)
  and gradients.
- text encoders: the same, plus: what padded token slots contain never changes the real tokens' features.
- poolers: finite [B, W] output; every parameter gets a finite gradient; padded content changes nothing and gets
  no gradient, while a real position does change the result (so the invariance is not vacuous). ``cls`` is called
  the image way (a class token, no mask).
- losses (built as a recipe builds them, internal ``embed_dim`` filled in): finite scalar loss; exactly the inputs
  the loss value depends on get a finite non-zero gradient (the others none), ``logit_scale`` always; every loss
  parameter gets a finite gradient; permuting the batch changes nothing (eval mode); diagnostics are finite,
  detached scalars; bf16 autocast gives a finite float32 loss; the fine-grained term of SPARC and MGCA is per
  sample (sample 0's gradient ignores the other samples and is parallel to its gradient alone), while FILIP, PACL
  and GLoRIA contrast all pairs (sample 0's gradient does change) -- which is why only the former are O(B L P).
- attention backends: agree with ``math`` to 1e-5 on random inputs with padding (and causal) masks; a backend that
  cannot run here (xformers without the package or CUDA) is skipped with its own reason.
- datasets: items are uint8 [3, H, W] images and non-empty captions, identical across two builds.
- engines: on CPU in fp32, ``prepare`` / ``backward`` / ``step`` with AdamW takes a descent step on a quadratic.

Tiny shapes throughout (B = 3), so the file runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_forward_pre_hook

import sparc_kit  # noqa: F401  (registers the built-in components)
from sparc_kit.models.attention import BackendUnavailableError, attention_mask
from sparc_kit.registry import (
    attention_backends,
    datasets,
    engines,
    losses,
    poolers,
    text_encoders,
    vision_encoders,
)

B = 3

# ---------------------------------------------------------------------------------------------------------------
# Tiny settings. A newly registered component needs an entry here (the tests fail and say so otherwise).
# ---------------------------------------------------------------------------------------------------------------

VISION_TINY: dict[str, dict] = {
    "vit": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},
    "timm": {"model_name": "test_vit", "image_size": 32},  # timm's own tiny test ViT (width 64, a class token)
}
TEXT_TINY: dict[str, dict] = {
    "transformer": {"width": 32, "depth": 2, "heads": 2},
}
DATASET_TINY: dict[str, dict] = {  # "{data}" in a value is replaced by a folder of generated files
    "synthetic": {"num_samples": 8, "image_size": 16},
    "manifest": {"path": "{data}/pairs.jsonl", "image_size": 16},
    "webdataset": {"urls": "{data}/train-{000..001}.tar", "image_size": 16, "shuffle_buffer": 4},
}
# Poolers, losses, attention backends and engines are built with their defaults (as a recipe naming them would),
# plus the internal arguments their builder fills in:
VOCAB, CONTEXT, W_POOL, E = 64, 8, 16, 8
INTERNAL_VALUES: dict[str, object] = {
    "attention": "sdpa",  # build_model: the recipe's model.attention
    "grad_checkpointing": False,  # build_model switches it on afterwards with set_grad_checkpointing
    "vocab_size": VOCAB,  # build_model: tokenizer.vocab_size
    "context_length": CONTEXT,  # build_model: tokenizer.context_length
    "width": W_POOL,  # build_model: the tower's output_dim, for poolers
    "embed_dim": E,  # train.loop.build_loss: model.embed_dim
    "device": "cpu",  # train.loop.build_engine: train.device
    "precision": "fp32",  # train.loop.build_engine: train.precision
}

# Loss locality. The per-sample ones' fine term uses no other sample (memory O(B L P), no all-gather); the
# all-pairs ones contrast every (image, caption) pair of the batch through their fine term (O(B^2 ...)).
PER_SAMPLE_FINE = {"sparc", "mgca"}
ALL_PAIRS_FINE = {"filip", "pacl", "gloria"}
GLOBAL_ONLY = {"clip", "siglip"}

VISION_NAMES = vision_encoders.names()
TEXT_NAMES = text_encoders.names()
POOLER_NAMES = poolers.names()
LOSS_NAMES = losses.names()
BACKEND_NAMES = attention_backends.names()
DATASET_NAMES = datasets.names()
ENGINE_NAMES = engines.names()

NEEDS_CLASS_TOKEN = {"cls"}  # poolers called the image way (class token, no mask); the others the text way


def _tiny(table: dict[str, dict], table_name: str, kind: str, name: str) -> dict:
    if name not in table:
        pytest.fail(
            f"{kind} {name!r} is registered but has no tiny settings: add {name!r}: {{...}} to {table_name} in "
            "tests/test_properties.py (small enough to run in well under a second on a CPU)",
            pytrace=False,
        )
    return dict(table[name])


def _internal(entry) -> dict:
    unknown = [a for a in entry.supplied if a not in INTERNAL_VALUES]
    if unknown:
        pytest.fail(
            f"{entry.kind} {entry.name!r} declares internal arguments {unknown} that tests/test_properties.py does "
            "not know how to fill: add them to INTERNAL_VALUES (with what the builder of the model / loop passes)",
            pytrace=False,
        )
    return {a: INTERNAL_VALUES[a] for a in entry.supplied}


def build(registry, name: str, params: dict | None = None):
    entry = registry.get(name)
    torch.manual_seed(0)
    return entry.build(params or {}, **_internal(entry))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lengths_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # [B, n] bool, True = real


def assert_all_finite(tensors: dict[str, torch.Tensor | None]) -> None:
    bad = [k for k, t in tensors.items() if t is not None and not torch.isfinite(t).all()]
    assert not bad, f"non-finite: {bad}"


def assert_every_param_has_nonzero_finite_grad(module: nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    nonfinite = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    zero = [n for n, p in module.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert (missing, nonfinite, zero) == ([], [], []), "parameters without / non-finite / zero gradient"


class CountModuleCalls:
    """Counts every nn.Module call (a global pre-hook: it also fires when checkpointing recomputes in backward)."""

    def __enter__(self):
        self.n = 0
        self._handle = register_module_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args):
        self.n += 1

    def __exit__(self, *exc):
        self._handle.remove()


def check_grad_checkpointing(model: nn.Module, forward, scalar) -> None:
    """Same outputs and gradients with and without checkpointing (train mode), and it really recomputes."""
    model.train()
    results = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        with CountModuleCalls() as calls:
            outs = forward(model)
            n_forward = calls.n
            scalar(outs).backward()
            recomputed = calls.n - n_forward
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[enable] = ({k: v.detach() for k, v in outs.items() if v is not None}, grads, recomputed)
    model.set_grad_checkpointing(False)
    (out0, g0, re0), (out1, g1, re1) = results[False], results[True]
    assert re0 == 0 and re1 > 0, f"modules called in backward: {re0} without checkpointing, {re1} with"
    assert out0.keys() == out1.keys()
    for k in out0:
        torch.testing.assert_close(out1[k], out0[k], rtol=0, atol=1e-6, msg=k)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# Every tiny table entry names a registered component (no stale rows)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "registry, table",
    [
        (vision_encoders, VISION_TINY),
        (text_encoders, TEXT_TINY),
        (datasets, DATASET_TINY),
        (losses, {n: {} for n in PER_SAMPLE_FINE | ALL_PAIRS_FINE | GLOBAL_ONLY}),
    ],
    ids=["vision_encoder", "text_encoder", "dataset", "loss_locality"],
)
def test_tiny_tables_name_only_registered_components(registry, table):
    assert sorted(set(table) - set(registry.names())) == [], f"stale entries for {registry.kind}"
    assert not PER_SAMPLE_FINE & ALL_PAIRS_FINE and not GLOBAL_ONLY & (PER_SAMPLE_FINE | ALL_PAIRS_FINE)


# ---------------------------------------------------------------------------------------------------------------
# Vision encoders
# ---------------------------------------------------------------------------------------------------------------


def build_vision(name: str):
    params = _tiny(VISION_TINY, "VISION_TINY", "vision encoder", name)
    return build(vision_encoders, name, params), params["image_size"]


def vision_scalar(seed: int):
    """Sum of squares of (features - a fixed random target): a plain sum of squares would be constant after the
    final LayerNorm at initialisation (unit weight, zero bias) and give the tower no gradient at all."""

    def scalar(outs):
        total = 0.0
        for i, key in enumerate(("patch_tokens", "cls_token")):
            t = outs.get(key)
            if t is not None:
                total = total + (t - torch.randn(t.shape, generator=gen(seed + i))).pow(2).sum()
        return total

    return scalar


@pytest.mark.parametrize("name", VISION_NAMES, ids=VISION_NAMES)
def test_vision_encoder_forward_contract(name):
    enc, size = build_vision(name)
    enc.eval()
    images = torch.randn(B, 3, size, size, generator=gen(1))
    with torch.no_grad():
        feats = enc.forward_features(images)
        plain = enc(images)
    patches, cls_token = feats["patch_tokens"], feats.get("cls_token")
    width = enc.output_dim
    num_patches = (size // enc.patch_size) ** 2
    assert patches.shape == (B, num_patches, width)
    assert getattr(enc, "num_patches", num_patches) == num_patches
    assert cls_token is None or cls_token.shape == (B, width)
    assert_all_finite({"patch_tokens": patches, "cls_token": cls_token})
    torch.testing.assert_close(plain, patches, rtol=0, atol=0)  # forward = the patch tokens


@pytest.mark.parametrize("name", VISION_NAMES, ids=VISION_NAMES)
def test_vision_encoder_every_parameter_gets_a_gradient(name):
    enc, size = build_vision(name)
    enc.train()
    images = torch.randn(B, 3, size, size, generator=gen(2))
    loss = vision_scalar(10)(enc.forward_features(images))
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_param_has_nonzero_finite_grad(enc)


@pytest.mark.parametrize("name", VISION_NAMES, ids=VISION_NAMES)
def test_vision_encoder_grad_checkpointing_same_outputs_and_gradients(name):
    enc, size = build_vision(name)
    images = torch.randn(B, 3, size, size, generator=gen(3))
    check_grad_checkpointing(enc, lambda m: m.forward_features(images), vision_scalar(20))


# ---------------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------------

TEXT_LENGTHS = [CONTEXT, 4, 1]  # full, padded, a one-token caption


def build_text(name: str):
    return build(text_encoders, name, _tiny(TEXT_TINY, "TEXT_TINY", "text encoder", name))


def text_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = lengths_mask(TEXT_LENGTHS, CONTEXT)
    ids = torch.randint(1, VOCAB, (B, CONTEXT), generator=gen(seed)).masked_fill(~mask, 0)  # 0 = padding
    return ids, mask


def text_scalar(mask: torch.Tensor, seed: int):
    """Sum of squares of (real-token features - a fixed random target); padded positions are not used."""

    def scalar(outs):
        t = outs["tokens"]
        return ((t - torch.randn(t.shape, generator=gen(seed))).pow(2) * mask[..., None]).sum()

    return scalar


@pytest.mark.parametrize("name", TEXT_NAMES, ids=TEXT_NAMES)
def test_text_encoder_forward_contract_and_gradients(name):
    enc = build_text(name).train()
    ids, mask = text_batch(1)
    tokens = enc(ids, mask)
    assert tokens.shape == (B, CONTEXT, enc.output_dim)
    assert_all_finite({"tokens": tokens})
    loss = text_scalar(mask, 10)({"tokens": tokens})
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_param_has_nonzero_finite_grad(enc)


@pytest.mark.parametrize("name", TEXT_NAMES, ids=TEXT_NAMES)
def test_text_encoder_grad_checkpointing_same_outputs_and_gradients(name):
    enc = build_text(name)
    ids, mask = text_batch(2)
    check_grad_checkpointing(enc, lambda m: {"tokens": m(ids, mask)}, text_scalar(mask, 20))


@pytest.mark.parametrize("name", TEXT_NAMES, ids=TEXT_NAMES)
def test_text_encoder_real_features_ignore_padding_content(name):
    enc = build_text(name).eval()
    ids, mask = text_batch(3)
    other = torch.where(mask, ids, torch.randint(1, VOCAB, ids.shape, generator=gen(4)))  # garbage in the padding
    assert not torch.equal(other, ids)
    with torch.no_grad():
        a, b = enc(ids, mask), enc(other, mask)
    torch.testing.assert_close(b[mask], a[mask], rtol=0, atol=1e-5)
    # not vacuous: changing a real token of caption 1 changes its features
    real = ids.clone()
    real[1, 0] = 1 + (int(ids[1, 0]) % (VOCAB - 1))
    with torch.no_grad():
        c = enc(real, mask)
    assert (c[1][mask[1]] - a[1][mask[1]]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Poolers
# ---------------------------------------------------------------------------------------------------------------

N_POOL = 6
POOL_LENGTHS = [N_POOL, 3, 1]


def pooler_call(name: str, pooler: nn.Module, x: torch.Tensor, cls_token: torch.Tensor):
    """The image way (class token, no mask) for class-token poolers, else the text way (mask, no class token)."""
    if name in NEEDS_CLASS_TOKEN:
        return pooler(x, None, cls_token=cls_token), None
    mask = lengths_mask(POOL_LENGTHS, N_POOL)
    return pooler(x, mask, cls_token=None), mask


@pytest.mark.parametrize("name", POOLER_NAMES, ids=POOLER_NAMES)
def test_pooler_output_and_gradients(name):
    pooler = build(poolers, name).train()
    x = torch.randn(B, N_POOL, W_POOL, generator=gen(1)).requires_grad_(True)
    cls_token = torch.randn(B, W_POOL, generator=gen(2)).requires_grad_(True)
    out, mask = pooler_call(name, pooler, x, cls_token)
    assert out.shape == (B, W_POOL)
    assert_all_finite({"out": out})
    (out - torch.randn(out.shape, generator=gen(3))).pow(2).sum().backward()
    for pname, p in pooler.named_parameters():
        # finite and present; not asserted non-zero one by one: e.g. the attention pooler's key bias is a constant
        # shift of every score, which the softmax removes, so its gradient is zero up to rounding
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert sum(float(p.grad.abs().sum()) for p in pooler.parameters()) > 0 or not list(pooler.parameters())
    got_grad = (x.grad is not None and x.grad.abs().sum() > 0) or (
        cls_token.grad is not None and cls_token.grad.abs().sum() > 0
    )
    assert got_grad, "the pooled output does not depend on its inputs"
    if mask is not None:
        assert x.grad is not None and torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask])), "padding got grad"


@pytest.mark.parametrize("name", POOLER_NAMES, ids=POOLER_NAMES)
def test_pooler_ignores_padding_content(name):
    if name in NEEDS_CLASS_TOKEN:
        pytest.skip(f"{name!r} is called with a class token and no mask: there is no padding")
    pooler = build(poolers, name).eval()
    x = torch.randn(B, N_POOL, W_POOL, generator=gen(4))
    mask = lengths_mask(POOL_LENGTHS, N_POOL)
    garbage = torch.where(mask[..., None], x, 100.0 * torch.randn(x.shape, generator=gen(5)))
    with torch.no_grad():
        a = pooler(x, mask, cls_token=None)
        b = pooler(garbage, mask, cls_token=None)
        real = x.clone()
        real[:, 0] += 3.0  # position 0 is real in every row
        c = pooler(real, mask, cls_token=None)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert ((c - a).abs().amax(dim=1) > 1e-4).any(), "changing a real position changed nothing: vacuous"


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

P_LOSS, L_LOSS = 4, 5
LOSS_LENGTHS = [L_LOSS, 3, 1]  # varied lengths, one a one-token caption
FLOAT_INPUTS = ("image_embeds", "text_embeds", "patch_embeds", "token_embeds", "logit_scale")


def build_loss(name: str, params: dict | None = None) -> nn.Module:
    return build(losses, name, params)


def loss_inputs(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A synthetic model-output dict, every float entry a leaf requiring grad (as the model's would)."""
    g = gen(seed)
    out = {
        "image_embeds": torch.randn(B, E, generator=g),
        "text_embeds": torch.randn(B, E, generator=g),
        "patch_embeds": torch.randn(B, P_LOSS, E, generator=g),
        "token_embeds": torch.randn(B, L_LOSS, E, generator=g),
    }
    out = {k: v.to(dtype).requires_grad_(True) for k, v in out.items()}
    out["token_mask"] = lengths_mask(LOSS_LENGTHS, L_LOSS)
    out["logit_scale"] = torch.tensor(7.0, requires_grad=True)  # float32, as the model's exp(log scale) is
    return out


def call_loss(loss_fn: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # FILIP's token dropping in train mode: the same draw on every call
    return loss_fn(**inputs)


@pytest.mark.parametrize("name", LOSS_NAMES, ids=LOSS_NAMES)
def test_loss_gradients_reach_exactly_what_the_loss_depends_on(name):
    loss_fn = build_loss(name).train()
    inputs = loss_inputs(1)
    out = call_loss(loss_fn, inputs)
    loss = out["loss"]
    assert loss.shape == () and torch.isfinite(loss), loss
    loss.backward()
    with torch.no_grad():
        base = float(loss)
        for key in FLOAT_INPUTS:
            moved = dict(inputs)
            moved[key] = inputs[key] + 0.5 * torch.randn(inputs[key].shape, generator=gen(2))
            depends = abs(float(call_loss(loss_fn, moved)["loss"]) - base) > 1e-6 * max(1.0, abs(base))
            grad = inputs[key].grad
            if depends:
                assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (
                    f"the loss depends on {key} but its gradient is {grad}"
                )
            else:
                assert grad is None or not grad.abs().sum() > 0, f"the loss ignores {key} but it gets a gradient"
    assert inputs["logit_scale"].grad is not None and inputs["logit_scale"].grad.abs() > 0
    for pname, p in loss_fn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", LOSS_NAMES, ids=LOSS_NAMES)
def test_loss_takes_a_plain_number_as_logit_scale_and_keeps_float64(name):
    """A float ``logit_scale`` (as the functional forms accept) gives the tensor's loss; float64 inputs give a
    float64 loss (promoted, never demoted: a float64 reference check is then exact)."""
    loss_fn = build_loss(name).eval()
    inputs = loss_inputs(6)
    with torch.no_grad():
        as_tensor = call_loss(loss_fn, inputs)["loss"]
        as_float = call_loss(loss_fn, {**inputs, "logit_scale": 7.0})["loss"]
    torch.testing.assert_close(as_float, as_tensor)
    wide = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = call_loss(loss_fn.double(), wide)["loss"]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), as_tensor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES, ids=LOSS_NAMES)
def test_loss_is_invariant_to_permuting_the_batch(name):
    loss_fn = build_loss(name).eval()  # FILIP drops no token in eval mode
    inputs = loss_inputs(3)
    perm = torch.tensor([2, 0, 1])
    permuted = {k: (v if k == "logit_scale" else v[perm]) for k, v in inputs.items()}
    with torch.no_grad():
        a, b = call_loss(loss_fn, inputs), call_loss(loss_fn, permuted)
    for key in ("loss", "global_loss", "fine_loss"):
        if key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", LOSS_NAMES, ids=LOSS_NAMES)
def test_loss_diagnostics_are_finite_detached_scalars(name):
    loss_fn = build_loss(name).train()
    out = call_loss(loss_fn, loss_inputs(4))
    assert out["loss"].shape == () and out["loss"].requires_grad
    for key, value in out.items():
        assert torch.is_tensor(value) and value.shape == () and value.is_floating_point(), key
        assert torch.isfinite(value), (key, value)
        if key != "loss":
            assert not value.requires_grad and value.grad_fn is None, f"diagnostic {key!r} is not detached"


@pytest.mark.parametrize("name", LOSS_NAMES, ids=LOSS_NAMES)
def test_loss_under_bf16_autocast_is_float32_and_finite(name):
    loss_fn = build_loss(name).eval()
    half = loss_inputs(5, dtype=torch.bfloat16)  # what the model's adapters give under bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_loss(loss_fn, half)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    # and no bf16 arithmetic inside: the same as float32 on the same (bf16-rounded) numbers
    full = {k: (v.detach().float() if v.is_floating_point() else v) for k, v in half.items()}
    with torch.no_grad():
        ref = call_loss(loss_fn, full)["loss"]
    torch.testing.assert_close(out["loss"].detach(), ref, rtol=1e-4, atol=1e-4)


def _locality(name: str) -> str:
    for label, group in (("per_sample", PER_SAMPLE_FINE), ("all_pairs", ALL_PAIRS_FINE), ("global", GLOBAL_ONLY)):
        if name in group:
            return label
    pytest.fail(
        f"loss {name!r} is registered but tests/test_properties.py does not say how local it is: add it to "
        "PER_SAMPLE_FINE (a fine-grained term that uses no other sample), ALL_PAIRS_FINE (a fine term over all "
        "pairs of the batch) or GLOBAL_ONLY (no fine-grained term)",
        pytrace=False,
    )


def _sample0_grads(fn, inputs: dict[str, torch.Tensor], keys) -> tuple[torch.Tensor, torch.Tensor]:
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in keys else v) for k, v in inputs.items()}
    value = fn(leaves)
    value.backward()
    parts = [leaves[k].grad[0].flatten() for k in keys if leaves[k].grad is not None]
    return value.detach(), torch.cat(parts) if parts else torch.zeros(0)


def _change_sample(inputs: dict[str, torch.Tensor], index: int, seed: int) -> dict[str, torch.Tensor]:
    other = loss_inputs(seed)
    changed = {}
    for k, v in inputs.items():
        if k in ("logit_scale", "token_mask"):
            changed[k] = v
        else:
            changed[k] = v.detach().clone()
            changed[k][index] = other[k][index].detach()
    return changed


@pytest.mark.parametrize("name", LOSS_NAMES, ids=LOSS_NAMES)
def test_loss_locality_per_sample_or_all_pairs(name):
    locality = _locality(name)
    inputs = {k: v.detach() for k, v in loss_inputs(6).items()}
    changed = _change_sample(inputs, 1, seed=7)  # sample 1 (3 real tokens) replaced; a one-token caption
    # would not do: its L x L contrast is over one entry, exactly 0 whatever its content
    if locality == "per_sample":
        loss_fn = build_loss(name).eval()
        keys = ("patch_embeds", "token_embeds")

        def fine(inp):
            return loss_fn.fine_loss(inp["patch_embeds"], inp["token_embeds"], inp["token_mask"], inp["logit_scale"])

        value, g = _sample0_grads(fine, inputs, keys)
        value2, g2 = _sample0_grads(fine, changed, keys)
        assert abs(float(value2) - float(value)) > 1e-4, "changing sample 1 should change the batch's fine term"
        torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-7)  # ...but not sample 0's part of it
        # sample 0's gradient in the batch is a positive multiple of its gradient alone (the multiple is the
        # averaging: 1/B for per-caption means, n_0 / (all real tokens) for a per-token mean)
        alone = {k: (v if k == "logit_scale" else v[:1]) for k, v in inputs.items()}
        _, g_alone = _sample0_grads(fine, alone, keys)
        c = float(g @ g_alone) / float(g_alone @ g_alone)
        assert c > 0
        torch.testing.assert_close(g, c * g_alone, rtol=1e-4, atol=1e-7)
    elif locality == "all_pairs":
        # the fine term alone (lambda_g = 0), through forward since the baselines' fine_loss signatures differ
        loss_fn = build_loss(name, {"lambda_g": 0.0}).eval()
        keys = ("patch_embeds", "token_embeds", "text_embeds", "image_embeds")

        def fine(inp):
            return call_loss(loss_fn, inp)["loss"]

        _, g = _sample0_grads(fine, inputs, keys)
        _, g2 = _sample0_grads(fine, changed, keys)
        assert g.abs().sum() > 0
        assert (g2 - g).abs().max() > 1e-4 * g.abs().max(), (
            f"{name}'s fine term is listed as all-pairs but sample 0's gradient ignores the other samples: "
            "move it to PER_SAMPLE_FINE"
        )
    else:  # global only: the local embeddings are not used at all
        loss_fn = build_loss(name).eval()
        leaves = {k: (v.clone().requires_grad_(True) if k in FLOAT_INPUTS else v) for k, v in inputs.items()}
        call_loss(loss_fn, leaves)["loss"].backward()
        local = ("patch_embeds", "token_embeds")
        assert all(leaves[k].grad is None for k in local), f"{name} is listed as global-only but uses {local}"
        assert leaves["image_embeds"].grad is not None and leaves["text_embeds"].grad is not None


# ---------------------------------------------------------------------------------------------------------------
# Attention backends
# ---------------------------------------------------------------------------------------------------------------

MASK_KINDS = ["padding", "causal_padding", "none"]


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("name", BACKEND_NAMES, ids=BACKEND_NAMES)
def test_attention_backend_matches_math(name, mask_kind):
    kernel = attention_backends.get(name).builder  # backends are plain functions: the builder is the kernel
    reference = attention_backends.get("math").builder
    heads, n, dh = 2, 6, 8
    g = gen(1)
    q, k, v = (torch.randn(B, heads, n, dh, generator=g) for _ in range(3))
    key_mask = None if mask_kind == "none" else lengths_mask([n, 3, 1], n)
    mask = attention_mask(key_mask, n, causal=mask_kind == "causal_padding", device=q.device)
    try:
        out = kernel(q, k, v, mask)
    except BackendUnavailableError as exc:
        pytest.skip(f"attention backend {name!r} cannot run here: {exc}")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASET_NAMES, ids=DATASET_NAMES)
def test_dataset_items_and_determinism(name, tmp_path, datagen):
    params = _tiny(DATASET_TINY, "DATASET_TINY", "dataset", name)
    datagen.manifest(tmp_path, n=8, size=20)
    datagen.shards(tmp_path, n_shards=2, per_shard=4, size=20)
    params = {k: v.replace("{data}", str(tmp_path)) if isinstance(v, str) else v for k, v in params.items()}
    first, second = build(datasets, name, params), build(datasets, name, params)
    if isinstance(first, torch.utils.data.IterableDataset):  # a stream: compare its first items
        first, second = list(itertools.islice(first, 8)), list(itertools.islice(second, 8))
    n = min(len(first), 4)
    assert n > 0 and len(first) == len(second)
    for i in range(n):
        a, b = first[i], second[i]
        image, caption = a["image"], a["caption"]
        assert torch.is_tensor(image) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        if "image_size" in params:
            assert tuple(image.shape[1:]) == (params["image_size"],) * 2
        assert isinstance(caption, str) and caption.strip(), repr(caption)
        assert torch.equal(b["image"], image) and b["caption"] == caption, f"item {i} differs between two builds"
    assert len({first[i]["caption"] for i in range(len(first))}) > 1 or len(first) == 1  # not one fixed item


# ---------------------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------------------


class _Quadratic(nn.Module):
    """A train-module stand-in: ``forward`` returns ``{"loss": sum ||p - target||^2}``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, generator=gen(1)))
        self.bias = nn.Parameter(torch.randn(2, generator=gen(2)))
        self.register_buffer("target_w", torch.randn(2, 3, generator=gen(3)))
        self.register_buffer("target_b", torch.randn(2, generator=gen(4)))

    def forward(self, scale):
        return {"loss": scale * ((self.weight - self.target_w).pow(2).sum() + (self.bias - self.target_b).pow(2).sum())}


@pytest.mark.parametrize("name", ENGINE_NAMES, ids=ENGINE_NAMES)
def test_engine_takes_a_descent_step_on_a_quadratic(name):
    """Every engine, run as one process (a distributed engine starts a group of one): the seam's calls move the
    weights against the gradient by Adam's first step, report the gradient norm, and hand back full weights."""
    from sparc_kit.engines import BatchLayout, OptimizerSpec, param_groups

    import os

    environment = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    engine = build(engines, name)  # internal: device='cpu', precision='fp32'
    try:
        module = _Quadratic()
        engine.setup(module, OptimizerSpec(param_groups(module, 0.0), lr=0.05), BatchLayout(4), grad_clip=None)
        assert torch.device(engine.device).type == "cpu"
        assert engine.rank == 0 and engine.world_size == 1 and engine.is_main
        inner = engine.unwrap()
        before = {n: p.detach().clone() for n, p in inner.named_parameters()}
        expected = {"weight": 2 * (before["weight"] - inner.target_w), "bias": 2 * (before["bias"] - inner.target_b)}
        with engine.autocast():
            loss = engine(torch.tensor(1.0))["loss"]
        engine.backward(loss)
        norm = engine.step(None)
        expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()]))
        torch.testing.assert_close(torch.as_tensor(norm, dtype=torch.float32), expected_norm)
        after = engine.full_state_dict()
        for n in ("weight", "bias"):
            delta = after[n] - before[n]
            assert float((delta * expected[n]).sum()) < 0, f"{n} did not move against its gradient"
            # Adam's first step: -lr * sign(grad)
            torch.testing.assert_close(delta, -0.05 * torch.sign(expected[n]), rtol=1e-4, atol=1e-6)
        assert all(p.grad is None or not p.grad.abs().sum() > 0 for p in inner.parameters()), "gradients not cleared"
        with torch.no_grad():
            assert float(engine(torch.tensor(1.0))["loss"]) < float(loss)
        assert engine.all_reduce_mean(torch.tensor([3.0])).item() == 3.0
        assert engine.gather_objects("x") == ["x"] and engine.broadcast_object(7) == 7
    finally:
        engine.close()
    # a group of one leaves no launcher variables behind (a later child process would read them)
    assert {k: os.environ.get(k) for k in environment} == environment


class _Bounded(nn.Module):
    """A temperature-like scalar with bounds, pushed upward by its loss (as contrastive training does)."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(1.95))

    def parameter_bounds(self):
        return {"log_scale": (0.0, 2.0)}

    def forward(self, direction):
        return {"loss": -direction * self.log_scale}


@pytest.mark.parametrize("name", ENGINE_NAMES, ids=ENGINE_NAMES)
def test_a_bounded_parameter_is_clamped_after_the_step_and_can_come_back(name):
    """open_clip's fix of the stuck temperature: the parameter is clamped after the update, not in forward
    alone, so at the cap its gradient still flows and a gradient the other way brings it back down."""
    from sparc_kit.engines import BatchLayout, OptimizerSpec, param_groups

    engine = build(engines, name)
    try:
        module = _Bounded()
        engine.setup(module, OptimizerSpec(param_groups(module, 0.0), lr=0.1), BatchLayout(1))
        for _ in range(3):  # pushed up: stops at the cap
            engine.backward(engine(torch.tensor(1.0))["loss"])
            engine.step(None)
        assert float(engine.full_state_dict()["log_scale"]) == pytest.approx(2.0)
        for _ in range(8):  # pushed down from the cap (Adam's momentum first spends itself): it comes back
            engine.backward(engine(torch.tensor(-1.0))["loss"])
            engine.step(None)
        assert float(engine.full_state_dict()["log_scale"]) < 2.0 - 0.1
    finally:
        engine.close()
