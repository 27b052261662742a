"""Baselines that the method is compared with: weight averaging (WiSE-FT, uniform and greedy soups) and FLYP."""

from .flyp import FlypTrainer, contrastive_loss, load_contrastive_model
from .greedy_soup import GreedySoup, check_held_out_split, greedy_soup
from .weight_averaging import (
    average_state_dicts,
    check_compatible,
    class_names,
    interpolate_state_dicts,
    uniform_soup,
    wise_ft,
)

__all__ = [
    "FlypTrainer",
    "GreedySoup",
    "average_state_dicts",
    "check_compatible",
    "check_held_out_split",
    "class_names",
    "contrastive_loss",
    "greedy_soup",
    "interpolate_state_dicts",
    "load_contrastive_model",
    "uniform_soup",
    "wise_ft",
]
