"""SigLIP, SigLIP 2 (fixed resolution) and MetaCLIP 2 towers: classifier, zero-shot head, no-fill, CAMs, loading.

Tiny checkpoints are built in code (`_family_builders`); CLIP is included where a test states a cross-family rule.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _builders import keep_masks, random_images, save_tiny_clip, scramble_removed_patches
from _family_builders import FAMILY_NAMES, save_tiny_family, tiny_image_processor, tiny_model, tiny_tokenizer
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, Siglip2Config, Siglip2Model, pipeline

from hf_cfft import (
    CfftImageClassifier,
    ClipCfftForImageClassification,
    attention_rollout,
    build_zeroshot_head,
    compute_cam,
    grad_cam,
    load_classifier,
)
from hf_cfft.cam import CamRecorder, probe_pool, probe_relevance
from hf_cfft.families import tokenizer_kwargs
from hf_cfft.modeling import attention_pool

CLASSES = ["cat", "dog", "fox"]
TEMPLATE = ["This is a photo of {}."]
EXPECTED_FAMILY = {"siglip": "siglip", "siglip2": "siglip", "metaclip_2": "metaclip_2", "clip": "clip"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    folders = {family: save_tiny_family(root / family, family) for family in FAMILY_NAMES}
    folders["clip"] = save_tiny_clip(root / "clip")
    return folders


@pytest.fixture(scope="module")
def classifiers(checkpoints):
    return {
        family: load_classifier(str(path), class_names=CLASSES, templates=TEMPLATE, show_progress=False).eval()
        for family, path in checkpoints.items()
    }


@pytest.fixture
def siglip_classifier(classifiers):
    return classifiers["siglip"]


# ---- the classifier ----


@pytest.mark.parametrize("family", [*FAMILY_NAMES, "clip"])
def test_each_checkpoint_becomes_a_classifier_of_its_family(classifiers, family):
    model = classifiers[family]
    assert isinstance(model, CfftImageClassifier)
    assert model.config.family == EXPECTED_FAMILY[family]
    # CLIP keeps the class and model type its folders have always had; the others say they are not CLIP.
    assert isinstance(model, ClipCfftForImageClassification) == (family == "clip")
    assert model.config.model_type == ("clip_cfft" if family == "clip" else "cfft_classifier")
    assert hasattr(model, "visual_projection") == (family in ("clip", "metaclip_2"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_distilled_feature_is_the_family_models_image_embedding(classifiers, checkpoints, family):
    # SigLIP: the attention-pooling head's output (no projection); MetaCLIP 2: the projected CLS output.
    pretrained = type(tiny_model(family)).from_pretrained(checkpoints[family]).eval()
    images = random_images()
    with torch.no_grad():
        expected = pretrained.get_image_features(pixel_values=images).pooler_output
        torch.testing.assert_close(classifiers[family].get_image_features(images), expected, atol=1e-6, rtol=1e-6)


# ---- zero-shot heads ----


@pytest.mark.parametrize("family", [*FAMILY_NAMES, "clip"])
def test_zero_shot_logits_equal_the_family_models_own_image_text_logits(classifiers, checkpoints, family):
    from transformers import AutoTokenizer, CLIPModel

    model_class = CLIPModel if family == "clip" else type(tiny_model(family))
    pretrained = model_class.from_pretrained(checkpoints[family]).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[family])
    prompts = [TEMPLATE[0].format(name) for name in CLASSES]
    text = tokenizer(prompts, return_tensors="pt", **tokenizer_kwargs(pretrained))
    images = random_images()
    with torch.no_grad():
        own = pretrained(pixel_values=images, **text).logits_per_image  # SigLIP: scale * cos + logit_bias
        ours = classifiers[family](pixel_values=images).logits
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5)


def test_siglip_prompts_are_padded_to_the_text_towers_length_and_clip_prompts_to_the_longest(checkpoints):
    from transformers import CLIPModel

    siglip = tiny_model("siglip")
    assert tokenizer_kwargs(siglip) == {"padding": "max_length", "max_length": 16, "truncation": True}
    assert tokenizer_kwargs(CLIPModel.from_pretrained(checkpoints["clip"]))["padding"] is True


def test_siglip_head_bias_starts_at_logit_bias_and_clip_families_at_zero(classifiers):
    assert torch.equal(classifiers["siglip"].classifier.bias, torch.full((3,), -2.0))
    assert torch.equal(classifiers["metaclip_2"].classifier.bias, torch.zeros(3))
    weights, bias = build_zeroshot_head(tiny_model("siglip"), tiny_tokenizer("siglip"), CLASSES, TEMPLATE)
    assert bias == -2.0 and weights.shape == (3, 32)
    torch.testing.assert_close(weights.norm(dim=-1), torch.full((3,), 10.0))  # rows of norm logit_scale.exp()


def test_siglip_padding_matters_so_the_convention_is_not_vacuous():
    model, tokenizer = tiny_model("siglip"), tiny_tokenizer("siglip")
    with torch.no_grad():
        full = model.get_text_features(
            **tokenizer(["a cat"], padding="max_length", max_length=16, return_tensors="pt")
        )
        short = model.get_text_features(**tokenizer(["a cat"], padding=True, return_tensors="pt"))
    assert (full.pooler_output - short.pooler_output).abs().max() > 1e-3


def test_siglip2_naflex_checkpoints_are_refused_with_the_fixed_resolution_alternative(tmp_path):
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    Siglip2Model(
        Siglip2Config(text_config={**tiny, "vocab_size": 32}, vision_config={**tiny, "patch_size": 8})
    ).save_pretrained(tmp_path / "naflex")
    with pytest.raises(ValueError, match="NaFlex.*fixed-resolution SigLIP 2 checkpoint"):
        load_classifier(str(tmp_path / "naflex"), class_names=CLASSES, templates=TEMPLATE)


# ---- no-fill without a CLS token ----


def test_siglip_dropping_tokens_equals_masking_them_in_the_encoder_and_the_pooling_attention(siglip_classifier):
    model, images = siglip_classifier, random_images(4)
    keep = keep_masks([5, 5, 5, 9])  # image 3 keeps a different count: the key-mask path for the whole batch
    with torch.no_grad():
        key_masked = model.get_image_features(images, keep)
        for b in range(4):
            dropped = model.get_image_features(images[b : b + 1], keep[b : b + 1])
            torch.testing.assert_close(key_masked[b : b + 1], dropped, atol=1e-5, rtol=1e-5)
        uniform = model.get_image_features(images[:3], keep[:3])
    torch.testing.assert_close(uniform, key_masked[:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("removed", [[6, 6, 6], [2, 6, 11]], ids=["token-drop", "key-mask"])
@pytest.mark.parametrize("family", ["siglip", "metaclip_2"])
def test_pooled_output_ignores_the_contents_of_removed_patches(classifiers, family, removed):
    model, images, keep = classifiers[family], random_images(), keep_masks(removed)
    scrambled = scramble_removed_patches(images, keep)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(scrambled, keep), model.get_image_features(images, keep), atol=1e-5, rtol=1e-5
        )
        assert (model.get_image_features(scrambled) - model.get_image_features(images)).abs().max() > 1e-3


@pytest.mark.parametrize("others_removed", [16, 5], ids=["all-empty", "mixed"])
def test_siglip_image_with_every_patch_removed_gets_a_finite_feature_of_no_patch(siglip_classifier, others_removed):
    # Without a CLS token nothing is left: the probe attends to nothing (a softmax over no keys would be NaN).
    model, images = siglip_classifier, random_images(2)
    keep = keep_masks([16, others_removed])
    scrambled = scramble_removed_patches(images, keep)
    with torch.no_grad():
        features = model.get_image_features(images, keep)
        assert torch.isfinite(features).all()
        torch.testing.assert_close(model.get_image_features(scrambled, keep), features, atol=1e-5, rtol=1e-5)


def test_siglip_keeping_every_patch_equals_no_keep_mask(siglip_classifier):
    images = random_images()
    with torch.no_grad():
        torch.testing.assert_close(
            siglip_classifier.get_image_features(images, torch.ones(3, 16, dtype=torch.bool)),
            siglip_classifier.get_image_features(images),
            atol=1e-6,
            rtol=1e-6,
        )


def test_attention_pool_without_a_mask_is_the_heads_own_forward(siglip_classifier):
    hidden = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    head = siglip_classifier.vision_model.head
    with torch.no_grad():
        assert torch.equal(attention_pool(head, hidden), head(hidden))
        torch.testing.assert_close(probe_pool(head, hidden)[0], head(hidden), atol=1e-6, rtol=1e-6)


# ---- CAMs of probe-pooled towers ----


def test_probe_rollout_matches_the_hand_computed_example():
    # 1 head, 2 tokens, no CLS. Probe: attention [0.25, 0.75], gradient [2, -1] -> relevance [0.5, 0] (clamped).
    probe_attn = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2)
    probe_grad = torch.tensor([2.0, -1.0]).view(1, 1, 1, 2)
    start = probe_relevance(probe_attn, probe_grad)
    torch.testing.assert_close(start, torch.tensor([[0.5, 0.0]]))
    # One block: W = clamp(grad * attn) = [[0.2, 0.3], [0.0, 0.4]]; r = r + r @ W = [0.5, 0] + [0.1, 0.15].
    attn = torch.tensor([[0.4, 0.6], [0.5, 0.5]]).view(1, 1, 2, 2)
    grad = torch.tensor([[0.5, 0.5], [-1.0, 0.8]]).view(1, 1, 2, 2)
    torch.testing.assert_close(attention_rollout([attn], [grad], start=start), torch.tensor([[0.6, 0.15]]))


def test_probe_relevance_clamps_per_head_before_averaging():
    attn = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(1, 2, 1, 2)
    grad = torch.tensor([[1.0, 1.0], [-4.0, 2.0]]).view(1, 2, 1, 2)
    # head 0: [1, 0]; head 1: clamp([-2, 1]) = [0, 1]; mean -> [0.5, 0.5] (without the clamp: [-0.5, 0.5]).
    torch.testing.assert_close(probe_relevance(attn, grad), torch.tensor([[0.5, 0.5]]))


def test_grad_cam_without_cls_reads_every_token():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    grads = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # channel weights [1, 1]
    torch.testing.assert_close(grad_cam(tokens, grads, cls_token=False), torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(grad_cam(tokens, grads), torch.tensor([[2.0]]))  # with CLS: token 0 is dropped


@pytest.mark.parametrize("method", ["rollout", "gradcam"])
@pytest.mark.parametrize("family", ["siglip", "metaclip_2"])
def test_training_forward_cam_equals_compute_cam(classifiers, family, method):
    model, images, labels = classifiers[family], random_images(), torch.tensor([0, 1, 2])
    expected = compute_cam(model, images, labels, method)
    assert expected.shape == (3, 4, 4) and torch.allclose(expected.flatten(1).amax(1), torch.ones(3))
    with torch.enable_grad():
        with CamRecorder(model, method) as recorder:
            logits = model(pixel_values=images).logits  # sdpa, as in training
        cam = recorder.cam(logits, labels)
    torch.testing.assert_close(cam, expected, atol=1e-5, rtol=1e-4)


def test_siglip_rollout_reads_the_probes_attention_pushed_through_the_blocks(siglip_classifier):
    model, images, labels = siglip_classifier, random_images(), torch.tensor([0, 1, 2])
    vision = model.vision_model
    pixels = images.clone().requires_grad_(True)
    vision.config._attn_implementation = "eager"
    try:
        out = vision(pixel_values=pixels, output_attentions=True)
    finally:
        vision.config._attn_implementation = "sdpa"
    pooled, probe_attn = probe_pool(vision.head, out.last_hidden_state)
    score = model.logits_from_features(pooled).gather(1, labels.view(-1, 1)).sum()
    *grads, probe_grad = torch.autograd.grad(score, [*out.attentions, probe_attn])
    row = probe_relevance(probe_attn, probe_grad).unsqueeze(1)
    for attn, grad in reversed(list(zip(out.attentions, grads))):
        row = row + row @ (grad * attn).clamp(min=0).mean(dim=1)
    expected = row[:, 0] / row[:, 0].amax(dim=1, keepdim=True)
    torch.testing.assert_close(
        compute_cam(model, images, labels, "rollout").flatten(1), expected, atol=1e-5, rtol=1e-5
    )


def test_siglip_cam_leaves_no_parameter_gradients_and_depends_on_the_label(siglip_classifier):
    model, images = siglip_classifier, random_images()
    first = compute_cam(model, images, torch.tensor([0, 0, 0]))
    second = compute_cam(model, images, torch.tensor([1, 1, 1]))
    assert all(p.grad is None for p in model.parameters())
    assert not torch.allclose(first, second)


# ---- saving, Auto classes, pipeline, remote code ----


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_saved_classifier_reloads_to_identical_logits_and_runs_in_pipeline(classifiers, family, tmp_path):
    model = classifiers[family]
    model.save_pretrained(tmp_path)
    tiny_image_processor(family).save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(again) is CfftImageClassifier and again.config.family == EXPECTED_FAMILY[family]
    images = random_images()
    with torch.no_grad():
        assert torch.equal(again(images).logits, model(images).logits)
    from PIL import Image

    predictions = pipeline("image-classification", model=str(tmp_path))(Image.new("RGB", (40, 36), (9, 99, 200)))
    assert {p["label"] for p in predictions} == set(CLASSES)


_LOAD_WITHOUT_HF_CFFT = """
import json, sys
sys.modules["hf_cfft"] = None  # as if hf_cfft were not installed
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline

folder, tensors = sys.argv[1], load_file(sys.argv[2])
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("hf_cfft"), type(model).__module__
with torch.no_grad():
    logits = model(pixel_values=tensors["pixel_values"]).logits
classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
predictions = classifier(Image.new("RGB", (40, 36), (200, 30, 60)))
print(json.dumps({"equal": bool(torch.equal(logits, tensors["logits"])), "labels": [p["label"] for p in predictions]}))
"""


def test_siglip_classifier_loads_as_remote_code_where_hf_cfft_is_not_installed(siglip_classifier, tmp_path):
    saved = tmp_path / "saved"
    siglip_classifier.save_pretrained(saved)
    tiny_image_processor("siglip").save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling.CfftClassifierConfig",
        "AutoModelForImageClassification": "modeling.CfftImageClassifier",
    }
    fresh = Path(shutil.copytree(saved, tmp_path / "elsewhere" / "model"))
    pixel_values = random_images()
    with torch.no_grad():
        logits = siglip_classifier(pixel_values=pixel_values).logits
    save_file({"pixel_values": pixel_values, "logits": logits.contiguous()}, str(tmp_path / "expected.safetensors"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_HF_CFFT, str(fresh), str(tmp_path / "expected.safetensors")],
        cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["equal"] and set(out["labels"]) == set(CLASSES)
