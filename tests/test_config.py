"""Specification of hf_cfft.config.CfftConfig: paper defaults, validation, CLI parsing."""

import re
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from hf_cfft.config import CfftConfig


@pytest.fixture
def make(tmp_path):
    def build(**kwargs):
        return CfftConfig(output_dir=str(tmp_path / "out"), **kwargs)

    return build


def test_the_defaults_the_fidelity_page_names_are_the_configs_defaults(make):
    """docs/fidelity.md's rows marked "default" give the reference's value and ours (`--flag`): the two must agree
    with CfftConfig, so the page cannot drift from the code."""
    config = make()
    page = (Path(__file__).resolve().parents[1] / "docs" / "fidelity.md").read_text()
    checked = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[3] != "default":
            continue
        ours = re.fullmatch(r"([0-9.]+) \(`--(\w+)`\)", cells[2])  # a number and its flag; other rows name code
        if not ours:
            continue
        value, flag = ours.groups()
        assert re.match(re.escape(value), cells[1]), f"{flag}: ours is {value} on the page, the reference's {cells[1]}"
        checked[flag] = float(value)
    assert checked == {name: float(getattr(config, name)) for name in checked}
    assert {"mask_threshold", "distill_weight"} <= set(checked)
    # the paper's best method (object masks, single refill) needs counterfactuals and the teacher's CAMs
    assert (config.mask_kind, config.fill_kind) == ("object", "single")
    assert config.uses_counterfactuals and config.needs_teacher_cams


def test_default_batches_keep_the_image_column_and_drop_an_incomplete_last_batch(
    tmp_path, tiny_classifier, tiny_image_processor
):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    from hf_cfft import CfftTrainer

    images = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(6)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    train = Dataset.from_dict({"image": images, "label": [i % 3 for i in range(6)]}, features=features)
    config = CfftConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=4, report_to="none",
        mask_kind="random", fill_kind="single", mask_ratio=0.5,
    )  # fmt: skip
    trainer = CfftTrainer(
        model=tiny_classifier, args=config, train_dataset=train, processing_class=tiny_image_processor
    )
    batches = list(trainer.get_train_dataloader())
    # 6 images at batch 4: one full batch (refilling needs a partner, so a last batch of 2 would be a different
    # counterfactual batch); the image column reached the transform, so every batch has its pixels
    assert len(batches) == 1 and batches[0]["pixel_values"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"mask_threshold": 0}, "mask_threshold", "0"),
        ({"mask_threshold": 1}, "mask_threshold", "1"),
        ({"mask_threshold": 1.5}, "mask_threshold", "1.5"),
        ({"mask_threshold": -0.2}, "mask_threshold", "-0.2"),
        ({"mask_ratio": 0.0}, "mask_ratio", "0.0"),
        ({"mask_ratio": 1.0}, "mask_ratio", "1.0"),
        ({"mask_ratio": 1.25}, "mask_ratio", "1.25"),
        ({"distill_weight": -1}, "distill_weight", "-1"),
        ({"mask_kind": "blob"}, "mask_kind", "'blob'"),
        ({"fill_kind": "smear"}, "fill_kind", "'smear'"),
        ({"cam_method": "saliency"}, "cam_method", "'saliency'"),
        ({"cam_source": "oracle"}, "cam_source", "'oracle'"),
        ({"distill_target": "attention"}, "distill_target", "'attention'"),
        ({"augment": "rotate"}, "augment", "'rotate'"),
        ({"kd_temperature": 0}, "kd_temperature", "0"),
        ({"mask_kind": "none", "fill_kind": "single"}, "fill_kind", "'single'"),
        ({"mask_kind": "none", "fill_kind": "multi"}, "mask_kind", "'none'"),
        ({"cam_source": "student", "linear_probe": True}, "cam_source", "'student'"),
        ({"cam_source": "student", "linear_probe": True}, "linear_probe", "True"),
        ({"per_device_train_batch_size": 1}, "per_device_train_batch_size", "1"),
        ({"per_device_train_batch_size": 1, "fill_kind": "multi"}, "fill_kind", "'multi'"),
        ({"remove_unused_columns": True}, "remove_unused_columns", "True"),
        # NaN compares False with every bound; infinity is no weight or temperature either.
        ({"distill_weight": float("nan")}, "distill_weight", "nan"),
        ({"distill_weight": float("inf")}, "distill_weight", "inf"),
        ({"kd_temperature": float("nan")}, "kd_temperature", "nan"),
        ({"lora_rank": 8, "lora_alpha": float("nan")}, "lora_alpha", "nan"),
        # No step would run: the starting model would be saved as if fine-tuned.
        ({"num_train_epochs": 0}, "num_train_epochs", "0"),
        ({"num_train_epochs": -1, "max_steps": -1}, "num_train_epochs", "-1"),
        ({"label_smoothing_factor": 1.5}, "label_smoothing_factor", "1.5"),
        # Before: an eval batch of 0 failed inside torch after training, with the model not yet saved.
        ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size", "0"),
        ({"per_device_train_batch_size": 0, "fill_kind": "none"}, "per_device_train_batch_size", "0"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps", "0"),
    ],
)
def test_invalid_values_raise_naming_the_field_and_value(make, kwargs, field, value):
    with pytest.raises(ValueError) as info:
        make(**kwargs)
    assert re.search(rf"\b{field}={re.escape(value)}(?![\w.])", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_kind": "none", "fill_kind": "none"},  # FT+FD
        {"distill_weight": 0.0},  # vanilla fine-tuning
        {"mask_kind": "random", "fill_kind": "multi", "mask_ratio": 0.75},
        {"mask_kind": "context", "fill_kind": "none", "per_device_train_batch_size": 1},
        {"cam_source": "student", "cam_method": "gradcam"},
        {"linear_probe": True},
        {"mask_threshold": 0.001},
        {"mask_threshold": 0.999},
        {"num_train_epochs": 0, "max_steps": 5},  # max_steps decides
        {"num_train_epochs": 0.5},
        {"label_smoothing_factor": 1.0},
    ],
)
def test_valid_combinations_are_accepted(make, kwargs):
    config = make(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_uses_counterfactuals_and_needs_teacher_cams_follow_the_knobs(make):
    assert not make(distill_weight=0.0).uses_counterfactuals
    ftfd = make(mask_kind="none", fill_kind="none")
    assert not ftfd.uses_counterfactuals and not ftfd.needs_teacher_cams
    random = make(mask_kind="random")
    assert random.uses_counterfactuals and not random.needs_teacher_cams
    assert not make(cam_source="student").needs_teacher_cams
    assert make(mask_kind="context").needs_teacher_cams


def test_hf_argument_parser_parses_cli_flags(tmp_path):
    (config,) = HfArgumentParser(CfftConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--mask_kind",
            "random",
            "--fill_kind",
            "multi",
            "--mask_ratio",
            "0.25",
            "--distill_weight",
            "10",
            "--cam_method",
            "gradcam",
            "--augment",
            "flip",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "3e-5",
        ]
    )
    assert isinstance(config, CfftConfig)
    assert (config.mask_kind, config.fill_kind, config.cam_method, config.augment) == (
        "random",
        "multi",
        "gradcam",
        "flip",
    )
    assert config.mask_ratio == 0.25 and config.distill_weight == 10.0
    assert config.per_device_train_batch_size == 4 and config.learning_rate == 3e-5
    assert config.mask_threshold == 0.3  # untouched defaults survive


def test_hf_argument_parser_validates_cli_flags(tmp_path):
    with pytest.raises(ValueError, match="mask_threshold=1.5"):
        HfArgumentParser(CfftConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--mask_threshold", "1.5"]
        )


def test_hf_argument_parser_reads_a_dict(tmp_path):
    (config,) = HfArgumentParser(CfftConfig).parse_dict(
        {"output_dir": str(tmp_path), "mask_kind": "context", "mask_threshold": 0.5}
    )
    assert config.mask_kind == "context" and config.mask_threshold == 0.5
