"""Class activation maps (CAMs) of the true class for a CLIP ViT classifier, over the patch grid.

Two methods, as in the reference implementation (github: Coxy7/robust-finetuning):

- ``rollout``: gradient-weighted attention rollout (Chefer et al., 2021, "generic attention-model explainability"):
  ``R = I; for each block: R += mean_heads(clamp(grad * attn, min=0)) @ R``; the CAM is row CLS of R over the
  patch tokens.
- ``gradcam``: GradCAM on the output of the last block's first LayerNorm (the tokens as the last attention reads
  them; the last block's own patch outputs never reach the CLS output, so their gradient is zero). As the reference
  does, the channel weights are the gradient summed over *all* tokens, CLS included, and the map is the weighted
  sum of channels at each patch token, clamped at 0.

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
    # R = (I + W_L) ... (I + W_1) and only its CLS row is read, so the row vector e_CLS^T is pushed through the
    # blocks from the last one down: O(T^2) per block instead of the O(T^3) of forming R (the same product).
    row = torch.zeros(batch, 1, tokens, device=attentions[0].device, dtype=torch.float32)
    row[:, 0, 0] = 1.0
    for attn, grad in reversed(list(zip(attentions, grads))):
        weighted = (grad.float() * attn.float()).clamp(min=0).mean(dim=1)  # [B, T, T]
        row = row + torch.bmm(row, weighted)
    return row[:, 0, 1:]


def grad_cam(tokens: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """GradCAM over ViT tokens: activations and gradients [B, T, D] (token 0 is CLS) -> [B, T - 1], >= 0.

    Channel weights are the gradient summed over every token, CLS included (the reference's definition); the map is
    read at the patch tokens only.
    """
    weights = grads.float().sum(dim=1, keepdim=True)  # [B, 1, D]: channel importance
    return (weights * tokens[:, 1:].float()).sum(dim=-1).clamp(min=0)


def gradcam_layer(vision_model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output GradCAM reads: the last encoder block's first LayerNorm."""
    return vision_model.encoder.layers[-1].layer_norm1


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
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if method == "gradcam":
        handle = gradcam_layer(vision).register_forward_hook(_keep_output(captured, "tokens"))
    try:
        with torch.enable_grad(), eager_attention(vision):
            out = vision(pixel_values=pixels, output_attentions=method == "rollout")
            logits = model.logits_from_features(model.visual_projection(out.pooler_output))
            score = logits.gather(1, labels.view(-1, 1).to(logits.device)).sum()
            if method == "rollout":
                grads = torch.autograd.grad(score, out.attentions)
                cam = attention_rollout(out.attentions, grads)
            else:
                tokens = captured["tokens"]
                (grads,) = torch.autograd.grad(score, tokens)
                cam = grad_cam(tokens, grads)
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    h, w = model.patch_grid
    return normalize_cam(cam.detach().view(-1, h, w))


def _split_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, heads, T, D / heads], as CLIP's attention splits its projections."""
    batch, length, _ = tokens.shape
    return tokens.view(batch, length, heads, -1).transpose(1, 2)


class CamRecorder:
    """The CAM of a forward that already ran, read off its autograd graph: no second, eager forward.

    Inside the ``with`` block, hooks keep what the CAM needs from the forward of ``model`` (a
    `ClipCfftForImageClassification`) on any attention kernel (sdpa, flash): for ``rollout`` each block's queries,
    keys, values and attention output ``O`` (the input of ``out_proj``); for ``gradcam`` the output of the last
    block's first LayerNorm. Fused kernels never materialise the attention probabilities, so ``cam`` recomputes them,
    ``P = softmax(q k^T * scale)``, and gets their gradient from the output's, ``dS/dP = dS/dO @ v^T`` per head (as
    ``O = P v``): the quantities `compute_cam` takes from the eager path, so the maps agree to float rounding.

        with CamRecorder(model) as recorder:
            outputs = model(pixel_values=pixel_values)      # the training forward, sdpa
        cam = recorder.cam(outputs.logits, labels)          # [B, h, w]; the graph is kept for loss.backward()

    The forward must match `compute_cam`'s eval-mode pass: no attention dropout, no gradient checkpointing.
    """

    def __init__(self, model: torch.nn.Module, method: str = "rollout"):
        if method not in CAM_METHODS:
            raise ValueError(f"cam_method={method!r} is not one of {CAM_METHODS}")
        self.model, self.method = model, method
        self._handles: list = []
        self._blocks: list[dict[str, torch.Tensor]] = []
        self._tokens: torch.Tensor | None = None

    def __enter__(self) -> CamRecorder:
        layers = self.model.vision_model.encoder.layers
        self._blocks, self._tokens = [], None
        if self.method == "rollout":
            for layer in layers:
                block: dict[str, torch.Tensor] = {}
                self._blocks.append(block)
                attention = layer.self_attn
                for name in ("q_proj", "k_proj", "v_proj"):
                    self._handles.append(getattr(attention, name).register_forward_hook(_keep_output(block, name)))
                self._handles.append(attention.out_proj.register_forward_pre_hook(_keep_input(block, "out")))
        else:
            self._handles.append(gradcam_layer(self.model.vision_model).register_forward_hook(self._keep_tokens))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep_tokens(self, module, args, output) -> None:
        self._tokens = output

    def cam(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CAM of class ``labels`` [B] for the recorded forward whose ``logits`` [B, K] are given -> [B, h, w].

        Max-normalised like `compute_cam`. Takes gradients of the true-class logits with respect to recorded
        activations only (``retain_graph=True``): no parameter gradient is accumulated and the graph stays usable.
        """
        if self._handles:
            raise RuntimeError("CamRecorder.cam() must be called after the with block that recorded the forward")
        score = logits.gather(1, labels.view(-1, 1).to(logits.device)).sum()
        if self.method == "rollout":
            if not self._blocks or any(len(block) != 4 for block in self._blocks):
                raise RuntimeError("no forward of the model was recorded inside the with block")
            grads = torch.autograd.grad(score, [block["out"] for block in self._blocks], retain_graph=True)
            attentions, attention_grads = [], []
            with torch.no_grad():
                for layer, block, grad in zip(self.model.vision_model.encoder.layers, self._blocks, grads):
                    heads, scale = layer.self_attn.num_heads, layer.self_attn.scale
                    query, key, value = (
                        _split_heads(block[name].detach(), heads) for name in ("q_proj", "k_proj", "v_proj")
                    )
                    # As CLIP's eager attention: scaled logits, softmax in float32, back to the activations' dtype.
                    probs = torch.softmax(
                        torch.matmul(query, key.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32
                    ).to(query.dtype)
                    attentions.append(probs)
                    attention_grads.append(torch.matmul(_split_heads(grad, heads), value.transpose(-1, -2)))
                cam = attention_rollout(attentions, attention_grads)
        else:
            if self._tokens is None:
                raise RuntimeError("no forward of the model was recorded inside the with block")
            (grads,) = torch.autograd.grad(score, self._tokens, retain_graph=True)
            cam = grad_cam(self._tokens.detach(), grads)
        # Drop the references so the recorded activations are freed with the graph.
        self._blocks, self._tokens = [], None
        h, w = self.model.patch_grid
        return normalize_cam(cam.detach().view(-1, h, w))


def _keep_output(store: dict, name: str):
    def hook(module, args, output):
        store[name] = output

    return hook


def _keep_input(store: dict, name: str):
    def hook(module, args):
        store[name] = args[0]

    return hook
