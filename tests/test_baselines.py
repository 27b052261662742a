"""The paper's baselines: WiSE-FT and uniform soups (weights and recipes), zero-shot export, and the baseline YAMLs."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from _builders import CLASSES, save_tiny_clip, write_imagefolder
from safetensors.torch import load_file

from hf_cfft import ClipCfftForImageClassification, load_classifier, load_templates
from hf_cfft.baselines.weight_averaging import average_state_dicts, interpolate_state_dicts, uniform_soup, wise_ft
from hf_cfft.cli.sources import load_image_splits
from hf_cfft.evaluation import evaluate_splits

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ROOT / "recipes" / "configs" / "baselines"


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve field types through the module
    spec.loader.exec_module(module)
    return module


def _perturbed(model: ClipCfftForImageClassification, seed: int) -> ClipCfftForImageClassification:
    """A copy of ``model`` with every weight moved, as fine-tuning would."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return other


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def pair(tiny_classifier):
    return tiny_classifier, _perturbed(tiny_classifier, seed=1)


# ---- WiSE-FT ----


@pytest.mark.parametrize("alpha, end", [(0.0, 0), (1.0, 1)])
def test_wise_ft_end_points_are_the_models_themselves(pair, alpha, end):
    merged = wise_ft(*pair, alpha)
    _assert_same_weights(merged, pair[end])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged(pixels).logits, pair[end].eval()(pixels).logits)


def test_wise_ft_midpoint_is_the_average_and_leaves_inputs_alone(pair):
    zero_shot, fine_tuned = pair
    before = [copy.deepcopy(m.state_dict()) for m in pair]
    merged = wise_ft(zero_shot, fine_tuned, 0.5).state_dict()
    for key, tensor in merged.items():
        expected = 0.5 * zero_shot.state_dict()[key] + 0.5 * fine_tuned.state_dict()[key]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
    for model, saved in zip(pair, before):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_interpolation_is_linear_in_alpha(pair):
    zs, ft = (m.state_dict() for m in pair)
    key = "classifier.weight"
    merged = interpolate_state_dicts(zs, ft, 0.25)
    torch.testing.assert_close(merged[key], 0.75 * zs[key] + 0.25 * ft[key])
    assert merged[key] is not zs[key]


def test_wise_ft_refuses_other_classes_naming_both_lists(pair, tiny_config):
    zero_shot, _ = pair
    tiny_config.id2label = {0: "cat", 1: "dog", 2: "wolf"}
    tiny_config.label2id = {v: k for k, v in tiny_config.id2label.items()}
    other = ClipCfftForImageClassification(tiny_config)
    with pytest.raises(ValueError, match=r"cat, dog, fox.*cat, dog, wolf"):
        wise_ft(zero_shot, other, 0.5)


def test_wise_ft_refuses_another_architecture(pair, tiny_config):
    tiny_config.vision_config.num_hidden_layers = 1
    with pytest.raises(ValueError, match="num_hidden_layers: 2 vs 1"):
        wise_ft(pair[0], ClipCfftForImageClassification(tiny_config), 0.5)


def test_interpolation_refuses_bad_alpha_and_missing_tensors(pair):
    zs, ft = (m.state_dict() for m in pair)
    with pytest.raises(ValueError, match="alpha=1.5"):
        interpolate_state_dicts(zs, ft, 1.5)
    ft.pop("classifier.bias")
    with pytest.raises(ValueError, match="classifier.bias"):
        interpolate_state_dicts(zs, ft, 0.5)


# ---- uniform soup ----


def test_soup_of_one_model_is_that_model(tiny_classifier):
    _assert_same_weights(uniform_soup([tiny_classifier]), tiny_classifier)


def test_soup_of_models_is_their_mean(pair, tiny_classifier):
    third = _perturbed(tiny_classifier, seed=2)
    soup = uniform_soup([*pair, third]).state_dict()
    for key, tensor in soup.items():
        stack = torch.stack([m.state_dict()[key] for m in (*pair, third)])
        assert torch.equal(tensor, stack.double().mean(dim=0).float()), key  # the exact mean, rounded once


def test_soup_refuses_mismatched_class_lists(pair, tiny_config):
    tiny_config.id2label = {0: "dog", 1: "cat", 2: "fox"}  # same names, other order: the heads disagree
    tiny_config.label2id = {v: k for k, v in tiny_config.id2label.items()}
    with pytest.raises(ValueError, match=r"run_a has \[cat, dog, fox\].*run_b has \[dog, cat, fox\]"):
        uniform_soup([pair[0], ClipCfftForImageClassification(tiny_config)], names=["run_a", "run_b"])
    with pytest.raises(ValueError, match="at least one"):
        average_state_dicts([])


# ---- recipes ----


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("images"), splits=("test",), per_class=3)


def _save(model, processor, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_wise_ft_recipe_saves_and_evaluates_every_alpha(pair, tiny_image_processor, images, tmp_path):
    zs_dir = _save(pair[0], tiny_image_processor, tmp_path / "zs")
    ft_dir = _save(pair[1], tiny_image_processor, tmp_path / "ft")
    out = tmp_path / "wise"
    results = _recipe("wise_ft").main([
        "--zero_shot_model", str(zs_dir), "--fine_tuned_model", str(ft_dir), "--alphas", "0", "0.5", "1",
        "--output_dir", str(out), "--save_models", "--dataset_name", str(images), "--eval_splits", "test",
        "--device", "cpu",
    ])  # fmt: skip

    assert list(results) == ["alpha_0.00", "alpha_0.50", "alpha_1.00"]
    assert json.loads((out / "results.json").read_text()) == results
    assert "| alpha_0.50 |" in (out / "results.md").read_text()
    for name in results:
        assert (out / name / "model.safetensors").is_file() and (out / name / "preprocessor_config.json").is_file()
    for name, model in (("alpha_0.00", pair[0]), ("alpha_1.00", pair[1])):
        saved = load_file(str(out / name / "model.safetensors"))
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    test = load_image_splits(str(images), ["test"])
    assert results["alpha_1.00"] == evaluate_splits(pair[1], test, tiny_image_processor)


def test_wise_ft_recipe_builds_the_zero_shot_end_from_a_clip_checkpoint(tiny_image_processor, tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    zero_shot = load_classifier(str(clip), class_names=CLASSES, templates=load_templates("simple"))
    ft_dir = _save(_perturbed(zero_shot, seed=3), tiny_image_processor, tmp_path / "ft")
    _recipe("wise_ft").main([
        "--zero_shot_model", str(clip), "--templates", "simple", "--fine_tuned_model", str(ft_dir), "--alphas", "0",
        "--save_models", "--output_dir", str(tmp_path / "wise"), "--device", "cpu",
    ])  # fmt: skip
    saved = load_file(str(tmp_path / "wise" / "alpha_0.00" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in zero_shot.state_dict().items()), "not the starting head"


def test_soup_recipe_saves_the_mean_and_evaluates_ingredients(pair, tiny_image_processor, images, tmp_path):
    dirs = [str(_save(m, tiny_image_processor, tmp_path / f"run{i}")) for i, m in enumerate(pair)]
    out = tmp_path / "soup"
    results = _recipe("soup").main([
        "--models", *dirs, "--output_dir", str(out), "--save_model", "--dataset_name", str(images),
        "--eval_splits", "test", "--device", "cpu",
    ])  # fmt: skip

    assert list(results) == [*dirs, "uniform soup"]
    assert json.loads((out / "results.json").read_text()) == results
    soup = ClipCfftForImageClassification.from_pretrained(out)
    expected = average_state_dicts([m.state_dict() for m in pair])
    assert all(torch.equal(soup.state_dict()[k], v) for k, v in expected.items())


def test_zero_shot_recipe_saves_a_loadable_classifier(images, tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "zs"
    results = _recipe("zero_shot").main([
        "--model_name_or_path", str(clip), "--templates", "simple", "--dataset_name", str(images),
        "--eval_splits", "test", "--output_dir", str(out), "--device", "cpu",
    ])  # fmt: skip

    model = ClipCfftForImageClassification.from_pretrained(out)
    assert [model.config.id2label[i] for i in range(3)] == list(CLASSES)
    assert (out / "preprocessor_config.json").is_file()
    assert set(results) == {"zero-shot"} and 0.0 <= results["zero-shot"]["test"] <= 100.0


def test_wise_ft_recipe_needs_something_to_do(tmp_path):
    with pytest.raises(ValueError, match="nothing to do"):
        _recipe("wise_ft").main(["--fine_tuned_model", "x", "--output_dir", str(tmp_path)])


# ---- baseline configs ----


@pytest.fixture(scope="module")
def finetune():
    return _recipe("finetune")


def _parse(finetune, name: str):
    return finetune.parse_args(["--config", str(BASELINES / name)])


def test_every_baseline_config_parses_on_the_world(finetune):
    names = sorted(p.name for p in BASELINES.glob("*.yaml"))
    assert names == sorted([
        "vanilla_ft.yaml", "linear_probe.yaml", "ft_fd.yaml", "ft_kd.yaml", "lp_ft_stage1.yaml", "lp_ft_stage2.yaml",
        "cfft_wise_teacher.yaml", "flyp.yaml",
    ])  # fmt: skip
    outputs = set()
    for name in names:
        model_args, data_args, args, _ = _parse(finetune, name)
        assert data_args.dataset_name == "world" and model_args.templates == "world"
        assert data_args.ood_splits == ["ood_shuffled", "ood_swapped", "ood_novel", "ood_style"]
        assert data_args.eval_splits[0] == "test_id" and args.learning_rate == 3e-4 and args.seed == 0
        outputs.add(args.output_dir)
    assert len(outputs) == len(names), "every baseline writes to its own folder"


def test_baseline_configs_set_their_knobs(finetune):
    _, _, vanilla, _ = _parse(finetune, "vanilla_ft.yaml")
    assert vanilla.distill_weight == 0 and not vanilla.linear_probe and not vanilla.uses_counterfactuals

    _, _, probe, _ = _parse(finetune, "linear_probe.yaml")
    assert probe.linear_probe and probe.distill_weight == 0

    _, _, fd, _ = _parse(finetune, "ft_fd.yaml")
    assert (fd.mask_kind, fd.fill_kind, fd.distill_target) == ("none", "none", "features") and fd.distill_weight > 0

    _, _, kd, _ = _parse(finetune, "ft_kd.yaml")
    assert kd.distill_target == "logits" and kd.mask_kind == "none" and kd.distill_weight > 0

    _, _, stage1, _ = _parse(finetune, "lp_ft_stage1.yaml")
    stage2_model, _, stage2, _ = _parse(finetune, "lp_ft_stage2.yaml")
    assert stage1.linear_probe and not stage2.linear_probe and stage2.distill_weight == 0
    assert stage2_model.model_name_or_path == stage1.output_dir

    teacher_model, _, cfft, _ = _parse(finetune, "cfft_wise_teacher.yaml")
    assert teacher_model.teacher_name_or_path == "outputs/world_wise_ft/alpha_0.50"
    _, _, world_default, _ = _parse(finetune, "../world.yaml")
    assert (cfft.mask_kind, cfft.fill_kind) == ("object", "single")
    assert cfft.distill_weight == world_default.distill_weight == fd.distill_weight
    # Each config trains the method compare's cell of that name trains (one table: hf_cfft.methods).
    from hf_cfft.methods import method_of

    _, _, flyp, _ = _parse(finetune, "flyp.yaml")
    named = [("ft", vanilla), ("lp", probe), ("ft_fd", fd), ("ft_kd", kd), ("lp", stage1), ("cfft", cfft)]
    named.append(("flyp", flyp))
    assert [method_of(config).key for _, config in named] == [key for key, _ in named]
    assert method_of(stage2, from_classifier=True).key == "lp_ft"


# ---- issue 24: the recorded pre-trained model, not only the shapes ----


def _refused_recipe(name: str, argv: list[str], capsys) -> str:
    from hf_cfft.cli.script_args import run_recipe

    module = _recipe(name)
    with pytest.raises(SystemExit) as stop:
        run_recipe(lambda: module.main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("error: ") == 1 and "Traceback" not in err, err
    return " ".join(err[err.index("error: ") :].split())


@pytest.fixture
def two_bases(tiny_image_processor, tmp_path):
    """Two tiny CLIPs of the same shapes but other weights, a copy of the first elsewhere, a fine-tuning of each."""
    import shutil

    clips = [save_tiny_clip(tmp_path / f"clip{seed}", seed=seed) for seed in (0, 1)]
    copy_of_first = Path(shutil.copytree(clips[0], tmp_path / "moved" / "clip0"))
    tuned = []
    for i, clip in enumerate(clips):
        zero_shot = load_classifier(str(clip), class_names=CLASSES, templates=load_templates("simple"))
        tuned.append(_save(_perturbed(zero_shot, seed=i + 5), tiny_image_processor, tmp_path / f"ft{i}"))
    return clips, copy_of_first, tuned


def test_a_classifier_records_the_pretrained_model_it_was_built_from(two_bases):
    clips, copy_of_first, tuned = two_bases
    records = [json.loads((path / "config.json").read_text())["hf_cfft_base_model"] for path in tuned]
    assert records[0]["name_or_path"] == str(clips[0]) and records[0]["fingerprint"] != records[1]["fingerprint"]
    again = load_classifier(str(copy_of_first), class_names=CLASSES, templates=load_templates("simple"))
    assert again.config.hf_cfft_base_model["fingerprint"] == records[0]["fingerprint"]  # a moved folder still matches


def test_wise_ft_refuses_a_zero_shot_end_of_another_pretrained_model(two_bases, tmp_path, capsys):
    clips, copy_of_first, tuned = two_bases
    args = ["--templates", "simple", "--fine_tuned_model", str(tuned[0]), "--alphas", "0.5", "--save_models",
            "--device", "cpu"]  # fmt: skip
    err = _refused_recipe(
        "wise_ft", ["--zero_shot_model", str(clips[1]), *args, "--output_dir", str(tmp_path / "w")], capsys
    )
    assert (
        f"the zero-shot model was built from the pre-trained model '{clips[1]}' but the fine-tuned model from " in err
    )
    assert "whose weights differ" in err and "--zero_shot_model" in err
    assert not (tmp_path / "w" / "alpha_0.50").exists()
    # the same checkpoint moved to another folder is the same pre-trained model
    _recipe("wise_ft").main(["--zero_shot_model", str(copy_of_first), *args, "--output_dir", str(tmp_path / "ok")])
    assert (tmp_path / "ok" / "alpha_0.50" / "model.safetensors").is_file()


@pytest.mark.parametrize("greedy", [False, True], ids=["uniform", "greedy"])
def test_soups_refuse_ingredients_of_two_pretrained_models(two_bases, images, tmp_path, capsys, greedy):
    _, _, tuned = two_bases
    extra = ["--greedy", "--held_out_split", "test", "--dataset_name", str(images)] if greedy else []
    argv = ["--models", *map(str, tuned), "--output_dir", str(tmp_path / "soup"), "--device", "cpu", *extra]
    err = _refused_recipe("soup", argv, capsys)
    assert f"{tuned[0]} was built from the pre-trained model" in err and "whose weights differ" in err
    assert not (tmp_path / "soup" / "model.safetensors").exists()


def test_the_greedy_soup_prints_each_candidates_held_out_accuracy(
    pair, tiny_image_processor, images, tmp_path, capsys
):
    dirs = [str(_save(m, tiny_image_processor, tmp_path / f"run{i}")) for i, m in enumerate(pair)]
    _recipe("soup").main([
        "--models", *dirs, "--greedy", "--held_out_split", "test", "--dataset_name", str(images), "--output_dir",
        str(tmp_path / "soup"), "--device", "cpu",
    ])  # fmt: skip
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "soup" / "greedy_soup.json").read_text())
    for path, score in record["ingredients_held_out"].items():
        assert f"held-out test accuracy of {path}: {score:.2f} %" in out
    ((tried, score, kept),) = record["tried"]
    assert f"  soup with {tried}: {score:.2f} % -> {'kept' if kept else 'left out'}" in out
