"""`recipes/compare.py`'s machinery: the methods it knows, the grid of runs, and the loop that runs what is missing.

A *cell* is one model to score: a training run of `recipes/finetune.py` (one method, strength and seed), or a
post-hoc model built from trained ones (zero-shot, WiSE-FT at one alpha, a soup). Every finished cell appends a row
(`hf_cfft.evaluation.frontier`) to ``<output_dir>/rows.jsonl``; a cell whose row is there is not run again, so an
interrupted comparison resumes where it stopped. Training runs go through the fine-tuning recipe's ``main`` in this
process, so under ``accelerate launch`` every process trains together; post-hoc cells and writing run on the main
process only.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser

from ..evaluation.frontier import append_row, read_rows, row_key, write_frontier_report

logger = logging.getLogger(__name__)

NO_MASK = ("--mask_kind", "none", "--fill_kind", "none")
KINDS = ("train", "zero_shot", "wise_ft", "uniform_soup", "greedy_soup")
STRENGTHS = ("beta", "alpha", None)


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


_CFFT = ("--mask_kind", "object", "--fill_kind")
METHODS: dict[str, MethodSpec] = {
    "zero_shot": MethodSpec("zero-shot", kind="zero_shot"),
    "ft": MethodSpec("vanilla FT", flags=("--distill_weight", "0", *NO_MASK)),
    "lp": MethodSpec(
        "linear probe", flags=("--linear_probe", "true", "--cam_source", "teacher", "--distill_weight", "0", *NO_MASK)
    ),
    "lp_ft": MethodSpec("LP-FT", flags=("--distill_weight", "0", *NO_MASK), init_from="lp"),
    "ft_fd": MethodSpec("FT+FD", flags=NO_MASK, strength="beta"),
    "ft_kd": MethodSpec("FT+KD", flags=(*NO_MASK, "--distill_target", "logits"), strength="beta"),
    "cfft": MethodSpec("CFFT object/single", flags=(*_CFFT, "single"), strength="beta"),
    "cfft_multi": MethodSpec("CFFT object/multi", flags=(*_CFFT, "multi"), strength="beta"),
    "cfft_nofill": MethodSpec("CFFT object/none", flags=(*_CFFT, "none"), strength="beta"),
    "cfft_random": MethodSpec(
        "CFFT random/single", flags=("--mask_kind", "random", "--fill_kind", "single"), strength="beta"
    ),
    "cfft_context": MethodSpec(
        "CFFT context/single", flags=("--mask_kind", "context", "--fill_kind", "single"), strength="beta"
    ),
    "flyp": MethodSpec("FLYP", flags=("--method", "flyp", "--distill_weight", "0", *NO_MASK)),
    "wise_ft": MethodSpec("WiSE-FT", kind="wise_ft", strength="alpha", source="ft"),
    "uniform_soup": MethodSpec("uniform soup", kind="uniform_soup", source="ft"),
    "greedy_soup": MethodSpec("greedy soup", kind="greedy_soup", source="ft"),
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
    summarize_only: bool = field(default=False, metadata={"help": "Only write the report from the rows so far."})
    device: str | None = field(default=None, metadata={"help": "Device of the post-hoc evaluations (default: cuda)."})


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


def parse_compare_args(argv: Sequence[str]) -> tuple[CompareArguments, dict[str, MethodSpec], list[str]]:
    """(compare's flags, the method registry with --config's own methods, the flags for every fine-tuning run).

    ``--config FILE``: a YAML of compare's keys, ``methods`` (registry keys or full entries with a ``key``), and
    ``finetune_args`` (a mapping of recipes/finetune.py flags); CLI flags override it.
    """
    argv, registry, finetune_args = list(argv), dict(METHODS), []
    parser = HfArgumentParser((CompareArguments,), allow_abbrev=False)  # "--seed" is finetune's, not "--seeds"
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        path, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        config = yaml.safe_load(Path(path).read_text()) or {}
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
    args, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    unknown = [m for m in args.methods if m not in registry]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(registry)}")
    head = ["--config", args.finetune_config] if args.finetune_config else []
    return args, registry, [*head, *finetune_args, *remaining]


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
        name = self.spec.strength or ""
        row = {"method": self.spec.name, "beta": self.strength, "epochs": self.epochs, "seed": self.seed}
        row |= {"strength_name": name} | ({"alpha": self.strength} if name == "alpha" else {})
        return row | extra

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
        grid = {"beta": betas, "alpha": alphas, None: (0.0,)}[spec.strength]
        grid = spec.strengths if spec.strengths is not None else grid
        source = registry[spec.source] if spec.source else None
        own_epochs = _epochs(spec.epochs or (source.epochs if source and source.epochs else None) or epochs)
        run_seeds = ["all"] if spec.kind in ("uniform_soup", "greedy_soup") else list(seeds)
        for strength in dict.fromkeys(float(s) for s in grid):
            cells += [Cell(key, spec, strength, seed, own_epochs) for seed in run_seeds]
    return cells


def run_dirname(cell: Cell) -> str:
    """The run's folder name under runs/ (the harness's: spaces, slashes and bars replaced)."""
    name = cell.id.replace(" ", "_").replace("/", "-").replace("|", "_")
    return name.replace("(", "").replace(")", "").replace(",", "")


# ---- running ----


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@dataclass
class _Context:
    """What the post-hoc cells share: the data, the model to start from, and loaded splits per seed."""

    output_dir: Path
    data_args: object
    model_args: object
    eval_batch_size: int
    device: torch.device
    held_out_split: str | None
    splits: dict = field(default_factory=dict)

    def eval_splits(self, seed: int, extra: Sequence[str] = ()) -> dict:
        from .script_args import load_eval_splits

        if (seed, tuple(extra)) not in self.splits:
            data_args = replace(self.data_args, eval_splits=[*self.data_args.eval_splits, *extra])
            self.splits[(seed, tuple(extra))] = load_eval_splits(data_args, seed)
        return self.splits[(seed, tuple(extra))]

    def evaluate(self, model, seed: int) -> dict[str, float]:
        from ..evaluation import evaluate_splits
        from .script_args import evaluate_kwargs

        splits = self.eval_splits(seed)
        kwargs = evaluate_kwargs(self.data_args, self.eval_batch_size, self.device)
        return evaluate_splits(model.to(self.device).eval(), splits, self.processor, **kwargs)

    @property
    def processor(self):
        from transformers import AutoImageProcessor

        if not hasattr(self, "_processor"):
            self._processor = AutoImageProcessor.from_pretrained(self.model_path)
        return self._processor

    @property
    def model_path(self) -> str:
        from .script_args import default_model

        return default_model(self.model_args.model_name_or_path, self.data_args.dataset_name)

    def zero_shot(self, class_names: Sequence[str]):
        from .. import load_classifier, load_templates

        return load_classifier(
            self.model_path, class_names=list(class_names), templates=load_templates(self.model_args.templates),
            show_progress=False,
        )  # fmt: skip


def _run_post_hoc(cell: Cell, ctx: _Context, run_dir: Callable[[str, float, int | str], Path], cells) -> dict:
    """Build and score a zero-shot, WiSE-FT or soup model; returns its row."""
    from .. import load_classifier
    from ..baselines.greedy_soup import greedy_soup
    from ..baselines.weight_averaging import class_names, uniform_soup, wise_ft
    from ..evaluation import evaluate_splits
    from .script_args import evaluate_kwargs
    from .sources import class_names_for

    started, extra = time.time(), {}
    if cell.spec.kind == "zero_shot":
        first = next(iter(ctx.eval_splits(cell.seed).values()))
        names = class_names_for(ctx.model_args.class_names, first, ctx.data_args.label_column)
        results = ctx.evaluate(ctx.zero_shot(names), cell.seed)
    elif cell.spec.kind == "wise_ft":
        fine_tuned = load_classifier(str(run_dir(cell.spec.source, 0.0, cell.seed)))
        model = wise_ft(ctx.zero_shot(class_names(fine_tuned)).to(fine_tuned.device), fine_tuned, cell.strength)
        results = ctx.evaluate(model, cell.seed)
    else:
        sources = [c for c in cells if c.key == cell.spec.source]
        paths = [str(run_dir(c.key, c.strength, c.seed)) for c in sources]
        models = [load_classifier(path).eval() for path in paths]
        names = [c.id for c in sources]
        if cell.spec.kind == "uniform_soup":
            soup = uniform_soup(models, names=names)
        else:
            held_out = ctx.eval_splits(sources[0].seed, extra=[ctx.held_out_split])[ctx.held_out_split]
            kwargs = evaluate_kwargs(ctx.data_args, ctx.eval_batch_size, ctx.device) | {"ood_splits": ()}

            def score(model) -> float:
                scores = evaluate_splits(model.to(ctx.device), {"held_out": held_out}, ctx.processor, **kwargs)
                return scores["held_out"]

            chosen = greedy_soup(models, score, names=names)
            soup = chosen.model
            extra = {"held_out_split": ctx.held_out_split, "chosen": chosen.chosen, "held_out": chosen.soup_score}
        extra["ingredients"] = names
        # The first seed's splits: on the world the seed also draws the test sets.
        results = ctx.evaluate(soup, sources[0].seed)
    return cell.row(results=results, seconds=round(time.time() - started, 1), **extra)


def run_compare(
    args: CompareArguments,
    registry: Mapping[str, MethodSpec],
    finetune_argv: Sequence[str],
    *,
    train: Callable[[list[str]], dict],
    parse: Callable[[list[str]], tuple],
) -> dict[str, str]:
    """Run every missing cell, append its row, then write the report; returns the report's paths (main process).

    ``train`` / ``parse``: recipes/finetune.py's ``main`` and ``parse_args``; ``finetune_argv`` the flags every
    training run gets (the method's own, the strength, seed and output folder are added after them).
    """
    output_dir = Path(args.output_dir)
    rows_path = output_dir / "rows.jsonl"
    main_process = _rank() == 0
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    model_args, data_args, base = parse([*finetune_argv, "--output_dir", str(output_dir / "runs")])
    methods = with_dependencies(args.methods, registry)
    greedy = any(registry[m].kind == "greedy_soup" for m in methods)
    id_split = check_compare_data(data_args, args.held_out_split, greedy=greedy)
    cells = plan_cells(
        args.methods, registry, betas=args.betas, alphas=args.alphas, seeds=args.seeds, epochs=run_length(base)
    )
    by_id = {c.id: c for c in cells}

    def run_dir(key: str, strength: float, seed) -> Path:
        cell = next(c for c in cells if c.key == key and c.strength == strength and c.seed == seed)
        return output_dir / "runs" / run_dirname(cell)

    dependents: dict[str, list[str]] = {}
    for cell in cells:
        for dep in (cell.spec.source, cell.spec.init_from):
            if dep:
                needed = [c for c in cells if c.key == dep and (cell.seed == "all" or c.seed == cell.seed)]
                for other in needed:
                    dependents.setdefault(other.id, []).append(cell.id)

    done = {row_key(r) for r in read_rows(output_dir)}
    if not args.summarize_only:
        ctx = _Context(output_dir, data_args, model_args, base.per_device_eval_batch_size,
                       torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
                       args.held_out_split)  # fmt: skip
        todo = [c for c in cells if c.id not in done or _needed_again(c, done, dependents, run_dir)]
        if main_process:
            print(f"compare: {len(cells)} cells, {len(todo)} to run; rows in {rows_path}", flush=True)
        for cell in todo:
            if cell.spec.kind == "train":
                row = _run_training(cell, finetune_argv, run_dir, train, main_process)
            elif main_process:
                row = _run_post_hoc(cell, ctx, run_dir, cells)
            else:
                continue
            if main_process:
                if cell.id not in done:
                    append_row(rows_path, row)
                    done.add(cell.id)
                r = row["results"]
                print(f"[{cell.id}] {row['seconds']:.0f} s: {id_split} {r.get(id_split, float('nan')):.1f}, "
                      f"ood_avg {r.get('ood_avg', float('nan')):.1f}", flush=True)  # fmt: skip
                if not args.keep_models:
                    _delete_unneeded(cells, by_id, done, dependents, run_dir)
        _barrier()
    if not main_process:
        return {}
    rows = read_rows(output_dir)
    missing = [c.id for c in cells if c.id not in {row_key(r) for r in rows}]
    header = (
        f"Compared with `recipes/compare.py` on {data_args.dataset_name} ({platform.machine()}, "
        f"{datetime.date.today()}): {len(cells) - len(missing)} of {len(cells)} planned cells have rows"
        + (f"; not run yet: {', '.join(missing)}" if missing else "")
        + ".\n\n"
    )
    order = [registry[m].name for m in methods]
    return write_frontier_report(output_dir, rows, id_split=id_split, ood_splits=data_args.ood_splits, header=header,
                                 order=order)  # fmt: skip


def check_compare_data(data_args, held_out_split: str | None, *, greedy: bool) -> str:
    """The ID split (the first eval split that is not OOD); refuses data a frontier cannot be drawn from."""
    from ..baselines.greedy_soup import check_held_out_split

    eval_splits, ood = list(data_args.eval_splits), list(data_args.ood_splits)
    if not ood:
        raise ValueError("--ood_splits is empty: a comparison draws ID against OOD accuracy; name the OOD splits")
    stray = [s for s in ood if s not in eval_splits]
    if stray:
        raise ValueError(f"--ood_splits {stray} are not among --eval_splits {eval_splits}; list them in both")
    ids = [s for s in eval_splits if s not in ood]
    if not ids:
        raise ValueError(f"every eval split {eval_splits} is OOD; put the ID test split first in --eval_splits")
    if greedy:
        check_held_out_split(held_out_split, ood, eval_splits)
    return ids[0]


def _needed_again(cell: Cell, done: set, dependents: Mapping, run_dir) -> bool:
    """A finished training run whose model is gone but a cell still to run needs it (deleted, or from the harness)."""
    if cell.spec.kind != "train":
        return False
    pending = [d for d in dependents.get(cell.id, []) if d not in done]
    return bool(pending) and not (run_dir(cell.key, cell.strength, cell.seed) / "config.json").is_file()


def _run_training(cell: Cell, finetune_argv: Sequence[str], run_dir, train, main_process: bool) -> dict:
    out = run_dir(cell.key, cell.strength, cell.seed)
    argv = ["--report_to", "none", "--save_strategy", "no", *finetune_argv, *cell.spec.flags]
    if cell.spec.strength == "beta":
        argv += ["--distill_weight", f"{cell.strength:g}"]
    if cell.spec.epochs is not None:
        argv += ["--num_train_epochs", f"{cell.spec.epochs:g}"]
    if cell.spec.init_from:
        argv += ["--model_name_or_path", str(run_dir(cell.spec.init_from, 0.0, cell.seed))]
    argv += ["--seed", str(cell.seed), "--output_dir", str(out), "--evaluate_zero_shot", "false"]
    if main_process and out.exists():
        shutil.rmtree(out)  # a run that did not finish: start it again
    _barrier()
    started = time.time()
    results = train(argv)
    return cell.row(results=results.get("fine-tuned", {}), seconds=round(time.time() - started, 1))


def _delete_unneeded(cells, by_id, done, dependents, run_dir) -> None:
    for cell in cells:
        if cell.spec.kind == "train" and cell.id in done and all(d in done for d in dependents.get(cell.id, [])):
            shutil.rmtree(run_dir(cell.key, cell.strength, cell.seed), ignore_errors=True)
