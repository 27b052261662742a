"""Counterfactual images: choose patches to mask, then refill them. Pure torch, no model: runs in DataLoader workers.

Masks are boolean [B, h, w] over the model's patch grid, True = the patch is masked.

- object-mask: patches whose CAM exceeds ``threshold`` (the object's evidence is removed) - the paper's rule; or,
  rank-based, the ``top_fraction`` of patches with the highest CAM (a fixed count per image, ties to the lower
  patch index), for CAMs whose maximum-normalised values are too peaked for any threshold to cover the object;
- context-mask: the complement of the object-mask (the context is removed);
- random-mask: exactly ``round(ratio * h * w)`` patches per image, chosen uniformly. A fixed count (rather than an
  independent coin per patch) makes every image keep the same number of tokens, so no-fill can drop them.

Refilling ("fill"):

- none: masked patches are removed from the encoder's input (``patch_keep`` is returned); their pixels are zeroed
  only so that pictures show the hole, the model never sees those zeros;
- single: every masked patch of image i comes from the same position of ONE other image of the batch;
- multi: each masked patch comes from the same position of an independently drawn other image.
"""

from __future__ import annotations

import torch

MASK_KINDS = ("none", "object", "context", "random")
FILL_KINDS = ("none", "single", "multi")


def top_fraction_mask(cam: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``round(fraction * h * w)`` patches of highest CAM per image: [B, h, w] -> [B, h, w] bool.

    Ties are broken towards the lower row-major patch index, so the mask is deterministic.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"top fraction {fraction} must lie in (0, 1)")
    b, h, w = cam.shape
    count = round(fraction * h * w)
    order = torch.sort(cam.reshape(b, -1), dim=1, descending=True, stable=True).indices
    mask = torch.zeros(b, h * w, dtype=torch.bool, device=cam.device)
    mask.scatter_(1, order[:, :count], True)
    return mask.view(b, h, w)


def cam_patch_mask(cam: torch.Tensor, kind: str, threshold: float, top_fraction: float | None = None) -> torch.Tensor:
    """Object- or context-mask from a max-normalised CAM: [B, h, w] float -> [B, h, w] bool (True = masked).

    The object is ``cam > threshold``, or the ``top_fraction`` of patches by CAM when that is given.
    """
    if kind not in ("object", "context"):
        raise ValueError(f"mask kind {kind!r} is not CAM-based; expected 'object' or 'context'")
    obj = top_fraction_mask(cam, top_fraction) if top_fraction is not None else cam > threshold
    return obj if kind == "object" else ~obj


def random_patch_mask(
    batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random mask with exactly ``round(ratio * h * w)`` masked patches per image -> [B, h, w] bool."""
    h, w = grid
    num_masked = round(ratio * h * w)
    scores = torch.rand(batch, h * w, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < num_masked).view(batch, h, w)


def _check_batch(batch: int) -> None:
    if batch < 2:
        raise ValueError(
            f"refilling needs at least 2 images per batch to take patches from another image, got {batch}; "
            "use fill_kind='none' or a per-device batch size >= 2 with dataloader_drop_last=True"
        )


def single_fill_partners(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One partner per image, never itself: [B] long with partner[i] != i."""
    _check_batch(batch)
    offsets = torch.randint(1, batch, (batch,), generator=generator)
    return (torch.arange(batch) + offsets) % batch


def multi_fill_sources(batch: int, num_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An independent donor image per patch, never the image itself: [B, N] long with source[i, n] != i."""
    _check_batch(batch)
    offsets = torch.randint(1, batch, (batch, num_patches), generator=generator)
    return (torch.arange(batch).view(-1, 1) + offsets) % batch


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C * p * p] in row-major patch order (the ViT token order)."""
    b, c, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    h, w = height // patch_size, width // patch_size
    x = pixel_values.reshape(b, c, h, patch_size, w, patch_size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, h * w, c * patch_size * patch_size)


def unpatchify(patches: torch.Tensor, channels: int, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, N, C * p * p] -> [B, C, H, W]."""
    b = patches.shape[0]
    h, w = grid
    x = patches.reshape(b, h, w, channels, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h * patch_size, w * patch_size)


def draw_donors(
    fill: str, batch: int, grid: tuple[int, int], generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """The refill draws of a batch: the donor image of every patch, drawn on the CPU from ``generator``.

    ``fill='single'``: [B] long, one partner per image; ``'multi'``: [B, h, w] long, a donor per patch; ``'none'``:
    None. Drawing them apart from the pixels lets a DataLoader worker draw them (cheap) and the training device move
    the patches (`refill_from_donors`), with the same result as `refill`.
    """
    if fill not in FILL_KINDS:
        raise ValueError(f"fill kind {fill!r} is not one of {FILL_KINDS}")
    if fill == "single":
        return single_fill_partners(batch, generator)
    if fill == "multi":
        return multi_fill_sources(batch, grid[0] * grid[1], generator).view(batch, *grid)
    return None


def refill_from_donors(
    pixel_values: torch.Tensor, mask: torch.Tensor, fill: str, patch_size: int, donors: torch.Tensor | None = None
) -> torch.Tensor:
    """Replace the masked patches with those of the drawn donors: [B, C, H, W], [B, h, w] bool -> [B, C, H, W].

    ``donors`` is what `draw_donors` returns for ``fill`` (None for no-fill, which zeroes the patches for display).
    Runs on the device of ``pixel_values``.
    """
    b, c, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    grid = (height // patch_size, width // patch_size)
    if tuple(mask.shape) != (b, *grid):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the batch's patch grid {(b, *grid)}")
    if fill not in FILL_KINDS:
        raise ValueError(f"fill kind {fill!r} is not one of {FILL_KINDS}")
    if fill != "none" and donors is None:
        raise ValueError(f"fill_kind={fill!r} needs the batch's donors (hf_cfft.masking.draw_donors)")
    # Patches are moved in place through [B, h, w, C, p, p] views of the images: one copy of the batch plus the
    # masked patches, where patchify -> where -> unpatchify made four full copies (4x slower at 224 px).
    source = pixel_values.contiguous()  # views need the default layout; a no-op for stacked batches
    out = source.clone()
    target = _patch_view(out, patch_size)
    batch_index, row, col = mask.to(pixel_values.device).nonzero(as_tuple=True)
    if fill == "none":
        target[batch_index, row, col] = 0
        return out
    donors = donors.to(pixel_values.device)
    donor_images = donors[batch_index] if fill == "single" else donors[batch_index, row, col]
    target[batch_index, row, col] = _patch_view(source, patch_size)[donor_images, row, col]
    return out


def refill(
    pixel_values: torch.Tensor,
    mask: torch.Tensor,
    fill: str,
    patch_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace the masked patches of each image: [B, C, H, W], [B, h, w] bool -> [B, C, H, W].

    ``fill='none'`` zeroes them (for display; pair it with ``patch_keep = ~mask`` in the encoder). The donors are
    drawn from ``generator`` (`draw_donors`), then moved (`refill_from_donors`).
    """
    b, _, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    grid = (height // patch_size, width // patch_size)
    if tuple(mask.shape) != (b, *grid):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the batch's patch grid {(b, *grid)}")
    donors = draw_donors(fill, b, grid, generator)
    return refill_from_donors(pixel_values, mask, fill, patch_size, donors)


def _patch_view(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> a [B, h, w, C, p, p] view sharing its memory (patch (i, j) of image b at [b, i, j])."""
    b, c, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    return pixel_values.view(b, c, grid_h, patch_size, grid_w, patch_size).permute(0, 2, 4, 1, 3, 5)


def make_counterfactuals(
    pixel_values: torch.Tensor,
    mask: torch.Tensor,
    fill: str,
    patch_size: int,
    generator: torch.Generator | None = None,
    *,
    donors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Counterfactual images and, for no-fill, the patches the encoder keeps.

    The refill donors are drawn from ``generator``, unless ``donors`` (from `draw_donors`, e.g. by the collator in a
    DataLoader worker) are given. Returns ``cf_pixel_values`` [B, C, H, W] and ``patch_keep`` [B, h * w] bool (None
    unless ``fill='none'``).
    """
    if donors is None and fill != "none":
        cf = refill(pixel_values, mask, fill, patch_size, generator)
    else:
        cf = refill_from_donors(pixel_values, mask, fill, patch_size, donors)
    keep = (~mask).reshape(mask.shape[0], -1) if fill == "none" else None
    return cf, keep
