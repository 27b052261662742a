"""The contrastive model families whose image towers hf_cfft fine-tunes, and each one's text-side conventions.

A family is named by the ``model_type`` of its checkpoints' ``config.json``:

- ``clip``: OpenAI CLIP and the checkpoints saved in its format (LAION, DFN, ...): softmax scoring with
  ``logit_scale``, text pooled at the EOS token, prompts padded to the longest;
- ``metaclip_2``: MetaCLIP 2 (``facebook/metaclip-2-worldwide-*``): as CLIP, with its multilingual tokenizer;
- ``siglip``: SigLIP and the fixed-resolution SigLIP 2 checkpoints (``google/siglip2-base-patch16-224`` is a
  ``siglip`` checkpoint with a Gemma tokenizer): sigmoid scoring ``logit_scale.exp() * cos + logit_bias``, text pooled
  at the last position, prompts padded to the model's full length (``padding="max_length"``, as it was trained),
  prompt style "This is a photo of {}.".

SigLIP 2's NaFlex checkpoints (``model_type`` ``siglip2``) take a variable patch grid per image; the masks, refills
and CAMs here work on one fixed grid, so they are refused with a message naming the fixed-resolution checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPModel, MetaClip2Model, PreTrainedModel, SiglipModel


@dataclass(frozen=True)
class Family:
    """What differs between families: the model class, and how prompts are tokenised and scored."""

    name: str
    model_class: type[PreTrainedModel]
    pad_to_max_length: bool
    sigmoid: bool
    example: str
    default_templates: str


FAMILIES: dict[str, Family] = {
    "clip": Family("clip", CLIPModel, False, False, "openai/clip-vit-base-patch32", "openai_imagenet"),
    "metaclip_2": Family(
        "metaclip_2", MetaClip2Model, False, False, "facebook/metaclip-2-worldwide-huge-quickgelu", "openai_imagenet"
    ),
    "siglip": Family("siglip", SiglipModel, True, True, "google/siglip-base-patch16-224", "siglip"),
}


def family_for_model_type(model_type: str, name: str = "the checkpoint") -> Family:
    """The `Family` of a checkpoint's ``model_type``; a ValueError naming the supported ones otherwise."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type == "siglip2":
        raise ValueError(
            f"{name} is a SigLIP 2 NaFlex checkpoint (model_type 'siglip2'): its patch grid changes with each image's "
            "aspect ratio, and hf_cfft's masks, refills and CAMs need one fixed grid. Use a fixed-resolution SigLIP 2 "
            "checkpoint instead (e.g. google/siglip2-base-patch16-224, which loads as 'siglip')"
        )
    supported = ", ".join(f"{f.name} (e.g. {f.example})" for f in FAMILIES.values())
    raise ValueError(
        f"{name} is a {model_type!r} checkpoint; hf_cfft fine-tunes CLIP ViT image encoders and the ViT image towers "
        f"of MetaCLIP 2 and SigLIP (masking needs their patch grid and the text tower builds the zero-shot head): "
        f"pass a checkpoint of one of {supported}, or a classifier saved by hf_cfft"
    )


def family_of(model: PreTrainedModel) -> Family:
    """The `Family` of a loaded contrastive model (``CLIPModel``, ``MetaClip2Model``, ``SiglipModel``)."""
    return family_for_model_type(model.config.model_type, type(model).__name__)


def tokenizer_kwargs(model: PreTrainedModel) -> dict:
    """How the family tokenises prompts: padded to the longest (CLIP), or to the text tower's length (SigLIP)."""
    if family_of(model).pad_to_max_length:
        return {
            "padding": "max_length",
            "max_length": model.config.text_config.max_position_embeddings,
            "truncation": True,
        }
    return {"padding": True, "truncation": True}
