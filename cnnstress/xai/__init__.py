"""Explanations and the checks that decide whether to trust them.

* metric         the Metric contract: explain_func / similarity_func callables, declared direction
* cam            Grad-CAM and Grad-CAM++ maps
* similarity     scores comparing two maps (Spearman, SSIM)
* randomisation  the model-parameter randomisation (sanity) check
* faithfulness   deletion / insertion curves and their AUCs
* label_errors   confident learning: test images whose label looks wrong, label-quality scores
* label_review   ground truth: a human review of 275 test labels (54 errors), order check, triage
* checks         the explanation stage's computations over all of the above
"""
from .cam import (CAM_METHODS, CamExplainer, CamResult, GradCAM, GradCAMError, GradCAMPlusPlus, cam_explain_func,
                  get_layer, overlay)
from .checks import drift_report, faithfulness_report, label_suspects, sanity_report
from .faithfulness import (Deletion, FaithfulnessError, FaithfulnessResult, Insertion, PixelPerturbation,
                           deletion_insertion, random_maps)
from .label_errors import find_label_issues, label_quality_scores
from .label_review import (FlagScore, GroundTruthTriage, OrderCheck, PrecisionAtK, Ratio, ReviewEntry,
                           applicable_review, check_order, flag_scores, load_review, official_test_labels,
                           parse_official_labels, parse_review, precision_at_k, review_note, review_verdict,
                           source_line, triage)
from .metric import ExplainFunc, Metric, SimilarityFunc
from .randomisation import (ParameterRandomisation, RandomisationResult, SanityError, SanityResult,
                            cascading_randomization, verdict, verdict_word)
from .similarity import abs_spearman, spearman, ssim

__all__ = [
    "CAM_METHODS", "CamExplainer", "CamResult", "Deletion", "ExplainFunc", "FaithfulnessError", "FaithfulnessResult",
    "GradCAM", "GradCAMError", "GradCAMPlusPlus", "Insertion", "Metric", "ParameterRandomisation",
    "PixelPerturbation", "RandomisationResult", "SanityError", "SanityResult", "SimilarityFunc", "abs_spearman",
    "cam_explain_func", "cascading_randomization", "deletion_insertion", "drift_report",
    "faithfulness_report", "find_label_issues", "get_layer", "label_suspects", "overlay", "random_maps",
    "sanity_report", "spearman", "ssim", "verdict", "verdict_word",
    # ground truth (label_review)
    "FlagScore", "GroundTruthTriage", "OrderCheck", "PrecisionAtK", "Ratio", "ReviewEntry", "applicable_review",
    "check_order", "flag_scores", "label_quality_scores", "load_review", "official_test_labels",
    "parse_official_labels", "parse_review", "precision_at_k", "review_note", "review_verdict", "source_line",
    "triage",
]
