"""sparc-kit: fine-grained image-text pretraining with SPARC and its baselines.

    import sparc_kit
    recipe = sparc_kit.load_recipe("recipes/sparc_tiny.yaml", overrides=["train.steps=50"])
    model = sparc_kit.build_model(recipe)
    loss_fn = sparc_kit.build_loss(recipe)      # called as loss_fn(**model(images, token_ids))
    dataset = sparc_kit.build_dataset(recipe)

    # open_clip's shape, for a trained run (or a recipe: fresh weights)
    model, train_transform, eval_transform = sparc_kit.create_model_and_transforms("runs/sparc_tiny")
    tokenizer = sparc_kit.get_tokenizer("runs/sparc_tiny")  # texts -> token ids [N, context_length]

A component of your own registers itself where it is defined (``@sparc_kit.registry.losses.register("my_loss")``);
:func:`load_plugin` imports such a module by file or module name, as ``sparc --plugin`` does.
"""

from sparc_kit import registry
from sparc_kit import data, engines, evaluate, losses, models  # noqa: F401  (import registers the built-in components)
from sparc_kit.config import RecipeError, builtin_recipes, dump_recipe, load_recipe, recipe_schema
from sparc_kit.data import build_dataset
from sparc_kit.losses import build_loss
from sparc_kit.models import build_model
from sparc_kit.plugins import PluginError, load_plugin
from sparc_kit.pretrained import load_pretrained
from sparc_kit.api import create_model_and_transforms, get_tokenizer, list_recipes

__version__ = "0.1.0"

__all__ = [
    "registry",
    "losses",
    "models",
    "data",
    "engines",
    "evaluate",
    "load_recipe",
    "recipe_schema",
    "dump_recipe",
    "builtin_recipes",
    "RecipeError",
    "build_model",
    "build_loss",
    "build_dataset",
    "load_pretrained",
    "create_model_and_transforms",
    "get_tokenizer",
    "list_recipes",
    "load_plugin",
    "PluginError",
    "__version__",
]
