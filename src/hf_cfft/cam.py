"""Class activation maps (CAMs) of the true class for a ViT classifier, over the patch grid.

Two methods, as in the reference implementation (github: Coxy7/robust-finetuning):

- ``rollout``: gradient-weighted attention rollout (Chefer et al., 2021, "generic attention-model explainability"):
  ``R = I; for each block: R += mean_heads(clamp(grad * attn, min=0)) @ R``; the CAM is row CLS of R over the
  patch tokens.
- ``gradcam``: GradCAM on the output of the last block's first LayerNorm (the tokens as the last attention reads
  them; the last block's own patch outputs never reach the CLS output, so their gradient is zero). As the reference
  does, the channel weights are the gradient summed over *all* tokens, CLS included, and the map is the weighted
  sum of channels at each patch token, clamped at 0.

Towers pooled by an attention probe (SigLIP; no CLS token) have no CLS row. For them:

- ``rollout`` starts from the probe's own attention over the tokens, gradient-weighted the same way,
  ``r = mean_heads(clamp(grad * attn_probe, min=0))`` [B, N], and pushes that row through the encoder blocks,
  ``r += r @ mean_heads(clamp(grad * attn, min=0))`` from the last block down: the probe is one more attention
  layer whose query is not a token, so the identity part of its ``I + W`` (the probe's own row) is dropped;
- ``gradcam`` reads the same layer (the last block's first LayerNorm, the tokens entering its attention), channel
  weights summed over all tokens, the map over all of them (every token is a patch). Unlike CLIP, the last block's
  outputs do reach the pooled feature here (through the probe), but the same layer keeps the two families'
  definitions alike.

Both are normalised by their per-image maximum, so a threshold of 0.3 means "30% of the hottest patch".
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

CAM_METHODS = ("rollout", "gradcam")


def normalize_cam(cam: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each map by its maximum: [B, ...] -> [B, ...] in [0, 1] (all-zero maps stay zero)."""
    peak = cam.flatten(1).amax(dim=1).clamp_min(eps)
    return cam / peak.view(-1, *([1] * (cam.dim() - 1)))


def probe_relevance(probe_attention: torch.Tensor, probe_grad: torch.Tensor) -> torch.Tensor:
    """Relevance of each token for an attention-pooled output: [B, heads, 1, T] attention and gradient -> [B, T]."""
    return (probe_grad.float() * probe_attention.float()).clamp(min=0).mean(dim=1)[:, 0]


def attention_rollout(
    attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], start: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient-weighted attention rollout: per-block [B, heads, T, T] attention and gradient -> [B, T - 1].

    Returns the un-normalised relevance of each patch token (token 0 is CLS) for the CLS output. For a tower without
    CLS, pooled by an attention probe, pass ``start`` = `probe_relevance` [B, T]: it replaces row CLS, and the
    relevance of all T tokens is returned, [B, T].
    """
    if len(attentions) == 0 or len(attentions) != len(grads):
        raise ValueError(f"need one gradient per attention map, got {len(attentions)} maps and {len(grads)} grads")
    batch, _, tokens, _ = attentions[0].shape
    # R = (I + W_L) ... (I + W_1) and only its CLS row is read, so the row vector e_CLS^T is pushed through the
    # blocks from the last one down: O(T^2) per block instead of the O(T^3) of forming R (the same product).
    if start is None:
        row = torch.zeros(batch, 1, tokens, device=attentions[0].device, dtype=torch.float32)
        row[:, 0, 0] = 1.0
    else:
        if start.shape != (batch, tokens):
            raise ValueError(f"start of shape {tuple(start.shape)} does not match [B, T] = [{batch}, {tokens}]")
        row = start.float().unsqueeze(1).to(attentions[0].device)
    for attn, grad in reversed(list(zip(attentions, grads))):
        weighted = (grad.float() * attn.float()).clamp(min=0).mean(dim=1)  # [B, T, T]
        row = row + torch.bmm(row, weighted)
    return row[:, 0, 1:] if start is None else row[:, 0]


def grad_cam(tokens: torch.Tensor, grads: torch.Tensor, cls_token: bool = True) -> torch.Tensor:
    """GradCAM over ViT tokens: activations and gradients [B, T, D] (token 0 is CLS) -> [B, T - 1], >= 0.

    Channel weights are the gradient summed over every token, CLS included (the reference's definition); the map is
    read at the patch tokens only. ``cls_token=False`` (SigLIP): every token is a patch, the map is [B, T].
    """
    weights = grads.float().sum(dim=1, keepdim=True)  # [B, 1, D]: channel importance
    patches = tokens[:, 1:] if cls_token else tokens
    return (weights * patches.float()).sum(dim=-1).clamp(min=0)


def _split_probe_projections(attention: torch.nn.MultiheadAttention):
    """(Wq, Wk, Wv), (bq, bk, bv) of a ``torch.nn.MultiheadAttention`` with one packed input projection."""
    weights = attention.in_proj_weight.chunk(3)
    biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None, None, None)
    return weights, biases


def probe_attention_probs(
    attention: torch.nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's attention probabilities and values: query [B, 1, D], key [B, T, D] -> [B, heads, 1, T], v.

    As ``torch.nn.MultiheadAttention`` computes them (scaled dot product, softmax over the keys; masked keys get 0);
    v is [B, heads, T, D / heads].
    """
    (wq, wk, wv), (bq, bk, bv) = _split_probe_projections(attention)
    heads = attention.num_heads
    q = _split_heads(F.linear(query, wq, bq), heads)
    k = _split_heads(F.linear(key, wk, bk), heads)
    v = _split_heads(F.linear(key, wv, bv), heads)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v


def probe_pool(head: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's attention pooling computed step by step, so its attention is part of the graph.

    hidden: [B, T, D] (after ``post_layernorm``) -> (pooled [B, D], probe attention [B, heads, 1, T]). Equal to the
    head's own forward up to float rounding.
    """
    attention = head.attention
    probe = head.probe.repeat(hidden.shape[0], 1, 1)
    probs, v = probe_attention_probs(attention, probe, hidden)
    heads_out = torch.matmul(probs, v)  # [B, heads, 1, D / heads]
    pooled = F.linear(
        heads_out.transpose(1, 2).reshape(probe.shape), attention.out_proj.weight, attention.out_proj.bias
    )
    pooled = pooled + head.mlp(head.layernorm(pooled))
    return pooled[:, 0], probs


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
    """CAM of class ``labels`` for a `CfftImageClassifier`: [B, C, H, W], [B] -> [B, h, w] in [0, 1].

    Works on a frozen teacher as well as on the student being trained: gradients are taken with respect to the
    attention maps (or tokens) only, so no parameter gradient is accumulated and the training step is untouched.
    The encoder runs on the eager attention path (which returns its probabilities); SigLIP's pooling attention is
    recomputed step by step (`probe_pool`) for its probabilities.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"cam_method={method!r} is not one of {CAM_METHODS}")
    vision = model.vision_model
    has_cls = getattr(model, "has_cls_token", True)
    # A leaf that requires grad gives the autograd graph a root even when every weight is frozen.
    # In the model's precision: a teacher kept in bf16 (--teacher_dtype) takes bf16 pixels.
    dtype = next(model.parameters()).dtype
    pixels = pixel_values.detach().to(dtype if dtype in (torch.float16, torch.bfloat16) else pixel_values.dtype)
    pixels = pixels.requires_grad_(True)
    was_training = model.training
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if method == "gradcam":
        handle = gradcam_layer(vision).register_forward_hook(_keep_output(captured, "tokens"))
    try:
        with torch.enable_grad(), eager_attention(vision):
            out = vision(pixel_values=pixels, output_attentions=method == "rollout")
            if has_cls:
                logits = model.logits_from_features(model.visual_projection(out.pooler_output))
            else:
                pooled, probe_probs = probe_pool(vision.head, out.last_hidden_state)
                logits = model.logits_from_features(pooled)
            score = logits.gather(1, labels.view(-1, 1).to(logits.device)).sum()
            if method == "rollout" and has_cls:
                grads = torch.autograd.grad(score, out.attentions)
                cam = attention_rollout(out.attentions, grads)
            elif method == "rollout":
                *grads, probe_grad = torch.autograd.grad(score, [*out.attentions, probe_probs])
                cam = attention_rollout(out.attentions, grads, start=probe_relevance(probe_probs, probe_grad))
            else:
                tokens = captured["tokens"]
                (grads,) = torch.autograd.grad(score, tokens)
                cam = grad_cam(tokens, grads, cls_token=has_cls)
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
    `CfftImageClassifier`) on any attention kernel (sdpa, flash): for ``rollout`` each block's queries,
    keys, values and attention output ``O`` (the input of ``out_proj``), and for SigLIP the pooling attention's
    query (the probe), keys and output ``Y``; for ``gradcam`` the output of the last block's first LayerNorm.
    Fused kernels never materialise the attention probabilities, so ``cam`` recomputes them,
    ``P = softmax(q k^T * scale)``, and gets their gradient from the output's, ``dS/dP = dS/dO @ v^T`` per head (as
    ``O = P v``): the quantities `compute_cam` takes from the eager path, so the maps agree to float rounding. The
    pooling attention projects ``O`` inside ``torch.nn.MultiheadAttention``, so its ``dS/dO = dS/dY @ W_out``.

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
        self._probe: dict[str, torch.Tensor] = {}
        self._has_cls = getattr(model, "has_cls_token", True)

    def __enter__(self) -> CamRecorder:
        layers = self.model.vision_model.encoder.layers
        self._blocks, self._tokens, self._probe = [], None, {}
        if self.method == "rollout" and not self._has_cls:
            self._handles.append(
                self.model.vision_model.head.attention.register_forward_hook(self._keep_probe, with_kwargs=True)
            )
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

    def _keep_probe(self, module, args, kwargs, output) -> None:
        query, key = (args[0], args[1]) if len(args) >= 2 else (kwargs["query"], kwargs["key"])
        self._probe = {"query": query, "key": key, "mask": kwargs.get("key_padding_mask"), "out": output[0]}

    def cam(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CAM of class ``labels`` [B] for the recorded forward whose ``logits`` [B, K] are given -> [B, h, w].

        Max-normalised like `compute_cam`. Takes gradients of the true-class logits with respect to recorded
        activations only (``retain_graph=True``): no parameter gradient is accumulated and the graph stays usable.
        """
        if self._handles:
            raise RuntimeError("CamRecorder.cam() must be called after the with block that recorded the forward")
        score = logits.gather(1, labels.view(-1, 1).to(logits.device)).sum()
        if self.method == "rollout":
            if (
                not self._blocks
                or any(len(block) != 4 for block in self._blocks)
                or self._has_cls == bool(self._probe)
            ):
                raise RuntimeError("no forward of the model was recorded inside the with block")
            outs = [block["out"] for block in self._blocks] + ([] if self._has_cls else [self._probe["out"]])
            grads = torch.autograd.grad(score, outs, retain_graph=True)
            start = None
            if not self._has_cls:
                *grads, probe_out_grad = grads
                start = self._probe_relevance(probe_out_grad)
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
                cam = attention_rollout(attentions, attention_grads, start=start)
        else:
            if self._tokens is None:
                raise RuntimeError("no forward of the model was recorded inside the with block")
            (grads,) = torch.autograd.grad(score, self._tokens, retain_graph=True)
            cam = grad_cam(self._tokens.detach(), grads, cls_token=self._has_cls)
        # Drop the references so the recorded activations are freed with the graph.
        self._blocks, self._tokens, self._probe = [], None, {}
        h, w = self.model.patch_grid
        return normalize_cam(cam.detach().view(-1, h, w))

    def _probe_relevance(self, out_grad: torch.Tensor) -> torch.Tensor:
        """`probe_relevance` of the recorded pooling attention, from the gradient of its output Y [B, 1, D]."""
        attention = self.model.vision_model.head.attention
        probe = self._probe
        with torch.no_grad():
            probs, value = probe_attention_probs(
                attention, probe["query"].detach(), probe["key"].detach(), probe["mask"]
            )
            heads_grad = _split_heads(torch.matmul(out_grad, attention.out_proj.weight), attention.num_heads)
            return probe_relevance(probs, torch.matmul(heads_grad, value.transpose(-1, -2)))


def _keep_output(store: dict, name: str):
    def hook(module, args, output):
        store[name] = output

    return hook


def _keep_input(store: dict, name: str):
    def hook(module, args):
        store[name] = args[0]

    return hook
