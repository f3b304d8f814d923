"""Suite reports: Markdown, JSON and plots (matplotlib, Agg) comparing the experiments of a suite.

``build`` holds the pure parts (figures, Markdown, environment/version capture); the stage that reads the
pipeline's outputs and writes the report files is :func:`wsss_core.stages.report.report`.
"""

from .build import (
    MEAN_CONVENTIONS,
    figure_png_bytes,
    git_state,
    package_versions,
    plot_per_class_iou,
    plot_qualitative,
    plot_threshold_curves,
    plot_training,
    render_markdown,
)

__all__ = [
    "MEAN_CONVENTIONS",
    "figure_png_bytes",
    "git_state",
    "package_versions",
    "plot_per_class_iou",
    "plot_qualitative",
    "plot_threshold_curves",
    "plot_training",
    "render_markdown",
]
