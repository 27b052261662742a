"""Build the classifier to fine-tune: from a CLIP checkpoint (zero-shot head on the fly) or a saved classifier."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPModel

from .head_checks import check_zeroshot_head
from .modeling import ClipCfftConfig, ClipCfftForImageClassification
from .zeroshot import build_zeroshot_weights


def classifier_from_clip(
    clip_model: CLIPModel, head_weights: torch.Tensor, class_names: Sequence[str]
) -> ClipCfftForImageClassification:
    """Wrap a CLIP image tower with a linear head initialised to ``head_weights`` [num_classes, projection_dim]."""
    if head_weights.shape != (len(class_names), clip_model.config.projection_dim):
        raise ValueError(
            f"head weights of shape {tuple(head_weights.shape)} do not match {len(class_names)} classes x "
            f"projection_dim {clip_model.config.projection_dim}"
        )
    vision_config = clip_model.config.vision_config
    if not getattr(vision_config, "patch_size", None):
        raise ValueError("the CLIP image tower has no patch size: masking needs a ViT (patch grid) image encoder")
    config = ClipCfftConfig(
        vision_config=vision_config.to_dict(),
        projection_dim=clip_model.config.projection_dim,
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
    )
    model = ClipCfftForImageClassification(config)
    model.vision_model.load_state_dict(clip_model.vision_model.state_dict())
    model.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
    with torch.no_grad():
        model.classifier.weight.copy_(head_weights.to(model.classifier.weight.dtype))
        if model.classifier.bias is not None:
            model.classifier.bias.zero_()
    return model


def is_cfft_checkpoint(path: str) -> bool:
    """Whether ``path`` is a local directory holding a saved `ClipCfftForImageClassification`."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as f:
        return json.load(f).get("model_type") == ClipCfftConfig.model_type


def load_classifier(
    model_name_or_path: str,
    *,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    show_progress: bool = True,
    **from_pretrained_kwargs,
) -> ClipCfftForImageClassification:
    """A saved classifier as is, or a CLIP checkpoint (Hub id or dir) turned into its zero-shot classifier.

    ``class_names`` and ``templates`` are needed only for a CLIP checkpoint. A saved classifier whose classes differ
    from ``class_names`` (count or order) is refused: its head would score the wrong classes.
    """
    if is_cfft_checkpoint(model_name_or_path):
        model = ClipCfftForImageClassification.from_pretrained(model_name_or_path, **from_pretrained_kwargs)
        if class_names is not None:
            saved = [model.config.id2label[i] for i in range(model.config.num_labels)]
            if list(class_names) != saved:
                raise ValueError(
                    f"the classifier in {model_name_or_path} was built for {len(saved)} classes "
                    f"({', '.join(saved[:5])}, ...) but the dataset has {len(class_names)} "
                    f"({', '.join(list(class_names)[:5])}, ...); use a dataset with the same class names in the same "
                    "order, or start from the CLIP checkpoint to build a new head"
                )
        return model
    if class_names is None or templates is None:
        raise ValueError(
            f"{model_name_or_path} is a CLIP checkpoint: class_names and templates are needed to build its head"
        )
    model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
    if model_type != "clip":
        raise ValueError(
            f"{model_name_or_path} is a {model_type!r} checkpoint; hf_cfft fine-tunes CLIP ViT image encoders "
            "(masking needs their patch grid and the text tower builds the zero-shot head): pass a CLIP checkpoint "
            "such as openai/clip-vit-base-patch32, or a classifier saved by hf_cfft"
        )
    clip = CLIPModel.from_pretrained(model_name_or_path, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    weights = build_zeroshot_weights(clip, tokenizer, class_names, templates, show_progress=show_progress)
    check_zeroshot_head(weights, class_names, tokenizer, model_name_or_path)
    return classifier_from_clip(clip, weights, class_names)
