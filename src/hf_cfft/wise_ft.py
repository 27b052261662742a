"""WiSE-FT (Wortsman et al., CVPR 2022): interpolate the weights of a zero-shot and a fine-tuned classifier.

    theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned

alpha = 0 is the zero-shot model, alpha = 1 the fine-tuned one; both end points are returned bit for bit, so a
sweep over alpha starts and ends exactly at the models it interpolates. Interpolating is only meaningful between
two fine-tunings of the same pre-trained model with the same head layout, which `check_compatible` enforces.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from .modeling import ClipCfftForImageClassification

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


def class_names(model: ClipCfftForImageClassification) -> list[str]:
    """The model's class names in label-index order."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def _architecture(model: ClipCfftForImageClassification) -> dict:
    vision = model.config.vision_config
    return {
        "class": type(model).__name__,
        "projection_dim": model.config.projection_dim,
        "head_bias": model.config.head_bias,
        **{name: getattr(vision, name, None) for name in _VISION_FIELDS},
    }


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} classes)"


def check_compatible(models: Mapping[str, torch.nn.Module]) -> None:
    """Raise ValueError unless every model has the first one's architecture and class list (same names, same order).

    ``models`` maps a name used in the message (e.g. "zero-shot", a folder) to a `ClipCfftForImageClassification`.
    """
    items = list(models.items())
    if not items:
        raise ValueError("no models given")
    for name, model in items:
        if not isinstance(model, ClipCfftForImageClassification):
            raise TypeError(f"{name} is a {type(model).__name__}, not a ClipCfftForImageClassification")
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


def interpolate_state_dicts(
    zero_shot_sd: Mapping[str, torch.Tensor], fine_tuned_sd: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zero_shot + alpha * fine_tuned for every floating tensor; exact copies at alpha 0 and 1.

    Non-floating tensors (integer buffers) must be equal in both and are copied. Half-precision tensors are mixed in
    float32 and cast back. The returned tensors are new (cloned), so the inputs are never aliased.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1] (0 = zero-shot, 1 = fine-tuned)")
    check_same_keys({"the zero-shot state dict": zero_shot_sd, "the fine-tuned state dict": fine_tuned_sd})
    merged = {}
    for key, zs in zero_shot_sd.items():
        ft = fine_tuned_sd[key]
        if not (zs.is_floating_point() and ft.is_floating_point()):
            if not torch.equal(zs, ft.to(zs.device)):
                raise ValueError(f"non-floating tensor {key!r} differs between the models; they are not compatible")
            merged[key] = zs.clone()
            continue
        dtype = torch.promote_types(zs.dtype, ft.dtype)
        # The end points are copies, not (1 - a) * x + a * y evaluated in floating point, which may round.
        if alpha == 0.0:
            merged[key] = zs.to(dtype, copy=True)
        elif alpha == 1.0:
            merged[key] = ft.to(zs.device, dtype, copy=True)
        else:
            work = torch.promote_types(dtype, torch.float32)
            mixed = (1.0 - alpha) * zs.to(work) + alpha * ft.to(zs.device, work)
            merged[key] = mixed.to(dtype)
    return merged


def wise_ft(
    zero_shot_model: ClipCfftForImageClassification, fine_tuned_model: ClipCfftForImageClassification, alpha: float
) -> ClipCfftForImageClassification:
    """A new classifier whose weights interpolate the two models' (alpha = weight of the fine-tuned model).

    The models must share architecture and class list; the result copies the fine-tuned model's config, device and
    dtype, and is in eval mode. Neither input is modified.
    """
    check_compatible({"the zero-shot model": zero_shot_model, "the fine-tuned model": fine_tuned_model})
    weights = interpolate_state_dicts(zero_shot_model.state_dict(), fine_tuned_model.state_dict(), alpha)
    merged = copy.deepcopy(fine_tuned_model)
    merged.load_state_dict(weights)
    return merged.eval()
