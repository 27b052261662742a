"""A small, seeded image world in which fine-tuning can lose robustness to context shifts.

An object (a handwritten digit from scikit-learn's bundled 8x8 digits, scaled 3x and drawn in near-white) carries
the class; a context (a plain colour or a simple texture behind it) may correlate with the class. The pre-training
split shows every digit on every context, so a model pre-trained on it has no reason to use the context; the
fine-tuning split ties each class to its own context 90% of the time, so a fine-tuned model can take the shortcut;
the OOD splits break the tie in different ways. See ``docs/world.md``.
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

WORLD_CLASS_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Each in-distribution context is the correlated context of the class with the same index. All colours are dark or
# mid-tone so the near-white digit contrasts with every one of them.
ID_CONTEXTS: dict[str, tuple[int, int, int]] = {
    "red": (180, 30, 30),
    "green": (30, 130, 50),
    "blue": (40, 60, 190),
    "purple": (120, 50, 160),
    "orange": (210, 110, 20),
    "teal": (0, 125, 125),
    "brown": (115, 75, 35),
    "gray": (110, 110, 110),
    "pink": (200, 70, 140),
    "black": (25, 25, 25),
}
# Textures never used in fine-tuning; they are part of pre-training (as a web-scale CLIP has seen far more than its
# fine-tuning set), which is what makes them a fair test of how much of the pre-trained robustness survives.
NOVEL_CONTEXTS: tuple[str, ...] = ("striped", "checkered", "dotted", "noisy")
CONTEXT_NAMES: tuple[str, ...] = (*ID_CONTEXTS, *NOVEL_CONTEXTS)
NUM_ID_CONTEXTS = len(ID_CONTEXTS)

STYLE_NAMES: tuple[str, ...] = ("solid", "outline")
# Share of outlined digits in pre-training: the style is known to the pre-trained model but absent from fine-tuning.
PRETRAIN_OUTLINE_FRACTION = 0.2
# Share of train and test_id images drawn on their class's own context; the rest take a uniformly random other
# in-distribution context. 1 / NUM_ID_CONTEXTS (0.1) makes the context independent of the class.
TRAIN_CONTEXT_CORRELATION = 0.9
# How far the object's colour lies from its background toward near-white in the splits after pre-training: 1 draws it
# near-white (the embedded world); a lower value draws a faint object that pre-training never showed (the adaptation
# world of docs/adaptation_world.md). Pre-training always draws it at 1.
OBJECT_CONTRAST = 1.0
# Patch side of the shipped world CLIP: the grid on which ``object_patches`` is given.
WORLD_PATCH_SIZE = 4

SPLITS: tuple[str, ...] = ("pretrain", "train", "test_id", "ood_shuffled", "ood_swapped", "ood_novel", "ood_style")
OOD_SPLITS: tuple[str, ...] = ("ood_shuffled", "ood_swapped", "ood_novel", "ood_style")
DEFAULT_SIZES: dict[str, int] = {
    "pretrain": 20000,
    "train": 4000,
    "test_id": 1000,
    "ood_shuffled": 1000,
    "ood_swapped": 1000,
    "ood_novel": 1000,
    "ood_style": 1000,
}

# Prompts for zero-shot classification. They are the digit-only caption forms of pre-training, as CLIP's
# "a photo of a {}." resembles its alt-text. Package data (`hf_cfft.zeroshot.load_templates("world")` reads the same
# file): "a photo of the digit {}.", "the digit {}.", "a handwritten {}.", "a photo of the number {}.".
_TEMPLATES_FILE = importlib.resources.files("hf_cfft").joinpath("resources", "world_templates.txt")
WORLD_TEMPLATES: tuple[str, ...] = tuple(line for line in _TEMPLATES_FILE.read_text().splitlines() if line.strip())
CAPTION_TEMPLATE = "a photo of the digit {} on a {} background."

IMAGE_SIZE = 32
OBJECT_SIZE = 24
MAX_JITTER = 2
OBJECT_RGB = np.array([240.0, 240.0, 240.0], dtype=np.float32)
# Which digit instances each split may use; fixed, independent of ``seed``, so that no seed's test set contains an
# instance the shipped tiny CLIP (or a fine-tuning run with another seed) was trained on.
_INSTANCE_FRACTIONS = {"pretrain": 0.5, "train": 0.25, "test": 0.25}
_INSTANCE_SEED = 20230318
# Rendering happens in chunks with their own RNG stream, so a split of size n is a prefix of the same split of size
# m > n: growing a split never changes the images already drawn.
_CHUNK = 1024


@dataclass
class WorldArrays:
    """A rendered split as arrays.

    images [N, 32, 32, 3] uint8 RGB; labels, contexts, styles, instances [N] int64; strokes [N, 32, 32] bool, the
    object's own pixels (the digit's blending weight above one half: where the image shows the digit, not the
    context). ``strokes`` is the ground truth that CAM-derived object masks are scored against.
    """

    images: np.ndarray
    labels: np.ndarray
    contexts: np.ndarray
    styles: np.ndarray
    instances: np.ndarray
    strokes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


_FIELDS = tuple(WorldArrays.__dataclass_fields__)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Upscaled digit intensities [1797, 24, 24] float32 in [0, 1] and their labels [1797]."""
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # the world's objects are scikit-learn's bundled digits
        raise ImportError(
            "the embedded world needs scikit-learn for its digit images: pip install 'hf_cfft[world]'"
        ) from error

    digits = load_digits()
    small = (digits.images / 16.0 * 255.0).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(d).resize((OBJECT_SIZE, OBJECT_SIZE), Image.BILINEAR)) for d in small])
    # A contrast stretch turns bilinear blur into strokes with crisp edges: the tiny models see a clear shape.
    alpha = np.clip((big.astype(np.float32) / 255.0 - 0.15) * 2.0, 0.0, 1.0)
    return alpha, digits.target.astype(np.int64)


@functools.cache
def _outlines() -> np.ndarray:
    """The 1-pixel inner boundary of each upscaled digit's stroke, [1797, 24, 24] float32 in {0, 1}."""
    mask = _digits()[0] > 0.5
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    eroded = mask.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        eroded &= padded[:, dy : dy + OBJECT_SIZE, dx : dx + OBJECT_SIZE]
    return (mask & ~eroded).astype(np.float32)


@functools.cache
def instance_pools() -> dict[str, tuple[np.ndarray, ...]]:
    """Disjoint digit instances per pool ("pretrain", "train", "test"): per pool, one index array per class."""
    labels = _digits()[1]
    rng = np.random.default_rng(_INSTANCE_SEED)
    pools: dict[str, list[np.ndarray]] = {name: [] for name in _INSTANCE_FRACTIONS}
    for c in range(len(WORLD_CLASS_NAMES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_pre = round(len(idx) * _INSTANCE_FRACTIONS["pretrain"])
        n_train = round(len(idx) * _INSTANCE_FRACTIONS["train"])
        pools["pretrain"].append(idx[:n_pre])
        pools["train"].append(idx[n_pre : n_pre + n_train])
        pools["test"].append(idx[n_pre + n_train :])
    return {name: tuple(per_class) for name, per_class in pools.items()}


def _pool_of(split: str) -> str:
    return split if split in ("pretrain", "train") else "test"


@functools.cache
def _textures() -> dict[str, np.ndarray]:
    """Novel-context textures at twice the image size [64, 64, 3] float32, so a random crop shifts the pattern."""
    yy, xx = np.mgrid[0 : 2 * IMAGE_SIZE, 0 : 2 * IMAGE_SIZE]

    def two_tone(mask: np.ndarray, a: tuple[int, int, int], b: tuple[int, int, int]) -> np.ndarray:
        return np.where(mask[..., None], np.array(a, np.float32), np.array(b, np.float32))

    dots = ((yy % 6) - 2) ** 2 + ((xx % 6) - 2) ** 2 <= 1
    noise = np.random.default_rng(7).uniform(10, 150, size=(2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3))
    return {
        "striped": two_tone(((xx + yy) // 3) % 2 == 0, (30, 40, 100), (130, 120, 30)),
        "checkered": two_tone(((xx // 4) + (yy // 4)) % 2 == 0, (110, 20, 45), (20, 95, 105)),
        "dotted": two_tone(dots, (170, 150, 40), (25, 70, 40)),
        "noisy": noise.astype(np.float32),
    }


def _backgrounds(contexts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Context images [N, 32, 32, 3] float32 in [0, 255] for context indices [N]."""
    n = len(contexts)
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    colours = np.array(list(ID_CONTEXTS.values()), dtype=np.float32)
    is_plain = contexts < NUM_ID_CONTEXTS
    # A per-image tint keeps a named colour a range rather than one exact value.
    tint = rng.uniform(-15, 15, size=(n, 3)).astype(np.float32)
    out[is_plain] = (colours[contexts[is_plain]] + tint[is_plain])[:, None, None, :]
    textures = _textures()
    offsets = rng.integers(0, IMAGE_SIZE, size=(n, 2))
    for i in np.flatnonzero(~is_plain):
        tex = textures[CONTEXT_NAMES[contexts[i]]]
        oy, ox = offsets[i]
        out[i] = tex[oy : oy + IMAGE_SIZE, ox : ox + IMAGE_SIZE] + tint[i]
    return out


def _sample_contexts(
    split: str, labels: np.ndarray, rng: np.random.Generator, correlation: float = TRAIN_CONTEXT_CORRELATION
) -> np.ndarray:
    """Context index per sample [N], following the split's context-class relation."""
    n = len(labels)
    # A uniformly random *other* in-distribution context: shift by 1..9 modulo 10.
    other = (labels + rng.integers(1, NUM_ID_CONTEXTS, size=n)) % NUM_ID_CONTEXTS
    if split == "pretrain":
        return rng.integers(0, len(CONTEXT_NAMES), size=n)
    if split in ("train", "test_id"):
        own = rng.random(n) < correlation
        return np.where(own, labels, other)
    if split in ("ood_shuffled", "ood_style"):
        return rng.integers(0, NUM_ID_CONTEXTS, size=n)
    if split == "ood_swapped":
        return other
    if split == "ood_novel":
        return NUM_ID_CONTEXTS + rng.integers(0, len(NOVEL_CONTEXTS), size=n)
    raise ValueError(f"Unknown world split {split!r}; expected one of {SPLITS}.")


def _render_chunk(
    split: str,
    seed: int,
    chunk: int,
    n: int,
    correlation: float = TRAIN_CONTEXT_CORRELATION,
    object_contrast: float = OBJECT_CONTRAST,
) -> WorldArrays:
    rng = np.random.default_rng([seed, SPLITS.index(split), chunk])
    alpha_solid, _ = _digits()
    pool = instance_pools()[_pool_of(split)]
    labels = rng.integers(0, len(WORLD_CLASS_NAMES), size=n)
    pool_sizes = np.array([len(p) for p in pool])
    padded = np.stack([np.resize(p, pool_sizes.max()) for p in pool])
    instances = padded[labels, (rng.random(n) * pool_sizes[labels]).astype(np.int64)]
    contexts = _sample_contexts(split, labels, rng, correlation)
    if split == "pretrain":
        styles = (rng.random(n) < PRETRAIN_OUTLINE_FRACTION).astype(np.int64)
    else:
        styles = np.full(n, int(split == "ood_style"), dtype=np.int64)
    images = _backgrounds(contexts, rng)
    shape = np.where(styles[:, None, None] == 1, _outlines()[instances], alpha_solid[instances])
    # Place each object on a full-size canvas, one group per jitter offset, then blend all images at once.
    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    shifts = rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=(n, 2))
    top = (IMAGE_SIZE - OBJECT_SIZE) // 2
    for dy, dx in {(int(a), int(b)) for a, b in shifts}:
        group = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
        y, x = top + dy, top + dx
        alpha[group, y : y + OBJECT_SIZE, x : x + OBJECT_SIZE] = shape[group]
    alpha = alpha[..., None]
    # A faint object blends only part of the way to near-white; its strokes (the ground truth) stay where they are.
    blend = alpha if split == "pretrain" or object_contrast == 1.0 else alpha * np.float32(object_contrast)
    images = images * (1.0 - blend) + OBJECT_RGB * blend
    images += rng.normal(0.0, 6.0, size=images.shape).astype(np.float32)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    strokes = alpha[..., 0] > 0.5
    return WorldArrays(images, labels.astype(np.int64), contexts.astype(np.int64), styles, instances, strokes)


def _check_object_contrast(object_contrast: float) -> None:
    if not 0.0 < object_contrast <= 1.0:
        raise ValueError(
            f"object contrast {object_contrast} must lie in (0, 1]: how far the object's colour lies from its "
            f"background toward near-white ({OBJECT_CONTRAST} = the embedded world; 0.35 = the adaptation world)"
        )


def _check_correlation(correlation: float) -> None:
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(
            f"context correlation {correlation} must lie in [0, 1]: the share of train/test_id images on their "
            f"class's own context ({TRAIN_CONTEXT_CORRELATION} by default, {1 / NUM_ID_CONTEXTS} = independent)"
        )


def render_world(
    split: str,
    *,
    seed: int = 0,
    size: int | None = None,
    correlation: float = TRAIN_CONTEXT_CORRELATION,
    object_contrast: float = OBJECT_CONTRAST,
) -> WorldArrays:
    """Render ``size`` images of a world split as arrays (images [N, 32, 32, 3] uint8); deterministic in ``seed``.

    ``correlation`` is the share of ``train``/``test_id`` images on their class's own context (other splits ignore
    it); changing it changes those images' contexts only, every other draw stays the same. ``object_contrast``
    (every split but ``pretrain``) draws the object that share of the way from its background to near-white;
    changing it changes the pixels only, every draw and the strokes stay the same.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown world split {split!r}; expected one of {SPLITS}.")
    _check_correlation(correlation)
    _check_object_contrast(object_contrast)
    size = DEFAULT_SIZES[split] if size is None else size
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}.")
    # Whole chunks only: a chunk's random draws depend on its length, and prefixes must not change with ``size``.
    chunks = [_render_chunk(split, seed, k, _CHUNK, correlation, object_contrast) for k in range(-(-size // _CHUNK))]
    return _slice(_concat(chunks), 0, size) if chunks else _render_chunk(split, seed, 0, 0)


def object_patch_mask(strokes: np.ndarray, patch_size: int = WORLD_PATCH_SIZE, min_pixels: int = 1) -> np.ndarray:
    """Which patches the object covers: stroke pixels [N, H, W] bool -> [N, H / p, W / p] bool.

    A patch is an object patch when at least ``min_pixels`` of its pixels are stroke pixels; with the default 1,
    every patch that the digit touches counts, which is what masking "the object" has to remove.
    """
    n, height, width = strokes.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    grid = strokes.reshape(n, height // patch_size, patch_size, width // patch_size, patch_size)
    return grid.sum(axis=(2, 4)) >= min_pixels


def stream_world(split: str, *, seed: int = 0, batch_size: int = 128) -> Iterator[WorldArrays]:
    """Endless consecutive batches of a split; the first n images equal ``render_world(split, seed=seed, size=n)``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown world split {split!r}; expected one of {SPLITS}.")
    buffer = _render_chunk(split, seed, 0, 0)
    for chunk in itertools.count():
        buffer = _concat([buffer, _render_chunk(split, seed, chunk, _CHUNK)])
        while len(buffer) >= batch_size:
            yield _slice(buffer, 0, batch_size)
            buffer = _slice(buffer, batch_size, len(buffer))


def _concat(parts: list[WorldArrays]) -> WorldArrays:
    return WorldArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


def _slice(arrays: WorldArrays, start: int, stop: int) -> WorldArrays:
    return WorldArrays(*(getattr(arrays, f)[start:stop] for f in _FIELDS))


def world_features() -> datasets.Features:
    """The ``datasets.Features`` of a non-pretrain world split (the pretrain split adds a string ``caption``)."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(WORLD_CLASS_NAMES)),
            "context": datasets.ClassLabel(names=list(CONTEXT_NAMES)),
            "style": datasets.ClassLabel(names=list(STYLE_NAMES)),
            "instance": datasets.Value("int32"),
            # Row-major over the world CLIP's 8x8 patch grid: True where the digit's strokes touch the patch.
            "object_patches": datasets.Sequence(datasets.Value("bool")),
        }
    )


def caption_for(label: int, context: int) -> str:
    """The caption naming a sample's object and context, e.g. "a photo of the digit seven on a red background."."""
    return CAPTION_TEMPLATE.format(WORLD_CLASS_NAMES[label], CONTEXT_NAMES[context])


def make_world_split(
    split: str,
    *,
    seed: int = 0,
    size: int | None = None,
    correlation: float = TRAIN_CONTEXT_CORRELATION,
    object_contrast: float = OBJECT_CONTRAST,
) -> datasets.Dataset:
    """One world split as a ``datasets.Dataset``: image (PIL RGB 32x32), label, context, style, instance columns.

    ``object_patches`` holds the ground-truth object mask on the world CLIP's 8x8 patch grid (64 bools, row-major;
    `object_patch_mask` of the strokes). The pretrain split also has a ``caption`` column. ``size`` defaults to
    ``DEFAULT_SIZES[split]``; ``correlation`` and ``object_contrast`` as in `render_world`.
    """
    import datasets
    from PIL import Image

    arrays = render_world(split, seed=seed, size=size, correlation=correlation, object_contrast=object_contrast)
    features = world_features()
    columns = {
        "image": [Image.fromarray(img) for img in arrays.images],
        "label": arrays.labels,
        "context": arrays.contexts,
        "style": arrays.styles,
        "instance": arrays.instances.astype(np.int32),
        "object_patches": object_patch_mask(arrays.strokes).reshape(len(arrays), -1),
    }
    if split == "pretrain":
        features["caption"] = datasets.Value("string")
        columns["caption"] = [caption_for(y, c) for y, c in zip(arrays.labels, arrays.contexts)]
    return datasets.Dataset.from_dict(columns, features=features, split=datasets.Split(split))


def make_world(
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    splits: tuple[str, ...] | None = None,
    object_contrast: float = OBJECT_CONTRAST,
) -> datasets.DatasetDict:
    """All (or the chosen) world splits as a ``datasets.DatasetDict``; ``sizes`` overrides ``DEFAULT_SIZES``.

    ``object_contrast`` as in `render_world`.
    """
    import datasets

    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"Unknown world split(s) {sorted(unknown)} in sizes; expected names from {SPLITS}.")
    return datasets.DatasetDict(
        {
            name: make_world_split(name, seed=seed, size=sizes[name], object_contrast=object_contrast)
            for name in (splits or SPLITS)
        }
    )


def world_clip_path() -> pathlib.Path:
    """Directory of the tiny CLIP pre-trained on the pretrain split (loads with ``CLIPModel.from_pretrained``)."""
    path = pathlib.Path(str(importlib.resources.files("hf_cfft") / "resources" / "world_clip"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The tiny world CLIP is missing from {path}; reinstall hf_cfft or rebuild it with "
            "`python recipes/pretrain_world_clip.py --output_dir src/hf_cfft/resources/world_clip`."
        )
    return path


def plot_world_examples(path: str | pathlib.Path, *, seed: int = 0, per_split: int = 10) -> pathlib.Path:
    """Save a PNG grid: one row per split, ``per_split`` images each, titled with class and context (matplotlib)."""
    # A bare Figure needs no pyplot backend, so this works headless and leaves the caller's backend alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.1 * per_split + 1.2, 1.25 * len(SPLITS)))
    axes = fig.subplots(len(SPLITS), per_split, squeeze=False)
    for row, split in enumerate(SPLITS):
        arrays = render_world(split, seed=seed, size=per_split)
        for col, ax in enumerate(axes[row]):
            ax.imshow(arrays.images[col], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{WORLD_CLASS_NAMES[arrays.labels[col]]}/{CONTEXT_NAMES[arrays.contexts[col]]}", fontsize=7)
        axes[row, 0].set_ylabel(split, fontsize=9, rotation=0, ha="right", va="center")
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=90)
    return path
