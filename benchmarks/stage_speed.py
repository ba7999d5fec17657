"""Seconds per outer iteration of each stage of the pixel configs on this machine: do 199 and 499 pixel pairs fit
60 minutes of distillation on 2 cores (issue #31)?

    .venv/bin/python benchmarks/stage_speed.py --cpu_threads 2 --iterations 50

Each probe is ``examples/distill.py`` for ``--iterations`` iterations of one stage, with no evaluation or checkpoint
during them: the pixel default's 99 pairs (the first stage of every pixel config), the second stage of
``fashion_scenes_199.yaml`` (100 pairs grown on a finished 99-pair set) and the third of ``fashion_scenes_499.yaml``
(300 pairs grown on a finished 199-pair set). A later stage's conditioned experts are copied from the run that
distilled it, so only the iterations are timed. s / iteration is ``Trainer.train``'s wall time over its iterations
(``timings.json``); times the configs' 1,000 iterations per stage it gives each config's minutes of distillation,
conditioned experts not counted (they are listed from the runs they are copied from). Run it on an otherwise idle
machine. Writes ``benchmarks/results/stage_speed.{md,json}`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from _common import command, markdown_table, write_json, write_markdown

HERE = Path(__file__).resolve().parent
STAGE_ITERATIONS = 1000  # per stage, in fashion_scenes_{99,199,499}.yaml


def probes(args: argparse.Namespace) -> list[dict]:
    """The three probes: their label, the stage's pairs, the distill arguments and the experts to copy in."""
    return [
        {"label": "99 pairs (the first stage of every pixel config)", "pairs": 99, "argv": ["--num_pairs", "99"],
         "experts": None},
        {"label": "199 pairs: the second stage (100 pairs on 99)", "pairs": 199,
         "argv": ["--num_pairs", "199", "--stage_pairs", "99", "100", "--stage_targets", "conditioned",
                  "--initial_stages", args.set_99],
         "experts": ("stage_2", Path(args.run_199) / "stage_2" / "experts")},
        {"label": "499 pairs: the third stage (300 pairs on 199)", "pairs": 499,
         "argv": ["--num_pairs", "499", "--stage_pairs", "99", "100", "300", "--stage_targets", "conditioned",
                  "--initial_stages", str(Path(args.run_199) / "synthetic_set")],
         "experts": ("stage_3", Path(args.run_499) / "stage_3" / "experts")},
    ]


def run_probe(probe: dict, args: argparse.Namespace) -> dict:
    out = Path(args.work_dir) / f"pairs{probe['pairs']}_threads{args.cpu_threads}"
    if not (out / "timings.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        if probe["experts"]:
            stage, source = probe["experts"]
            if not (source / "trajectories.json").is_file():
                raise SystemExit(f"{source} holds no finished conditioned experts; distil that set first "
                                 "(docs/results.md, 'Pixels in stages', gives the sweeps) or pass its run folder")
            shutil.copytree(source, out / stage / "experts")
        argv = [sys.executable, str(HERE.parent / "examples" / "distill.py"), *probe["argv"],
                "--trajectory_dir", args.experts, "--max_steps", str(args.iterations), "--eval_strategy", "no",
                "--eval_on_start", "false", "--save_strategy", "no", "--baselines", "", "--eval_seeds", "1",
                "--cpu_threads", str(args.cpu_threads), "--disable_tqdm", "true", "--logging_steps", "10",
                "--seed", "0", "--output_dir", str(out)]
        print("[stage_speed]", " ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    timings = json.loads((out / "timings.json").read_text())
    seconds = timings["distillation_s"] / timings["iterations"]
    experts = None
    if probe["experts"]:
        source_timings = probe["experts"][1].parent.parent / "timings.json"
        if source_timings.is_file():
            experts = json.loads(source_timings.read_text()).get("experts_s")
    return {"label": probe["label"], "pairs": probe["pairs"], "iterations": timings["iterations"],
            "s_per_iteration": seconds, "machine": timings.get("machine"),
            "conditioned_experts_s_in_source_run": experts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu_threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=50, help="Timed iterations per probe.")
    parser.add_argument("--experts", default="outputs/cross_architecture/experts",
                        help="The pixel default's experts (the first stage's targets).")
    parser.add_argument("--set_99", default="outputs/cross_architecture/pixel_default/seed0/synthetic_set",
                        help="A finished 99-pair pixel set: what the 199-pair probe grows.")
    parser.add_argument("--run_199", default="outputs/stages_199_pixels/seed0_stage_targetsconditioned",
                        help="The run that grew it to 199 pairs: its set and its second stage's experts.")
    parser.add_argument("--run_499", default="outputs/stages_499_pixels/seed0_stage_targetsconditioned",
                        help="The run that grew that to 499 pairs: its third stage's experts.")
    parser.add_argument("--work_dir", default="outputs/stage_speed")
    parser.add_argument("--output", default=str(HERE / "results" / "stage_speed"))
    args = parser.parse_args()
    if args.iterations < 1 or args.cpu_threads < 1:
        parser.error("--iterations and --cpu_threads must be >= 1")

    rows = [run_probe(probe, args) for probe in probes(args)]
    per_stage = [r["s_per_iteration"] * STAGE_ITERATIONS / 60 for r in rows]
    configs = {"fashion_scenes_99.yaml (the default)": per_stage[:1], "fashion_scenes_199.yaml": per_stage[:2],
               "fashion_scenes_499.yaml": per_stage[:3]}
    machine = rows[0]["machine"] or {}
    write_json(args.output, {"command": command("stage_speed.py"), "probes": rows,
                             "config_minutes": {k: sum(v) for k, v in configs.items()}})
    report = [
        "# Seconds per iteration of each pixel stage, and each config's minutes of distillation", "",
        f"Command: `{command('stage_speed.py')}`", "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpu_capability', '?')}, {args.cpu_threads} torch "
        f"thread(s). {args.iterations} iterations per probe, no evaluation or checkpoint during them.", "",
        *markdown_table(["stage", "iterations timed", "s / iteration", f"min for {STAGE_ITERATIONS:,} iterations",
                         "conditioned experts in the source run (s)"],
                        [[r["label"], r["iterations"], f"{r['s_per_iteration']:.2f}", f"{m:.1f}",
                          "—" if r["conditioned_experts_s_in_source_run"] is None
                          else f"{r['conditioned_experts_s_in_source_run']:.0f}"]
                         for r, m in zip(rows, per_stage)]), "",
        *markdown_table(["config", "stages", "min of distillation (1,000 iterations per stage)"],
                        [[name, len(v), f"{sum(v):.1f}"] for name, v in configs.items()]), "",
        "The conditioned experts' seconds were measured in the runs they are copied from (one thread, beside other "
        "jobs); evaluations during training are not counted, as `--max_time_minutes` does not count them.",
    ]
    write_markdown(args.output, report)


if __name__ == "__main__":
    main()
