"""Greedy model soup (Wortsman et al., ICML 2022, "Model soups", Recipe 1).

Ingredients are sorted by their held-out accuracy, best first; the soup starts as the best one, and each further
ingredient is kept only if the uniform average with it scores at least as well on the held-out split as the soup
without it. The held-out split decides which models go in, so it must be neither the ID test split one reports nor
an OOD split: a soup chosen on an OOD split would report its own selection bias as robustness.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..modeling import CfftImageClassifier
from .weight_averaging import check_compatible, uniform_soup


@dataclass
class GreedySoup:
    """The soup, which ingredients it holds (in the order added) and every held-out score that decided it."""

    model: CfftImageClassifier
    chosen: list[str]
    ingredient_scores: dict[str, float]
    soup_score: float
    tried: list[tuple[str, float, bool]] = field(default_factory=list)  # (ingredient, score with it, kept)


def check_held_out_split(
    held_out_split: str | None, ood_splits: Sequence[str], reported_splits: Sequence[str] = ()
) -> str:
    """``held_out_split``, refused when missing, one of ``ood_splits`` or one of the ``reported_splits`` (ID test)."""
    if not held_out_split:
        raise ValueError(
            "a greedy soup needs --held_out_split: a labelled split of the ID distribution that is not reported "
            "(e.g. a validation split carved from train); its accuracy chooses the ingredients"
        )
    if held_out_split in ood_splits:
        raise ValueError(
            f"--held_out_split {held_out_split!r} is one of the OOD splits ({', '.join(ood_splits)}): choosing the "
            "soup on a distribution shift leaks it into the OOD numbers; use an ID validation split"
        )
    if held_out_split in reported_splits:
        raise ValueError(
            f"--held_out_split {held_out_split!r} is also an evaluated split ({', '.join(reported_splits)}): the soup "
            "would be chosen on the test set it is reported on; use a separate ID validation split"
        )
    return held_out_split


def greedy_soup(
    models: Sequence[CfftImageClassifier],
    score: Callable[[CfftImageClassifier], float],
    names: Sequence[str] | None = None,
) -> GreedySoup:
    """The greedy soup of ``models`` under ``score`` (held-out accuracy, higher is better; called once per candidate).

    Ingredients are sorted by their own score (ties keep the given order); an ingredient joins when the uniform
    average with it scores >= the soup without it. Models stay on their device; the soup has the first one's config.
    """
    if len(models) == 0:
        raise ValueError("a soup needs at least one model")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    if len(names) != len(models):
        raise ValueError(f"got {len(names)} names for {len(models)} models")
    check_compatible(dict(zip(names, models)))  # before any scoring: one ingredient of another base fails them all
    scores = [float(score(model)) for model in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    chosen = [order[0]]
    soup, best = uniform_soup([models[order[0]]], names=[names[order[0]]]), scores[order[0]]
    tried = []
    for i in order[1:]:
        candidate = uniform_soup([models[j] for j in chosen + [i]], names=[names[j] for j in chosen + [i]])
        value = float(score(candidate))
        kept = value >= best
        tried.append((names[i], value, kept))
        if kept:
            chosen.append(i)
            soup, best = candidate, value
    return GreedySoup(
        model=soup,
        chosen=[names[i] for i in chosen],
        ingredient_scores=dict(zip(names, scores)),
        soup_score=best,
        tried=tried,
    )
