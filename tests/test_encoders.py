"""Tests of the poolers and the timm vision encoder (``sparc_kit.models.poolers``, ``sparc_kit.models.timm_encoder``).

What is checked, and why
------------------------
- Poolers: what padded positions contain never changes the result (mean / last / attention / max), and each
  test also checks that changing a *real* position does change it, so the invariance is not vacuous. ``last``
  picks exactly the last real token (also for masks that are not a prefix run); ``max`` equals a per-row loop;
  the attention pooler equals a slow float64 reference (softmax over real positions of q.k / sqrt(d), weighted
  sum of v, output projection) to 1e-5 for one and several heads and an all-padding row; it is invariant to the
  order of positions; every pooler parameter gets a gradient and padded inputs get none. ``cls`` returns the
  encoder's class token and fails with advice when there is none, at the first forward and already in
  ``build_model``.
- timm encoder: its features equal those of the same timm model built directly (patch tokens = timm's
  ``forward_features`` minus the prefix tokens; class token = the first token) for a model with a class token
  and one with only a register token; weights round-trip through a local ``.safetensors`` file, a torch file
  (the wrapper's own ``model.``-prefixed state dict), an fsspec ``memory://`` URL and a checkpoint with a
  classifier head; a file missing weights is refused; non-ViT models, unknown names and ``pretrained: true`` fail
  with one-line messages. Gradient checkpointing gives the same outputs and gradients and really recomputes.
- A dual encoder from the ``sparc_tiny`` recipe with the vision tower switched to timm trains one SPARC step:
  finite loss, every parameter receives a non-zero finite gradient, and the optimizer step changes the weights.

Models are timm's own tiny test ViTs (``test_vit``: width 64, 6 blocks, a class token; ``test_vit2``: a register
token and no class token) at 32 px, so the file runs in seconds on a CPU.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import sparc_kit
from sparc_kit.losses import SparcLoss
from sparc_kit.models import (
    AttentionPooler,
    ClsPooler,
    LastTokenPooler,
    MaxPooler,
    MeanPooler,
    TimmVisionEncoder,
    VisionTransformer,
    build_model,
)
from sparc_kit.models.poolers import MissingClassTokenError
from sparc_kit.registry import poolers as pooler_registry
from sparc_kit.registry import vision_encoders

ATOL = 1e-5
W = 16  # pooler test width
IMG = 32  # timm test image size: 2 x 2 patches of 16 px

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def lengths_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def features(b: int = 4, n: int = 7, w: int = W, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, w, generator=torch.Generator().manual_seed(seed))


def make_pooler(name: str, heads: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    params = {"heads": heads} if name == "attention" else {}
    return pooler_registry.build(name, params, width=W)


def randomized(pooler: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Every parameter drawn at O(1) scale, so outputs are O(1) and attention weights far from uniform: the
    default initialisation (std 0.02) gives near-uniform attention and outputs ~1e-3, where a 1e-5 tolerance
    would prove little."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in pooler.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return pooler


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def timm_encoder(model_name: str = "test_vit", seed: int = 0, **kw) -> TimmVisionEncoder:
    torch.manual_seed(seed)
    return TimmVisionEncoder(model_name=model_name, image_size=kw.pop("image_size", IMG), **kw)


MASKED_POOLERS = ["mean", "last", "attention", "max"]

# --------------------------------------------------------------------------------------------------------------
# poolers
# --------------------------------------------------------------------------------------------------------------


def test_pooler_registry_names():
    assert {"cls", "mean", "last", "attention", "max"} <= set(pooler_registry.names())
    # width is filled in by build_model, never set in a recipe; heads is a recipe parameter
    assert "width" not in pooler_registry.get("attention").config.model_fields
    assert pooler_registry.get("attention").config.model_fields["heads"].default == 1


@pytest.mark.parametrize("name", MASKED_POOLERS)
def test_masked_poolers_ignore_padding_content(name):
    pooler = randomized(make_pooler(name, heads=2))
    x = features()
    mask = lengths_mask([7, 4, 2, 1], 7)
    other = x.clone()
    other[~mask] = torch.randn(int((~mask).sum()), W, generator=torch.Generator().manual_seed(5)) * 10
    with torch.no_grad():
        a, b = pooler(x, mask), pooler(other, mask)
    assert a.shape == (4, W)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # sensitivity: changing the last real token of each row does change every row's result
    changed = x.clone()
    changed[torch.arange(4), torch.tensor([6, 3, 1, 0])] += 3.0
    with torch.no_grad():
        c = pooler(changed, mask)
    assert (a - c).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("name", MASKED_POOLERS)
def test_masked_poolers_all_padding_row_is_finite_and_isolated(name):
    pooler = make_pooler(name, heads=2)
    x = features(b=3)
    mask = lengths_mask([5, 0, 3], 7)
    with torch.no_grad():
        out = pooler(x, mask)
        alone = pooler(x[[0, 2]], mask[[0, 2]])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[[0, 2]], alone, rtol=0, atol=1e-6)


def test_last_pooler_picks_exactly_the_last_real_token():
    pooler = LastTokenPooler()
    x = features(b=5)
    mask = lengths_mask([7, 5, 2, 1, 0], 7)
    mask[4, 3] = True  # a mask that is not a prefix run: the last True position is 3
    mask[1, 1] = False  # a hole before the last real token does not move it
    with torch.no_grad():
        out = pooler(x, mask)
    expected = torch.stack([x[0, 6], x[1, 4], x[2, 1], x[3, 0], x[4, 3]])
    assert torch.equal(out, expected)
    assert torch.equal(pooler(x, None), x[:, -1])  # no mask: the last position
    assert torch.equal(pooler(x, torch.zeros(5, 7, dtype=torch.bool)), x[:, 0])  # empty rows: position 0, finite


def test_max_pooler_matches_a_per_row_loop():
    x = features(b=3)
    mask = lengths_mask([7, 3, 1], 7)
    out = MaxPooler()(x, mask)
    for b in range(3):
        torch.testing.assert_close(out[b], x[b, mask[b]].max(dim=0).values, rtol=0, atol=0)
    assert torch.equal(MaxPooler()(x, None), x.max(dim=1).values)


def test_mean_pooler_matches_a_per_row_loop():
    x = features(b=3)
    mask = lengths_mask([7, 3, 1], 7)
    out = MeanPooler()(x, mask)
    for b in range(3):
        torch.testing.assert_close(out[b], x[b, mask[b]].mean(dim=0), rtol=0, atol=1e-6)


def ref_attention_pool(pooler: AttentionPooler, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per row and head, in float64: softmax over the real positions of q.k / sqrt(d), weighted sum of v."""
    b, n, w = x.shape
    h = pooler.heads
    d = w // h
    p = {k: v.detach().double() for k, v in pooler.state_dict().items()}
    x = x.double()
    q = p["query"].reshape(w) @ p["q_proj.weight"].T + p["q_proj.bias"]  # [W]
    out = torch.zeros(b, w, dtype=torch.float64)
    for bi in range(b):
        real = torch.arange(n) if mask is None or not mask[bi].any() else mask[bi].nonzero().flatten()
        k = x[bi, real] @ p["k_proj.weight"].T  # [Nr, W] (the pooler has no key bias: softmax would cancel it)
        v = x[bi, real] @ p["v_proj.weight"].T + p["v_proj.bias"]  # [Nr, W]
        heads = []
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            weights = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(d), dim=0)  # [Nr]
            heads.append(weights @ v[:, sl])  # [d]
        out[bi] = torch.cat(heads) @ p["out_proj.weight"].T + p["out_proj.bias"]
    return out


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("lengths", [None, [7, 4, 1, 0]])
def test_attention_pooler_matches_slow_reference(heads, lengths):
    pooler = randomized(make_pooler("attention", heads=heads, seed=3))
    x = features(seed=2)
    mask = None if lengths is None else lengths_mask(lengths, 7)
    with torch.no_grad():
        out = pooler(x, mask)
    ref = ref_attention_pool(pooler, x, mask)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=ATOL)
    # non-vacuous: the attention weights are not uniform (then it would equal the mean of v)
    with torch.no_grad():
        v_mean = pooler.out_proj(MeanPooler()(pooler.v_proj(x), mask))
    assert (out - v_mean).abs().max() > 0.1 and out.abs().max() > 0.5


@pytest.mark.parametrize("name", ["attention", "mean", "max"])
def test_poolers_are_permutation_invariant_over_positions(name):
    pooler = randomized(make_pooler(name, heads=2))
    x = features(b=3)
    mask = lengths_mask([7, 4, 2], 7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(perm, torch.arange(7))
    with torch.no_grad():
        a = pooler(x, mask)
        b = pooler(x[:, perm], mask[:, perm])
        a_nomask, b_nomask = pooler(x, None), pooler(x[:, perm], None)
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    torch.testing.assert_close(a_nomask, b_nomask, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["cls", "mean", "last", "attention", "max"])
def test_every_pooler_parameter_and_only_real_inputs_get_gradients(name):
    pooler = make_pooler(name, heads=2)
    x = features().requires_grad_(True)
    mask = lengths_mask([7, 4, 2, 1], 7)
    cls_token = torch.randn(4, W, requires_grad=True)
    out = pooler(x, mask, cls_token=cls_token)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    for pname, p in pooler.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    if name == "cls":
        assert x.grad is None and cls_token.grad.abs().sum() > 0
        return
    assert cls_token.grad is None
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))  # padding gets no gradient
    per_position = x.grad.abs().sum(dim=-1) > 0  # [B, N]
    if name == "last":
        assert torch.equal(per_position, torch.zeros_like(mask).index_put_(
            (torch.arange(4), torch.tensor([6, 3, 1, 0])), torch.tensor(True)))
    elif name in ("mean", "attention"):
        assert torch.equal(per_position, mask)  # every real position contributes
    else:  # max: only argmax positions, all of them real
        assert per_position.any(dim=1).all() and not (per_position & ~mask).any()


def test_attention_pooler_width_and_heads_checked():
    with pytest.raises(ValueError, match="width 16 must be divisible by heads 3"):
        AttentionPooler(width=16, heads=3)
    assert AttentionPooler(width=16, heads=4)(features(), None).shape == (4, 16)  # output width = input width


def test_cls_pooler_returns_class_token_and_explains_when_missing():
    x = features()
    cls_token = torch.randn(4, W)
    assert torch.equal(ClsPooler()(x, None, cls_token=cls_token), cls_token)
    with pytest.raises(MissingClassTokenError, match="class_token: true") as info:
        ClsPooler()(x, None, cls_token=None)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# timm vision encoder
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name,has_cls", [("test_vit", True), ("test_vit2", False)])
def test_timm_wrapper_matches_the_timm_model(model_name, has_cls):
    enc = timm_encoder(model_name).eval()
    direct = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="", img_size=IMG).eval()
    direct.load_state_dict(enc.model.state_dict())
    x = images()
    with torch.no_grad():
        feats = enc.forward_features(x)
        full = direct.forward_features(x)  # [B, prefix + P, W]
    assert direct.num_prefix_tokens == 1 and full.shape == (2, 1 + 4, enc.output_dim)
    assert enc.num_patches == 4 and enc.image_size == IMG and enc.patch_size == 16
    assert enc.output_dim == direct.num_features == 64
    assert feats["patch_tokens"].shape == (2, 4, 64)
    torch.testing.assert_close(feats["patch_tokens"], full[:, 1:], rtol=0, atol=0)
    assert enc.has_class_token is has_cls
    if has_cls:
        torch.testing.assert_close(feats["cls_token"], full[:, 0], rtol=0, atol=0)
    else:
        assert feats["cls_token"] is None  # test_vit2's prefix token is a register token, not a class token
    torch.testing.assert_close(enc(x), feats["patch_tokens"], rtol=0, atol=0)


def _assert_same_after_load(src: TimmVisionEncoder, dst: TimmVisionEncoder) -> None:
    x = images()
    src.eval(), dst.eval()
    with torch.no_grad():
        a, b = src.forward_features(x), dst.forward_features(x)
    torch.testing.assert_close(a["patch_tokens"], b["patch_tokens"], rtol=0, atol=0)
    torch.testing.assert_close(a["cls_token"], b["cls_token"], rtol=0, atol=0)


def test_timm_weights_round_trip_through_safetensors(tmp_path):
    src = timm_encoder(seed=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    fresh = timm_encoder(seed=1)
    with torch.no_grad():  # different initialisations before loading, so the check below is not vacuous
        assert not torch.allclose(src(images()), fresh(images()), atol=1e-3)
    loaded = timm_encoder(seed=1, weights=str(path))
    _assert_same_after_load(src, loaded)


def test_timm_weights_round_trip_through_torch_file_and_fsspec_url(tmp_path):
    import fsspec

    src = timm_encoder(seed=0)
    path = tmp_path / "wrapper.pt"
    torch.save(src.state_dict(), path)  # the wrapper's own keys: "model." prefixed
    _assert_same_after_load(src, timm_encoder(seed=1, weights=str(path)))
    url = "memory://sparc-kit-test/vit.safetensors"  # a non-local fsspec file system
    with fsspec.open(url, "wb") as f:
        from safetensors.torch import save

        f.write(save({k: v.contiguous() for k, v in src.model.state_dict().items()}))
    _assert_same_after_load(src, timm_encoder(seed=2, weights=url))


def test_timm_weights_with_classifier_head_load_and_missing_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    classifier = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=IMG)
    path = tmp_path / "classifier.pth"
    torch.save({"state_dict": classifier.state_dict(), "epoch": 3}, path)
    enc = timm_encoder(seed=1, weights=str(path))
    torch.testing.assert_close(enc.model.pos_embed, classifier.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(enc.model.blocks[5].mlp.fc2.weight, classifier.blocks[5].mlp.fc2.weight, rtol=0, atol=0)

    partial = {k: v for k, v in classifier.state_dict().items() if not k.startswith("blocks.5.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"do not fit timm model 'test_vit': missing \d+ keys"):
        timm_encoder(weights=str(tmp_path / "partial.pth"))


def test_timm_weights_from_another_image_size_are_resampled(tmp_path):
    src = timm_encoder(seed=0, image_size=64)  # 4 x 4 patches
    path = tmp_path / "vit64.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    enc = timm_encoder(seed=1, weights=str(path))  # 2 x 2 patches: timm's filter resamples pos_embed
    assert enc.model.pos_embed.shape == (1, 1 + 4, 64)
    torch.testing.assert_close(enc.model.patch_embed.proj.weight, src.model.patch_embed.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(enc.model.pos_embed[:, 0], src.model.pos_embed[:, 0], rtol=0, atol=0)  # class pos


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"model_name": "resnet18"}, r"'resnet18' \(a ResNet\) does not return patch tokens.*ViT-family model"),
        ({"model_name": "resnet18", "image_size": 32}, r"'resnet18' .*ViT-family model with patch tokens"),
        ({"model_name": "test_vit", "pretrained": True}, r"no weights are downloaded at run time.*weights: PATH"),
        ({"model_name": "vit_tiny_patch16_22"}, r"unknown timm model .*Did you mean 'vit_tiny_patch16_224'"),
    ],
)
def test_timm_encoder_errors_are_one_line(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        TimmVisionEncoder(**kwargs)
    assert "\n" not in str(info.value)


def test_timm_encoder_is_registered_with_its_options():
    entry = vision_encoders.get("timm")
    fields = entry.config.model_fields
    assert set(fields) == {"model_name", "pretrained", "weights", "image_size"}  # grad_checkpointing is internal
    assert fields["model_name"].default == "vit_base_patch16_224" and fields["pretrained"].default is False
    assert entry.supplied == ("grad_checkpointing",)  # the recipe's attention switch is not passed


def test_timm_grad_checkpointing_same_outputs_and_gradients():
    enc = timm_encoder(seed=0).train()
    x = images()
    weight = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(4))
    calls = []
    block = enc.model.blocks[0]
    forward = block.forward

    def counting_forward(*args, **kwargs):  # checkpoint recomputation does not fire hooks: wrap forward
        calls.append(1)
        return forward(*args, **kwargs)

    block.forward = counting_forward
    results = {}
    for enable in (False, True):
        enc.set_grad_checkpointing(enable)
        enc.zero_grad(set_to_none=True)
        calls.clear()
        out = enc(x)
        (out * weight).sum().backward()
        results[enable] = (out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}, len(calls))
    del block.forward
    (out0, g0, calls0), (out1, g1, calls1) = results[False], results[True]
    assert enc.model.grad_checkpointing is True
    assert (calls0, calls1) == (1, 2), "checkpointing should recompute each block in backward"
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------------------------
# dual encoder with a timm tower, from the recipe
# --------------------------------------------------------------------------------------------------------------

TIMM_OVERRIDES = [
    "model.vision.name=timm",
    "model.vision.model_name=test_vit",
    f"model.vision.image_size={IMG}",
    "model.text.width=32",
    "model.text.depth=2",
    "model.text.heads=4",
    "model.embed_dim=16",
    "tokenizer.context_length=12",
]


def timm_recipe_model(*extra: str):
    recipe = sparc_kit.load_recipe("sparc_tiny", overrides=TIMM_OVERRIDES + list(extra))
    torch.manual_seed(0)
    return build_model(recipe)


def text_batch(lengths=(12, 7, 3, 1), n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = lengths_mask(list(lengths), n)
    ids = torch.randint(4, 256, (len(lengths), n), generator=g).masked_fill(~mask, 0)
    return ids, mask


@pytest.mark.parametrize(
    "image_pooler,text_pooler", [("mean", "mean"), ("cls", "last"), ("attention", "attention")]
)
def test_dual_encoder_with_timm_tower_trains_one_step(image_pooler, text_pooler):
    model = timm_recipe_model(f"model.image_pooler.name={image_pooler}", f"model.text_pooler.name={text_pooler}")
    assert isinstance(model.vision, TimmVisionEncoder) and model.vision.model_name == "test_vit"
    model.train()
    x = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    ids, mask = text_batch()
    out = model(x, ids, mask)
    assert out["patch_embeds"].shape == (4, 4, 16) and out["image_embeds"].shape == (4, 16)
    loss = SparcLoss()(**out)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert (missing, zero, nonfinite) == ([], [], [])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_dual_encoder_pooler_calls_follow_the_contract():
    """The image pooler receives the class token; the text pooler receives the token mask and no class token."""
    model = timm_recipe_model("model.image_pooler.name=cls", "model.text_pooler.name=last").eval()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    ids, mask = text_batch(lengths=(9, 4))
    with torch.no_grad():
        out = model(x, ids, mask)
        cls_token = model.vision.forward_features(x)["cls_token"]
        tokens = model.text(ids, mask)
    expected_image = model.vision_adapter(model.image_global_head(cls_token))
    torch.testing.assert_close(out["image_embeds"], expected_image, rtol=0, atol=1e-6)
    expected_text = model.text_adapter(tokens[torch.arange(2), torch.tensor([8, 3])])  # last real tokens
    torch.testing.assert_close(out["text_embeds"], expected_text, rtol=0, atol=1e-6)


def test_build_model_refuses_cls_pooler_without_class_token():
    with pytest.raises(ValueError, match="model.text_pooler: 'cls' needs a class token"):
        timm_recipe_model("model.text_pooler.name=cls")
    with pytest.raises(ValueError, match="model.image_pooler: 'cls' needs a class token.*'timm'"):
        timm_recipe_model("model.vision.model_name=test_vit2", "model.image_pooler.name=cls")
    # the native vit: only with class_token=true
    native = [
        "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=1",
        "model.vision.heads=4", "model.text.width=32", "model.text.depth=1", "model.text.heads=4",
        "model.image_pooler.name=cls",
    ]
    with pytest.raises(ValueError, match="class_token=true"):
        build_model(sparc_kit.load_recipe("sparc_tiny", overrides=native))
    model = build_model(sparc_kit.load_recipe("sparc_tiny", overrides=native + ["model.vision.class_token=true"]))
    assert isinstance(model.vision, VisionTransformer) and isinstance(model.image_pooler, ClsPooler)
