"""Numerical tests of the losses SPARC is compared against: ``siglip``, ``filip``, ``pacl``, ``gloria``, ``mgca``.

What is checked, and why
------------------------
Each registered loss is compared against a *slow reference* written from its definition (the docstrings of the
modules under test, the papers' definitions) with explicit Python loops over plain float64 numbers, so the
references share no code path with the vectorised float32 implementations:

- SigLIP: ``-1/B sum_ij log sigmoid(z_ij (t cos(x_i, y_j) + b))``;
- FILIP: token-wise max late interaction over all pairs, padded tokens out of the max and the mean;
- PACL: softmax over patches of patch-to-text cosines, text-conditioned pooling, InfoNCE;
- GLoRIA: attention over patches from ``w . r / sqrt(D)`` (single softmax, and the original code's double one),
  ``R = log sum_l exp(tau2 cos(w_l, c_l))``, cross-entropy both ways;
- MGCA: 1-head cross attention (projections read off the module), L x L and P x P within-sample contrasts.

Beyond values: invariance to permuting the batch, per-sample locality of MGCA, independence from the content of
padded token slots, FILIP's token dropping (never a whole caption, exact count, off in eval mode, reproducible
from torch's seed), finite values and gradients with an all-padding caption and with one-token captions,
gradients reaching every learnable parameter a loss owns (SigLIP bias, MGCA projections), and
``SparcLoss(global_loss="siglip") == lambda_g * siglip + lambda_f * fine``.

Conventions pinned here (the modules' docstrings give the reasons): a caption with no real token has FILIP
similarities 0 and GLoRIA score 0 against every image, and drops out of MGCA's terms; a zero vector
l2-normalises to the zero vector.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparc_kit.losses import (
    ClipLoss,
    FilipLoss,
    GloriaLoss,
    MgcaLoss,
    PaclLoss,
    SigLipLoss,
    SparcLoss,
    sparc_fine_grained_loss,
)
from sparc_kit.losses.filip import drop_tokens
from sparc_kit.registry import losses

B, P, L, D = 3, 4, 5, 6
SCALE = 7.0
RTOL, ATOL = 2e-5, 2e-5

# caption 0 full, caption 1 padded at the end, caption 2 with a hole (padding need not be a suffix)
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0],
    ],
    dtype=torch.bool,
)


# ---------------------------------------------------------------------------------------------------------------
# Slow float64 references (Python floats, explicit loops)
# ---------------------------------------------------------------------------------------------------------------


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _unit(a) -> list[float]:
    """a / ||a||; the zero vector maps to the zero vector (the F.normalize convention)."""
    n = math.sqrt(_dot(a, a))
    return [x / n for x in a] if n > 0 else [0.0 for _ in a]


def _cos(a, b) -> float:
    return _dot(_unit(a), _unit(b))


def _lse(xs) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _softmax(xs) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _ce(row, target) -> float:
    return _lse(row) - row[target]


def _log_sigmoid(u: float) -> float:
    return -math.log1p(math.exp(-u)) if u >= 0 else u - math.log1p(math.exp(u))


def _matvec(w, x) -> list[float]:
    """w [out][in] times x [in]."""
    return [_dot(row, x) for row in w]


def _symmetric_ce(logits_i2t) -> float:
    """0.5 * (mean_i CE(row i, i) + mean_j CE(column j, j)) of a square logit matrix given as rows."""
    n = len(logits_i2t)
    rows = sum(_ce(logits_i2t[i], i) for i in range(n)) / n
    cols = sum(_ce([logits_i2t[i][j] for i in range(n)], j) for j in range(n)) / n
    return 0.5 * (rows + cols)


def ref_clip(img, txt, scale) -> float:
    n = len(img)
    return _symmetric_ce([[scale * _cos(img[i], txt[j]) for j in range(n)] for i in range(n)])


def ref_siglip(img, txt, scale, bias) -> float:
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total -= _log_sigmoid(z * (scale * _cos(img[i], txt[j]) + bias))
    return total / n


def ref_filip(patch, token, mask, scale) -> float:
    n = len(patch)
    s_img = [[0.0] * n for _ in range(n)]
    s_txt = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            real = [r for r in range(len(token[j])) if mask[j][r]]
            if not real:
                continue  # both similarities 0 for an empty caption
            s_img[i][j] = sum(max(_cos(x, token[j][r]) for r in real) for x in patch[i]) / len(patch[i])
            s_txt[i][j] = sum(max(_cos(x, token[j][r]) for x in patch[i]) for r in real) / len(real)
    i2t = sum(_ce([scale * s_img[i][j] for j in range(n)], i) for i in range(n)) / n
    t2i = sum(_ce([scale * s_txt[i][j] for i in range(n)], j) for j in range(n)) / n
    return 0.5 * (i2t + t2i)


def ref_pacl(patch, text, scale, attn_scale) -> float:
    n = len(patch)
    phi = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            weights = _softmax([attn_scale * _cos(v, text[j]) for v in patch[i]])
            pooled = [sum(w * v[d] for w, v in zip(weights, patch[i])) for d in range(len(text[j]))]
            phi[i][j] = _cos(pooled, text[j])
    return _symmetric_ce([[scale * phi[i][j] for j in range(n)] for i in range(n)])


def ref_gloria(patch, token, mask, scale, tau2=5.0, double_softmax=False, tau1=4.0) -> float:
    n = len(patch)
    dim = len(patch[0][0])
    match = [[0.0] * n for _ in range(n)]  # [caption i][image k]
    for i in range(n):
        real = [l for l in range(len(token[i])) if mask[i][l]]
        if not real:
            continue  # R = 0 for an empty caption
        for k in range(n):
            s = {l: [_dot(token[i][l], r) / math.sqrt(dim) for r in patch[k]] for l in real}
            if double_softmax:
                attn = {}
                for p in range(len(patch[k])):
                    over_words = _softmax([s[l][p] for l in real])
                    for l, a in zip(real, over_words):
                        attn.setdefault(l, []).append(tau1 * a)
                attn = {l: _softmax(attn[l]) for l in real}
            else:
                attn = {l: _softmax(s[l]) for l in real}
            terms = []
            for l in real:
                c = [sum(a * r[d] for a, r in zip(attn[l], patch[k])) for d in range(dim)]
                terms.append(tau2 * _cos(token[i][l], c))
            match[i][k] = _lse(terms)
    # rows images (i2t), columns captions
    return _symmetric_ce([[scale * match[i][k] for i in range(n)] for k in range(n)])


def _ref_attention(queries, context, context_real, wq, wk, wv, wo) -> list[list[float]]:
    d = len(wq)
    out = []
    for x in queries:
        q = _matvec(wq, x)
        keys = [c for c, ok in zip(context, context_real) if ok]
        if not keys:
            keys = context  # fully masked context: uniform attention over it (the result is dropped anyway)
        scores = [_dot(q, _matvec(wk, c)) / math.sqrt(d) for c in keys]
        attn = _softmax(scores)
        vals = [_matvec(wv, c) for c in keys]
        mixed = [sum(a * v[e] for a, v in zip(attn, vals)) for e in range(d)]
        out.append(_matvec(wo, mixed))
    return out


def _ref_within_contrast(logits, real) -> tuple[tuple[float, float] | float, int]:
    """An n x n within-sample contrast over its real rows and columns, diagonal the positives.

    Returns ((sum over real rows of the row-wise CE, sum over real columns of the column-wise CE), number real).
    """
    idx = [a for a in range(len(real)) if real[a]]
    if not idx:
        return 0.0, 0
    fwd = [_ce([logits[a][b] for b in idx], idx.index(a)) for a in idx]
    bwd = [_ce([logits[b][a] for b in idx], idx.index(a)) for a in idx]
    return (sum(fwd), sum(bwd)), len(idx)


def ref_mgca(patch, token, mask, scale, weights, average="caption") -> float:
    """``weights``: (word attention q, k, v, o; patch attention q, k, v, o) as nested lists."""
    wq1, wk1, wv1, wo1, wq2, wk2, wv2, wo2 = weights
    n = len(patch)
    terms = {"word": [], "patch": []}  # per sample: (forward sum, backward sum, count)
    for i in range(n):
        t = [_unit(x) for x in token[i]]
        v = [_unit(x) for x in patch[i]]
        real = [bool(m) for m in mask[i]]
        u = _ref_attention(t, v, [True] * len(v), wq1, wk1, wv1, wo1)
        word_logits = [[scale * _cos(t[a], u[b]) for b in range(len(t))] for a in range(len(t))]
        sums, count = _ref_within_contrast(word_logits, real)
        terms["word"].append((sums, count))
        if any(real):
            u2 = _ref_attention(v, t, real, wq2, wk2, wv2, wo2)
            patch_logits = [[scale * _cos(v[a], u2[b]) for b in range(len(v))] for a in range(len(v))]
            sums, count = _ref_within_contrast(patch_logits, [True] * len(v))
        else:
            sums, count = 0.0, 0
        terms["patch"].append((sums, count))

    def reduce(per_sample) -> float:
        directions = []
        for d in range(2):
            if average == "token":
                total = sum(s[d] for s, c in per_sample if c)
                directions.append(total / max(1, sum(c for _, c in per_sample)))
            else:
                means = [s[d] / c for s, c in per_sample if c]
                directions.append(sum(means) / max(1, len(means)))
        return 0.5 * sum(directions)

    return 0.5 * (reduce(terms["word"]) + reduce(terms["patch"]))


# ---------------------------------------------------------------------------------------------------------------
# Inputs and helpers
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(seed: int = 0, mask: torch.Tensor = MASK, scale: float = SCALE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n_tokens = mask.shape
    return {
        "image_embeds": torch.randn(b, D, generator=g),
        "text_embeds": torch.randn(b, D, generator=g),
        "patch_embeds": torch.randn(b, P, D, generator=g),
        "token_embeds": torch.randn(b, n_tokens, D, generator=g),
        "token_mask": mask.clone(),
        "logit_scale": torch.tensor(scale),
    }


def lists(inputs: dict[str, torch.Tensor]) -> dict:
    return {k: (v.double().tolist() if k != "token_mask" else v.tolist()) for k, v in inputs.items()}


def close(actual: torch.Tensor, expected: float, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert actual.dtype == torch.float32
    actual = actual.detach()
    assert abs(float(actual) - expected) <= atol + rtol * abs(expected), (float(actual), expected)


def permute(inputs: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: (v if k == "logit_scale" else v[perm]) for k, v in inputs.items()}


def ref_sinkhorn(scores, epsilon, iterations) -> list[list[float]]:
    """SwAV / MGCA equipartition, written out: Q = exp(s / eps) / total, then alternately every prototype's
    (column's) mass to 1/K and every sample's (row's) to 1/B; rows scaled to sum 1."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(x / epsilon) for x in row] for row in scores]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        cols = [sum(q[i][c] for i in range(b)) for c in range(k)]
        q = [[q[i][c] / cols[c] / k for c in range(k)] for i in range(b)]
        q = [[x / sum(row) / b for x in row] for row in q]
    return [[x * b for x in row] for row in q]


def ref_cpa(img, txt, prototypes, temperature, epsilon, iterations) -> float:
    """MGCA's prototype alignment: swapped prediction of the other side's Sinkhorn codes."""
    s_i = [[_cos(z, c) for c in prototypes] for z in img]
    s_t = [[_cos(z, c) for c in prototypes] for z in txt]
    q_i, q_t = ref_sinkhorn(s_i, epsilon, iterations), ref_sinkhorn(s_t, epsilon, iterations)

    def cross_entropy(codes, scores):
        total = 0.0
        for q, s in zip(codes, scores):
            logp = [x / temperature - _lse([y / temperature for y in s]) for x in s]
            total -= sum(a * b for a, b in zip(q, logp))
        return total / len(codes)

    return 0.5 * (cross_entropy(q_t, s_i) + cross_entropy(q_i, s_t))


def mgca_weights(loss: MgcaLoss) -> tuple:
    mods = (loss.word_attention, loss.patch_attention)
    return tuple(w.detach().double().tolist() for m in mods for w in (m.q_proj, m.k_proj, m.v_proj, m.out_proj))


def make_loss(name: str, **params) -> torch.nn.Module:
    """A registered loss built as a recipe would build it, in eval mode (no FILIP token dropping)."""
    torch.manual_seed(0)  # MGCA's projection initialisation
    loss = losses.build(name, params)
    if name == "mgca":
        loss.word_attention.initialize_parameters(torch.zeros(1, 1, D), None)
        loss.patch_attention.initialize_parameters(torch.zeros(1, 1, D), None)
    return loss.eval()


# every registered loss this file covers, with non-default settings where they matter
CASES = {
    "siglip": ("siglip", {}),
    "sparc_siglip": ("sparc", {"global_loss": "siglip"}),
    "filip": ("filip", {}),
    "filip_plus_clip": ("filip", {"lambda_g": 0.5}),
    "pacl": ("pacl", {}),
    "gloria": ("gloria", {}),
    "gloria_double_softmax": ("gloria", {"double_softmax": True}),
    "mgca": ("mgca", {}),
    "mgca_siglip": ("mgca", {"global_loss": "siglip", "average": "token"}),
}


def set_bias(loss: torch.nn.Module, value: float) -> None:
    """A bias far from -10, so the SigLIP terms of the tests are not all saturated."""
    for name, p in loss.named_parameters():
        if name.endswith("bias") and p.ndim == 0:
            with torch.no_grad():
                p.fill_(value)


# ---------------------------------------------------------------------------------------------------------------
# Values against the references
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, bias", [(SCALE, -10.0), (10.0, -2.0), (2.5, 1.0)])
def test_siglip_matches_loop_reference(scale, bias):
    inputs = make_inputs(1, scale=scale)
    loss = SigLipLoss(init_bias=bias)
    out = loss(**inputs)
    ref = lists(inputs)
    expected = ref_siglip(ref["image_embeds"], ref["text_embeds"], scale, bias)
    close(out["loss"], expected)
    close(out["global_loss"], expected)
    assert float(out["siglip_bias"]) == bias


def test_siglip_defaults_and_bias_gradient():
    loss = losses.build("siglip", {})
    assert isinstance(loss, SigLipLoss) and float(loss.bias.detach()) == -10.0
    assert [n for n, _ in loss.named_parameters()] == ["bias"]
    inputs = make_inputs(2)
    inputs["logit_scale"] = torch.tensor(10.0, requires_grad=True)
    loss(**inputs)["loss"].backward()
    assert loss.bias.grad is not None and loss.bias.grad.abs() > 0
    assert inputs["logit_scale"].grad is not None and torch.isfinite(inputs["logit_scale"].grad)
    # d/db of -1/B sum log sigmoid(z (s + b)) = 1/B sum (sigmoid(s + b) - [z = 1]); reference by hand
    ref = lists(inputs)
    s = [[10.0 * _cos(x, y) for y in ref["text_embeds"]] for x in ref["image_embeds"]]
    grad = sum(
        1 / (1 + math.exp(-(s[i][j] - 10.0))) - (1.0 if i == j else 0.0) for i in range(B) for j in range(B)
    ) / B
    assert abs(float(loss.bias.grad) - grad) < 1e-5


@pytest.mark.parametrize("lambda_g, lambda_f", [(0.5, 1.0), (1.0, 5.0)])
def test_sparc_with_siglip_global_is_weighted_sum(lambda_g, lambda_f):
    inputs = make_inputs(3)
    loss = SparcLoss(lambda_g=lambda_g, lambda_f=lambda_f, global_loss="siglip")
    set_bias(loss, -3.0)
    out = loss(**inputs)
    ref = lists(inputs)
    siglip = ref_siglip(ref["image_embeds"], ref["text_embeds"], SCALE, -3.0)
    fine = sparc_fine_grained_loss(
        inputs["patch_embeds"], inputs["token_embeds"], inputs["token_mask"], inputs["logit_scale"]
    )
    close(out["global_loss"], siglip)
    close(out["fine_loss"], float(fine))
    close(out["loss"], lambda_g * siglip + lambda_f * float(fine))
    assert [n for n, _ in loss.named_parameters()] == ["global_term.bias"]
    assert "siglip_bias" in out
    # the default is unchanged: CLIP's global loss, no parameters
    default = SparcLoss(lambda_g=lambda_g, lambda_f=lambda_f)
    clip = ref_clip(ref["image_embeds"], ref["text_embeds"], SCALE)
    close(default(**inputs)["loss"], lambda_g * clip + lambda_f * float(fine))
    assert list(default.parameters()) == []
    with pytest.raises(Exception):
        losses.build("sparc", {"global_loss": "sigmoid"})


@pytest.mark.parametrize("lambda_g", [0.0, 0.5])
@pytest.mark.parametrize("seed", [0, 4])
def test_filip_matches_reference(lambda_g, seed):
    inputs = make_inputs(seed)
    out = FilipLoss(lambda_g=lambda_g).eval()(**inputs)
    ref = lists(inputs)
    fine = ref_filip(ref["patch_embeds"], ref["token_embeds"], ref["token_mask"], SCALE)
    close(out["fine_loss"], fine)
    close(out["loss"], lambda_g * ref_clip(ref["image_embeds"], ref["text_embeds"], SCALE) + fine)


@pytest.mark.parametrize("attn_scale", [1.0, 10.0, None])
def test_pacl_matches_reference(attn_scale):
    inputs = make_inputs(5)
    out = PaclLoss(attn_scale=attn_scale)(**inputs)
    ref = lists(inputs)
    expected = ref_pacl(ref["patch_embeds"], ref["text_embeds"], SCALE, SCALE if attn_scale is None else attn_scale)
    close(out["fine_loss"], expected)
    close(out["loss"], expected)  # lambda_g = 0 by default


@pytest.mark.parametrize("double_softmax", [False, True])
@pytest.mark.parametrize("tau2", [5.0, 1.5])
def test_gloria_matches_reference(double_softmax, tau2):
    inputs = make_inputs(6)
    out = GloriaLoss(double_softmax=double_softmax, tau2=tau2)(**inputs)
    ref = lists(inputs)
    fine = ref_gloria(ref["patch_embeds"], ref["token_embeds"], ref["token_mask"], SCALE, tau2, double_softmax)
    close(out["fine_loss"], fine)
    close(out["loss"], ref_clip(ref["image_embeds"], ref["text_embeds"], SCALE) + fine)  # lambda_g = lambda_f = 1


def test_gloria_single_and_double_softmax_differ():
    inputs = make_inputs(6)
    single = GloriaLoss()(**inputs)["fine_loss"]
    double = GloriaLoss(double_softmax=True)(**inputs)["fine_loss"]
    assert abs(float(single) - float(double)) > 1e-4


@pytest.mark.parametrize("average", ["caption", "token"])
@pytest.mark.parametrize("embed_dim", [None, D])
def test_mgca_matches_reference(average, embed_dim):
    inputs = make_inputs(7)
    torch.manual_seed(1)
    loss = MgcaLoss(average=average, embed_dim=embed_dim, attn_dim=3)
    out = loss(**inputs)
    assert loss.word_attention.q_proj.shape == (3, D) and loss.word_attention.out_proj.shape == (D, 3)
    ref = lists(inputs)
    fine = ref_mgca(ref["patch_embeds"], ref["token_embeds"], ref["token_mask"], SCALE, mgca_weights(loss), average)
    close(out["fine_loss"], fine)
    protos = loss.prototypes.weight.tolist()
    proto = ref_cpa(ref["image_embeds"], ref["text_embeds"], protos, 0.2, 0.05, 3)
    close(out["proto_loss"], proto)
    close(out["loss"], ref_clip(ref["image_embeds"], ref["text_embeds"], SCALE) + fine + proto)


@pytest.mark.parametrize("settings", [
    {"num_prototypes": 4, "proto_temperature": 0.2, "sinkhorn_epsilon": 0.05, "sinkhorn_iterations": 3},
    {"num_prototypes": 7, "proto_temperature": 0.5, "sinkhorn_epsilon": 0.3, "sinkhorn_iterations": 1},
])
def test_mgca_prototype_term_matches_reference_and_trains_the_prototypes(settings):
    inputs = make_inputs(9)
    torch.manual_seed(3)
    loss = MgcaLoss(embed_dim=D, lambda_p=2.0, **settings)
    out = loss(**inputs)
    ref = lists(inputs)
    proto = ref_cpa(ref["image_embeds"], ref["text_embeds"], loss.prototypes.weight.tolist(),
                    settings["proto_temperature"], settings["sinkhorn_epsilon"], settings["sinkhorn_iterations"])
    close(out["proto_loss"], proto)
    without = MgcaLoss(embed_dim=D, lambda_p=0.0, **settings)  # no prototypes: the loss before CPA
    without.load_state_dict({k: v for k, v in loss.state_dict().items() if not k.startswith("prototypes.")})
    assert "proto_loss" not in without(**inputs)
    close(out["loss"] - without(**inputs)["loss"], 2.0 * proto)  # lambda_p weighs exactly this term
    out["loss"].backward()
    assert loss.prototypes.weight.grad is not None and loss.prototypes.weight.grad.abs().sum() > 0
    z = [inputs["image_embeds"].requires_grad_(), inputs["text_embeds"].requires_grad_()]
    grads = torch.autograd.grad(loss.prototype_loss(*z), z)
    assert all(g.abs().sum() > 0 for g in grads)  # the term reaches both towers


def test_sinkhorn_codes_are_distributions_that_spread_over_prototypes():
    from sparc_kit.losses.mgca import sinkhorn_knopp

    scores = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(16))  # each sample's code is a distribution
    torch.testing.assert_close(q.sum(0), torch.full((4,), 4.0), rtol=1e-3, atol=1e-3)  # equipartition: B/K each
    torch.testing.assert_close(q, torch.tensor(ref_sinkhorn(scores.tolist(), 0.05, 50), dtype=torch.float32),
                               rtol=1e-4, atol=1e-5)


def test_mgca_checkpoint_loads_into_a_lazy_instance():
    inputs = make_inputs(8)
    torch.manual_seed(2)
    trained = MgcaLoss(embed_dim=D)
    fresh = MgcaLoss()  # embed_dim inferred: uninitialised until the first call or a state dict
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(**inputs)["loss"], trained(**inputs)["loss"])
    assert trained.word_attention.q_proj.shape == (128, D)  # attn_dim default: SPARC's 128-d


# ---------------------------------------------------------------------------------------------------------------
# Properties every loss must have
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_batch_permutation_invariance(case):
    name, params = CASES[case]
    loss = make_loss(name, **params)
    set_bias(loss, -2.0)
    inputs = make_inputs(9)
    base = loss(**inputs)
    for perm in ([2, 0, 1], [1, 0, 2]):
        out = loss(**permute(inputs, torch.tensor(perm)))
        for key in ("loss", "global_loss", "fine_loss"):
            if key in base:
                torch.testing.assert_close(out[key], base[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_padding_content_does_not_matter(case):
    name, params = CASES[case]
    loss = make_loss(name, **params)
    inputs = make_inputs(10)
    base = loss(**inputs)["loss"]
    noisy = dict(inputs)
    garbage = 100.0 * torch.randn(inputs["token_embeds"].shape, generator=torch.Generator().manual_seed(11))
    noisy["token_embeds"] = torch.where(MASK[..., None], inputs["token_embeds"], garbage)
    torch.testing.assert_close(loss(**noisy)["loss"], base, rtol=1e-6, atol=1e-6)


def _finite_loss_and_grads(loss: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k != "token_mask"}
    out = loss(**leaves, token_mask=inputs["token_mask"])
    assert all(torch.isfinite(v).all() for v in out.values()), out
    out["loss"].backward()
    for k, v in leaves.items():
        assert v.grad is None or torch.isfinite(v.grad).all(), k
    for n, p in loss.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=torch.bool),  # an empty caption
        torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool),  # one token each
        torch.zeros(B, L, dtype=torch.bool),  # no real token anywhere
    ],
    ids=["empty_caption", "single_tokens", "all_empty"],
)
def test_degenerate_captions_give_finite_values_and_gradients(case, mask):
    name, params = CASES[case]
    loss = make_loss(name, **params).train()  # with FILIP's token dropping
    _finite_loss_and_grads(loss, make_inputs(12, mask=mask))


def test_degenerate_caption_values_follow_the_conventions():
    empty = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=torch.bool)
    inputs = make_inputs(13, mask=empty)
    ref = lists(inputs)
    patch, token = ref["patch_embeds"], ref["token_embeds"]
    close(FilipLoss().eval()(**inputs)["fine_loss"], ref_filip(patch, token, empty.tolist(), SCALE))
    close(GloriaLoss()(**inputs)["fine_loss"], ref_gloria(patch, token, empty.tolist(), SCALE))
    mgca = make_loss("mgca")
    close(
        mgca(**inputs)["fine_loss"],
        ref_mgca(ref["patch_embeds"], ref["token_embeds"], empty.tolist(), SCALE, mgca_weights(mgca)),
    )
    # one-token captions: MGCA's word term is a softmax over one entry, exactly 0; the patch term is not
    single = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    inputs = make_inputs(14, mask=single)
    ref = lists(inputs)
    close(
        mgca(**inputs)["fine_loss"],
        ref_mgca(ref["patch_embeds"], ref["token_embeds"], single.tolist(), SCALE, mgca_weights(mgca)),
    )


def test_mgca_fine_term_is_per_sample():
    loss = make_loss("mgca")
    inputs = make_inputs(15)

    def fine_and_grad(inp):
        patch = inp["patch_embeds"].clone().requires_grad_(True)
        token = inp["token_embeds"].clone().requires_grad_(True)
        fine = loss.fine_loss(patch, token, inp["token_mask"], inp["logit_scale"])
        fine.backward()
        return fine.detach(), patch.grad[0].clone(), token.grad[0].clone()

    fine, g_patch, g_token = fine_and_grad(inputs)
    # caption averaging: the batch value is the mean of the one-sample values
    singles = [loss.fine_loss(*(inputs[k][i : i + 1] for k in ("patch_embeds", "token_embeds", "token_mask")),
                              inputs["logit_scale"]) for i in range(B)]
    torch.testing.assert_close(fine, torch.stack(singles).mean(), rtol=1e-6, atol=1e-6)
    # changing another sample changes nothing about sample 0's contribution
    other = make_inputs(16)
    changed = dict(inputs)
    for k in ("patch_embeds", "token_embeds"):
        changed[k] = inputs[k].clone()
        changed[k][2] = other[k][2]
    fine2, g_patch2, g_token2 = fine_and_grad(changed)
    assert abs(float(fine2) - float(fine)) > 1e-4
    torch.testing.assert_close(g_patch2, g_patch, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_token2, g_token, rtol=1e-6, atol=1e-7)


MGCA_PARAMS = [f"{s}_attention.{w}" for s in ("word", "patch") for w in ("q_proj", "k_proj", "v_proj", "out_proj")]
MGCA_PARAMS.append("prototypes.weight")


@pytest.mark.parametrize(
    "name, params, owned",
    [
        ("siglip", {}, ["bias"]),
        ("sparc", {"global_loss": "siglip"}, ["global_term.bias"]),
        ("filip", {"global_loss": "siglip", "lambda_g": 0.5}, ["global_term.bias"]),
        ("pacl", {"global_loss": "siglip", "lambda_g": 0.5}, ["global_term.bias"]),
        ("gloria", {"global_loss": "siglip"}, ["global_term.bias"]),
        (
            "mgca",
            {"global_loss": "siglip"},
            ["global_term.bias", *MGCA_PARAMS],
        ),
        ("mgca", {}, MGCA_PARAMS),
    ],
)
def test_every_learnable_parameter_gets_a_gradient(name, params, owned):
    loss = make_loss(name, **params)
    set_bias(loss, -2.0)
    assert sorted(n for n, _ in loss.named_parameters()) == sorted(owned)
    loss(**make_inputs(17))["loss"].backward()
    for n, p in loss.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# ---------------------------------------------------------------------------------------------------------------
# FILIP's token dropping
# ---------------------------------------------------------------------------------------------------------------


def test_filip_token_dropping_never_drops_a_whole_caption_and_counts_exactly():
    lengths = torch.tensor([0, 1, 2, 4, 5, 6, 9, 10, 11, 20])
    mask = torch.arange(20)[None, :] < lengths[:, None]
    for seed in range(50):
        torch.manual_seed(seed)
        kept = drop_tokens(mask, 0.2)
        assert not (kept & ~mask).any()  # padding never comes back
        n_kept = kept.sum(dim=1)
        expected = lengths - torch.minimum((lengths * 0.2 + 1e-9).floor().long(), (lengths - 1).clamp_min(0))
        assert torch.equal(n_kept, expected)
        assert (n_kept[lengths > 0] >= 1).all()
    torch.manual_seed(0)
    assert torch.equal(drop_tokens(mask, 0.95).sum(dim=1), (lengths > 0).long())  # keeps exactly one
    assert torch.equal(drop_tokens(mask, 0.0), mask)


def test_filip_token_dropping_is_random_reproducible_and_off_in_eval_mode():
    mask = torch.ones(B, 10, dtype=torch.bool)
    inputs = make_inputs(18, mask=mask)
    loss = FilipLoss()
    no_drop = FilipLoss(token_drop=0.0)(**inputs)["loss"]
    torch.testing.assert_close(loss.eval()(**inputs)["loss"], no_drop, rtol=0, atol=0)
    loss.train()
    torch.manual_seed(3)
    a = loss(**inputs)["loss"]
    torch.manual_seed(3)
    b = loss(**inputs)["loss"]
    c = loss(**inputs)["loss"]
    assert float(a) == float(b)
    assert float(a) != float(no_drop) and float(c) != float(a)
    # a training step with dropping equals the reference on the kept tokens
    torch.manual_seed(3)
    kept = drop_tokens(mask, 0.2)
    ref = lists(inputs)
    close(a, ref_filip(ref["patch_embeds"], ref["token_embeds"], kept.tolist(), SCALE))
    with pytest.raises(ValueError):
        FilipLoss(token_drop=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Registration, defaults, diagnostics
# ---------------------------------------------------------------------------------------------------------------


def test_registered_with_documented_defaults():
    defaults = {
        "filip": {"lambda_g": 0.0, "lambda_f": 1.0, "token_drop": 0.2, "global_loss": "clip", "local_loss": True},
        "pacl": {"lambda_g": 0.0, "lambda_f": 1.0, "attn_scale": 1.0, "global_loss": "clip", "local_loss": True},
        "gloria": {
            "lambda_g": 1.0,
            "lambda_f": 1.0,
            "tau2": 5.0,
            "double_softmax": False,
            "tau1": 4.0,
            "global_loss": "clip",
            "local_loss": True,
        },
        "mgca": {
            "lambda_g": 1.0,
            "lambda_f": 1.0,
            "attn_dim": 128,  # embed_dim is internal: build_loss passes model.embed_dim
            "average": "caption",
            "global_loss": "clip",
            "local_loss": True,
            # MGCA's prototype alignment (its section 3.4): weight 1, 500 prototypes, tau 0.2, eps 0.05, 3 rounds
            "lambda_p": 1.0,
            "num_prototypes": 500,
            "proto_temperature": 0.2,
            "sinkhorn_epsilon": 0.05,
            "sinkhorn_iterations": 3,
        },
        "siglip": {"init_bias": -10.0},
    }
    for name, expected in defaults.items():
        entry = losses.get(name)
        assert {n: d for n, _, d in entry.parameters()} == expected, name
        assert entry.doc  # a one-line summary for `sparc components`
        with pytest.raises(Exception):
            entry.build({"lamda_g": 1.0})  # a typo is an error
    assert losses.get("sparc").config.model_fields["global_loss"].default == "clip"


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_are_scalars_with_detached_diagnostics(case):
    name, params = CASES[case]
    loss = make_loss(name, **params)
    inputs = make_inputs(19)
    inputs["patch_embeds"].requires_grad_(True)
    out = loss(**inputs)
    assert out["loss"].requires_grad
    for key in ("global_loss", "i2t_acc", "t2i_acc", "pos_logit", "neg_logit", "logit_scale"):
        assert key in out, key
    if name != "siglip":
        assert "fine_loss" in out
    for key, value in out.items():
        assert value.shape == () and value.dtype == torch.float32, key
        assert key == "loss" or not value.requires_grad, key


def test_lambda_g_zero_takes_diagnostics_from_own_logits_and_trains_no_global_term():
    inputs = make_inputs(20)
    image = inputs["image_embeds"].clone().requires_grad_(True)
    patch = inputs["patch_embeds"].clone().requires_grad_(True)
    out = FilipLoss()(**{**inputs, "image_embeds": image, "patch_embeds": patch})
    assert float(out["i2t_acc"]) == float(out["fine_i2t_acc"])
    assert float(out["t2i_acc"]) == float(out["fine_t2i_acc"])
    ref = lists(inputs)
    close(out["global_loss"], ref_clip(ref["image_embeds"], ref["text_embeds"], SCALE))  # still reported
    out["loss"].backward()
    assert image.grad is None and patch.grad is not None
    # with lambda_g > 0 they come from the global term
    out = FilipLoss(lambda_g=0.5)(**inputs)
    clip = ClipLoss()(**inputs)
    assert float(out["i2t_acc"]) == float(clip["i2t_acc"]) and float(out["pos_logit"]) == float(clip["pos_logit"])


@pytest.mark.parametrize("case", ["filip", "pacl", "gloria", "mgca", "siglip"])
def test_bf16_autocast_gives_float32_close_to_float32(case):
    name, params = CASES[case]
    loss = make_loss(name, **params)
    inputs = make_inputs(21)
    full = loss(**inputs)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = loss(**inputs)["loss"]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=1e-5, atol=1e-5)


def test_mgca_embed_dim_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="embed_dim"):
        MgcaLoss(embed_dim=D + 1)(**make_inputs(22))


def test_sparc_siglip_bias_written_under_its_earlier_name_still_loads(tmp_path):
    """SPARC's SigLIP bias was ``siglip.bias`` before SPARC shared the combined losses' ``global_term``; a
    loss.safetensors of that time loads into the same parameter, strictly, with its value."""
    from safetensors.torch import save_file

    from sparc_kit.checkpoint import load_model_weights

    path = tmp_path / "loss.safetensors"
    save_file({"siglip.bias": torch.tensor(-4.25)}, str(path))
    loss = SparcLoss(global_loss="siglip")
    load_model_weights(loss, str(path))
    assert loss.global_term.bias.item() == -4.25
