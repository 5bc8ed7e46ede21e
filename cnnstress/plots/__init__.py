"""Figures shared by the notebook and the report: one module per stage over
one style module (palette, font sizes, axes helpers, the CAM overlay) and one
for the files (cnnstress.plots.files: a figure is redrawn only when what it
is drawn from changed).

Every plot function draws into the caller's `ax` / `axes` when given and
returns the Figure. The names public in the former single module plots.py
are re-exported here, so `from cnnstress.plots import plot_x` keeps working;
the axes helpers (new_axes, style_axes, ...) live in cnnstress.plots.style.
"""
from .comparison import FAILURE_GROUPS, plot_confusion_matrices, plot_confusion_matrix, plot_model_comparison
from .explanations import (METHOD_COLORS, METHOD_LABELS, METHOD_STYLES, plot_cam_methods, plot_faithfulness,
                           plot_label_suspects, plot_sanity_check)
from .failures import plot_failure_case, plot_no_failures
from .label_review import plot_confirmed_label_errors, plot_precision_at_k
from .stress import plot_adversarial, plot_corruption_examples, plot_reliability_diagram, plot_robustness
from .style import (BASELINE_COLOR, CAM_COLORMAP, CONFUSION_COLORMAP, DIFFERENCE_COLORMAP, EXTRA_MODEL_COLORS,
                    IMPROVED_COLOR, LABEL_SIZE, MODEL_COLORS, OKABE_ITO, OTHER_CLASS_COLOR, ROBUSTNESS_COLORMAP,
                    TEXT_SIZE, TICK_SIZE, TITLE_SIZE, TRUE_CLASS_COLOR, close, model_color)
from .files import FigureSpec, save_figure, write_figure
from .training import plot_samples, plot_training_curves

__all__ = [
    "BASELINE_COLOR", "CAM_COLORMAP", "CONFUSION_COLORMAP", "DIFFERENCE_COLORMAP", "EXTRA_MODEL_COLORS",
    "FAILURE_GROUPS", "FigureSpec", "IMPROVED_COLOR", "LABEL_SIZE", "METHOD_COLORS", "METHOD_LABELS", "METHOD_STYLES",
    "MODEL_COLORS", "OKABE_ITO", "OTHER_CLASS_COLOR", "ROBUSTNESS_COLORMAP", "TEXT_SIZE", "TICK_SIZE",
    "TITLE_SIZE", "TRUE_CLASS_COLOR", "close", "model_color", "plot_adversarial", "plot_cam_methods",
    "plot_confirmed_label_errors", "plot_confusion_matrices", "plot_confusion_matrix", "plot_corruption_examples", "plot_failure_case",
    "plot_faithfulness", "plot_label_suspects", "plot_model_comparison", "plot_no_failures", "plot_precision_at_k",
    "plot_reliability_diagram", "plot_robustness", "plot_samples", "plot_sanity_check", "plot_training_curves", "save_figure",
    "write_figure",
]
