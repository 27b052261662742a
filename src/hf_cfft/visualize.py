"""Pictures of what the method does: per image its CAM, the masks it induces and the counterfactuals they give.

One row per image, columns:

    input | CAM overlay | for each mask kind: mask, then one counterfactual per fill kind

Pixels are un-normalised with the image processor's mean and std; small images (e.g. 32 px) are enlarged with
nearest-neighbour so each patch stays a crisp block. Drawn with PIL only (no display, no matplotlib).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .cam import compute_cam
from .masking import FILL_KINDS, cam_patch_mask, random_patch_mask, refill

VIS_MASK_KINDS = ("object", "context", "random")
PAD = 4  # pixels between cells and around the grid
MIN_CELL = 128  # images smaller than this are enlarged by an integer factor
FONT_SIZE = 12
_FILL_TITLES = {"none": "no-fill (removed)", "single": "single-fill", "multi": "multi-fill"}


@dataclass(frozen=True)
class GridLayout:
    """Geometry of a counterfactual grid: column titles, cell size and where each cell lies.

    columns: one (title, subtitle) per column. cell: (height, width) of an enlarged image, in pixels.
    """

    num_rows: int
    columns: tuple[tuple[str, str], ...]
    cell: tuple[int, int]
    header_height: int
    row_title_height: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole picture in pixels."""
        cell_h, cell_w = self.cell
        width = PAD + len(self.columns) * (cell_w + PAD)
        height = self.header_height + self.num_rows * (self.row_title_height + cell_h + PAD) + PAD
        return width, height

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of one image cell, as `PIL.Image.crop` takes it."""
        cell_h, cell_w = self.cell
        left = PAD + column * (cell_w + PAD)
        top = self.header_height + row * (self.row_title_height + cell_h + PAD) + self.row_title_height
        return left, top, left + cell_w, top + cell_h


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _line_height(font: ImageFont.ImageFont) -> int:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=font)
    return bottom + 2


def grid_columns(
    mask_kinds: Sequence[str], fill_kinds: Sequence[str], threshold: float = 0.3, ratio: float = 0.5
) -> tuple[tuple[str, str], ...]:
    """The (title, subtitle) of every column: input, CAM, then per mask kind its mask and one column per fill kind."""
    rules = {"object": f"CAM > {threshold:g}", "context": f"CAM <= {threshold:g}", "random": f"{ratio:.0%} at random"}
    columns = [("input", ""), ("CAM", "overlay")]
    for kind in mask_kinds:
        columns.append((f"{kind} mask", f"light = {rules[kind]}"))
        columns.extend((kind, _FILL_TITLES[fill]) for fill in fill_kinds)
    return tuple(columns)


def grid_layout(
    num_images: int,
    image_size: tuple[int, int],
    mask_kinds: Sequence[str] = VIS_MASK_KINDS,
    fill_kinds: Sequence[str] = FILL_KINDS,
    *,
    threshold: float = 0.3,
    ratio: float = 0.5,
    with_row_titles: bool = False,
) -> GridLayout:
    """The layout of `counterfactual_grid` for ``num_images`` images of ``image_size`` (H, W) pixels."""
    height, width = image_size
    scale = max(1, math.ceil(MIN_CELL / max(height, width)))
    line = _line_height(_font())
    return GridLayout(
        num_rows=num_images,
        columns=grid_columns(mask_kinds, fill_kinds, threshold, ratio),
        cell=(height * scale, width * scale),
        header_height=PAD + 2 * line,
        row_title_height=line if with_row_titles else 0,
    )


def unnormalize(pixel_values: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> np.ndarray:
    """Processor-normalised pixels [B, C, H, W] -> uint8 RGB images [B, H, W, 3]."""
    channels = pixel_values.shape[1]
    if len(image_mean) != channels or len(image_std) != channels:
        raise ValueError(
            f"image_mean/image_std have {len(image_mean)}/{len(image_std)} values for {channels} channels; pass the "
            "image processor's own image_mean and image_std"
        )
    mean = torch.as_tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map (blue = 0, red = 1): [...] in [0, 1] -> [..., 3] uint8."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255.0).round().astype(np.uint8)


def _upsample_patches(grid_values: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[B, h, w] -> [B, H, W] by nearest: each patch becomes the block of pixels it covers."""
    return F.interpolate(grid_values[:, None].float().cpu(), size=size, mode="nearest")[:, 0].numpy()


def _blend(base: np.ndarray, top: np.ndarray, weight: np.ndarray | float) -> np.ndarray:
    return ((1.0 - weight) * base.astype(np.float32) + weight * top.astype(np.float32)).round().astype(np.uint8)


def _mask_picture(rgb: np.ndarray, pixel_mask: np.ndarray) -> np.ndarray:
    # Masked patches bright, kept patches dark, the image faint in both: readable whatever the image's colours (a
    # coloured tint vanishes on a background of the same hue).
    faint = 0.3 * rgb.astype(np.float32)
    return np.where(pixel_mask, faint + 0.7 * 255.0, faint).round().astype(np.uint8)


def _hatch(shape: tuple[int, int]) -> np.ndarray:
    # Diagonal stripes mark patches removed from the encoder's input: no colour could be mistaken for them.
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    stripes = ((xs + ys) // 3) % 2 == 0
    return np.where(stripes[..., None], 90, 35).astype(np.uint8) * np.ones(3, dtype=np.uint8)


def _check_kinds(mask_kinds: Sequence[str], fill_kinds: Sequence[str], batch: int) -> None:
    bad = [k for k in mask_kinds if k not in VIS_MASK_KINDS]
    if bad:
        raise ValueError(f"mask kind(s) {bad} cannot be drawn; choose from {', '.join(VIS_MASK_KINDS)}")
    bad = [k for k in fill_kinds if k not in FILL_KINDS]
    if bad:
        raise ValueError(f"fill kind(s) {bad} are not valid; choose from {', '.join(FILL_KINDS)}")
    if batch < 2 and any(k != "none" for k in fill_kinds):
        raise ValueError(
            f"single- and multi-fill take patches from other images, but only {batch} image was given; "
            "draw at least 2 images or fill_kinds=('none',)"
        )


def counterfactual_grid(
    images: torch.Tensor,
    cams: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    patch_size: int,
    mask_kinds: Sequence[str] = VIS_MASK_KINDS,
    fill_kinds: Sequence[str] = FILL_KINDS,
    threshold: float = 0.3,
    ratio: float = 0.5,
    generator: torch.Generator | None = None,
    row_titles: Sequence[str] | None = None,
) -> Image.Image:
    """Draw the masks and counterfactuals of a batch as one RGB picture (layout: `grid_layout`).

    images: [B, C, H, W] pixel values as the image processor returns them. cams: [B, h, w] max-normalised CAMs on
    the patch grid (h = H / patch_size). Refills take patches from the other images of the batch, and each fill kind
    uses the same donors for every mask kind, so the columns of a row differ only by the mask.
    """
    batch, _, height, width = images.shape
    grid = (height // patch_size, width // patch_size)
    if tuple(cams.shape) != (batch, *grid):
        raise ValueError(f"cams of shape {tuple(cams.shape)} do not match the images' patch grid {(batch, *grid)}")
    if row_titles is not None and len(row_titles) != batch:
        raise ValueError(f"got {len(row_titles)} row titles for {batch} images")
    _check_kinds(mask_kinds, fill_kinds, batch)
    if not (0 < threshold < 1 and 0 < ratio < 1):
        raise ValueError(f"threshold={threshold} and ratio={ratio} must lie in (0, 1): else a mask is empty or whole")
    images = images.detach().float().cpu()
    cams = cams.detach().float().cpu()

    # One seed per fill kind, re-used for every mask kind: the donors of a fill kind are the same across columns.
    fill_seeds = {fill: int(torch.randint(2**62, (), generator=generator)) for fill in fill_kinds}
    masks = {}
    for kind in mask_kinds:
        if kind == "random":
            masks[kind] = random_patch_mask(batch, grid, ratio, generator)
        else:
            masks[kind] = cam_patch_mask(cams, kind, threshold)

    rgb = unnormalize(images, image_mean, image_std)
    heat = jet(_upsample_patches(cams, (height, width)))
    columns: list[np.ndarray] = [rgb, _blend(rgb, heat, 0.55)]  # each [B, H, W, 3]
    for kind in mask_kinds:
        pixel_mask = _upsample_patches(masks[kind], (height, width))[..., None] > 0.5  # [B, H, W, 1]
        columns.append(_mask_picture(rgb, pixel_mask))
        for fill in fill_kinds:
            cf = refill(images, masks[kind], fill, patch_size, torch.Generator().manual_seed(fill_seeds[fill]))
            cf_rgb = unnormalize(cf, image_mean, image_std)
            if fill == "none":
                cf_rgb = np.where(pixel_mask, _hatch((height, width)), cf_rgb)
            columns.append(cf_rgb)

    layout = grid_layout(
        batch, (height, width), mask_kinds, fill_kinds, threshold=threshold, ratio=ratio,
        with_row_titles=row_titles is not None,
    )  # fmt: skip
    return _draw(layout, columns, row_titles)


def _draw(layout: GridLayout, columns: list[np.ndarray], row_titles: Sequence[str] | None) -> Image.Image:
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    line = _line_height(font)
    cell_h, cell_w = layout.cell
    for col, (title, subtitle) in enumerate(layout.columns):
        left = layout.cell_box(0, col)[0]
        draw.text((left + 1, PAD // 2), title, fill="black", font=font)
        draw.text((left + 1, PAD // 2 + line), subtitle, fill=(90, 90, 90), font=font)
    for row in range(layout.num_rows):
        if row_titles is not None:
            left, top, _, _ = layout.cell_box(row, 0)
            draw.text((left + 1, top - layout.row_title_height), row_titles[row], fill="black", font=font)
        for col, images in enumerate(columns):
            cell = Image.fromarray(images[row]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(cell, layout.cell_box(row, col)[:2])
    return canvas


def model_counterfactual_grid(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    *,
    cam_method: str = "rollout",
    **grid_kwargs,
) -> Image.Image:
    """`counterfactual_grid` with the CAMs of ``model`` (a `ClipCfftForImageClassification`) for the true classes.

    pixel_values: [B, C, H, W]; labels: [B]. Each row is titled with the true and the predicted class.
    """
    device = next(model.parameters()).device
    pixels = pixel_values.to(device)
    labels = torch.as_tensor(labels, device=device)
    cams = compute_cam(model, pixels, labels, cam_method)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(dim=-1).tolist()
    model.train(was_training)
    names = model.config.id2label
    titles = [f"{names[int(y)]} (predicted: {names[p]})" for y, p in zip(labels.tolist(), predicted)]
    grid_kwargs.setdefault("row_titles", titles)
    return counterfactual_grid(
        pixels, cams, image_mean, image_std, model.config.vision_config.patch_size, **grid_kwargs
    )
