"""Several expert segments per outer iteration: validation r_mean against wall-clock for 1, 2 and 4 segments.

    .venv/bin/python benchmarks/segments.py --segments 1,2,4 --max_steps 150 --eval_steps 25 --seeds 0,1,2

Each point is one ``examples/distill.py`` run of the embedded default with ``--segments_per_iteration
K`` (K segments, each with its own inner-loop plan, matched against one encoder pass; their losses
averaged), the same experts, evaluation on the validation split every ``--eval_steps`` iterations
(fresh heads, one seed), for each distillation seed of ``--seeds``. The x axis is the distillation time
up to that iteration without the time spent evaluating (``(distillation_s - Σ eval_runtime) /
iterations * step``), so K is charged for its extra inner loops and nothing else. The equal-time
comparison is made within each seed (its K runs ran one after another under the same conditions).
Writes ``benchmarks/results/segments.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import command, mean_std, write_json, write_markdown

HERE = Path(__file__).resolve().parent


def curve(run_dir: Path) -> dict:
    """Validation r_mean per evaluated step against the training time spent to reach it."""
    state = json.loads((run_dir / "trainer_state.json").read_text())
    timings = json.loads((run_dir / "timings.json").read_text())
    evals = [h for h in state["log_history"] if "eval_r_mean" in h]
    train_seconds = timings["distillation_s"] - sum(h["eval_runtime"] for h in evals)
    per_iteration = train_seconds / timings["iterations"]
    record = json.loads((run_dir / "results.json").read_text())
    return {"seconds_per_iteration": per_iteration,
            "points": [{"step": h["step"], "seconds": h["step"] * per_iteration, "validation_r_mean": h["eval_r_mean"]}
                       for h in evals],
            "final_test_r_mean": record["test"]["r_mean"]["mean"],
            "final_validation_r_mean": record["validation"]["r_mean"]["mean"]}


def within_budget(curves: dict[int, dict]) -> tuple[float, dict[int, float]]:
    """The shortest run's training time, and each run's best validation r_mean within it (equal-time comparison)."""
    budget = min(c["points"][-1]["seconds"] for c in curves.values())
    return budget, {k: max(p["validation_r_mean"] for p in c["points"] if p["seconds"] <= budget + 1e-9)
                    for k, c in curves.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", default="1,2,4")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=25)
    parser.add_argument("--seeds", default="0", help="Distillation seeds, comma-separated (each seed runs every K).")
    parser.add_argument("--work_dir", default="outputs/segments")
    parser.add_argument("--experts_dir", default="outputs/compare_methods/experts_symmetric",
                        help="Shared symmetric experts (trained on first use).")
    parser.add_argument("--output", default=str(HERE / "results" / "segments"))
    args, passthrough = parser.parse_known_args()

    from repblend_hf.commands import distill

    segments = [int(k) for k in args.segments.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[int, dict[int, dict]] = {}  # seed -> K -> curve
    for seed in seeds:
        for k in segments:
            out = Path(args.work_dir) / f"segments{k}_seed{seed}"
            if not (out / "results.json").exists():  # finished runs are reused
                distill.main(["--segments_per_iteration", str(k), "--max_steps", str(args.max_steps),
                              "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps), "--seed", str(seed),
                              "--output_dir", str(out), "--trajectory_dir", args.experts_dir, "--baselines", "",
                              "--eval_seeds", "1", "--save_strategy", "no", "--disable_tqdm", "true", *passthrough])
            runs.setdefault(seed, {})[k] = curve(out)
            print(seed, k, {key: v for key, v in runs[seed][k].items() if key != "points"}, flush=True)
    # Equal-time comparison within each seed: the K runs of one seed ran one after another under the same
    # conditions, so their seconds per iteration compare; seeds may have run under different ones.
    budgets = {seed: within_budget(curves) for seed, curves in runs.items()}

    out = Path(args.output)
    write_json(out, {"args": vars(args), "passthrough": passthrough, "runs": runs, "budgets": budgets})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, k in enumerate(segments):
        for j, seed in enumerate(seeds):
            c = runs[seed][k]
            ax.plot([p["seconds"] for p in c["points"]], [p["validation_r_mean"] for p in c["points"]], marker="o",
                    markersize=3, color=f"C{i}", alpha=0.8, label=f"{k} segment{'s' if k > 1 else ''} / iteration"
                    if j == 0 else None)
    ax.set_xlabel("distillation seconds (evaluation excluded)")
    ax.set_ylabel("validation r_mean (fresh heads)")
    ax.set_title(f"fashion-scenes, 99 pairs, {args.max_steps} iterations, seeds {args.seeds}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)

    lines = [f"Command: `{command('segments.py')}`", "",
             f"Mean ± std over distillation seeds {seeds}.", "",
             "| segments / iteration | s / iteration | best validation r_mean within the seed's equal-time budget | "
             f"validation r_mean at {args.max_steps} it | test r_mean at {args.max_steps} it |",
             "|---|---|---|---|---|"]
    for k in segments:
        per_seed = [runs[seed][k] for seed in seeds]
        lines.append(f"| {k} | {mean_std([c['seconds_per_iteration'] for c in per_seed], 2)} | "
                     f"{mean_std([budgets[seed][1][k] for seed in seeds])} | "
                     f"{mean_std([c['final_validation_r_mean'] for c in per_seed])} | "
                     f"{mean_std([c['final_test_r_mean'] for c in per_seed])} |")
    lines += ["", "Equal-time budget of each seed (its shortest run's training time, evaluation excluded): "
              + ", ".join(f"seed {seed}: {budgets[seed][0]:.0f} s" for seed in seeds) + ". Per seed:", "",
              "| seed | " + " | ".join(f"K={k}: s/it, best val within budget, test" for k in segments) + " |",
              "|---|" + "---|" * len(segments)]
    for seed in seeds:
        cells = [f"{runs[seed][k]['seconds_per_iteration']:.2f}, {budgets[seed][1][k]:.1f}, "
                 f"{runs[seed][k]['final_test_r_mean']:.1f}" for k in segments]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    write_markdown(out, lines)


if __name__ == "__main__":
    main()
