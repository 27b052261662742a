"""The image classifier that hf_cfft fine-tunes: a contrastive model's image tower + its projection + a linear head.

Families (``config.family``):

- ``clip`` (OpenAI CLIP, LAION / DFN checkpoints in the CLIP format) and ``metaclip_2``: a CLS token, pooled by
  ``post_layernorm`` on the CLS output, then the ``visual_projection``;
- ``siglip`` (SigLIP and the fixed-resolution SigLIP 2 checkpoints, which transformers loads as ``SiglipModel``): no
  CLS token; the patch tokens are pooled by the attention-pooling head (a learned probe attends over them), and there
  is no projection: the head's output is the image embedding.

This file imports only torch and transformers on purpose: it is copied verbatim into pushed Hub repos as remote
code, so a checkpoint loads with ``trust_remote_code=True`` where hf_cfft is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    CLIPVisionModel,
    MetaClip2VisionModel,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ImageClassifierOutput

# family -> (image tower class, whether it has a CLS token and a visual projection)
TOWERS = {
    "clip": (CLIPVisionModel, True),
    "metaclip_2": (MetaClip2VisionModel, True),
    "siglip": (SiglipVisionModel, False),
}
TOWER_FAMILIES = tuple(TOWERS)  # the tower families a saved classifier can hold


class CfftClassifierConfig(PreTrainedConfig):
    """Config of `CfftImageClassifier`.

    Args:
        family: the image tower's family, one of `TOWER_FAMILIES` ("clip", "metaclip_2", "siglip").
        vision_config: the tower's vision config (``CLIPVisionConfig``, ``MetaClip2VisionConfig``,
            ``SiglipVisionConfig``) or its dict, whose ``model_type`` picks the class.
        projection_dim: width of the image embedding: the ``visual_projection`` output, or for SigLIP (no projection)
            the tower's hidden size.
        head_bias: whether the linear head has a bias (zero for CLIP, SigLIP's ``logit_bias`` for SigLIP).
        id2label / label2id / num_labels: the classes, as for any transformers classifier.
    """

    model_type = "cfft_classifier"
    sub_configs_defaults = {"vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model")}

    family: str = "clip"
    vision_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    head_bias: bool = True

    def __post_init__(self, **kwargs):
        if self.family not in TOWERS:
            raise ValueError(f"family={self.family!r} is not one of {TOWER_FAMILIES}")
        super().__post_init__(**kwargs)


class ClipCfftConfig(CfftClassifierConfig):
    """`CfftClassifierConfig` of a CLIP-family tower, under the model type that hf_cfft's CLIP classifiers have always
    been saved with (``clip_cfft``): folders saved before other families existed load unchanged."""

    model_type = "clip_cfft"


@dataclass
class CfftClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus the unnormalised image embeddings of the clean and counterfactual images.

    image_embeds: [B, projection_dim]; cf_image_embeds / cf_logits: [B, projection_dim] / [B, num_labels], only when
    ``cf_pixel_values`` was given.
    """

    image_embeds: torch.FloatTensor | None = None
    cf_image_embeds: torch.FloatTensor | None = None
    cf_logits: torch.FloatTensor | None = None


ClipCfftOutput = CfftClassifierOutput  # the name before other families existed


def _keep_mask_with_cls(patch_keep: torch.Tensor) -> torch.Tensor:
    """[B, h, w] or [B, N] bool -> [B, 1 + N] bool with the CLS token always kept."""
    keep = patch_keep.flatten(1).bool()
    return torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1)


def attention_pool(
    head: nn.Module, hidden: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SigLIP's attention-pooling head (``SiglipMultiheadAttentionPoolingHead.forward``), with optional key masking.

    hidden: [B, T, D] (after ``post_layernorm``). key_padding_mask: optional [B, T] bool, True = the token is ignored
    by the probe. An image with every token ignored gets what attending to nothing gives: an attention output of 0
    before the output projection (a softmax over no keys would be NaN). Returns [B, D]. Without a mask this is the
    head's own forward, operation for operation.
    """
    probe = head.probe.repeat(hidden.shape[0], 1, 1)
    empty = None
    if key_padding_mask is not None and bool(key_padding_mask.all(dim=1).any()):
        empty = key_padding_mask.all(dim=1)
        key_padding_mask = key_padding_mask & ~empty[:, None]  # computed over every token, then discarded
    pooled = head.attention(probe, hidden, hidden, key_padding_mask=key_padding_mask)[0]
    if empty is not None:
        out_proj = head.attention.out_proj
        nothing = out_proj.bias if out_proj.bias is not None else torch.zeros_like(pooled[0, 0])
        pooled = torch.where(empty[:, None, None], nothing.to(pooled.dtype).expand_as(pooled), pooled)
    pooled = pooled + head.mlp(head.layernorm(pooled))
    return pooled[:, 0]


class CfftPreTrainedModel(PreTrainedModel):
    config_class = CfftClassifierConfig
    base_model_prefix = "cfft"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = [
        "CLIPEncoderLayer",
        "CLIPVisionEmbeddings",
        "MetaClip2EncoderLayer",
        "MetaClip2VisionEmbeddings",
        "SiglipEncoderLayer",
        "SiglipVisionEmbeddings",
        "SiglipMultiheadAttentionPoolingHead",
    ]

    def _init_weights(self, module):
        # Only fresh heads and projections land here; the tower initialises its own sub-modules.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class CfftImageClassifier(CfftPreTrainedModel):
    """Image encoder f of a contrastive model with a linear head g on L2-normalised features: g(f(x) / |f(x)|).

    Module names match the family's model (``vision_model``, and ``visual_projection`` for CLIP and MetaCLIP 2), so
    its image tower loads into it unchanged. f(x) is the projected CLS output (CLIP, MetaCLIP 2) or the output of the
    attention-pooling head (SigLIP). The head starts as the zero-shot classifier (see `hf_cfft.zeroshot`).
    """

    def __init__(self, config: CfftClassifierConfig):
        super().__init__(config)
        tower, self.has_cls_token = TOWERS[config.family]
        if not config.vision_config.patch_size:
            raise ValueError("the image tower has no patch size: masking needs a ViT (patch grid) image encoder")
        if not self.has_cls_token and not getattr(config.vision_config, "vision_use_head", True):
            raise ValueError(
                "a SigLIP tower without its attention-pooling head (vision_use_head=False) has no pooling"
            )
        self.vision_model = tower._from_config(config.vision_config)
        if self.has_cls_token:
            self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        elif config.projection_dim != config.vision_config.hidden_size:
            raise ValueError(
                f"projection_dim={config.projection_dim} must equal the SigLIP tower's hidden_size "
                f"{config.vision_config.hidden_size}: SigLIP has no projection, the pooled feature is the embedding"
            )
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
        it contributes nothing to the pooled output (the CLS output, or SigLIP's attention pooling). When every image
        keeps the same number of patches the removed tokens are dropped (cheaper); otherwise they are masked out as
        attention keys, in the encoder and in the pooling head. Returns [B, projection_dim].
        """
        vision = self.vision_model
        hidden = vision.embeddings(pixel_values)  # [B, 1 + N, D] (CLS first), or [B, N, D] for SigLIP
        attention_mask = key_padding_mask = None
        if patch_keep is not None:
            keep = _keep_mask_with_cls(patch_keep) if self.has_cls_token else patch_keep.flatten(1).bool()
            keep = keep.to(hidden.device)
            counts = keep.sum(dim=1)
            # Without a CLS token an image may keep no token at all: the key-mask path handles that.
            if bool((counts == counts[0]).all()) and int(counts[0]) > 0:
                # Stable sort puts kept tokens first, in their original order.
                order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(counts[0])]
                hidden = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            else:
                attention_mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
                attention_mask = attention_mask.masked_fill(~keep, torch.finfo(hidden.dtype).min)[:, None, None, :]
                key_padding_mask = ~keep
        if not self.has_cls_token:
            hidden = vision.encoder(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
            return attention_pool(vision.head, vision.post_layernorm(hidden), key_padding_mask)
        hidden = vision.pre_layrnorm(hidden)
        hidden = vision.encoder(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
        pooled = vision.post_layernorm(hidden[:, 0])
        return self.visual_projection(pooled)

    def pooled_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """The tower's pooled output -> f(x): the visual projection where the family has one, else as is."""
        return self.visual_projection(pooled) if self.has_cls_token else pooled

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
    ) -> CfftClassifierOutput:
        """Classify ``pixel_values`` [B, C, H, W]; with ``cf_pixel_values`` also embed the counterfactual images.

        On an accelerator, clean and counterfactual images go through the encoder in one batch when no tokens need
        dropping, so the distillation pass costs one larger forward instead of two. ``labels`` [B] adds the
        cross-entropy loss.
        """
        if pixel_values is None:
            raise ValueError(
                "pixel_values is required: pass the images preprocessed by the checkpoint's image processor."
            )
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
        return CfftClassifierOutput(
            loss=loss, logits=logits, image_embeds=embeds, cf_image_embeds=cf_embeds, cf_logits=cf_logits
        )


class ClipCfftForImageClassification(CfftImageClassifier):
    """`CfftImageClassifier` of a CLIP-family tower, saved as ``clip_cfft``: the class hf_cfft's CLIP classifiers
    have always had, so older folders and code keep loading."""

    config_class = ClipCfftConfig


# Kept for code written before other families existed.
ClipCfftPreTrainedModel = CfftPreTrainedModel


def register_auto_classes() -> None:
    """Register the configs and models with the Auto classes (idempotent)."""
    from transformers import AutoModelForImageClassification

    for config_class, model_class in (
        (CfftClassifierConfig, CfftImageClassifier),
        (ClipCfftConfig, ClipCfftForImageClassification),
    ):
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModelForImageClassification.register(config_class, model_class)
        except ValueError:
            pass  # already registered by an earlier import


register_auto_classes()
# save_pretrained copies this file next to the weights and writes ``auto_map``, so a folder loads as remote code.
for _config_class, _model_class in (
    (CfftClassifierConfig, CfftImageClassifier),
    (ClipCfftConfig, ClipCfftForImageClassification),
):
    _config_class.register_for_auto_class("AutoConfig")
    _model_class.register_for_auto_class("AutoModelForImageClassification")
