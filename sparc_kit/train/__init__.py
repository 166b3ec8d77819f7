"""Training: the loop, checkpoints and schedules."""

from sparc_kit.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from sparc_kit.train.loop import (
    NonFiniteLossError,
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
from sparc_kit.train.schedule import lr_factor

__all__ = [
    "train",
    "TrainResult",
    "NonFiniteLossError",
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
