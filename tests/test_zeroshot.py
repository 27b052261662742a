"""Tests for hf_cfft.zeroshot with a tiny, randomly initialised CLIP and an in-code tokenizer (no downloads)."""

import pytest
import torch
from _builders import tiny_clip
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPModel, PreTrainedTokenizerFast

from hf_cfft.zeroshot import build_zeroshot_weights, load_class_names, load_templates

PAD, UNK, BOS, EOS = 0, 1, 2, 3
WORDS = "a an the photo drawing of my itap picture . tabby cat dog red fox sea turtle golden retriever".split()
CLASSES = ["cat", "red fox", "golden retriever dog", "sea turtle", "tabby cat"]
# Four templates of different lengths with batch_size=3, so batches straddle class boundaries and need padding.
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}.", "{}"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.model_max_length = 16
    return tok


def make_model() -> CLIPModel:
    # Heavy dropout makes any forward pass left in train mode visibly disagree with the eval reference.
    model = tiny_clip(vocab_size=99, attention_dropout=0.5)
    with torch.no_grad():
        # Move away from the default init so the scaling step is really exercised.
        model.logit_scale.fill_(1.7)
    return model


def reference_weights(model: CLIPModel, tokenizer, class_names, templates) -> torch.Tensor:
    """Unbatched reference: one prompt per forward pass, one class at a time."""
    model.eval()
    rows = []
    with torch.no_grad():
        for name in class_names:
            embs = []
            for template in templates:
                enc = tokenizer([template.format(name)], return_tensors="pt")
                out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                emb = out if isinstance(out, torch.Tensor) else out.pooler_output
                embs.append(emb[0] / emb[0].norm())
            mean = torch.stack(embs).mean(dim=0)
            rows.append(mean / mean.norm() * model.logit_scale.exp())
    return torch.stack(rows)


@pytest.fixture(scope="module")
def model_and_reference(tokenizer):
    model = make_model()
    return model, reference_weights(model, tokenizer, CLASSES, TEMPLATES)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 256])
def test_matches_unbatched_reference(model_and_reference, tokenizer, batch_size):
    model, expected = model_and_reference
    model.train()
    weights = build_zeroshot_weights(model, tokenizer, CLASSES, TEMPLATES, batch_size=batch_size, show_progress=False)
    assert weights.shape == (len(CLASSES), model.config.projection_dim)
    assert weights.dtype == torch.float32 and weights.device.type == "cpu"
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)


def test_batches_really_straddle_classes_and_pad(tokenizer):
    lengths = {len(tokenizer(t.format(c))["input_ids"]) for c in CLASSES for t in TEMPLATES}
    assert len(lengths) > 1
    assert len(TEMPLATES) % 3 != 0


def test_row_norms_equal_logit_scale(model_and_reference, tokenizer):
    model, _ = model_and_reference
    weights = build_zeroshot_weights(model, tokenizer, CLASSES, TEMPLATES, batch_size=5, show_progress=False)
    norms = weights.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1.7).exp(), atol=1e-5, rtol=1e-5)


def test_accepts_plain_tensor_text_features(model_and_reference, tokenizer, monkeypatch):
    # Older transformers returned the projected embedding directly instead of a ModelOutput.
    model, expected = model_and_reference
    original = model.get_text_features
    monkeypatch.setattr(model, "get_text_features", lambda **kw: original(**kw).pooler_output)
    weights = build_zeroshot_weights(model, tokenizer, CLASSES, TEMPLATES, batch_size=3, show_progress=False)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start_training", [True, False])
def test_training_mode_restored(model_and_reference, tokenizer, start_training):
    model, _ = model_and_reference
    model.train(start_training)
    # A mixed state must survive too: a frozen tower kept in eval while the rest trains.
    model.vision_model.eval()
    before = {name: m.training for name, m in model.named_modules()}
    build_zeroshot_weights(model, tokenizer, CLASSES[:2], TEMPLATES, batch_size=3, show_progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.training is start_training


def test_template_without_placeholder_rejected(model_and_reference, tokenizer):
    model, _ = model_and_reference
    with pytest.raises(ValueError, match="a photo of a cat"):
        build_zeroshot_weights(
            model, tokenizer, CLASSES, ["a photo of a {}.", "a photo of a cat"], show_progress=False
        )


def test_imagenet_class_names():
    names = load_class_names("imagenet")
    assert len(names) == 1000
    expected = {0: "tench", 1: "goldfish", 207: "Golden Retriever", 281: "tabby cat", 409: "analog clock"}
    expected[999] = "toilet paper"
    assert {i: names[i] for i in expected} == expected
    assert all(name == name.strip() and name for name in names)


def test_templates():
    openai = load_templates("openai_imagenet")
    assert len(openai) == 80 and len(set(openai)) == 80
    assert openai[0] == "a bad photo of a {}." and openai[-1] == "a tattoo of the {}."
    simple = load_templates("simple")
    assert 4 <= len(simple) <= 8
    assert all("{}" in t for t in openai + simple)


def test_unknown_names_rejected():
    with pytest.raises(ValueError, match="no_such_set") as info:
        load_templates("no_such_set")
    assert "openai_imagenet" in str(info.value) and "simple" in str(info.value)
    with pytest.raises(ValueError, match="cifar10") as info:
        load_class_names("cifar10")
    assert "imagenet" in str(info.value)
