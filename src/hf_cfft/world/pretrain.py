"""Contrastive pre-training of the tiny CLIP that ships with the package (see ``docs/world.md``).

Images come from the world's ``pretrain`` split (every digit on every context). Each image gets a caption from one
of three families: naming the digit and the context, naming only the digit, or naming only the context. A
digit-only caption is true of every image of that digit (and captions repeat within a batch), so the contrastive
loss uses multi-positive soft targets: every (image, caption) pair in which the caption is true of the image is a
positive.

Training has two stages. Stage 1: every caption names only the digit. Stage 2: each batch's captions all come from
one family, drawn per batch. Why: this tiny CLIP learns one factor at a time. With the families mixed inside a
batch from the start it learns the colours in a few dozen steps and then stays at chance on digits far longer than
a CPU budget allows; after stage 1, mixed batches keep the digits but never pick up the context. Single-family
batches let each factor be learnt without the other one's captions as competitors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from ..zeroshot import build_zeroshot_weights
from . import render as world
from .render import CONTEXT_NAMES, WORLD_CLASS_NAMES, WORLD_TEMPLATES

# The three caption families. The digit-only forms are the zero-shot prompts, as OpenAI CLIP's "a photo of a {}."
# resembles text it saw in pre-training.
BOTH_TEMPLATES: tuple[str, ...] = (
    world.CAPTION_TEMPLATE,
    "the digit {} on a {} background.",
    "a handwritten {} on {}.",
    "a photo of the number {} on a {} background.",
)
CONTEXT_TEMPLATES: tuple[str, ...] = ("a photo of a {} background.", "something on a {} background.")
DIGIT_TEMPLATES: tuple[str, ...] = WORLD_TEMPLATES
# Probability of each caption family (both, digit only, context only) in stage 2.
FAMILY_PROBS: tuple[float, float, float] = (0.4, 0.4, 0.2)
DIGIT_ONLY: tuple[float, float, float] = (0.0, 1.0, 0.0)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def all_caption_texts() -> list[str]:
    """Every caption the pre-training can produce (the tokenizer's training corpus)."""
    texts = [t.format(d, c) for t in BOTH_TEMPLATES for d in WORLD_CLASS_NAMES for c in CONTEXT_NAMES]
    texts += [t.format(d) for t in DIGIT_TEMPLATES for d in WORLD_CLASS_NAMES]
    texts += [t.format(c) for t in CONTEXT_TEMPLATES for c in CONTEXT_NAMES]
    return texts


def build_world_tokenizer(corpus: Sequence[str] | None = None) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose byte-level BPE merges are learnt on the caption corpus (each word ends as one token).

    The merges are learnt here, not with ``tokenizers``' trainer, whose tie-breaking between equally frequent pairs
    changes from run to run (and with it every token id). Ties go to the lexicographically smallest pair. Vocabulary
    order as in OpenAI CLIP: the 256 byte symbols, the same with the end-of-word suffix, the merges, then
    start/end-of-text, so the end-of-text id (also the padding id) is the largest.
    """
    from tokenizers import pre_tokenizers

    corpus = list(corpus if corpus is not None else all_caption_texts())
    # Split words exactly as CLIPTokenizer will at load time, so the merges apply unchanged.
    splitter = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer
    counts: dict[tuple[str, ...], int] = {}
    for text in corpus:
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)):
            symbols = (*word[:-1], word[-1] + "</w>")
            counts[symbols] = counts.get(symbols, 0) + 1
    merges: list[tuple[str, str]] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, n in counts.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, n in counts.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        counts = merged
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # Every byte alone and at a word end is in the vocabulary, so any text encodes without the unknown token (the
    # end-of-text token here, which would move the text tower's pooling position).
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges), BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)


def build_world_clip_config(
    tokenizer,
    *,
    vision_hidden: int = 128,
    vision_layers: int = 4,
    text_hidden: int = 64,
    text_layers: int = 2,
    projection_dim: int = 64,
) -> CLIPConfig:
    """The tiny ``CLIPConfig``: ViT 32px/patch 4 (8x8 grid), hidden 128, 4 layers; text hidden 64, 2 layers; proj 64.

    The text config's bos/eos/pad ids come from ``tokenizer``, so the text tower pools at the end-of-text token.
    """
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden,
        "intermediate_size": 4 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        # Sub-configs carry the projection size too, so CLIP{Vision,Text}ModelWithProjection load these weights.
        "projection_dim": projection_dim,
    }
    vision_config = {
        "image_size": world.IMAGE_SIZE,
        "patch_size": 4,
        "hidden_size": vision_hidden,
        "intermediate_size": 4 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "projection_dim": projection_dim,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def build_world_image_processor() -> CLIPImageProcessor:
    """A ``CLIPImageProcessor`` for 32x32 images: identity resize and crop, OpenAI CLIP mean/std."""
    return CLIPImageProcessor(
        size={"shortest_edge": world.IMAGE_SIZE},
        crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def images_to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB images [N, H, W, 3] -> normalised pixel_values [N, 3, H, W] float32 (what the processor gives)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def sample_captions(
    labels: np.ndarray,
    contexts: np.ndarray,
    rng: np.random.Generator,
    family_probs: Sequence[float] = FAMILY_PROBS,
    one_family: bool = False,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Draw one caption per image; returns texts, and per caption the digit and context it names (-1 = unnamed).

    family_probs: probabilities of naming (both digit and context, only the digit, only the context).
    one_family: draw the family once for the whole batch instead of once per caption.
    """
    n = len(labels)
    p = np.asarray(family_probs) / np.sum(family_probs)
    family = np.full(n, rng.choice(3, p=p)) if one_family else rng.choice(3, size=n, p=p)
    texts, named_digit, named_context = [], np.full(n, -1), np.full(n, -1)
    for i in range(n):
        d, c = WORLD_CLASS_NAMES[labels[i]], CONTEXT_NAMES[contexts[i]]
        if family[i] == 0:
            texts.append(BOTH_TEMPLATES[rng.integers(len(BOTH_TEMPLATES))].format(d, c))
            named_digit[i], named_context[i] = labels[i], contexts[i]
        elif family[i] == 1:
            texts.append(DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))].format(d))
            named_digit[i] = labels[i]
        else:
            texts.append(CONTEXT_TEMPLATES[rng.integers(len(CONTEXT_TEMPLATES))].format(c))
            named_context[i] = contexts[i]
    return texts, named_digit, named_context


def caption_truth(
    labels: torch.Tensor, contexts: torch.Tensor, named_digit: torch.Tensor, named_context: torch.Tensor
) -> torch.Tensor:
    """Which caption is true of which image: [N_images, N_captions] bool (a caption is true if all it names agree)."""
    digit_ok = (named_digit[None, :] < 0) | (named_digit[None, :] == labels[:, None])
    context_ok = (named_context[None, :] < 0) | (named_context[None, :] == contexts[:, None])
    return digit_ok & context_ok


def multi_positive_clip_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets spread evenly over all positives.

    logits: [N_images, N_captions] scaled cosine similarities; positives: same shape, bool, at least one per row and
    per column. Returns a scalar; equals CLIP's loss when ``positives`` is the identity.
    """
    targets = positives.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(targets / targets.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def zeroshot_accuracy(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: Sequence[str] = WORLD_CLASS_NAMES,
    templates: Sequence[str] = WORLD_TEMPLATES,
    batch_size: int = 256,
) -> float:
    """Zero-shot top-1 accuracy on uint8 images [N, 32, 32, 3] with labels [N] (indices into ``class_names``)."""
    was_training = model.training
    model.eval()
    # the library's zero-shot head (`hf_cfft.zeroshot`); its scale (the temperature) does not change the argmax
    weights = build_zeroshot_weights(model, tokenizer, class_names, templates, show_progress=False)
    correct = 0
    for start in range(0, len(labels), batch_size):
        pixels = images_to_pixel_values(images[start : start + batch_size])
        feats = model.get_image_features(pixel_values=pixels)
        feats = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
        correct += int((feats @ weights.T).argmax(-1).eq(torch.from_numpy(labels[start : start + batch_size])).sum())
    model.train(was_training)
    return correct / max(len(labels), 1)


def evaluate_world_zeroshot(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    *,
    seed: int = 0,
    size: int = 1000,
    splits: Sequence[str] = ("test_id", *world.OOD_SPLITS),
) -> dict[str, float]:
    """Zero-shot digit accuracy per world split ({split: accuracy in [0, 1]}) on ``size`` rendered images each.

    Also reports ``context@<split>``: how well the same model names the context (the 14 context names as classes,
    ``CONTEXT_TEMPLATES`` as prompts), which shows whether the features carry the context at all.
    """
    rendered = {split: world.render_world(split, seed=seed, size=size) for split in splits}
    out = {}
    for split, arrays in rendered.items():
        out[split] = zeroshot_accuracy(model, tokenizer, arrays.images, arrays.labels)
    for split, arrays in rendered.items():
        out[f"context@{split}"] = zeroshot_accuracy(
            model, tokenizer, arrays.images, arrays.contexts, class_names=CONTEXT_NAMES, templates=CONTEXT_TEMPLATES
        )
    return out


def _lr_factor(step: int, steps: int, warmup_fraction: float = 0.05, decay_fraction: float = 0.3) -> float:
    """Linear warm-up, a plateau, then cosine decay to 0 over the last ``decay_fraction`` of the steps."""
    warmup = max(1, int(warmup_fraction * steps))
    decay_start = max(warmup, int((1.0 - decay_fraction) * steps))
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - decay_start) / max(1, steps - decay_start)))


def _pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return input_ids, attention_mask


def pretrain_world_clip(
    *,
    seed: int = 0,
    digit_steps: int = 400,
    mixed_steps: int = 1100,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.1,
    caption_family_probs: Sequence[float] = FAMILY_PROBS,
    eval_every: int = 100,
    eval_size: int = 500,
    log: Callable[[str], None] = print,
) -> tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessor, list[dict]]:
    """Pre-train the tiny world CLIP from scratch; returns (model, tokenizer, image_processor, history).

    Stage 1 runs ``digit_steps`` steps with digit-only captions; stage 2 runs ``mixed_steps`` steps whose batches
    each take one caption family drawn with ``caption_family_probs`` (both, digit only, context only). Each stage
    has its own AdamW and schedule (5% warm-up, plateau, cosine to 0 over the last 30%) peaking at
    ``learning_rate``. Every step draws ``batch_size`` fresh images from the pretrain split's stream (``seed``).
    ``history``: one dict per step (stage, step, loss, seconds; ``zeroshot_test_id`` every ``eval_every`` steps,
    measured on ``eval_size`` test_id images of world seed ``seed + 1``).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = build_world_tokenizer()
    model = CLIPModel(build_world_clip_config(tokenizer))
    model.train()
    token_cache: dict[str, list[int]] = {}
    probe = world.render_world("test_id", seed=seed + 1, size=eval_size)
    stream = world.stream_world("pretrain", seed=seed, batch_size=batch_size)
    history: list[dict] = []
    start_time = time.perf_counter()
    total = digit_steps + mixed_steps
    for stage, steps, family_probs in ((1, digit_steps, DIGIT_ONLY), (2, mixed_steps, caption_family_probs)):
        if steps <= 0:
            continue
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=learning_rate,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step, steps=steps: _lr_factor(step, steps))
        for _ in range(steps):
            batch = next(stream)
            texts, named_digit, named_context = sample_captions(
                batch.labels, batch.contexts, rng, family_probs, one_family=stage == 2
            )
            for t in texts:
                if t not in token_cache:
                    token_cache[t] = tokenizer(t)["input_ids"]
            input_ids, attention_mask = _pad([token_cache[t] for t in texts], tokenizer.pad_token_id)
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=images_to_pixel_values(batch.images),
            )
            positives = caption_truth(
                *(torch.from_numpy(a) for a in (batch.labels, batch.contexts, named_digit, named_context))
            )
            loss = multi_positive_clip_loss(out.logits_per_image, positives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step = len(history) + 1
            record = {"stage": stage, "step": step, "loss": loss.item(), "seconds": time.perf_counter() - start_time}
            if step % eval_every == 0 or step == total:
                record["zeroshot_test_id"] = zeroshot_accuracy(model, tokenizer, probe.images, probe.labels)
                log(
                    f"stage {stage} step {step}/{total} loss {record['loss']:.3f} "
                    f"zero-shot test_id {record['zeroshot_test_id']:.3f} ({record['seconds']:.0f}s)"
                )
            history.append(record)
    model.eval()
    return model, tokenizer, build_world_image_processor(), history
