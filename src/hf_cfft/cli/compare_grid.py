"""What `recipes/compare.py` compares: the methods it knows, its own flags, and the grid of cells they make.

A *cell* is one model to score: a training run of `recipes/finetune.py` (one method, strength and seed), or a
post-hoc model built from trained ones (zero-shot, WiSE-FT at one alpha, a soup). `hf_cfft.cli.compare` runs them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .. import methods
from ..evaluation.frontier import row_key
from ..methods import KINDS, STRENGTHS


@dataclass(frozen=True)
class MethodSpec:
    """One method of the comparison: a row name, how its models are made, and what its strength is.

    kind: 'train' (a run of recipes/finetune.py with ``flags``), 'zero_shot', 'wise_ft' (of ``source``'s run per
    seed, one model per alpha), 'uniform_soup' / 'greedy_soup' (of every run of ``source``). strength: 'beta' (one
    run per --betas value, passed as --distill_weight), 'alpha' (WiSE-FT's --alphas) or None (one model).
    init_from: a train method whose model of the same seed this one starts from (LP-FT from the probe).
    """

    name: str
    kind: str = "train"
    flags: tuple[str, ...] = ()
    strength: str | None = None
    strengths: tuple[float, ...] | None = None
    source: str | None = None
    init_from: str | None = None
    epochs: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.strength not in STRENGTHS:
            raise ValueError(f"method {self.name!r}: strength={self.strength!r} is not 'beta', 'alpha' or empty")
        if self.kind in ("wise_ft", "uniform_soup", "greedy_soup") and not self.source:
            raise ValueError(f"method {self.name!r} ({self.kind}) needs a source: the trained method it averages")


# hf_cfft's methods (hf_cfft.methods), as the comparison runs them: a cell's flags are the method's settings.
METHODS: dict[str, MethodSpec] = {
    key: MethodSpec(
        method.name,
        kind=method.kind,
        flags=method.flags,
        strength=method.strength,
        source=method.source,
        init_from=method.init_from,
    )  # fmt: skip
    for key, method in methods.METHODS.items()
}


@dataclass
class CompareArguments:
    """recipes/compare.py's own flags; every other flag goes to recipes/finetune.py (each training run)."""

    output_dir: str = field(default="outputs/compare", metadata={"help": "Rows, runs, tables and the plot go here."})
    methods: list[str] = field(
        default_factory=lambda: ["zero_shot", "ft", "wise_ft", "ft_fd", "cfft"],
        metadata={"help": f"Methods to compare, in order: {', '.join(METHODS)} (or keys defined in --config)."},
    )
    betas: list[float] = field(
        default_factory=lambda: [1.0, 3.0, 10.0],
        metadata={"help": "Strengths of the beta methods (FT+FD, FT+KD, CFFT): the distillation weight."},
    )
    alphas: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "WiSE-FT's weights of the fine-tuned model (0 = zero-shot, 1 = fine-tuned)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Every run is repeated per seed."})
    held_out_split: str | None = field(
        default=None,
        metadata={"help": "ID validation split that picks the greedy soup's ingredients (not an OOD or test split)."},
    )
    finetune_config: str | None = field(
        default=None, metadata={"help": "recipes/finetune.py YAML every run starts from (data, model, optimisation)."}
    )
    keep_models: bool = field(
        default=True, metadata={"help": "Keep every trained model; false deletes each once nothing still needs it."}
    )
    reference_method: list[str] | None = field(
        default=None,
        metadata={
            "help": "Method key(s) every other method is compared with, paired by seed at matched ID (mean "
            "difference, 95 %% interval, verdict; a plot per reference). The summary's verdicts use the first. "
            "Default: WiSE-FT when compared, else vanilla FT (ft)."
        },
    )
    oracle_method: str | None = field(
        default=None,
        metadata={
            "help": "A method (key) whose OOD gain over zero-shot is the yardstick, e.g. an oracle trained without "
            "the shortcut: the report gives every other point's share of that gain."
        },
    )
    summarize_only: bool = field(default=False, metadata={"help": "Only write the report from the rows so far."})
    shard: str = field(
        default="0/1",
        metadata={
            "help": "i/n: this process trains every n-th training cell of the grid, starting at the i-th, and writes "
            "rows-<i>of<n>.jsonl (run n processes with i = 0..n-1; then one unsharded run for the cells left)."
        },
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device of the cells compare scores itself (zero-shot, WiSE-FT, soups); default: cuda when "
            "available, else cpu. The training runs take finetune's flags (e.g. --use_cpu true)."
        },
    )


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), with 0 <= i < n."""
    try:
        index, count = (int(x) for x in str(value).split("/"))
    except ValueError:
        index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {value!r} is not i/n with 0 <= i < n (e.g. --shard 0/2 and --shard 1/2)")
    return index, count


def shard_owners(cells: Sequence[Cell], count: int) -> dict[str, int | None]:
    """Which of ``count`` shards runs each cell (None: left to an unsharded run).

    Training cells are dealt in turn over the whole plan, so a restarted shard gets the same cells whatever has
    finished; a run that starts from another's model (LP-FT from its probe) goes where that model is trained. A
    post-hoc cell goes to the shard that trains all its models (zero-shot, which needs none, to shard 0); one whose
    models span shards (a soup over seeds) gets None.
    """
    train = [c for c in cells if c.spec.kind == "train"]
    owners: dict[str, int | None] = {}
    dealt = 0
    for cell in train:
        if cell.spec.init_from:
            start = next(c for c in train if c.key == cell.spec.init_from and c.seed == cell.seed)
            owners[cell.id] = owners[start.id]
        else:
            owners[cell.id], dealt = dealt % count, dealt + 1
    for cell in cells:
        if cell.spec.kind != "train":
            needed = {owners[c.id] for c in train if c.key == cell.spec.source and cell.seed in ("all", c.seed)}
            owners[cell.id] = 0 if not needed else needed.pop() if len(needed) == 1 else None
    return owners


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int]) -> set[str]:
    """The ids of the cells shard ``(i, n)`` runs (`shard_owners`)."""
    return {cell for cell, owner in shard_owners(cells, shard[1]).items() if owner == shard[0]}


def _method_from_yaml(entry: Mapping) -> tuple[str, MethodSpec]:
    known = {f.name for f in fields(MethodSpec)}
    unknown = sorted(set(entry) - known - {"key"})
    if unknown or "key" not in entry or "name" not in entry:
        raise ValueError(
            f"method entry {dict(entry)} needs 'key' and 'name' and takes only {sorted(known)}; unknown: {unknown}"
        )
    values = {k: v for k, v in entry.items() if k in known}
    values["flags"] = tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in values.get("flags", ()))
    if values.get("strengths") is not None:
        values["strengths"] = tuple(float(v) for v in values["strengths"])
    return str(entry["key"]), MethodSpec(**values)


def _flags(mapping: Mapping) -> list[str]:
    out = []
    for key, value in mapping.items():
        values = value if isinstance(value, list) else [value]
        out += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return out


COMPARE_DESCRIPTION = (
    "Run several robust fine-tuning methods at a few strengths and seeds and draw the ID/OOD trade-off. The flags "
    "below are compare's own; every other flag (e.g. --model_name_or_path, --dataset_name, --learning_rate, "
    "--max_steps, --use_cpu) passes through to every recipes/finetune.py run: see python recipes/finetune.py --help."
)
COMPARE_CONFIG_HELP = (
    "A YAML of compare's own keys (output_dir, betas, seeds, ...), 'methods' (method keys, or full entries with a "
    "'key' that define new methods) and 'finetune_args' (a mapping of finetune flags every run gets); flags given on "
    "the command line override it. E.g. recipes/configs/compare/world_frontier.yaml."
)


def parse_compare_args(argv: Sequence[str]) -> tuple[CompareArguments, dict[str, MethodSpec], list[str]]:
    """(compare's flags, the method registry with --config's own methods, the flags for every fine-tuning run).

    ``--config FILE``: a YAML of compare's keys, ``methods`` (registry keys or full entries with a ``key``), and
    ``finetune_args`` (a mapping of recipes/finetune.py flags); CLI flags override it.
    """
    argv, registry, finetune_args = list(argv), dict(METHODS), []
    parser = HfArgumentParser((CompareArguments,), allow_abbrev=False, description=COMPARE_DESCRIPTION)
    # ("--seed" is finetune's, not an abbreviation of "--seeds".) --config is read below; listed here for --help.
    parser.add_argument("--config", metavar="FILE", default=None, help=COMPARE_CONFIG_HELP)
    for action in parser._actions:
        if action.dest == "keep_models" and "--no_keep_models" in action.option_strings:
            action.help = "The same as --keep_models false: delete each trained model once nothing still needs it."
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        path, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        text = Path(path).read_text()
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            from .script_args import yaml_error_message

            raise ValueError(yaml_error_message(path, text, error)) from None
        names = []
        for entry in config.pop("methods", []) or []:
            if isinstance(entry, Mapping):
                key, spec = _method_from_yaml(entry)
                registry[key] = spec
                names.append(key)
            else:
                names.append(str(entry))
        if names:
            config["methods"] = names
        finetune_args = _flags(config.pop("finetune_args", {}) or {})
        own = sorted(f.name for f in fields(CompareArguments))
        unknown = sorted(set(config) - set(own))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {path}; it takes {own}, methods and finetune_args")
        parser.set_defaults(**config)
    *outputs, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    args = outputs[0]
    parse_shard(args.shard)
    unknown = [m for m in args.methods if m not in registry]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(registry)}")
    check_strengths(args.methods, registry, betas=args.betas, alphas=args.alphas)
    if isinstance(args.reference_method, str):  # a YAML string: one reference
        args.reference_method = [args.reference_method]
    named = (("--reference_method", args.reference_method or []), ("--oracle_method", [args.oracle_method]))
    for flag, names in named:
        stray = [n for n in names if n is not None and n not in args.methods]
        if stray:
            raise ValueError(f"{flag} {' '.join(stray)!s} is not among --methods {args.methods}; add it there")
    if args.reference_method is None:
        args.reference_method = default_references(args.methods, registry)
    head = ["--config", args.finetune_config] if args.finetune_config else []
    return args, registry, [*head, *finetune_args, *remaining]


def default_references(methods: Sequence[str], registry: Mapping[str, MethodSpec]) -> list[str]:
    """The paired comparisons' reference when none is named: WiSE-FT when compared, else vanilla FT, else none."""
    wise = [m for m in methods if registry[m].kind == "wise_ft"]
    if wise:
        return wise[:1]
    return ["ft"] if "ft" in methods else []


# ---- the grid ----


@dataclass(frozen=True)
class Cell:
    """One model to score: a method (registry key + spec) at one strength and seed ('all' for a soup)."""

    key: str
    spec: MethodSpec
    strength: float
    seed: int | str
    epochs: float

    def row(self, **extra) -> dict:
        row = {"method": self.spec.name, "strength": self.strength, "strength_name": self.spec.strength or ""}
        return row | {"epochs": self.epochs, "seed": self.seed} | extra

    @property
    def id(self) -> str:
        return row_key(self.row())


def with_dependencies(methods: Sequence[str], registry: Mapping[str, MethodSpec]) -> list[str]:
    """``methods`` with the trained methods they build on (WiSE-FT's and soups' source, LP-FT's probe) put first."""
    out: list[str] = []

    def add(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in out:
            return
        if name in chain:
            raise ValueError(f"methods depend on each other in a cycle: {' -> '.join((*chain, name))}")
        if name not in registry:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(registry)}")
        spec = registry[name]
        for dep in (spec.source, spec.init_from):
            if dep:
                add(dep, (*chain, name))
        out.append(name)

    for name in methods:
        add(name)
    return out


def _epochs(value: float | str) -> float | int | str:
    if isinstance(value, str):
        return value
    return int(value) if float(value).is_integer() else float(value)


def run_length(args) -> float | int | str:
    """The rows' ``epochs``: ``num_train_epochs``, or "<n> steps" when ``max_steps`` decides the length."""
    return f"{args.max_steps} steps" if args.max_steps > 0 else _epochs(args.num_train_epochs)


def _strengths(spec: MethodSpec, betas: Sequence[float], alphas: Sequence[float]) -> Sequence[float]:
    """The strengths a method's cells run at: its own (a config's ``strengths``), else the grid's of its kind."""
    if spec.strengths is not None:
        return spec.strengths
    return {"beta": betas, "alpha": alphas, None: (0.0,)}[spec.strength]


def check_strengths(
    methods: Sequence[str], registry: Mapping[str, MethodSpec], *, betas: Sequence[float], alphas: Sequence[float]
) -> None:
    """Refuse a beta that is not a finite number >= 0, or an alpha outside [0, 1], before any cell runs."""
    for key in with_dependencies(methods, registry):
        spec = registry[key]
        for value in map(float, _strengths(spec, betas, alphas)):
            if spec.strength == "beta" and not 0 <= value < math.inf:
                raise ValueError(
                    f"beta {value:g} of {spec.name} must be a finite number >= 0 (0 = vanilla fine-tuning); fix "
                    "--betas (or the method's strengths in --config)"
                )
            if spec.strength == "alpha" and not 0 <= value <= 1:
                raise ValueError(
                    f"alpha {value:g} of {spec.name} must lie in [0, 1] (0 = zero-shot, 1 = fine-tuned); fix --alphas "
                    "(or the method's strengths in --config)"
                )


def plan_cells(
    methods: Sequence[str],
    registry: Mapping[str, MethodSpec],
    *,
    betas: Sequence[float],
    alphas: Sequence[float],
    seeds: Sequence[int],
    epochs: float,
) -> list[Cell]:
    """Every cell, in run order: method by method (dependencies first), strength by strength, seed by seed."""
    cells = []
    for key in with_dependencies(methods, registry):
        spec = registry[key]
        grid = _strengths(spec, betas, alphas)
        source = registry[spec.source] if spec.source else None
        own_epochs = _epochs(spec.epochs or (source.epochs if source and source.epochs else None) or epochs)
        run_seeds = ["all"] if spec.kind in ("uniform_soup", "greedy_soup") else list(seeds)
        for strength in dict.fromkeys(float(s) for s in grid):
            cells += [Cell(key, spec, strength, seed, own_epochs) for seed in run_seeds]
    return cells


def run_dirname(cell: Cell) -> str:
    """The run's folder name under runs/ (its id with spaces, slashes and bars replaced)."""
    name = cell.id.replace(" ", "_").replace("/", "-").replace("|", "_")
    return name.replace("(", "").replace(")", "").replace(",", "")
