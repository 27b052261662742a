"""Tiny CLIP checkpoints and image folders built in code, for tests that exercise the real loading paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

CLASSES = ("cat", "dog", "fox")
_WORDS = "a an the photo of picture image close-up cropped good . cat dog fox".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *dict.fromkeys(_WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.model_max_length = 16
    return tokenizer


def tiny_clip(seed: int = 0, **text_overrides) -> CLIPModel:
    """A 2-layer CLIP (32 px images, 8 px patches, projection 16), initialised from ``seed``; ``text_overrides``
    replace entries of its text config (e.g. ``vocab_size``, ``attention_dropout``)."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        | text_overrides,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return CLIPModel(config)


def random_images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """[batch, 3, 32, 32] standard-normal pixel values (the tiny models' input), seeded."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def keep_masks(counts_removed, seed: int = 0) -> torch.Tensor:
    """[B, 16] bool keep masks on the 4x4 patch grid; image b loses ``counts_removed[b]`` random patches."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.ones(len(counts_removed), 16, dtype=torch.bool)
    for b, removed in enumerate(counts_removed):
        keep[b, torch.randperm(16, generator=generator)[:removed]] = False
    return keep


def scramble_removed_patches(images: torch.Tensor, keep: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """``images`` with the pixels of every removed patch (``keep`` False) replaced by fresh noise."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * 10
    pixel_keep = keep.view(-1, 1, 4, 1, 4, 1).expand(-1, 3, 4, 8, 4, 8).reshape(images.shape)
    return torch.where(pixel_keep, images, noise)


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A complete CLIP checkpoint folder (weights, tokenizer, image processor), like a Hub snapshot."""
    tiny_clip(seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    tiny_image_processor().save_pretrained(path)
    return path


def write_imagefolder(root: Path, splits=("train", "test"), per_class: int = 6, seed: int = 0) -> Path:
    """<root>/<split>/<class>/<n>.png with class-dependent colours, odd sizes and modes, as users' folders have."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                size = (int(rng.integers(30, 48)), int(rng.integers(30, 48)))
                pixels = rng.integers(0, 80, (*size, 3)) + np.array([80 * label, 40, 160 - 60 * label])
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                image = image.convert("L") if n == 0 else image
                image.save(folder / f"{n}.png")
    return root


def recording_hub(repo_id: str):
    """A mock `HfApi` whose ``upload_folder`` records the files each upload would send: (hub, uploads)."""
    from unittest import mock

    from huggingface_hub import RepoUrl
    from huggingface_hub.utils import filter_repo_objects

    uploads: list[list[str]] = []

    def upload_folder(folder_path, allow_patterns=None, ignore_patterns=None, **_):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        uploads.append(
            list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        )
        return mock.MagicMock(is_done=lambda: True)

    hub = mock.MagicMock(name="HfApi")
    hub.create_repo.return_value = RepoUrl(f"https://huggingface.co/{repo_id}")
    hub.upload_folder.side_effect = upload_folder
    return hub, uploads


def load_script(path: Path, module_name: str):
    """Import a recipe or benchmark script (not a package module) as ``module_name``, registered in sys.modules."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
