"""What the recipes share: dataset flags, YAML configs under CLI flags, evaluation splits and result files.

Like TRL's ``ScriptArguments``, this ships with the package (``hf_cfft.cli``, never imported by the library) so that
every recipe stays a thin script and no recipe imports another.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

import torch
import yaml
from datasets import Dataset
from transformers import HfArgumentParser

from ..evaluation import results_table, write_report
from .sources import WORLD, class_names_of, load_image_splits

# Keys a fine-tuning YAML lends to the post-hoc recipes (WiSE-FT, soups, zero-shot, pictures): the data and the
# model, never its output_dir, so their results cannot land in the training run's folder.
logger = logging.getLogger(__name__)

SHARED_CONFIG_KEYS = frozenset(
    {"model_name_or_path", "class_names", "templates", "seed", "per_device_eval_batch_size"}
)


@dataclass
class DataArguments:
    """Where the images come from and which splits are trained on and evaluated."""

    dataset_name: str = field(
        default=WORLD, metadata={"help": "'world', an ImageFolder directory, 'imagefolder' + data_dir, or a Hub id."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    world_train_correlation: float | None = field(
        default=None,
        metadata={
            "help": "The embedded world only: share of train images on their class's own context (default 0.9; "
            "0.1 makes the context independent of the class)."
        },
    )
    data_dir: str | None = field(default=None, metadata={"help": "data_dir passed to datasets.load_dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to fine-tune on."})
    eval_splits: list[str] = field(default_factory=list, metadata={"help": "Splits to evaluate (ID first)."})
    ood_splits: list[str] = field(default_factory=list, metadata={"help": "Which eval splits are OOD (averaged)."})
    image_column: str = field(default="image", metadata={"help": "Image column name."})
    label_column: str = field(default="label", metadata={"help": "Label column name."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the train split (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate each eval split."})
    evaluate_zero_shot: bool = field(default=True, metadata={"help": "Also evaluate the model before fine-tuning."})


def parse_with_config(
    dataclass_types: tuple,
    argv: list[str],
    *,
    default_config: str | None = None,
    config_keys: Iterable[str] | None = None,
) -> tuple:
    """Parse ``argv`` into ``dataclass_types``, CLI flags over the YAML given with ``--config FILE``.

    ``default_config`` is read when ``argv`` is empty. ``config_keys`` limits which YAML keys are taken (default:
    all); keys that none of the dataclasses has are ignored only when ``config_keys`` is given.
    """
    parser = HfArgumentParser(dataclass_types)
    config_file = None
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        config_file, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
    elif not argv and default_config is not None:
        config_file = default_config
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file!r} does not exist")
        with open(config_file) as f:
            config = yaml.safe_load(f) or {}
        if config_keys is not None:
            known = {f.name for cls in dataclass_types for f in fields(cls)}
            wanted = set(config_keys) | {f.name for f in fields(DataArguments)}
            config = {k: v for k, v in config.items() if k in wanted and k in known}
        parser.set_defaults(**config)
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def default_model(model_name_or_path: str | None, dataset_name: str, flag: str = "--model_name_or_path") -> str:
    """``model_name_or_path``, or the tiny CLIP shipped for the embedded world when none is given there.

    ``flag`` names the recipe's option in the error raised outside the world.
    """
    if model_name_or_path is not None:
        return model_name_or_path
    if dataset_name != WORLD:
        raise ValueError(f"{flag} is required outside the embedded world (e.g. openai/clip-vit-base-patch32)")
    from ..world import world_clip_path

    return str(world_clip_path())


def _truncated(dataset: Dataset, max_samples: int | None) -> Dataset:
    return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset


def load_train_and_eval_splits(data_args: DataArguments, seed: int) -> tuple[Dataset, dict[str, Dataset]]:
    """The ``--train_split`` and ``--eval_splits``, truncated to ``--max_train_samples`` / ``--max_eval_samples``."""
    splits = load_image_splits(
        data_args.dataset_name,
        [data_args.train_split, *data_args.eval_splits],
        dataset_config=data_args.dataset_config,
        data_dir=data_args.data_dir,
        world_seed=seed,
        world_train_correlation=data_args.world_train_correlation,
    )
    train = _truncated(splits.pop(data_args.train_split), data_args.max_train_samples)
    return train, {name: _truncated(split, data_args.max_eval_samples) for name, split in splits.items()}


def load_eval_splits(data_args: DataArguments, seed: int) -> dict[str, Dataset]:
    """The ``--eval_splits`` as datasets (empty when none), each truncated to ``--max_eval_samples``."""
    if not data_args.eval_splits:
        return {}
    splits = load_image_splits(
        data_args.dataset_name,
        data_args.eval_splits,
        dataset_config=data_args.dataset_config,
        data_dir=data_args.data_dir,
        world_seed=seed,
    )
    return {name: _truncated(split, data_args.max_eval_samples) for name, split in splits.items()}


def check_dataset_classes(splits: Mapping[str, Dataset], names: list[str], label_column: str, model_name: str) -> None:
    """Refuse splits whose ClassLabel has another number of classes than the model; warn when only names differ.

    Names may differ in spelling alone (imagenet-1k's "tench, Tinca tinca" vs CLIP's "tench"), so a name mismatch
    is reported rather than refused.
    """
    for split, dataset in splits.items():
        try:
            dataset_names = class_names_of(dataset, label_column)
        except ValueError:
            continue  # integer labels: nothing to compare; the user vouches for the order
        if len(dataset_names) != len(names):
            raise ValueError(
                f"split {split!r} has {len(dataset_names)} classes ({', '.join(dataset_names[:5])}, ...) but "
                f"{model_name} classifies {len(names)} ({', '.join(names[:5])}, ...); evaluate on the dataset the "
                "models were built for"
            )
        if dataset_names != names:
            differ = [(a, b) for a, b in zip(dataset_names, names) if a != b]
            logger.warning(
                f"{len(differ)} class names of split {split!r} differ from {model_name}'s, e.g. "
                f"{differ[0][0]!r} vs {differ[0][1]!r}; scores assume the same class order"
            )


def evaluate_kwargs(data_args: DataArguments, batch_size: int, device: torch.device | None = None) -> dict:
    """Keyword arguments of `hf_cfft.evaluation.evaluate_splits` from the dataset flags."""
    return dict(
        ood_splits=data_args.ood_splits,
        batch_size=batch_size,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        device=device,
    )


def write_results(results: Mapping, output_dir: str, data_args: DataArguments, stem: str = "results") -> str:
    """``<stem>.json`` and ``<stem>.md`` in ``output_dir``; returns the markdown table (accuracies in %)."""
    columns = [*data_args.eval_splits] + (["ood_avg"] if data_args.ood_splits else [])
    return write_report(output_dir, results, results_table(results, columns), title="Top-1 accuracy (%)", stem=stem)


def resolve_device(name: str | None) -> torch.device:
    """``name``, or CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
