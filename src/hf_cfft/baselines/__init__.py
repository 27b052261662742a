"""Baselines that the method is compared with: weight averaging (WiSE-FT, uniform soups)."""

from .weight_averaging import (
    average_state_dicts,
    check_compatible,
    class_names,
    interpolate_state_dicts,
    uniform_soup,
    wise_ft,
)

__all__ = [
    "average_state_dicts",
    "check_compatible",
    "class_names",
    "interpolate_state_dicts",
    "uniform_soup",
    "wise_ft",
]
