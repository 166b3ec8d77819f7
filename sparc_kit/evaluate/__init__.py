"""Evaluations that show learning: zero-shot classification, image-text retrieval and zero-shot segmentation
(paper section 4), and the alignment heat maps of one image and caption.

    from sparc_kit.pretrained import load_pretrained
    from sparc_kit.evaluate import EvalConfig, run_evaluations

    pretrained = load_pretrained("runs/sparc_tiny")
    results = run_evaluations(pretrained, [EvalConfig(task="zeroshot", data="cifar10/test-000.tar")])

Building blocks: :func:`zeroshot_classifier` / :func:`zeroshot_evaluate`, :func:`retrieval_metrics` /
:func:`retrieval_evaluate`, :func:`segmentation_evaluate`, :func:`alignment_maps` / :func:`write_heatmaps`, the readers in :mod:`sparc_kit.evaluate.data`, and :func:`evaluate_during_training`
for the training loop. :class:`EvalOptions` is what every entry of a recipe's ``eval:`` list extends (:class:`EvalConfig` for the
prompted evaluators); :func:`eval_entry` validates one by its task.
"""

from sparc_kit.evaluate.data import EvalDataError, iter_labelled_images, load_classnames, load_retrieval_set
from sparc_kit.evaluate.heatmaps import HeatMaps, alignment_maps, write_heatmaps
from sparc_kit.evaluate.retrieval import retrieval_evaluate, retrieval_metrics, retrieval_ranks
from sparc_kit.evaluate.runner import (
    check_eval_data,
    EvalResult,
    EvalTaskError,
    build_eval_specs,
    check_task,
    evaluate_during_training,
    result_rows,
    run_evaluations,
    run_task,
)
from sparc_kit.evaluate.segmentation import SegmentationConfig, segmentation_evaluate
from sparc_kit.evaluate.spec import AVAILABLE_TASKS, PLANNED_TASKS, TASK_ARGS, EvalConfig, EvalOptions, eval_entry
from sparc_kit.evaluate.zeroshot import (
    CLIP_TEMPLATES,
    LABEL_ONLY,
    TEMPLATE_SETS,
    resolve_templates,
    zeroshot_classifier,
    zeroshot_evaluate,
)
from sparc_kit.registry import import_submodules

__all__ = [
    "check_eval_data",
    "EvalConfig",
    "EvalOptions",
    "HeatMaps",
    "SegmentationConfig",
    "segmentation_evaluate",
    "alignment_maps",
    "write_heatmaps",
    "eval_entry",
    "TASK_ARGS",
    "AVAILABLE_TASKS",
    "PLANNED_TASKS",
    "EvalResult",
    "EvalTaskError",
    "EvalDataError",
    "run_evaluations",
    "run_task",
    "evaluate_during_training",
    "build_eval_specs",
    "check_task",
    "result_rows",
    "zeroshot_classifier",
    "zeroshot_evaluate",
    "resolve_templates",
    "LABEL_ONLY",
    "CLIP_TEMPLATES",
    "TEMPLATE_SETS",
    "retrieval_metrics",
    "retrieval_ranks",
    "retrieval_evaluate",
    "iter_labelled_images",
    "load_classnames",
    "load_retrieval_set",
]


import_submodules(__name__, __path__)  # every module registers its components: a new one is one new file
