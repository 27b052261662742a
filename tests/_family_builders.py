"""Tiny SigLIP, SigLIP 2 (fixed resolution) and MetaCLIP 2 checkpoints with their tokenizers, built in code.

Each folder holds what a Hub snapshot of the family holds (weights, tokenizer, image processor), shrunk: 32x32
images, 8x8 patches (a 4x4 grid), 2 layers, 32 wide. The tokenizers follow each family's conventions:

- SigLIP: lower-cased words, EOS appended, padded with the EOS-like pad to the text tower's length; like the
  original it returns no attention mask (SigLIP's text tower was trained without one);
- SigLIP 2 (a ``siglip`` checkpoint with a Gemma-style tokenizer): lower-cased, ``<eos>`` appended, with a mask;
- MetaCLIP 2 (XLM-R style): ``<s> $A </s>``, ``<pad>`` = 1, text pooled at the first ``</s>``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    MetaClip2Config,
    MetaClip2Model,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

FAMILY_NAMES = ("siglip", "siglip2", "metaclip_2")
_WORDS = "a an the this is photo of picture image close-up cropped good . cat dog fox".split()
_TOWER = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
TEXT_LENGTH = 16


def _word_tokenizer(specials: list[str], template: str, with_mask: bool, **tokens) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*specials, *dict.fromkeys(_WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tokens["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    used = sorted({piece for piece in template.split() if piece in vocab})
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(piece, vocab[piece]) for piece in used]
    )
    model_input_names = ["input_ids", "attention_mask"] if with_mask else ["input_ids"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=model_input_names, **tokens)
    tokenizer.model_max_length = TEXT_LENGTH
    return tokenizer


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    if family == "siglip":
        return _word_tokenizer(
            ["<pad>", "</s>", "<unk>"], "$A </s>", False, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
        )
    if family == "siglip2":
        return _word_tokenizer(
            ["<pad>", "<eos>", "<bos>", "<unk>"],
            "$A <eos>",
            True,
            pad_token="<pad>",
            eos_token="<eos>",
            bos_token="<bos>",
            unk_token="<unk>",
        )
    if family == "metaclip_2":
        return _word_tokenizer(
            ["<s>", "<pad>", "</s>", "<unk>"],
            "<s> $A </s>",
            True,
            bos_token="<s>",
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised tiny ``SiglipModel`` (SigLIP, SigLIP 2) or ``MetaClip2Model``."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(family)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if family == "metaclip_2":
        return MetaClip2Model(
            MetaClip2Config(text_config={**text, "bos_token_id": 0}, vision_config=_TOWER, projection_dim=16)
        )
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=_TOWER))
    with torch.no_grad():  # a real checkpoint's temperature and bias are far from the init's (0, 0)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)
    return model


def tiny_image_processor(family: str):
    if family == "metaclip_2":
        return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return SiglipImageProcessorPil(size={"height": 32, "width": 32})


def save_tiny_family(path: Path, family: str, seed: int = 0) -> Path:
    """A complete checkpoint folder of ``family`` (weights, tokenizer, image processor), like a Hub snapshot."""
    tiny_model(family, seed).save_pretrained(path)
    tiny_tokenizer(family).save_pretrained(path)
    tiny_image_processor(family).save_pretrained(path)
    return path
