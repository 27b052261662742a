"""Issue 14: what a user can do that used to end in rc 0 and a wrong or lost result now ends in one clear message."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from _builders import (
    load_script,
    recording_hub,
    save_tiny_clip,
    tiny_clip,
    tiny_image_processor,
    tiny_tokenizer,
    write_imagefolder,
)
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from huggingface_hub import ModelCard
from PIL import Image

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.classifier_loading import load_classifier
from hf_cfft.cli.script_args import DataArguments, load_train_and_eval_splits, parse_with_config
from hf_cfft.head_checks import check_zeroshot_head

ROOT = Path(__file__).resolve().parents[1]
WORLD_YAML = ROOT / "recipes" / "configs" / "world.yaml"


def _recipe():
    return load_script(ROOT / "recipes" / "finetune.py", "finetune_recipe")


def _tiny_image_dataset(n: int = 8) -> Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)) for _ in range(n)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["cat", "dog", "fox"])})
    return Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)


def _trainer(model, out: Path, **overrides) -> CfftTrainer:
    kwargs = dict(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, use_cpu=True, mask_kind="random",
        fill_kind="single", report_to="none", logging_steps=1, save_strategy="no", learning_rate=1e-3,
    )  # fmt: skip
    args = CfftConfig(**{**kwargs, **overrides})
    return CfftTrainer(
        model=model, args=args, train_dataset=_tiny_image_dataset(), processing_class=tiny_image_processor()
    )


# ---- 1. flags override the embedded world's config instead of replacing it ----


def test_flags_override_the_world_config_instead_of_replacing_it():
    world = yaml.safe_load(WORLD_YAML.read_text())
    model_args, data_args, args, run_args = _recipe().parse_args(["--output_dir", "outputs/x", "--max_steps", "2"])
    assert (args.output_dir, args.max_steps) == ("outputs/x", 2)
    assert args.distill_weight == world["distill_weight"] != 30.0
    assert args.per_device_train_batch_size == world["per_device_train_batch_size"] != 8
    assert (args.learning_rate, args.weight_decay) == (world["learning_rate"], world["weight_decay"])
    assert model_args.templates == "world" and data_args.eval_splits == world["eval_splits"]
    assert run_args.compare_with_vanilla is True


def test_config_replaces_the_default_and_other_datasets_get_the_papers_defaults(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("mask_kind: random\nfill_kind: multi\nlearning_rate: 1.0e-4\n")
    _, data_args, args, run_args = _recipe().parse_args(["--config", str(config), "--output_dir", "o"])
    assert (args.mask_kind, args.learning_rate, args.distill_weight) == ("random", 1e-4, 30.0)
    assert data_args.eval_splits == [] and run_args.compare_with_vanilla is False
    _, data_args, args, _ = _recipe().parse_args(["--dataset_name", str(tmp_path), "--output_dir", "o"])
    assert (args.distill_weight, args.per_device_train_batch_size, args.learning_rate) == (30.0, 8, 5e-5)
    assert data_args.ood_splits == []


def test_help_lists_config_and_the_methods_knobs_first(capsys):
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in text and "recipes/configs/world.yaml when --dataset_name is world" in text
    options = text[text.index("the method's knobs:") :]
    assert options.index("--distill_weight") < options.index("--learning_rate")
    assert "--no_evaluate_zero_shot" in text and "skips that evaluation" in text
    assert re.search(r"--resume_from_checkpoint.*?auto", text, re.S)


def test_readme_knob_table_shows_what_the_main_job_uses():
    _, _, args, _ = _recipe().parse_args([])
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `--(\w+)`(?: / `--\w+`)? \| ([^|]+) \| ([^|]+) \|", readme, re.M)
    assert len(rows) >= 8
    for flag, main_job, paper in rows:
        main_value = main_job.split("/")[0].strip()
        assert main_value == _shown(getattr(args, flag)), f"README says the main job uses {flag}={main_value}"
        assert paper.split("/")[0].strip() == _shown(CfftConfig.__dataclass_fields__[flag].default), flag


def _shown(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---- 2. a CLIP folder without tokenizer files ----


def test_clip_folder_without_tokenizer_is_refused_naming_it(tmp_path):
    folder = tmp_path / "clip_no_tokenizer"
    tiny_clip().save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"{folder}.*same tokens.*save the CLIP tokenizer into that folder"):
        load_classifier(str(folder), class_names=["cat", "dog", "fox"], templates=["a photo of a {}."])
    # With its tokenizer the same folder builds a head whose rows differ.
    tiny_tokenizer().save_pretrained(folder)
    load_classifier(str(folder), class_names=["cat", "dog", "fox"], templates=["a photo of a {}."])


def test_near_identical_head_rows_are_refused_but_repeated_names_may_share_one():
    tokenizer = tiny_tokenizer()
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1e-6]])
    with pytest.raises(ValueError, match=r"near-identical rows for 'cat' and 'fox' \(cosine 1\.00000\)"):
        check_zeroshot_head(rows, ["cat", "dog", "fox"], tokenizer, "some/clip")
    check_zeroshot_head(rows, ["cat", "dog", "cat"], tokenizer, "some/clip")  # ImageNet has two 'missile's


# ---- 3. resuming with a changed method config ----


def test_resume_with_changed_settings_is_refused_listing_them(tiny_classifier, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_classifier, out, save_strategy="steps", save_steps=1, max_steps=1).train()
    trainer = _trainer(tiny_classifier, out, mask_kind="object", learning_rate=2e-3, max_steps=2)
    with pytest.raises(ValueError) as error:
        trainer.train(resume_from_checkpoint="auto")
    message = str(error.value)
    assert "mask_kind: 'random' -> 'object'" in message and "learning_rate: 0.001 -> 0.002" in message
    assert "--allow_changed_args_on_resume true" in message and "--mask_kind random" in message


def test_allowed_changed_resume_is_recorded_in_the_card(tiny_classifier, tmp_path):
    out = tmp_path / "run"
    start = copy.deepcopy(tiny_classifier)  # a resume starts from the same model as the run (the manifest checks it)
    _trainer(tiny_classifier, out, save_strategy="steps", save_steps=1, max_steps=1).train()
    trainer = _trainer(start, out, max_steps=2, distill_weight=3.0, allow_changed_args_on_resume=True)
    trainer.train(resume_from_checkpoint="auto")
    trainer.save_model()
    card = ModelCard.load(out / "README.md").text
    assert "Resumed with changed settings" in card and "`distill_weight` 30.0 -> 3.0" in card
    recorded = json.loads((out / "training_args.json").read_text())["resumed_with_changes"]
    changed = {"distill_weight": [30.0, 3.0], "max_steps": [1, 2]}
    assert recorded == [{"checkpoint": "checkpoint-1", "step": 1, "changed": changed}]


# ---- 4. a fresh run into a folder that holds another run ----


def test_fresh_run_into_a_folder_with_another_run_is_refused(tiny_classifier, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_classifier, out, save_strategy="steps", save_steps=1).train()
    _trainer(tiny_classifier, out).save_model()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError) as error:
        _trainer(tiny_classifier, out).train()
    message = str(error.value)
    assert str(out) in message and "a finished model (model.safetensors)" in message
    assert "--overwrite_output_dir true" in message and "--resume_from_checkpoint auto" in message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_output_dir_removes_the_old_checkpoints_first(tiny_classifier, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_classifier, out, save_strategy="steps", save_steps=1, max_steps=2).train()
    (out / "notes.txt").write_text("mine")
    assert (out / "checkpoint-2").is_dir()
    _trainer(tiny_classifier, out, overwrite_output_dir=True, save_strategy="steps", save_steps=1, max_steps=1).train()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "mine", "files a run does not write are kept"


# ---- 5. a class that exists only in an evaluation split ----


def test_class_only_in_an_eval_split_is_refused_naming_it(tmp_path):
    images = write_imagefolder(tmp_path / "images", splits=("train", "val"), per_class=2)
    (images / "val" / "unicorn").mkdir()
    Image.new("RGB", (32, 32), "white").save(images / "val" / "unicorn" / "0.png")
    data_args = DataArguments(dataset_name=str(images), eval_splits=["val"])
    with pytest.raises(ValueError, match=r"split 'val' has class\(es\) 'unicorn' \(1 images\) with no image in the "):
        load_train_and_eval_splits(data_args, seed=0)


# ---- 6. config files ----


@pytest.mark.parametrize(
    "text, message",
    [
        ("mask_kindd: object\n", r"unknown key\(s\) 'mask_kindd' \(did you mean 'mask_kind'"),
        ("eval_splits: test_id\n", r"eval_splits expects a list, got str 'test_id'.*'eval_splits: \[test_id\]'"),
    ],
)
def test_config_file_mistakes_name_the_key(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        _recipe().parse_args(["--config", str(config)])


def test_config_keys_that_take_a_string_or_a_list_accept_a_string(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("report_to: tensorboard\neval_splits: [test_id]\n")
    _, data_args, args, _ = _recipe().parse_args(["--config", str(config), "--output_dir", "o"])
    assert args.report_to == ["tensorboard"] and data_args.eval_splits == ["test_id"]


def test_post_hoc_recipes_accept_a_finetune_config_but_not_a_typo(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Own:
        output_dir: str | None = None

    _, data_args = parse_with_config((Own, DataArguments), ["--config", str(WORLD_YAML)], config_keys={"seed"})
    assert data_args.eval_splits[0] == "test_id"
    config = tmp_path / "c.yaml"
    config.write_text("dataset_nme: world\n")
    with pytest.raises(ValueError, match="'dataset_nme' \\(did you mean 'dataset_name'"):
        parse_with_config((Own, DataArguments), ["--config", str(config)], config_keys={"seed"})


# ---- 7. fp16 on a CPU ----


def test_fp16_on_a_cpu_is_refused_suggesting_bf16(tmp_path):
    with pytest.raises(ValueError, match=r"fp16=True is not supported on the CPU.*--bf16 true"):
        CfftConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True)


# ---- 9. no pickles on disk or in any upload ----


def test_no_training_args_pickle_is_written_or_pushed(tiny_classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the Hub is mocked; offline, --push_to_hub is refused up front
    out = tmp_path / "run"
    hub, uploads = recording_hub("me/run")
    with (
        mock.patch("transformers.trainer.hf_api", return_value=hub),
        mock.patch("hf_cfft.training.base.hf_api", return_value=hub),
    ):
        trainer = _trainer(
            tiny_classifier, out, save_strategy="steps", save_steps=1, push_to_hub=True, hub_model_id="me/run"
        )
        trainer.train()
        trainer.push_to_hub()
    assert not list(out.rglob("*.bin")), "training_args.bin (a pickle) must not be written"
    assert (out / "checkpoint-1" / "training_args.json").is_file()
    assert len(uploads) >= 3  # every save, then the final push
    assert all(
        "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
        for files in uploads
    )


def test_hub_strategies_that_upload_optimizer_pickles_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # offline, --push_to_hub is refused first (test_error_path.py)
    with pytest.raises(ValueError, match="hub_strategy='checkpoint' uploads checkpoint folders.*every_save or end"):
        CfftConfig(output_dir=str(tmp_path), push_to_hub=True, hub_strategy="checkpoint", hub_model_id="me/x")


def test_workspace_builders_still_make_complete_clip_folders(tmp_path):
    # The tokenizer check must not refuse a complete folder (the fixture every recipe test uses).
    folder = save_tiny_clip(tmp_path / "clip")
    model = load_classifier(
        str(folder), class_names=["cat", "dog", "fox"], templates=["a photo of a {}."], show_progress=False
    )
    # The head is built from the folder's tokenizer and text tower: one distinct row per class name.
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    rows = model.classifier.weight
    assert rows.shape[0] == 3 and not torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[1], rows[2])


# ---- 13. the card describes the method that was run ----

_CFFT = {"distill_weight": 3.0, "mask_kind": "object", "fill_kind": "single", "mask_threshold": 0.3}


@pytest.mark.parametrize(
    "training, origin, headline, tag",
    [
        ({**_CFFT}, None, "fine-tuned with **counterfactual fine-tuning** (CFFT)", "counterfactual-fine-tuning"),
        ({"distill_weight": 0.0, "mask_kind": "none"}, None, "**vanilla fine-tuning**", "vanilla-fine-tuning"),
        ({"distill_weight": 0.0, "linear_probe": True}, None, "**linear probing**", "linear-probe"),
        ({"distill_weight": 0.0}, {"kind": "trained", "from_classifier": True}, "**LP-FT**", "lp-ft"),
        (
            {"distill_weight": 1.0, "mask_kind": "none", "distill_target": "features"},
            None,
            "**FT+FD**",
            "feature-distillation",
        ),
        (
            {"distill_weight": 1.0, "mask_kind": "none", "distill_target": "logits", "kd_temperature": 10.0},
            None,
            "**FT+KD** (fine-tuning + logit distillation",
            "knowledge-distillation",
        ),
        (
            {**_CFFT},
            {"kind": "wise_ft", "alpha": 0.5, "zero_shot": "out/zs", "fine_tuned": "out/ft"},
            "**WiSE-FT**",
            "wise-ft",
        ),
        ({}, {"kind": "soup", "members": ["a/ft1", "a/ft2"]}, "**uniform model soup** of 2", "model-soup"),
        ({}, {"kind": "zero_shot", "templates": 6}, "**zero-shot classifier**", "zero-shot"),
    ],
    ids=["cfft", "vanilla", "linear-probe", "lp-ft", "ft-fd", "ft-kd", "wise-ft", "soup", "zero-shot"],
)
def test_card_headline_and_tags_follow_the_method(tiny_config, training, origin, headline, tag):
    from hf_cfft.release.model_card import render_model_card

    card = render_model_card(model_config=tiny_config, training_args=training, origin=origin)
    title_line = next(line for line in card.text.splitlines() if line.startswith("A CLIP ViT image classifier"))
    assert headline in title_line
    assert tag in card.data.tags
    others = {"counterfactual-fine-tuning", "vanilla-fine-tuning", "linear-probe", "lp-ft", "feature-distillation"}
    assert not (others - {tag}) & set(card.data.tags), "one method tag per card"
    if origin and origin["kind"] == "wise_ft":
        assert "alpha = 0.5" in card.text and "`zs` (zero-shot) and `ft` (fine-tuned)" in card.text
        assert "Hyper-parameters" not in card.text and "object-mask" not in card.text
    if tag == "knowledge-distillation":
        assert "FT+FD" not in card.text and "temperature 10" in card.text


# ---- 14. errors a user causes: one message ----


def test_missing_model_folder_is_named_before_any_hub_lookup(tmp_path, monkeypatch):
    from hf_cfft.cli.script_args import default_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'outputs/world_lp_ft_stage1': no such folder .*LP-FT stage 1"):
        default_model("outputs/world_lp_ft_stage1", "world")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # offline, an uncached Hub id is refused (test_error_path.py)
    assert default_model("openai/clip-vit-base-patch32", "world") == "openai/clip-vit-base-patch32"  # a Hub id


def test_recipe_errors_print_one_line_without_traceback(capsys, monkeypatch):
    from hf_cfft.cli.script_args import run_recipe

    def main():
        raise ValueError("mask_threshold=1.5 must lie in (0, 1)")

    with pytest.raises(SystemExit) as exit_info:
        run_recipe(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mask_threshold=1.5 must lie in (0, 1)") and "Traceback" not in err
    monkeypatch.setenv("HF_CFFT_TRACEBACK", "1")
    with pytest.raises(ValueError):
        run_recipe(main)
