"""The methods hf_cfft trains or builds, in one table: the settings that make each, its name, what it distils.

Every place that needs to know "which method is this" reads it here: the fine-tuning job (which trainer class runs
it, `Method.trainer_class`), the trainer (what the distillation term sees, `Method.view`), the results table of a
fine-tuning run (`run_label`), the model card (`Method.family`, `Method.tag`) and the comparison grid (`METHODS`, as
``hf_cfft.cli.compare_grid`` turns them into cells). A method is a set of
`CfftConfig` settings (`Method.settings`); `method_of` reads a configuration back into its method, so a run started
with flags and a cell of the comparison name the same thing the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VIEWS = ("counterfactual", "clean", "none")  # what the distillation term sees (CfftTrainer.distill_view)
KINDS = ("train", "zero_shot", "wise_ft", "uniform_soup", "greedy_soup")
STRENGTHS = ("beta", "alpha", None)


@dataclass(frozen=True)
class Method:
    """One method.

    key: its name in the comparison (``--methods``). name: its row in tables and plots. family: what the model card
    describes it as (the CFFT variants are all "cfft"; LoRA runs are their method's family). tag: the card's Hub
    tag. settings: the `CfftConfig` fields a training run of it sets. strength: 'beta' (``distill_weight``),
    'alpha' (WiSE-FT's interpolation) or None. view: what its distillation term sees. kind: 'train' (a fine-tuning
    run), 'zero_shot', 'wise_ft' / 'uniform_soup' / 'greedy_soup' (built from ``source``'s runs). init_from: a
    trained method whose model of the same seed this one starts from (LP-FT from the probe). trainer: the
    ``module:Class`` of the trainer that trains it, imported when asked for (`trainer_class`), as transformers' auto
    classes name theirs: the trainers import this table, so it cannot import them.
    """

    key: str
    name: str
    family: str
    tag: str
    settings: tuple[tuple[str, Any], ...] = ()
    strength: str | None = None
    view: str = "none"
    kind: str = "train"
    source: str | None = None
    init_from: str | None = None
    trainer: str = "hf_cfft.trainer:CfftTrainer"

    def __post_init__(self):
        if self.view not in VIEWS or self.kind not in KINDS or self.strength not in STRENGTHS:
            raise ValueError(f"method {self.key!r}: view/kind/strength {self.view}/{self.kind}/{self.strength}")

    @property
    def flags(self) -> tuple[str, ...]:
        """The fine-tuning job's flags for `settings` (``--mask_kind object --fill_kind single``, ...)."""
        out: list[str] = []
        for name, value in self.settings:
            out += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
        return tuple(out)

    def trainer_class(self) -> type:
        """The trainer class that trains this method (`hf_cfft.training.RobustTrainer` subclass)."""
        if self.kind != "train":
            raise ValueError(f"{self.name} is not trained: it is built from other models ({self.kind})")
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(module), name)


_NO_MASK = (("mask_kind", "none"), ("fill_kind", "none"))
_VANILLA = (("distill_weight", 0), *_NO_MASK)
_LORA = (("lora_rank", 8),)  # rank 8 in the image tower's attention projections, the head in full


def _cfft(mask: str, fill: str) -> tuple[tuple[str, Any], ...]:
    return (("mask_kind", mask), ("fill_kind", fill))


def _methods(*methods: Method) -> dict[str, Method]:
    return {method.key: method for method in methods}


METHODS: dict[str, Method] = _methods(
    Method("zero_shot", "zero-shot", "zero_shot", "zero-shot", kind="zero_shot"),
    Method("ft", "vanilla FT", "ft", "vanilla-fine-tuning", _VANILLA),
    Method("lp", "linear probe", "lp", "linear-probe", (("linear_probe", True), ("cam_source", "teacher"), *_VANILLA)),
    Method("lp_ft", "LP-FT", "lp_ft", "lp-ft", _VANILLA, init_from="lp"),
    Method("ft_fd", "FT+FD", "ft_fd", "feature-distillation", _NO_MASK, strength="beta", view="clean"),
    # The reference's FT+KD temperature (CfftConfig's default too), named so that the cell says where it comes from.
    Method(
        "ft_kd",
        "FT+KD",
        "ft_kd",
        "knowledge-distillation",
        (*_NO_MASK, ("distill_target", "logits"), ("kd_temperature", 10)),
        strength="beta",
        view="clean",
    ),  # fmt: skip
    *(
        Method(
            key,
            f"CFFT {mask}/{fill}",
            "cfft",
            "counterfactual-fine-tuning",
            _cfft(mask, fill),
            "beta",
            "counterfactual",
        )  # fmt: skip
        for key, mask, fill in (
            ("cfft", "object", "single"),
            ("cfft_multi", "object", "multi"),
            ("cfft_nofill", "object", "none"),
            ("cfft_random", "random", "single"),
            ("cfft_context", "context", "single"),
        )
    ),
    # LoRA: the teacher of a distilling run is the same model with its adapters off. Needs the 'peft' extra.
    Method("lora_ft", "LoRA FT", "ft", "vanilla-fine-tuning", (*_LORA, *_VANILLA)),
    Method(
        "lora_cfft",
        "LoRA CFFT object/single",
        "cfft",
        "counterfactual-fine-tuning",
        (*_LORA, *_cfft("object", "single")),
        "beta",
        "counterfactual",
    ),  # fmt: skip
    Method(
        "flyp", "FLYP", "flyp", "flyp", (("method", "flyp"), *_VANILLA), trainer="hf_cfft.baselines.flyp:FlypTrainer"
    ),
    Method("wise_ft", "WiSE-FT", "wise_ft", "wise-ft", strength="alpha", kind="wise_ft", source="ft"),
    Method("uniform_soup", "uniform soup", "soup", "model-soup", kind="uniform_soup", source="ft"),
    Method("greedy_soup", "greedy soup", "soup", "model-soup", kind="greedy_soup", source="ft"),
)


def _get(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


def method_of(args: Any, *, from_classifier: bool = False) -> Method:
    """The method a training configuration (a `CfftConfig` or its dict) runs.

    ``from_classifier``: the run starts from a saved classifier (LP-FT's second stage). A combination no entry of
    `METHODS` names (e.g. random masks refilled from several donors) is its family's method under its own name
    (``CFFT random/multi``); LoRA runs are their method with ``LoRA`` before the name.
    """
    beta = float(_get(args, "distill_weight", 30.0) or 0.0)
    lora = int(_get(args, "lora_rank", 0) or 0) > 0
    if _get(args, "method") == "flyp":
        return METHODS["flyp"]
    if beta == 0:
        if _get(args, "linear_probe"):
            return METHODS["lp"]
        base = METHODS["lp_ft" if from_classifier else "ft"]
    elif _get(args, "mask_kind") == "none":
        base = METHODS["ft_kd" if _get(args, "distill_target") == "logits" else "ft_fd"]
    else:
        mask, fill = _get(args, "mask_kind", "object"), _get(args, "fill_kind", "single")
        named = [m for m in METHODS.values() if m.family == "cfft" and dict(m.settings) == dict(_cfft(mask, fill))]
        base = named[0] if named else dataclasses.replace(
            METHODS["cfft"], key=f"cfft_{mask}_{fill}", name=f"CFFT {mask}/{fill}", settings=_cfft(mask, fill)
        )  # fmt: skip
    if not lora:
        return base
    lora_key = f"lora_{base.key}"
    return METHODS.get(lora_key) or dataclasses.replace(base, key=lora_key, name=f"LoRA {base.name}")


def run_label(args: Any, *, from_classifier: bool = False) -> str:
    """A fine-tuning run's row in its results table: the method and its beta, e.g. ``CFFT object/single (beta 3)``."""
    method = method_of(args, from_classifier=from_classifier)
    if method.strength == "beta" or method.key in ("ft", "lora_ft"):
        return f"{method.name} (beta {float(_get(args, 'distill_weight', 30.0) or 0.0):g})"
    return method.name
