"""Load the classifier to fine-tune: from a contrastive checkpoint (its zero-shot head built) or a saved classifier."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from .families import family_for_model_type, family_of
from .head_checks import check_zeroshot_head
from .modeling import CfftClassifierConfig, CfftImageClassifier, ClipCfftConfig, ClipCfftForImageClassification
from .zeroshot import build_zeroshot_head

# Where a LoRA run keeps its adapter (`hf_cfft.adapters`), and the record that marks the folder as hf_cfft's.
ADAPTER_DIR = "adapter"
ADAPTER_INFO = "hf_cfft_adapter.json"

# model_type of a saved classifier -> its class
SAVED_CLASSIFIERS = {
    ClipCfftConfig.model_type: ClipCfftForImageClassification,
    CfftClassifierConfig.model_type: CfftImageClassifier,
}


def classifier_from_pretrained(
    pretrained: PreTrainedModel,
    head_weights: torch.Tensor,
    class_names: Sequence[str],
    head_bias: float = 0.0,
) -> CfftImageClassifier:
    """Wrap a contrastive model's image tower with a linear head initialised to ``head_weights`` [C, projection_dim].

    ``pretrained``: a ``CLIPModel``, ``MetaClip2Model`` or ``SiglipModel``. ``head_bias``: every class's starting
    bias (SigLIP's ``logit_bias``; 0 for CLIP). A CLIP model gives a `ClipCfftForImageClassification` (saved as
    ``clip_cfft``, as before other families existed); the others a `CfftImageClassifier` with their ``family``.
    """
    family = family_of(pretrained)
    has_projection = hasattr(pretrained, "visual_projection")
    vision_config = pretrained.config.vision_config
    width = pretrained.config.projection_dim if has_projection else vision_config.hidden_size
    if head_weights.shape != (len(class_names), width):
        raise ValueError(
            f"head weights of shape {tuple(head_weights.shape)} do not match {len(class_names)} classes x "
            f"embedding width {width}"
        )
    if not getattr(vision_config, "patch_size", None):
        raise ValueError("the image tower has no patch size: masking needs a ViT (patch grid) image encoder")
    config_class, model_class = (
        (ClipCfftConfig, ClipCfftForImageClassification)
        if family.name == "clip"
        else (CfftClassifierConfig, CfftImageClassifier)
    )
    extra = {} if family.name == "clip" else {"family": family.name}
    config = config_class(
        vision_config=vision_config.to_dict(),
        projection_dim=width,
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        **extra,
    )
    model = model_class(config)
    model.vision_model.load_state_dict(pretrained.vision_model.state_dict())
    if has_projection:
        model.visual_projection.load_state_dict(pretrained.visual_projection.state_dict())
    with torch.no_grad():
        model.classifier.weight.copy_(head_weights.to(model.classifier.weight.dtype))
        if model.classifier.bias is not None:
            model.classifier.bias.fill_(head_bias)
    return model


# Where a classifier records the pre-trained checkpoint it was built from (its config.json, so every fine-tuning,
# WiSE-FT and soup made from it carries the record along): weights can only be averaged between models of one.
BASE_MODEL_KEY = "hf_cfft_base_model"


def base_model_record(model_name_or_path: str, pretrained: PreTrainedModel) -> dict[str, str]:
    """``{"name_or_path", "fingerprint"}`` of a pre-trained checkpoint, before any fine-tuning changes its weights.

    The fingerprint hashes the image tower's first weight (the patch embedding: about 2 MB at ViT-B/16), so two
    folders of one checkpoint match wherever they lie, and two pre-trained models with the same shapes do not.
    """
    name, tensor = next(iter(pretrained.vision_model.named_parameters()))
    digest = hashlib.blake2b(digest_size=8)
    digest.update(name.encode())
    digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"name_or_path": str(model_name_or_path), "fingerprint": digest.hexdigest()}


def recorded_base_model(model: PreTrainedModel) -> dict[str, str] | None:
    """The `base_model_record` a classifier's config carries, or None (saved before hf_cfft recorded it)."""
    record = getattr(model.config, BASE_MODEL_KEY, None)
    return record if isinstance(record, dict) and record.get("fingerprint") else None


# The name from before other families existed; it takes any supported family now.
classifier_from_clip = classifier_from_pretrained


def saved_classifier_type(path: str) -> str | None:
    """The ``model_type`` of the hf_cfft classifier saved in local directory ``path``, or None if it holds none."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    return model_type if model_type in SAVED_CLASSIFIERS else None


def is_cfft_checkpoint(path: str) -> bool:
    """Whether ``path`` is a local directory holding a classifier saved by hf_cfft (any family)."""
    return saved_classifier_type(path) is not None


def refuse_an_adapter_alone(path: str) -> None:
    """Refuse a run folder that holds a LoRA adapter but no merged classifier (``--merge_adapter false``), naming how
    to merge it, instead of reading it as a pre-trained checkpoint."""
    folder = os.path.expanduser(path)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    if os.path.isfile(os.path.join(folder, ADAPTER_DIR, ADAPTER_INFO)):
        merged = f"{path.rstrip('/')}_merged"
        raise ValueError(
            f"{path} holds a LoRA adapter ({path}/adapter) but no merged classifier (it was trained with "
            '--merge_adapter false). Merge it into a classifier folder first: python -c "from hf_cfft.adapters '
            f"import load_adapter_classifier; load_adapter_classifier('{path}/adapter', merge=True)"
            f".save_pretrained('{merged}')\" (and copy {path}/preprocessor_config.json there), then pass {merged}"
        )


def load_classifier(
    model_name_or_path: str,
    *,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    show_progress: bool = True,
    **from_pretrained_kwargs,
) -> CfftImageClassifier:
    """A saved classifier as is, or a CLIP / MetaCLIP 2 / SigLIP checkpoint turned into its zero-shot classifier.

    ``class_names`` and ``templates`` are needed only for a pre-trained checkpoint (Hub id or dir), whose own
    tokenizer tokenises the prompts as its family does (`hf_cfft.zeroshot.build_zeroshot_head`). A saved classifier
    whose classes differ from ``class_names`` (count or order) is refused: its head would score the wrong classes.
    """
    saved_type = saved_classifier_type(model_name_or_path)
    refuse_an_adapter_alone(model_name_or_path)
    if saved_type is not None:
        model = SAVED_CLASSIFIERS[saved_type].from_pretrained(model_name_or_path, **from_pretrained_kwargs)
        if class_names is not None:
            saved = [model.config.id2label[i] for i in range(model.config.num_labels)]
            if list(class_names) != saved:
                raise ValueError(
                    f"the classifier in {model_name_or_path} was built for {len(saved)} classes "
                    f"({', '.join(saved[:5])}, ...) but the dataset has {len(class_names)} "
                    f"({', '.join(list(class_names)[:5])}, ...); use a dataset with the same class names in the same "
                    "order, or start from the pre-trained checkpoint to build a new head"
                )
        return model
    if class_names is None or templates is None:
        raise ValueError(
            f"{model_name_or_path} is a pre-trained checkpoint: class_names and templates are needed to build its head"
        )
    model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
    family = family_for_model_type(model_type, model_name_or_path)
    pretrained = family.model_class.from_pretrained(model_name_or_path, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    weights, bias = build_zeroshot_head(pretrained, tokenizer, class_names, templates, show_progress=show_progress)
    check_zeroshot_head(weights, class_names, tokenizer, model_name_or_path)
    model = classifier_from_pretrained(pretrained, weights, class_names, head_bias=bias)
    setattr(model.config, BASE_MODEL_KEY, base_model_record(model_name_or_path, pretrained))
    return model
