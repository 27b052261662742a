"""Baselines that the method is compared with: weight averaging (WiSE-FT, uniform and greedy soups)."""

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
    "GreedySoup",
    "average_state_dicts",
    "check_compatible",
    "check_held_out_split",
    "class_names",
    "greedy_soup",
    "interpolate_state_dicts",
    "uniform_soup",
    "wise_ft",
]
