"""Specification of hf_cfft.config.CfftConfig: paper defaults, validation, CLI parsing."""

import re

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_cfft.config import CfftConfig


@pytest.fixture
def make(tmp_path):
    def build(**kwargs):
        return CfftConfig(output_dir=str(tmp_path / "out"), **kwargs)

    return build


def test_defaults_are_the_papers_best_setting(make):
    config = make()
    assert isinstance(config, TrainingArguments)
    assert config.mask_kind == "object"
    assert config.fill_kind == "single"
    assert config.mask_threshold == 0.3
    assert config.distill_weight == 30.0
    assert config.cam_method == "rollout"
    assert config.distill_target == "features"
    assert config.uses_counterfactuals and config.needs_teacher_cams


def test_defaults_keep_the_image_column_and_drop_incomplete_batches(make):
    config = make()
    assert config.remove_unused_columns is False
    assert config.dataloader_drop_last is True


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
