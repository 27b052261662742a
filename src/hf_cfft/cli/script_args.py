"""What the recipes share: dataset flags, YAML configs under CLI flags, evaluation splits and result files.

Like TRL's ``ScriptArguments``, this ships with the package (``hf_cfft.cli``, never imported by the library) so that
every recipe stays a thin script and no recipe imports another.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import logging
import os
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass

import torch
import yaml
from datasets import Dataset
from transformers import HfArgumentParser, TrainingArguments

from .. import methods
from ..dataset_checks import check_columns, check_max_samples, check_train_classes, subset
from ..evaluation import results_table, write_report
from ..hub_ids import check_model_source
from ..image_checks import check_eval_images
from ..trainer import LostProcessError
from .launch import first_to_report, refuse_a_lone_launch, stop_the_launcher
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
    world_object_contrast: float | None = field(
        default=None,
        metadata={
            "help": "The embedded world only: how far the object's colour lies from its background toward white in "
            "every split after pre-training (default 1; 0.35 is the adaptation world, docs/adaptation_world.md)."
        },
    )
    world_eval_size: int | None = field(
        default=None,
        metadata={"help": "The embedded world only: images in each test and OOD split (default 1000)."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "data_dir passed to datasets.load_dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to fine-tune on."})
    eval_splits: list[str] = field(default_factory=list, metadata={"help": "Splits to evaluate (ID first)."})
    ood_splits: list[str] = field(default_factory=list, metadata={"help": "Which eval splits are OOD (averaged)."})
    image_column: str = field(default="image", metadata={"help": "Image column name."})
    label_column: str = field(default="label", metadata={"help": "Label column name."})
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Train on this many images of the train split (debugging): a sample seeded by --seed, spread "
            "evenly over the classes."
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Score this many images of each eval split: a sample seeded by --seed, spread over classes."
        },
    )
    evaluate_zero_shot: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the starting model (CLIP's zero-shot classifier) on --eval_splits before fine-tuning; "
            "'--evaluate_zero_shot false' (or --no_evaluate_zero_shot) skips that evaluation."
        },
    )

    def __post_init__(self):
        check_max_samples("--max_train_samples", self.max_train_samples)
        check_max_samples("--max_eval_samples", self.max_eval_samples)
        if isinstance(self.eval_splits, str) or isinstance(self.ood_splits, str):
            raise ValueError("eval_splits and ood_splits are lists of split names, e.g. eval_splits=['test']")
        check_split_names(self.eval_splits, "--eval_splits")
        check_split_names(self.ood_splits, "--ood_splits")
        not_evaluated = [split for split in self.ood_splits if split not in self.eval_splits]
        if not_evaluated:
            raise ValueError(
                f"ood_splits {not_evaluated} are not among eval_splits {self.eval_splits}; add them to --eval_splits "
                "or remove them from --ood_splits (a config's ood_splits stay in force unless --ood_splits is given)"
            )


@dataclass
class ModelArguments:
    """The model recipes/finetune.py starts from, its head's class names and templates, and its teacher."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "CLIP, MetaCLIP 2, SigLIP or fixed-resolution SigLIP 2 checkpoint (Hub id or folder; its zero-shot"
            " head is built on the fly) or a saved hf_cfft classifier folder. Default: the tiny CLIP shipped with "
            "hf_cfft for the embedded world."
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "'imagenet', a text file with one class name per line, or empty: the dataset's ClassLabel."},
    )
    templates: str = field(
        default="simple",
        metadata={"help": "Prompt templates: 'openai_imagenet', 'simple', 'world', or a text file, one per line."},
    )
    teacher_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Distil from this saved classifier (e.g. a WiSE-FT model) instead of the pre-trained starting "
            "point. It must have the same classes."
        },
    )


@dataclass
class FinetuneArguments:
    """What recipes/finetune.py does beyond the one training run."""

    compare_with_vanilla: bool = field(
        default=False,
        metadata={
            "help": "Also train vanilla fine-tuning (distill_weight 0, no masks; same data, steps and seed) in the "
            "same job and add its row to the results table, so the OOD accuracy the method keeps is visible. The "
            "vanilla model is evaluated, not saved. On in the embedded world's config."
        },
    )


@dataclass
class PostHocArguments:
    """The flags every recipe that scores or builds models without training shares (zero_shot, wise_ft, soup)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Where the results (and the models the recipe makes) are written. Required."}
    )
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    seed: int = field(default=0, metadata={"help": "Seed of the embedded world's splits (as in finetune)."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ...; default: cuda when available."})

    def __post_init__(self):
        check_batch_size("--per_device_eval_batch_size", self.per_device_eval_batch_size)


def check_split_names(splits: list[str], flag: str, *, id_split: str | None = None) -> None:
    """Refuse a split named twice (it would count twice in the OOD average) or the ID split among the OOD splits."""
    repeated = sorted({name for name in splits if splits.count(name) > 1})
    if repeated:
        raise ValueError(f"{flag} names {', '.join(map(repr, repeated))} more than once; name each split once")
    if id_split is not None and id_split in splits:
        raise ValueError(
            f"{flag} {splits} holds the in-distribution split {id_split!r}: its accuracy would count as OOD. Remove "
            "it from the OOD splits"
        )


def check_batch_size(flag: str, value: int) -> None:
    """Refuse a batch of fewer than one image when the flags are read, not at the first forward pass."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} {value!r} must be a whole number >= 1 (images per forward pass)")


CONFIG_HELP = (
    "A YAML file of flag values (keys = flag names). Flags given on the command line override it. Relative paths in "
    "it are read relative to the working directory, not to the file."
)


def train_data_source(data_args: DataArguments) -> dict:
    """The run manifest's "source": the arguments that pick the train rows (`hf_cfft.training.run_manifest`)."""
    fields = ("dataset_name", "dataset_config", "data_dir", "train_split", "max_train_samples",
              "world_train_correlation", "world_object_contrast")  # fmt: skip
    return {name: getattr(data_args, name) for name in fields if getattr(data_args, name) is not None}


def _config_file_in(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--config`` file or None, argv without it); ``--config=FILE`` works too."""
    for at, arg in enumerate(argv):
        if arg == "--config":
            if at + 1 >= len(argv) or argv[at + 1].startswith("--"):
                raise ValueError("--config needs a YAML file path, e.g. --config recipes/configs/world.yaml")
            return argv[at + 1], argv[:at] + argv[at + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:at] + argv[at + 1 :]
    return None, list(argv)


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value given to ``flag`` (``--flag X`` or ``--flag=X``; the last one wins), or None."""
    value = None
    for at, arg in enumerate(argv):
        if arg == flag and at + 1 < len(argv):
            value = argv[at + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _expects_list(annotation) -> bool:
    """A list type, or a union of list types and None (``report_to: str | list[str]`` takes a string too)."""
    if typing.get_origin(annotation) is list or annotation is list:
        return True
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return bool(options) and all(_expects_list(arg) for arg in options)


def read_config(
    config_file: str, dataclass_types: Iterable[type], *, also_known: Iterable[str] = (), config_keys=None
) -> dict:
    """The YAML ``config_file`` as flag defaults for ``dataclass_types``, checked key by key.

    A key no dataclass has (nor ``also_known``: keys that other recipes read from the same file) is refused with its
    name and the closest known ones; a scalar where a list is expected (``eval_splits: test_id``) is refused with the
    list form. ``config_keys`` limits which keys are taken (the rest are known but ignored).
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"config file {config_file!r} does not exist (relative paths are read from the working directory "
            f"{os.getcwd()}); pass an existing YAML file, e.g. --config recipes/configs/world.yaml"
        )
    with open(config_file) as f:
        text = f.read()
    try:
        config = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as error:
        raise ValueError(yaml_error_message(config_file, text, error)) from None
    if not isinstance(config, dict):
        raise ValueError(f"config file {config_file} must hold 'key: value' lines, got a {type(config).__name__}")
    hints = {}
    for cls in dataclass_types:
        hints.update({f.name: typing.get_type_hints(cls).get(f.name) for f in fields(cls)})
    known = set(hints) | set(also_known)
    unknown = [key for key in config if key not in known]
    if unknown:
        hints_text = "; ".join(
            f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
            for key in unknown
            for close in [difflib.get_close_matches(key, sorted(known), n=2)]
        )
        raise ValueError(
            f"config file {config_file} has unknown key(s) {hints_text}; every key must be a flag of this recipe "
            "(see --help). Fix the spelling or remove the key"
        )
    if config_keys is not None:
        config = {key: value for key, value in config.items() if key in set(config_keys) and key in hints}
    for key, value in config.items():
        if key in hints and _expects_list(hints[key]) and value is not None and not isinstance(value, list):
            raise ValueError(
                f"config file {config_file}: {key} expects a list, got {type(value).__name__} {value!r}; write it "
                f"as a YAML list, e.g. '{key}: [{value}]'"
            )
        if key in hints and value is not None:
            problem = _scalar_problem(key, hints[key], value)
            if problem:
                raise ValueError(f"config file {config_file}, line {lines.get(key, '?')}: {problem}")
    return config


def _key_lines(text: str) -> dict[str, int]:
    """The line (1-based) of each top-level key of a YAML mapping."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def yaml_error_message(config_file: str, text: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f", line {mark.line + 1}" if mark is not None else ""
    line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if "\t" in line or "tab" in str(problem):
        return (
            f"config file {config_file}{where} holds a tab ({line.strip()!r}): YAML indents with spaces only. Replace "
            "the tab with spaces"
        )
    return f"config file {config_file}{where} is not valid YAML ({problem}): {line.strip()!r}; fix that line"


def _scalar_options(annotation) -> set[type]:
    """The scalar types a field takes (bool, int, float, str; an Enum counts as str), or empty when it takes any other
    type too (a dict, a list, ...): only fields of scalars alone are checked."""
    import enum
    import types

    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    found: set[type] = set()
    for option in typing.get_args(annotation) if union else (annotation,):
        if option in (bool, int, float, str):
            found.add(option)
        elif isinstance(option, type) and issubclass(option, enum.Enum):
            found.add(str)
        elif option is not type(None):
            return set()
    return found


# Text fields that also take a YAML boolean (``resume_from_checkpoint: true`` means "auto").
_YAML_BOOLEANS_TAKEN = frozenset({"resume_from_checkpoint"})


def _scalar_problem(key: str, annotation, value) -> str | None:
    """Why ``value`` from a YAML cannot be the ``key`` field's value (None when it can): the traps YAML sets.

    An unquoted ``no`` / ``off`` / ``yes`` is read by YAML as a boolean (``save_strategy: no`` would become False),
    a list where one number goes, and a fraction where a whole number goes.
    """
    options = _scalar_options(annotation)
    if key in _YAML_BOOLEANS_TAKEN:
        options = options | {bool}
    if not options:
        return None
    if isinstance(value, (list, dict)):
        kind = "a list" if isinstance(value, list) else "a mapping"
        return f"{key} takes one value, got {kind} {value!r}; write one value, e.g. '{key}: {_example(value)}'"
    if isinstance(value, bool) and bool not in options:
        word = "no" if value is False else "yes"
        return (
            f"{key}: {word} is read by YAML as the boolean {value} (unquoted no, off, yes and on are booleans), but "
            f"{key} takes {'text' if str in options else 'a number'}; quote it: {key}: '{word}'"
        )
    if isinstance(value, float) and int in options and not options & {float, str}:
        return f"{key} must be a whole number, got {value!r}; e.g. '{key}: {max(1, int(value))}'"
    return None


def _example(value) -> str:
    if isinstance(value, list) and value:
        return str(value[0])
    return "..."


def parse_with_config(
    dataclass_types: tuple,
    argv: list[str],
    *,
    default_config: str | None = None,
    config_keys: Iterable[str] | None = None,
    default_config_help: str | None = None,
) -> tuple:
    """Parse ``argv`` into ``dataclass_types``: CLI flags override the YAML in force.

    The YAML in force is the one given with ``--config FILE``, else ``default_config`` (None: only the dataclass
    defaults). ``config_keys`` limits which YAML keys are taken (the post-hoc recipes read the data and model keys of
    a fine-tuning YAML); with it, keys that fine-tuning knows are accepted and ignored, any other key is refused.
    ``default_config_help`` ends the help of ``--config`` (say which file is the default, and when).
    """
    refuse_a_lone_launch()
    parser = HfArgumentParser(dataclass_types)
    _group_the_help(parser, dataclass_types, trains=config_keys is None)
    parser.add_argument(
        "--config", metavar="FILE", default=None, help=CONFIG_HELP + " " + (default_config_help or "Default: none.")
    )
    if "-h" in argv or "--help" in argv:
        parser.parse_args(argv)  # prints the help (with --config) and exits
    config_file, argv = _config_file_in(argv)
    config_file = config_file if config_file is not None else default_config
    if config_file is not None:
        also_known, keys = (), None
        if config_keys is not None:
            also_known, keys = _FINETUNE_KEYS(), set(config_keys) | {f.name for f in fields(DataArguments)}
        config = read_config(config_file, dataclass_types, also_known=also_known, config_keys=keys)
        parser.set_defaults(**config)
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False, return_remaining_strings=True)
    *outputs, remaining = parsed
    # The --config entry of the namespace comes back as its own (last) namespace.
    outputs = [out for out in outputs if is_dataclass(out)]
    if remaining:
        raise ValueError(f"unknown flag(s) {remaining}; see --help for the flags of this recipe")
    return tuple(outputs)


# DataArguments fields that only a training recipe reads; the post-hoc recipes do not list them in --help.
_TRAIN_ONLY_FLAGS = ("world_train_correlation", "max_train_samples", "evaluate_zero_shot")


def _group_the_help(parser: HfArgumentParser, dataclass_types: tuple, *, trains: bool) -> None:
    """--help in groups, the method's knobs first: CfftConfig's own fields, then model and data, then the rest.

    HfArgumentParser lists every flag in one group, the 600-odd TrainingArguments flags before the method's.
    """
    from ..config import CfftConfig

    own = {f.name for f in fields(CfftConfig)} - {f.name for f in fields(TrainingArguments)}
    recipe_fields = {f.name for cls in dataclass_types if cls is not CfftConfig for f in fields(cls)}
    groups = []
    if CfftConfig in dataclass_types:
        groups.append((parser.add_argument_group("counterfactual fine-tuning: the method's knobs"), own))
    groups.append((parser.add_argument_group("model, data and what this recipe does"), recipe_fields))
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"The same as --{action.dest} false."
    for group, names in groups:
        for action in list(parser._optionals._group_actions):
            if action.dest in names:
                parser._optionals._group_actions.remove(action)
                group._group_actions.append(action)
                if not trains and action.dest in _TRAIN_ONLY_FLAGS:
                    action.help = argparse.SUPPRESS
    if CfftConfig in dataclass_types:
        parser._optionals.title = "training: transformers.TrainingArguments"
    # argparse prints groups in order: the new ones before the TrainingArguments flags.
    parser._action_groups = [parser._action_groups[0], *parser._action_groups[2:], parser._action_groups[1]]


def _FINETUNE_KEYS() -> set[str]:
    """Every key a fine-tuning YAML may hold (recipes/finetune.py's dataclasses)."""
    from ..config import CfftConfig

    return {f.name for cls in (ModelArguments, DataArguments, CfftConfig, FinetuneArguments) for f in fields(cls)}


def default_model(model_name_or_path: str | None, dataset_name: str, flag: str = "--model_name_or_path") -> str:
    """``model_name_or_path``, or the tiny CLIP shipped for the embedded world when none is given there.

    ``flag`` names the recipe's option in the error raised outside the world.
    """
    if model_name_or_path is not None:
        check_model_source(model_name_or_path, flag)
        return model_name_or_path
    if dataset_name != WORLD:
        raise ValueError(f"{flag} is required outside the embedded world (e.g. openai/clip-vit-base-patch32)")
    from ..world import world_clip_path

    return str(world_clip_path())


# Errors with a message written for the user (the cause and the fix): no traceback needed.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, LostProcessError)


def run_recipe(main: Callable[[], object]) -> None:
    """Run a recipe's ``main``: an error the user caused prints one message and exits with status 2.

    Under ``accelerate launch`` the message is printed once for all the processes that fail with it, and the launcher
    is stopped after it (`hf_cfft.cli.launch.stop_the_launcher`: exit status 143, no launcher traceback).
    ``HF_CFFT_TRACEBACK=1`` shows the traceback instead (for bug reports).
    """
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("HF_CFFT_TRACEBACK"):
            raise
        message = f"error: {user_message(error)}\n(set HF_CFFT_TRACEBACK=1 to see the traceback)"
        if first_to_report(message):
            print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        stop_the_launcher()
        raise SystemExit(2) from None


def user_message(error: BaseException) -> str:
    """The message of ``error``; a DataLoader worker's error (torch re-raises it as ``Caught ValueError in DataLoader
    worker process 0.`` followed by the worker's traceback) gives the worker's own last line, without the traceback."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def load_train_and_eval_splits(data_args: DataArguments, seed: int) -> tuple[Dataset, dict[str, Dataset]]:
    """The ``--train_split`` and ``--eval_splits``, checked, each a seeded sample when ``--max_*_samples`` is given.

    The columns must exist and hold class indices, the train split must hold two classes or more, and every class
    of an eval split must be trained (`hf_cfft.dataset_checks`); ``--max_train_samples`` / ``--max_eval_samples``
    take a sample seeded by ``seed`` and spread over the classes (`hf_cfft.dataset_checks.subset`). The train split
    is never an eval split: its accuracy would be measured on the images the model was trained on.
    """
    if data_args.train_split in data_args.eval_splits:
        raise ValueError(
            f"--train_split {data_args.train_split!r} is also in --eval_splits {data_args.eval_splits}: its accuracy "
            "would be measured on the images the model trains on, not held out. Remove it from --eval_splits, or "
            "train on another split (--train_split)"
        )
    splits = load_image_splits(
        data_args.dataset_name,
        [data_args.train_split, *data_args.eval_splits],
        dataset_config=data_args.dataset_config,
        data_dir=data_args.data_dir,
        world_seed=seed,
        world_train_correlation=data_args.world_train_correlation,
        world_object_contrast=data_args.world_object_contrast,
        world_eval_size=data_args.world_eval_size,
    )
    label = data_args.label_column
    check_columns(splits, image_column=data_args.image_column, label_column=label)
    train = splits.pop(data_args.train_split)
    check_train_classes(train, label, data_args.train_split)
    check_eval_classes_are_trained(train, splits, label, data_args.train_split)
    train = subset(train, data_args.max_train_samples, seed=seed, label_column=label)
    check_train_classes(train, label, f"{data_args.train_split} (--max_train_samples {data_args.max_train_samples})")
    return train, {
        name: subset(split, data_args.max_eval_samples, seed=seed, label_column=label)
        for name, split in splits.items()
    }


def check_eval_classes_are_trained(
    train: Dataset, splits: Mapping[str, Dataset], label_column: str, train_split: str = "train"
) -> None:
    """Refuse an evaluation split with a class that has no train image (``val/unicorn/`` without ``train/unicorn/``).

    An ImageFolder's classes are the union of every split's folders, so such a class would silently become a head
    row that fine-tuning never trains. Datasets with integer labels (no ClassLabel) are compared by label value.
    """
    if label_column not in train.column_names:
        return
    trained = set(train.unique(label_column))
    try:
        names = class_names_of(train, label_column)
    except ValueError:
        names = None
    for split, dataset in splits.items():
        if label_column not in dataset.column_names:
            continue
        untrained = sorted(set(dataset.unique(label_column)) - trained)
        if untrained and untrained[0] < 0:
            raise ValueError(
                f"split {split!r} has label {untrained[0]}: -1 marks an image without a label (e.g. a Hub test split "
                "whose labels are hidden), so its accuracy would be wrong; evaluate on a split with labels"
            )
        if untrained:
            shown = [names[label] if names else label for label in untrained]
            counts = collections.Counter(dataset.select_columns([label_column])[label_column])
            detail = ", ".join(f"{name!r} ({counts[label]} images)" for name, label in zip(shown[:10], untrained))
            detail += ", ..." if len(untrained) > 10 else ""
            raise ValueError(
                f"split {split!r} has class(es) {detail} with no image in the train split {train_split!r}: the head "
                "would keep an untrained row for each. Add train images of them, or remove them from the "
                f"{split!r} split (for an ImageFolder: its <dir>/{split}/<class>/ folder)"
            )


def load_eval_splits(data_args: DataArguments, seed: int) -> dict[str, Dataset]:
    """The ``--eval_splits`` as datasets (empty when none), checked, each a seeded sample of ``--max_eval_samples``."""
    if not data_args.eval_splits:
        return {}
    splits = load_image_splits(
        data_args.dataset_name,
        data_args.eval_splits,
        dataset_config=data_args.dataset_config,
        data_dir=data_args.data_dir,
        world_seed=seed,
        world_object_contrast=data_args.world_object_contrast,
        world_eval_size=data_args.world_eval_size,
    )
    check_columns(splits, image_column=data_args.image_column, label_column=data_args.label_column)
    splits = check_eval_images(splits, data_args.image_column)  # refused by name before any model is scored
    return {
        name: subset(split, data_args.max_eval_samples, seed=seed, label_column=data_args.label_column)
        for name, split in splits.items()
    }


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


def write_results(
    results: Mapping, output_dir: str, data_args: DataArguments, stem: str = "results", row_names=None
) -> str:
    """``<stem>.json`` and ``<stem>.md`` in ``output_dir``; returns the markdown table (accuracies in %).

    ``row_names`` renames rows in the table only (the JSON keeps its keys, e.g. "fine-tuned").
    """
    columns = [*data_args.eval_splits] + (["ood_avg"] if data_args.ood_splits else [])
    shown = {(row_names or {}).get(name, name): values for name, values in results.items()}
    return write_report(output_dir, results, results_table(shown, columns), title="Top-1 accuracy (%)", stem=stem)


def run_label(args) -> str:
    """The method and strength a fine-tuning run's ``args`` train, for its row of the results table."""
    return f"{methods.run_label(args)}, this run"


def resolve_device(name: str | None) -> torch.device:
    """``name``, or CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
