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
Lite0 evaluations, ``--baselines_dir``) are drawn as their validation r_mean.

The in-training curve has one evaluation seed, and the run's own final evaluation too (``methods.py`` asks for one).
So for each LoRS / MTT-VL run this script also evaluates, with ``--eval_seeds`` seeds (each a subprocess
of its own, kept under ``--work_dir`` and reused when rerun):

- the run's **starting set**: the same distillation (method, seed, experts: ``--start_args``) for one iteration at
  learning rates too small to move anything (1e-12; 0 is refused), then its final evaluation under the method's own
  protocol and the shared one; its iteration-0 validation must equal the run's, which the table shows (evaluated as
  soon as the run has begun);
- the **distilled set**, once the run has finished: ``examples/evaluate.py --protocol own`` and ``--protocol frozen``,
  and ``--protocol own --lr`` η's init (``--init_eta``, the η the start is evaluated at): what the pixels give under
  the own protocol apart from the η the run learned.

The table then says whether each set ends above its start and above herding by more than 2 std (the larger of the
two rows' std over evaluation seeds). Writes ``benchmarks/results/long_run_99.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import (
    command,
    evaluate_arguments,
    known_arguments,
    markdown_table,
    run_logged,
    save_figure,
    starting_set_command,
    write_json,
    write_markdown,
)

HERE = Path(__file__).resolve().parent
RUNS = ("lors=outputs/long_run/lors_99/seed0,mtt_vl=outputs/long_run/mtt_vl_99/seed0,"
        "repblend=outputs/cross_architecture/pixel_default/seed0")
# What the long runs of benchmarks/methods.py gave every LoRS / MTT-VL distillation besides the method and seed.
START_ARGS = ("--num_experts 4 --expert_train_epochs 2 --embed_dim 1280 "
              "--trajectory_dir outputs/long_run/experts_asymmetric --eval_steps 50")


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
    timings = run / "timings.json"
    out["iterations"] = json.loads(timings.read_text()).get("iterations") if timings.exists() else None
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


def run_seed(run: Path) -> int:
    """The distillation seed of a run folder named ``seedN`` (methods.py's layout); 0 otherwise."""
    digits = run.name.removeprefix("seed")
    return int(digits) if run.name.startswith("seed") and digits.isdigit() else 0


def start_command(method: str, run: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The run's starting set, evaluated: one iteration of the same distillation at learning rates that move
    nothing, then the final evaluation with ``--eval_seeds`` seeds (own protocol and the shared one). Of ``extra``,
    the data's arguments go along (the evaluations' own, e.g. ``--epochs``, are for ``examples/evaluate.py``)."""
    from repblend_hf.pipeline import DataArguments

    data = known_arguments(extra, (DataArguments,))
    return starting_set_command(method, run_seed(run), out, [*args.start_args.split(), *data], args.eval_seeds,
                                args.cpu_threads)


#: The distilled set's evaluations: folder ``end_<name>`` -> (``--protocol``, whether at η's init ``--init_eta``).
ENDS = {"own": ("own", False), "frozen": ("frozen", False), "own_init_eta": ("own", True)}


def end_command(run: Path, end: str, out: Path, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The run's distilled set under the protocol of ``ENDS[end]``, with ``--eval_seeds`` seeds; 'own_init_eta': the
    own protocol with the encoder and text head trained at η's init (what the starting set is evaluated at) instead
    of the learned η, which tells what the pixels give apart from what the learned η does."""
    protocol, init_eta = ENDS[end]
    return [sys.executable, "examples/evaluate.py", "--method", "distilled", "--distilled_set",
            str(run / "synthetic_set"), "--protocol", protocol, *(["--lr", str(args.init_eta)] if init_eta else []),
            "--seeds", str(args.eval_seeds), "--cpu_threads", str(args.cpu_threads), *evaluate_arguments(extra),
            "--output_dir", str(out)]


def evaluate_runs(runs: dict[str, Path], args: argparse.Namespace, extra: list[str]) -> dict[str, dict]:
    """Start (once the run has begun) and end (once it has finished) of every LoRS / MTT-VL run with ``--eval_seeds``
    seeds; finished evaluations are reused.
    Returns, per run name, the test and validation r_mean (mean / std) of 'start_own', 'start_shared', 'end_own',
    'end_shared', 'end_own_init_eta' that exist, and the starting set's iteration-0 validation (``start_step0``)."""
    out: dict[str, dict] = {}
    for name, run in runs.items():
        if name == "repblend" or not run.exists():
            continue
        work = Path(args.work_dir) / name / run.name
        start = work / "start"  # the start needs only the run's experts: evaluated while the run is still going
        if args.evaluate and not (start / "results.json").exists():
            run_logged(start_command(name, run, start, args, extra), start / "run.log")
        for kind in ENDS:
            end = work / f"end_{kind}"
            if args.evaluate and (run / "results.json").exists() and not (end / "results.json").exists():
                run_logged(end_command(run, kind, end, args, extra), end / "run.log")
        cells: dict = {}
        if (start / "results.json").exists():
            record = json.loads((start / "results.json").read_text())
            cells["start_own"] = scores(record)
            if record.get("shared_protocol"):
                cells["start_shared"] = scores(record["shared_protocol"])
            cells["start_step0"] = curve(start).get(0)
        for kind, key in (("own", "end_own"), ("frozen", "end_shared"), ("own_init_eta", "end_own_init_eta")):
            path = work / f"end_{kind}" / "results.json"
            if path.exists():
                cells[key] = scores(json.loads(path.read_text()))
        out[name] = cells
    return out


def scores(record: dict) -> dict:
    return {"test": record["test"]["r_mean"], "validation": record["validation"]["r_mean"],
            "seeds": record.get("seeds")}


def verdict(mean: float, std: float, other: dict) -> str:
    """``+x.x (2 std = y.y: above / not above)`` of a set against another row (test r_mean)."""
    margin, two_std = mean - other["mean"], 2 * max(std, other["std"])
    return f"{margin:+.1f} (2 std = {two_std:.1f}: {'above' if margin > two_std else 'not above'})"


def start_end_report(evaluated: dict[str, dict], curves: dict[str, dict[int, float]], lines: dict[str, dict],
                     eval_seeds: int) -> list[str]:
    """The table of each run's start and end (own protocol, shared protocol, own protocol at η's init), each end
    against its start and against herding."""
    if not evaluated:
        return []
    report = ["", f"Start and end with {eval_seeds} evaluation seeds (test r_mean, mean ± std over the seeds; "
              "`start`: the run's starting set, one iteration at learning rates of 1e-12; the herding column: "
              "herding's test r_mean under its strongest protocol, against which each set is compared):", ""]
    rows = []
    for name, cells in evaluated.items():
        step0 = cells.get("start_step0")
        run0 = curves.get(name, {}).get(0)
        same = "—" if step0 is None or run0 is None else f"{step0:.2f} / {run0:.2f}"
        for protocol, start_key, end_key in (("own", "start_own", "end_own"), ("shared", "start_shared", "end_shared"),
                                             ("own, η at its init", "start_own", "end_own_init_eta")):
            start, end = cells.get(start_key), cells.get(end_key)
            herding = lines.get("herding")
            s = f"{start['test']['mean']:.1f} ± {start['test']['std']:.1f}" if start else "not evaluated yet"
            if end is None:
                rows.append([name, protocol, s, "running or not evaluated yet", "—", "—", same])
                continue
            e = end["test"]
            rows.append([name, protocol, s, f"{e['mean']:.1f} ± {e['std']:.1f}",
                         verdict(e["mean"], e["std"], start["test"]) if start else "—",
                         verdict(e["mean"], e["std"], herding["test"]) if herding else "—", same])
    report += markdown_table(["run", "protocol", "start", "end", "end − start", "end − herding",
                              "iteration-0 validation: start set / run"], rows)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=RUNS, help="Comma-separated NAME=RUN_DIR.")
    parser.add_argument("--baselines_dir", default="outputs/cross_architecture/evaluations",
                        help="Where cross_architecture.py keeps its evaluations (herding / random under Lite0).")
    parser.add_argument("--encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--output", default=str(HERE / "results" / "long_run_99"))
    parser.add_argument("--work_dir", default="outputs/long_run/evaluations",
                        help="Where the start and end evaluations of each run go (reused when rerun).")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="Run the missing start and end evaluations (off: use only those on disk).")
    parser.add_argument("--eval_seeds", type=int, default=3, help="Evaluation seeds of each start and end.")
    parser.add_argument("--start_args", default=START_ARGS,
                        help="The long runs' distillation arguments besides method and seed (for the starting set).")
    parser.add_argument("--init_eta", type=float, default=0.1,
                        help="η's init (the configs' inner_lr_*): the distilled set is also evaluated at it.")
    parser.add_argument("--cpu_threads", type=int, default=1, help="torch threads of each subprocess.")
    args, extra = parser.parse_known_args()  # the rest goes to every evaluation (e.g. --dataset)

    runs = {name: Path(path) for name, path in (item.split("=", 1) for item in args.runs.split(","))}
    curves = {name: curve(run) for name, run in runs.items()}
    finals = {name: final(run) for name, run in runs.items()}
    lines = {name: b for name in ("herding", "random") if (b := baseline(
        Path(args.baselines_dir) / name / "seeds" / args.encoder / "results.json")) is not None}
    others = [max(c) for name, c in curves.items() if name != "repblend" and c]
    until = max(others) if others else max((max(c) for c in curves.values() if c), default=0)
    steps = sorted({k for c in curves.values() for k in c if k <= until})
    evaluated = evaluate_runs(runs, args, extra)
    write_json(args.output, {"command": command("long_run.py"), "runs": {k: str(v) for k, v in runs.items()},
                             "curves": curves, "final": finals, "baselines": lines, "equal_iterations": until,
                             "eval_seeds": args.eval_seeds, "start_end": evaluated})
    report = ["# LoRS and MTT-VL over a long run, against RepBlend at equal iterations (99 pairs)", "",
              f"Command: `{command('long_run.py')}`", "",
              "In-training validation r_mean (fresh heads on frozen-encoder features, one evaluation seed) by "
              f"iteration, up to {until} (the last iteration of the LoRS / MTT-VL runs so far); '—': not evaluated "
              "there (yet).", ""]
    table = [[name, *(f"{c[k]:.1f}" if k in c else "—" for k in steps)] for name, c in curves.items()]
    report += markdown_table(["method", *map(str, steps)], table)
    report += ["", "Test r_mean of the finished runs as each run evaluated itself (mean ± std over its evaluation "
               "seeds; the LoRS / MTT-VL runs of methods.py have one):", ""]
    rows = []
    for name, f in finals.items():
        if f is None:
            rows.append([name, "—", "running or not started", "—", "—"])
            continue
        shared = f.get("shared_test")
        rows.append([name, f.get("iterations") or "—", f["protocol"],
                     f"{f['test']['mean']:.1f} ± {f['test']['std']:.1f}",
                     f"{shared['mean']:.1f} ± {shared['std']:.1f}" if shared else "—"])
    for name, b in lines.items():
        rows.append([f"{name} (real pairs, {args.encoder})", "—", "InfoNCE, lr 0.1",
                     f"{b['test']['mean']:.1f} ± {b['test']['std']:.1f}", "—"])
    report += markdown_table(["run", "iterations", "protocol", "test r_mean", "test r_mean, shared protocol"], rows)
    report += start_end_report(evaluated, curves, lines, args.eval_seeds)
    write_markdown(args.output, report)
    plot(curves, lines, until, Path(args.output).with_suffix(".png"))


if __name__ == "__main__":
    main()
