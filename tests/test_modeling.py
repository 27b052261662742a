"""Specification of hf_cfft.modeling: the classifier's forward, patch dropping, saving and the Auto/pipeline APIs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _builders import keep_masks, random_images, scramble_removed_patches
from PIL import Image
from transformers import AutoConfig, AutoModelForImageClassification, pipeline

from hf_cfft.modeling import ClipCfftConfig, ClipCfftForImageClassification

# ---- forward ----


def test_logits_are_the_head_applied_to_l2_normalised_image_embeddings(tiny_classifier):
    model, images = tiny_classifier, random_images()
    with torch.no_grad():
        out = model(pixel_values=images)
        embeds = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
    torch.testing.assert_close(out.image_embeds, embeds, atol=1e-5, rtol=1e-5)
    unit = embeds / embeds.norm(dim=-1, keepdim=True)
    expected = unit @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.logits.shape == (3, 3)
    assert out.loss is None and out.cf_image_embeds is None and out.cf_logits is None


def test_logits_do_not_depend_on_the_scale_of_the_embedding(tiny_classifier):
    embeds = torch.randn(2, 16)
    torch.testing.assert_close(
        tiny_classifier.logits_from_features(embeds), tiny_classifier.logits_from_features(embeds * 7.5)
    )


def test_forward_with_labels_returns_the_cross_entropy(tiny_classifier):
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = tiny_classifier(pixel_values=random_images(), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_forward_without_pixel_values_raises(tiny_classifier):
    with pytest.raises(ValueError, match="pixel_values"):
        tiny_classifier(labels=torch.tensor([0]))


def test_patch_grid_follows_the_config(tiny_classifier):
    assert tiny_classifier.patch_grid == (4, 4)


# ---- counterfactual inputs ----


def test_forward_with_counterfactuals_returns_the_same_clean_logits(tiny_classifier):
    model, images, cf = tiny_classifier, random_images(), random_images(seed=5)
    with torch.no_grad():
        plain = model(pixel_values=images)
        both = model(pixel_values=images, cf_pixel_values=cf)  # one concatenated encoder pass
        cf_embeds = model.get_image_features(cf)
    torch.testing.assert_close(both.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.image_embeds, plain.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.cf_image_embeds, cf_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.cf_logits, model.logits_from_features(cf_embeds), atol=1e-5, rtol=1e-5)


def test_forward_with_a_keep_mask_embeds_counterfactuals_without_their_removed_patches(tiny_classifier):
    model, images, cf = tiny_classifier, random_images(), random_images(seed=5)
    keep = keep_masks([6, 6, 6])
    with torch.no_grad():
        plain = model(pixel_values=images)
        out = model(pixel_values=images, cf_pixel_values=cf, cf_patch_keep=keep)
        expected = model.get_image_features(cf, keep)
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cf_image_embeds, expected, atol=1e-6, rtol=1e-6)


# ---- no-fill: removed patches ----


def test_dropping_tokens_equals_masking_them_as_attention_keys(tiny_classifier):
    model, images = tiny_classifier, random_images(4)
    # Image 3 keeps a different number of patches, which forces the key-mask path for the whole batch.
    keep = keep_masks([5, 5, 5, 9])
    with torch.no_grad():
        key_masked = model.get_image_features(images, keep)
        for b in range(4):
            dropped = model.get_image_features(images[b : b + 1], keep[b : b + 1])  # one image: token-drop path
            torch.testing.assert_close(key_masked[b : b + 1], dropped, atol=1e-5, rtol=1e-5)
        uniform = model.get_image_features(images[:3], keep[:3])  # equal counts: token-drop path
    torch.testing.assert_close(uniform, key_masked[:3], atol=1e-5, rtol=1e-5)


def test_keep_mask_accepts_the_grid_shape(tiny_classifier):
    images, keep = random_images(2), keep_masks([4, 4])
    with torch.no_grad():
        flat = tiny_classifier.get_image_features(images, keep)
        grid = tiny_classifier.get_image_features(images, keep.view(2, 4, 4))
    torch.testing.assert_close(flat, grid, atol=0, rtol=0)


def test_keeping_every_patch_equals_no_keep_mask(tiny_classifier):
    images = random_images()
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_classifier.get_image_features(images, torch.ones(3, 16, dtype=torch.bool)),
            tiny_classifier.get_image_features(images),
            atol=1e-6,
            rtol=1e-6,
        )


@pytest.mark.parametrize("removed", [[6, 6, 6], [2, 6, 11]], ids=["token-drop", "key-mask"])
def test_cls_output_ignores_the_contents_of_removed_patches(tiny_classifier, removed):
    model, images, keep = tiny_classifier, random_images(), keep_masks(removed)
    scrambled = scramble_removed_patches(images, keep)
    assert not torch.equal(scrambled, images)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(scrambled, keep), model.get_image_features(images, keep), atol=1e-6, rtol=1e-6
        )
        # Without the keep mask the same change does move the features: the check above is not vacuous.
        assert (model.get_image_features(scrambled) - model.get_image_features(images)).abs().max() > 1e-3


def test_removing_patches_changes_the_embedding(tiny_classifier):
    images = random_images()
    with torch.no_grad():
        full = tiny_classifier.get_image_features(images)
        partial = tiny_classifier.get_image_features(images, keep_masks([6, 6, 6]))
    assert (full - partial).abs().max() > 1e-3


# ---- saving, loading, Auto classes, pipeline ----


def test_save_pretrained_writes_safetensors_and_from_pretrained_restores_the_logits(tiny_classifier, tmp_path):
    tiny_classifier.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    loaded = ClipCfftForImageClassification.from_pretrained(tmp_path).eval()
    images = random_images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=images).logits, tiny_classifier(pixel_values=images).logits)
    for name, tensor in tiny_classifier.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_auto_classes_load_the_hf_cfft_classes_with_labels(tiny_classifier, tmp_path):
    tiny_classifier.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is ClipCfftConfig
    assert config.model_type == "clip_cfft"
    assert config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    assert config.label2id == {"cat": 0, "dog": 1, "fox": 2}
    assert config.num_labels == 3 and config.projection_dim == 16
    assert config.vision_config.patch_size == 8 and config.vision_config.image_size == 32
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(model) is ClipCfftForImageClassification
    images = random_images()
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(pixel_values=images).logits, tiny_classifier(pixel_values=images).logits
        )


def test_image_classification_pipeline_returns_labels_from_id2label(tiny_classifier, tiny_image_processor, tmp_path):
    tiny_classifier.save_pretrained(tmp_path)
    tiny_image_processor.save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    predictions = classify(image)
    assert sorted(p["label"] for p in predictions) == ["cat", "dog", "fox"]
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    # The pipeline's scores are the model's softmax on the processed image.
    pixels = tiny_image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = tiny_classifier(pixel_values=pixels).logits.softmax(-1)[0]
    for p in predictions:
        assert p["score"] == pytest.approx(probs[tiny_classifier.config.label2id[p["label"]]].item(), abs=1e-5)
