"""Numerical tests of SPARC's loss functions (``sparc_kit.losses.functional``).

What is checked, and why
------------------------
The functions under test are compared against *slow, independent* references written directly from the equations
of Bica et al. (ICML 2024), eqs. 1-6:

- eq. 1   symmetric InfoNCE on cosine similarities (``clip_loss``);
- eq. 2   min-max normalisation of raw token-patch inner products over patches, per token;
- eq. 3   sparsification: entries below sigma (default 1/P) are zeroed;
- eq. 4   L1 renormalisation of each token's row (no softmax);
- eq. 5   language-grouped vision embeddings ``c_l = sum_p a_lp v_p``;
- eq. 6   within-pair L x L contrast between l2-normalised ``c`` and ``t``, both directions, padding dropped,
          averaged over all real tokens (pseudo-code, ``average="token"``) or per caption (``average="caption"``).

The references use explicit Python loops over batch / tokens / patches in float64 (plain Python floats), so they
share no code path with the vectorised float32 implementation. Beyond value agreement the tests cover properties the
method must have: independence from padding content, per-pair decomposition of the loss, batch-permutation
invariance, finite values and gradients on degenerate inputs (flat similarity rows, one-token and empty captions,
zero embeddings), float32 results under bf16 autocast, the scale (in)variances that follow from using *raw* inner
products (token scale does not matter, patch scale does), and gradients against central finite differences of the
float64 reference.

Conventions the library chose where the paper is silent, pinned here:
- a constant similarity row (zero min-max range) gives uniform weights 1/P: "every patch is equally the best";
- a zero vector l2-normalises to the zero vector (``F.normalize`` convention), so its cosine with anything is 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparc_kit.losses.functional import (
    clip_loss,
    masked_pairwise_contrastive_loss,
    sparc_alignment_weights,
    sparc_fine_grained_loss,
)

B, P, L, D = 4, 7, 6, 8
LENGTHS = [5, 3, 1, 4]
LOGIT_SCALE = 10.0
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Slow float64 references, written from the equations (Python floats, explicit loops)
# ---------------------------------------------------------------------------------------------------------------


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _l2_normalise(a: list[float]) -> list[float]:
    """x / ||x||; the zero vector maps to the zero vector (F.normalize convention)."""
    n = math.sqrt(_dot(a, a))
    return [x / n for x in a] if n > 0 else [0.0 for _ in a]


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_alignment_weights_from_sim(
    sim: list[list[float]], threshold: float | None = None, weighting: str = "sparse"
) -> list[list[float]]:
    """Alignment weights a[l][p] of one pair from its raw similarity rows sim[l][p] (eqs. 2-4).

    eq. 2: s_hat = (s - min_p s) / (max_p s - min_p s); a flat row (zero range) -> s_hat = 1 everywhere
           (library convention: every patch is equally the best patch).
    eq. 3: s_tilde = s_hat if s_hat >= sigma else 0, sigma = 1/P when ``threshold`` is None ("sparse" only).
    eq. 4: a = s_tilde / sum_p s_tilde.
    "dense" skips eq. 3; "softmax" replaces eqs. 2-4 by softmax_p(s).
    """
    weights = []
    for row in sim:
        n_p = len(row)
        if weighting == "softmax":
            m = max(row)
            e = [math.exp(x - m) for x in row]
            z = sum(e)
            weights.append([x / z for x in e])
            continue
        lo, hi = min(row), max(row)
        s_hat = [1.0] * n_p if hi - lo <= 0 else [(x - lo) / (hi - lo) for x in row]
        if weighting == "sparse":
            sigma = 1.0 / n_p if threshold is None else threshold
            s_tilde = [x if x >= sigma else 0.0 for x in s_hat]
        elif weighting == "dense":
            s_tilde = s_hat
        else:
            raise ValueError(weighting)
        z = sum(s_tilde)
        weights.append([x / z for x in s_tilde])
    return weights


def ref_alignment_weights(
    v: list[list[float]], t: list[list[float]], threshold: float | None = None, weighting: str = "sparse"
) -> list[list[float]]:
    """Weights of one pair from patches v[p] and tokens t[l]: s[l][p] = t_l . v_p (raw inner products), then eqs. 2-4."""
    sim = [[_dot(t_l, v_p) for v_p in v] for t_l in t]
    return ref_alignment_weights_from_sim(sim, threshold, weighting)


def ref_row_contrast(logits: list[list[float]], real: list[bool]) -> list[float]:
    """One direction of eq. 6 for one pair: for each real row j, CE over the real columns k of logits[j][k] with
    target j (the paper's Listing 1 ``masked_pairwise_contrastive_loss`` is this single direction)."""
    idx = [l for l, r in enumerate(real) if r]
    return [_logsumexp([logits[j][k] for k in idx]) - logits[j][j] for j in idx]


def ref_pair_contrast(logits: list[list[float]], real: list[bool]) -> list[float]:
    """Per-real-token losses of one pair's L x L logits (eq. 6, both directions), restricted to real tokens.

    loss_j = 0.5 * (CE over k of logits[j][k] with target j + CE over k of logits[k][j] with target j).
    """
    n = len(logits)
    transposed = [[logits[k][j] for k in range(n)] for j in range(n)]
    return [0.5 * (r + c) for r, c in zip(ref_row_contrast(logits, real), ref_row_contrast(transposed, real))]


def ref_average(per_sample: list[list[float]], average: str) -> float:
    """eq. 6 averaging: "token" = mean over all real tokens of the batch; "caption" = mean within each caption,
    then mean over captions with at least one real token."""
    if average == "token":
        flat = [x for s in per_sample for x in s]
        return sum(flat) / len(flat)
    means = [sum(s) / len(s) for s in per_sample if len(s) > 0]
    return sum(means) / len(means)


def ref_pair_token_losses(
    v: list[list[float]],
    t: list[list[float]],
    real: list[bool],
    scale: float,
    threshold: float | None = None,
    weighting: str = "sparse",
) -> list[float]:
    """Per-real-token fine-grained losses of one image-text pair (eqs. 2-6)."""
    a = ref_alignment_weights(v, t, threshold, weighting)  # eqs. 2-4
    n_p, dim = len(v), len(v[0])
    c = [[sum(a[l][p] * v[p][d] for p in range(n_p)) for d in range(dim)] for l in range(len(t))]  # eq. 5
    c_n = [_l2_normalise(x) for x in c]
    t_n = [_l2_normalise(x) for x in t]
    logits = [[scale * _dot(c_n[j], t_n[k]) for k in range(len(t))] for j in range(len(t))]
    return ref_pair_contrast(logits, real)  # eq. 6 (one pair)


def ref_fine_grained_loss(
    patch: torch.Tensor,
    token: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    threshold: float | None = None,
    average: str = "token",
    weighting: str = "sparse",
) -> float:
    """SPARC fine-grained loss (eqs. 2-6) of a batch, loop over pairs, float64."""
    pv, tv, mv = patch.double().tolist(), token.double().tolist(), mask.tolist()
    per_sample = [
        ref_pair_token_losses(pv[i], tv[i], mv[i], float(scale), threshold, weighting) for i in range(len(pv))
    ]
    return ref_average(per_sample, average)


def ref_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    """eq. 1: 0.5 * (mean_i CE_i(image->text) + mean_i CE_i(text->image)) on scale * cosine similarity."""
    iv = [_l2_normalise(x) for x in img.double().tolist()]
    tv = [_l2_normalise(x) for x in txt.double().tolist()]
    n = len(iv)
    logits = [[scale * _dot(iv[i], tv[j]) for j in range(n)] for i in range(n)]
    i2t = sum(_logsumexp(logits[i]) - logits[i][i] for i in range(n)) / n
    t2i = sum(_logsumexp([logits[j][i] for j in range(n)]) - logits[i][i] for i in range(n)) / n
    return 0.5 * (i2t + t2i)


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def prefix_mask(lengths: list[int], n_tokens: int = L) -> torch.Tensor:
    return torch.arange(n_tokens)[None, :] < torch.tensor(lengths)[:, None]


def scattered_mask() -> torch.Tensor:
    """Real tokens not contiguous (the equations do not need a prefix mask)."""
    return torch.tensor(
        [
            [1, 0, 1, 1, 0, 1],
            [0, 1, 1, 0, 0, 1],
            [0, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )


def make_inputs(seed: int = 0, b: int = B, p: int = P, n_tokens: int = L, d: int = D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    patch = torch.randn(b, p, d, generator=g, dtype=dtype)
    token = torch.randn(b, n_tokens, d, generator=g, dtype=dtype)
    return patch, token


def assert_close_scalar(actual: torch.Tensor, expected: float, rtol: float = RTOL, atol: float = ATOL) -> None:
    a = float(actual)
    assert math.isfinite(a)
    assert abs(a - expected) <= atol + rtol * abs(expected), f"got {a!r}, expected {expected!r}, diff {a - expected!r}"


def finite_grads(*tensors: torch.Tensor) -> bool:
    return all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in tensors)


WEIGHTING_CASES = [
    pytest.param("sparse", None, id="sparse-sigma1/P"),
    pytest.param("sparse", 0.0, id="sparse-sigma0"),
    pytest.param("sparse", 0.3, id="sparse-sigma0.3"),
    pytest.param("dense", None, id="dense"),
    pytest.param("softmax", None, id="softmax"),
]
MASK_CASES = [
    pytest.param(lambda: prefix_mask(LENGTHS), id="prefix-5-3-1-4"),
    pytest.param(scattered_mask, id="scattered"),
]


# ---------------------------------------------------------------------------------------------------------------
# 1. Fine-grained loss vs the reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("mask_fn", MASK_CASES)
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_fine_grained_loss_matches_reference(weighting, threshold, mask_fn, average):
    patch, token = make_inputs(seed=1)
    mask = mask_fn()
    scale = torch.tensor(LOGIT_SCALE)
    out = sparc_fine_grained_loss(
        patch, token, mask, scale, threshold=threshold, average=average, weighting=weighting
    )
    assert out.dim() == 0 and out.dtype == torch.float32
    expected = ref_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold, average, weighting)
    assert_close_scalar(out, expected)


def test_threshold_0_3_actually_sparsifies_and_changes_loss():
    """The sigma=0.3 case above is only informative if it zeroes a good share of weights and moves the loss."""
    patch, token = make_inputs(seed=1)
    mask = prefix_mask(LENGTHS)
    n_zero = n_all = 0
    for i in range(B):
        w = ref_alignment_weights(patch[i].double().tolist(), token[i].double().tolist(), 0.3)
        for l in range(L):
            if mask[i, l]:
                n_zero += sum(x == 0.0 for x in w[l])
                n_all += P
    assert n_zero / n_all > 0.2
    sparse = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold=0.3)
    dense = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold=0.0)
    assert abs(float(sparse) - float(dense)) > 1e-3


def test_threshold_zero_equals_dense_and_float_scale_equals_tensor_scale():
    patch, token = make_inputs(seed=2)
    mask = prefix_mask(LENGTHS)
    a = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold=0.0)
    b = sparc_fine_grained_loss(patch, token, mask, torch.tensor(LOGIT_SCALE), weighting="dense")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# 2. Alignment weights
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_returned_weights_match_reference(weighting, threshold):
    patch, token = make_inputs(seed=3)
    mask = prefix_mask(LENGTHS)
    loss, w = sparc_fine_grained_loss(
        patch, token, mask, LOGIT_SCALE, threshold=threshold, weighting=weighting, return_weights=True
    )
    assert w.shape == (B, L, P)
    assert torch.isfinite(loss)
    for i in range(B):
        ref = ref_alignment_weights(patch[i].double().tolist(), token[i].double().tolist(), threshold, weighting)
        for l in range(L):
            if not mask[i, l]:
                continue
            torch.testing.assert_close(w[i, l].double(), torch.tensor(ref[l], dtype=torch.float64), rtol=1e-5, atol=1e-6)
            assert abs(float(w[i, l].double().sum()) - 1.0) < 1e-5
            assert bool((w[i, l] >= 0).all())
            if weighting == "sparse" and threshold is None:
                assert int((w[i, l] > 0).sum()) >= 1
                # min-max maps the minimum to 0 < 1/P, so at least one patch is always dropped on a non-flat row
                assert int((w[i, l] == 0).sum()) >= 1


def test_sparc_alignment_weights_direct_matches_reference():
    g = torch.Generator().manual_seed(4)
    sim = torch.randn(3, 5, 9, generator=g) * 3.0
    for weighting, threshold in [("sparse", None), ("sparse", 0.5), ("dense", None), ("softmax", None)]:
        w = sparc_alignment_weights(sim, threshold=threshold, weighting=weighting)
        assert w.shape == sim.shape
        for i in range(sim.shape[0]):
            ref = ref_alignment_weights_from_sim(sim[i].double().tolist(), threshold, weighting)
            torch.testing.assert_close(w[i].double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_sigma_one_over_p_keeps_at_least_one_patch_even_for_skewed_rows():
    """One very similar patch: only it survives the 1/P threshold, with weight 1."""
    sim = torch.zeros(1, 2, 6)
    sim[0, 0] = torch.tensor([0.0, 0.01, 0.02, 0.0, 0.0, 100.0])
    sim[0, 1] = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    w = sparc_alignment_weights(sim)
    expected = torch.zeros(1, 2, 6)
    expected[0, 0, 5] = 1.0
    expected[0, 1, 0] = 1.0
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)


def test_entry_exactly_at_threshold_is_kept():
    """eq. 3 keeps s_hat >= sigma: with P=4 the row [0, 1, 4, 0] min-max normalises to [0, 0.25, 1, 0] exactly, and
    the 0.25 = 1/P entry survives."""
    sim = torch.tensor([[[0.0, 1.0, 4.0, 0.0]]])
    w = sparc_alignment_weights(sim)
    torch.testing.assert_close(w, torch.tensor([[[0.0, 0.2, 0.8, 0.0]]]), rtol=0, atol=1e-7)
    w = sparc_alignment_weights(sim, threshold=0.25)
    torch.testing.assert_close(w, torch.tensor([[[0.0, 0.2, 0.8, 0.0]]]), rtol=0, atol=1e-7)
    w = sparc_alignment_weights(sim, threshold=0.2500001)
    torch.testing.assert_close(w, torch.tensor([[[0.0, 0.0, 1.0, 0.0]]]), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# masked_pairwise_contrastive_loss on its own (one direction of eq. 6, given logits)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["token", "caption"])
def test_masked_pairwise_contrastive_loss_matches_reference(average):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, L, L, generator=g) * 4.0
    mask = prefix_mask(LENGTHS)
    out = masked_pairwise_contrastive_loss(logits, mask, average=average)
    lv, mv = logits.double().tolist(), mask.tolist()
    # one direction only (rows -> softmax over columns); sparc_fine_grained_loss averages it with the transpose
    expected = ref_average([ref_row_contrast(lv[i], mv[i]) for i in range(B)], average)
    assert_close_scalar(out, expected)
    both = 0.5 * (out + masked_pairwise_contrastive_loss(logits.transpose(1, 2), mask, average=average))
    assert_close_scalar(both, ref_average([ref_pair_contrast(lv[i], mv[i]) for i in range(B)], average))
    # padded rows/columns may hold inf or NaN without leaking into the loss
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")
    poisoned.transpose(1, 2)[~mask] = float("inf")
    torch.testing.assert_close(masked_pairwise_contrastive_loss(poisoned, mask, average=average), out)


# ---------------------------------------------------------------------------------------------------------------
# 3. Invariance to padding
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_padding_content_does_not_matter(weighting, threshold, average):
    patch, token = make_inputs(seed=6)
    mask = prefix_mask(LENGTHS)
    kw = dict(threshold=threshold, average=average, weighting=weighting)
    base = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, **kw)

    g = torch.Generator().manual_seed(7)
    junk = token.clone()
    junk[~mask] = torch.randn(int((~mask).sum()), D, generator=g) * 1e3
    out = sparc_fine_grained_loss(patch, junk, mask, LOGIT_SCALE, **kw)
    torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-6)

    zeros = token.clone()
    zeros[~mask] = 0.0
    torch.testing.assert_close(sparc_fine_grained_loss(patch, zeros, mask, LOGIT_SCALE, **kw), base, rtol=1e-6, atol=1e-6)

    # more padding columns (L grows from 6 to 10), filled with random values
    extra = torch.randn(B, 4, D, generator=g) * 50.0
    longer = torch.cat([token, extra], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(B, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(
        sparc_fine_grained_loss(patch, longer, longer_mask, LOGIT_SCALE, **kw), base, rtol=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------------------------
# 4. Decomposition into per-pair losses
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_batch_loss_decomposes_into_per_sample_losses(weighting, threshold):
    patch, token = make_inputs(seed=8)
    mask = prefix_mask(LENGTHS)
    kw = dict(threshold=threshold, weighting=weighting)
    per_sample = []
    for i in range(B):
        tok = sparc_fine_grained_loss(patch[i : i + 1], token[i : i + 1], mask[i : i + 1], LOGIT_SCALE, average="token", **kw)
        cap = sparc_fine_grained_loss(patch[i : i + 1], token[i : i + 1], mask[i : i + 1], LOGIT_SCALE, average="caption", **kw)
        torch.testing.assert_close(tok, cap)  # one caption: both averages coincide
        per_sample.append(float(tok))
    assert per_sample[LENGTHS.index(1)] == 0.0  # the one-token caption contributes exactly 0

    token_avg = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, average="token", **kw)
    caption_avg = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, average="caption", **kw)
    weighted = sum(n * x for n, x in zip(LENGTHS, per_sample)) / sum(LENGTHS)
    plain = sum(per_sample) / B
    assert_close_scalar(token_avg, weighted)
    assert_close_scalar(caption_avg, plain)
    assert abs(weighted - plain) > 1e-4  # the two averages really differ here


# ---------------------------------------------------------------------------------------------------------------
# 5. Batch permutation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["token", "caption"])
def test_batch_permutation_invariance(average):
    patch, token = make_inputs(seed=9)
    mask = prefix_mask(LENGTHS)
    base = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, average=average)
    perm = torch.tensor([2, 0, 3, 1])
    out = sparc_fine_grained_loss(patch[perm], token[perm], mask[perm], LOGIT_SCALE, average=average)
    torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# 6. Degenerate inputs: finite values and gradients
# ---------------------------------------------------------------------------------------------------------------


def _loss_and_grads(patch, token, mask, scale=LOGIT_SCALE, **kw):
    patch = patch.clone().requires_grad_(True)
    token = token.clone().requires_grad_(True)
    out = sparc_fine_grained_loss(patch, token, mask, scale, **kw)
    out.backward()
    return out.detach(), patch, token


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_constant_similarity_rows_give_uniform_weights(weighting, threshold, average):
    """All patches of an image identical -> every similarity row is flat. Library convention: uniform 1/P weights
    (a flat row means every patch is equally the best); then c_l = v for every token."""
    patch, token = make_inputs(seed=10)
    patch = patch[:, :1, :].expand(B, P, D).contiguous()
    mask = prefix_mask(LENGTHS)
    kw = dict(threshold=threshold, average=average, weighting=weighting)
    out, pg, tg = _loss_and_grads(patch, token, mask, **kw)
    assert finite_grads(pg, tg)
    assert_close_scalar(out, ref_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold, average, weighting))
    _, w = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, return_weights=True, **kw)
    torch.testing.assert_close(w[mask], torch.full((int(mask.sum()), P), 1.0 / P), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_single_token_captions_give_exactly_zero(weighting, threshold, average):
    patch, token = make_inputs(seed=11)
    mask = prefix_mask([1, 1, 1, 1])
    out, pg, tg = _loss_and_grads(patch, token, mask, threshold=threshold, average=average, weighting=weighting)
    assert float(out) == 0.0
    assert finite_grads(pg, tg)
    assert float(pg.grad.abs().max()) == 0.0 and float(tg.grad.abs().max()) == 0.0


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_all_padding_caption_is_ignored(weighting, threshold, average):
    patch, token = make_inputs(seed=12)
    lengths = [5, 0, 2, 4]
    mask = prefix_mask(lengths)
    out, pg, tg = _loss_and_grads(patch, token, mask, threshold=threshold, average=average, weighting=weighting)
    assert finite_grads(pg, tg)
    assert_close_scalar(out, ref_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold, average, weighting))
    # the empty pair receives no gradient and does not change the loss
    assert float(pg.grad[1].abs().max()) == 0.0 and float(tg.grad[1].abs().max()) == 0.0
    keep = torch.tensor([0, 2, 3])
    without = sparc_fine_grained_loss(
        patch[keep], token[keep], mask[keep], LOGIT_SCALE, threshold=threshold, average=average, weighting=weighting
    )
    torch.testing.assert_close(out, without, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_zero_token_embeddings_at_padding(weighting, threshold, average):
    patch, token = make_inputs(seed=13)
    mask = prefix_mask(LENGTHS)
    token[~mask] = 0.0
    out, pg, tg = _loss_and_grads(patch, token, mask, threshold=threshold, average=average, weighting=weighting)
    assert finite_grads(pg, tg)
    assert_close_scalar(out, ref_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold, average, weighting))
    assert float(tg.grad[~mask].abs().max()) == 0.0


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_zero_patch_embeddings(weighting, threshold, average):
    """All patches zero: flat rows (uniform weights), c_l = 0, cos(c, t) = 0, all logits 0 -> each real token of a
    caption with n tokens costs log(n)."""
    _, token = make_inputs(seed=14)
    patch = torch.zeros(B, P, D)
    mask = prefix_mask(LENGTHS)
    out, pg, tg = _loss_and_grads(patch, token, mask, threshold=threshold, average=average, weighting=weighting)
    assert finite_grads(pg, tg)
    expected = ref_average([[math.log(n)] * n for n in LENGTHS], average)
    assert_close_scalar(out, expected)
    assert_close_scalar(out, ref_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold, average, weighting))


@pytest.mark.parametrize("noise", [1e-7, 1e-5, 1e-3])
def test_near_constant_rows_have_finite_gradients(noise):
    """Rows whose range is tiny but nonzero (from a few float32 ulps up to 1e-3) must not blow up."""
    _, token = make_inputs(seed=15)
    g = torch.Generator().manual_seed(16)
    patch = torch.randn(B, 1, D, generator=g).expand(B, P, D) + noise * torch.randn(B, P, D, generator=g)
    mask = prefix_mask(LENGTHS)
    for average in ["token", "caption"]:
        out, pg, tg = _loss_and_grads(patch, token, mask, average=average)
        assert torch.isfinite(out)
        assert finite_grads(pg, tg)


# ---------------------------------------------------------------------------------------------------------------
# 7. bf16 autocast
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_bf16_autocast_returns_float32_close_to_float32(weighting, threshold, average):
    patch, token = make_inputs(seed=17)
    patch, token = patch.bfloat16(), token.bfloat16()
    mask = prefix_mask(LENGTHS)
    kw = dict(threshold=threshold, average=average, weighting=weighting)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, **kw)
    assert out.dtype == torch.float32
    ref = sparc_fine_grained_loss(patch.float(), token.float(), mask, LOGIT_SCALE, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-3)


def test_bf16_autocast_clip_loss_returns_float32():
    g = torch.Generator().manual_seed(18)
    img, txt = torch.randn(B, D, generator=g).bfloat16(), torch.randn(B, D, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip_loss(img, txt, LOGIT_SCALE)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, clip_loss(img.float(), txt.float(), LOGIT_SCALE), rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# 8. Scale (in)variances of the weights: raw inner products, patches not normalised
# ---------------------------------------------------------------------------------------------------------------


def test_token_scale_does_not_change_weights_but_patch_scale_does():
    patch, token = make_inputs(seed=19)
    mask = prefix_mask(LENGTHS)
    loss, w = sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, return_weights=True)

    # scaling a token by a positive constant scales its similarity row; min-max (eq. 2) is invariant to that,
    # and the token is l2-normalised in eq. 6, so weights and loss are unchanged
    scaled_tok = token.clone()
    scaled_tok[0, 2] *= 7.5
    scaled_tok[3, 0] *= 0.05
    loss2, w2 = sparc_fine_grained_loss(patch, scaled_tok, mask, LOGIT_SCALE, return_weights=True)
    torch.testing.assert_close(w2[mask], w[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    for factor in [1e-3, 0.5, 2.0, 1e3]:
        _, wf = sparc_fine_grained_loss(patch, token * factor, mask, LOGIT_SCALE, return_weights=True)
        torch.testing.assert_close(wf[mask], w[mask], rtol=1e-4, atol=1e-5)
    # l2-normalising every token first therefore changes nothing either
    normed = token / token.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(
        sparc_fine_grained_loss(patch, normed, mask, LOGIT_SCALE), loss, rtol=1e-5, atol=1e-6
    )

    # scaling one patch changes one column of every row in that pair -> different weights (and loss)
    scaled_patch = patch.clone()
    scaled_patch[0, 3] *= 3.0
    loss3, w3 = sparc_fine_grained_loss(scaled_patch, token, mask, LOGIT_SCALE, return_weights=True)
    assert float((w3[0][mask[0]] - w[0][mask[0]]).abs().max()) > 1e-2
    torch.testing.assert_close(w3[1:][mask[1:]], w[1:][mask[1:]])  # other pairs untouched
    assert abs(float(loss3) - float(loss)) > 1e-4
    # and the changed weights are the ones the reference predicts for raw (un-normalised) patches
    ref = ref_alignment_weights(scaled_patch[0].double().tolist(), token[0].double().tolist())
    torch.testing.assert_close(
        w3[0][mask[0]].double(), torch.tensor(ref, dtype=torch.float64)[mask[0]], rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------------------------
# 9. clip_loss (eq. 1)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, LOGIT_SCALE, 100.0])
def test_clip_loss_matches_reference(scale):
    g = torch.Generator().manual_seed(20)
    img, txt = torch.randn(5, D, generator=g) * 3.0, torch.randn(5, D, generator=g)
    out = clip_loss(img, txt, torch.tensor(scale))
    assert out.dim() == 0
    assert_close_scalar(out, ref_clip_loss(img, txt, scale))
    assert_close_scalar(clip_loss(img, txt, scale), ref_clip_loss(img, txt, scale))


def test_clip_loss_scale_invariance_and_symmetry():
    g = torch.Generator().manual_seed(21)
    img, txt = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)
    base = clip_loss(img, txt, LOGIT_SCALE)
    torch.testing.assert_close(clip_loss(img * 3.7, txt * 0.2, LOGIT_SCALE), base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip_loss(txt, img, LOGIT_SCALE), base, rtol=1e-6, atol=1e-6)
    # row-wise scaling (different norms per sample) is also irrelevant
    row_scale = torch.rand(6, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(clip_loss(img * row_scale, txt, LOGIT_SCALE), base, rtol=1e-5, atol=1e-6)


def test_clip_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(22)
    img, txt = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    img_r, txt_r = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    clip_loss(img_r, txt_r, LOGIT_SCALE).backward()
    h = 1e-6
    for x, grad, which in [(img, img_r.grad, 0), (txt, txt_r.grad, 1)]:
        fd = torch.zeros_like(x)
        for idx in range(x.numel()):
            xp, xm = x.clone(), x.clone()
            xp.view(-1)[idx] += h
            xm.view(-1)[idx] -= h
            args_p = (xp, txt) if which == 0 else (img, xp)
            args_m = (xm, txt) if which == 0 else (img, xm)
            fd.view(-1)[idx] = (ref_clip_loss(*args_p, LOGIT_SCALE) - ref_clip_loss(*args_m, LOGIT_SCALE)) / (2 * h)
        torch.testing.assert_close(grad.double(), fd, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# 10. Gradients of the fine-grained loss vs central finite differences of the float64 reference
# ---------------------------------------------------------------------------------------------------------------


def _central_fd(fn, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    fd = torch.zeros_like(x, dtype=torch.float64)
    for idx in range(x.numel()):
        xp, xm = x.clone(), x.clone()
        xp.view(-1)[idx] += h
        xm.view(-1)[idx] -= h
        fd.view(-1)[idx] = (fn(xp) - fn(xm)) / (2 * h)
    return fd


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize(
    "weighting,threshold",
    [pytest.param("sparse", None, id="sparse-sigma1/P"), pytest.param("dense", None, id="dense"),
     pytest.param("softmax", None, id="softmax")],
)
def test_gradients_match_finite_differences_of_reference(weighting, threshold, average):
    """The function computes in float32, so float64 gradcheck of the function itself is not meaningful; instead its
    autograd gradients (w.r.t. patches, tokens and the logit scale) are compared with central differences of the
    float64 reference. B=2, P=4, L=3, D=5, second caption padded to 2 tokens."""
    g = torch.Generator().manual_seed(23)
    patch = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    token = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = prefix_mask([3, 2], n_tokens=3)
    scale = 5.0

    p_r, t_r = patch.clone().requires_grad_(True), token.clone().requires_grad_(True)
    s_r = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    out = sparc_fine_grained_loss(p_r, t_r, mask, s_r, threshold=threshold, average=average, weighting=weighting)
    out.backward()
    assert finite_grads(p_r, t_r, s_r)

    def ref(pp, tt, ss=scale):
        return ref_fine_grained_loss(pp, tt, mask, ss, threshold, average, weighting)

    fd_patch = _central_fd(lambda x: ref(x, token), patch)
    fd_token = _central_fd(lambda x: ref(patch, x), token)
    fd_scale = (ref(patch, token, scale + 1e-6) - ref(patch, token, scale - 1e-6)) / 2e-6
    torch.testing.assert_close(p_r.grad.double(), fd_patch, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(t_r.grad.double(), fd_token, rtol=1e-3, atol=1e-3)
    assert abs(float(s_r.grad) - fd_scale) <= 1e-3 + 1e-3 * abs(fd_scale)
    # padded token positions get no gradient
    assert float(t_r.grad[1, 2].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# float64 in, float64 out: the losses promote, never demote


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
def test_float64_inputs_match_the_float64_reference_to_rounding(weighting, threshold, average):
    patch, token = make_inputs(seed=1, dtype=torch.float64)
    mask = prefix_mask(LENGTHS)
    out = sparc_fine_grained_loss(patch, token, mask, torch.tensor(LOGIT_SCALE, dtype=torch.float64),
                                  threshold=threshold, average=average, weighting=weighting)
    assert out.dtype == torch.float64
    expected = ref_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold, average, weighting)
    assert abs(float(out) - expected) <= 1e-12 * max(1.0, abs(expected))
    g = torch.Generator().manual_seed(20)
    img, txt = torch.randn(5, D, generator=g, dtype=torch.float64), torch.randn(5, D, generator=g, dtype=torch.float64)
    clip = clip_loss(img, txt, LOGIT_SCALE)
    assert clip.dtype == torch.float64
    assert abs(float(clip) - ref_clip_loss(img, txt, LOGIT_SCALE)) <= 1e-12 * max(1.0, abs(float(clip)))


# ---------------------------------------------------------------------------------------------------------------
# SPARC's diagnostics


def test_zeroed_fraction_reports_what_the_threshold_removed():
    """Without a threshold nothing is removed (the patch min-max maps to 0 is not the threshold's doing); with
    sigma = 1 only each row's best patch survives, so the threshold removes P - 2 of P (the worst was 0 anyway)."""
    from sparc_kit.losses import SparcLoss

    patch, token = make_inputs(seed=3)
    mask = prefix_mask(LENGTHS)
    kw = dict(image_embeds=patch.mean(1), text_embeds=token.mean(1), patch_embeds=patch, token_embeds=token,
              token_mask=mask, logit_scale=torch.tensor(LOGIT_SCALE))
    with torch.no_grad():
        assert float(SparcLoss(weighting="dense")(**kw)["zeroed_fraction"]) == 0.0
        assert float(SparcLoss(weighting="softmax")(**kw)["zeroed_fraction"]) == 0.0
        assert float(SparcLoss(sparsity_threshold=0.0)(**kw)["zeroed_fraction"]) == 0.0
        one = SparcLoss(sparsity_threshold=1.0)(**kw)
        assert float(one["zeroed_fraction"]) == pytest.approx((P - 2) / P)
        assert float(one["patches_per_token"]) == 1.0
        # the default 1/P: what the threshold removed, counted independently from the reference weights
        removed = total = 0
        for i in range(B):
            for l in range(int(mask[i].sum())):
                sim = [sum(a * b for a, b in zip(token[i, l].tolist(), patch[i, p].tolist())) for p in range(P)]
                lo, hi = min(sim), max(sim)
                normalised = [(s - lo) / (hi - lo) for s in sim]
                removed += sum(1 for x in normalised if 0 < x < 1 / P)
                total += P
        assert float(SparcLoss()(**kw)["zeroed_fraction"]) == pytest.approx(removed / total)


# ---------------------------------------------------------------------------------------------------------------
# chunk_size: the same loss and gradients, a fraction of the saved intermediates


@pytest.mark.parametrize("average", ["token", "caption"])
@pytest.mark.parametrize("weighting,threshold", WEIGHTING_CASES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_fine_grained_loss_matches_reference_and_unchunked_gradients(chunk, weighting, threshold, average):
    patch, token = make_inputs(seed=5)
    mask = scattered_mask()
    expected = ref_fine_grained_loss(patch, token, mask, LOGIT_SCALE, threshold, average, weighting)
    grads = {}
    for chunk_size in (None, chunk):
        p, t = patch.clone().requires_grad_(True), token.clone().requires_grad_(True)
        s = torch.tensor(LOGIT_SCALE, requires_grad=True)
        out, weights = sparc_fine_grained_loss(
            p, t, mask, s, threshold=threshold, average=average, weighting=weighting, return_weights=True,
            chunk_size=chunk_size,
        )
        assert_close_scalar(out, expected)
        assert weights.shape == (B, L, P)
        out.backward()
        grads[chunk_size] = (p.grad, t.grad, s.grad, weights.detach())
    for a, b in zip(grads[None], grads[chunk]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_chunked_fine_grained_loss_keeps_no_batch_sized_intermediate_for_the_backward():
    """Unchunked, the backward keeps several [B, L, P] float32 tensors from the forward; chunked, it keeps only
    the inputs (which the towers' backward holds anyway) and recomputes one chunk at a time (the peak of that is
    measured in ``benchmarks/loss_cost.py --chunk``)."""
    b, p, n, d = 32, 196, 32, 64
    patch, token = make_inputs(seed=2, b=b, p=p, n_tokens=n, d=d)
    patch.requires_grad_(True)
    token.requires_grad_(True)
    mask = torch.ones(b, n, dtype=torch.bool)
    inputs = patch.untyped_storage().nbytes() + token.untyped_storage().nbytes()
    whole = _saved_bytes(lambda: sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE))
    chunked = _saved_bytes(lambda: sparc_fine_grained_loss(patch, token, mask, LOGIT_SCALE, chunk_size=4))
    one_blp = b * n * p * 4
    assert whole - inputs >= 3 * one_blp  # similarity, normalised and weights at least
    assert chunked - inputs < one_blp / 100  # a few scalars
