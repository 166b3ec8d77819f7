"""Component registries (``sparc_kit.registry``): configs derived from signatures, validation, lookup, listing.

Most tests use a fresh :class:`Registry` so the real ones stay untouched. The one that registers on the real
``losses`` registry (to check a recipe can use a new loss at once) removes it again in a fixture; there is no
unregister API, so the fixture pops ``_entries`` and bumps ``version`` itself.
"""

from __future__ import annotations

import warnings
from typing import Literal

import pytest
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

import sparc_kit  # noqa: F401  (registers the built-in components)
from sparc_kit import registry as reg
from sparc_kit.config import RecipeError, load_recipe, recipe_schema
from sparc_kit.registry import Registry, UnknownComponentError, get_registry, losses


@pytest.fixture
def toys() -> Registry:
    return Registry("toy", "things for tests")


# ----------------------------------------------------------------------------------------------------------------
# configs derived from signatures


def test_register_derives_config_from_function_signature(toys):
    @toys.register("widget")
    def make_widget(size: int, ratio: float = 0.5, mode: Literal["a", "b"] = "a", label: str | None = None):
        """A widget.

        Longer text that is not part of the summary.
        """
        return {"size": size, "ratio": ratio, "mode": mode, "label": label}

    entry = toys.get("widget")
    assert entry.kind == "toy" and entry.name == "widget" and entry.builder is make_widget
    assert entry.doc == "A widget."
    fields = entry.config.model_fields
    assert list(fields) == ["size", "ratio", "mode", "label"]
    assert fields["size"].is_required()
    assert fields["size"].annotation is int
    assert fields["ratio"].annotation is float and fields["ratio"].default == 0.5
    assert fields["mode"].default == "a"
    assert fields["label"].default is None
    assert entry.config.__name__ == "WidgetConfig"
    assert entry.parameters() == [
        ("size", "int", PydanticUndefined),
        ("ratio", "float", 0.5),
        ("mode", "Literal['a', 'b']", "a"),
        ("label", "str | None", None),
    ]
    # register returns the builder unchanged
    assert make_widget(1) == {"size": 1, "ratio": 0.5, "mode": "a", "label": None}


def test_register_class_uses_init_and_leaves_out_internal_args(toys):
    @toys.register("gadget", internal=("device", "precision"))
    class Gadget:
        """Gadget summary
        on two lines.

        Details.
        """

        def __init__(self, width: int = 8, device: str = "cpu", precision: str = "fp32", *args, **kwargs):
            self.width, self.device, self.precision = width, device, precision

    entry = toys.get("gadget")
    assert list(entry.config.model_fields) == ["width"]  # no self, internal, *args or **kwargs
    assert entry.supplied == ("device", "precision")
    assert entry.doc == "Gadget summary on two lines."
    # internal args are given by whoever builds the component, outside the validated params
    g = entry.build({"width": 3}, device="meta", precision="bf16")
    assert (g.width, g.device, g.precision) == (3, "meta", "bf16")
    g = toys.build("gadget")
    assert (g.width, g.device, g.precision) == (8, "cpu", "fp32")
    # an internal arg is not a recipe parameter
    with pytest.raises(ValidationError) as info:
        entry.build({"device": "cuda"})
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == [("extra_forbidden", ("device",))]


def test_unannotated_args_accept_anything_and_no_default_is_required(toys):
    @toys.register("loose")
    def loose(a, b=2):
        return (a, b)

    entry = toys.get("loose")
    assert entry.parameters() == [("a", "Any", PydanticUndefined), ("b", "Any", 2)]
    assert entry.build({"a": [1, "x"]}) == ([1, "x"], 2)
    with pytest.raises(ValidationError) as info:
        entry.build({})
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == [("missing", ("a",))]


def test_explicit_config_model_is_used(toys):
    class Params(BaseModel):
        n: int = 4

    @toys.register("explicit", Params)
    def explicit(n):
        return n * 10

    assert toys.get("explicit").config is Params
    assert toys.build("explicit", {"n": 2}) == 20
    assert toys.build("explicit") == 40


def test_explicit_config_must_be_a_pydantic_model(toys):
    class NotAModel:
        pass

    with pytest.raises(TypeError) as info:
        toys.register("bad", NotAModel)(lambda: None)
    assert str(info.value) == "config for toy 'bad' must be a pydantic model"
    assert "bad" not in toys


# ----------------------------------------------------------------------------------------------------------------
# Entry.build validates


@pytest.fixture
def scaler(toys):
    @toys.register("scaler")
    def scaler(factor: float = 2.0, steps: int = 1):
        return factor * steps

    return toys


def test_build_validates_and_coerces(scaler):
    assert scaler.build("scaler") == 2.0
    assert scaler.build("scaler", {"factor": 3, "steps": 4}) == 12.0
    assert scaler.build("scaler", {"steps": "5"}) == 10.0  # pydantic lax mode: "5" -> 5
    assert scaler.build("scaler", None) == 2.0


def test_build_unknown_param_is_a_validation_error(scaler):
    with pytest.raises(ValidationError) as info:
        scaler.build("scaler", {"factr": 3})
    errors = info.value.errors()
    assert [(e["type"], e["loc"], e["input"]) for e in errors] == [("extra_forbidden", ("factr",), 3)]


def test_build_wrong_type_is_a_validation_error(scaler):
    with pytest.raises(ValidationError) as info:
        scaler.build("scaler", {"steps": "many", "factor": "x"})
    errors = sorted((e["loc"], e["type"]) for e in info.value.errors())
    assert errors == [(("factor",), "float_parsing"), (("steps",), "int_parsing")]


def test_build_from_a_pydantic_model_drops_its_name(scaler):
    class Section(BaseModel):
        name: str = "scaler"
        factor: float = 1.5
        steps: int = 2

    assert scaler.build("scaler", Section()) == 3.0


def test_build_real_loss_from_recipe_section():
    r = load_recipe("sparc_tiny", ["loss.lambda_f=4", "loss.weighting=dense"])
    loss = losses.build(r.loss.name, r.loss)
    assert type(loss).__name__ == "SparcLoss"
    assert (loss.lambda_g, loss.lambda_f, loss.weighting, loss.sparsity_threshold) == (0.5, 4.0, "dense", None)


# ----------------------------------------------------------------------------------------------------------------
# lookup, listing


def test_unknown_name_error_has_did_you_mean_and_known_names(scaler):
    with pytest.raises(UnknownComponentError) as info:
        scaler.get("scalar")
    exc = info.value
    assert isinstance(exc, KeyError)
    assert (exc.kind, exc.name, exc.known) == ("toy", "scalar", ["scaler"])
    assert str(exc) == "unknown toy 'scalar'. Did you mean 'scaler'? Known: scaler"


def test_unknown_name_without_close_match_and_empty_registry(toys, scaler):
    with pytest.raises(UnknownComponentError) as info:
        scaler.build("zzz")
    assert str(info.value) == "unknown toy 'zzz'. Known: scaler"
    empty = Registry("void")
    with pytest.raises(UnknownComponentError) as info:
        empty.get("x")
    assert str(info.value) == "unknown void 'x'. Known: (none)"


def test_unknown_real_loss_message():
    with pytest.raises(UnknownComponentError) as info:
        losses.get("spark")
    assert str(info.value) == "unknown loss 'spark'. Did you mean 'sparc'? Known: clip, filip, gloria, mgca, pacl, siglip, sparc"


def test_duplicate_registration_warns_and_later_wins(toys):
    @toys.register("dup")
    def first(x: int = 1):
        return "first"

    version = toys.version
    with pytest.warns(UserWarning, match=r"^toy 'dup' is registered again \(.*second replaces .*first\)$"):

        @toys.register("dup")
        def second(y: str = "a"):
            return "second"

    assert toys.version == version + 1
    assert len(toys) == 1
    assert toys.build("dup") == "second"
    assert list(toys.get("dup").config.model_fields) == ["y"]


def test_duplicate_registration_with_override_does_not_warn(toys):
    toys.register("dup")(lambda: "first")

    def second():
        return "second"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        toys.register("dup", override=True)(second)
    assert toys.build("dup") == "second"


def test_reregistering_the_same_builder_does_not_warn(toys):
    # e.g. a module imported twice: same module and qualified name
    def factory():
        def same(x: int = 1):
            return x

        return same

    toys.register("same")(factory())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        toys.register("same")(factory())
    assert toys.build("same", {"x": 5}) == 5


def test_names_sorted_glob_contains_len_repr(toys):
    for name in ("vit_b", "vit_s", "resnet", "convnext"):
        toys.register(name)(lambda: None)
    assert toys.names() == ["convnext", "resnet", "vit_b", "vit_s"]
    assert toys.names("vit_*") == ["vit_b", "vit_s"]
    assert toys.names("*n*") == ["convnext", "resnet"]
    assert toys.names("nothing*") == []
    assert [e.name for e in toys.entries()] == ["convnext", "resnet", "vit_b", "vit_s"]
    assert "resnet" in toys and "vit" not in toys
    assert len(toys) == 4
    assert repr(toys) == "Registry('toy', ['convnext', 'resnet', 'vit_b', 'vit_s'])"


def test_version_bumps_on_each_registration(toys):
    assert toys.version == 0
    toys.register("a")(lambda: None)
    toys.register("b")(lambda: None)
    assert toys.version == 2


# ----------------------------------------------------------------------------------------------------------------
# the real registries


def test_kinds_and_builtin_names():
    assert reg.kinds() == [
        "vision_encoder", "text_encoder", "pooler", "loss", "dataset", "engine", "attention", "evaluator", "logger"
    ]
    assert losses.names() == ["clip", "filip", "gloria", "mgca", "pacl", "siglip", "sparc"]
    assert reg.vision_encoders.names() == ["timm", "vit"]
    assert reg.poolers.names() == ["attention", "cls", "last", "max", "mean"]
    assert reg.datasets.names() == ["manifest", "synthetic", "webdataset"]
    assert reg.engines.names() == ["ddp", "deepspeed", "local"]
    assert reg.attention_backends.names() == ["auto", "math", "matmul", "sdpa", "xformers"]
    assert reg.evaluators.names() == ["retrieval", "segmentation", "zeroshot"]
    assert reg.loggers.names() == ["jsonl", "tensorboard", "wandb"]


@pytest.mark.parametrize(
    "spelling, kind",
    [
        ("loss", "loss"),
        ("losses", "loss"),
        ("datasets", "dataset"),
        ("vision_encoder", "vision_encoder"),
        ("vision_encoders", "vision_encoder"),
        ("vision-encoder", "vision_encoder"),
        ("vision-encoders", "vision_encoder"),
        ("poolers", "pooler"),
        ("attentions", "attention"),
    ],
)
def test_get_registry_accepts_plurals_and_dashes(spelling, kind):
    assert get_registry(spelling) is reg._REGISTRIES[kind]
    assert get_registry(spelling).kind == kind


def test_get_registry_unknown_kind():
    with pytest.raises(UnknownComponentError) as info:
        get_registry("nonsense")
    assert str(info.value) == (
        "unknown component kind 'nonsense'. Known: vision_encoder, text_encoder, pooler, loss, dataset, engine, "
        "attention, evaluator, logger"
    )
    with pytest.raises(UnknownComponentError) as info:
        get_registry("los")
    assert "Did you mean 'loss'?" in str(info.value)


@pytest.fixture
def register_loss():
    """Register losses on the real registry for one test, then remove them (there is no unregister API)."""
    added: list[str] = []

    def register(name, builder, **kwargs):
        assert name not in losses
        losses.register(name, **kwargs)(builder)
        added.append(name)
        return builder

    try:
        yield register
    finally:
        for name in added:
            _unregister_loss(name)


def _unregister_loss(name: str) -> None:
    losses._entries.pop(name, None)
    losses.version += 1  # so the cached recipe schema is rebuilt without it


class FocalTestLoss:
    """A focal-style loss that exists only in this test."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, local_loss: bool = True):
        self.gamma, self.alpha, self.local_loss = gamma, alpha, local_loss


def test_new_loss_is_usable_from_a_recipe_at_once(register_loss):
    schema_before = recipe_schema()
    register_loss("focal_test", FocalTestLoss)
    assert recipe_schema() is not schema_before  # rebuilt for the new registry version

    r = load_recipe("sparc_tiny", ["loss.name=focal_test", "loss.gamma=3"])
    assert r.loss.model_dump() == {"name": "focal_test", "gamma": 3.0, "alpha": None, "local_loss": True}
    built = losses.build(r.loss.name, r.loss)
    assert isinstance(built, FocalTestLoss) and built.gamma == 3.0

    with pytest.raises(RecipeError) as info:
        load_recipe("sparc_tiny", ["loss.name=focal_test", "loss.gama=3"])
    assert info.value.problems == [
        "loss.gama: unknown key (value 3). Did you mean 'gamma'? Accepted keys: gamma, alpha, local_loss."
    ]
    with pytest.raises(RecipeError) as info:
        load_recipe("sparc_tiny", ["loss.name=focal"])
    assert info.value.problems == [
        "loss.name: unknown loss 'focal'. Did you mean 'focal_test'? Known: clip, filip, focal_test, gloria, mgca, pacl, siglip, sparc"
    ]


def test_removed_loss_is_gone_from_recipes(register_loss):
    register_loss("focal_test", FocalTestLoss)
    assert load_recipe("sparc_tiny", ["loss.name=focal_test"]).loss.gamma == 2.0
    _unregister_loss("focal_test")
    assert "focal_test" not in losses
    with pytest.raises(RecipeError) as info:
        load_recipe("sparc_tiny", ["loss.name=focal_test"])
    assert info.value.problems == [
        "loss.name: unknown loss 'focal_test'. Known: clip, filip, gloria, mgca, pacl, siglip, sparc. Your own loss? "
        "Load the module that registers it: sparc --plugin FILE.py or MODULE (in Python: import it)"
    ]


def test_a_new_component_is_one_new_file_in_its_package(tmp_path, monkeypatch):
    """A component package ends its ``__init__`` with ``import_submodules(__name__, __path__)``: a module dropped
    into the folder registers its component with no other edit; a ``_private`` module is not imported."""
    import importlib
    import sys

    from sparc_kit.registry import Registry

    package = tmp_path / "toy_components"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from sparc_kit.registry import import_submodules\nimport_submodules(__name__, __path__)\n"
    )
    (package / "halver.py").write_text(
        "from tests_toy_registry import toys\n\n@toys.register('halver')\ndef halver(x: float = 1.0):\n"
        "    return x / 2\n"
    )
    (package / "_draft.py").write_text("raise RuntimeError('a private module is not imported')\n")
    toys = Registry("toy")
    holder = type(sys)("tests_toy_registry")
    holder.toys = toys
    monkeypatch.setitem(sys.modules, "tests_toy_registry", holder)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert toys.names() == []
    importlib.import_module("toy_components")
    assert toys.names() == ["halver"] and toys.build("halver", {"x": 3.0}) == 1.5
    for name in [m for m in sys.modules if m.startswith("toy_components")]:
        monkeypatch.delitem(sys.modules, name)


def test_every_built_in_component_module_is_imported_by_its_package():
    """The built-in packages use the same mechanism: each of their modules is loaded once the package is."""
    import pkgutil
    import sys

    import sparc_kit

    for package in ("data", "models", "losses", "engines", "evaluate"):
        module = getattr(sparc_kit, package)
        names = [i.name for i in pkgutil.iter_modules(module.__path__) if not i.name.startswith("_")]
        assert names and all(f"sparc_kit.{package}.{n}" in sys.modules for n in names), package


def test_the_eval_section_is_built_from_the_evaluator_registry():
    """``eval:`` entries are a union keyed on ``task`` over the registered evaluators, as ``loss:`` is over the
    losses: an evaluator registered with an options model of its own is a valid task with its own fields at once,
    and an unknown task is one line naming the registered ones."""
    from pydantic import Field

    from sparc_kit import RecipeError, load_recipe
    from sparc_kit.evaluate.spec import TASK_ARGS, EvalConfig, eval_entry
    from sparc_kit.registry import evaluators

    class CountOptions(EvalConfig):
        limit: int = Field(3, gt=0)

    @evaluators.register("count_images", config=CountOptions, supplied=TASK_ARGS, override=True)
    def count_images(model, tokenizer, spec, transform=None):
        return {"n": spec.limit}, {}

    try:
        recipe = load_recipe("sparc_tiny", ["eval=[{task: count_images, data: x.tar, limit: 7}]"])
        assert type(recipe.eval[0]).__name__ == "eval.count_images" and recipe.eval[0].limit == 7
        assert eval_entry({"task": "count_images", "data": "x.tar"}).limit == 3
        with pytest.raises(RecipeError) as info:
            load_recipe("sparc_tiny", ["eval=[{task: count_images, data: x.tar, limit: 0}]"])
        assert info.value.problems == ["eval.0.limit: got 0; input should be greater than 0"]
        with pytest.raises(RecipeError) as info:
            load_recipe("sparc_tiny", ["eval=[{task: zeroshot, data: x.tar, limit: 7}]"])  # not a zeroshot option
        assert info.value.problems[0].startswith("eval.0.limit: unknown key")
        with pytest.raises(RecipeError) as info:
            load_recipe("sparc_tiny", ["eval=[{task: count_image, data: x.tar}]"])
        assert info.value.problems == [
            "eval.0.task: unknown evaluation task 'count_image'. Did you mean 'count_images'? Known: count_images, "
            "retrieval, segmentation, zeroshot"
        ]
    finally:
        evaluators._entries.pop("count_images", None)
        evaluators.version += 1
