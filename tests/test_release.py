"""Release flow: model cards, remote-code loading without hf_cfft, Hub pushes (offline, mocked), trainer cards."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import requests
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from huggingface_hub import ModelCard, RepoUrl
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, CLIPImageProcessor

from hf_cfft import CfftConfig, CfftTrainer, CounterfactualTransform
from hf_cfft.modeling import ClipCfftForImageClassification
from hf_cfft.release.hub import HubPushError, files_to_upload, push_model_dir
from hf_cfft.release.model_card import TEMPLATE_PATH, render_model_card, write_model_card

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {
    "zero-shot": {"test_id": 71.25, "ood_a": 40.5, "ood_b": 35.0, "ood_avg": 37.75},
    "fine-tuned": {"test_id": 88.125, "ood_a": 52.5, "ood_b": 47.25, "ood_avg": 49.875},
}
METHOD = {"distill_weight": 30.0, "mask_kind": "object", "fill_kind": "single", "mask_threshold": 0.3}


def _assert_clean(card: ModelCard) -> None:
    """No template leftovers, no missing values rendered as text, no heading directly followed by another."""
    for leftover in ("{{", "}}", "{%", "%}", "{#", "None", "TODO", "Undefined"):
        assert leftover not in card.content, f"{leftover!r} left in the card"
    lines = [line for line in card.text.splitlines() if line.strip()]
    in_code = False
    for line, following in zip(lines, lines[1:]):
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("#"):
            assert not following.startswith("#"), f"empty section {line!r}"
    assert not lines[-1].startswith("#"), "the card ends with an empty section"


def _processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _saved_model(tiny_classifier, path: Path) -> Path:
    tiny_classifier.save_pretrained(path)
    _processor().save_pretrained(path)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the template ----


def test_model_cards_folder_holds_the_package_template_unchanged():
    copy = ROOT / "model_cards" / "cfft_clip_classifier.md"
    assert copy.read_bytes() == TEMPLATE_PATH.read_bytes(), (
        "model_cards/cfft_clip_classifier.md differs from the package template; edit "
        "src/hf_cfft/release/templates/model_card.md and copy it over (see model_cards/README.md)"
    )


# ---- rendering ----


def test_card_round_trips_fine_tuned_accuracy_into_model_index(tiny_config, tmp_path):
    path = write_model_card(
        tmp_path,
        model_config=tiny_config,
        training_args=METHOD,
        base_model="openai/clip-vit-base-patch32",
        dataset_name="someone/pets",
        results=RESULTS,
        ood_splits=["ood_a", "ood_b"],
        repo_id="me/clip-cfft-pets",
    )
    card = ModelCard.load(path)

    assert card.data.model_name == "clip-cfft-pets"
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert card.data.datasets == ["someone/pets"]
    reported = {r.dataset_split: r.metric_value for r in card.data.eval_results}
    assert reported == {"test_id": 88.125, "ood_a": 52.5, "ood_b": 47.25}  # every split, not the average
    assert {(r.task_type, r.metric_type, r.dataset_type) for r in card.data.eval_results} == {
        ("image-classification", "accuracy", "someone/pets")
    }
    assert "| model | test_id (ID) | ood_a (OOD) | ood_b (OOD) | OOD avg |" in card.text
    assert "| fine-tuned | 88.1 | 52.5 | 47.2 | 49.9 |" in card.text
    assert "| zero-shot | 71.2 | 40.5 | 35.0 | 37.8 |" in card.text
    _assert_clean(card)


def test_card_states_the_method_hyperparameters_and_how_to_load(tiny_config, tmp_path):
    args = CfftConfig(
        output_dir=str(tmp_path), mask_kind="context", mask_threshold=0.4, fill_kind="multi", distill_weight=10.0,
        cam_method="gradcam", cam_source="student", learning_rate=3e-5, num_train_epochs=10,
        per_device_train_batch_size=64, gradient_accumulation_steps=2, use_cpu=True,
    )  # fmt: skip
    card = render_model_card(model_config=tiny_config, training_args=args, repo_id="me/ctx")

    assert "CAM of the true class is at most 0.4 (context-mask)" in card.text
    assert "multi-fill" in card.text and "with beta = 10." in card.text
    assert "GradCAM on the last block" in card.text and "recomputed at every step" in card.text
    for row in (
        "| beta, distillation weight (`distill_weight`) | 10 |",
        "| CAM threshold (`mask_threshold`) | 0.4 |",
        "| CAM source (`cam_source`) | student |",
        "| learning rate (`learning_rate`) | 3e-05 |",
        "| epochs (`num_train_epochs`) | 10 |",
        "| batch size (`per_device_train_batch_size`) | 128 (64 per device x 2 accumulation x 1 process) |",
    ):
        assert row in card.text
    assert "masked fraction" not in card.text  # a random-mask knob, irrelevant here
    assert 'from_pretrained("me/ctx")' in card.text
    assert 'pipeline("image-classification", model="me/ctx", trust_remote_code=True)' in card.text
    assert "https://arxiv.org/abs/2303.03052" in card.text and "eprint        = {2303.03052}" in card.text
    assert "Xiao, Yao and Tang, Ziyi and Wei, Pengxu and Liu, Cong and Lin, Liang" in card.text
    assert "ObjectNet" in card.text and "evaluation only" in card.text and "ImageNet's terms" in card.text
    _assert_clean(card)


@pytest.mark.parametrize(
    "extra",
    [{}, {"training_args": {"distill_weight": 0.0}}, {"results": {"zero-shot": {"test": 50.0}}}],
    ids=["config-only", "vanilla-ft", "results-without-dataset"],
)
def test_card_with_missing_data_omits_sections_instead_of_leaving_them_empty(tiny_config, extra):
    card = render_model_card(model_config=tiny_config.to_dict(), **extra)

    _assert_clean(card)
    assert card.data.eval_results is None  # no fine-tuned row or no dataset: nothing to put in model-index
    assert ("## Results" in card.text) == ("results" in extra)
    assert ("### Hyper-parameters" in card.text) == ("training_args" in extra)
    assert "## Citation" in card.text and "## How to use" in card.text


# ---- remote code ----

_LOAD_WITHOUT_HF_CFFT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_cfft"] = None  # as if hf_cfft were not installed
    try:
        import hf_cfft  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_cfft is still importable")
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification, pipeline

    folder, tensors = sys.argv[1], load_file(sys.argv[2])
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("hf_cfft"), type(model).__module__
    with torch.no_grad():
        logits = model(pixel_values=tensors["pixel_values"]).logits
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    predictions = classifier(Image.new("RGB", (40, 36), (200, 30, 60)))
    print(json.dumps({"equal": bool(torch.equal(logits, tensors["logits"])), "predictions": predictions}))
    """
)


def test_saved_model_loads_and_classifies_where_hf_cfft_is_not_installed(tiny_classifier, tmp_path):
    saved = _saved_model(tiny_classifier, tmp_path / "saved")
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling.ClipCfftConfig",
        "AutoModelForImageClassification": "modeling.ClipCfftForImageClassification",
    }
    assert "hf_cfft" not in (saved / "modeling.py").read_text().split('"""')[2]  # no import of the package
    fresh = Path(shutil.copytree(saved, tmp_path / "elsewhere" / "model"))
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny_classifier(pixel_values=pixel_values).logits
    save_file({"pixel_values": pixel_values, "logits": logits.contiguous()}, str(tmp_path / "expected.safetensors"))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_HF_CFFT, str(fresh), str(tmp_path / "expected.safetensors")],
        cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["equal"], "remote-code logits differ from the original model's"
    assert {p["label"] for p in out["predictions"]} == {"cat", "dog", "fox"}
    assert sum(p["score"] for p in out["predictions"]) == pytest.approx(1.0, abs=1e-5)


def test_with_hf_cfft_installed_the_local_class_loads_without_trust_remote_code(tiny_classifier, tmp_path):
    saved = _saved_model(tiny_classifier, tmp_path / "saved")
    model = AutoModelForImageClassification.from_pretrained(saved)
    assert type(model) is ClipCfftForImageClassification


# ---- pushing ----


def _release_dir(tiny_classifier, path: Path) -> Path:
    """A finished run's folder, with the training leftovers a push must not upload."""
    _saved_model(tiny_classifier, path)
    (path / "eval_results.json").write_text(json.dumps(RESULTS))
    (path / "training_args.json").write_text(json.dumps({**METHOD, "learning_rate": 3e-5}))
    (path / "training_args.bin").write_bytes(b"pickle")
    (path / "optimizer.pt").write_bytes(b"pickle")
    (path / "checkpoint-2").mkdir()
    (path / "checkpoint-2" / "model.safetensors").write_bytes(b"weights")
    (path / "runs").mkdir()
    (path / "runs" / "events.out").write_bytes(b"tensorboard")
    return path


def _api(**failures) -> mock.MagicMock:
    api = mock.MagicMock(name="HfApi")
    api.create_repo.return_value = RepoUrl("https://huggingface.co/me/clip-cfft")
    for method, error in failures.items():
        getattr(api, method).side_effect = error
    return api


def test_push_uploads_model_processor_code_and_card_but_no_pickles(tiny_classifier, tmp_path):
    folder = _release_dir(tiny_classifier, tmp_path / "run")
    api = _api()
    staged = {}

    def upload_folder(folder_path, **kwargs):
        # What huggingface_hub itself would select from the uploaded folder with these patterns:
        on_disk = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        patterns = {key: kwargs[key] for key in ("allow_patterns", "ignore_patterns")}
        selected = filter_repo_objects(on_disk, **patterns)
        staged.update({name: Path(folder_path, name).read_bytes() for name in selected})

    api.upload_folder.side_effect = upload_folder
    url = push_model_dir(
        folder, "me/clip-cfft", revision="v1", private=True, api=api, dataset_name="someone/pets",
        ood_splits=["ood_a", "ood_b"],
    )  # fmt: skip

    assert url == "https://huggingface.co/me/clip-cfft"
    api.create_repo.assert_called_once_with("me/clip-cfft", token=None, private=True, exist_ok=True)
    api.create_branch.assert_called_once_with("me/clip-cfft", branch="v1", token=None, exist_ok=True)
    upload = api.upload_folder.call_args.kwargs
    assert (upload["repo_id"], upload["revision"]) == ("me/clip-cfft", "v1")
    uploaded = set(staged)
    # The uploaded files are the folder's own bytes; the card is written into the folder once the push succeeded.
    assert all(staged[name] == (folder / name).read_bytes() for name in uploaded)
    expected = {
        "README.md", "config.json", "model.safetensors", "modeling.py", "preprocessor_config.json",
        "eval_results.json", "training_args.json",
    }  # fmt: skip
    assert uploaded == expected == set(files_to_upload(folder))
    card = ModelCard.load(folder / "README.md")
    assert {r.dataset_split: r.metric_value for r in card.data.eval_results} == {
        "test_id": 88.125, "ood_a": 52.5, "ood_b": 47.25
    }  # fmt: skip
    assert "| model | test_id (ID) | ood_a (OOD) | ood_b (OOD) | OOD avg |" in card.text
    assert "| learning rate (`learning_rate`) | 3e-05 |" in card.text and 'model="me/clip-cfft"' in card.text


@pytest.mark.parametrize(
    "failure",
    [
        {"upload_folder": requests.ConnectionError("Connection reset by peer")},
        {"create_repo": HfHubHTTPError("401 Client Error: Unauthorized", response=mock.MagicMock())},
        {"upload_folder": HfHubHTTPError("403 Forbidden: storage quota exceeded", response=mock.MagicMock())},
    ],
    ids=["network", "auth", "quota"],
)
def test_failed_push_keeps_every_local_file_and_prints_the_retry_command(
    failure, tiny_classifier, tmp_path, capsys, monkeypatch
):
    folder = _release_dir(tiny_classifier, tmp_path / "my run")
    # The trainer's card: base model, step count and ID/OOD labels, which a regenerated card would not all know.
    write_model_card(
        folder, model_config=tiny_classifier.config, training_args=METHOD, base_model="openai/clip-vit-base-patch32",
        results=RESULTS, ood_splits=["ood_a", "ood_b"], global_step=7,
    )  # fmt: skip
    before = _snapshot(folder)
    api = _api(**failure)
    monkeypatch.setattr("hf_cfft.release.hub.HfApi", lambda: api)

    with pytest.raises(SystemExit) as exit_info:
        _push_recipe().main(["--model_dir", str(folder), "--repo_id", "me/clip-cfft", "--revision", "v1"])

    assert exit_info.value.code == 1
    after = _snapshot(folder)
    assert after == before, "a failed push must leave every local file byte-identical (the card included)"
    message = capsys.readouterr().err
    step = "creating the repo" if "create_repo" in failure else "uploading"
    assert step in message and type(next(iter(failure.values()))).__name__ in message
    retry = f"python -m hf_cfft.release.push --model_dir '{folder}' --repo_id me/clip-cfft --revision v1"
    assert retry in message

    # Retrying with that command re-renders the same card, and the folder stays byte-identical.
    with pytest.raises(HubPushError) as error:
        push_model_dir(folder, "me/clip-cfft", revision="v1", api=api)
    assert _snapshot(folder) == after and error.value.retry_command == retry


def test_push_refuses_a_folder_without_safetensors_before_touching_the_hub(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    api = _api()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        push_model_dir(tmp_path, "me/x", api=api)
    assert not api.method_calls


def _push_recipe():
    spec = importlib.util.spec_from_file_location("push_recipe", ROOT / "recipes" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve field types through the module
    spec.loader.exec_module(module)
    return module


# ---- the trainer ----


def _tiny_image_dataset(n: int = 8) -> Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)) for _ in range(n)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["cat", "dog", "fox"])})
    return Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)


def test_trainer_writes_the_card_beside_the_final_model_and_every_checkpoint(tiny_classifier, tmp_path):
    out = tmp_path / "world_cfft"
    args = CfftConfig(
        output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=4, use_cpu=True,
        mask_kind="random", fill_kind="single", report_to="none", logging_steps=1,
    )  # fmt: skip
    processor = _processor()
    train = _tiny_image_dataset().with_transform(CounterfactualTransform(processor, grid=tiny_classifier.patch_grid))
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=train, processing_class=processor)
    trainer.train()

    for step in (1, 2):
        checkpoint = out / f"checkpoint-{step}"
        card = ModelCard.load(checkpoint / "README.md")
        assert f"saved after {step} optimisation step{'s' if step > 1 else ''}." in card.text
        assert "masking each patch with probability 0.5 (random-mask)" in card.text
        assert json.loads((checkpoint / "training_args.json").read_text())["mask_kind"] == "random"
        _assert_clean(card)

    # What recipes/finetune.py does after evaluating: hand the results over, save the final model.
    trainer.eval_results, trainer.dataset_name, trainer.ood_splits = RESULTS, "world", ["ood_a", "ood_b"]
    trainer.save_model()
    card = ModelCard.load(out / "README.md")
    assert {r.dataset_split: r.metric_value for r in card.data.eval_results} == {
        "test_id": 88.125, "ood_a": 52.5, "ood_b": 47.25
    }  # fmt: skip
    assert card.data.model_name == "world_cfft" and "counterfactual-fine-tuning" in card.data.tags
    assert "| model | test_id (ID) | ood_a (OOD) | ood_b (OOD) | OOD avg |" in card.text
    _assert_clean(card)

    # The standard push_to_hub flow uploads this card, not transformers' generic one.
    uploaded_cards = []

    def upload_folder(folder_path, **_):
        uploaded_cards.append(Path(folder_path, "README.md").read_text())

    hub = mock.MagicMock(name="HfApi")
    hub.create_repo.return_value = RepoUrl("https://huggingface.co/me/world_cfft")
    hub.upload_folder.side_effect = upload_folder
    with mock.patch("transformers.trainer.hf_api", return_value=hub):
        trainer.push_to_hub()
    assert hub.upload_folder.call_args.kwargs["repo_id"] == "me/world_cfft"
    pushed = ModelCard(uploaded_cards[0])
    assert {r.dataset_split for r in pushed.data.eval_results} == {"test_id", "ood_a", "ood_b"}
    assert 'model="me/world_cfft"' in pushed.text and re.search(r"^# world_cfft$", pushed.text, re.M)


def test_a_flyp_card_describes_flyp_not_the_distillation(tiny_config, tmp_path):
    args = CfftConfig(
        output_dir=str(tmp_path), method="flyp", distill_weight=0.0, mask_kind="none", fill_kind="none",
        learning_rate=1e-5, use_cpu=True,
    )  # fmt: skip
    card = render_model_card(model_config=tiny_config, training_args=args, repo_id="me/flyp")
    assert "trained by **FLYP**" in card.text and "Finetune like you pretrain" in card.text
    assert "rebuilt from the fine-tuned text tower" in card.text
    assert "MSE(f̂(x_cf), f(x_cf))" not in card.text and "beta, distillation weight" not in card.text
    assert "| method (`method`) | flyp |" in card.text and "| learning rate (`learning_rate`) | 1e-05 |" in card.text
    assert "flyp" in card.data.tags and "`FlypTrainer`" in card.text and "`CfftTrainer`" not in card.text
    _assert_clean(card)
