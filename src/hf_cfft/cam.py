"""Class activation maps (CAMs) of the true class for a CLIP ViT classifier, over the patch grid.

Two methods, as in the reference implementation:

- ``rollout``: gradient-weighted attention rollout (Chefer et al., 2021, "generic attention-model explainability"):
  ``R = I; for each block: R += mean_heads(clamp(grad * attn, min=0)) @ R``; the CAM is row CLS of R over the
  patch tokens.
- ``gradcam``: GradCAM on the tokens entering the last block (the last block's own patch outputs never reach the
  CLS output, so their gradient is zero).

Both are normalised by their per-image maximum, so a threshold of 0.3 means "30% of the hottest patch".
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

CAM_METHODS = ("rollout", "gradcam")


def normalize_cam(cam: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each map by its maximum: [B, ...] -> [B, ...] in [0, 1] (all-zero maps stay zero)."""
    peak = cam.flatten(1).amax(dim=1).clamp_min(eps)
    return cam / peak.view(-1, *([1] * (cam.dim() - 1)))


def attention_rollout(attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gradient-weighted attention rollout: per-block [B, heads, T, T] attention and gradient -> [B, T - 1].

    Returns the un-normalised relevance of each patch token (token 0 is CLS) for the CLS output.
    """
    if len(attentions) == 0 or len(attentions) != len(grads):
        raise ValueError(f"need one gradient per attention map, got {len(attentions)} maps and {len(grads)} grads")
    batch, _, tokens, _ = attentions[0].shape
    relevance = torch.eye(tokens, device=attentions[0].device, dtype=torch.float32).expand(batch, tokens, tokens)
    for attn, grad in zip(attentions, grads):
        weighted = (grad.float() * attn.float()).clamp(min=0).mean(dim=1)  # [B, T, T]
        relevance = relevance + torch.bmm(weighted, relevance)
    return relevance[:, 0, 1:]


def grad_cam(tokens: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """GradCAM over ViT tokens: activations and gradients [B, T, D] (token 0 is CLS) -> [B, T - 1], >= 0."""
    weights = grads[:, 1:].float().mean(dim=1, keepdim=True)  # [B, 1, D]: channel importance
    return (weights * tokens[:, 1:].float()).sum(dim=-1).clamp(min=0)


@contextmanager
def eager_attention(vision_model: torch.nn.Module):
    """Run ``vision_model`` on the eager attention path inside the block: only eager returns attention probabilities.

    The training forward keeps its own implementation (sdpa, flash); this switch lasts for the CAM pass alone.
    """
    config = vision_model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def compute_cam(model: torch.nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor, method: str = "rollout"):
    """CAM of class ``labels`` for a `ClipCfftForImageClassification`: [B, C, H, W], [B] -> [B, h, w] in [0, 1].

    Works on a frozen teacher as well as on the student being trained: gradients are taken with respect to the
    attention maps (or tokens) only, so no parameter gradient is accumulated and the training step is untouched.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"cam_method={method!r} is not one of {CAM_METHODS}")
    vision = model.vision_model
    # A leaf that requires grad gives the autograd graph a root even when every weight is frozen.
    pixels = pixel_values.detach().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), eager_attention(vision):
            out = vision(
                pixel_values=pixels, output_attentions=method == "rollout", output_hidden_states=method == "gradcam"
            )
            logits = model.logits_from_features(model.visual_projection(out.pooler_output))
            score = logits.gather(1, labels.view(-1, 1).to(logits.device)).sum()
            if method == "rollout":
                grads = torch.autograd.grad(score, out.attentions)
                cam = attention_rollout(out.attentions, grads)
            else:
                tokens = out.hidden_states[-2]
                (grads,) = torch.autograd.grad(score, tokens)
                cam = grad_cam(tokens, grads)
    finally:
        model.train(was_training)
    h, w = model.patch_grid
    return normalize_cam(cam.detach().view(-1, h, w))
