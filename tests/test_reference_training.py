"""The training loop against an independent reference, and the data it trains on against an independent decode.

The reference below is written from the equations (docs/architecture.md, the SPARC paper's eqs. 1-7) and from
the definitions of AdamW, the warm-up + cosine schedule and global-norm clipping. It calls none of the project's
loop, losses, schedule, optimizer or poolers: from the project it takes only the towers and linear layers (their
modules, called one by one) and the initial weights. Fed the batches ``sparc train`` fed its model, it must give
the loss the loop logged at every one of 20 steps, so that a difference in learning between sparc-kit and a
hand-written trainer can only come from a recipe choice, never from a slip in the loop.
"""

from __future__ import annotations

import copy
import io
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from sparc_kit.config import load_recipe
from sparc_kit.models.dual_encoder import DualEncoder
from sparc_kit.train import train

END_ID, PAD_ID = 3, 0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Recorder:
    """Every batch a DualEncoder is called with during training, and the weights before the first call."""

    def __init__(self):
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] | None = None

    def __call__(self, module, args):
        if not isinstance(module, DualEncoder):
            return
        if self.initial is None:
            self.initial = copy.deepcopy(module.state_dict())
        images, ids, mask = args
        self.batches.append((images.detach().clone(), ids.detach().clone(), mask.detach().clone()))

    def train(self, recipe, out):
        losses: dict[int, float] = {}
        handle = torch.nn.modules.module.register_module_forward_pre_hook(self)
        try:
            train(recipe, str(out), progress=False, callback=lambda step, values: losses.__setitem__(step, values["loss"]))
        finally:
            handle.remove()
        return losses


# ------------------------------------------------------------------------------------------- the reference
def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows (eq. 1): cosine similarities times the scale, log-softmax by hand."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    logits = scale * a @ b.T
    idx = torch.arange(len(a))
    i2t = -(logits - logits.logsumexp(dim=1, keepdim=True))[idx, idx].mean()
    t2i = -(logits - logits.logsumexp(dim=0, keepdim=True))[idx, idx].mean()
    return (i2t + t2i) / 2


def sparc_fine(v: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eqs. 2-6 one pair at a time, averaged over all real tokens of the batch (the pseudo-code's average)."""
    total, count = 0.0, 0
    for i in range(len(v)):
        ti = t[i][mask[i]]  # [L_i, D] the caption's real tokens
        if len(ti) == 0:
            continue
        vi = v[i]  # [P, D]
        s = ti @ vi.T  # [L_i, P] raw inner products
        lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
        a = (s - lo) / (hi - lo)  # eq. 2
        a = torch.where(a >= 1.0 / vi.shape[0], a, torch.zeros_like(a))  # eq. 3, sigma = 1/P
        a = a / a.sum(dim=1, keepdim=True)  # eq. 4
        c = a @ vi  # eq. 5
        c = c / c.norm(dim=-1, keepdim=True)
        tn = ti / ti.norm(dim=-1, keepdim=True)
        logits = scale * c @ tn.T  # [L_i, L_i]: grouped j against token k
        idx = torch.arange(len(ti))
        c2t = -(logits - logits.logsumexp(dim=1, keepdim=True))[idx, idx]
        t2c = -(logits - logits.logsumexp(dim=0, keepdim=True))[idx, idx]
        total = total + 0.5 * (c2t + t2c).sum()
        count += len(ti)
    return total / count


def reference_loss(model: DualEncoder, recipe, images, ids, mask) -> torch.Tensor:
    feats = model.vision.forward_features(images)
    patches = feats["patch_tokens"]  # [B, P, Wv]
    image_global = model.vision_adapter(model.image_global_head(patches.mean(dim=1)))
    tokens = model.text(ids, mask)  # [B, L, Wt], the tower attends to every real token
    words = mask & (ids != END_ID) if recipe.model.text_end_token == "exclude" else mask
    t = model.text_adapter(tokens)  # [B, L, E]
    text_global = model.text_adapter((tokens * words[..., None]).sum(1) / words.sum(1, keepdim=True))
    scale = model.log_logit_scale.exp()
    global_loss = info_nce(image_global, text_global, scale)
    if recipe.loss.name == "clip":
        return global_loss
    v = model.vision_adapter(patches)
    return recipe.loss.lambda_g * global_loss + recipe.loss.lambda_f * sparc_fine(v, t, words, scale)


def reference_training(recipe, initial, batches) -> list[float]:
    """AdamW (decoupled decay on matrices only), warm-up + cosine, global-norm clipping, temperature clamp."""
    from sparc_kit.models import build_model  # the towers only; every step below is written out here

    model = build_model(recipe)
    model.load_state_dict(initial)
    model.train()
    o = recipe.optim
    beta1, beta2 = o.betas
    params = dict(model.named_parameters())
    decays = {n: p.ndim >= 2 for n, p in params.items()}  # matrices; not biases, norms, the temperature
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    steps = recipe.train.steps
    losses = []
    for k, (images, ids, mask) in enumerate(batches):
        if k < o.warmup_steps:
            lr = o.lr * (k + 1) / o.warmup_steps
        else:
            progress = (k - o.warmup_steps) / (steps - o.warmup_steps)
            lr = o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        loss = reference_loss(model, recipe, images, ids, mask)
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads)}
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        clip = 1.0 if o.grad_clip is None else min(1.0, o.grad_clip / (norm + 1e-6))
        t = k + 1
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n] * clip
                m[n] = beta1 * m[n] + (1 - beta1) * g
                v[n] = beta2 * v[n] + (1 - beta2) * g * g
                m_hat = m[n] / (1 - beta1**t)
                v_hat = v[n] / (1 - beta2**t)
                if decays[n]:
                    p -= lr * o.weight_decay * p
                p -= lr * m_hat / (v_hat.sqrt() + o.eps)
            model.log_logit_scale.clamp_(0.0, math.log(recipe.model.max_logit_scale))
    return losses


TINY = [
    "train.steps=20", "train.batch_size=12", "train.log_every=5", "train.checkpoint_every=20",
    "model.embed_dim=16", "model.vision.image_size=16", "model.vision.patch_size=4", "model.vision.width=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.text.width=32", "model.text.depth=1",
    "model.text.heads=2", "tokenizer.vocab_size=128", "data.num_samples=240", "optim.warmup_steps=5",
    "optim.lr=3e-3", "optim.weight_decay=0.2", "optim.min_lr_ratio=0.1",
]


@pytest.mark.parametrize("loss", ["clip", "sparc"])
@pytest.mark.parametrize("choices", [
    ["optim.grad_clip=0.5", "model.text_end_token=include"],  # clipping active on every step
    ["optim.grad_clip=null", "model.text_end_token=exclude"],
])
def test_loop_matches_an_independent_reference_for_20_steps(tmp_path, loss, choices):
    recipe = load_recipe(f"{loss}_tiny", [*TINY, *choices])
    recorder = Recorder()
    logged = recorder.train(recipe, tmp_path / "run")
    assert len(recorder.batches) == 20 and sorted(logged) == list(range(1, 21))
    ours = [logged[s] for s in range(1, 21)]
    theirs = reference_training(recipe, recorder.initial, recorder.batches)
    assert theirs[-1] < 0.95 * theirs[0]  # the comparison spans learning, not a plateau
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst <= 1e-5, f"worst loss difference {worst:.2e} over 20 steps"


def test_the_reference_tells_a_slip_apart(tmp_path):
    """The parity above is not vacuous: one changed choice (no clipping) gives losses the reference rejects."""
    recipe = load_recipe("clip_tiny", [*TINY, "optim.grad_clip=0.5"])
    recorder = Recorder()
    logged = recorder.train(recipe, tmp_path / "run")
    other = recipe.model_copy(update={"optim": recipe.optim.model_copy(update={"grad_clip": None})})
    theirs = reference_training(other, recorder.initial, recorder.batches)
    assert max(abs(logged[s] - theirs[s - 1]) for s in range(1, 21)) > 1e-3


# ------------------------------------------------------------------------------------------- the data path
def independent_decode(shard_paths, tokenizer_model: str, context_length: int):
    """Every sample of the shards, read with tarfile, PIL and sentencepiece alone: {image bytes: token ids}."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    samples = {}
    for path in shard_paths:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for key, files in members.items():
            rgb = np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB"), dtype=np.float32) / 255.0
            image = (torch.from_numpy(rgb).permute(2, 0, 1) - mean) / std
            ids = sp.encode(files["txt"].decode("utf-8").lower())[: context_length - 1] + [END_ID]
            row = torch.full((context_length,), PAD_ID, dtype=torch.long)
            row[: len(ids)] = torch.tensor(ids)
            samples[key] = (image, row)
    return samples


def test_the_loop_trains_on_an_independent_decode_of_the_samples_in_their_pairing(tmp_path, datagen):
    pattern, _ = datagen.shards(tmp_path / "shards", n_shards=2, per_shard=18, size=16)
    shards = [tmp_path / "shards" / f"train-{s:03d}.tar" for s in range(2)]
    recipe = load_recipe("sparc_tiny", [
        *TINY, "train.steps=3", "train.checkpoint_every=3", "data={name: webdataset, urls: '%s', length: 36, "
        "shuffle_buffer: 16}" % pattern,
    ])
    recorder = Recorder()
    recorder.train(recipe, tmp_path / "run")
    decoded = independent_decode(shards, str(tmp_path / "run" / "tokenizer.model"), recipe.tokenizer.context_length)
    seen = set()
    for images, ids, mask in recorder.batches:
        assert torch.equal(mask, ids != PAD_ID)
        for image, row in zip(images, ids):
            matches = [k for k, (img, _) in decoded.items() if torch.allclose(img, image, rtol=0, atol=1e-6)]
            assert len(matches) == 1, "a trained image is not exactly one decoded sample"
            key = matches[0]
            reference = decoded[key][1]  # padded to the context; the step cuts to the batch's longest (pad_to)
            assert torch.equal(row, reference[: len(row)]), f"{key}: token ids differ from its own caption's"
            assert bool((reference[len(row):] == PAD_ID).all()), f"{key}: the cut dropped real tokens"
            assert key not in seen, f"{key} trained twice within the first epoch"
            seen.add(key)
    assert len(seen) == 36  # three steps of 12 = the whole epoch, each sample once
