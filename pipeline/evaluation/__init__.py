"""Evaluation stage: exact voxel AUROC / AUPRC / Dice, validation-chosen threshold, bootstrap intervals,
per-lesion detection by size, report."""

from pipeline.common import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    metrics="auroc auprc pixel_metrics",
    pooled="ScoreAccumulator",
    lesions="LesionCounter SubjectLesions pool_lesions subject_lesions",
    evaluate="compute_metrics evaluate_scores",
    report="write_report",
)
