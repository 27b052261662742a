"""Zero-shot classification head from a text tower: class names x prompt templates -> classifier weights (and bias).

CLIP and MetaCLIP 2 score ``logit_scale.exp() * cos``; SigLIP scores ``logit_scale.exp() * cos + logit_bias`` (a
sigmoid per class), so its head's bias starts at ``logit_bias`` (`build_zeroshot_head`).

The class names and prompt templates are package data under ``hf_cfft/resources`` in a comment-free format, one
entry per line:

- ``imagenet_classes.txt``: the 1000 ImageNet class names in class-index order 0..999, using the cleaned-up names
  from the OpenAI CLIP repository (notebooks/Prompt_Engineering_for_ImageNet.ipynb).
- ``imagenet_templates.txt``: the 80 ImageNet prompt templates from that same notebook.
- ``simple_templates.txt``: a short generic template set of our own, for quick runs and non-ImageNet label sets.
- ``siglip``: SigLIP's prompt style, the one template "This is a photo of {}." (its model card's zero-shot example).

Templates are ``str`` with a ``{}`` placeholder that is replaced by the class name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["build_zeroshot_head", "build_zeroshot_weights", "load_class_names", "load_templates"]

SIGLIP_TEMPLATES = ("This is a photo of {}.",)

_CLASS_FILES = {"imagenet": "imagenet_classes.txt"}
_TEMPLATE_FILES = {
    "openai_imagenet": "imagenet_templates.txt",
    "simple": "simple_templates.txt",
    "world": "world_templates.txt",  # the embedded world's prompts, as `hf_cfft.world.WORLD_TEMPLATES` reads them
}


def _read_lines(kind: str, name: str, files: dict[str, str]) -> list[str]:
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    if name not in files:
        raise ValueError(
            f"unknown {kind} {name!r}: not a file and not one of the bundled sets ({', '.join(sorted(files))})"
        )
    text = resources.files("hf_cfft").joinpath("resources", files[name]).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def load_class_names(name: str) -> list[str]:
    """Class names of a bundled label set or of a text file with one name per line.

    ``name``: ``"imagenet"`` -> 1000 names, index ``i`` is the name of ImageNet class ``i``; or a file path.
    Raises ValueError for anything else.
    """
    return _read_lines("class-name set", name, _CLASS_FILES)


def load_templates(name: str) -> list[str]:
    """Prompt templates, each with one ``{}`` placeholder: a bundled set or a text file with one per line.

    ``name``: ``"openai_imagenet"`` -> 80 templates, ``"simple"`` -> 6 generic templates, ``"siglip"`` -> SigLIP's
    "This is a photo of {}.", ``"world"`` -> the embedded world's prompts (`hf_cfft.world.WORLD_TEMPLATES`); or a file
    path. Raises ValueError for anything else.
    """
    if name == "siglip":
        return list(SIGLIP_TEMPLATES)
    return _read_lines("template set", name, {**_TEMPLATE_FILES, "siglip": ""})


def _text_features(
    clip_model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    if attention_mask is None:
        out = clip_model.get_text_features(input_ids=input_ids)
    else:
        out = clip_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    # transformers v5 returns a BaseModelOutputWithPooling whose pooler_output holds the projected embedding;
    # v4 returned that embedding directly.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def build_zeroshot_weights(
    clip_model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    tokenizer_kwargs: dict | None = None,
) -> torch.Tensor:
    """Build the zero-shot classifier: averaged, normalised prompt embeddings per class, scaled by CLIP's temperature.

    ``clip_model``: a ``transformers.CLIPModel`` (anything with ``get_text_features`` and ``logit_scale``).
    ``tokenizer``: its tokenizer; prompts are tokenised with ``tokenizer_kwargs``, by default ``padding=True,
    truncation=True`` (CLIP's convention; `build_zeroshot_head` passes each family's). The model gets the
    ``attention_mask`` only when the tokenizer returns one (SigLIP's does not: it was trained without).
    ``class_names``: C names; ``templates``: T strings, each with a ``{}`` placeholder.
    ``batch_size``: prompts per forward pass (a batch may span several classes).
    ``device``: where to run the text tower; default the model's current device. The model is moved back after.
    Returns a float32 CPU tensor of shape [C, projection_dim] whose rows have L2 norm ``logit_scale.exp()``, so
    ``normalised_image_features @ weights.T`` gives CLIP's zero-shot logits.
    """
    if not class_names or not templates:
        raise ValueError("class_names and templates must both be non-empty")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ValueError(f"templates without a '{{}}' placeholder: {missing!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    text_kwargs = {"padding": True, "truncation": True} if tokenizer_kwargs is None else tokenizer_kwargs
    num_templates = len(templates)
    # Class-major order, so prompt i belongs to class i // num_templates.
    prompts = [t.replace("{}", name) for name in class_names for t in templates]
    owner = torch.arange(len(class_names)).repeat_interleave(num_templates)

    home_device = next(clip_model.parameters()).device
    run_device = torch.device(device) if device is not None else home_device
    # Remember every submodule's mode: callers often keep e.g. a frozen tower in eval while the rest trains.
    modes = {module: module.training for module in clip_model.modules()}
    sums = None
    try:
        clip_model.to(run_device)
        clip_model.eval()
        with torch.no_grad(), tqdm(total=len(class_names), unit="class", disable=not show_progress) as bar:
            for start in range(0, len(prompts), batch_size):
                stop = min(start + batch_size, len(prompts))
                enc = tokenizer(prompts[start:stop], **text_kwargs, return_tensors="pt")
                mask = enc.get("attention_mask")
                feats = _text_features(
                    clip_model, enc["input_ids"].to(run_device), None if mask is None else mask.to(run_device)
                )
                # Normalise in float32 so half-precision models do not lose the small per-template differences.
                feats = torch.nn.functional.normalize(feats.float(), dim=-1).cpu()
                if sums is None:
                    sums = torch.zeros(len(class_names), feats.shape[-1], dtype=torch.float32)
                sums.index_add_(0, owner[start:stop], feats)
                bar.update(stop // num_templates - start // num_templates)
            scale = clip_model.logit_scale.exp().float().cpu()
    finally:
        clip_model.to(home_device)
        for module, was_training in modes.items():
            module.training = was_training

    weights = torch.nn.functional.normalize(sums / num_templates, dim=-1)
    return weights * scale


def build_zeroshot_head(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    class_names: Sequence[str],
    templates: Sequence[str],
    **kwargs,
) -> tuple[torch.Tensor, float]:
    """The zero-shot head of any supported family: (weights [C, projection_dim] float32, bias, one float for all).

    ``model``: a ``CLIPModel``, ``MetaClip2Model`` or ``SiglipModel``; prompts are tokenised as the family was trained
    (`hf_cfft.families.tokenizer_kwargs`). The bias is SigLIP's ``logit_bias``, 0 for CLIP and MetaCLIP 2, so that
    ``normalised_image_features @ weights.T + bias`` are the model's own image-text logits (one template) or their
    template ensemble. Other keyword arguments go to `build_zeroshot_weights`.
    """
    from .families import family_of, tokenizer_kwargs

    weights = build_zeroshot_weights(
        model, tokenizer, class_names, templates, tokenizer_kwargs=tokenizer_kwargs(model), **kwargs
    )
    bias = float(model.logit_bias.detach().float().cpu().item()) if family_of(model).sigmoid else 0.0
    return weights, bias
