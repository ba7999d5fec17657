"""LoRS and MTT-VL over a long run at 99 pairs against RepBlend at equal iterations: the in-training curves.

    .venv/bin/python benchmarks/long_run.py
    .venv/bin/python benchmarks/long_run.py --runs "lors=outputs/long_run/lors_99/seed0,repblend=outputs/x/seed0"

Reads finished (or running) distillations: each run's in-training validation r_mean by iteration
(``trainer_state.json``, or its newest checkpoint's while it runs; the DistillationTrainer's evaluation: fresh heads on
frozen-encoder features, the same for every method, one evaluation seed) and, when the run has finished, its
``results.json`` (test r_mean under the method's own protocol, and the shared one for LoRS / MTT-VL). The LoRS and
MTT-VL runs come from ``benchmarks/methods.py --variants lors,mtt_vl --max_steps 300 --eval_steps 50``, RepBlend's
from the pixel default (``--eval_steps 50``); the plot cuts RepBlend's curve at the others' last iteration, so the
methods are compared at equal iterations. Herding and random real pairs (the cross-architecture benchmark's
Lite0 evaluations, ``--baselines_dir``) are drawn as their validation r_mean. Writes
``benchmarks/results/long_run_99.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import command, markdown_table, save_figure, write_json, write_markdown

HERE = Path(__file__).resolve().parent
RUNS = ("lors=outputs/long_run/lors_99/seed0,mtt_vl=outputs/long_run/mtt_vl_99/seed0,"
        "repblend=outputs/cross_architecture/pixel_default/seed0")


def curve(run: Path) -> dict[int, float]:
    """The run's in-training validation r_mean by iteration: its trainer_state.json, else its newest checkpoint's."""
    states = [run / "trainer_state.json"]
    checkpoints = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    states += checkpoints[::-1]
    for state in states:
        if state.exists():
            history = json.loads(state.read_text())["log_history"]
            return {int(h["step"]): float(h["eval_r_mean"]) for h in history if "eval_r_mean" in h}
    return {}


def final(run: Path) -> dict | None:
    """Test r_mean (mean ± std over evaluation seeds) under the run's own protocol and the shared one."""
    path = run / "results.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    out = {"protocol": record.get("protocol"), "test": record["test"]["r_mean"],
           "validation": record["validation"]["r_mean"]}
    if record.get("shared_protocol"):
        out["shared_test"] = record["shared_protocol"]["test"]["r_mean"]
    return out


def baseline(path: Path) -> dict | None:
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return {"test": record["test"]["r_mean"], "validation": record["validation"]["r_mean"]}


def plot(curves: dict[str, dict[int, float]], lines: dict[str, dict], until: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        steps = sorted(k for k in points if k <= until)
        if steps:
            ax.plot(steps, [points[k] for k in steps], marker="o", label=name)
    for name, b in lines.items():
        ax.axhline(b["validation"]["mean"], linestyle="--", linewidth=1, color="gray" if name == "random" else "black",
                   label=f"{name} (real pairs)")
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("validation r_mean (fresh heads, frozen encoder)")
    save_figure(fig, ax, "fashion-scenes, 99 pairs: in-training validation at equal iterations", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=RUNS, help="Comma-separated NAME=RUN_DIR.")
    parser.add_argument("--baselines_dir", default="outputs/cross_architecture/evaluations",
                        help="Where cross_architecture.py keeps its evaluations (herding / random under Lite0).")
    parser.add_argument("--encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--output", default=str(HERE / "results" / "long_run_99"))
    args = parser.parse_args()

    runs = {name: Path(path) for name, path in (item.split("=", 1) for item in args.runs.split(","))}
    curves = {name: curve(run) for name, run in runs.items()}
    finals = {name: final(run) for name, run in runs.items()}
    lines = {name: b for name in ("herding", "random") if (b := baseline(
        Path(args.baselines_dir) / name / "seeds" / args.encoder / "results.json")) is not None}
    others = [max(c) for name, c in curves.items() if name != "repblend" and c]
    until = max(others) if others else max((max(c) for c in curves.values() if c), default=0)
    steps = sorted({k for c in curves.values() for k in c if k <= until})
    write_json(args.output, {"command": command("long_run.py"), "runs": {k: str(v) for k, v in runs.items()},
                             "curves": curves, "final": finals, "baselines": lines, "equal_iterations": until})
    report = ["# LoRS and MTT-VL over a long run, against RepBlend at equal iterations (99 pairs)", "",
              f"Command: `{command('long_run.py')}`", "",
              "In-training validation r_mean (fresh heads on frozen-encoder features, one evaluation seed) by "
              f"iteration, up to {until} (the last iteration of the LoRS / MTT-VL runs so far); '—': not evaluated "
              "there (yet).", ""]
    table = [[name, *(f"{c[k]:.1f}" if k in c else "—" for k in steps)] for name, c in curves.items()]
    report += markdown_table(["method", *map(str, steps)], table)
    report += ["", "Test r_mean of the finished runs (mean ± std over evaluation seeds):", ""]
    rows = []
    for name, f in finals.items():
        if f is None:
            rows.append([name, "running or not started", "—", "—"])
            continue
        shared = f.get("shared_test")
        rows.append([name, f["protocol"], f"{f['test']['mean']:.1f} ± {f['test']['std']:.1f}",
                     f"{shared['mean']:.1f} ± {shared['std']:.1f}" if shared else "—"])
    for name, b in lines.items():
        rows.append([f"{name} (real pairs, {args.encoder})", "InfoNCE, lr 0.1",
                     f"{b['test']['mean']:.1f} ± {b['test']['std']:.1f}", "—"])
    report += markdown_table(["run", "protocol", "test r_mean", "test r_mean, shared protocol"], rows)
    write_markdown(args.output, report)
    plot(curves, lines, until, Path(args.output).with_suffix(".png"))


if __name__ == "__main__":
    main()
