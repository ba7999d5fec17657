"""benchmarks/sweep.py: the grid it runs and the over-seeds table it reports."""

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
