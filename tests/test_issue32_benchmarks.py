"""benchmarks/cross_architecture.py, equivalence.py and long_run.py on tiny inputs (no authors' code, no real
encoders): the tables they write, resuming, and skipping what is absent."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cross_architecture import save_tiny_pixel_set

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def scripts(monkeypatch):
    """Import a benchmark script as Python runs it: with benchmarks/ (where its ``_common`` lives) on sys.path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


@pytest.fixture(scope="module")
def tiny_run(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path_factory):
    """A finished run folder as a distillation leaves it: synthetic_set/ (real pairs, test_convnext), results.json."""
    run = tmp_path_factory.mktemp("run") / "seed0"
    save_tiny_pixel_set(tiny_karpathy_dir, tiny_text_encoder_dir, run / "synthetic_set", num_pairs=8,
                        similarity="lowrank", sim_rank=2)
    (run / "results.json").write_text("{}")
    return run


def test_cross_architecture_table_resumes_and_marks_what_is_missing(tiny_run, tiny_karpathy_dir,
                                                                    tiny_text_encoder_dir, tmp_path):
    out = tmp_path / "table"
    argv = [sys.executable, str(BENCHMARKS / "cross_architecture.py"), "--work_dir", str(tmp_path / "work"),
            "--encoders", "test_convnext,test_efficientnet", "--distill_seeds", "0", "--no-distill",
            "--lors_runs", str(tiny_run), "--baselines", "random", "--pairs", "8", "--eval_seeds", "2",
            "--embed_dim", "8", "--output", str(out), "--dataset", str(tiny_karpathy_dir),
            "--text_encoder", str(tiny_text_encoder_dir), "--text_pooling", "mean", "--pretrained_image_encoder",
            "false", "--image_size", "32", "--num_views", "1", "--encode_batch_size", "16", "--epochs", "3"]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
    record = json.loads(out.with_suffix(".json").read_text())
    table = record["table"]
    assert set(table) == {"lors", "lors_infonce", "random"}  # the pixel default's seed 0 was never distilled here
    assert set(table["lors"]) == {"test_convnext", "test_efficientnet"}
    assert any("pixel_default seed0" in p for p in record["pending"])
    cell = tmp_path / "work" / "evaluations" / "lors" / "seed0" / "test_efficientnet" / "results.json"
    saved = json.loads(cell.read_text())
    assert saved["settings"]["image_encoder"] == "test_efficientnet" and saved["settings"]["loss"] == "wbce"
    infonce = cell.parents[2].parent / "lors_infonce" / "seed0" / "test_efficientnet" / "results.json"
    assert json.loads(infonce.read_text())["settings"]["loss"] == "infonce"
    assert saved["settings"]["distilled_with"] == "test_convnext"
    md = out.with_suffix(".md").read_text()
    assert "| LoRS (Lite0) |" in md and "Not run yet" in md and out.with_suffix(".png").exists()
    # A second run finds every evaluation on disk: nothing is evaluated again.
    before = cell.stat().st_mtime_ns
    second = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
    assert cell.stat().st_mtime_ns == before and "examples/evaluate.py" not in second.stdout


def test_cross_architecture_margin_says_whether_two_std_are_cleared(scripts):
    cross = scripts("cross_architecture")
    table = {"pixel_default": {"e": {"runs": {"seed0": 20.0, "seed1": 22.0}, "eval_std": {}}},
             "herding": {"e": {"runs": {"seeds": 10.0}, "eval_std": {"seeds": 1.0}}},
             "random": {"e": {"runs": {"seeds": 19.0}, "eval_std": {"seeds": 0.5}}},
             "lors": {"e": {"runs": {"seed0": 10.5}, "eval_std": {"seed0": 0.2}}}}
    lines = cross.margins(table, ["e"])
    assert len(lines) == 2 and "RepBlend, pixel default (Lite0): against" in lines[0]
    assert lines[1].startswith("- e, LoRS (Lite0): against herding +0.5 (2 std = 2.0: does not beat it by 2 std)")
    assert "herding +11.0 (2 std = 2.0: beats it by more than 2 std)" in lines[0]
    assert "random +2.0 (2 std = 2.0: does not beat it by 2 std)" in lines[0]


def test_equivalence_rebuilds_the_authors_draws(scripts):
    equivalence = scripts("equivalence")
    case = {"num_pairs": 6, "mini_batch_size": 4, "syn_steps": 3}
    perms = [torch.tensor([5, 4, 3, 2, 1, 0]), torch.tensor([1, 0, 2, 3]), torch.tensor([0, 1, 2, 3, 4, 5]),
             torch.tensor([3, 2, 1, 0]), torch.tensor([2, 3, 4, 5, 0, 1]), torch.tensor([0, 2, 1, 3])]
    record = {"tensors": {f"randperm.{i}": p for i, p in enumerate(perms)}, "randperm_sizes": [len(p) for p in perms],
              "beta": [0.1, 0.2, 0.3], "start_epoch": [1]}
    start, batches, blends = equivalence.authors_draws("repblend", case, record)
    # 4 of 6 taken, then too few left: a fresh permutation per step (RepBlend / LoRS walk; MTT-VL takes a prefix).
    assert start == 1 and [b.tolist() for b in batches] == [[5, 4, 3, 2], [0, 1, 2, 3], [2, 3, 4, 5]]
    assert [b.lam for b in blends] == [0.1, 0.2, 0.3] and blends[1].perm.tolist() == [3, 2, 1, 0]
    _, batches, blends = equivalence.authors_draws("mtt_vl", case, record)
    assert [b.tolist() for b in batches] == [[5, 4, 3, 2], [0, 1, 2, 3], [2, 3, 4, 5]]
    assert all(b.lam == 1.0 for b in blends)


def test_equivalence_library_side_is_deterministic_and_its_control_can_fail(scripts):
    """The library side of a case run twice gives the same gradients; with the mini-batches in another order it
    does not (the report's 'control' column: a comparison that agrees could have failed)."""
    equivalence = scripts("equivalence")
    case, tensors = equivalence.make_case("repblend", 0)
    again, _ = equivalence.make_case("repblend", 0)
    assert case == again
    g = torch.Generator().manual_seed(0)
    n, mbs = case["num_pairs"], case["mini_batch_size"]
    batches = [torch.randperm(n, generator=g)[:mbs] for _ in range(case["syn_steps"])]
    from repblend_hf.blending import sample_blend

    blends = [sample_blend(mbs, 1.0, g) for _ in batches]
    one = equivalence.run_library("repblend", case, tensors, 0, batches, blends)
    two = equivalence.run_library("repblend", case, tensors, 0, batches, blends)
    rotated = equivalence.run_library("repblend", case, tensors, 0, batches[1:] + batches[:1], blends[1:] + blends[:1])
    for name in ("images", "texts", "similarity.left", "eta_img"):
        assert equivalence.relative(two[name], one[name])["max_abs_rel"] == 0.0
    assert equivalence.worst(equivalence.differences(rotated, {k: one[k] for k in ("images", "texts")})) > 1e-2


def test_equivalence_skips_methods_without_a_checkout(tmp_path):
    out = tmp_path / "eq"
    subprocess.run([sys.executable, str(BENCHMARKS / "equivalence.py"), "--seeds", "0", "--inner_steps", "2",
                    "--repblend", str(tmp_path / "nowhere"), "--output", str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    record = json.loads(out.with_suffix(".json").read_text())
    assert set(record["skipped"]) == {"repblend", "lors", "mtt_vl"} and not record["methods"]
    assert "not found" in record["skipped"]["repblend"] and "no checkout given" in record["skipped"]["lors"]
    assert "repblend skipped" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_long_run_evaluates_a_runs_start_and_end_and_says_whether_it_climbed(tiny_karpathy_dir, tiny_text_encoder_dir,
                                                                             tmp_path):
    """A finished tiny LoRS run: long_run.py rebuilds its starting set (the same iteration-0 validation as the run's)
    and evaluates start and end under both protocols with several seeds; a rerun evaluates nothing again."""
    data = ["--dataset", str(tiny_karpathy_dir), "--image_encoder", "test_efficientnet", "--pretrained_image_encoder",
            "false", "--text_encoder", str(tiny_text_encoder_dir), "--image_size", "32", "--num_views", "1",
            "--encode_batch_size", "16"]
    run = tmp_path / "lors_8" / "seed1"
    experts = tmp_path / "experts"
    start_args = ["--config", "none", "--num_pairs", "8", "--sim_rank", "2", "--embed_dim", "256", "--num_experts",
                  "1", "--expert_train_epochs", "2", "--mini_batch_size", "4", "--syn_steps", "2", "--max_start_epoch",
                  "1", "--trajectory_dir", str(experts), "--eval_strategy", "steps", "--eval_steps", "1",
                  "--eval_on_start", "true"]
    subprocess.run([sys.executable, "examples/distill.py", *data, *start_args, "--method", "lors", "--seed", "1",
                    "--max_steps", "2", "--lr_img", "100", "--lr_txt", "100", "--save_strategy", "no", "--eval_seeds",
                    "1", "--baselines", "", "--disable_tqdm", "true", "--output_dir", str(run)],
                   cwd=ROOT, check=True, capture_output=True, text=True, env={**__import__("os").environ,
                                                                              "HF_HUB_OFFLINE": "1"})
    out = tmp_path / "long_run"
    argv = [sys.executable, str(BENCHMARKS / "long_run.py"), "--runs", f"lors={run}", "--baselines_dir",
            str(tmp_path / "none"), "--work_dir", str(tmp_path / "work"), "--eval_seeds", "2", "--start_args",
            " ".join(start_args), "--output", str(out), *data, "--epochs", "2"]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
    record = json.loads(out.with_suffix(".json").read_text())
    cells = record["start_end"]["lors"]
    assert set(cells) == {"start_own", "start_shared", "start_step0", "end_own", "end_shared", "end_own_init_eta"}
    assert all(cells[k]["seeds"] == 2 for k in ("start_own", "start_shared", "end_own", "end_shared",
                                                 "end_own_init_eta"))
    # The rebuilt start is the run's start: the same set at iteration 0, so the same validation there.
    assert cells["start_step0"] == pytest.approx(record["curves"]["lors"]["0"])
    md = out.with_suffix(".md").read_text()
    assert "| lors | own |" in md and "| lors | shared |" in md and "2 std = " in md
    start = tmp_path / "work" / "lors" / "seed1" / "start" / "results.json"
    ends = [start.parents[1] / f"end_{p}" / "results.json" for p in ("own", "frozen", "own_init_eta")]
    assert json.loads(ends[0].read_text())["protocol"] == "finetune_encoder"
    assert json.loads(ends[1].read_text())["protocol"] == "frozen_encoder"
    at_init = json.loads(ends[2].read_text())["settings"]  # the own protocol at η's init, not the learned η
    assert at_init["protocol"] == "finetune_encoder" and at_init["encoder_lr"] == at_init["text_head_lr"] == 0.1
    assert "| lors | own, η at its init |" in md
    before = [p.stat().st_mtime_ns for p in (start, *ends)]
    second = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
    assert [p.stat().st_mtime_ns for p in (start, *ends)] == before and "examples/" not in second.stdout
