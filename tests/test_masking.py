"""Specification of hf_cfft.masking: CAM and random patch masks, refilling, patch (un)folding."""

import pytest
import torch

from hf_cfft.masking import (
    cam_patch_mask,
    make_counterfactuals,
    multi_fill_sources,
    patchify,
    random_patch_mask,
    refill,
    single_fill_partners,
    unpatchify,
)

PATCH = 8
GRID = (4, 4)
STRIDE = 1 << 16  # larger than the pixel count of every test image


def identifiable_images(batch: int, patch: int = PATCH, grid=GRID, channels: int = 3):
    """Images ``i * STRIDE + base``: integer-valued, base differs at every pixel and is shared by all images.

    Subtracting ``base`` from any refilled patch and dividing by STRIDE tells which image it came from (all exact in
    float64); a patch taken from another position would not give a constant.
    """
    height, width = grid[0] * patch, grid[1] * patch
    base = torch.arange(channels * height * width, dtype=torch.float64).view(channels, height, width)
    images = torch.arange(batch, dtype=torch.float64).view(-1, 1, 1, 1) * STRIDE + base
    return images, base


def donors_of(cf: torch.Tensor, base: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """[B, N] index of the image each patch of ``cf`` came from (asserting it came from the same position)."""
    offsets = patchify(cf - base, patch) / STRIDE  # [B, N, P], constant per patch
    assert torch.equal(offsets, offsets[..., :1].expand_as(offsets)), "a patch came from another position"
    donors = offsets[..., 0]
    assert torch.equal(donors, donors.round()), "a patch is not an exact copy of some image's patch"
    return donors.long()


# ---- masks ----


def test_object_mask_is_exactly_the_patches_above_threshold():
    cam = torch.tensor(
        [
            [[0.0, 0.1, 0.29, 0.3], [0.31, 0.5, 1.0, 0.2], [0.3, 0.3, 0.9, 0.0], [0.05, 0.6, 0.7, 0.8]],
            [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.301]],
        ]
    )
    expected = torch.tensor(
        [
            [[0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0], [0, 1, 1, 1]],
            [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]],
        ],
        dtype=torch.bool,
    )
    mask = cam_patch_mask(cam, "object", 0.3)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)  # a CAM exactly at the threshold is not masked


def test_object_mask_keeps_context_pixels():
    """Context-mask is the complement of object-mask: together they partition the grid."""
    torch.manual_seed(0)
    cam = torch.rand(3, *GRID)
    cam[0, 0, 0] = 0.3  # ties go to the context
    obj = cam_patch_mask(cam, "object", 0.3)
    ctx = cam_patch_mask(cam, "context", 0.3)
    assert torch.equal(ctx, ~obj)
    assert torch.equal(ctx, cam <= 0.3)
    assert bool(ctx[0, 0, 0]) and not bool(obj[0, 0, 0])


def test_cam_mask_rejects_non_cam_kinds():
    with pytest.raises(ValueError, match="random"):
        cam_patch_mask(torch.rand(1, *GRID), "random", 0.3)


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.75])
def test_random_mask_masks_exactly_round_ratio_times_patches_per_image(ratio):
    mask = random_patch_mask(6, GRID, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (6, *GRID) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(dim=1).tolist() == [round(ratio * 16)] * 6


def test_random_mask_is_reproducible_with_a_seeded_generator_and_varies_with_the_seed():
    a = random_patch_mask(8, GRID, 0.5, torch.Generator().manual_seed(123))
    b = random_patch_mask(8, GRID, 0.5, torch.Generator().manual_seed(123))
    c = random_patch_mask(8, GRID, 0.5, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Images of one batch get different masks.
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1


# ---- partners ----


def test_single_fill_partner_is_never_the_image_itself():
    for seed in range(20):
        partners = single_fill_partners(2 + seed % 4, torch.Generator().manual_seed(seed))
        assert (partners != torch.arange(len(partners))).all()
        assert ((partners >= 0) & (partners < len(partners))).all()


def test_multi_fill_sources_are_never_the_image_itself():
    sources = multi_fill_sources(3, 64, torch.Generator().manual_seed(0))
    assert sources.shape == (3, 64)
    assert (sources != torch.arange(3).view(-1, 1)).all()
    assert ((sources >= 0) & (sources < 3)).all()


# ---- refilling ----


def test_single_fill_takes_all_masked_patches_from_one_other_image_at_the_same_position():
    images, base = identifiable_images(4)
    mask = random_patch_mask(4, GRID, 0.5, torch.Generator().manual_seed(0))
    cf = refill(images, mask, "single", PATCH, torch.Generator().manual_seed(1))
    donors = donors_of(cf, base)
    flat = mask.flatten(1)
    for i in range(4):
        masked_donors = set(donors[i][flat[i]].tolist())
        assert len(masked_donors) == 1, f"image {i} took patches from several images: {masked_donors}"
        assert masked_donors.pop() != i
        assert (donors[i][~flat[i]] == i).all()


def test_single_fill_is_pixel_exact_on_random_images():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    mask = random_patch_mask(4, GRID, 0.5, torch.Generator().manual_seed(0))
    cf = refill(images, mask, "single", PATCH, torch.Generator().manual_seed(3))
    src, out, flat = patchify(images, PATCH), patchify(cf, PATCH), mask.flatten(1)
    for i in range(4):
        assert torch.equal(out[i][~flat[i]], src[i][~flat[i]]), "unmasked patches must be untouched"
        partners = [j for j in range(4) if j != i and torch.equal(out[i][flat[i]], src[j][flat[i]])]
        assert len(partners) == 1, f"image {i}: masked patches are not the same patches of one other image"


def test_single_fill_is_reproducible_with_a_seeded_generator():
    images, _ = identifiable_images(5)
    mask = torch.ones(5, *GRID, dtype=torch.bool)
    a = refill(images, mask, "single", PATCH, torch.Generator().manual_seed(7))
    b = refill(images, mask, "single", PATCH, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_multi_fill_takes_each_masked_patch_from_another_image_at_the_same_position():
    # 32x32 images with 4x4 patches: 64 patches per image, so an image draws from several donors.
    grid, patch = (8, 8), 4
    images, base = identifiable_images(3, patch=patch, grid=grid)
    mask = torch.zeros(3, *grid, dtype=torch.bool)
    mask[:, :, :6] = True  # 48 masked, 16 untouched patches per image
    cf = refill(images, mask, "multi", patch, torch.Generator().manual_seed(0))
    donors = donors_of(cf, base, patch)
    flat = mask.flatten(1)
    for i in range(3):
        masked = donors[i][flat[i]]
        assert (masked != i).all(), "a masked patch was refilled from its own image"
        assert ((masked >= 0) & (masked < 3)).all()
        assert len(set(masked.tolist())) >= 2, "multi-fill used a single donor for every patch"
        assert (donors[i][~flat[i]] == i).all(), "unmasked patches must be untouched"


def test_fill_none_zeroes_masked_patches_and_keeps_the_rest():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32) + 5.0  # no pixel is zero by chance
    mask = random_patch_mask(3, GRID, 0.25, torch.Generator().manual_seed(0))
    cf, keep = make_counterfactuals(images, mask, "none", PATCH)
    src, out, flat = patchify(images, PATCH), patchify(cf, PATCH), mask.flatten(1)
    assert (out[flat] == 0).all()
    assert torch.equal(out[~flat], src[~flat])
    assert keep.dtype == torch.bool and keep.shape == (3, 16)
    assert torch.equal(keep, ~flat)


@pytest.mark.parametrize("fill", ["single", "multi"])
def test_make_counterfactuals_returns_no_keep_mask_when_patches_are_refilled(fill):
    images, _ = identifiable_images(3)
    mask = random_patch_mask(3, GRID, 0.5, torch.Generator().manual_seed(0))
    cf, keep = make_counterfactuals(images, mask, fill, PATCH, torch.Generator().manual_seed(0))
    assert keep is None
    assert torch.equal(cf, refill(images, mask, fill, PATCH, torch.Generator().manual_seed(0)))


def test_empty_mask_leaves_images_unchanged():
    images, _ = identifiable_images(3)
    mask = torch.zeros(3, *GRID, dtype=torch.bool)
    for fill in ("none", "single", "multi"):
        assert torch.equal(refill(images, mask, fill, PATCH, torch.Generator().manual_seed(0)), images)


# ---- patch folding ----


def test_patchify_orders_patches_row_major_and_unpatchify_inverts_it():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 3 * 8 * 8)
    for r in range(2):
        for c in range(3):
            expected = images[:, :, 8 * r : 8 * (r + 1), 8 * c : 8 * (c + 1)].reshape(2, -1)
            assert torch.equal(patches[:, r * 3 + c], expected)
    assert torch.equal(unpatchify(patches, 3, (2, 3), 8), images)


def test_patchify_rejects_sizes_that_are_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="patch size 8"):
        patchify(torch.zeros(1, 3, 30, 32), 8)


# ---- errors ----


@pytest.mark.parametrize("fill", ["single", "multi"])
def test_refilling_a_batch_of_one_raises_naming_the_batch_size(fill):
    images, _ = identifiable_images(1)
    with pytest.raises(ValueError, match=r"at least 2 images.*got 1"):
        refill(images, torch.ones(1, *GRID, dtype=torch.bool), fill, PATCH)


def test_fill_none_works_on_a_batch_of_one():
    images, _ = identifiable_images(1)
    cf, keep = make_counterfactuals(images, torch.ones(1, *GRID, dtype=torch.bool), "none", PATCH)
    assert (cf == 0).all() and not keep.any()


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 2, 8), (3, 16)])
def test_mask_that_does_not_match_the_patch_grid_raises(shape):
    images, _ = identifiable_images(3)
    with pytest.raises(ValueError, match="does not match"):
        refill(images, torch.ones(shape, dtype=torch.bool), "single", PATCH)


def test_unknown_fill_kind_raises():
    images, _ = identifiable_images(2)
    with pytest.raises(ValueError, match="'blend'"):
        refill(images, torch.ones(2, *GRID, dtype=torch.bool), "blend", PATCH)
