"""Model cards for released checkpoints: method and hyper-parameters, ID/OOD results, citation, how to load.

The Jinja template ships as package data (``templates/model_card.md``; ``model_cards/`` at the repo top level holds
an identical copy for reading and review) and is rendered with `huggingface_hub.ModelCard.from_template`. The
fine-tuned model's top-1 accuracy per evaluated split goes into the card's ``model-index`` as `EvalResult`s.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..evaluation.report import OOD_AVG, results_table
from ..hub_ids import hub_id
from ..methods import method_of

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
CARD_NAME = "README.md"
TRAINING_ARGS_JSON = "training_args.json"
EVAL_RESULTS_JSON = "eval_results.json"
ORIGIN_JSON = "model_origin.json"  # how a checkpoint not trained by CfftTrainer was made (WiSE-FT, soup, zero-shot)

TAGS = ("hf_cfft", "clip", "vision", "image-classification", "robust-fine-tuning")
FINE_TUNED = "fine-tuned"  # the row of eval_results.json that describes this checkpoint
WORLD = "world"  # the embedded world's dataset name (hf_cfft.cli.sources.WORLD; the library does not import cli)
_WORLD_TYPE = "hf_cfft-world"


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub repo id ("name" or "owner/name") rather than a local folder, else None."""
    return None if name == WORLD else hub_id(name)


def _describe_base_model(base_model: str | None) -> dict[str, str | None]:
    if not base_model:
        return {"base_model": None, "base_model_url": None}
    hub_id = _hub_id(base_model)
    if hub_id:
        return {"base_model": hub_id, "base_model_url": f"https://huggingface.co/{hub_id}"}
    # A local folder: its name says which checkpoint it was without publishing the user's directory layout.
    return {"base_model": Path(base_model).name or base_model, "base_model_url": None}


def _describe_dataset(dataset_name: str | None) -> dict[str, str | None]:
    """Title and link for the prose, and the (type, name) pair that identifies the dataset in ``model-index``."""
    if not dataset_name:
        return {"dataset_title": None, "dataset_url": None, "dataset_type": None, "dataset_label": None}
    if dataset_name == WORLD:
        return {
            "dataset_title": "the embedded synthetic world of `hf_cfft` (context correlates with the class)",
            "dataset_url": None,
            "dataset_type": _WORLD_TYPE,
            "dataset_label": "hf_cfft world",
        }
    hub_id = _hub_id(dataset_name)
    if hub_id:
        return {
            "dataset_title": f"`{hub_id}`",
            "dataset_url": f"https://huggingface.co/datasets/{hub_id}",
            "dataset_type": hub_id,
            "dataset_label": hub_id,
        }
    name = Path(dataset_name).name or dataset_name
    return {
        "dataset_title": f"a local image folder (`{name}`)",
        "dataset_url": None,
        "dataset_type": "imagefolder",
        "dataset_label": name,
    }


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        values = obj.to_dict()
        if hasattr(obj, "world_size"):
            values.setdefault("world_size", obj.world_size)  # a property: to_dict leaves it out
        return values
    raise TypeError(f"expected a config object with to_dict() or a dict, got {type(obj).__name__}")


def method_info(training_args: Any = None, origin: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the card says this checkpoint is: ``{"key", "headline", "detail", "tag", "trained", "start"}``.

    ``origin`` describes checkpoints not trained by `CfftTrainer`: ``{"kind": "wise_ft", "alpha", "zero_shot",
    "fine_tuned"}``, ``{"kind": "soup", "members": [...]}`` or ``{"kind": "zero_shot", "templates": n}``; for a
    trained one, ``{"kind": "trained", "from_classifier": True}`` marks a start from a saved classifier (LP-FT's
    second stage). Without it, ``training_args`` (a `CfftConfig` or its dict) decides.
    """
    origin = dict(origin or {})
    kind = origin.get("kind", "trained")
    if kind == "wise_ft":
        alpha = float(origin["alpha"])
        ends = f"`{Path(str(origin['zero_shot'])).name}` (zero-shot) and `{Path(str(origin['fine_tuned'])).name}`"
        return _info(
            "wise_ft", f"made by **WiSE-FT** weight-space ensembling, alpha = {alpha:g}", "wise-ft",
            f"The weights are (1 - alpha) * zero-shot + alpha * fine-tuned with alpha = {alpha:g}, between {ends} "
            "(fine-tuned); no training step was run.", trained=False,
        )  # fmt: skip
    if kind == "soup":
        members = [Path(str(m)).name for m in origin.get("members", [])]
        return _info(
            "soup", f"made as a **uniform model soup** of {len(members)} fine-tuned models", "model-soup",
            f"The weights are the mean of {len(members)} fine-tuned classifiers: "
            + ", ".join(f"`{m}`" for m in members) + "; no training step was run.", trained=False,
        )  # fmt: skip
    if kind == "zero_shot":
        count = origin.get("templates")
        prompts = f" averaged over {count} prompt templates" if count else ""
        return _info(
            "zero_shot", "built as CLIP's **zero-shot classifier** (no fine-tuning)", "zero-shot",
            f"The head's rows are the normalised text embeddings of the class-name prompts{prompts}; the image "
            "encoder is CLIP's, unchanged.", trained=False,
        )  # fmt: skip
    args = _as_dict(training_args)
    beta = float(args.get("distill_weight", 30.0) or 0.0)
    method = method_of(args, from_classifier=bool(origin.get("from_classifier")))
    family = method.family
    if family == "flyp":
        return _info(
            family, "trained by **FLYP** (image and text towers fine-tuned with the contrastive pre-training loss)",
            method.tag,
            "FLYP (Goyal et al., CVPR 2023, *Finetune like you pretrain*; a baseline, no distillation): the image and "
            "text towers were fine-tuned together with the model's own pre-training loss (CLIP's symmetric "
            "contrastive loss, or SigLIP's sigmoid loss), each train image paired with a prompt of its class name "
            "(one template drawn per step), the other pairs of the batch as negatives. The classifier's head was "
            "then rebuilt from the fine-tuned text tower's class-name prompts, as a zero-shot head.",
            start=" (both towers)",
        )  # fmt: skip
    if family == "lp":
        return _info(
            family, "trained by **linear probing** (the head only; the image encoder is frozen)", method.tag,
            "Only the linear head was trained (cross-entropy); the image encoder is unchanged.",
        )  # fmt: skip
    if family == "lp_ft":
        return _info(
            family, "trained by **LP-FT** (its fine-tuning stage, from a linear-probed head)", method.tag,
            "The whole model was fine-tuned with cross-entropy, starting from a classifier whose head was first "
            "trained alone (linear probe): the LP-FT baseline.", start=", a saved classifier",
        )  # fmt: skip
    if family == "ft":
        return _info(
            family, "trained by **vanilla fine-tuning** (cross-entropy only, beta = 0: a baseline)", method.tag,
            "The whole model was fine-tuned with cross-entropy alone, without distillation.",
        )  # fmt: skip
    if family == "ft_kd":
        temperature = args.get("kd_temperature")
        return _info(
            family, f"trained by **FT+KD** (fine-tuning + logit distillation on clean images, beta = {beta:g})",
            method.tag,
            f"This checkpoint distils the frozen model's logits on the clean images (no masking: the FT+KD "
            f"baseline) with beta = {beta:g}" + (f" and temperature {float(temperature):g}." if temperature else "."),
        )  # fmt: skip
    if family == "ft_fd":
        return _info(
            family, f"trained by **FT+FD** (fine-tuning + feature distillation on clean images, beta = {beta:g})",
            method.tag,
            f"This checkpoint distils on the clean images (no masking: the FT+FD baseline) with beta = {beta:g}.",
        )  # fmt: skip
    return _info(family, "fine-tuned with **counterfactual fine-tuning** (CFFT)", method.tag, "")


def beta_of(training: Mapping[str, Any]) -> float:
    return float(training.get("distill_weight", 30.0) or 0.0)


def _info(key, headline, tag, detail, *, trained=True, start=", whose zero-shot classifier initialises the head"):
    return {"key": key, "headline": headline, "tag": tag, "detail": detail, "trained": trained, "start": start}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def hyperparameter_rows(training_args: Any) -> list[tuple[str, str]]:
    """(label, value) rows of the knobs that shaped this checkpoint, skipping those its setting made irrelevant.

    ``training_args``: a `CfftConfig` or a plain dict of its fields (e.g. ``training_args.json``); missing keys are
    skipped, so a dict of the method's hyper-parameters alone also works.
    """
    args = _as_dict(training_args)
    rows: list[tuple[str, str]] = []

    def add(label: str, key: str, value: Any = None) -> None:
        value = args.get(key) if value is None else value
        if value is not None:
            rows.append((f"{label} (`{key}`)", _fmt(value)))

    beta = args.get("distill_weight")
    mask = args.get("mask_kind")
    flyp = args.get("method") == "flyp"
    distils = not flyp and (beta is None or beta > 0)
    if flyp:
        add("method", "method")
    else:
        add("beta, distillation weight", "distill_weight")
    if distils:
        add("mask", "mask_kind")
        if mask in ("object", "context"):
            add("CAM threshold", "mask_threshold")
            add("CAM method", "cam_method")
            add("CAM source", "cam_source")
        if mask == "random":
            add("masked fraction", "mask_ratio")
        if mask != "none":
            add("fill", "fill_kind")
        add("distillation target", "distill_target")
        if args.get("distill_target") == "logits":
            add("KD temperature", "kd_temperature")
    if args.get("linear_probe"):
        add("head only (linear probe)", "linear_probe")
    if (args.get("lora_rank") or 0) > 0:
        add("LoRA rank (the head trained in full)", "lora_rank")
        add("LoRA alpha", "lora_alpha")
        targets = args.get("lora_target_modules")
        add("LoRA target modules", "lora_target_modules", ", ".join(targets) if targets else "q/k/v/out projections")
    if args.get("teacher_dtype") not in (None, "float32"):
        add("teacher precision", "teacher_dtype")
    add("augmentation", "augment")
    add("learning rate", "learning_rate")
    add("weight decay", "weight_decay")
    if args.get("decay_all_parameters"):
        add("decay biases and norms too", "decay_all_parameters")
    if args.get("one_cycle_schedule"):
        add("schedule", "one_cycle_schedule", "one-cycle cosine")
    else:
        add("schedule", "lr_scheduler_type")
    if args.get("warmup_steps"):
        add("warm-up (fraction if < 1, else steps)", "warmup_steps")
    if (args.get("max_steps") or -1) > 0:
        add("optimisation steps", "max_steps")
    else:
        add("epochs", "num_train_epochs")
    per_device = args.get("per_device_train_batch_size")
    if per_device is not None:
        accumulation = args.get("gradient_accumulation_steps") or 1
        processes = args.get("world_size")
        if processes:
            value = (
                f"{per_device * accumulation * processes} ({per_device} per device x {accumulation} accumulation "
                f"x {processes} process{'es' if processes > 1 else ''})"
            )
        else:
            value = f"{per_device} per device x {accumulation} accumulation"
        add("batch size", "per_device_train_batch_size", value)
    add("gradient clipping (max norm)", "max_grad_norm")
    precision = "bf16" if args.get("bf16") else "fp16" if args.get("fp16") else None
    if precision:
        add("mixed precision", "bf16" if args.get("bf16") else "fp16", precision)
    add("seed", "seed")
    return rows


def _split_roles(
    splits: Sequence[str], id_split: str | None, ood_splits: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(ID splits, OOD splits) among ``splits``; both empty when neither role was given."""
    if ood_splits:
        ood = [s for s in splits if s in set(ood_splits)]
        ids = [id_split] if id_split in splits else [s for s in splits if s not in ood]
        return ids, ood
    if id_split:
        return [id_split] if id_split in splits else [], [s for s in splits if s != id_split]
    return [], []


def _results_table(
    results: Mapping[str, Mapping[str, float]] | None, id_split: str | None, ood_splits: Sequence[str] | None
) -> dict[str, Any] | None:
    """The results table (markdown, accuracies in %), ID splits first, then OOD, then the mean; None when empty."""
    rows = {name: values for name, values in (results or {}).items() if values}
    if not rows:
        return None
    splits = list(dict.fromkeys(split for values in rows.values() for split in values if split != OOD_AVG))
    ids, ood = _split_roles(splits, id_split, ood_splits)
    columns = ids + ood + [s for s in splits if s not in ids and s not in ood]
    header = [f"{s} (ID)" if s in ids else f"{s} (OOD)" if s in ood else s for s in columns]
    if any(OOD_AVG in values for values in rows.values()):
        columns.append(OOD_AVG)
        header.append("OOD avg")
    return {"table": results_table(rows, columns, header), "has_ood": bool(ood) or OOD_AVG in columns}


def _eval_results(
    results: Mapping[str, Mapping[str, float]] | None, dataset: Mapping[str, str | None]
) -> list[EvalResult]:
    """One `EvalResult` per split the fine-tuned model was evaluated on (top-1 accuracy in %, as reported)."""
    fine_tuned = (results or {}).get(FINE_TUNED) or {}
    if not dataset["dataset_type"]:
        return []  # model-index needs to say which dataset; without one the numbers stay in the table only
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset["dataset_type"],
            dataset_name=dataset["dataset_label"],
            dataset_split=split,
            metric_type="accuracy",
            metric_name="Top-1 accuracy (%)",
            metric_value=float(value),
        )
        for split, value in fine_tuned.items()
        if split != OOD_AVG
    ]


# config.family -> the name the card gives the base model's family
BASE_FAMILY_NAMES = {"clip": "CLIP", "metaclip_2": "MetaCLIP 2", "siglip": "SigLIP"}


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    vision = config.get("vision_config") or {}
    if not isinstance(vision, Mapping):
        vision = vision.to_dict()
    id2label = config.get("id2label") or {}
    names = [id2label[key] for key in sorted(id2label, key=int)]
    examples = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    patch, size = vision.get("patch_size"), vision.get("image_size")
    family = config.get("family") or "clip"
    base_family = BASE_FAMILY_NAMES.get(family, family)
    tower = (
        f"{base_family} ViT image encoder ({vision.get('num_hidden_layers')} layers, "
        f"width {vision.get('hidden_size')}, {patch}x{patch}-pixel patches)"
    )
    if family == "siglip":
        description = (
            f"{tower} pooled by its attention-pooling head ({config.get('projection_dim')}-d) + linear head on "
            "L2-normalised features (`CfftImageClassifier`)"
        )
    else:
        class_name = (
            "ClipCfftForImageClassification"
            if config.get("model_type", "clip_cfft") == "clip_cfft"
            else "CfftImageClassifier"
        )
        description = (
            f"{tower} + {config.get('projection_dim')}-d projection + linear head on "
            f"L2-normalised features (`{class_name}`)"
        )
    return {
        "base_family": base_family,
        "architecture": description,
        "num_labels": len(names) or config.get("num_labels"),
        "class_examples": examples,
        "image_size": size,
    }


def render_model_card(
    *,
    model_config: Any,
    training_args: Any = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    results: Mapping[str, Mapping[str, float]] | None = None,
    id_split: str | None = None,
    ood_splits: Sequence[str] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    local_dir: str | os.PathLike | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    global_step: int | None = None,
    origin: Mapping[str, Any] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card of a `ClipCfftForImageClassification` checkpoint; sections without data are left out.

    model_config: the `ClipCfftConfig` or its dict (``config.json``). training_args: a `CfftConfig` or a dict of
    its fields. results: ``{"zero-shot": {split: acc, ..., "ood_avg": acc}, "fine-tuned": {...}}``, accuracies in %
    as `recipes/finetune.py` writes ``eval_results.json``; the "fine-tuned" row becomes ``model-index`` (needs
    ``dataset_name``). id_split / ood_splits label the table's columns (either is enough). repo_id (or else
    local_dir, or else model_name) is what the loading snippets load. origin: how a checkpoint not trained by
    `CfftTrainer` was made (WiSE-FT, soup, zero-shot; see `method_info`), which the headline and tags follow.
    """
    config = _as_dict(model_config)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else None) or "cfft-clip-classifier"
    base = _describe_base_model(base_model)
    dataset = _describe_dataset(dataset_name)
    eval_results = _eval_results(results, dataset)
    training = _as_dict(training_args)
    info = method_info(training, origin)
    if info["trained"] and (training.get("lora_rank") or 0) > 0:
        merged = training.get("merge_adapter", True)
        layout = (
            "this folder holds the merged classifier (the adapter folded into the weights; `from_pretrained` loads "
            "it like any hf_cfft classifier) and `adapter/` the adapter alone (`hf_cfft.adapters."
            "load_adapter_classifier`)"
            if merged
            else "this folder's `adapter/` holds the adapter alone (`hf_cfft.adapters.load_adapter_classifier`); "
            "no merged classifier was saved (`--merge_adapter false`)"
        )
        teacher = " The distillation teacher was the same model with its adapters off." if beta_of(training) else ""
        info = dict(info, detail=f"{info['detail']} Trained with a LoRA adapter of rank {training['lora_rank']} in "
                    f"the image tower and the head in full: {layout}.{teacher}".strip())  # fmt: skip
    if not info["trained"]:
        training = {}  # a WiSE-FT end's or a soup member's training settings do not describe this checkpoint
    method = {key: training[key] for key in training if key in _METHOD_KEYS}
    if "distill_weight" in method:
        method["beta"] = _fmt(float(method["distill_weight"]))
    card_data = ModelCardData(
        model_name=model_name,
        base_model=_hub_id(base_model),
        datasets=[dataset["dataset_type"]] if _hub_id(dataset_name) else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        license=license,
        tags=list(dict.fromkeys([*TAGS, info["tag"], *tags])),
        metrics=["accuracy"] if eval_results else None,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        model_name=model_name,
        load_id=repo_id or (str(local_dir) if local_dir is not None else model_name),
        method=method,
        method_info=info,
        hyperparameters=hyperparameter_rows(training) if training else None,
        results=_results_table(results, id_split, ood_splits),
        global_step=global_step or None,
        resumed_with_changes=training.get("resumed_with_changes") or None,
        **base,
        **{key: dataset[key] for key in ("dataset_title", "dataset_url")},
        **_architecture(config),
    )
    # Dropped sections leave runs of blank lines behind; one blank line between blocks is enough.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content).strip() + "\n")


_METHOD_KEYS = frozenset(
    (
        "distill_weight", "mask_kind", "fill_kind", "mask_threshold", "mask_ratio", "cam_method", "cam_source",
        "distill_target", "kd_temperature", "linear_probe", "augment",
    )
)  # fmt: skip


def write_model_card(output_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Render the card (same keyword arguments as `render_model_card`) and write it to ``output_dir/README.md``."""
    output_dir = Path(output_dir)
    kwargs.setdefault("local_dir", str(output_dir))
    if not kwargs.get("model_name") and not kwargs.get("repo_id"):
        kwargs["model_name"] = output_dir.resolve().name
    path = output_dir / CARD_NAME
    output_dir.mkdir(parents=True, exist_ok=True)
    render_model_card(**kwargs).save(path)
    return path


def write_origin_card(model_dir: str | os.PathLike, origin: Mapping[str, Any], **kwargs: Any) -> Path:
    """Record how ``model_dir``'s model was made (``model_origin.json``) and write its card; returns the card's path.

    For the checkpoints recipes make without training (WiSE-FT, soups, zero-shot classifiers): ``origin`` as in
    `method_info`; ``kwargs`` go to `render_model_card` (the model's config is read from ``config.json``).
    """
    model_dir = Path(model_dir)
    (model_dir / ORIGIN_JSON).write_text(json.dumps(dict(origin), indent=2) + "\n", encoding="utf-8")
    inputs = {**card_inputs_from_dir(model_dir), **kwargs}
    return write_model_card(model_dir, **inputs)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def card_inputs_from_dir(model_dir: str | os.PathLike) -> dict[str, Any]:
    """`render_model_card` keyword arguments recovered from a saved model folder, without unpickling anything.

    Reads ``config.json``, ``eval_results.json``, ``training_args.json`` and ``model_origin.json`` when present
    (``training_args.bin`` is a pickle and is never loaded), and the base model and dataset recorded in an existing
    card's metadata.
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{model_dir} has no config.json: it is not a saved model folder")
    inputs: dict[str, Any] = {
        "model_config": config,
        "training_args": _read_json(model_dir / TRAINING_ARGS_JSON),
        "results": _read_json(model_dir / EVAL_RESULTS_JSON),
        "origin": _read_json(model_dir / ORIGIN_JSON),
    }
    if (model_dir / CARD_NAME).is_file():
        data = ModelCard.load(model_dir / CARD_NAME, ignore_metadata_errors=True).data
        inputs["base_model"] = data.base_model if isinstance(data.base_model, str) else None
        datasets = data.datasets if isinstance(data.datasets, list) else [data.datasets] if data.datasets else []
        if not datasets and any(r.dataset_type == _WORLD_TYPE for r in data.eval_results or ()):
            datasets = [WORLD]
        inputs["dataset_name"] = datasets[0] if datasets else None
    return inputs
