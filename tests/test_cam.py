"""Specification of hf_cfft.cam: attention rollout, GradCAM, normalisation and the CAM of a classifier."""

import numpy as np
import pytest
import torch

from hf_cfft.cam import attention_rollout, compute_cam, grad_cam, normalize_cam

# ---- attention rollout on hand-built matrices (B=1, 1 head, T=3: CLS + 2 patches) ----

A1 = [[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
G1 = [[1.0, 2.0, -1.0], [0.5, 1.0, 1.0], [1.0, -2.0, 1.0]]
A2 = [[0.6, 0.1, 0.3], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]]
G2 = [[1.0, 4.0, -2.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]

# By hand:
#   W1 = clamp(G1 * A1, 0) = [[0.5, 0.6, 0], [0.05, 0.8, 0.1], [0.2, 0, 0.6]]
#   R1 = I + W1 @ I       = [[1.5, 0.6, 0], [0.05, 1.8, 0.1], [0.2, 0, 1.6]]
#   W2 = clamp(G2 * A2, 0) = [[0.6, 0.4, 0], [0.3, 0.3, 0.4], [0.5, 0.5, 1.0]]
#   row 0 of W2 @ R1 = 0.6 * [1.5, 0.6, 0] + 0.4 * [0.05, 1.8, 0.1] = [0.92, 1.08, 0.04]
#   row 0 of R2 = [1.5, 0.6, 0] + [0.92, 1.08, 0.04] = [2.42, 1.68, 0.04]
# The CAM is row CLS over the patch tokens: [1.68, 0.04].
HAND_ROLLOUT = [1.68, 0.04]


def _t(matrix):
    return torch.tensor(matrix, dtype=torch.float32).view(1, 1, 3, 3)


def test_attention_rollout_matches_the_hand_computed_two_block_example():
    cam = attention_rollout([_t(A1), _t(A2)], [_t(G1), _t(G2)])
    assert cam.shape == (1, 2)
    torch.testing.assert_close(cam, torch.tensor([HAND_ROLLOUT]), atol=1e-6, rtol=0)


def _numpy_rollout(attentions, grads):
    """Reference: R = I; R += mean_heads(max(g * a, 0)) @ R per block; row 0, tokens 1: (explicit loops)."""
    batch, heads, tokens, _ = attentions[0].shape
    out = np.zeros((batch, tokens - 1))
    for b in range(batch):
        relevance = np.eye(tokens)
        for attn, grad in zip(attentions, grads):
            weighted = np.zeros((tokens, tokens))
            for h in range(heads):
                weighted += np.maximum(grad[b, h] * attn[b, h], 0.0) / heads
            relevance = relevance + weighted @ relevance
        out[b] = relevance[0, 1:]
    return out


def test_attention_rollout_clamps_per_head_before_averaging_heads_and_is_per_image():
    rng = np.random.default_rng(0)
    attentions = [rng.dirichlet(np.ones(5), size=(2, 3, 5)) for _ in range(3)]  # B=2, 3 heads, T=5
    grads = [rng.normal(size=(2, 3, 5, 5)) for _ in range(3)]
    # Head 1 of block 0 is the exact negative of head 0: clamping after the head mean would zero both.
    grads[0][:, 1] = -grads[0][:, 0]
    attentions[0][:, 1] = attentions[0][:, 0]
    expected = _numpy_rollout(attentions, grads)
    cam = attention_rollout([torch.tensor(a) for a in attentions], [torch.tensor(g) for g in grads])
    assert cam.shape == (2, 4)
    np.testing.assert_allclose(cam.numpy(), expected, rtol=1e-5, atol=1e-6)
    single = attention_rollout([torch.tensor(a[1:]) for a in attentions], [torch.tensor(g[1:]) for g in grads])
    np.testing.assert_allclose(single.numpy(), expected[1:], rtol=1e-5, atol=1e-6)


def test_attention_rollout_of_all_negative_gradients_is_zero():
    cam = attention_rollout([_t(A1)], [-torch.ones(1, 1, 3, 3)])
    assert torch.equal(cam, torch.zeros(1, 2))  # relevance stays the identity, whose CLS row has no patch mass


def test_attention_rollout_needs_one_gradient_per_map():
    with pytest.raises(ValueError, match="2 maps and 1 grads"):
        attention_rollout([_t(A1), _t(A2)], [_t(G1)])
    with pytest.raises(ValueError):
        attention_rollout([], [])


# ---- GradCAM ----


def test_grad_cam_matches_the_hand_computed_example():
    # CLS + 2 patches, 2 channels. The CLS gradient counts in the channel weights (the reference's sum over all
    # tokens); the CLS activation is not part of the map.
    tokens = torch.tensor([[[9.0, 9.0], [1.0, 3.0], [3.0, -1.0]]])
    grads = torch.tensor([[[1.0, -2.0], [1.0, 0.0], [3.0, -2.0]]])
    # Channel weights = gradient summed over CLS and patches = [1 + 1 + 3, -2 + 0 - 2] = [5, -4].
    # Patch 1: 1 * 5 + 3 * -4 = -7 -> clamped to 0.  Patch 2: 3 * 5 + -1 * -4 = 19.
    cam = grad_cam(tokens, grads)
    torch.testing.assert_close(cam, torch.tensor([[0.0, 19.0]]), atol=0, rtol=0)
    # Without the CLS gradient the weights would be [4, -2] and patch 1 would score 1 * 4 + 3 * -2 = -2 -> 0,
    # patch 2 3 * 4 + 2 = 14: the CLS row changes the map.
    assert not torch.equal(cam, torch.tensor([[0.0, 14.0]]))


# ---- normalisation ----


def test_normalize_cam_scales_each_map_to_max_one_and_keeps_zero_maps_zero():
    cam = torch.tensor(
        [
            [[0.5, 2.0], [1.0, 0.0]],
            [[0.0, 0.0], [0.0, 0.0]],
            [[0.03, 0.01], [0.0, 0.02]],
        ]
    )
    out = normalize_cam(cam)
    expected = torch.tensor(
        [
            [[0.25, 1.0], [0.5, 0.0]],
            [[0.0, 0.0], [0.0, 0.0]],
            [[1.0, 1 / 3], [0.0, 2 / 3]],
        ]
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert out.flatten(1).amax(dim=1).tolist() == [1.0, 0.0, 1.0]
    assert torch.isfinite(out).all()


# ---- compute_cam on the tiny classifier ----


def _images(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=generator)


@pytest.mark.parametrize("method", ["rollout", "gradcam"])
def test_compute_cam_returns_a_max_normalised_map_over_the_patch_grid(tiny_classifier, method):
    cam = compute_cam(tiny_classifier, _images(), torch.tensor([0, 1, 2]), method)
    assert cam.shape == (3, 4, 4)
    assert not cam.requires_grad
    torch.testing.assert_close(cam.flatten(1).amax(dim=1), torch.ones(3))
    assert (cam >= 0).all() and (cam <= 1).all()


def test_compute_cam_rollout_equals_rollout_of_the_models_own_attentions(tiny_classifier):
    """The CAM is the rollout of the eager attention maps and the gradients of the true-class logit."""
    model, images, labels = tiny_classifier, _images(), torch.tensor([2, 0, 1])
    model.vision_model.config._attn_implementation = "eager"  # only eager returns attention probabilities
    out = model.vision_model(pixel_values=images, output_attentions=True)
    logits = model.logits_from_features(model.visual_projection(out.pooler_output))
    grads = torch.autograd.grad(logits[torch.arange(3), labels].sum(), out.attentions)
    expected = attention_rollout([a.detach() for a in out.attentions], grads)
    expected = expected / expected.amax(dim=1, keepdim=True)
    model.vision_model.config._attn_implementation = "sdpa"
    cam = compute_cam(model, images, labels, "rollout")
    torch.testing.assert_close(cam.flatten(1), expected, atol=1e-5, rtol=1e-5)


def test_compute_cam_gradcam_reads_the_last_blocks_first_layer_norm(tiny_classifier):
    model, images, labels = tiny_classifier, _images(), torch.tensor([1, 2, 0])
    captured = {}

    def grab(module, args, output):
        captured["tokens"] = output

    handle = model.vision_model.encoder.layers[-1].layer_norm1.register_forward_hook(grab)
    try:
        out = model.vision_model(pixel_values=images)
    finally:
        handle.remove()
    logits = model.logits_from_features(model.visual_projection(out.pooler_output))
    (grads,) = torch.autograd.grad(logits[torch.arange(3), labels].sum(), captured["tokens"])
    weights = grads.sum(dim=1, keepdim=True)  # every token, CLS included
    expected = (weights * captured["tokens"][:, 1:]).sum(-1).clamp(min=0).detach()
    expected = expected / expected.amax(dim=1, keepdim=True)
    cam = compute_cam(model, images, labels, "gradcam")
    torch.testing.assert_close(cam.flatten(1), expected, atol=1e-5, rtol=1e-5)


def test_compute_cam_works_on_a_frozen_model_and_leaves_no_parameter_gradients(tiny_classifier):
    model = tiny_classifier.requires_grad_(False)
    cam = compute_cam(model, _images(), torch.tensor([0, 1, 2]))
    assert torch.isfinite(cam).all() and cam.flatten(1).amax(dim=1).eq(1).all()
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_compute_cam_on_a_trainable_model_accumulates_no_parameter_gradients(tiny_classifier):
    images = _images()
    pixels_before = images.clone()
    compute_cam(tiny_classifier, images, torch.tensor([0, 1, 2]))
    assert all(p.grad is None for p in tiny_classifier.parameters())
    assert not images.requires_grad and torch.equal(images, pixels_before)


@pytest.mark.parametrize("method", ["rollout", "gradcam"])
def test_compute_cam_restores_the_attention_implementation(tiny_classifier, method):
    assert tiny_classifier.config._attn_implementation == "sdpa"
    compute_cam(tiny_classifier, _images(), torch.tensor([0, 1, 2]), method)
    assert tiny_classifier.config._attn_implementation == "sdpa"
    assert tiny_classifier.vision_model.config._attn_implementation == "sdpa"
    for layer in tiny_classifier.vision_model.encoder.layers:
        assert layer.self_attn.config._attn_implementation == "sdpa"


def test_compute_cam_restores_the_attention_implementation_after_an_error(tiny_classifier):
    with pytest.raises((IndexError, RuntimeError)):
        compute_cam(tiny_classifier, _images(), torch.tensor([0, 1, 7]))  # class 7 does not exist
    assert tiny_classifier.vision_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compute_cam_restores_train_or_eval_mode(tiny_classifier, mode):
    tiny_classifier.train(mode == "train")
    compute_cam(tiny_classifier, _images(), torch.tensor([0, 1, 2]))
    assert all(module.training == (mode == "train") for module in tiny_classifier.modules())


def test_compute_cam_is_the_same_in_train_and_eval_mode(tiny_classifier):
    images, labels = _images(), torch.tensor([0, 1, 2])
    eval_cam = compute_cam(tiny_classifier.eval(), images, labels)
    train_cam = compute_cam(tiny_classifier.train(), images, labels)
    torch.testing.assert_close(train_cam, eval_cam)


def test_compute_cam_depends_on_the_label(tiny_classifier):
    images = _images()
    for method in ("rollout", "gradcam"):
        cam_a = compute_cam(tiny_classifier, images, torch.tensor([0, 0, 0]), method)
        cam_b = compute_cam(tiny_classifier, images, torch.tensor([1, 1, 1]), method)
        for i in range(3):
            assert (cam_a[i] - cam_b[i]).abs().max() > 1e-3, f"{method}: image {i} has the same CAM for two classes"


def test_compute_cam_of_an_image_does_not_depend_on_the_rest_of_the_batch(tiny_classifier):
    images, labels = _images(4), torch.tensor([0, 1, 2, 0])
    batched = compute_cam(tiny_classifier, images, labels)
    alone = compute_cam(tiny_classifier, images[2:3], labels[2:3])
    torch.testing.assert_close(batched[2:3], alone, atol=1e-5, rtol=1e-5)


def test_compute_cam_rejects_unknown_methods(tiny_classifier):
    with pytest.raises(ValueError, match="'saliency'"):
        compute_cam(tiny_classifier, _images(), torch.tensor([0, 1, 2]), "saliency")
