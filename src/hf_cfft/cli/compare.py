"""`recipes/compare.py`'s loop: run every cell of the grid that has no row yet, append its row, write the report.

Every finished cell (`hf_cfft.cli.compare_grid`) appends a row (`hf_cfft.evaluation.frontier`) to
``<output_dir>/rows.jsonl``; a cell whose row is there is not run again, so an interrupted comparison resumes where it
stopped. Training runs go through the fine-tuning recipe's ``main`` in this process, so under ``accelerate launch``
every process trains together; post-hoc cells and writing run on the main process only.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..evaluation.frontier import append_row, drop_cut_off_row, read_rows, row_key, write_frontier_report
from .compare_config import cell_configuration, check_rows_configuration, shared_configuration
from .compare_grid import (
    METHODS,
    Cell,
    CompareArguments,
    MethodSpec,
    parse_compare_args,
    parse_shard,
    plan_cells,
    run_dirname,
    run_length,
    shard_owners,
    with_dependencies,
)

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "CompareArguments",
    "MethodSpec",
    "check_compare_data",
    "parse_compare_args",
    "plan_cells",
    "run_compare",
    "with_dependencies",
]


# ---- running ----


def _now() -> str:
    """When a row was written (UTC, to the second): rows show when each cell ran, e.g. after a criterion was fixed."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    return cell.row(results=results, seconds=round(time.time() - started, 1), finished=_now(), **extra)


def run_compare(
    args: CompareArguments,
    registry: Mapping[str, MethodSpec],
    finetune_argv: Sequence[str],
    *,
    train: Callable[[list[str]], dict],
    parse: Callable[[list[str]], tuple],
    report: Callable[[str], None] = logger.info,
) -> dict[str, str]:
    """Run every missing cell, append its row, then write the report; returns the report's paths (main process).

    ``train`` / ``parse``: `hf_cfft.cli.finetune.finetune` and `parse_finetune_args` (with the recipes' default
    config); ``finetune_argv`` the flags every training run gets (the method's own, the strength, seed and output
    folder are added after them). ``report`` receives the progress lines (the plan, each finished cell); the recipe
    prints them.
    """
    output_dir = Path(args.output_dir)
    shard = parse_shard(args.shard)
    rows_path = output_dir / ("rows.jsonl" if shard[1] == 1 else f"rows-{shard[0]}of{shard[1]}.jsonl")
    main_process = _rank() == 0
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    model_args, data_args, base, _ = parse([*finetune_argv, "--output_dir", str(output_dir / "runs")])
    methods = with_dependencies(args.methods, registry)
    greedy = any(registry[m].kind == "greedy_soup" for m in methods)
    id_split = check_compare_data(data_args, args.held_out_split, greedy=greedy)
    cells = plan_cells(
        args.methods, registry, betas=args.betas, alphas=args.alphas, seeds=args.seeds, epochs=run_length(base)
    )

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

    if main_process and not args.summarize_only:
        drop_cut_off_row(rows_path)  # rows are appended after it: a cut-off one would swallow the next row
    existing = read_rows(output_dir)
    # Every row carries its cell's configuration; rows made with another one are refused, before any run.
    shared = shared_configuration(model_args, data_args, base)
    check_rows_configuration(existing, shared, cells, registry, str(output_dir))
    done = {row_key(r) for r in existing}
    if not args.summarize_only:
        ctx = _Context(output_dir, data_args, model_args, base.per_device_eval_batch_size,
                       torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
                       args.held_out_split)  # fmt: skip
        todo = [c for c in cells if c.id not in done or _needed_again(c, done, dependents, run_dir)]
        if shard[1] > 1:
            owners = shard_owners(cells, shard[1])
            left = [c.id for c in todo if owners[c.id] is None]
            todo = [c for c in todo if owners[c.id] == shard[0]]
            if main_process and left:
                report(f"compare: shard {args.shard} leaves {len(left)} cells whose models come from several shards "
                       "to a run without --shard once every shard has finished")  # fmt: skip
        if main_process:
            report(f"compare: {len(cells)} cells, {len(todo)} to run; rows in {rows_path}")
        for cell in todo:
            if cell.spec.kind == "train":
                row = _run_training(cell, finetune_argv, run_dir, train, main_process)
            elif main_process:
                row = _run_post_hoc(cell, ctx, run_dir, cells)
            else:
                continue
            if main_process:
                if cell.id not in done:
                    append_row(rows_path, {**row, "config": cell_configuration(cell, shared, registry)})
                    done.add(cell.id)
                r = row["results"]
                report(f"[{cell.id}] {row['seconds']:.0f} s: {id_split} {r.get(id_split, float('nan')):.1f}, "
                       f"ood_avg {r.get('ood_avg', float('nan')):.1f}")  # fmt: skip
                if not args.keep_models:
                    _delete_unneeded(cells, done, dependents, run_dir)
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
    references = list(dict.fromkeys(registry[m].name for m in args.reference_method or []))
    oracle = registry[args.oracle_method].name if args.oracle_method else None
    return write_frontier_report(output_dir, rows, id_split=id_split, ood_splits=data_args.ood_splits, header=header,
                                 order=order, references=references, oracle=oracle)  # fmt: skip


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
    """A finished training run whose model is gone but a cell still to run needs it (deleted, or never kept)."""
    if cell.spec.kind != "train":
        return False
    pending = [d for d in dependents.get(cell.id, []) if d not in done]
    return bool(pending) and not (run_dir(cell.key, cell.strength, cell.seed) / "config.json").is_file()


def _run_training(cell: Cell, finetune_argv: Sequence[str], run_dir, train, main_process: bool) -> dict:
    out = run_dir(cell.key, cell.strength, cell.seed)
    argv = ["--report_to", "none", "--save_strategy", "no", "--compare_with_vanilla", "false", *finetune_argv]
    argv += [*cell.spec.flags]
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
    return cell.row(results=results.get("fine-tuned", {}), seconds=round(time.time() - started, 1), finished=_now())


def _delete_unneeded(cells, done, dependents, run_dir) -> None:
    for cell in cells:
        if cell.spec.kind == "train" and cell.id in done and all(d in done for d in dependents.get(cell.id, [])):
            shutil.rmtree(run_dir(cell.key, cell.strength, cell.seed), ignore_errors=True)
