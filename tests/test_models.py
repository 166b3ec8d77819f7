"""Tests of the native encoders, the attention backends and the dual encoder (``sparc_kit.models``).

What is checked, and why
------------------------
- Attention: the ``math`` backend against a slow per-query reference that *drops* disallowed keys (rather than
  masking them with a large negative number), the fused ``sdpa`` backend against ``math`` to 1e-5 with padding and
  causal masks, and whole towers built with either backend (identical weights) against each other. The
  ``attention_mask`` helper is pinned element by element, including its rule that a query with no allowed key
  attends to every key (so an all-padding caption stays finite).
- ``xformers``: compared with ``math`` on CUDA where it can run (skipped with the concrete reason otherwise); on CPU
  the error it raises must tell the user what to do (install the extra / it is CUDA only).
- Text tower invariances: padded positions' ids do not matter; with a causal mask a later token cannot change
  earlier tokens' features (and each test also checks it *would* notice a change, so it is not vacuous).
- Gradient checkpointing is a pure memory trade: same outputs, same gradients (and it is really engaged).
- The dual encoder built from the ``sparc_tiny`` recipe: every parameter is trained by SPARC's loss and by CLIP's;
  the output contract, the Listing-1 identity (global image embedding = mean of projected patches when the global
  head is the identity; text embedding = masked mean of projected tokens), unit-norm ``encode_*``, the
  temperature's initial value and clamp.
- Parameter counts of the paper-size towers, built on the meta device, against closed-form counts.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import sparc_kit

from sparc_kit.config import load_recipe
from sparc_kit.losses import ClipLoss, SparcLoss
from sparc_kit.models import DualEncoder, MeanPooler, TextTransformer, VisionTransformer, build_model, masked_mean
from sparc_kit.models.attention import BackendUnavailableError, attention_mask, get_attention_backend

ATOL = 1e-5
VOCAB, CTX = 50, 12

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def lengths_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def random_ids(lengths: list[int], n: int = CTX, vocab: int = VOCAB, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids in [4, vocab) at real positions, padding id 0 after them, and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), n), generator=g)
    mask = lengths_mask(lengths, n)
    return ids.masked_fill(~mask, 0), mask


def small_text(causal: bool = False, attention: str = "sdpa", seed: int = 0) -> TextTransformer:
    torch.manual_seed(seed)
    return TextTransformer(
        vocab_size=VOCAB, context_length=CTX, width=32, depth=2, heads=4, causal=causal, attention=attention
    )


def small_vit(attention: str = "sdpa", seed: int = 0, class_token: bool = False) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        image_size=16, patch_size=4, width=32, depth=2, heads=4, attention=attention, class_token=class_token
    )


def small_dual(image_global_head: str = "mlp", causal: bool = False, **kw) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(
        vision=VisionTransformer(image_size=16, patch_size=4, width=32, depth=2, heads=4),
        text=TextTransformer(vocab_size=VOCAB, context_length=CTX, width=32, depth=2, heads=4, causal=causal),
        embed_dim=16,
        image_pooler=MeanPooler(),
        text_pooler=MeanPooler(),
        image_global_head=image_global_head,
        **kw,
    )


TINY_OVERRIDES = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.width=32",
    "model.vision.depth=2",
    "model.vision.heads=4",
    "model.text.width=32",
    "model.text.depth=2",
    "model.text.heads=4",
    "model.embed_dim=16",
    "tokenizer.context_length=12",
]


def tiny_recipe_model(*extra: str) -> DualEncoder:
    recipe = load_recipe("sparc_tiny", overrides=TINY_OVERRIDES + list(extra))
    torch.manual_seed(0)
    return build_model(recipe)


def tiny_batch(b: int = 4, lengths=(12, 7, 3, 1), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    ids, mask = random_ids(list(lengths), n=12, vocab=64, seed=seed)
    return images, ids, mask


# --------------------------------------------------------------------------------------------------------------
# attention backends
# --------------------------------------------------------------------------------------------------------------


def ref_attention(q, k, v, mask):
    """Per (batch, head, query): softmax over the *allowed* keys only, in float64 (allowed = mask True)."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    full = (
        torch.ones(b, h, n, k.shape[2], dtype=torch.bool)
        if mask is None
        else mask.expand(b, h, n, k.shape[2])
    )
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keys = full[bi, hi, i].nonzero().flatten()
                s = (k[bi, hi, keys] @ q[bi, hi, i]) / math.sqrt(d)
                w = torch.softmax(s, dim=0)
                out[bi, hi, i] = w @ v[bi, hi, keys]
    return out


MASK_CASES = {
    "none": (None, False),
    "padding": ([7, 4, 1], False),
    "causal": (None, True),
    "causal+padding": ([7, 4, 1], True),
    "all-padding-row": ([7, 0, 3], False),
    "causal+all-padding-row": ([7, 0, 3], True),
}


def make_mask(case: str, n: int = 7):
    lengths, causal = MASK_CASES[case]
    key_mask = None if lengths is None else lengths_mask(lengths, n)
    return attention_mask(key_mask, n, causal, torch.device("cpu"))


def qkv(b=3, h=2, n=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_math_backend_matches_slow_reference(case):
    q, k, v = qkv()
    mask = make_mask(case)
    out = get_attention_backend("math")(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref_attention(q, k, v, mask), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_sdpa_backend_matches_math(case):
    q, k, v = qkv(seed=3)
    mask = make_mask(case)
    sdpa = get_attention_backend("sdpa")(q, k, v, mask)
    ref = get_attention_backend("math")(q, k, v, mask)
    assert sdpa.dtype == torch.float32
    assert torch.isfinite(sdpa).all()
    torch.testing.assert_close(sdpa, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", ["matmul", "auto"])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_matmul_and_auto_backends_match_slow_reference(backend, case):
    q, k, v = qkv(seed=4)
    mask = make_mask(case)
    out = get_attention_backend(backend)(q, k, v, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_attention(q, k, v, mask), rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", ["matmul", "auto"])
@pytest.mark.parametrize("case", ["none", "causal+padding"])
def test_bf16_backends_match_float64_reference_and_its_gradients(backend, case):
    """In bfloat16 (where ``auto`` runs ``matmul`` on the CPU) the outputs and the gradients of q, k, v stay within
    bfloat16 rounding of the float64 reference, as close as torch's fused kernel gets."""
    q64, k64, v64 = [t.double().requires_grad_() for t in qkv(b=3, h=3, n=7, d=16, seed=6)]
    mask = make_mask(case)
    ref = ref_attention(q64, k64, v64, mask)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g)
    errors = {}
    for name in (backend, "sdpa"):
        q, k, v = [t.detach().bfloat16().requires_grad_() for t in (q64, k64, v64)]
        out = get_attention_backend(name)(q, k, v, mask)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out, (q, k, v), g.bfloat16())
        errors[name] = [(out.double() - ref).abs().max().item()] + [
            (a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads)
        ]
    for err, fused in zip(errors[backend], errors["sdpa"]):
        assert err < 0.05  # bfloat16 keeps 8 bits of mantissa; these values are O(1)
        assert err <= 2 * fused + 0.01, errors


def test_auto_backend_picks_by_device_dtype_and_length():
    from sparc_kit.models.attention import (
        CPU_MATMUL_MAX_KEYS,
        CPU_MATMUL_MAX_SCORES,
        auto_kernel,
        matmul_attention,
        sdpa_attention,
    )

    def pick(dtype, n, batch=1, heads=1):
        x = torch.empty(batch, heads, n, 8, dtype=dtype)
        return auto_kernel(x, x)

    assert pick(torch.bfloat16, 197) is matmul_attention
    assert pick(torch.float16, CPU_MATMUL_MAX_KEYS) is matmul_attention
    assert pick(torch.bfloat16, CPU_MATMUL_MAX_KEYS + 1) is sdpa_attention
    assert pick(torch.float32, 77) is sdpa_attention
    # ViT-B/16's 12 heads over 196 patches: batch 128 keeps the scores under the bound, batch 256 does not
    assert 128 * 12 * 196 * 196 <= CPU_MATMUL_MAX_SCORES < 256 * 12 * 196 * 196
    assert pick(torch.bfloat16, 196, batch=128, heads=12) is matmul_attention
    assert pick(torch.bfloat16, 196, batch=256, heads=12) is sdpa_attention


def test_attention_mask_helper_values():
    n = 5
    key_mask = lengths_mask([5, 3, 0], n)
    assert attention_mask(None, n, False, torch.device("cpu")) is None

    pad = attention_mask(key_mask, n, False, torch.device("cpu"))
    assert pad.shape == (3, 1, 1, n) and pad.dtype == torch.bool
    expected = key_mask.clone()
    expected[2] = True  # the all-padding row attends to every key
    assert torch.equal(pad[:, 0, 0], expected)

    causal = attention_mask(key_mask, n, True, torch.device("cpu"))
    assert causal.shape == (3, 1, n, n)
    for b in range(3):
        for i in range(n):
            allowed = [j <= i and bool(key_mask[b, j]) for j in range(n)]
            if not any(allowed):
                allowed = [True] * n
            assert causal[b, 0, i].tolist() == allowed, (b, i)

    only_causal = attention_mask(None, n, True, torch.device("cpu"))
    assert torch.equal(only_causal[0, 0], torch.ones(n, n, dtype=torch.bool).tril())


@pytest.mark.parametrize("causal", [False, True])
def test_text_transformer_math_and_sdpa_agree(causal):
    math_model = small_text(causal=causal, attention="math", seed=0).eval()
    sdpa_model = small_text(causal=causal, attention="sdpa", seed=123).eval()
    ids, mask = random_ids([12, 7, 3, 1, 0])
    with torch.no_grad():
        assert not torch.allclose(math_model(ids, mask), sdpa_model(ids, mask), atol=1e-3)  # different weights
        sdpa_model.load_state_dict(math_model.state_dict())
        a, b = math_model(ids, mask), sdpa_model(ids, mask)
    assert sdpa_model.transformer.blocks[0].attn.backend == "sdpa"
    assert math_model.transformer.blocks[0].attn.backend == "math"
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("class_token", [False, True])
def test_vision_transformer_math_and_sdpa_agree(class_token):
    math_model = small_vit(attention="math", seed=0, class_token=class_token).eval()
    sdpa_model = small_vit(attention="sdpa", seed=5, class_token=class_token).eval()
    sdpa_model.load_state_dict(math_model.state_dict())
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = math_model.forward_features(images), sdpa_model.forward_features(images)
    assert a["patch_tokens"].shape == (3, 16, 32)
    torch.testing.assert_close(a["patch_tokens"], b["patch_tokens"], rtol=0, atol=ATOL)
    if class_token:
        assert a["cls_token"].shape == (3, 32)
        torch.testing.assert_close(a["cls_token"], b["cls_token"], rtol=0, atol=ATOL)
    else:
        assert a["cls_token"] is None and b["cls_token"] is None


def test_set_attention_backend_switches_kernel_and_keeps_outputs():
    model = small_text(causal=True, attention="sdpa").eval()
    ids, mask = random_ids([12, 5, 2])
    with torch.no_grad():
        a = model(ids, mask)
        model.set_attention_backend("math")
        b = model(ids, mask)
    assert all(block.attn.backend == "math" for block in model.transformer.blocks)
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_xformers_backend_matches_math_on_cuda():
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        pytest.skip("xformers not installed (pip install 'sparc-kit[xformers]')")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the xformers backend runs on CUDA only")
    q, k, v = (t.cuda() for t in qkv(b=2, h=2, n=13, d=16))
    xf = get_attention_backend("xformers")
    ref = get_attention_backend("math")
    for case in MASK_CASES:
        lengths, causal = MASK_CASES[case]
        key_mask = None if lengths is None else lengths_mask(lengths[:2], 13).cuda()
        mask = attention_mask(key_mask, 13, causal, q.device)
        torch.testing.assert_close(xf(q, k, v, mask), ref(q, k, v, mask), rtol=0, atol=1e-4, msg=case)


def test_xformers_backend_without_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers.ops` now raises ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    q, k, v = qkv()
    with pytest.raises(BackendUnavailableError, match=r"sparc-kit\[xformers\]"):
        get_attention_backend("xformers")(q, k, v, None)
    # through a whole tower too: the error surfaces at forward, with the same advice
    model = small_text(attention="xformers")
    ids, mask = random_ids([5, 3])
    with pytest.raises(BackendUnavailableError, match=r"sparc-kit\[xformers\]"):
        model(ids, mask)


def test_xformers_backend_on_cpu_says_cuda_only(monkeypatch):
    """With xformers importable (a stand-in module here), CPU tensors must be refused before any kernel runs."""

    def must_not_run(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the xformers kernel was called with CPU tensors")

    fake = types.ModuleType("xformers")
    fake_ops = types.ModuleType("xformers.ops")
    fake_ops.memory_efficient_attention = must_not_run
    fake.ops = fake_ops
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake_ops)
    q, k, v = qkv()
    with pytest.raises(BackendUnavailableError, match="CUDA only"):
        get_attention_backend("xformers")(q, k, v, make_mask("padding"))
    assert issubclass(BackendUnavailableError, RuntimeError)


# --------------------------------------------------------------------------------------------------------------
# text tower invariances
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [False, True])
def test_text_features_ignore_padding_content(causal, attention):
    model = small_text(causal=causal, attention=attention).eval()
    ids, mask = random_ids([12, 7, 3, 1])
    other = ids.clone()
    other[~mask] = torch.randint(4, VOCAB, (int((~mask).sum()),), generator=torch.Generator().manual_seed(9))
    assert not torch.equal(ids, other)
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_encode_text_ignores_padding_content(causal):
    model = small_dual(causal=causal).eval()
    ids, mask = random_ids([12, 7, 3, 1])
    other = ids.clone()
    other[~mask] = torch.randint(4, VOCAB, (int((~mask).sum()),), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model.encode_text(ids, mask), model.encode_text(other, mask)
        feats_a, feats_b = model.text_features(ids, mask), model.text_features(other, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats_a["token_embeds"][mask], feats_b["token_embeds"][mask], rtol=0, atol=1e-6)


def test_causal_later_token_does_not_change_earlier_features():
    ids, mask = random_ids([12, 9])
    j = 5  # change one real token at position j in every row
    other = ids.clone()
    other[:, j] = (ids[:, j] - 4 + 1) % (VOCAB - 4) + 4
    causal = small_text(causal=True).eval()
    bidir = small_text(causal=False).eval()
    with torch.no_grad():
        a, b = causal(ids, mask), causal(other, mask)
        c, d = bidir(ids, mask), bidir(other, mask)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    # sensitivity: the changed token and later real tokens do change; bidirectionally, earlier ones change too
    assert (a[:, j:9] - b[:, j:9]).abs().amax(dim=-1).min() > 1e-4
    assert (c[:, :j] - d[:, :j]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [False, True])
def test_all_padding_caption_gives_finite_outputs(causal, attention):
    model = small_dual(causal=causal).eval()
    model.text.set_attention_backend(attention)
    ids, mask = random_ids([6, 0, 3])
    with torch.no_grad():
        tokens = model.text(ids, mask)
        text = model.encode_text(ids, mask)
        reference = model.encode_text(ids[[0, 2]], mask[[0, 2]])
    assert torch.isfinite(tokens).all()
    assert torch.isfinite(text).all()
    # the other captions are unaffected by the empty one sharing their batch
    torch.testing.assert_close(text[[0, 2]], reference, rtol=0, atol=1e-6)


def test_all_padding_caption_gives_finite_loss_and_gradients():
    model = tiny_recipe_model().train()
    images, ids, mask = tiny_batch(lengths=(12, 0, 3, 5))
    out = model(images, ids, mask)
    loss = SparcLoss()(**out)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------------------------------------------
# gradient checkpointing
# --------------------------------------------------------------------------------------------------------------


def _outputs_and_grads(model, inputs, call, weight):
    model.zero_grad(set_to_none=True)
    out = call(model, inputs)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads


def _check_checkpointing(model, inputs, call):
    model.train()
    calls = []
    block = model.transformer.blocks[0]
    forward = block.forward

    def counting_forward(*args, **kwargs):  # forward hooks do not fire on checkpoint recomputation: wrap forward
        calls.append(1)
        return forward(*args, **kwargs)

    block.forward = counting_forward
    with torch.no_grad():
        shape = call(model, inputs).shape
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    calls.clear()
    model.set_grad_checkpointing(False)
    out_plain, grads_plain = _outputs_and_grads(model, inputs, call, weight)
    plain_calls = len(calls)
    calls.clear()
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _outputs_and_grads(model, inputs, call, weight)
    ckpt_calls = len(calls)
    del block.forward
    assert plain_calls == 1 and ckpt_calls == 2, "checkpointing should recompute each block in backward"
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grad_checkpointing_vit_same_outputs_and_gradients():
    model = small_vit()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _check_checkpointing(model, images, lambda m, x: m(x))


@pytest.mark.parametrize("causal", [False, True])
def test_grad_checkpointing_text_same_outputs_and_gradients(causal):
    model = small_text(causal=causal)
    ids, mask = random_ids([12, 6, 2])
    _check_checkpointing(model, (ids, mask), lambda m, x: m(*x))


def test_grad_checkpointing_is_off_in_eval_mode():
    model = small_vit().eval()
    model.set_grad_checkpointing(True)
    calls = []
    block = model.transformer.blocks[0]
    forward = block.forward
    block.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    model(torch.randn(1, 3, 16, 16)).sum().backward()
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------------------
# dual encoder built from the recipe
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["mlp", "none"])
@pytest.mark.parametrize("loss_name", ["sparc", "clip"])
def test_every_parameter_gets_a_nonzero_finite_gradient(loss_name, head):
    model = tiny_recipe_model(f"model.image_global_head={head}").train()
    images, ids, mask = tiny_batch()
    out = model(images, ids, mask)
    loss_fn = SparcLoss() if loss_name == "sparc" else ClipLoss()
    loss = loss_fn(**out)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert (missing, zero, nonfinite) == ([], [], [])
    assert model.log_logit_scale.grad.abs() > 0


def test_build_model_follows_recipe():
    model = tiny_recipe_model("model.attention=math", "model.text.causal=true")
    assert isinstance(model, DualEncoder)
    assert model.vision.num_patches == 16 and model.vision.width == 32
    assert model.text.vocab_size == 256 and model.text.context_length == 12  # from the tokenizer section
    assert model.text.causal is True
    backends = {b.attn.backend for t in (model.vision, model.text) for b in t.transformer.blocks}
    assert backends == {"math"}
    assert len(model.vision.transformer.blocks) == 2 and len(model.text.transformer.blocks) == 2
    ckpt = tiny_recipe_model("model.grad_checkpointing=true")
    assert ckpt.vision.transformer.grad_checkpointing and ckpt.text.transformer.grad_checkpointing


def test_dual_encoder_forward_contract():
    model = tiny_recipe_model().eval()
    images, ids, mask = tiny_batch()
    with torch.no_grad():
        out = model(images, ids, mask)
    b, p, e, l = 4, 16, 16, 12
    assert set(out) == {"image_embeds", "patch_embeds", "text_embeds", "token_embeds", "token_mask", "logit_scale"}
    assert out["image_embeds"].shape == (b, e)
    assert out["patch_embeds"].shape == (b, p, e)
    assert out["text_embeds"].shape == (b, e)
    assert out["token_embeds"].shape == (b, l, e)
    assert out["token_mask"].shape == (b, l) and out["token_mask"].dtype == torch.bool
    assert torch.equal(out["token_mask"], mask)
    assert out["logit_scale"].shape == ()
    # token_mask defaults to ids != pad_id
    with torch.no_grad():
        default = model(images, ids)
    assert torch.equal(default["token_mask"], ids != 0)
    torch.testing.assert_close(default["text_embeds"], out["text_embeds"], rtol=0, atol=1e-6)


def test_encode_functions_return_unit_vectors_matching_forward():
    model = tiny_recipe_model().eval()
    images, ids, mask = tiny_batch()
    with torch.no_grad():
        out = model(images, ids, mask)
        img, txt, patches = model.encode_image(images), model.encode_text(ids, mask), model.encode_patches(images)
        raw = model.encode_image(images, normalize=False)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(4, 16), rtol=0, atol=1e-5)
    torch.testing.assert_close(img, F.normalize(out["image_embeds"], dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, F.normalize(out["text_embeds"], dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(raw, out["image_embeds"], rtol=0, atol=1e-6)


def test_global_embeddings_are_means_of_projected_local_embeddings():
    """Listing 1 identity: with the identity global head, g_v(mean f_v) = mean g_v(f_v) since g_v is linear."""
    model = tiny_recipe_model("model.image_global_head=none").eval()
    assert model.vision_adapter.bias is None and model.text_adapter.bias is None
    images, ids, mask = tiny_batch()
    with torch.no_grad():
        out = model(images, ids, mask)
    torch.testing.assert_close(out["image_embeds"], out["patch_embeds"].mean(dim=1), rtol=0, atol=1e-6)
    manual = (out["token_embeds"] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out["text_embeds"], manual, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["text_embeds"], masked_mean(out["token_embeds"], mask), rtol=0, atol=1e-6)
    # with the non-linear head (the paper's text) the identity must not hold
    mlp = tiny_recipe_model("model.image_global_head=mlp").eval()
    with torch.no_grad():
        out = mlp(images, ids, mask)
    assert not torch.allclose(out["image_embeds"], out["patch_embeds"].mean(dim=1), atol=1e-3)


def test_logit_scale_initial_value_and_clamp():
    model = tiny_recipe_model("model.init_temperature=0.05", "model.max_logit_scale=50")
    assert model.logit_scale.item() == pytest.approx(20.0, rel=1e-6)
    default = tiny_recipe_model()
    assert default.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale.item() == pytest.approx(50.0, rel=1e-6)
    images, ids, mask = tiny_batch()
    with torch.no_grad():
        assert model(images, ids, mask)["logit_scale"].item() == pytest.approx(50.0, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# parameter counts of the paper-size towers
# --------------------------------------------------------------------------------------------------------------


def _block_params(w: int, mlp_ratio: float = 4.0) -> int:
    hidden = int(w * mlp_ratio)
    qkv = w * 3 * w + 3 * w
    proj = w * w + w
    mlp = w * hidden + hidden + hidden * w + w
    norms = 2 * (2 * w)
    return qkv + proj + mlp + norms


def test_block_formula_is_12w2_plus_13w():
    assert _block_params(768) == 12 * 768**2 + 13 * 768


def test_vit_b16_parameter_count():
    with torch.device("meta"):
        model = VisionTransformer(image_size=224, patch_size=16, width=768, depth=12, heads=12)
    n = sum(p.numel() for p in model.parameters())
    w, patches = 768, (224 // 16) ** 2
    expected = (3 * 16 * 16 * w + w) + patches * w + 12 * _block_params(w) + 2 * w
    assert n == expected == 85_797_120
    assert 85.5e6 <= n <= 86.5e6  # ViT-B/16 without a classification head


def test_text_transformer_paper_size_parameter_count():
    with torch.device("meta"):
        model = TextTransformer(vocab_size=32000, context_length=55, width=768, depth=12, heads=12)
    n = sum(p.numel() for p in model.parameters())
    w = 768
    expected = 32000 * w + 55 * w + 12 * (12 * w**2 + 13 * w) + 2 * w
    assert n == expected


def test_the_temperature_at_its_cap_still_gets_a_gradient_and_the_engine_keeps_it_there():
    """The learned log scale at log(max_logit_scale): the logit scale's gradient reaches it (it did not when
    forward clamped it), and a step that pushes it up leaves it exactly at the cap."""
    import math

    from sparc_kit.engines import BatchLayout, LocalEngine, OptimizerSpec, param_groups

    model = build_model(load_recipe("sparc_tiny", ["model.max_logit_scale=20",
                                                     "model.init_temperature=0.01"]))
    assert float(model.log_logit_scale.detach()) == pytest.approx(math.log(20))  # started inside the bounds
    (-model.logit_scale).backward()
    assert float(model.log_logit_scale.grad) < 0  # would push it further up: but it gets a gradient
    engine = LocalEngine(device="cpu")
    engine.setup(model, OptimizerSpec(param_groups(model, 0.0), lr=0.1), BatchLayout(1))
    model.zero_grad()
    (-engine(torch.zeros(1, 3, 64, 64), torch.ones(1, 4, dtype=torch.long))["logit_scale"]).backward()
    engine.step(None)
    assert float(model.log_logit_scale.detach()) == pytest.approx(math.log(20))


# ------------------------------------------------------------------------------------ text recipe choices
def _tiny_text_recipe(*more):
    return load_recipe("sparc_tiny", [
        "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "model.vision.width=32",
        "model.vision.depth=1", "model.vision.heads=2", "model.embed_dim=16", *more,
    ])


def test_excluded_end_token_leaves_the_pooled_mean_and_the_token_mask():
    torch.manual_seed(0)
    model = build_model(_tiny_text_recipe("model.text_end_token=exclude")).eval()
    ids = torch.tensor([[5, 6, 7, 3, 0, 0], [8, 3, 0, 0, 0, 0]])
    out = model.text_features(ids, ids != 0)
    words = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(out["token_mask"], words)
    # the mean of the projected word tokens alone (g_t is linear), computed by hand
    by_hand = torch.stack([out["token_embeds"][b][words[b]].mean(0) for b in range(2)])
    torch.testing.assert_close(out["text_embeds"], by_hand, rtol=1e-5, atol=1e-6)
    # the tower still attends to the end token: its features depend on it being there
    without = model.text_features(torch.tensor([[5, 6, 7, 0, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0, 0]]).bool())
    assert not torch.allclose(without["text_embeds"], out["text_embeds"][:1])
    included = build_model(_tiny_text_recipe("model.text_end_token=include")).eval()
    included.load_state_dict(model.state_dict())
    assert torch.equal(included.text_features(ids, ids != 0)["token_mask"], ids != 0)


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_text_token_embedding_init_std_follows_the_recipe(std):
    torch.manual_seed(0)
    model = build_model(_tiny_text_recipe(f"model.text.embed_init_std={std}", "tokenizer.vocab_size=4000"))
    measured = model.text.token_embed.weight.std().item()
    assert abs(measured - std) < 0.03 * std  # 4000 x 32 draws: the sample std is within 3%


# ---------------------------------------------------------------- evaluation goes only through trained layers
def _builtin_recipes():
    from sparc_kit.config import builtin_recipes

    return sorted(builtin_recipes())


@pytest.mark.parametrize("name", _builtin_recipes())
def test_every_parameter_the_evaluation_path_uses_is_trained(name):
    """Zero-shot and retrieval score through ``encode_image`` / ``encode_text``; every parameter they use must
    receive a non-zero gradient from the recipe's training loss (else the evaluation judges a layer at its
    initialisation, as FILIP and PACL once did through an untrained ``h_v``)."""
    from sparc_kit.train.loop import build_loss

    # a small vocabulary, except for CLIP's tokenizer, whose 49,408 pieces a recipe must keep
    vocab = [] if load_recipe(name).tokenizer.kind == "open_clip" else ["tokenizer.vocab_size=256"]
    recipe = load_recipe(name, TINY_OVERRIDES + vocab)
    torch.manual_seed(0)
    model = build_model(recipe).train()
    loss_fn = build_loss(recipe)
    images, ids, mask = tiny_batch()
    loss_fn(**model(images, ids, mask))["loss"].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    scores = model.encode_image(images) @ model.encode_text(ids, mask).T
    (scores * torch.randn_like(scores)).sum().backward()
    used = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert used, "the evaluation path used no parameter"
    assert sorted(used - trained) == []


def test_every_registered_loss_has_a_builtin_recipe_checked_above():
    from sparc_kit.registry import losses

    covered = {load_recipe(n).loss.name for n in _builtin_recipes()}
    assert set(losses.names()) <= covered


def test_compile_blocks_marks_every_block_and_keeps_the_state_dict_names():
    """``train.compile``: each transformer block of both towers is compiled in place (lazily: nothing is compiled
    until the first call, which this test never makes), and the weights keep their names, so checkpoints of
    compiled and eager runs load into each other."""
    recipe = sparc_kit.load_recipe("sparc_tiny")
    model = sparc_kit.build_model(recipe)
    before = list(model.state_dict())
    count = model.compile_blocks()
    assert count == recipe.model.vision.depth + recipe.model.text.depth
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    assert len(blocks) == count and all(b._compiled_call_impl is not None for b in blocks)
    assert list(model.state_dict()) == before


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [(32, 32), (35, 29)])  # the second leaves rows and columns past the last patch
def test_patch_embedding_equals_the_strided_convolution(bias, size):
    """The patch embedding (one matrix product over unfolded patches) against torch's conv2d with the same
    weights: outputs and weight gradients, a channels-last input included."""
    from sparc_kit.models.vit import embed_patches

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, kernel_size=8, stride=8, bias=bias).double()
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = F.conv2d(images, conv.weight, conv.bias, stride=8).flatten(2).transpose(1, 2)
    got = embed_patches(images, conv)
    assert got.shape == expected.shape == (2, (size[0] // 8) * (size[1] // 8), 24)
    assert float((got - expected).detach().abs().max()) < 1e-12
    assert torch.allclose(embed_patches(images.to(memory_format=torch.channels_last), conv), expected, atol=1e-12)
    upstream = torch.randn_like(expected)
    (w_ref,) = torch.autograd.grad((expected * upstream).sum(), conv.weight)
    (w_got,) = torch.autograd.grad((embed_patches(images, conv) * upstream).sum(), conv.weight)
    assert float((w_got - w_ref).abs().max()) < 1e-10
