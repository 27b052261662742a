"""Counterfactuals built on the training device: the collator draws masks and donors, the trainer moves patches.

The device path must give, bit for bit, the images the collator used to build in its worker.
"""

from __future__ import annotations

import pytest
import torch

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.data import CounterfactualCollator
from hf_cfft.masking import draw_donors, make_counterfactuals, refill, refill_from_donors

PATCH, GRID = 8, (4, 4)


def _examples(count: int, with_masks: bool, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        example = {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 3}
        if with_masks:
            example["cf_mask"] = torch.rand(*GRID, generator=generator) > 0.5
        examples.append(example)
    return examples


@pytest.mark.parametrize("fill", ["none", "single", "multi"])
def test_refill_from_drawn_donors_equals_refill_with_the_same_generator(fill):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(5, *GRID, generator=torch.Generator().manual_seed(1)) > 0.4
    expected = refill(images, mask, fill, PATCH, torch.Generator().manual_seed(2))
    donors = draw_donors(fill, 5, GRID, torch.Generator().manual_seed(2))
    assert torch.equal(refill_from_donors(images, mask, fill, PATCH, donors), expected)
    if fill == "single":
        assert donors.shape == (5,) and not (donors == torch.arange(5)).any()
    if fill == "multi":
        assert donors.shape == (5, *GRID) and not (donors == torch.arange(5).view(5, 1, 1)).any()


def test_refill_without_the_donors_it_needs_is_refused():
    with pytest.raises(ValueError, match="needs the batch's donors"):
        refill_from_donors(torch.zeros(2, 3, 32, 32), torch.zeros(2, *GRID, dtype=torch.bool), "single", PATCH)


@pytest.mark.parametrize("fill_kind", ["none", "single", "multi"])
@pytest.mark.parametrize("mask_kind", ["object", "random"])
def test_trainer_refill_on_the_device_is_bit_identical_to_the_worker_refill(
    tiny_classifier, tmp_path, mask_kind, fill_kind
):
    examples = _examples(6, with_masks=mask_kind == "object")
    common = dict(mask_kind=mask_kind, fill_kind=fill_kind, mask_ratio=0.5, patch_size=PATCH, seed=3)
    in_worker = CounterfactualCollator(**common)(examples)
    on_device = CounterfactualCollator(**common, refill_on_device=True)(examples)
    assert "cf_pixel_values" not in on_device and on_device["cf_mask"].shape == (6, *GRID)
    assert ("cf_donors" in on_device) == (fill_kind != "none")

    args = CfftConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=6, mask_kind=mask_kind, fill_kind=fill_kind
    )
    trainer = CfftTrainer(model=tiny_classifier, args=args)
    assert trainer.data_collator.refill_on_device
    cf_pixel_values, keep = trainer.counterfactual_batch(trainer._prepare_inputs(on_device))
    assert torch.equal(cf_pixel_values, in_worker["cf_pixel_values"])
    if fill_kind == "none":
        assert torch.equal(keep, in_worker["cf_patch_keep"])
    else:
        assert keep is None and "cf_patch_keep" not in in_worker


def test_make_counterfactuals_with_donors_draws_nothing():
    images = torch.randn(4, 3, 32, 32)
    mask = torch.ones(4, *GRID, dtype=torch.bool)
    donors = torch.tensor([1, 2, 3, 0])
    cf, keep = make_counterfactuals(images, mask, "single", PATCH, donors=donors)
    assert torch.equal(cf, images[donors]) and keep is None
