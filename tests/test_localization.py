"""Ground truth for masks: the world's object patches, the mask scores, the rank-based object mask."""

import numpy as np
import pytest
import torch

from hf_cfft.masking import cam_patch_mask, top_fraction_mask
from hf_cfft.world import mask_scores, object_patch_mask, render_world
from hf_cfft.world import render as world


def test_object_patch_mask_marks_every_patch_a_stroke_touches():
    strokes = np.zeros((1, 8, 8), dtype=bool)
    strokes[0, 0, 0] = True  # patch (0, 0): one pixel
    strokes[0, 5, 2:4] = True  # patch (1, 0): two pixels (rows 4-7, columns 0-3)
    strokes[0, 6:8, 6:8] = True  # patch (1, 1): four pixels
    expected = np.array([[[True, False], [True, True]]])
    np.testing.assert_array_equal(object_patch_mask(strokes, patch_size=4), expected)
    # A stricter coverage keeps only the patches with that many stroke pixels.
    np.testing.assert_array_equal(
        object_patch_mask(strokes, patch_size=4, min_pixels=2), np.array([[[False, False], [True, True]]])
    )
    with pytest.raises(ValueError, match="multiple of the patch size"):
        object_patch_mask(np.zeros((1, 6, 6), dtype=bool), patch_size=4)


def test_world_strokes_are_where_the_image_shows_the_digit():
    arrays = render_world("ood_shuffled", seed=0, size=64)
    # The digit is near-white (240) on dark or mid-tone contexts: stroke pixels are bright, the others are not.
    brightness = arrays.images.astype(float).min(-1)
    assert brightness[arrays.strokes].mean() > 200
    assert brightness[~arrays.strokes].mean() < 150
    # Strokes stay inside the 24x24 object box shifted by at most the jitter.
    margin = (world.IMAGE_SIZE - world.OBJECT_SIZE) // 2 - world.MAX_JITTER
    assert not arrays.strokes[:, :margin].any() and not arrays.strokes[:, -margin:].any()


def test_world_object_patches_column_matches_the_rendered_strokes():
    ds = world.make_world_split("test_id", seed=2, size=16)
    arrays = render_world("test_id", seed=2, size=16)
    column = np.array(ds["object_patches"], dtype=bool)
    assert column.shape == (16, 64)
    np.testing.assert_array_equal(column, object_patch_mask(arrays.strokes).reshape(16, 64))
    # A digit covers a sizeable, but not the whole, part of the 8x8 grid.
    assert 10 < column.sum(1).mean() < 40


def test_train_context_correlation_is_a_parameter_that_changes_only_contexts():
    base = render_world("train", seed=0, size=3000)
    independent = render_world("train", seed=0, size=3000, correlation=1 / world.NUM_ID_CONTEXTS)
    np.testing.assert_array_equal(base.labels, independent.labels)
    np.testing.assert_array_equal(base.instances, independent.instances)
    own = (independent.contexts == independent.labels).mean()
    assert abs(own - 0.1) < 0.03  # independent of the class: each of the 10 contexts equally often
    assert (base.contexts == base.labels).mean() > 0.85
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        render_world("train", size=4, correlation=1.5)


def test_mask_scores_on_hand_made_masks():
    truth = torch.tensor([[[True, True], [False, False]], [[False, False], [False, True]]])
    predicted = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]]])
    scores = mask_scores(predicted, truth)
    # 3 object patches, 3 masked, 2 of them hit; union 4; 8 patches in all.
    assert scores == {
        "recall": 2 / 3,
        "precision": 2 / 3,
        "iou": 2 / 4,
        "masked_fraction": 3 / 8,
        "object_fraction": 3 / 8,
    }
    nothing = mask_scores(torch.zeros_like(truth), truth)
    assert nothing["recall"] == 0 and nothing["precision"] == 0 and nothing["masked_fraction"] == 0
    with pytest.raises(ValueError, match="differ in shape"):
        mask_scores(predicted[:1], truth)


def test_top_fraction_mask_masks_exactly_the_requested_count_with_ties_to_the_lower_index():
    cam = torch.tensor([[[0.2, 0.9], [0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]]])
    mask = top_fraction_mask(cam, 0.5)  # 2 of 4 patches
    assert mask.sum(dim=(1, 2)).tolist() == [2, 2]
    # Image 0: 0.9 and the first of the tied 0.5s (index 2). Image 1: all tied, indices 0 and 1.
    assert mask[0].flatten().tolist() == [False, True, True, False]
    assert mask[1].flatten().tolist() == [True, True, False, False]
    torch.testing.assert_close(top_fraction_mask(cam, 0.5), mask)  # deterministic
    # Context masks are the complement of the same rank-based object mask.
    assert torch.equal(cam_patch_mask(cam, "context", 0.3, top_fraction=0.5), ~mask)
    assert torch.equal(cam_patch_mask(cam, "object", 0.3, top_fraction=0.5), mask)
    # round(0.3 * 64) = 19 patches on an 8x8 grid, whatever the values.
    assert top_fraction_mask(torch.rand(3, 8, 8), 0.3).sum(dim=(1, 2)).tolist() == [19, 19, 19]
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        top_fraction_mask(cam, 1.0)
