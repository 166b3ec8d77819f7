"""Losses: functional forms and registered modules.

``clip_loss`` and ``sparc_fine_grained_loss`` are the equations; ``ClipLoss`` and ``SparcLoss`` are what recipes
build (``loss: {name: sparc, lambda_f: 1.0}``). The paper's other objectives are registered beside them: the
global ``siglip`` (``SigLipLoss``) and the fine-grained baselines ``filip``, ``pacl``, ``gloria`` and ``mgca``
(``FilipLoss``, ``PaclLoss``, ``GloriaLoss``, ``MgcaLoss``), each ``lambda_g * global + lambda_f * own term``.
Every module is called with the model's output dict (``loss_fn(**model_out)``) and returns a dict whose ``loss``
entry is optimised; the rest are diagnostics.
"""

from sparc_kit.errors import require_recipe
from sparc_kit.losses.functional import (
    clip_loss,
    contrastive_accuracy,
    masked_pairwise_contrastive_loss,
    sparc_alignment_weights,
    sparc_fine_grained_loss,
    symmetric_cross_entropy,
)
from sparc_kit.losses.filip import FilipLoss
from sparc_kit.losses.gloria import GloriaLoss
from sparc_kit.losses.global_losses import ClipLoss, GlobalPlusFineLoss, SigLipLoss
from sparc_kit.losses.mgca import MgcaLoss
from sparc_kit.losses.pacl import PaclLoss
from sparc_kit.losses.sparc import SparcLoss
from sparc_kit.registry import import_submodules, losses

__all__ = [
    "build_loss",
    "clip_loss",
    "contrastive_accuracy",
    "masked_pairwise_contrastive_loss",
    "sparc_alignment_weights",
    "sparc_fine_grained_loss",
    "symmetric_cross_entropy",
    "ClipLoss",
    "SigLipLoss",
    "SparcLoss",
    "FilipLoss",
    "PaclLoss",
    "GloriaLoss",
    "MgcaLoss",
    "GlobalPlusFineLoss",
]


def build_loss(recipe):
    """Build the loss a validated recipe describes (:func:`sparc_kit.load_recipe`); a
    loss that sizes parameters by the embedding width (``embed_dim`` among its filled-in arguments) is told
    ``model.embed_dim``."""
    require_recipe(recipe, "build_loss")
    entry = losses.get(recipe.loss.name)
    return entry.build(recipe.loss, offer={"embed_dim": recipe.model.embed_dim})


import_submodules(__name__, __path__)  # every module registers its components: a new one is one new file
