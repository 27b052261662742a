"""recipes/compare.py: methods x strengths x seeds on a user's ImageFolder -> rows, tables, summary, plot; resumes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _builders import load_script, save_tiny_clip, write_imagefolder
from PIL import Image

from hf_cfft.cli.compare_grid import METHODS, parse_compare_args, plan_cells, with_dependencies
from hf_cfft.evaluation.frontier import Point, read_rows, row_key

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    return load_script(ROOT / "recipes" / "compare.py", "compare_recipe")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    images = write_imagefolder(root / "images", splits=("train", "val", "test"), per_class=4)
    write_imagefolder(root / "shifted", splits=("ood",), per_class=3, seed=7)
    (images / "ood").symlink_to(root / "shifted" / "ood")
    return save_tiny_clip(root / "clip"), images


def _finetune_flags(clip, images):
    return [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--eval_splits", "test", "ood",
        "--ood_splits", "ood", "--templates", "simple", "--per_device_train_batch_size", "4", "--max_steps", "2",
        "--use_cpu", "--logging_steps", "1",
    ]  # fmt: skip


def test_compare_two_methods_two_strengths_writes_table_plot_summary_and_resumes(workspace, tmp_path, capsys):
    clip, images = workspace
    out = tmp_path / "cmp"
    argv = [
        "--methods", "ft_fd", "cfft", "--betas", "1", "3", "--seeds", "0", "--output_dir", str(out),
        *_finetune_flags(clip, images),
    ]  # fmt: skip
    paths = _recipe().main(argv)

    rows = read_rows(out)
    assert sorted(row_key(r) for r in rows) == sorted(
        f"{m}|{b}|2 steps|0" for m in ("FT+FD", "CFFT object/single") for b in ("1", "3")
    )
    for row in rows:
        assert set(row["results"]) == {"test", "ood", "ood_avg"} and row["results"]["ood_avg"] == row["results"]["ood"]
    report = Path(paths["report"]).read_text()
    for needle in (
        "## Summary",
        "| FT+FD | 2 steps | beta 1 | 1 |",
        "| CFFT object/single | 2 steps | beta 3 | 1 |",
        "## Every split",
        "| method | epochs | strength | seeds | test | ood | ood_avg |",
        "matched ID",
    ):
        assert needle in report, needle
    summary = Path(paths["summary"]).read_text()
    # One seed: nothing is called better, and the summary says why.
    assert "One seed per run: no difference between methods can be resolved" in summary
    assert "better" not in summary.replace("called better", "") and "Best OOD" not in summary
    with Image.open(paths["plot"]) as plot:
        assert plot.size[0] > 500 and plot.size[1] > 400
    curves = json.loads(Path(paths["json"]).read_text())["curves"]
    assert {c["method"] for c in curves} == {"FT+FD", "CFFT object/single"}
    assert all([p["strength"] for p in c["points"]] == [1.0, 3.0] for c in curves)

    capsys.readouterr()
    _recipe().main(argv)  # everything has a row: nothing is trained again
    assert "4 cells, 0 to run" in capsys.readouterr().out
    assert len(read_rows(out)) == 4


def test_compare_wise_ft_and_soups_reuse_the_trained_runs(workspace, tmp_path):
    clip, images = workspace
    out = tmp_path / "cmp"
    _recipe().main([
        "--methods", "zero_shot", "wise_ft", "uniform_soup", "greedy_soup", "--alphas", "0", "0.5", "1",
        "--seeds", "0", "1", "--held_out_split", "val", "--output_dir", str(out), *_finetune_flags(clip, images),
    ])  # fmt: skip
    rows = {row_key(r): r for r in read_rows(out)}
    assert set(rows) == {
        "zero-shot|0|2 steps|0", "zero-shot|0|2 steps|1", "vanilla FT|0|2 steps|0", "vanilla FT|0|2 steps|1",
        *(f"WiSE-FT|{a}|2 steps|{s}" for a in ("0", "0.5", "1") for s in (0, 1)),
        "uniform soup|0|2 steps|all", "greedy soup|0|2 steps|all",
    }  # fmt: skip
    # WiSE-FT's end points are the models themselves.
    assert rows["WiSE-FT|0|2 steps|0"]["results"] == rows["zero-shot|0|2 steps|0"]["results"]
    assert rows["WiSE-FT|1|2 steps|1"]["results"] == rows["vanilla FT|0|2 steps|1"]["results"]
    greedy = rows["greedy soup|0|2 steps|all"]
    assert greedy["held_out_split"] == "val" and 1 <= len(greedy["chosen"]) <= 2
    assert rows["uniform soup|0|2 steps|all"]["ingredients"] == ["vanilla FT|0|2 steps|0", "vanilla FT|0|2 steps|1"]
    assert "greedy soup" in (out / "compare.md").read_text()


def test_greedy_soup_refuses_an_ood_held_out_split(workspace, tmp_path):
    clip, images = workspace
    argv = ["--methods", "greedy_soup", "--held_out_split", "ood", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="'ood' is one of the OOD splits"):
        _recipe().main([*argv, *_finetune_flags(clip, images)])


def test_flags_split_between_compare_and_every_run(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "seeds: [0, 1]\nmethods: [ft, {key: slow, name: FT+FD, flags: [--mask_kind, none, --fill_kind, none], "
        "strength: beta, strengths: [1], epochs: 5}]\nfinetune_args: {learning_rate: 1.0e-5}\n"
    )
    args, registry, finetune_argv = parse_compare_args(["--config", str(config), "--seed", "3", "--betas", "2"])
    assert args.seeds == [0, 1] and args.betas == [2.0] and args.methods == ["ft", "slow"]
    assert finetune_argv == ["--learning_rate", "1e-05", "--seed", "3"]  # "--seed" is not "--seeds"
    cells = plan_cells(args.methods, registry, betas=args.betas, alphas=args.alphas, seeds=args.seeds, epochs=1.0)
    assert [c.id for c in cells] == ["vanilla FT|0|1|0", "vanilla FT|0|1|1", "FT+FD|1|5|0", "FT+FD|1|5|1"]


def test_dependencies_come_first():
    assert with_dependencies(["wise_ft", "lp_ft", "greedy_soup"], METHODS) == [
        "ft", "wise_ft", "lp", "lp_ft", "greedy_soup",
    ]  # fmt: skip


WORLD_FRONTIER = ROOT / "docs" / "world_frontier"
WORLD_CONFIG = ROOT / "recipes" / "configs" / "compare" / "world_frontier.yaml"


def test_the_shipped_world_frontier_rows_are_the_world_configs_grid():
    # docs/world_frontier holds one row per cell the config plans, and nothing else: the docs' frontier is this grid.
    args, registry, finetune_argv = parse_compare_args(["--config", str(WORLD_CONFIG)])
    assert finetune_argv[:2] == ["--config", "recipes/configs/world.yaml"]
    assert args.oracle_method == "oracle" and registry["oracle"].name.startswith("oracle FT")
    assert args.reference_method == ["wise_ft", "ft_fd", "cfft"]
    cells = plan_cells(args.methods, registry, betas=args.betas, alphas=args.alphas, seeds=args.seeds, epochs=1)
    assert len(cells) == 196
    keys = [row_key(r) for r in read_rows(WORLD_FRONTIER)]
    assert sorted(keys) == sorted(c.id for c in cells)
    for cell in cells:  # the oracle differs from vanilla FT only in the train split's context correlation
        if cell.key == "oracle":
            assert cell.spec.flags[-2:] == ("--world_train_correlation", "0.1")


def test_the_shipped_world_frontier_report_is_what_compare_writes_from_its_rows(tmp_path):
    import shutil

    out = tmp_path / "world_frontier"
    shutil.copytree(WORLD_FRONTIER, out)
    paths = _recipe().main(["--config", str(WORLD_CONFIG), "--output_dir", str(out), "--summarize_only"])
    shipped = (WORLD_FRONTIER / "compare.md").read_text()
    written = Path(paths["report"]).read_text()
    # The first line names the date it was written; everything below it is computed from the rows.
    assert written.split("\n", 1)[1] == shipped.split("\n", 1)[1]
    assert "196 of 196 planned cells have rows" in written
    assert "## Share of the OOD gain of oracle FT" in written


def test_oracle_share_is_each_points_ood_gain_over_zero_shot_divided_by_the_oracles():
    from hf_cfft.evaluation.frontier import oracle_share_table

    curves = {
        ("zero-shot", 1): [Point(0, 90, 0, 81, 0, 2)],
        ("oracle", 1): [Point(0, 95, 0, 85, 0, 2)],
        ("CFFT", 1): [Point(1, 96, 0, 82, 0, 2), Point(3, 94, 0, 85, 0, 2)],
    }
    text = oracle_share_table(curves, "oracle")
    assert "The oracle's OOD gain over zero-shot is +4.0 points." in text
    assert "| CFFT | 1 | +1.0 | +0.25 |" in text and "| CFFT | 3 | +4.0 | +1.00 |" in text
    # A gain under a point is noise: no shares.
    curves[("oracle", 1)] = [Point(0, 95, 0, 81.5, 0, 2)]
    text = oracle_share_table(curves, "oracle")
    assert "none is computed" in text and "| CFFT | 3 | +4.0 | n/a |" in text
    with pytest.raises(ValueError, match="--oracle_method ft is not among --methods"):
        parse_compare_args(["--methods", "cfft", "--oracle_method", "ft"])
    with pytest.raises(ValueError, match="--reference_method ft is not among --methods"):
        parse_compare_args(["--methods", "cfft", "--reference_method", "ft"])


def test_the_reference_defaults_to_wise_ft_then_vanilla_ft():
    assert parse_compare_args(["--methods", "ft", "wise_ft", "cfft"])[0].reference_method == ["wise_ft"]
    assert parse_compare_args(["--methods", "ft", "cfft"])[0].reference_method == ["ft"]
    assert parse_compare_args(["--methods", "cfft"])[0].reference_method == []
    assert parse_compare_args(["--methods", "ft", "cfft", "--reference_method", "cfft", "ft"])[0].reference_method == [
        "cfft",
        "ft",
    ]


@pytest.mark.xdist_group("two_processes")  # one port (29500): launches of two processes run one at a time
@pytest.mark.skipif(sys.platform != "linux", reason="two CPU processes via accelerate launch")
def test_compare_under_accelerate_launch_two_processes(workspace, tmp_path):
    # Both processes train every run together (DDP); the main one alone scores the post-hoc models and writes.
    clip, images = workspace
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "recipes" / "compare.py"),
        "--methods", "ft_fd", "wise_ft", "--betas", "1", "--alphas", "0.5", "--output_dir", str(out),
        *_finetune_flags(clip, images),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "with 2 process(es) on cpu" in done.stdout
    assert sorted(row_key(r) for r in read_rows(out)) == [
        "FT+FD|1|2 steps|0", "WiSE-FT|0.5|2 steps|0", "vanilla FT|0|2 steps|0",
    ]  # fmt: skip
    assert (out / "frontier.png").is_file() and "## Summary" in (out / "compare.md").read_text()


def test_compare_runs_flyp_and_lp_ft_as_curves_of_one_point(workspace, tmp_path):
    clip, images = workspace
    out = tmp_path / "cmp"
    _recipe().main(["--methods", "flyp", "lp_ft", "--output_dir", str(out), *_finetune_flags(clip, images)])
    assert sorted(row_key(r) for r in read_rows(out)) == [
        "FLYP|0|2 steps|0",
        "LP-FT|0|2 steps|0",
        "linear probe|0|2 steps|0",
    ]
    # LP-FT started from the probe's folder: the probe's run is kept, and it is a saved classifier.
    assert (out / "runs" / "linear_probe_0_2_steps_0" / "model.safetensors").is_file()
    assert "FLYP" in (out / "summary.md").read_text() or "LP-FT" in (out / "summary.md").read_text()


def test_compare_without_keep_models_deletes_runs_once_nothing_needs_them(workspace, tmp_path):
    clip, images = workspace
    out = tmp_path / "cmp"
    argv = ["--methods", "ft", "wise_ft", "--alphas", "0.5", "--no_keep_models", "--output_dir", str(out)]
    _recipe().main([*argv, *_finetune_flags(clip, images)])
    assert len(read_rows(out)) == 2 and not any((out / "runs").iterdir()), "the vanilla run outlived its WiSE-FT"
    # A WiSE-FT alpha added later needs the deleted run: it is trained again, and its row is not duplicated.
    _recipe().main([*argv[:5], "1", *argv[5:], *_finetune_flags(clip, images)])
    assert sorted(row_key(r) for r in read_rows(out)) == [
        "WiSE-FT|0.5|2 steps|0", "WiSE-FT|1|2 steps|0", "vanilla FT|0|2 steps|0",
    ]  # fmt: skip


def test_shards_split_the_training_runs_and_leave_cross_shard_soups_to_a_last_run(workspace, tmp_path, capsys):
    clip, images = workspace
    out = tmp_path / "cmp"
    argv = ["--methods", "zero_shot", "wise_ft", "uniform_soup", "--alphas", "0.5", "--seeds", "0", "1"]
    argv += ["--output_dir", str(out), *_finetune_flags(clip, images)]
    keys = {}
    for shard in ("0/2", "1/2"):
        capsys.readouterr()
        _recipe().main([*argv, "--shard", shard])
        index = shard.split("/")[0]
        keys[shard] = sorted(row_key(json.loads(line)) for line in (out / f"rows-{index}of2.jsonl").open())
        assert "leaves 1 cells whose models come from several shards" in capsys.readouterr().out
    # Every n-th training run: vanilla FT seed 0 on shard 0, seed 1 on shard 1, each with its own WiSE-FT point.
    assert keys["0/2"] == ["WiSE-FT|0.5|2 steps|0", "vanilla FT|0|2 steps|0", "zero-shot|0|2 steps|0",
                           "zero-shot|0|2 steps|1"]  # fmt: skip
    assert keys["1/2"] == ["WiSE-FT|0.5|2 steps|1", "vanilla FT|0|2 steps|1"]
    assert not (out / "rows.jsonl").exists()
    capsys.readouterr()
    _recipe().main(argv)  # the soup of both shards' runs, and nothing trained again
    assert "7 cells, 1 to run" in capsys.readouterr().out
    rows = read_rows(out)
    assert len(rows) == 7 and len({row_key(r) for r in rows}) == 7
    assert [row_key(json.loads(line)) for line in (out / "rows.jsonl").open()] == ["uniform soup|0|2 steps|all"]


@pytest.mark.parametrize("value", ["2/2", "1", "a/b", "0/0"])
def test_a_malformed_shard_is_refused(value):
    with pytest.raises(ValueError, match=r"--shard .* is not i/n"):
        parse_compare_args(["--shard", value])


def test_a_cell_scored_twice_counts_once_and_is_named(tmp_path, caplog):
    row = {"method": "FT+FD", "strength": 1.0, "strength_name": "beta", "epochs": 1, "seed": 0}
    row["results"] = {"test": 90.0, "ood_avg": 80.0}
    other = {**row, "seed": 1}
    (tmp_path / "rows-0of2.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({**row, "results": {"test": 91.0, "ood_avg": 80.0}}) + "\n")
    with caplog.at_level("WARNING"):
        rows = read_rows(tmp_path)
    assert [r["seed"] for r in rows] == [0, 1] and rows[0]["results"]["test"] == 90.0
    assert "FT+FD|1|1|0" in caplog.text and "results differ" in caplog.text


def test_a_shard_trains_lp_ft_where_its_probe_is_trained():
    from hf_cfft.cli.compare_grid import shard_cells

    cells = plan_cells(["ft", "lp_ft", "flyp"], METHODS, betas=[1.0], alphas=[0.5], seeds=[0, 1, 2], epochs=1.0)
    shards = [shard_cells(cells, (i, 2)) for i in range(2)]
    assert sorted(len(s) for s in shards) == [6, 6] and not shards[0] & shards[1]
    for seed in (0, 1, 2):
        probe, lp_ft = f"linear probe|0|1|{seed}", f"LP-FT|0|1|{seed}"
        assert [probe in s for s in shards] == [lp_ft in s for s in shards]
    # The others are dealt in turn over the plan: vanilla FT seeds 0 and 2 on shard 0, seed 1 on shard 1.
    assert {"vanilla FT|0|1|0", "vanilla FT|0|1|2"} <= shards[0] and "vanilla FT|0|1|1" in shards[1]


ADAPTATION = ROOT / "recipes" / "configs" / "compare"


def test_the_adaptation_world_configs_parse_to_exactly_their_cells():
    args, registry, finetune_argv = parse_compare_args(["--config", str(ADAPTATION / "adaptation_frontier.yaml")])
    assert finetune_argv[:2] == ["--config", "recipes/configs/world.yaml"]
    assert "--world_object_contrast" in finetune_argv and "--world_eval_size" in finetune_argv
    assert finetune_argv[finetune_argv.index("--world_object_contrast") + 1] == "0.35"
    assert finetune_argv[finetune_argv.index("--mask_threshold") + 1] == "0.02"
    cells = plan_cells(args.methods, registry, betas=args.betas, alphas=args.alphas, seeds=args.seeds, epochs=1)
    by_method: dict[str, int] = {}
    for cell in cells:
        by_method[cell.key] = by_method.get(cell.key, 0) + 1
    # 5 seeds; WiSE-FT at 5 alphas; CFFT object/single, FT+FD and object/none at beta 0.3, 1, 3, 10, 30, random
    # and context masks at beta 1, 3, 10; the probe, LP-FT and FLYP.
    assert by_method == {"zero_shot": 5, "ft": 5, "wise_ft": 25, "oracle": 5, "cfft": 25, "ft_fd": 25,
                         "cfft_nofill": 25, "cfft_random": 15, "cfft_context": 15, "lp": 5, "lp_ft": 5,
                         "flyp": 5}  # fmt: skip
    strengths = {c.strength for c in cells if c.key == "cfft"}
    assert strengths == {0.3, 1.0, 3.0, 10.0, 30.0}
    # The design grid holds no distillation method: the criteria involve zero-shot, probes, vanilla FT and the oracle.
    args, registry, _ = parse_compare_args(["--config", str(ADAPTATION / "adaptation_design.yaml")])
    cells = plan_cells(args.methods, registry, betas=args.betas, alphas=args.alphas, seeds=args.seeds, epochs=1)
    assert {c.key for c in cells} == {"zero_shot", "ft", "oracle", "probe_10_epochs", "probe_20_epochs"}
    assert all(c.spec.strength != "beta" for c in cells)


def test_the_adaptation_design_rows_meet_the_criteria_and_the_first_design_does_not():

    spec = importlib.util.spec_from_file_location(
        "adaptation_criteria", ROOT / "benchmarks" / "adaptation_criteria.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = ROOT / "docs" / "adaptation_world"
    chosen = module.check(module.load_rows(docs / "design_contrast_035_eval_5000"))
    assert [holds for _, _, holds in chosen] == [True] * 5
    first = module.check(module.load_rows(docs / "design_contrast_035"))
    assert [holds for _, _, holds in first] == [True, False, True, True, False]  # no probe rows; split std 2.76


ADAPTATION_FRONTIER = ROOT / "docs" / "adaptation_world" / "frontier"


def test_the_shipped_adaptation_report_and_claims_are_what_compare_and_the_claims_script_write(tmp_path):
    import shutil

    out = tmp_path / "frontier"
    shutil.copytree(ADAPTATION_FRONTIER, out, ignore=shutil.ignore_patterns("runs", ".hf_cfft*"))
    config = ADAPTATION / "adaptation_frontier.yaml"
    paths = _recipe().main(["--config", str(config), "--output_dir", str(out), "--summarize_only"])
    written = Path(paths["report"]).read_text()
    assert written.split("\n", 1)[1] == (ADAPTATION_FRONTIER / "compare.md").read_text().split("\n", 1)[1]
    spec = importlib.util.spec_from_file_location("adaptation_claims", ROOT / "benchmarks" / "adaptation_claims.py")
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)
    table = claims.claims_table(claims.answer(read_rows(ADAPTATION_FRONTIER)))
    assert table in (ADAPTATION_FRONTIER.parent / "claims.md").read_text()
    # Every claim of issue 21 has a line, answered or saying which rows it waits for.
    assert all(claim in table for claim, *_ in claims.CLAIMS)


# ---- issue 24: rows carry their configuration; a changed one is refused; a cut-off row is run again ----


def _hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rows_carry_the_cells_configuration_and_a_changed_one_is_refused(workspace, tmp_path, capsys):
    from hf_cfft.cli.script_args import run_recipe

    clip, images = workspace
    out = tmp_path / "cmp"
    base = ["--output_dir", str(out), *_finetune_flags(clip, images), "--learning_rate", "1e-3"]
    _recipe().main(["--methods", "ft", "--seeds", "0", *base])
    (row,) = read_rows(out)
    config = row["config"]
    assert config["shared"]["data"]["dataset_name"] == str(images) and config["shared"]["data"]["ood_splits"] == [
        "ood"
    ]
    assert config["shared"]["model"]["model_name_or_path"] == str(clip)
    assert config["shared"]["training"]["learning_rate"] == 1e-3 and config["shared"]["training"]["max_steps"] == 2
    assert config["method"]["flags"] == list(METHODS["ft"].flags)
    before = _hash(out / "rows.jsonl")

    # another learning rate into the same folder: refused, naming the change; the rows untouched
    changed = [arg if arg != "1e-3" else "5e-4" for arg in base]
    with pytest.raises(SystemExit) as stop:
        run_recipe(lambda: _recipe().main(["--methods", "ft", "--seeds", "0", *changed]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err and err.count("error: ") == 1
    assert "holds rows made with another configuration than this run's: training.learning_rate: 0.001 -> 0.0005" in err
    assert "(1 row(s), e.g. vanilla FT|0|2 steps|0)" in err
    assert _hash(out / "rows.jsonl") == before

    # the same configuration with a new method and a new seed: only the new cells run
    _recipe().main(["--methods", "zero_shot", "ft", "--seeds", "0", "1", *base])
    assert "4 cells, 3 to run" in capsys.readouterr().out
    assert len(read_rows(out)) == 4

    # rows written before rows carried a configuration are accepted as they are
    lines = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    (out / "rows.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "config"}) + "\n" for r in lines)
    )
    _recipe().main(["--methods", "zero_shot", "ft", "--seeds", "0", "1", *changed])
    assert "4 cells, 0 to run" in capsys.readouterr().out


def test_a_cut_off_last_row_is_named_skipped_and_its_cell_run_again(workspace, tmp_path, capsys, caplog):
    clip, images = workspace
    out = tmp_path / "cmp"
    argv = ["--methods", "ft", "--seeds", "0", "1", "--output_dir", str(out), *_finetune_flags(clip, images)]
    _recipe().main(argv)
    rows_file = out / "rows.jsonl"
    first, second = rows_file.read_text().splitlines()
    rows_file.write_text(first + "\n" + second[: len(second) // 2])  # killed while writing the second row
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        _recipe().main(argv)
    assert f"{rows_file}: removed its cut-off last row (kept in {rows_file}.cut-off)" in caplog.text
    assert "2 cells, 1 to run" in capsys.readouterr().out  # the cut-off cell, again
    assert sorted(row_key(r) for r in read_rows(out)) == ["vanilla FT|0|2 steps|0", "vanilla FT|0|2 steps|1"]
    assert (out / "rows.jsonl.cut-off").read_text() == second[: len(second) // 2] + "\n"
    # read alone (e.g. --summarize_only, or another shard's file), a cut-off last row is named and skipped
    (out / "rows-1of2.jsonl").write_text(first[:40])
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert len(read_rows(out)) == 2
    assert "rows-1of2.jsonl: its last row (line 1) is cut off" in caplog.text and "its cell runs again" in caplog.text
