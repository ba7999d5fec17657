"""Sweep any settings of ``examples/distill.py`` on the validation split: one subprocess per grid point.

    .venv/bin/python benchmarks/sweep.py --name sweep_segments \
        --grid "max_start_epoch=1,2 expert_epochs=1,2" -- --synthetic_space features --max_steps 1200

Each grid point is one ``examples/distill.py`` run in its own process (the arguments after ``--`` are
passed to every run; shared experts via ``--trajectory_dir``), with no baselines and one evaluation seed.
Runs are resumable: a point whose ``results.json`` exists is read, not rerun, and an interrupted point
continues from its last checkpoint (every ``save_steps``, the last one kept), so an interrupted sweep continues
where it stopped and the table is rewritten after every point. The ranking is by the *best
validation r_mean* over the run's evaluations (test is never looked at for the choice); the test r_mean
of the final set, the learned η and the set-level modality diagnostics are reported beside it. Writes
``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import write_json, write_markdown

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def grid_points(grids: list[str]) -> tuple[list[dict[str, str]], list[str]]:
    """The union of the grids' combinations (in order, without repeats) and the names they set."""
    points, keys = [], []
    for grid in grids:
        axes = [(kv.split("=", 1)[0], kv.split("=", 1)[1].split(",")) for kv in grid.split()]
        keys += [k for k, _ in axes if k not in keys]
        for values in itertools.product(*[v for _, v in axes]):
            point = dict(zip([k for k, _ in axes], values))
            if point not in points:
                points.append(point)
    return points, keys


def point_arguments(point: dict[str, str], passthrough: list[str]) -> list[str]:
    """The arguments of one grid point's run: the passed ones, then the point's (which win).

    A value ``a:b`` is a list (``--name a b``); ``{seed}`` in a passed argument is the point's seed, e.g.
    ``--initial_stages runs/seed{seed}/synthetic_set``.
    """
    passed = [a.replace("{seed}", point["seed"]) for a in passthrough] if "seed" in point else list(passthrough)
    return passed + [x for k, v in point.items() for x in (f"--{k}", *v.split(":"))]


def summarise(out: Path) -> dict:
    """What a finished run says: final / best validation r_mean, test r_mean, η, set diagnostics, time."""
    record = json.loads((out / "results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    evals = [h for h in state["log_history"] if "eval_r_mean" in h]
    logs = [h for h in state["log_history"] if "lr_img" in h]
    final = record["validation"]["r_mean"]["mean"]
    # The evaluations during training train fresh heads on frozen-encoder features. A set reported under another
    # protocol (LoRS / MTT-VL: the image encoder fine-tuned, with the shared frozen protocol beside it in
    # ``shared_protocol``) is ranked by its own protocol's final validation alone: a maximum over both protocols
    # would choose a setting by whichever protocol happened to score higher.
    shared = record.get("shared_protocol")
    row = {"validation_r_mean": final,
           "test_r_mean": record["test"]["r_mean"]["mean"],
           "best_validation_r_mean": final if shared else max([h["eval_r_mean"] for h in evals] + [final]),
           "protocol": record.get("protocol"),
           "curve": [(h["step"], round(h["eval_r_mean"], 2)) for h in evals],
           # The learned inner η, named apart from the grid's own lr_img / lr_txt (the outer learning rates).
           "eta_img": logs[-1]["lr_img"] if logs else None, "eta_txt": logs[-1]["lr_txt"] if logs else None,
           "distillation_s": timings["distillation_s"], "iterations": timings["iterations"],
           # a resumed run's distillation_s covers the iterations after its checkpoint only
           "iterations_timed": timings["iterations"] - timings.get("resumed_from_iteration", 0)}
    if shared:
        row["shared_validation_r_mean"] = shared["validation"]["r_mean"]["mean"]
        row["shared_test_r_mean"] = shared["test"]["r_mean"]["mean"]
    for k, v in (record.get("set_diagnostics") or {}).items():
        row[f"set_{k}"] = v
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="append", required=True,
                        help="Space-separated name=v1,v2 lists; every combination is run. Repeat --grid to run the "
                             "union of several grids. A value a:b passes a list (--name a b): stage_pairs=99:100.")
    parser.add_argument("--name", required=True, help="Results go to benchmarks/results/NAME.{json,md}.")
    parser.add_argument("--work_dir", default=None, help="Where the runs live (default outputs/NAME).")
    parser.add_argument("--report_only", action="store_true",
                        help="Write the table from the points already finished; start no run (a sweep still running "
                             "elsewhere, or one to finish later).")
    parser.add_argument("--launcher", default=f"{sys.executable} {ROOT / 'examples' / 'distill.py'}",
                        help="The command each point runs (default: this Python on examples/distill.py).")
    args, passthrough = parser.parse_known_args()
    passthrough = [a for a in passthrough if a != "--"]
    work = Path(args.work_dir or f"outputs/{args.name}")
    points, keys = grid_points(args.grid)
    rows = []
    for point in points:
        name = "_".join(f"{k}{Path(v).name if '/' in v else v.replace(':', '-')}" for k, v in point.items())
        out = work / name
        if not (out / "results.json").exists():
            if args.report_only:
                continue
            command = [*shlex.split(args.launcher), "--output_dir", str(out), "--baselines", "", "--eval_seeds", "1",
                       "--save_strategy", "steps", "--save_total_limit", "1", "--resume_from_checkpoint", "latest",
                       *point_arguments(point, passthrough)]
            print(f"[sweep] {shlex.join(command)}", flush=True)
            started = time.time()
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "log.txt", "a") as log:  # a resumed point appends
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
            if code:
                print(f"[sweep] {name} failed (exit {code}, {time.time() - started:.0f}s); see {out / 'log.txt'}")
                rows.append({**point, "failed": code})
                continue
        rows.append({**point, **summarise(out)})
        print(f"[sweep] {name}: " + json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
        write(args, passthrough, keys, rows, len(points))


def write(args, passthrough: list[str], keys: list[str], rows: list[dict], planned: int) -> None:
    ok = sorted([r for r in rows if "failed" not in r], key=lambda r: -r["best_validation_r_mean"])
    out = HERE / "results" / args.name
    write_json(out, {"grids": args.grid, "passthrough": passthrough, "rows": rows})
    command = shlex.join(["benchmarks/sweep.py", "--name", args.name, *sum((["--grid", g] for g in args.grid), []),
                          "--", *passthrough])
    lines = [f"# Sweep `{args.name}`\n", f"`.venv/bin/python {command}`\n",
             f"{len(rows)} of {planned} points done; ranked by the best validation r_mean over the run's evaluations "
             "(test is reported, never used to choose). η: the learned inner lrs at the end; set Sim / Gap: the final "
             "set's own embeddings under the reference model.\n",
             "| " + " | ".join(keys) + " | best val | final val | test | η_img | η_txt | set Sim_img | set Sim_txt "
             "| set Gap | s / it | validation curve |",
             "|" + "---|" * (len(keys) + 10)]
    for r in ok:
        curve = " ".join(f"{v:.1f}" for _, v in r["curve"])
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys)
                     + f" | {r['best_validation_r_mean']:.1f} | {r['validation_r_mean']:.1f} | {r['test_r_mean']:.1f}"
                     + f" | {_fmt(r['eta_img'])} | {_fmt(r['eta_txt'])} | {_fmt(r.get('set_sim_image'))}"
                     + f" | {_fmt(r.get('set_sim_text'))} | {_fmt(r.get('set_gap'))}"
                     + f" | {r['distillation_s'] / max(r.get('iterations_timed', r['iterations']), 1):.2f}"
                     + f" | {curve} |")
    for r in rows:
        if "failed" in r:
            lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + f" | failed (exit {r['failed']}) |")
    own = [r for r in ok if "shared_validation_r_mean" in r]
    if own:
        names = "`, `".join(sorted({str(r["protocol"]) for r in own}))
        lines += ["", f"Sets reported under their own protocol (`{names}`) are ranked by its final validation alone "
                  "(best val = final val); their validation curve is the in-training evaluation, heads trained on "
                  "frozen-encoder features. The same sets under that shared frozen protocol:", "",
                  "| " + " | ".join(keys) + " | shared val | shared test |", "|" + "---|" * (len(keys) + 2)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys)
                  + f" | {r['shared_validation_r_mean']:.1f} | {r['shared_test_r_mean']:.1f} |" for r in own]
    if "seed" in keys:
        lines += ["", *seed_table(keys, ok)]
    write_markdown(out, lines, echo=False)


def seed_table(keys: list[str], rows: list[dict]) -> list[str]:
    """Mean ± std over the distillation seeds of each setting (the grid's other names), best validation first."""
    others = [k for k in keys if k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k, "") for k in others), []).append(r)
    metrics = [("best val", "best_validation_r_mean", ".1f"), ("final val", "validation_r_mean", ".1f"),
               ("test", "test_r_mean", ".1f"), ("η_img", "eta_img", ".3f"), ("set Sim_img", "set_sim_image", ".3f"),
               ("set Sim_txt", "set_sim_text", ".3f"), ("set Gap", "set_gap", ".3f")]
    lines = ["Over distillation seeds (mean ± std; population std, the seeds run are listed):", "",
             "| " + " | ".join([*others, "seeds", *(m for m, _, _ in metrics)]) + " |",
             "|" + "---|" * (len(others) + 1 + len(metrics))]
    ranked = sorted(groups.items(), key=lambda g: -statistics.fmean(r["best_validation_r_mean"] for r in g[1]))
    for setting, group in ranked:
        cells = []
        for _, key, fmt in metrics:
            values = [r[key] for r in group if r.get(key) is not None]
            cells.append("–" if not values else
                         f"{statistics.fmean(values):{fmt}} ± {statistics.pstdev(values):{fmt}}")
        seeds = ",".join(sorted(str(r["seed"]) for r in group))
        lines.append("| " + " | ".join([*map(str, setting), seeds, *cells]) + " |")
    return lines


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    main()
