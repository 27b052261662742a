"""Issue 24, item 6: defaults that say where they come from, metrics written without float noise, compare's help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hf_cfft import CfftConfig
from hf_cfft.cli.compare_grid import METHODS, parse_compare_args
from hf_cfft.evaluation.frontier import append_row
from hf_cfft.evaluation.prediction import top1_accuracy
from hf_cfft.evaluation.report import rounded, write_report
from hf_cfft.training.run_folder import changed_args

ROOT = Path(__file__).resolve().parents[1]


# ---- the FT+KD temperature: the reference's 10 everywhere ----


def test_the_ft_kd_temperature_defaults_to_the_references_10_everywhere(tmp_path):
    assert CfftConfig(output_dir=str(tmp_path), use_cpu=True).kd_temperature == 10.0  # before: 1.0
    flags = list(METHODS["ft_kd"].flags)
    assert flags[flags.index("--kd_temperature") + 1] == "10"
    baselines = (ROOT / "docs" / "baselines.md").read_text()
    imagenet_kd = next(
        line for line in baselines.splitlines() if "--distill_target logits" in line and "$LAUNCH" in line
    )
    assert "--kd_temperature 10" in imagenet_kd
    fidelity = next(
        line for line in (ROOT / "docs" / "fidelity.md").read_text().splitlines() if "FT+KD temperature" in line
    )
    assert "the `CfftConfig` default" in fidelity and "1.0 is the plain KL" not in fidelity


def test_a_checkpoint_saved_with_the_old_temperature_resumes_unless_it_distils_logits(tmp_path):
    (tmp_path / "training_args.json").write_text(json.dumps({"kd_temperature": 1.0, "distill_target": "features"}))
    assert changed_args(str(tmp_path), {"kd_temperature": 10.0, "distill_target": "features"}) == {}
    (tmp_path / "training_args.json").write_text(json.dumps({"kd_temperature": 1.0, "distill_target": "logits"}))
    assert changed_args(str(tmp_path), {"kd_temperature": 10.0, "distill_target": "logits"}) == {
        "kd_temperature": (1.0, 10.0)
    }


# ---- metrics rounded when written ----


def test_accuracies_and_written_metrics_carry_no_float_noise(tmp_path):
    assert 100.0 * 0.939 == 93.89999999999999  # what was written before
    references = [0] * 1000
    predictions = [0] * 939 + [1] * 61
    assert top1_accuracy(predictions, references) == 93.9
    assert rounded({"a": [0.1 + 0.2, 93.89999999999999], "b": 2, "c": float("nan")})["a"] == [0.3, 93.9]
    write_report(str(tmp_path), {"fine-tuned": {"test": 93.89999999999999}}, "| table |", title="t")
    assert '"test": 93.9' in (tmp_path / "results.json").read_text()
    append_row(tmp_path / "rows.jsonl", {"beta": 0.1 * 3, "results": {"test": 93.89999999999999}})
    assert json.loads((tmp_path / "rows.jsonl").read_text()) == {"beta": 0.3, "results": {"test": 93.9}}


def test_the_finetune_recipe_writes_rounded_results(tmp_path):
    from _builders import save_tiny_clip, write_imagefolder
    from test_error_path import _recipe

    clip, images = save_tiny_clip(tmp_path / "clip"), write_imagefolder(tmp_path / "images", ("train", "test"), 3)
    argv = [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none",
        "--save_strategy", "no", "--eval_splits", "test", "--templates", "simple",
    ]  # fmt: skip
    _recipe().main(argv)
    text = (tmp_path / "run" / "eval_results.json").read_text()
    values = [v for row in json.loads(text).values() for v in row.values()]
    assert values and all(len(repr(v).split(".")[-1]) <= 6 for v in values), text


# ---- compare --help ----


def test_compare_help_says_finetune_flags_pass_through_and_lists_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "compare.py"), "--help"], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    text = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stderr
    assert "every other flag (e.g. --model_name_or_path, --dataset_name, --learning_rate, --max_steps, --use_cpu) " \
        "passes through to every recipes/finetune.py run" in text  # fmt: skip
    assert "--config FILE A YAML of compare's own keys" in text
    assert "--no_keep_models, --no-keep-models The same as --keep_models false: delete each trained model" in text
    assert "--device DEVICE Device of the cells compare scores itself (zero-shot, WiSE-FT, soups); default: cuda " \
        "when available, else cpu" in text  # fmt: skip
    # --config still works after being listed
    config = tmp_path / "c.yaml"
    config.write_text("methods: [ft]\nseeds: [0, 1]\n")
    args, _, _ = parse_compare_args(["--config", str(config), "--output_dir", str(tmp_path / "cmp")])
    assert args.methods == ["ft"] and args.seeds == [0, 1]


# ---- --help of every recipe: from its cache, without importing the library ----

RECIPES = ("finetune", "compare", "zero_shot", "wise_ft", "soup", "evaluate_ood", "visualize", "push_to_hub")


def test_every_recipes_help_comes_from_its_cache_without_loading_the_library(tmp_path):
    """The second --help prints the first one's text, and imports neither torch, transformers nor hf_cfft.

    (What that saves is a benchmark's business, not a timed test's: the first --help takes 9-40 s on a loaded machine,
    the cached one the interpreter's start-up.) The uncached runs go two at a time: the machine has two cores.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_CFFT_HELP_CACHE": str(tmp_path / "help")}
    first = {}
    for pair in (RECIPES[i : i + 2] for i in range(0, len(RECIPES), 2)):
        running = {
            name: subprocess.Popen(
                [sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--help"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )  # fmt: skip
            for name in pair
        }
        for name, process in running.items():
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0 and out.startswith("usage:"), (name, err[-2000:])
            first[name] = out
    for name in RECIPES:
        probe = [sys.executable, "-X", "importtime", str(ROOT / "recipes" / f"{name}.py"), "--help"]
        again = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0 and again.stdout == first[name], name
        imported = again.stderr
        assert " torch\n" not in imported and "transformers" not in imported and "hf_cfft." not in imported, name
        assert "| hf_cfft_help\n" in imported, name  # the probe sees imports at all: the cache module was one


def test_the_help_cache_is_rebuilt_when_a_file_it_depends_on_changes(tmp_path):
    import hf_cfft_help

    script = tmp_path / "recipe.py"
    script.write_text("print('v1')\n")
    key = hf_cfft_help.cache_key(str(script), ["--help"])
    assert hf_cfft_help.cache_key(str(script), ["--help"]) == key
    assert hf_cfft_help.cache_key(str(script), ["--config", "x.yaml", "--help"]) != key
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.yaml").write_text("a: 1\n")  # a file beside the recipe, e.g. its config
    assert hf_cfft_help.cache_key(str(script), ["--help"]) != key


# ---- the README says what a user needs ----


def test_the_readme_says_loading_needs_import_hf_cfft_or_remote_code_and_that_is_so(tmp_path, tiny_classifier):
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (
        "once `import hf_cfft` has run (it registers its classes with the Auto classes); without that import" in readme
    )
    assert "pass `trust_remote_code=True`" in readme
    assert "--bf16 true is for a GPU: on a CPU-only machine drop it" in readme
    tiny_classifier.save_pretrained(tmp_path / "model")
    load = "from transformers import AutoModelForImageClassification as A; A.from_pretrained({!r}{})"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for prefix, extra, works in (
        ("", "", False),
        ("import hf_cfft; ", "", True),
        ("", ", trust_remote_code=True", True),
    ):
        code = prefix + load.format(str(tmp_path / "model"), extra)
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )  # (without remote code allowed, transformers asks on stdin)
        assert (done.returncode == 0) == works, (code, done.stderr[-1500:])


# ---- on the world, the picture and the README's snippet use world.yaml's beta and threshold ----


def test_visualize_and_the_readme_snippet_use_the_worlds_beta_and_threshold(tmp_path, monkeypatch):
    import yaml
    from PIL import Image
    from test_error_path import _recipe

    world = yaml.safe_load((ROOT / "recipes" / "configs" / "world.yaml").read_text())
    snippet = (ROOT / "README.md").read_text().split("## In Python", 1)[1].split("```", 2)[1]
    assert f"distill_weight={world['distill_weight']}" in snippet
    assert f"mask_threshold={world['mask_threshold']}" in snippet
    visualize = _recipe("visualize")
    assert visualize.WORLD_MASK_THRESHOLD == world["mask_threshold"]
    help_text = visualize.VisualizeArguments.__dataclass_fields__["mask_threshold"].metadata["help"]
    assert f"on the world, its config's ({world['mask_threshold']:g}, recipes/configs/world.yaml" in help_text
    seen = {}

    def grid(*args, **kwargs):
        seen.update(kwargs)
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(visualize, "model_counterfactual_grid", grid)
    visualize.main(["--num_images", "2", "--output_file", str(tmp_path / "w.png"), "--device", "cpu"])
    assert seen["threshold"] == world["mask_threshold"]  # before: the paper's 0.3 on the world too
    visualize.main(["--num_images", "2", "--output_file", str(tmp_path / "p.png"), "--device", "cpu",
                    "--mask_threshold", "0.3"])  # fmt: skip
    assert seen["threshold"] == 0.3


# ---- the main table names this run by its method and beta, next to vanilla FT ----


def test_the_results_table_names_this_runs_method_and_beta_next_to_vanilla_ft(tmp_path, capsys):
    from _builders import save_tiny_clip, write_imagefolder
    from test_error_path import _recipe

    from hf_cfft.cli.script_args import run_label

    clip, images = save_tiny_clip(tmp_path / "clip"), write_imagefolder(tmp_path / "images", ("train", "test"), 2)
    argv = [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none",
        "--save_strategy", "no", "--eval_splits", "test", "--templates", "simple", "--compare_with_vanilla", "true",
        "--distill_weight", "3",
    ]  # fmt: skip
    _recipe().main(argv)
    out = capsys.readouterr().out
    assert "| vanilla FT (beta 0) |" in out and "| CFFT object/single (beta 3), this run |" in out
    assert "| CFFT object/single (beta 3), this run |" in (tmp_path / "run" / "eval_results.md").read_text()
    assert "fine-tuned" in json.loads((tmp_path / "run" / "eval_results.json").read_text())  # the key stays
    kwargs = {"output_dir": str(tmp_path / "x"), "use_cpu": True}
    assert (
        run_label(CfftConfig(**kwargs, mask_kind="none", fill_kind="none", distill_weight=1))
        == "FT+FD (beta 1), this run"
    )
    assert run_label(CfftConfig(**kwargs, mask_kind="none", fill_kind="none", distill_target="logits")) == (
        "FT+KD (beta 30), this run"
    )
    assert run_label(CfftConfig(**kwargs, distill_weight=0, mask_kind="none", fill_kind="none")) == (
        "vanilla FT (beta 0), this run"
    )
