"""Evaluation: metrics (Dice, HD95, ASSD), the few-shot protocol runner, and reports."""

from .metrics import MetricAccumulator, all_metrics, assd, confusion_counts, dice, dice_from_counts, hd95
from .protocol import CaseResult, EvalResult, Predictor, chunk_support_slices, evaluate
from .report import combine_summaries, run_evaluation, write_reports
from .tables import markdown_tables

__all__ = [
    "CaseResult", "EvalResult", "combine_summaries", "MetricAccumulator", "Predictor", "all_metrics", "assd",
    "chunk_support_slices", "confusion_counts", "dice", "dice_from_counts", "evaluate", "hd95",
    "markdown_tables", "run_evaluation", "write_reports",
]
