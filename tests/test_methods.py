"""One table of methods: a comparison cell, a run's results row, its card and its trainer name the same method."""

from __future__ import annotations

import pytest

from hf_cfft import CfftConfig
from hf_cfft.cli.compare_grid import METHODS as CELLS
from hf_cfft.cli.script_args import run_label
from hf_cfft.methods import METHODS, method_of
from hf_cfft.release.model_card import method_info
from hf_cfft.trainer import distill_view

TRAINED = [key for key, method in METHODS.items() if method.kind == "train"]


def _config_of(flags: tuple[str, ...], tmp_path, beta: float = 3.0) -> CfftConfig:
    """The CfftConfig a fine-tuning run with ``flags`` (and ``--distill_weight beta`` unless the flags set it) gets."""
    values = dict(zip(flags[::2], flags[1::2]))
    kwargs = {"distill_weight": beta}
    for flag, text in values.items():
        name = flag.removeprefix("--")
        kwargs[name] = {"true": True, "false": False}.get(text, text)
    for name in ("distill_weight", "kd_temperature"):
        if name in kwargs:
            kwargs[name] = float(kwargs[name])
    if "lora_rank" in kwargs:
        kwargs["lora_rank"] = int(kwargs["lora_rank"])
    return CfftConfig(output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none", **kwargs)


@pytest.mark.parametrize("key", TRAINED)
def test_each_trained_methods_flags_read_back_as_that_method(tmp_path, key):
    """The flags compare's cell passes make a config that method_of names with the cell's key (LP-FT: from a head)."""
    config = _config_of(CELLS[key].flags, tmp_path)
    method = method_of(config, from_classifier=METHODS[key].init_from is not None)
    assert method.key == key and CELLS[key].name == method.name


@pytest.mark.parametrize(
    ("key", "view"),
    [("ft", "none"), ("lp", "none"), ("ft_fd", "clean"), ("ft_kd", "clean"), ("cfft", "counterfactual"),
     ("cfft_random", "counterfactual"), ("cfft_context", "counterfactual"), ("cfft_nofill", "counterfactual")],
)  # fmt: skip
def test_the_trainer_distils_the_view_its_method_names(tmp_path, key, view):
    assert distill_view(_config_of(CELLS[key].flags, tmp_path)) == view


def test_the_results_row_and_the_card_name_the_cell_the_comparison_names(tmp_path):
    cfft = _config_of(CELLS["cfft_context"].flags, tmp_path, beta=10)
    assert run_label(cfft) == "CFFT context/single (beta 10), this run"
    assert method_info(cfft.to_dict())["key"] == "cfft" and method_info(cfft.to_dict())["tag"] == (
        "counterfactual-fine-tuning"
    )
    kd = _config_of(CELLS["ft_kd"].flags, tmp_path, beta=1)
    assert run_label(kd) == "FT+KD (beta 1), this run" and "beta = 1 and temperature 10" in method_info(kd)["detail"]
    lora = _config_of(CELLS["lora_cfft"].flags, tmp_path)
    assert run_label(lora) == "LoRA CFFT object/single (beta 3), this run"
    # A combination no cell names keeps its family and says what it is.
    other = method_of(_config_of(("--mask_kind", "random", "--fill_kind", "multi"), tmp_path))
    assert (other.family, other.name, other.view) == ("cfft", "CFFT random/multi", "counterfactual")
    assert run_label(_config_of(CELLS["lp"].flags, tmp_path)) == "linear probe, this run"


# ---- the table names each method's trainer, and that trainer loads what the method trains ----


def test_each_trained_method_names_the_trainer_class_that_trains_it():
    from hf_cfft.baselines.flyp import FlypTrainer
    from hf_cfft.trainer import CfftTrainer
    from hf_cfft.training.base import RobustTrainer

    classes = {key: METHODS[key].trainer_class() for key in TRAINED}
    assert all(issubclass(cls, RobustTrainer) for cls in classes.values())
    assert {key for key, cls in classes.items() if cls is FlypTrainer} == {"flyp"}
    assert {key for key, cls in classes.items() if cls is CfftTrainer} == set(TRAINED) - {"flyp"}
    with pytest.raises(ValueError, match="WiSE-FT is not trained: it is built from other models"):
        METHODS["wise_ft"].trainer_class()


def _head_logits(model, seed: int = 0):
    import torch

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(pixel_values=pixels).logits


def test_from_checkpoint_loads_the_classifier_the_teacher_and_says_where_it_started(tmp_path):
    import torch
    from _builders import CLASSES, save_tiny_clip

    from hf_cfft.classifier_loading import load_classifier
    from hf_cfft.trainer import CfftTrainer
    from hf_cfft.zeroshot import load_templates

    clip = str(save_tiny_clip(tmp_path / "clip"))
    args = CfftConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", distill_weight=3.0)
    trainer = CfftTrainer.from_checkpoint(clip, args, class_names=CLASSES, templates="simple", show_progress=False)
    direct = load_classifier(clip, class_names=CLASSES, templates=load_templates("simple"), show_progress=False)
    assert torch.equal(_head_logits(trainer.classifier()), _head_logits(direct))
    # The teacher is the frozen copy of the same zero-shot classifier; the card names the checkpoint.
    assert torch.equal(_head_logits(trainer.teacher), _head_logits(direct))
    assert trainer.base_model == clip and trainer.card_origin is None

    # From a classifier hf_cfft saved (LP-FT's second stage), with another model named as the teacher.
    direct.classifier.weight.data.mul_(2)
    direct.save_pretrained(tmp_path / "saved")
    again = CfftTrainer.from_checkpoint(
        str(tmp_path / "saved"), args, class_names=CLASSES, templates=["a {}"], teacher_name_or_path=clip
    )
    assert torch.equal(_head_logits(again.classifier()), _head_logits(direct))
    assert not torch.equal(_head_logits(again.teacher), _head_logits(direct))  # the named teacher, not a copy
    assert again.card_origin == {"kind": "trained", "from_classifier": True}


def test_flyp_loads_both_towers_and_refuses_a_teacher(tmp_path):
    import torch
    from _builders import CLASSES, save_tiny_clip

    from hf_cfft.baselines.flyp import FlypTrainer
    from hf_cfft.classifier_loading import load_classifier
    from hf_cfft.zeroshot import load_templates

    clip = str(save_tiny_clip(tmp_path / "clip"))
    args = CfftConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", method="flyp", distill_weight=0.0,
        mask_kind="none", fill_kind="none",
    )  # fmt: skip
    with pytest.raises(ValueError, match="--teacher_name_or_path has no use with --method flyp"):
        FlypTrainer.from_checkpoint(clip, args, class_names=CLASSES, templates="simple", teacher_name_or_path=clip)
    trainer = FlypTrainer.from_checkpoint(clip, args, class_names=CLASSES, templates="simple")
    assert hasattr(trainer.model, "text_model") and trainer.templates == load_templates("simple")
    # Before any step, the classifier it would save is CLIP's zero-shot classifier.
    direct = load_classifier(clip, class_names=CLASSES, templates=load_templates("simple"), show_progress=False)
    assert torch.allclose(_head_logits(trainer.classifier()), _head_logits(direct), atol=1e-5)


def test_the_main_jobs_vanilla_row_is_what_compares_ft_cell_trains(tmp_path, capsys):
    """The vanilla row of a CFFT run (--compare_with_vanilla) and a run of compare's ``ft`` cell on the same data,
    steps and seed: the same code, so the same accuracies, to the last digit."""
    from _builders import save_tiny_clip, write_imagefolder
    from test_error_path import _recipe

    from hf_cfft.cli.finetune import VANILLA_ROW

    clip, images = save_tiny_clip(tmp_path / "clip"), write_imagefolder(tmp_path / "images", ("train", "test"), 4)
    common = [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--use_cpu", "true", "--report_to", "none",
        "--save_strategy", "no", "--eval_splits", "test", "--templates", "simple", "--evaluate_zero_shot", "false",
    ]  # fmt: skip
    cfft = _recipe().main(
        [*common, "--output_dir", str(tmp_path / "cfft"), "--compare_with_vanilla", "true", "--distill_weight", "3"]
    )
    ft = _recipe().main([*common, "--output_dir", str(tmp_path / "ft"), *CELLS["ft"].flags])
    capsys.readouterr()
    assert cfft[VANILLA_ROW] == ft["fine-tuned"]
    assert cfft["fine-tuned"] != ft["fine-tuned"]  # the CFFT row is another model: the comparison could differ
