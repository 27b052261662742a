"""Parameter-efficient fine-tuning of the image tower (LoRA, or any `peft` adapter), with the base as the teacher.

With an adapter, the student is the classifier wrapped by `peft` (the adapter in the tower's attention projections by
default, the classification head trained in full through ``modules_to_save``), and the frozen teacher of CFFT, FT+FD
and FT+KD is *the same model with its adapters disabled* (`AdapterFreeTeacher`): the pre-trained weights are never
trained, so switching the adapters off gives exactly the pre-trained tower, without a second copy of it in memory.

Saving (`save_adapter_and_merged`) writes the adapter to ``<output_dir>/adapter`` (loadable with
``peft.PeftModel.from_pretrained`` on the base classifier, or `load_adapter_classifier`) and, by default, the merged
classifier (adapter folded into the weights) to ``<output_dir>`` itself, an ordinary hf_cfft classifier that
``from_pretrained`` loads with no `peft` installed.

`peft` is an optional extra: ``pip install "hf_cfft[peft]"`` (``pip install -e ".[peft]"`` in a checkout).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .classifier_loading import ADAPTER_DIR, ADAPTER_INFO, load_classifier

logger = logging.getLogger(__name__)

# The attention projections of the vision tower: every supported family names them alike (CLIP, MetaCLIP 2, SigLIP,
# SigLIP 2). A classifier holds only the image tower, so the suffixes cannot reach a text tower.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "clip": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "metaclip_2": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "siglip": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
HEAD_MODULES = ("classifier",)


def require_peft():
    """Import `peft`, or fail with the one line that says how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "adapters (--lora_rank > 0) need the optional 'peft' package: pip install 'hf_cfft[peft]' (in a "
            "checkout: pip install -e '.[peft]'), or train full weights with --lora_rank 0"
        ) from error
    return peft


def default_target_modules(family: str) -> tuple[str, ...]:
    if family not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"no default LoRA target modules for family {family!r}; pass --lora_target_modules")
    return DEFAULT_TARGET_MODULES[family]


def add_lora(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
):
    """``model`` (a `CfftImageClassifier`) wrapped by peft with LoRA in ``target_modules`` and the head in full."""
    peft = require_peft()
    family = getattr(model.config, "family", "clip")
    targets = list(target_modules) if target_modules else list(default_target_modules(family))
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, modules_to_save=list(HEAD_MODULES)
    )
    wrapped = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA rank %d on %s: %d of %d parameters trainable", rank, ", ".join(targets), trainable, total)
    return wrapped


def is_adapter_model(model) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


class AdapterFreeTeacher:
    """f_hat as the student's own pre-trained weights: its adapters switched off (and the module in eval mode) for
    each call. Not a module of its own: it holds no parameters, so nothing is copied, optimised or saved twice.

    ``get_image_features`` / ``logits_from_features`` run with the adapters off; anything else (the CAM's access to
    ``vision_model``, ...) must run inside `adapters_off`.
    """

    def __init__(self, peft_model):
        self._peft = peft_model
        self._depth = 0  # re-entrant: only the outermost `adapters_off` switches them off and back on

    @property
    def base(self) -> torch.nn.Module:
        return self._peft.get_base_model()

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[torch.nn.Module]:
        base = self.base
        if self._depth:
            yield base
            return
        was_training = base.training
        base.eval()
        self._depth += 1
        try:
            with self._peft.disable_adapter():
                yield base
        finally:
            self._depth -= 1
            base.train(was_training)

    def get_image_features(self, pixel_values: torch.Tensor, patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        with self.adapters_off() as base:
            return base.get_image_features(pixel_values, patch_keep)

    def logits_from_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        with self.adapters_off() as base:
            return base.logits_from_features(image_embeds)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_peft"].get_base_model(), name)


def teacher_context(teacher):
    """The context a teacher's calls run in: adapters off for an `AdapterFreeTeacher`, nothing for a frozen copy."""
    return teacher.adapters_off() if isinstance(teacher, AdapterFreeTeacher) else contextlib.nullcontext()


def merged_classifier(peft_model) -> torch.nn.Module:
    """A copy of the classifier with the adapter folded into its weights (the training model is left as it is)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def save_adapter_and_merged(
    peft_model, output_dir: str | Path, *, merge: bool, base_model: str | None, safe_serialization: bool = True
) -> dict[str, str]:
    """Write ``<output_dir>/adapter`` (the adapter, the trained head, `ADAPTER_INFO`) and, with ``merge``, the
    merged classifier into ``output_dir``. Returns {"adapter": path, "merged": path or None}."""
    output_dir = Path(output_dir)
    adapter_dir = output_dir / ADAPTER_DIR
    peft_model.save_pretrained(adapter_dir, safe_serialization=safe_serialization)
    # peft writes a template card of empty fields; the run's own card (one folder up) describes the adapter.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    base = peft_model.get_base_model()
    info = {
        "base_model": base_model,
        "class_names": [base.config.id2label[i] for i in range(base.config.num_labels)],
        "family": getattr(base.config, "family", "clip"),
        "note": "a peft adapter of an hf_cfft classifier; load it with hf_cfft.adapters.load_adapter_classifier",
    }
    (adapter_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
    merged_path = None
    if merge:
        merged_classifier(peft_model).save_pretrained(output_dir, safe_serialization=safe_serialization)
        merged_path = str(output_dir)
    return {"adapter": str(adapter_dir), "merged": merged_path}


def load_adapter_classifier(adapter_dir: str | Path, base_model: str | None = None, *, merge: bool = False):
    """The classifier an adapter folder was trained on, with the adapter loaded (or folded in with ``merge``).

    ``base_model``: the CLIP checkpoint (or zero-shot classifier) it was trained from; defaults to the one recorded
    in the folder's `ADAPTER_INFO`. The head comes from the adapter folder (it was trained in full).
    """
    peft = require_peft()
    adapter_dir = Path(adapter_dir)
    info_path = adapter_dir / ADAPTER_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    base_model = base_model or info.get("base_model")
    if not base_model:
        raise ValueError(f"{adapter_dir} records no base model ({ADAPTER_INFO}); pass base_model=<the checkpoint>")
    names = info.get("class_names") or None
    # A pre-trained base needs a head of the right shape before the adapter's own trained head (``modules_to_save``)
    # replaces it on load: its prompts do not matter, so the class names alone make them.
    base = load_classifier(base_model, class_names=names, templates=["{}"], show_progress=False)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    return model.merge_and_unload() if merge else model
