"""Uniform model soup (Wortsman et al., ICML 2022): average the weights of several fine-tuned classifiers.

The ingredients are fine-tunings of one pre-trained model with the same head (e.g. different seeds or learning
rates); `hf_cfft.wise_ft.check_compatible` refuses anything else. A soup of one model is that model, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from .modeling import ClipCfftForImageClassification
from .wise_ft import check_compatible, check_same_keys


def average_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of N state dicts with the same keys and shapes -> a new state dict.

    Floating tensors are summed in float64 (a soup of many models should not lose bits to accumulation) and cast
    back to the first state dict's dtype; non-floating tensors must be equal and are copied.
    """
    if len(state_dicts) == 0:
        raise ValueError("a soup needs at least one model")
    check_same_keys({f"model {i}": sd for i, sd in enumerate(state_dicts)})
    first = state_dicts[0]
    if len(state_dicts) == 1:
        return {key: tensor.clone() for key, tensor in first.items()}
    soup = {}
    for key, ref in first.items():
        tensors = [sd[key].to(ref.device) for sd in state_dicts]
        if not ref.is_floating_point():
            if not all(torch.equal(ref, t) for t in tensors[1:]):
                raise ValueError(f"non-floating tensor {key!r} differs between the models; they are not compatible")
            soup[key] = ref.clone()
            continue
        total = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for tensor in tensors:
            total += tensor.to(torch.float64)
        soup[key] = (total / len(tensors)).to(ref.dtype)
    return soup


def uniform_soup(
    models: Sequence[ClipCfftForImageClassification], names: Sequence[str] | None = None
) -> ClipCfftForImageClassification:
    """A new classifier with the mean weights of ``models`` (config, device and dtype of the first), in eval mode.

    ``names`` (e.g. the folders the models came from) only label the error raised for mismatched models.
    """
    if len(models) == 0:
        raise ValueError("a soup needs at least one model")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    if len(names) != len(models):
        raise ValueError(f"got {len(names)} names for {len(models)} models")
    if len(set(names)) < len(names):
        names = [f"{name} (#{i})" for i, name in enumerate(names)]  # keep every model in the check
    check_compatible(dict(zip(names, models)))
    weights = average_state_dicts([model.state_dict() for model in models])
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(weights)
    return soup.eval()
