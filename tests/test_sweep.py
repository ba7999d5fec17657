"""benchmarks/sweep.py and runs_table.py: the grid a sweep runs and the tables over seeds they report."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load_script(name: str):
    """A benchmark script loaded as Python runs it: with its folder on sys.path, where its ``_common`` lives."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


sweep = _load_script("sweep")
runs_table = _load_script("runs_table")
common = _load_script("_common")


def test_grid_points_is_the_union_of_grids_in_order_without_repeats():
    points, keys = sweep.grid_points(["a=1,2 b=x", "a=2 b=x,y"])
    assert keys == ["a", "b"]
    assert points == [{"a": "1", "b": "x"}, {"a": "2", "b": "x"}, {"a": "2", "b": "y"}]


def _row(beta, seed, best, test):
    return {"blend_beta": beta, "seed": seed, "best_validation_r_mean": best, "validation_r_mean": best - 1,
            "test_r_mean": test, "eta_img": 0.4, "set_sim_image": 0.1, "set_sim_text": None, "set_gap": 0.2}


def test_seed_table_averages_each_setting_over_its_seeds_and_ranks_by_validation():
    rows = [_row("0", "0", 30.0, 29.0), _row("0", "1", 32.0, 31.0), _row("1", "0", 33.0, 20.0),
            _row("1", "2", 35.0, 22.0)]
    lines = sweep.seed_table(["blend_beta", "seed"], rows)
    body = [line for line in lines if line.startswith("| 0 ") or line.startswith("| 1 ")]
    # Ranked by mean best validation (β=1: 34 > β=0: 31), never by test.
    assert [line.split(" | ")[0] for line in body] == ["| 1", "| 0"]
    beta1 = body[0].split(" | ")
    assert beta1[1] == "0,2"
    assert beta1[2] == f"{34.0:.1f} ± {statistics.pstdev([33.0, 35.0]):.1f}"
    assert beta1[4] == "21.0 ± 1.0"
    assert beta1[6] == "0.100 ± 0.000"
    assert body[1].split(" | ")[4] == "30.0 ± 1.0"


def test_seed_table_dashes_a_metric_no_seed_reported():
    lines = sweep.seed_table(["blend_beta", "seed"], [_row("0", "0", 30.0, 29.0)])
    assert lines[-1].split(" | ")[7] == "–"


def test_the_shared_harness_writes_reports_as_the_scripts_did(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results" / "methods_99"  # the folder is created
    path = common.write_json(out, {"rows": [1, 2], "name": "η"})
    assert path == tmp_path / "results" / "methods_99.json"
    assert path.read_text() == json.dumps({"rows": [1, 2], "name": "η"}, indent=2) + "\n"
    lines = ["# Title", "", *common.markdown_table(["a", "b"], [(1, 2.5), ("x", None)])]
    assert lines[2:] == ["| a | b |", "|---|---|", "| 1 | 2.5 |", "| x | None |"]
    md = common.write_markdown(out, lines)
    assert md.read_text() == "\n".join(lines) + "\n" and capsys.readouterr().out == "\n".join(lines) + "\n"
    common.write_markdown(out, lines, echo=False)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--grid", "a=1 b=2"])
    assert common.command("x.py") == ".venv/bin/python benchmarks/x.py --grid 'a=1 b=2'"
    assert common.command("x.py", []) == ".venv/bin/python benchmarks/x.py"
    assert common.mean_std([1.0, 2.0, 4.0]) == "2.3 ± 1.2" and common.mean_std([1.0, 3.0], 2) == "2.00 ± 1.00"


def test_runs_table_averages_the_runs_means_metric_by_metric(tmp_path):
    dirs = []
    for i, r_mean in enumerate((20.0, 24.0)):
        run = tmp_path / f"seed{i}"
        run.mkdir()
        metrics = {m: {"mean": float(i), "std": 9.0} for m in runs_table.METRICS}
        metrics["r_mean"] = {"mean": r_mean, "std": 9.0}
        (run / "results.json").write_text(json.dumps({"test": metrics, "validation": metrics, "seeds": 3}))
        dirs.append(run)
    row = runs_table.group_row(dirs)
    assert row["r_mean"] == (22.0, 2.0)  # the std is over the runs' means, not the evaluation seeds' std
    assert row["IR@1"] == (0.5, 0.5)
    subprocess.run([sys.executable, str(BENCHMARKS / "runs_table.py"), "--group", f"both={tmp_path}/seed*",
                    "--output", str(tmp_path / "table")], check=True, capture_output=True, text=True)
    (group,) = json.loads((tmp_path / "table.json").read_text())
    assert group["test_r_mean_per_run"] == [20.0, 24.0]  # what sizes_plot.py averages


def test_seed_table_of_a_seed_only_grid_has_as_many_cells_as_columns():
    lines = sweep.seed_table(["seed"], [_row("0", "0", 30.0, 29.0), _row("0", "1", 32.0, 31.0)])
    header, rule, row = lines[2:5]
    assert header.startswith("| seeds |") and header.count("|") == rule.count("|") == row.count("|")


def _run_dir(tmp_path, name: str, record: dict, curve: list[float]):
    out = tmp_path / name
    out.mkdir()
    (out / "results.json").write_text(json.dumps(record))
    history = [{"step": 10 * i, "eval_r_mean": v} for i, v in enumerate(curve)] + [{"step": 20, "lr_img": 0.1,
                                                                                      "lr_txt": 0.2}]
    (out / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (out / "timings.json").write_text(json.dumps({"distillation_s": 10.0, "iterations": 20}))
    return out


def _scores(val: float, test: float) -> dict:
    return {"validation": {"r_mean": {"mean": val}}, "test": {"r_mean": {"mean": test}}}


def test_summarise_ranks_a_set_under_its_own_protocol_by_that_protocol_only(tmp_path):
    # In-training evaluations (frozen-encoder heads) peaked at 4.5; the set's own protocol (encoder fine-tuned)
    # scored 1.6 on validation. Its rank must come from the 1.6, not the maximum over both protocols.
    own = _run_dir(tmp_path, "lors", {**_scores(1.6, 1.5), "protocol": "finetune_encoder",
                                      "shared_protocol": _scores(4.4, 5.1)}, [2.6, 4.5])
    row = sweep.summarise(own)
    assert row["best_validation_r_mean"] == 1.6
    assert (row["shared_validation_r_mean"], row["shared_test_r_mean"]) == (4.4, 5.1)
    assert row["protocol"] == "finetune_encoder"
    # A set whose reported protocol is the one its training evaluated with keeps the best over the curve.
    same = _run_dir(tmp_path, "repblend", {**_scores(30.0, 29.0), "protocol": "frozen"}, [2.0, 31.0])
    row = sweep.summarise(same)
    assert row["best_validation_r_mean"] == 31.0 and "shared_validation_r_mean" not in row


def test_sweep_report_lists_the_shared_protocol_of_sets_under_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "HERE", tmp_path)
    (tmp_path / "results").mkdir()
    rows = [{"method": "lors", **sweep.summarise(_run_dir(
        tmp_path, "lors", {**_scores(1.6, 1.5), "protocol": "finetune_encoder", "shared_protocol": _scores(4.4, 5.1)},
        [2.6, 4.5]))}]

    class Args:
        name, grid = "probe", ["method=lors"]

    sweep.write(Args, [], ["method"], rows, 1)
    text = (tmp_path / "results" / "probe.md").read_text()
    assert "| lors | 1.6 | 1.6 | 1.5 |" in text
    assert "| method | shared val | shared test |" in text and "| lors | 4.4 | 5.1 |" in text


def test_methods_table_gives_lors_a_shared_protocol_row_beside_its_own():
    compare = _load_script("compare_methods")
    scores = {"test": {"r_mean": 1.5}, "test_selected_on_test": {"r_mean": 1.7}, "validation_r_mean": 1.6}
    shared = {"test": {"r_mean": 5.1}, "test_selected_on_test": {"r_mean": 5.2}, "validation_r_mean": 4.4}
    runs = [{"own": scores, "shared": shared, "timings": None}, {"own": scores, "shared": shared, "timings": None}]
    row = compare.shared_rows("lors", runs)
    assert row["name"] == "lors, shared protocol" and row["test"] == [{"r_mean": 5.1}] * 2
    assert compare.shared_rows("repblend", [{"own": scores, "timings": None}]) is None
    line = compare.table_row(row["name"], "shared", ["5.1 ± 0.0"], 5.2, "20.00")
    assert line.startswith("| lors, shared protocol | shared: fresh heads on frozen-encoder features")


def test_methods_plot_draws_one_size_as_bars_and_several_as_lines(tmp_path):
    methods = _load_script("methods")
    row = {"r_mean": {"mean": 4.0, "std": 0.5}}
    one = {"99": {"random": row, "lors": {"r_mean": {"mean": 3.8, "std": 0.2}}, "full": row}}
    methods.plot(one, tmp_path / "one.png")
    methods.plot({**one, "199": {"random": row}}, tmp_path / "two.png")
    from PIL import Image

    bars, lines = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "two.png")
    assert bars.size != lines.size  # the bar chart's height follows the number of methods


def test_methods_curves_compare_seeds_at_the_iterations_all_of_them_evaluated(tmp_path):
    compare = _load_script("compare_methods")
    runs = []
    for seed, history in enumerate([[(0, 3.0), (200, 8.0), (400, 14.0), (660, 20.0)],
                                    [(0, 2.0), (200, 10.0), (400, 12.0), (439, 12.5)]]):
        out = tmp_path / f"seed{seed}"
        out.mkdir()
        log = [{"step": k, "eval_r_mean": v} for k, v in history] + [{"step": 10, "loss": 1.0}]
        (out / "trainer_state.json").write_text(json.dumps({"log_history": log}))
        runs.append({"curve": compare.validation_curve(out)})
    curve = compare.common_curve(runs)
    assert sorted(curve) == [0, 200, 400]  # 660 and 439: one seed each, not an equal-iteration comparison
    assert curve[400] == {"mean": 13.0, "std": 1.0}
    assert compare.validation_curve(tmp_path / "missing") == {}


def _checkpoint(path: Path, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"pixel_values": torch.full((2, 3), float(step))}, str(path / "model.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_continue_from_copies_the_newest_checkpoint_at_or_below_max_steps(tmp_path):
    compare = _load_script("compare_methods")
    source, out = tmp_path / "10min" / "lors_199" / "seed0", tmp_path / "30it" / "lors_199" / "seed0"
    _checkpoint(source / "checkpoint-22", 22)
    (source / "checkpoint-30").mkdir()  # killed while saving: no trainer_state.json, not resumable
    copied = compare.continue_run(out, source, ["--num_pairs", "199", "--max_steps", "30"])
    assert copied == out / "checkpoint-22" and (copied / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-22"]  # no .partial left behind
    assert compare.continue_run(out, source, ["--max_steps", "30"]) is None  # its own checkpoint goes first
    past = tmp_path / "30it" / "lors_499" / "seed0"
    assert compare.continue_run(past, source, ["--max_steps", "20"]) is None and not past.exists()
    assert compare.continue_run(past, tmp_path / "missing", ["--max_steps", "30"]) is None
    assert compare.passthrough_value(["--max_steps", "5", "--max_steps", "30"], "--max_steps") == "30"
    timings = {"distillation_s": 80.0, "iterations": 30, "resumed_from_iteration": 22}
    assert compare.seconds_per_iteration(timings) == 10.0  # the 8 iterations this process ran
    assert compare.seconds_per_iteration({"distillation_s": 60.0, "iterations": 30}) == 2.0


def test_the_staged_variant_takes_each_sizes_split_from_its_config_and_splits_the_iterations(tmp_path, monkeypatch):
    compare = _load_script("compare_methods")
    (tmp_path / "fashion_scenes_499.yaml").write_text("stage_pairs: [99, 100, 300]\nstage_targets: conditioned\n")
    (tmp_path / "fashion_scenes_199.yaml").write_text("stage_pairs: [99, 100]\n")
    (tmp_path / "fashion_scenes_99.yaml").write_text("num_pairs: 99\n")
    monkeypatch.setattr(compare, "CONFIGS", tmp_path)
    assert compare.stage_overrides("repblend_staged", ["--num_pairs", "499", "--max_steps", "100"]) == [
        "--stage_pairs", "99", "100", "300", "--stage_targets", "conditioned", "--stage_steps", "34", "33", "33"]
    assert compare.stage_overrides("repblend_staged", ["--num_pairs", "199", "--max_steps", "30"]) == [
        "--stage_pairs", "99", "100", "--stage_targets", "experts", "--stage_steps", "15", "15"]
    assert compare.stage_overrides("repblend_staged", ["--num_pairs", "99", "--max_steps", "30"]) == []  # one stage
    assert compare.stage_overrides("repblend_staged", ["--num_pairs", "299", "--max_steps", "30"]) == []  # no config
    assert compare.stage_overrides("repblend", ["--num_pairs", "499", "--max_steps", "30"]) == []
    with pytest.raises(SystemExit, match="give each of the 3 stages"):
        compare.stage_overrides("repblend_staged", ["--num_pairs", "499", "--max_steps", "2"])
    # the shipped configs give the table's staged rows
    monkeypatch.setattr(compare, "CONFIGS", Path(__file__).parents[1] / "examples" / "configs")
    assert compare.stage_overrides("repblend_staged", ["--num_pairs", "199", "--max_steps", "30"])[:3] == [
        "--stage_pairs", "99", "100"]


def test_methods_finished_only_assembles_the_finished_seeds_and_starts_no_run(tmp_path, monkeypatch):
    methods = _load_script("methods")
    metrics = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")
    for seed, r_mean in ((0, 7.0), (2, 9.0)):  # seed 1 is still running (no results.json)
        out = tmp_path / "work" / "lors_199" / f"seed{seed}"
        out.mkdir(parents=True)
        split = {k: {"mean": r_mean, "std": 0.0} for k in metrics}
        eta = {"settings": {"encoder_lr": 0.05, "text_head_lr": 0.7}} if seed == 0 else {}  # seed 2: no learned η
        (out / "results.json").write_text(json.dumps({"test": split, "test_selected_on_test": split,
                                                      "validation": split, **eta}))
        # Seed 2 ran before timings.json listed the machine.
        machine = {"machine": {"cpu": "Test CPU 9000", "cpu_capability": "AVX2"}} if seed == 0 else {}
        (out / "timings.json").write_text(json.dumps({"distillation_s": 600.0, "iterations": 20, **machine}))
    (tmp_path / "work" / "lors_199" / "seed1").mkdir()  # (starting it would fail: no data, no experts here)
    monkeypatch.setattr(sys, "argv", ["methods.py", "--finished_only", "--pairs", "199,499", "--variants", "lors",
                                      "--seeds", "0,1,2", "--coresets", "", "--no-full", "--work_dir",
                                      str(tmp_path / "work"), "--output", str(tmp_path / "table")])
    sys.path.insert(0, str(BENCHMARKS))
    try:
        methods.main()
    finally:
        sys.path.remove(str(BENCHMARKS))
    text = (tmp_path / "table.md").read_text()
    assert "Partial:" in text and "## 499 pairs" not in text  # no finished run at 499: no section
    row = next(line for line in text.splitlines() if line.startswith("| lors |"))
    assert row.endswith("| 8.0 ± 1.0 | 8.0 | 30.00 | 20 | 0,2 |")
    assert json.loads((tmp_path / "table.json").read_text())["seeds_per_row"] == {"199": {"lors": [0, 2]}}
    assert json.loads((tmp_path / "table.json").read_text())["machines"] == {"Test CPU 9000, AVX2": 1, "unrecorded": 1}
    assert json.loads((tmp_path / "table.json").read_text())["learned_eta"] == {
        "199": {"lors": {"0": {"encoder_lr": 0.05, "text_head_lr": 0.7, "test_r_mean": 7.0}}}}
    assert "| 199 | lors | 0 | 0.050 | 0.700 | 7.0 |" in text  # the learned η beside the score it gave
    assert "Machines (this work_dir's distillation runs, from their timings.json): Test CPU 9000, AVX2 (1 run); " \
           "unrecorded (1 run)." in text


def _finished_run(out: Path, r_mean: float, on_test: float, shared: float | None = None, iterations: int = 20,
                  encoder_lr: float | None = None):
    metrics = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")

    def record(value: float, selected: float) -> dict:
        return {"test": {k: {"mean": value, "std": 0.0} for k in metrics},
                "test_selected_on_test": {k: {"mean": selected, "std": 0.0} for k in metrics},
                "validation": {k: {"mean": value, "std": 0.0} for k in metrics}}

    out.mkdir(parents=True)
    results = record(r_mean, on_test)
    if shared is not None:
        results["shared_protocol"] = record(shared, shared)
    if encoder_lr is not None:
        results["settings"] = {"encoder_lr": encoder_lr, "text_head_lr": 0.5}
    (out / "results.json").write_text(json.dumps(results))
    (out / "timings.json").write_text(json.dumps({"distillation_s": 30.0 * iterations, "iterations": iterations}))


def test_methods_reuse_pools_a_previous_tables_seeds_with_the_runs_here_and_runs_none_of_them(tmp_path, monkeypatch):
    methods = _load_script("methods")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # where methods.py finds _common and compare_methods
    common = ["--pairs", "199", "--variants", "lors", "--seeds", "0,1,2", "--coresets", "", "--no-full"]
    for seed, r_mean in ((0, 6.0), (1, 8.0)):  # the previous table's runs, on a machine since gone
        _finished_run(tmp_path / "old" / "lors_199" / f"seed{seed}", r_mean, r_mean + 1, shared=4.0,
                      iterations=20 + seed, encoder_lr=0.01 * (seed + 1))
    monkeypatch.setattr(sys, "argv", ["methods.py", "--finished_only", *common, "--work_dir",
                                      str(tmp_path / "old"), "--output", str(tmp_path / "previous")])
    methods.main()
    _finished_run(tmp_path / "new" / "lors_199" / "seed2", 10.0, 13.0, shared=7.0, iterations=30, encoder_lr=0.03)
    started = []
    monkeypatch.setattr(methods, "run_in_workers", lambda cells, args: started.extend(cells))
    monkeypatch.setattr(sys, "argv", ["methods.py", *common, "--work_dir", str(tmp_path / "new"), "--reuse",
                                      str(tmp_path / "previous.json"), "--output", str(tmp_path / "table")])
    methods.main()
    assert [(name, seed) for name, seed, _, _ in started] == [("lors", 2)]  # seeds 0, 1 are not run again
    table = json.loads((tmp_path / "table.json").read_text())
    assert [s["r_mean"] for s in table["per_seed"]["199"]["lors"]] == [6.0, 8.0, 10.0]
    assert table["test"]["199"]["lors"]["r_mean"]["mean"] == pytest.approx(8.0)
    selected = table["test_selected_on_test"]["199"]["lors"]["r_mean"]  # 7, 9 (a summary only) and 13
    assert selected["mean"] == pytest.approx(29 / 3) and selected["std"] == pytest.approx(np.std([7, 9, 13]))
    assert table["iterations"]["199"]["lors"] == [20, 21, 30]
    assert {seed: eta["encoder_lr"] for seed, eta in table["learned_eta"]["199"]["lors"].items()} == {
        "0": 0.01, "1": 0.02, "2": 0.03}  # the reused seeds' η come with them
    assert table["seeds_per_row"]["199"] == {"lors": [0, 1, 2], "lors, shared protocol": [0, 1, 2]}
    assert table["test"]["199"]["lors, shared protocol"]["r_mean"]["mean"] == pytest.approx(5.0)
    row = next(line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| lors |"))
    assert row.endswith("| 8.0 ± 1.6 | 9.7 | 30.00 | 24 | 0,1,2 |")
    import repblend_hf.pipeline

    def no_encoding(*args, **kwargs):
        raise AssertionError("a reused coreset is not selected and trained again")

    monkeypatch.setattr(repblend_hf.pipeline, "prepare_features", no_encoding)
    summary = {k: {"mean": 5.0, "std": 0.5} for k in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")}
    table["per_seed"]["199"]["random"] = [{k: 5.0 + d for k in summary} for d in (-0.5, 0.0, 0.5)]
    table["test_selected_on_test"]["199"]["random"] = summary
    (tmp_path / "with_random.json").write_text(json.dumps(table))
    monkeypatch.setattr(sys, "argv", ["methods.py", *common[:-3], "--coresets", "random", "--no-full", "--work_dir",
                                      str(tmp_path / "none"), "--reuse", str(tmp_path / "with_random.json"),
                                      "--output", str(tmp_path / "t3")])
    methods.main()
    reused = json.loads((tmp_path / "t3.json").read_text())
    assert reused["test"]["199"]["random"]["r_mean"]["mean"] == pytest.approx(5.0)
    assert reused["test"]["199"]["lors"] == table["test"]["199"]["lors"]  # every seed reused, none run
    previous = json.loads((tmp_path / "previous.json").read_text())
    previous["protocol"]["199"]["lors"] = "infonce"  # a row pools one protocol's seeds
    (tmp_path / "infonce.json").write_text(json.dumps(previous))
    monkeypatch.setattr(sys, "argv", ["methods.py", *common, "--work_dir", str(tmp_path / "new"), "--reuse",
                                      str(tmp_path / "infonce.json"), "--output", str(tmp_path / "t2")])
    with pytest.raises(SystemExit, match="pools seeds of one protocol"):
        methods.main()


def test_eta_probe_rescores_a_copy_of_the_set_at_another_eta_and_refuses_an_unfinished_run(tmp_path, monkeypatch):
    probe = _load_script("eta_probe")
    source = tmp_path / "run" / "synthetic_set"
    source.mkdir(parents=True)
    (source / "config.json").write_text(json.dumps({"inner_lr_img": 0.03, "inner_lr_txt": 0.7, "num_pairs": 5}))
    (source / "data.bin").write_bytes(b"pixels")
    copy = probe.with_eta(source, tmp_path / "sets" / "init", 0.1, 0.1)
    config = json.loads((copy / "config.json").read_text())
    assert (config["inner_lr_img"], config["inner_lr_txt"], config["num_pairs"]) == (0.1, 0.1, 5)
    assert json.loads((source / "config.json").read_text())["inner_lr_txt"] == 0.7  # the run's set is untouched
    assert (copy / "data.bin").read_bytes() == b"pixels" and not (tmp_path / "sets" / "init.partial").exists()
    monkeypatch.setattr(sys, "argv", ["eta_probe.py", "--run", str(tmp_path / "run"), "--seed", "0"])
    with pytest.raises(SystemExit, match="not a finished distill run"):
        probe.main()


def test_a_point_passes_lists_and_its_seed_into_the_passed_arguments():
    args = sweep.point_arguments({"seed": "2", "stage_pairs": "99:100"},
                                 ["--initial_stages", "runs/seed{seed}/synthetic_set", "--max_steps", "5"])
    assert args == ["--initial_stages", "runs/seed2/synthetic_set", "--max_steps", "5", "--seed", "2",
                    "--stage_pairs", "99", "100"]
    assert sweep.point_arguments({"lr_img": "10"}, ["--x", "{seed}"]) == ["--x", "{seed}", "--lr_img", "10"]


def test_sizes_plot_averages_the_matching_rows_per_size_and_names_what_has_not_finished(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "small.json").write_text(json.dumps({"rows": [
        {"seed": "0", "test_r_mean": 10.0}, {"seed": "1", "test_r_mean": 12.0}]}))
    (results / "large.json").write_text(json.dumps({"rows": [
        {"seed": "0", "stage_targets": "conditioned", "test_r_mean": 20.0},
        {"seed": "0", "stage_targets": "experts", "test_r_mean": 99.0},  # filtered out
        {"seed": "1", "stage_targets": "conditioned", "failed": 1}]}))  # no score: not counted
    (results / "base.json").write_text(json.dumps({"results": [
        {"method": m, "pairs": p, "test": {"r_mean": {"mean": v, "std": 0.5}}}
        for m, p, v in [("herding", 100, 3.0), ("herding", 200, 5.0), ("full", 1000, 40.0)]]}))
    out = tmp_path / "sizes"
    argv = [sys.executable, str(BENCHMARKS / "sizes_plot.py"), "--results", str(results), "--baselines", "base",
            "--output", str(out), "--paper", "100=50",
            "--series", "ours=99:small;199:large:stage_targets=conditioned;499:large:stage_targets=none"]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    report = (tmp_path / "sizes.md").read_text()
    assert "| ours | 11.0 ± 1.0 (2 seeds, 28 %) | 20.0 ± 0.0 (1 seed, 50 %) |" in report
    assert "| herding (real pairs) | 3.0 ± 0.5 | 5.0 ± 0.5 |" in report
    assert "Not finished yet (left out): ours, 499 pairs" in report
    assert (tmp_path / "sizes.png").stat().st_size > 0
    record = json.loads((tmp_path / "sizes.json").read_text())
    assert record["series"]["ours"]["199"]["test_r_mean"] == [20.0]

    bad = subprocess.run(argv[:-1] + ["ours=99"], capture_output=True, text=True)
    assert bad.returncode != 0 and "a series is LABEL=PAIRS:SWEEP" in bad.stderr
    bad = subprocess.run(argv[:-3] + ["100", *argv[-2:]], capture_output=True, text=True)
    assert bad.returncode != 0 and "--paper is PAIRS=PERCENT" in bad.stderr

    # a runs_table.py table as a point: its groups' runs (matched on label)
    (results / "runs.json").write_text(json.dumps([
        {"label": "a", "runs": ["s0", "s1"], "test_r_mean_per_run": [6.0, 8.0]},
        {"label": "b", "runs": ["s0"], "test_r_mean_per_run": [50.0]}]))
    subprocess.run([*argv[:-1], "ours=99:runs:label=a;199:large:stage_targets=conditioned", "--space", "pixels"],
                   check=True, capture_output=True, text=True)
    report = (tmp_path / "sizes.md").read_text()
    assert report.startswith("# Test r_mean against the number of pairs (fashion-scenes, pixels)")
    assert "| ours | 7.0 ± 1.0 (2 seeds, 18 %) | 20.0 ± 0.0 (1 seed, 50 %) |" in report
    (results / "old.json").write_text(json.dumps([{"label": "a", "runs": ["s0"]}]))  # made before per-run scores
    bad = subprocess.run([*argv[:-1], "ours=99:old"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no per-run scores; make it again with benchmarks/runs_table.py" in bad.stderr


def test_stage_speed_times_each_stage_and_adds_them_up_per_config(tmp_path, monkeypatch):
    speed = _load_script("stage_speed")
    runs = {}
    for name in ("run_199", "run_499"):
        stage = "stage_2" if name == "run_199" else "stage_3"
        (tmp_path / name / stage / "experts").mkdir(parents=True)
        (tmp_path / name / stage / "experts" / "trajectories.json").write_text("{}")
        (tmp_path / name / "timings.json").write_text(json.dumps({"experts_s": 300.0}))
        runs[name] = str(tmp_path / name)
    seconds = {"99": 1.2, "199": 1.5, "499": 1.8}
    launched = []

    def fake_run(argv, check):  # a distill.py run: writes the timings its iterations would
        out = Path(argv[argv.index("--output_dir") + 1])
        pairs = argv[argv.index("--num_pairs") + 1]
        launched.append((pairs, sorted(p.name for p in out.glob("stage_*")), argv[argv.index("--max_steps") + 1]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "timings.json").write_text(json.dumps({"distillation_s": seconds[pairs] * 20, "iterations": 20}))

    monkeypatch.setattr(speed.subprocess, "run", fake_run)
    output = tmp_path / "speed"
    monkeypatch.setattr(sys, "argv", ["stage_speed.py", "--iterations", "20", "--work_dir", str(tmp_path / "work"),
                                      "--run_199", runs["run_199"], "--run_499", runs["run_499"],
                                      "--output", str(output)])
    speed.main()
    # each later stage starts with its conditioned experts copied in, so only its iterations are timed
    assert launched == [("99", [], "20"), ("199", ["stage_2"], "20"), ("499", ["stage_3"], "20")]
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["config_minutes"] == pytest.approx({"fashion_scenes_99.yaml (the default)": 20.0,
                                                      "fashion_scenes_199.yaml": 45.0,
                                                      "fashion_scenes_499.yaml": 75.0})
    assert "| fashion_scenes_499.yaml | 3 | 75.0 |" in output.with_suffix(".md").read_text()
    speed.main()  # finished probes are reused, not run again
    assert len(launched) == 3

    (tmp_path / "run_499" / "stage_3" / "experts" / "trajectories.json").unlink()
    monkeypatch.setattr(sys, "argv", [*sys.argv[:-2], "--work_dir", str(tmp_path / "other"),
                                      "--output", str(output)])
    with pytest.raises(SystemExit, match="holds no finished conditioned experts"):
        speed.main()
