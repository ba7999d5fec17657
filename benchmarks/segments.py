"""Several expert segments per outer iteration: validation r_mean against wall-clock for 1, 2 and 4 segments.

    .venv/bin/python benchmarks/segments.py --segments 1,2,4 --max_steps 300 --eval_steps 25

Each point is one ``examples/distill.py`` run of the embedded default with ``--segments_per_iteration
K`` (K segments, each with its own inner-loop plan, matched against one encoder pass; their losses
averaged), the same experts, evaluation on the validation split every ``--eval_steps`` iterations
(fresh heads, one seed). The x axis is the distillation time up to that iteration without the time
spent evaluating (``(distillation_s - Σ eval_runtime) / iterations * step``), so K is charged for
its extra inner loops and nothing else. Writes ``benchmarks/results/segments.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", default="1,2,4")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="outputs/segments")
    parser.add_argument("--experts_dir", default="outputs/compare_methods/experts_symmetric",
                        help="Shared symmetric experts (trained on first use).")
    parser.add_argument("--output", default=str(HERE / "results" / "segments"))
    args, passthrough = parser.parse_known_args()

    import distill

    curves = {}
    for k in [int(k) for k in args.segments.split(",")]:
        out = Path(args.work_dir) / f"segments{k}_seed{args.seed}"
        if not (out / "results.json").exists():  # finished runs are reused
            distill.main(["--segments_per_iteration", str(k), "--max_steps", str(args.max_steps),
                          "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps), "--seed", str(args.seed),
                          "--output_dir", str(out), "--trajectory_dir", args.experts_dir, "--baselines", "",
                          "--eval_seeds", "1", "--save_strategy", "no", "--disable_tqdm", "true", *passthrough])
        curves[k] = curve(out)
        print(k, {key: v for key, v in curves[k].items() if key != "points"}, flush=True)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "passthrough": passthrough,
                                                    "curves": curves}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, c in curves.items():
        ax.plot([p["seconds"] for p in c["points"]], [p["validation_r_mean"] for p in c["points"]], marker="o",
                markersize=3, label=f"{k} segment{'s' if k > 1 else ''} / iteration")
    ax.set_xlabel("distillation seconds (evaluation excluded)")
    ax.set_ylabel("validation r_mean (fresh heads)")
    ax.set_title(f"fashion-scenes, 99 pairs, {args.max_steps} iterations each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)

    budget = min(c["points"][-1]["seconds"] for c in curves.values())
    lines = [f"Command: `.venv/bin/python benchmarks/segments.py {shlex.join(sys.argv[1:])}`", "",
             "| segments / iteration | s / iteration | best validation r_mean within "
             f"{budget:.0f} s | validation r_mean at {args.max_steps} it | test r_mean at {args.max_steps} it |",
             "|---|---|---|---|---|"]
    for k, c in curves.items():
        within = max(p["validation_r_mean"] for p in c["points"] if p["seconds"] <= budget + 1e-9)
        lines.append(f"| {k} | {c['seconds_per_iteration']:.2f} | {within:.1f} | "
                     f"{c['final_validation_r_mean']:.1f} | {c['final_test_r_mean']:.1f} |")
    lines += ["", f"The budget column compares the runs at equal training time: the shortest run's {budget:.0f} s."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
