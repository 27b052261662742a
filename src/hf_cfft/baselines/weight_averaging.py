"""Weight averaging of classifiers fine-tuned from one pre-trained model: WiSE-FT and uniform soups share one average.

WiSE-FT (Wortsman et al., CVPR 2022) interpolates the weights of a zero-shot and a fine-tuned classifier:

    theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned

alpha = 0 is the zero-shot model, alpha = 1 the fine-tuned one; both end points are returned bit for bit, so a
sweep over alpha starts and ends exactly at the models it interpolates. Interpolating is only meaningful between
two fine-tunings of the same pre-trained model with the same head layout, which `check_compatible` enforces.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence

import torch

from ..classifier_loading import recorded_base_model
from ..modeling import CfftImageClassifier

# Config fields that decide the computation (not just the tensor shapes): two models that differ in any of them
# cannot share weights even when every shape matches (e.g. 8 heads of 64 vs 4 heads of 128).
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


def class_names(model: CfftImageClassifier) -> list[str]:
    """The model's class names in label-index order."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def _architecture(model: CfftImageClassifier) -> dict:
    vision = model.config.vision_config
    return {
        "class": type(model).__name__,
        "family": getattr(model.config, "family", "clip"),
        "projection_dim": model.config.projection_dim,
        "head_bias": model.config.head_bias,
        **{name: getattr(vision, name, None) for name in _VISION_FIELDS},
    }


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} classes)"


def check_compatible(models: Mapping[str, torch.nn.Module]) -> None:
    """Raise ValueError unless every model has the first one's architecture, class list (same names, same order) and
    recorded pre-trained model (`hf_cfft.classifier_loading.recorded_base_model`; a model saved before the record
    is let be).

    ``models`` maps a name used in the message (e.g. "zero-shot", a folder) to a `CfftImageClassifier`.
    """
    items = list(models.items())
    if not items:
        raise ValueError("no models given")
    for name, model in items:
        if not isinstance(model, CfftImageClassifier):
            raise TypeError(f"{name} is a {type(model).__name__}, not an hf_cfft CfftImageClassifier")
    ref_name, ref = items[0]
    ref_arch, ref_classes = _architecture(ref), class_names(ref)
    for name, model in items[1:]:
        arch = _architecture(model)
        diff = {key: (ref_arch[key], arch[key]) for key in ref_arch if ref_arch[key] != arch[key]}
        if diff:
            detail = "; ".join(f"{key}: {a!r} vs {b!r}" for key, (a, b) in diff.items())
            raise ValueError(
                f"{ref_name} and {name} have different architectures ({detail}); weights can only be averaged "
                "between fine-tunings of the same pre-trained model"
            )
        ref_base, base = recorded_base_model(ref), recorded_base_model(model)
        if ref_base and base and ref_base["fingerprint"] != base["fingerprint"]:
            raise ValueError(
                f"{ref_name} was built from the pre-trained model {ref_base['name_or_path']!r} but {name} from "
                f"{base['name_or_path']!r}, whose weights differ (fingerprints {ref_base['fingerprint']} vs "
                f"{base['fingerprint']}): averaging fine-tunings of two pre-trained models gives a broken model even "
                "when every shape matches. Average only models fine-tuned from one pre-trained checkpoint (WiSE-FT: "
                "pass the checkpoint the fine-tuning started from as --zero_shot_model)"
            )
        classes = class_names(model)
        if classes != ref_classes:
            raise ValueError(
                f"{ref_name} and {name} classify different class lists: {ref_name} has {_short(ref_classes)}, "
                f"{name} has {_short(classes)}; their heads score different classes, so their weights cannot be "
                "averaged. Build both from the same class names in the same order"
            )


def check_same_keys(state_dicts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Raise ValueError unless every state dict has the first one's keys and tensor shapes."""
    items = list(state_dicts.items())
    ref_name, ref = items[0]
    for name, sd in items[1:]:
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise ValueError(
                f"{name} and {ref_name} hold different tensors: missing in {name}: {missing[:5]}, "
                f"only in {name}: {extra[:5]}"
            )
        for key, tensor in ref.items():
            if tensor.shape != sd[key].shape:
                shapes = f"{tuple(tensor.shape)} in {ref_name} but {tuple(sd[key].shape)} in {name}"
                raise ValueError(f"tensor {key!r} has shape {shapes}")


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted mean sum_i w_i * sd_i of N state dicts with the same keys and shapes -> a new state dict.

    ``weights`` default to uniform (a soup: summed in float64 and divided once, so many models lose no bits to
    accumulation). A weight of 1 with all others 0 returns exact copies of that state dict (WiSE-FT's end points).
    Floating tensors are mixed in at least float32 and cast to the promoted dtype of the inputs; non-floating
    tensors (integer buffers) must be equal and are copied. ``names`` label the state dicts in error messages.
    """
    if len(state_dicts) == 0:
        raise ValueError("averaging weights needs at least one model")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(state_dicts))]
    if weights is not None and len(weights) != len(state_dicts):
        raise ValueError(f"got {len(weights)} weights for {len(state_dicts)} state dicts")
    check_same_keys(dict(zip(names, state_dicts)))
    first = state_dicts[0]
    only = None if weights is None else [i for i, w in enumerate(weights) if w != 0]
    averaged = {}
    for key, ref in first.items():
        tensors = [sd[key].to(ref.device) for sd in state_dicts]
        if not all(t.is_floating_point() for t in tensors):
            if not all(torch.equal(ref, t) for t in tensors[1:]):
                raise ValueError(f"non-floating tensor {key!r} differs between the models; they are not compatible")
            averaged[key] = ref.clone()
            continue
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
        if len(tensors) == 1 or (only is not None and len(only) == 1 and weights[only[0]] == 1):
            # Copies, not 1 * x + 0 * y evaluated in floating point, which may round.
            averaged[key] = tensors[0 if only is None else only[0]].to(dtype, copy=True)
        elif weights is None:
            total = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for tensor in tensors:
                total += tensor.to(torch.float64)
            averaged[key] = (total / len(tensors)).to(dtype)
        else:
            work = torch.promote_types(dtype, torch.float32)
            mixed = sum(float(w) * t.to(work) for w, t in zip(weights, tensors))
            averaged[key] = mixed.to(dtype)
    return averaged


def interpolate_state_dicts(
    zero_shot_sd: Mapping[str, torch.Tensor], fine_tuned_sd: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zero_shot + alpha * fine_tuned (`average_state_dicts`); exact copies at alpha 0 and 1."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1] (0 = zero-shot, 1 = fine-tuned)")
    return average_state_dicts(
        [zero_shot_sd, fine_tuned_sd],
        [1.0 - alpha, alpha],
        names=["the zero-shot state dict", "the fine-tuned state dict"],
    )


def wise_ft(
    zero_shot_model: CfftImageClassifier, fine_tuned_model: CfftImageClassifier, alpha: float
) -> CfftImageClassifier:
    """A new classifier whose weights interpolate the two models' (alpha = weight of the fine-tuned model).

    The models must share architecture and class list; the result copies the fine-tuned model's config, device and
    dtype, and is in eval mode. Neither input is modified.
    """
    check_compatible({"the zero-shot model": zero_shot_model, "the fine-tuned model": fine_tuned_model})
    weights = interpolate_state_dicts(zero_shot_model.state_dict(), fine_tuned_model.state_dict(), alpha)
    merged = copy.deepcopy(fine_tuned_model)
    merged.load_state_dict(weights)
    return merged.eval()


def uniform_soup(models: Sequence[CfftImageClassifier], names: Sequence[str] | None = None) -> CfftImageClassifier:
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
