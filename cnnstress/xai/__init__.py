"""Explanations and the checks that decide whether to trust them.

* cam            Grad-CAM and Grad-CAM++ maps
* similarity     scores comparing two maps (Spearman, SSIM)
* randomisation  the model-parameter randomisation (sanity) check
* faithfulness   deletion / insertion curves and their AUCs
* label_errors   confident learning: test images whose label looks wrong
* checks         the explanation stage's computations over all of the above
"""
from .cam import CAM_METHODS, CamExplainer, CamResult, GradCAM, GradCAMError, GradCAMPlusPlus, get_layer, overlay
from .checks import cam_maps, drift_report, faithfulness_report, label_suspects, sanity_report
from .faithfulness import FaithfulnessError, FaithfulnessResult, deletion_insertion, random_maps
from .label_errors import find_label_issues
from .randomisation import SanityError, SanityResult, cascading_randomization, verdict, verdict_word
from .similarity import spearman, ssim

__all__ = [
    "CAM_METHODS", "CamExplainer", "CamResult", "FaithfulnessError", "FaithfulnessResult", "GradCAM", "GradCAMError",
    "GradCAMPlusPlus", "SanityError", "SanityResult", "cam_maps", "cascading_randomization", "deletion_insertion",
    "drift_report", "faithfulness_report", "find_label_issues", "get_layer", "label_suspects", "overlay",
    "random_maps", "sanity_report", "spearman", "ssim", "verdict", "verdict_word",
]
