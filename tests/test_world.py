"""The embedded world: determinism, the promised context-class relations, held-out instances, the shipped CLIP."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_cfft.world import (
    CONTEXT_NAMES,
    NUM_ID_CONTEXTS,
    OOD_SPLITS,
    SPLITS,
    WORLD_CLASS_NAMES,
    WORLD_TEMPLATES,
    make_world_split,
    render_world,
    stream_world,
    world_clip_path,
)
from hf_cfft.world import render as world

# Measured on 200 test_id images (world seed 0): 0.89 for the shipped model; the floor leaves room for BLAS noise.
ZEROSHOT_FLOOR = 0.75


def own_context_rate(arrays: world.WorldArrays) -> float:
    return float(np.mean(arrays.contexts == arrays.labels))


@pytest.fixture(scope="module")
def measured():
    return {split: render_world(split, seed=0, size=4000) for split in SPLITS}


def test_same_seed_gives_same_bytes_and_another_seed_does_not():
    a = make_world_split("train", seed=3, size=32)
    b = make_world_split("train", seed=3, size=32)
    c = make_world_split("train", seed=4, size=32)
    as_bytes = [np.asarray(img).tobytes() for img in a["image"]]
    assert as_bytes == [np.asarray(img).tobytes() for img in b["image"]]
    assert as_bytes != [np.asarray(img).tobytes() for img in c["image"]]
    assert list(a["label"]) == list(b["label"]) and list(a["context"]) == list(b["context"])


def test_a_smaller_split_is_a_prefix_of_a_larger_one_and_of_the_stream():
    big = render_world("pretrain", seed=1, size=1500)
    small = render_world("pretrain", seed=1, size=10)
    np.testing.assert_array_equal(small.images, big.images[:10])
    stream = stream_world("pretrain", seed=1, batch_size=500)
    np.testing.assert_array_equal(np.concatenate([next(stream).images for _ in range(3)]), big.images)


def test_dataset_columns_features_and_captions():
    ds = make_world_split("pretrain", seed=0, size=20)
    assert ds.features["label"].names == list(WORLD_CLASS_NAMES)
    assert ds.features["context"].names == list(CONTEXT_NAMES)
    row = ds[0]
    assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
    digit, context = WORLD_CLASS_NAMES[row["label"]], CONTEXT_NAMES[row["context"]]
    assert f"digit {digit} " in row["caption"] and f" {context} background" in row["caption"]
    assert "caption" not in make_world_split("test_id", size=4).column_names
    with pytest.raises(ValueError, match="ood_typo"):
        make_world_split("ood_typo")


def test_train_and_test_id_tie_each_class_to_its_context_90_percent(measured):
    for split in ("train", "test_id"):
        assert 0.88 <= own_context_rate(measured[split]) <= 0.92, split
        assert measured[split].contexts.max() < NUM_ID_CONTEXTS


def test_shuffled_contexts_are_uniform_and_swapped_never_own(measured):
    shuffled = measured["ood_shuffled"]
    assert abs(own_context_rate(shuffled) - 1 / NUM_ID_CONTEXTS) < 0.02
    counts = np.bincount(shuffled.contexts, minlength=NUM_ID_CONTEXTS)
    assert len(counts) == NUM_ID_CONTEXTS and counts.min() > 0.8 * len(shuffled) / NUM_ID_CONTEXTS
    swapped = measured["ood_swapped"]
    assert own_context_rate(swapped) == 0.0
    assert swapped.contexts.max() < NUM_ID_CONTEXTS
    # Every class meets every other class's context.
    assert len({(y, c) for y, c in zip(swapped.labels, swapped.contexts)}) == NUM_ID_CONTEXTS * (NUM_ID_CONTEXTS - 1)


def test_novel_contexts_never_appear_in_fine_tuning_data(measured):
    assert measured["ood_novel"].contexts.min() >= NUM_ID_CONTEXTS
    for split in ("train", "test_id", "ood_shuffled", "ood_swapped", "ood_style"):
        assert measured[split].contexts.max() < NUM_ID_CONTEXTS, split
    # Pre-training shows every digit on every context, novel ones included.
    pretrain = measured["pretrain"]
    assert len({(y, c) for y, c in zip(pretrain.labels, pretrain.contexts)}) == 10 * len(CONTEXT_NAMES)


def test_style_shift_is_outlines_only_in_ood_style(measured):
    assert measured["ood_style"].styles.min() == 1
    for split in ("train", "test_id", *[s for s in OOD_SPLITS if s != "ood_style"]):
        assert measured[split].styles.max() == 0, split
    # An outline has fewer object pixels than the solid digit of the same instance.
    style = render_world("ood_style", seed=0, size=64).images.astype(float)
    shuffled = render_world("ood_shuffled", seed=0, size=64).images.astype(float)
    assert (style.min(-1) > 200).sum() < 0.6 * (shuffled.min(-1) > 200).sum()


def test_test_instances_are_held_out(measured):
    seen = set(measured["pretrain"].instances) | set(measured["train"].instances)
    for split in ("test_id", *OOD_SPLITS):
        assert seen.isdisjoint(measured[split].instances), split
    assert set(measured["pretrain"].instances).isdisjoint(measured["train"].instances)
    # Instance pools keep each digit's class.
    labels = world._digits()[1]
    for split in SPLITS:
        np.testing.assert_array_equal(labels[measured[split].instances], measured[split].labels)


@pytest.fixture(scope="module")
def world_clip():
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = world_clip_path()
    # Loading from a local directory must never touch the network.
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return model, tokenizer, processor


def test_shipped_clip_is_small_and_its_tokenizer_matches_the_text_config(world_clip):
    model, tokenizer, _ = world_clip
    assert (world_clip_path() / "model.safetensors").stat().st_size < 6_000_000
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (32, 4)
    text = model.config.text_config
    assert text.vocab_size == len(tokenizer)
    assert (text.bos_token_id, text.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    # eos id 2 would switch CLIP's text pooling to the legacy argmax rule.
    assert text.eos_token_id != 2
    prompt = tokenizer("a photo of the digit seven.")["input_ids"]
    words = ["a</w>", "photo</w>", "of</w>", "the</w>", "digit</w>", "seven</w>", ".</w>"]
    assert tokenizer.convert_ids_to_tokens(prompt) == ["<|startoftext|>", *words, "<|endoftext|>"]
    # Text the captions never used still encodes byte by byte, never as the end-of-text token (unknown token).
    odd = tokenizer("A zebra, 42!")["input_ids"]
    assert odd.count(text.eos_token_id) == 1 and odd[-1] == text.eos_token_id


def test_shipped_clip_vision_tower_loads_alone_with_its_projection(world_clip):
    from transformers import CLIPVisionModelWithProjection

    model, _, _ = world_clip
    vision = CLIPVisionModelWithProjection.from_pretrained(world_clip_path(), local_files_only=True).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.get_image_features(pixel_values=pixels)
        alone = vision(pixel_values=pixels).image_embeds
    torch.testing.assert_close(alone, getattr(whole, "pooler_output", whole))


def _zeroshot_weights(model, tokenizer) -> torch.Tensor:
    from hf_cfft.zeroshot import build_zeroshot_weights

    return build_zeroshot_weights(model, tokenizer, WORLD_CLASS_NAMES, WORLD_TEMPLATES, show_progress=False)


def test_shipped_clip_classifies_held_out_digits_zero_shot(world_clip):
    model, tokenizer, processor = world_clip
    ds = make_world_split("test_id", seed=0, size=200)
    weights = _zeroshot_weights(model, tokenizer)
    pixels = processor(images=list(ds["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels)
    logits = F.normalize(getattr(feats, "pooler_output", feats), dim=-1) @ weights.T
    accuracy = (logits.argmax(-1) == torch.tensor(list(ds["label"]))).float().mean().item()
    assert accuracy >= ZEROSHOT_FLOOR, f"zero-shot accuracy {accuracy:.3f} on 200 test_id images"
    # The recorded figures in training_log.json are what docs/world.md quotes.
    log = json.loads((world_clip_path() / "training_log.json").read_text())
    assert abs(log["zeroshot_accuracy"]["test_id"] - accuracy) < 0.15


def test_multi_positive_loss_is_clip_loss_for_distinct_captions_and_rewards_equal_captions():
    from hf_cfft.world.pretrain import caption_truth, multi_positive_clip_loss

    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    target = torch.arange(5)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(multi_positive_clip_loss(logits, torch.eye(5, dtype=torch.bool)), clip)
    # Images 0 and 1 are both sevens; caption 0 names only the digit, caption 1 digit and context, caption 2 only
    # the context (red), so caption 0 is true of both sevens and caption 2 of both red images.
    labels, contexts = torch.tensor([7, 7, 3]), torch.tensor([0, 2, 0])
    truth = caption_truth(labels, contexts, torch.tensor([7, 7, -1]), torch.tensor([-1, 2, 0]))
    assert truth.tolist() == [[True, False, True], [True, True, False], [False, False, True]]
    # Scoring every true pair high beats scoring only the diagonal high, whereas CLIP's one-hot targets penalise it.
    perfect = torch.where(truth, 10.0, -10.0)
    diagonal = torch.where(torch.eye(3, dtype=torch.bool), 10.0, -10.0)
    assert multi_positive_clip_loss(perfect, truth) < multi_positive_clip_loss(diagonal, truth)
    eye = torch.eye(3, dtype=torch.bool)
    assert multi_positive_clip_loss(perfect, eye) > multi_positive_clip_loss(diagonal, eye)


def test_world_tokenizer_is_the_same_on_every_build():
    from hf_cfft.world.pretrain import build_world_tokenizer

    first, second = build_world_tokenizer(), build_world_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    caption = "a photo of the digit seven on a checkered background."
    assert len(first(caption)["input_ids"]) == len(caption.replace(".", " .").split()) + 2


def test_pretrain_recipe_runs_end_to_end_and_saves_a_loadable_clip(tmp_path, monkeypatch):
    import importlib.util
    import pathlib

    from transformers import AutoTokenizer, CLIPModel

    script = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "pretrain_world_clip.py"
    spec = importlib.util.spec_from_file_location("pretrain_world_clip", script)
    recipe = importlib.util.module_from_spec(spec)
    # dataclasses resolve the module's annotations through sys.modules.
    monkeypatch.setitem(sys.modules, spec.name, recipe)
    spec.loader.exec_module(recipe)
    args = recipe.PretrainWorldClipArguments(
        output_dir=str(tmp_path), digit_steps=2, mixed_steps=2, batch_size=8, eval_every=2, eval_size=20
    )
    # main() sets process-wide torch state (thread count, deterministic algorithms): restore it for other tests.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        accuracy = recipe.main(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert set(accuracy) >= {"test_id", *OOD_SPLITS}
    model = CLIPModel.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert [h["stage"] for h in log["history"]] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="batch_size"):
        recipe.PretrainWorldClipArguments(batch_size=1)


def test_shipped_clip_is_what_its_recipe_recorded():
    """The shipped weights are the recipe's output: its training_log.json names their sha256 and pinned numerics."""
    import hashlib

    log = json.loads((world_clip_path() / "training_log.json").read_text())
    digest = hashlib.sha256((world_clip_path() / "model.safetensors").read_bytes()).hexdigest()
    assert log["model_sha256"] == digest
    assert log["numerics"]["MKL_CBWR"] == "COMPATIBLE" and log["numerics"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert log["numerics"]["threads"] == "1"
    # The recorded arguments are the recipe's defaults, so running it without flags rebuilds these weights.
    import importlib.util
    import pathlib
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "pretrain_world_clip.py"
    spec = importlib.util.spec_from_file_location("pretrain_world_clip_defaults", script)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    try:
        spec.loader.exec_module(recipe)
        from dataclasses import asdict

        defaults = asdict(recipe.PretrainWorldClipArguments())
    finally:
        del sys.modules[spec.name]
    assert {k: v for k, v in defaults.items() if k not in ("output_dir", "require_match")} == log["arguments"]


def test_pretrain_recipe_pins_its_numerics_before_torch_loads(tmp_path):
    """Started without the pinned environment, the script re-executes itself with it (a 2-step run)."""
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "pretrain_world_clip.py"
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    argv = ["--digit_steps", "1", "--mixed_steps", "1", "--batch_size", "4", "--eval_size", "8", "--eval_every", "1"]
    done = subprocess.run(
        [sys.executable, str(script), "--output_dir", str(tmp_path), *argv],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert log["numerics"]["MKL_CBWR"] == "COMPATIBLE"
    assert log["numerics"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert log["numerics"]["cpu_capability"] in ("AVX2", "DEFAULT")  # what torch ran: never AVX-512
    assert log["numerics"]["threads"] == "1"
    assert "differs from the shipped" in done.stdout  # 2 steps are not the shipped model, and it says so


# A 20-step run of the recipe (below) gave this model.safetensors on every run where it was checked: AMD EPYC hosts,
# idle and under load, with the library versions of the shipped training_log.json (docs/world.md, "Rebuilding").
SHORT_RUN_ARGS = ["--digit_steps", "10", "--mixed_steps", "10", "--eval_size", "50", "--eval_every", "20"]
SHORT_RUN_SHA256 = "3bebc38ec058f5643fae84f776d10f1afcada713ae6549f74c8d88b01eae8a9a"
VERIFIED_HOSTS = ("AMD EPYC",)


def _host_and_versions_are_verified() -> tuple[bool, str]:
    import pathlib

    import numpy
    import transformers

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), "unknown") if cpuinfo.exists() else "unknown"  # fmt: skip
    shipped = json.loads((world_clip_path() / "training_log.json").read_text())["numerics"]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__}
    same = all(shipped[k] == v for k, v in versions.items())
    verified = model in VERIFIED_HOSTS and same
    return verified, f"host {model!r}, versions {versions} (shipped with {[shipped[k] for k in versions]})"


def test_a_short_run_of_the_recipe_gives_the_recorded_weights_bit_for_bit(tmp_path, request):
    """The determinism the shipped CLIP rests on, checked on every machine the suite runs on (fresh CI ones too).

    On a host or library versions where it was not yet checked, a mismatch is reported as an expected failure (the
    pinned numerics do not cover that host: docs/world.md) instead of failing the suite; a match there passes."""
    import pathlib
    import subprocess

    verified, where = _host_and_versions_are_verified()
    if not verified:
        request.applymarker(pytest.mark.xfail(reason=f"bitwise rebuild not yet verified on {where}", strict=False))
    script = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "pretrain_world_clip.py"
    done = subprocess.run(
        [sys.executable, str(script), "--output_dir", str(tmp_path), *SHORT_RUN_ARGS],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert log["model_sha256"] == SHORT_RUN_SHA256, f"on {where}"


def test_object_contrast_changes_the_pixels_only_and_never_pre_training():
    from hf_cfft.world import render_world

    shipped = render_world("ood_shuffled", seed=3, size=300)
    faint = render_world("ood_shuffled", seed=3, size=300, object_contrast=0.35)
    for field in ("labels", "contexts", "styles", "instances", "strokes"):
        assert np.array_equal(getattr(shipped, field), getattr(faint, field)), field
    on = faint.strokes[..., None].repeat(3, axis=-1)
    # Off the strokes the image is the same up to where the blend weight is small; on them the object is fainter.
    assert faint.images[on].mean() < shipped.images[on].mean() - 60
    assert np.abs(faint.images[~on].astype(int) - shipped.images[~on]).mean() < 15
    # A prefix stays a prefix, and pre-training never sees the faint object.
    assert np.array_equal(
        render_world("ood_shuffled", seed=3, size=100, object_contrast=0.35).images, faint.images[:100]
    )
    assert np.array_equal(
        render_world("pretrain", size=64, object_contrast=0.35).images, render_world("pretrain", size=64).images
    )
    with pytest.raises(ValueError, match="object contrast 0 must lie in \\(0, 1\\]"):
        render_world("test_id", size=4, object_contrast=0)


def test_world_only_flags_are_refused_for_other_datasets(tmp_path):
    from hf_cfft.cli.sources import load_image_splits

    with pytest.raises(ValueError, match="--world_eval_size 50 applies to the embedded world only"):
        load_image_splits(str(tmp_path), ["train"], world_eval_size=50)
    # before: silently ignored, so an "oracle" run on the user's own folder trained what vanilla FT trains
    with pytest.raises(ValueError, match="--world_train_correlation 0.1 applies to the embedded world only"):
        load_image_splits(str(tmp_path), ["train"], world_train_correlation=0.1)
    splits = load_image_splits("world", ["train", "test_id"], world_eval_size=50, world_object_contrast=0.35)
    assert len(splits["test_id"]) == 50 and len(splits["train"]) == 4000
