"""Evaluation: prediction and the one scoring path, protocols (the ImageNet shifts among them), the report."""

from .imagenet_shifts import SHIFTS, IncompleteShiftError, load_shift, shift_from_dataset
from .prediction import OOD_AVG, evaluate_splits, load_accuracy, predict_logits, top1_accuracy
from .protocols import EvalSet, Protocol, dataset_eval_sets, imagenet_eval_sets, shift_protocol, subsample
from .report import (
    RunResult,
    markdown_table,
    plot_effective_robustness,
    results_table,
    robustness_fit,
    summarize,
    write_report,
    write_robustness_report,
)

__all__ = [
    "OOD_AVG",
    "SHIFTS",
    "EvalSet",
    "IncompleteShiftError",
    "Protocol",
    "RunResult",
    "dataset_eval_sets",
    "evaluate_splits",
    "imagenet_eval_sets",
    "load_accuracy",
    "load_shift",
    "markdown_table",
    "plot_effective_robustness",
    "predict_logits",
    "results_table",
    "robustness_fit",
    "shift_from_dataset",
    "shift_protocol",
    "subsample",
    "summarize",
    "top1_accuracy",
    "write_report",
    "write_robustness_report",
]
