"""hf_cfft: counterfactual fine-tuning of CLIP-family image encoders (Xiao et al., CVPR 2023) on Hugging Face.

Supported towers: CLIP, MetaCLIP 2, SigLIP and the fixed-resolution SigLIP 2 (`hf_cfft.families`).
"""

from .baselines import FlypTrainer, greedy_soup, uniform_soup, wise_ft
from .callbacks import CounterfactualImagesCallback
from .cam import CAM_METHODS, attention_rollout, compute_cam, grad_cam, normalize_cam
from .classifier_loading import classifier_from_clip, classifier_from_pretrained, is_cfft_checkpoint, load_classifier
from .config import CfftConfig
from .data import (
    CounterfactualCollator,
    CounterfactualTransform,
    precompute_cams,
    prepare_train_dataset,
    preprocess_images,
)
from .evaluation import evaluate_splits, predict_logits
from .families import FAMILIES
from .losses import counterfactual_loss, feature_distillation_loss, logit_distillation_loss
from .masking import FILL_KINDS, MASK_KINDS, cam_patch_mask, make_counterfactuals, random_patch_mask, refill
from .modeling import (
    CfftClassifierConfig,
    CfftClassifierOutput,
    CfftImageClassifier,
    ClipCfftConfig,
    ClipCfftForImageClassification,
    ClipCfftOutput,
)
from .release import push_model_dir, render_model_card, write_model_card
from .trainer import CfftTrainer
from .training.run_folder import latest_complete_checkpoint, resolve_resume_checkpoint
from .visualize import counterfactual_grid
from .zeroshot import build_zeroshot_head, build_zeroshot_weights, load_class_names, load_templates

__version__ = "0.1.0"

__all__ = [
    "CAM_METHODS",
    "FAMILIES",
    "FILL_KINDS",
    "MASK_KINDS",
    "CfftClassifierConfig",
    "CfftClassifierOutput",
    "CfftConfig",
    "CfftImageClassifier",
    "CfftTrainer",
    "ClipCfftConfig",
    "ClipCfftForImageClassification",
    "ClipCfftOutput",
    "CounterfactualCollator",
    "CounterfactualImagesCallback",
    "CounterfactualTransform",
    "FlypTrainer",
    "attention_rollout",
    "build_zeroshot_head",
    "build_zeroshot_weights",
    "cam_patch_mask",
    "classifier_from_clip",
    "classifier_from_pretrained",
    "compute_cam",
    "counterfactual_grid",
    "counterfactual_loss",
    "evaluate_splits",
    "feature_distillation_loss",
    "grad_cam",
    "greedy_soup",
    "is_cfft_checkpoint",
    "latest_complete_checkpoint",
    "load_class_names",
    "load_classifier",
    "load_templates",
    "logit_distillation_loss",
    "make_counterfactuals",
    "normalize_cam",
    "precompute_cams",
    "predict_logits",
    "prepare_train_dataset",
    "preprocess_images",
    "push_model_dir",
    "random_patch_mask",
    "refill",
    "render_model_card",
    "resolve_resume_checkpoint",
    "uniform_soup",
    "wise_ft",
    "write_model_card",
]
