"""Training: the loop, checkpoints and schedules."""

from sparc_kit.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_train_checkpoint,
)
from sparc_kit.train.loop import (
    ResumeMismatchError,
    RunFolderBusyError,
    TooManyBadSamplesError,
    TrainingInterrupted,
    TrainResult,
    build_loss,
    build_tokenizer,
    read_metrics,
    train,
)
from sparc_kit.train.module import TrainModule
from sparc_kit.train.schedule import lr_factor
from sparc_kit.train.state import TrainState
from sparc_kit.train.step import NonFiniteGradientError, NonFiniteLossError, StepResult, compute_gradients, train_step

__all__ = [
    "train",
    "train_step",
    "compute_gradients",
    "StepResult",
    "TrainModule",
    "TrainState",
    "save_train_checkpoint",
    "TrainResult",
    "NonFiniteLossError",
    "NonFiniteGradientError",
    "ResumeMismatchError",
    "RunFolderBusyError",
    "TooManyBadSamplesError",
    "TrainingInterrupted",
    "build_loss",
    "build_tokenizer",
    "read_metrics",
    "lr_factor",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "load_model_weights",
]
