"""benchmarks/sweep.py and runs_table.py: the grid a sweep runs and the tables over seeds they report."""

import importlib.util
import statistics
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("sweep", Path(__file__).parents[1] / "benchmarks" / "sweep.py")
sweep = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(sweep)


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


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
RT_SPEC = importlib.util.spec_from_file_location("runs_table", BENCHMARKS / "runs_table.py")
runs_table = importlib.util.module_from_spec(RT_SPEC)
RT_SPEC.loader.exec_module(runs_table)


def test_runs_table_averages_the_runs_means_metric_by_metric(tmp_path):
    import json

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


def test_seed_table_of_a_seed_only_grid_has_as_many_cells_as_columns():
    lines = sweep.seed_table(["seed"], [_row("0", "0", 30.0, 29.0), _row("0", "1", 32.0, 31.0)])
    header, rule, row = lines[2:5]
    assert header.startswith("| seeds |") and header.count("|") == rule.count("|") == row.count("|")
