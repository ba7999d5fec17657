"""Issue #3's comparison: RepBlend, its ablations, LoRS and MTT-VL, distilled with 3 seeds each.

    .venv/bin/python benchmarks/compare_methods.py                         # all variants, 3 seeds
    .venv/bin/python benchmarks/compare_methods.py --variants repblend,repblend_no_blend --seeds 0,1,2
    .venv/bin/python benchmarks/compare_methods.py --max_steps 300         # any distill.py argument passes through

Every run is ``examples/distill.py`` with the embedded default config (``examples/configs/
fashion_scenes_99.yaml``) plus the variant's overrides, the same iteration budget for all, one
distillation seed per run; symmetric and asymmetric variants each share one set of expert
trajectories. The random coreset and full data are evaluated with the same seeds under their
strongest protocol (InfoNCE, lr 0.1). Writes ``benchmarks/results/methods_99.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

VARIANTS: dict[str, list[str]] = {
    "repblend": [],
    "repblend_no_blend": ["--blend_beta", "0"],
    "repblend_no_symmetric": ["--matching", "asymmetric"],
    "lors": ["--method", "lors"],
    "mtt_vl": ["--method", "mtt_vl"],
}
METRICS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")


def summarize(rows: list[dict]) -> dict:
    """Mean and (population) std over seeds of every metric."""
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in rows[0]}


def matching_of(name: str) -> str:
    overrides = VARIANTS[name]
    return "asymmetric" if ("asymmetric" in overrides or "lors" in overrides or "mtt_vl" in overrides) else "symmetric"


def add_expert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts_dir", default=None,
                        help="Where the shared experts live (default: WORK_DIR); reuse them across budgets.")
    parser.add_argument("--asymmetric_experts", type=int, default=None,
                        help="Experts for the asymmetric variants (default: as the config). Each trains the image "
                             "encoder from pixels, ~90 s per epoch on 2 cores at 64 px.")
    parser.add_argument("--asymmetric_expert_epochs", type=int, default=None,
                        help="Epochs of the asymmetric experts (default: as the config). Segments start before "
                             "max_start_epoch and span expert_epochs, so max_start_epoch - 1 + expert_epochs "
                             "epochs give the same segments as more.")


def run_variant(name: str, seed: int, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One ``examples/distill.py`` run of a variant (skipped when ``out/results.json`` exists); its records."""
    import distill

    matching = matching_of(name)
    experts = []
    if matching == "asymmetric" and args.asymmetric_experts:
        experts += ["--num_experts", str(args.asymmetric_experts)]
    if matching == "asymmetric" and args.asymmetric_expert_epochs:
        experts += ["--expert_train_epochs", str(args.asymmetric_expert_epochs)]
    done = out / "results.json"
    if not done.exists():  # finished runs are kept: the benchmark resumes where it stopped
        distill.main(["--seed", str(seed), "--output_dir", str(out), "--baselines", "", "--eval_seeds", "1",
                      "--trajectory_dir", str(Path(args.experts_dir or args.work_dir) / f"experts_{matching}"),
                      "--save_strategy", "no", *experts, *VARIANTS[name], *extra])
    record = json.loads(done.read_text())
    timing = out / "timings.json"
    return {"test": {k: record["test"][k]["mean"] for k in METRICS},
            "test_selected_on_test": {k: record["test_selected_on_test"][k]["mean"] for k in METRICS},
            "timings": json.loads(timing.read_text()) if timing.exists() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--baselines", default="random,full")
    parser.add_argument("--work_dir", default="outputs/compare_methods")
    parser.add_argument("--output", default=str(HERE / "results" / "methods_99"))
    add_expert_arguments(parser)
    args, passthrough = parser.parse_known_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work_dir)
    rows: dict[str, list[dict]] = {}
    selected_on_test: dict[str, list[dict]] = {}
    timings: dict[str, list[dict]] = {}
    for name in args.variants.split(","):
        for seed in seeds:
            run = run_variant(name, seed, work / name / f"seed{seed}", args, passthrough)
            rows.setdefault(name, []).append(run["test"])
            selected_on_test.setdefault(name, []).append(run["test_selected_on_test"])
            if run["timings"]:
                timings.setdefault(name, []).append(run["timings"])

    from repblend_hf.pipeline import DataArguments, evaluate_baseline, prepare_features

    prepared = prepare_features(DataArguments())
    for name in filter(None, args.baselines.split(",")):
        n = prepared.features["train"].num_images if name == "full" else 99
        result = evaluate_baseline(name, prepared.features, n, embed_dim=512, seeds=seeds)
        rows[name] = [s.test for s in result.seeds]
        selected_on_test[name] = [s.test_selected_on_test for s in result.seeds]

    table = {name: summarize(r) for name, r in rows.items()}
    on_test = {name: summarize(r) for name, r in selected_on_test.items()}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "passthrough": passthrough, "test": table,
                                                    "test_selected_on_test": on_test, "per_seed": rows,
                                                    "timings": timings}, indent=2) + "\n")
    lines = [f"# fashion-scenes, 99 pairs: test retrieval, validation-selected epoch, seeds {seeds}", "",
             f"Command: `.venv/bin/python benchmarks/compare_methods.py {shlex.join(sys.argv[1:])}`", "",
             "| method | " + " | ".join(METRICS) + " | r_mean (test-selected) | s / iteration |",
             "|---|" + "---|" * (len(METRICS) + 2)]
    for name, summary in table.items():
        cells = [f"{summary[k]['mean']:.1f} ± {summary[k]['std']:.1f}" for k in METRICS]
        runs = timings.get(name, [])
        per_iteration = f"{np.mean([t['distillation_s'] / t['iterations'] for t in runs]):.2f}" if runs else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {on_test[name]['r_mean']['mean']:.1f} | "
                     f"{per_iteration} |")
    lines += ["", "Coresets and full data: InfoNCE, lr 0.1 (their strongest protocol); distilled sets: wBCE against "
              "the learned similarity with the learned η (InfoNCE for MTT-VL). s / iteration: distillation wall "
              "time (Trainer.train) / iterations, 2 CPU cores."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
