"""The CLIP image classifier that hf_cfft fine-tunes: CLIP vision tower + visual projection + linear head.

This file imports only torch and transformers on purpose: it is copied verbatim into pushed Hub repos as remote
code, so a checkpoint loads with ``trust_remote_code=True`` where hf_cfft is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput


class ClipCfftConfig(PreTrainedConfig):
    """Config of `ClipCfftForImageClassification`.

    Args:
        vision_config: the `CLIPVisionConfig` (or its dict) of the image tower.
        projection_dim: width of the image embedding (CLIP's ``visual_projection`` output).
        head_bias: whether the linear head has a bias (zero-initialised).
        id2label / label2id / num_labels: the classes, as for any transformers classifier.
    """

    model_type = "clip_cfft"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig}

    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    head_bias: bool = True


@dataclass
class ClipCfftOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus the unnormalised image embeddings of the clean and counterfactual images.

    image_embeds: [B, projection_dim]; cf_image_embeds / cf_logits: [B, projection_dim] / [B, num_labels], only when
    ``cf_pixel_values`` was given.
    """

    image_embeds: torch.FloatTensor | None = None
    cf_image_embeds: torch.FloatTensor | None = None
    cf_logits: torch.FloatTensor | None = None


def _keep_mask_with_cls(patch_keep: torch.Tensor) -> torch.Tensor:
    """[B, h, w] or [B, N] bool -> [B, 1 + N] bool with the CLS token always kept."""
    keep = patch_keep.flatten(1).bool()
    return torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1)


class ClipCfftPreTrainedModel(PreTrainedModel):
    config_class = ClipCfftConfig
    base_model_prefix = "clip_cfft"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings"]

    def _init_weights(self, module):
        # Only fresh heads and projections land here; the CLIP tower initialises its own sub-modules.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class ClipCfftForImageClassification(ClipCfftPreTrainedModel):
    """CLIP image encoder f with a linear head g on L2-normalised features: logits = g(f(x) / |f(x)|).

    Module names match `CLIPModel` (``vision_model``, ``visual_projection``), so a CLIP checkpoint's image tower
    loads into it unchanged. The head starts as the zero-shot classifier (see `hf_cfft.zeroshot`).
    """

    def __init__(self, config: ClipCfftConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels, bias=config.head_bias)
        self.post_init()

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(h, w): the patch grid of the configured input size."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return side, side

    def get_image_features(self, pixel_values: torch.Tensor, patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised projected image embedding f(x): the feature that is distilled.

        pixel_values: [B, C, H, W]. patch_keep: optional [B, h, w] or [B, h*w] bool, False = the patch is removed:
        it contributes nothing to the CLS output. When every image keeps the same number of patches the removed
        tokens are dropped (cheaper); otherwise they are masked out as attention keys. Returns [B, projection_dim].
        """
        vision = self.vision_model
        hidden = vision.embeddings(pixel_values)  # [B, 1 + N, D]
        attention_mask = None
        if patch_keep is not None:
            keep = _keep_mask_with_cls(patch_keep).to(hidden.device)
            counts = keep.sum(dim=1)
            if bool((counts == counts[0]).all()):
                # Stable sort puts kept tokens first, in their original order.
                order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(counts[0])]
                hidden = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            else:
                attention_mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
                attention_mask = attention_mask.masked_fill(~keep, torch.finfo(hidden.dtype).min)[:, None, None, :]
        hidden = vision.pre_layrnorm(hidden)
        hidden = vision.encoder(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
        pooled = vision.post_layernorm(hidden[:, 0])
        return self.visual_projection(pooled)

    def logits_from_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """g(f / |f|): [B, projection_dim] -> [B, num_labels]."""
        return self.classifier(F.normalize(image_embeds, dim=-1))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cf_pixel_values: torch.Tensor | None = None,
        cf_patch_keep: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ClipCfftOutput:
        """Classify ``pixel_values`` [B, C, H, W]; with ``cf_pixel_values`` also embed the counterfactual images.

        On an accelerator, clean and counterfactual images go through the encoder in one batch when no tokens need
        dropping, so the distillation pass costs one larger forward instead of two. ``labels`` [B] adds the
        cross-entropy loss.
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required: pass the images preprocessed by the CLIP image processor.")
        batch = pixel_values.shape[0]
        cf_embeds = cf_logits = None
        if cf_pixel_values is None:
            embeds = self.get_image_features(pixel_values)
        elif cf_patch_keep is None and pixel_values.device.type != "cpu":
            # One larger batch keeps more of a GPU's cores busy. On CPU two forwards of B measured ~5% faster per
            # step than one of 2B (a smaller working set, fewer page faults; docs/performance.md): the else branch.
            both = self.get_image_features(torch.cat([pixel_values, cf_pixel_values]))
            embeds, cf_embeds = both[:batch], both[batch:]
        else:
            embeds = self.get_image_features(pixel_values)
            cf_embeds = self.get_image_features(cf_pixel_values, cf_patch_keep)
        logits = self.logits_from_features(embeds)
        if cf_embeds is not None:
            cf_logits = self.logits_from_features(cf_embeds)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return ClipCfftOutput(
            loss=loss, logits=logits, image_embeds=embeds, cf_image_embeds=cf_embeds, cf_logits=cf_logits
        )


def register_auto_classes() -> None:
    """Register the config and model with the Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        AutoConfig.register(ClipCfftConfig.model_type, ClipCfftConfig)
        AutoModelForImageClassification.register(ClipCfftConfig, ClipCfftForImageClassification)
    except ValueError:
        pass  # already registered by an earlier import


register_auto_classes()
# save_pretrained copies this file next to the weights and writes ``auto_map``, so a folder loads as remote code.
ClipCfftConfig.register_for_auto_class("AutoConfig")
ClipCfftForImageClassification.register_for_auto_class("AutoModelForImageClassification")
