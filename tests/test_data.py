"""Specification of hf_cfft.data: the with_transform step, the collator and teacher-CAM pre-computation."""

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage

from hf_cfft.cam import compute_cam
from hf_cfft.data import CounterfactualCollator, CounterfactualTransform, precompute_cams, preprocess_images
from hf_cfft.masking import patchify

GRID = (4, 4)
PATCH = 8
THRESHOLD = 0.3


def _pil_images():
    """Five images of different sizes and modes (RGB, grayscale 'L', RGBA), as user folders have."""
    rng = np.random.default_rng(0)
    shapes = [(32, 32, "RGB"), (40, 36, "L"), (48, 33, "RGBA"), (35, 50, "RGB"), (33, 33, "L")]
    images = []
    for height, width, mode in shapes:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        images.append(PILImage.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode))
    return images


def _cams(n, seed=0):
    rng = np.random.default_rng(seed)
    cams = rng.random((n, 16)).astype(np.float32)
    cams[:, 0] = 1.0  # max-normalised
    cams[:, 1] = THRESHOLD  # exactly at the threshold: not part of the object
    return cams


@pytest.fixture
def dataset():
    images = _pil_images()
    features = Features({"image": Image(), "label": Value("int64"), "cam": Sequence(Value("float32"))})
    return Dataset.from_dict(
        {"image": images, "label": [0, 1, 2, 1, 0], "cam": _cams(len(images)).tolist()}, features=features
    )


def _transform(processor, **kwargs):
    kwargs = {"grid": GRID, "mask_kind": "object", "mask_threshold": THRESHOLD, "num_labels": 3, **kwargs}
    return CounterfactualTransform(processor, **kwargs)


# ---- CounterfactualTransform ----


def test_transform_gives_clip_pixel_values_and_the_object_mask_of_the_cam(dataset, tiny_image_processor):
    transformed = dataset.with_transform(_transform(tiny_image_processor))
    cams = torch.tensor(_cams(5)).view(5, *GRID)
    for i in range(5):
        example = transformed[i]
        pixels = torch.as_tensor(example["pixel_values"])
        assert pixels.shape == (3, 32, 32)
        expected = preprocess_images(tiny_image_processor, [dataset[i]["image"].convert("RGB")])[0]
        torch.testing.assert_close(pixels, expected)
        assert example["labels"] == dataset[i]["label"]
        mask = torch.as_tensor(example["cf_mask"])
        assert mask.dtype == torch.bool
        assert torch.equal(mask, cams[i] > THRESHOLD)
        assert not mask[0, 1]  # CAM == threshold is context


def test_transform_turns_grayscale_into_three_equal_channels(dataset, tiny_image_processor):
    pixels = torch.as_tensor(dataset.with_transform(_transform(tiny_image_processor))[1]["pixel_values"])
    mean = torch.tensor(tiny_image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(tiny_image_processor.image_std).view(3, 1, 1)
    raw = pixels * std + mean  # undo the per-channel normalisation
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[0], raw[2], atol=1e-5, rtol=0)


def test_transform_cuts_the_context_mask_as_the_complement(dataset, tiny_image_processor):
    transformed = dataset.with_transform(_transform(tiny_image_processor, mask_kind="context"))
    cams = torch.tensor(_cams(5)).view(5, *GRID)
    for i in range(5):
        assert torch.equal(torch.as_tensor(transformed[i]["cf_mask"]), cams[i] <= THRESHOLD)


@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_transform_cuts_no_mask_unless_the_mask_comes_from_the_cam(dataset, tiny_image_processor, mask_kind):
    example = dataset.with_transform(_transform(tiny_image_processor, mask_kind=mask_kind))[0]
    assert "cf_mask" not in example and torch.as_tensor(example["pixel_values"]).shape == (3, 32, 32)


def test_transform_without_a_cam_column_cuts_no_mask(dataset, tiny_image_processor):
    example = dataset.remove_columns("cam").with_transform(_transform(tiny_image_processor))[0]
    assert set(example) == {"pixel_values", "labels"}


@pytest.mark.parametrize("bad_label", [3, 7, -1])
def test_label_out_of_range_raises_naming_the_label_and_the_valid_range(tiny_image_processor, bad_label):
    transform = _transform(tiny_image_processor)
    batch = {"image": _pil_images()[:2], "label": [0, bad_label], "cam": _cams(2).tolist()}
    with pytest.raises(ValueError, match=rf"label {bad_label} .*0\.\.2"):
        transform(batch)


def test_label_out_of_range_raises_through_the_dataset(dataset, tiny_image_processor):
    bad = dataset.map(lambda example: {"label": 5} if example["label"] == 2 else {})
    transformed = bad.with_transform(_transform(tiny_image_processor))
    transformed[0]  # fine
    with pytest.raises(ValueError, match=r"label 5 .*0\.\.2"):
        transformed[2]


@pytest.mark.parametrize(("option", "column"), [("image_column", "img"), ("label_column", "fine_label")])
def test_missing_column_raises_naming_the_column(dataset, tiny_image_processor, option, column):
    transformed = dataset.with_transform(_transform(tiny_image_processor, **{option: column}))
    with pytest.raises(KeyError, match=column):
        transformed[0]


def test_flip_augmentation_flips_the_cam_together_with_the_image(tiny_image_processor):
    # Left half bright, right half dark; CAM hot on the left two patch columns only.
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:, :16] = 230
    array[:5, :5] = 90  # also asymmetric top/bottom, so a vertical flip would be caught too
    image = PILImage.fromarray(array)
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[:, :2] = [[1.0, 0.6], [0.8, 0.1], [0.9, 0.5], [0.7, 0.2]]
    batch = {"image": [image] * 16, "label": [0] * 16, "cam": [cam.reshape(-1).tolist()] * 16}
    plain = preprocess_images(tiny_image_processor, [image])[0]
    mask = torch.tensor(cam) > THRESHOLD
    torch.manual_seed(0)
    out = _transform(tiny_image_processor, augment="flip")(batch)
    flips = 0
    for pixels, cf_mask in zip(out["pixel_values"], out["cf_mask"]):
        if torch.equal(pixels, plain):
            assert torch.equal(cf_mask, mask)
        else:
            assert torch.equal(pixels, plain.flip(-1)), "flip must mirror left-right only"
            assert torch.equal(cf_mask, mask.flip(-1))
            flips += 1
    assert 0 < flips < 16, "both flipped and unflipped examples should occur"


def test_crop_flip_augmentation_keeps_the_output_shapes_and_a_max_normalised_cam_mask(tiny_image_processor):
    image = _pil_images()[3]
    cam = np.ones(16, dtype=np.float32)  # every patch is object: any crop of it is still all object
    batch = {"image": [image] * 4, "label": [1] * 4, "cam": [cam.tolist()] * 4}
    torch.manual_seed(0)
    out = _transform(tiny_image_processor, augment="crop_flip")(batch)
    for pixels, cf_mask in zip(out["pixel_values"], out["cf_mask"]):
        assert pixels.shape == (3, 32, 32)
        assert cf_mask.shape == GRID and cf_mask.all()


# ---- CounterfactualCollator ----

STRIDE = 1 << 16


def _examples(n=8, with_mask=True):
    """Integer-valued images ``i * STRIDE + base`` so each refilled patch tells its donor image."""
    base = torch.arange(3 * 32 * 32, dtype=torch.float64).view(3, 32, 32)
    examples = []
    for i in range(n):
        example = {"pixel_values": i * STRIDE + base, "labels": i % 3}
        if with_mask:
            mask = torch.zeros(16, dtype=torch.bool)
            mask[torch.randperm(16, generator=torch.Generator().manual_seed(i))[: 4 + i % 5]] = True
            example["cf_mask"] = mask.view(GRID)
        examples.append(example)
    return examples, base


def _donors(cf, base):
    offsets = patchify(cf - base, PATCH) / STRIDE
    assert torch.equal(offsets, offsets[..., :1].expand_as(offsets))
    return offsets[..., 0].long()


def test_collator_refills_the_transform_masks_from_one_partner(tiny_image_processor):
    examples, base = _examples()
    batch = CounterfactualCollator(mask_kind="object", fill_kind="single", mask_ratio=0.5, patch_size=PATCH)(examples)
    assert set(batch) == {"pixel_values", "labels", "cf_pixel_values"}
    assert torch.equal(batch["labels"], torch.tensor([i % 3 for i in range(8)]))
    assert torch.equal(batch["pixel_values"], torch.stack([e["pixel_values"] for e in examples]))
    donors = _donors(batch["cf_pixel_values"], base)
    for i, example in enumerate(examples):
        masked = example["cf_mask"].flatten()
        assert (donors[i][~masked] == i).all()
        partner = set(donors[i][masked].tolist())
        assert len(partner) == 1 and partner != {i}


def _partners(batch, examples, base):
    donors = _donors(batch["cf_pixel_values"], base)
    return [int(donors[i][e["cf_mask"].flatten()][0]) for i, e in enumerate(examples)]


def test_collator_is_seeded_by_content_and_changes_with_the_seed():
    examples, base = _examples()

    def collate(seed):
        return CounterfactualCollator(
            mask_kind="object", fill_kind="single", mask_ratio=0.5, patch_size=PATCH, seed=seed
        )(examples)

    first, second = collate(0), collate(0)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert _partners(collate(0), examples, base) != _partners(collate(1), examples, base)


def test_collator_random_mask_with_no_fill_returns_the_kept_patches():
    examples, base = _examples(4, with_mask=False)
    collator = CounterfactualCollator(mask_kind="random", fill_kind="none", mask_ratio=0.25, patch_size=PATCH)
    batch = collator(examples)
    keep = batch["cf_patch_keep"]
    assert keep.shape == (4, 16) and keep.dtype == torch.bool
    assert keep.sum(dim=1).tolist() == [12] * 4
    cf, clean = patchify(batch["cf_pixel_values"], PATCH), patchify(batch["pixel_values"], PATCH)
    assert torch.equal(cf[keep], clean[keep])
    assert (cf[~keep] == 0).all()
    assert torch.equal(collator(examples)["cf_patch_keep"], keep)


def test_collator_random_mask_with_multi_fill_masks_round_ratio_patches():
    examples, base = _examples(4, with_mask=False)
    batch = CounterfactualCollator(mask_kind="random", fill_kind="multi", mask_ratio=0.5, patch_size=PATCH)(examples)
    assert "cf_patch_keep" not in batch
    donors = _donors(batch["cf_pixel_values"], base)
    refilled = donors != torch.arange(4).view(-1, 1)
    assert refilled.sum(dim=1).tolist() == [8] * 4


def test_collator_skips_counterfactuals_for_a_single_image_batch():
    examples, _ = _examples(1)
    batch = CounterfactualCollator(mask_kind="object", fill_kind="single", mask_ratio=0.5, patch_size=PATCH)(examples)
    assert set(batch) == {"pixel_values", "labels"}


def test_collator_without_masks_returns_only_the_clean_batch():
    examples, _ = _examples(3, with_mask=False)
    batch = CounterfactualCollator(mask_kind="none", fill_kind="none", mask_ratio=0.5, patch_size=PATCH)(examples)
    assert set(batch) == {"pixel_values", "labels"}


# ---- teacher CAMs ----


def test_precompute_cams_adds_the_cam_of_each_image_and_label(dataset, tiny_classifier, tiny_image_processor):
    plain = dataset.remove_columns("cam")
    with_cams = precompute_cams(plain, tiny_classifier, tiny_image_processor, batch_size=2)
    assert with_cams.column_names == ["image", "label", "cam"]
    cams = torch.tensor(with_cams["cam"])
    assert cams.shape == (5, 16)
    pixels = preprocess_images(tiny_image_processor, plain["image"])
    expected = compute_cam(tiny_classifier, pixels, torch.tensor(plain["label"]))
    torch.testing.assert_close(cams, expected.flatten(1), atol=1e-5, rtol=1e-5)
    assert precompute_cams(with_cams, tiny_classifier, tiny_image_processor) is with_cams


def test_precompute_cams_returns_a_dataset_that_already_has_cams_unchanged(
    dataset, tiny_classifier, tiny_image_processor
):
    assert precompute_cams(dataset, tiny_classifier, tiny_image_processor) is dataset
    assert dataset["cam"] == _cams(5).tolist()


def test_precompute_cams_rejects_labels_outside_the_head(dataset, tiny_classifier, tiny_image_processor):
    bad = dataset.remove_columns("cam").map(lambda example: {"label": 9} if example["label"] == 1 else {})
    with pytest.raises(ValueError, match=r"label 9 .*0\.\.2"):
        precompute_cams(bad, tiny_classifier, tiny_image_processor)
