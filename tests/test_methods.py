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
