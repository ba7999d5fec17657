"""Is an asymmetric set's own-protocol score its pixels' or its learned η's? (issue #11)

The own protocol of LoRS / MTT-VL fine-tunes the image encoder (and a fresh text head) on the set's pixels at the
set's learned η. This probe scores the 2 × 2 of {the set the run started from (random real pairs of its seed), the
distilled set} × {η at its init, the run's learned η} under that protocol, one evaluation seed, validation and test:

    .venv/bin/python benchmarks/eta_probe.py --run outputs/table1_10min/mtt_vl_499/seed1 --seed 1

``--run`` is a finished ``examples/distill.py`` run (its ``synthetic_set`` and ``results.json``); the starting set is
rebuilt by the same command with ``--max_steps 1`` at learning rates too small to move anything (as
``lors_protocol_probe*.md``), and a set is scored at another η by a copy whose ``config.json`` says that η.
Writes ``benchmarks/results/eta_probe_<method>_<pairs>_seed<seed>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

from _common import command, markdown_table, starting_set_command, write_json, write_markdown  # noqa: E402


def with_eta(source: Path, target: Path, lr_img: float, lr_txt: float) -> Path:
    """A copy of the saved set ``source`` whose learned η reads (``lr_img``, ``lr_txt``)."""
    if not target.exists():
        shutil.copytree(source, target.with_name(target.name + ".partial"), dirs_exist_ok=True)
        target.with_name(target.name + ".partial").rename(target)
    config = json.loads((target / "config.json").read_text())
    config.update(inner_lr_img=lr_img, inner_lr_txt=lr_txt)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target


def scores(results: Path) -> dict:
    record = json.loads(results.read_text())
    return {"validation": record["validation"]["r_mean"]["mean"], "test": record["test"]["r_mean"]["mean"],
            "encoder_lr": record["settings"].get("encoder_lr"), "text_head_lr": record["settings"].get("text_head_lr")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="A finished distill run of an asymmetric method.")
    parser.add_argument("--seed", type=int, required=True, help="The run's distillation seed (its starting set).")
    parser.add_argument("--init_eta", type=float, default=0.1, help="η at its init (the config's inner_lr_*).")
    parser.add_argument("--experts_dir", default="outputs/methods/experts_asymmetric")
    parser.add_argument("--num_experts", default="4")
    parser.add_argument("--expert_train_epochs", default="2")
    parser.add_argument("--work_dir", default="outputs/eta_probe")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    run = Path(args.run)
    if not (run / "results.json").is_file() or not (run / "synthetic_set" / "config.json").is_file():
        raise SystemExit(f"--run {run} is not a finished distill run (no results.json or synthetic_set); give the "
                         "folder of one, e.g. outputs/table1_10min/mtt_vl_499/seed1")
    config = json.loads((run / "synthetic_set" / "config.json").read_text())
    if config.get("matching") != "asymmetric":
        raise SystemExit(f"{run} is a {config.get('matching')} set: the own protocol fine-tunes the encoder only "
                         "for asymmetric ones (LoRS, MTT-VL, RepBlend without symmetric matching)")
    method, pairs = config["method"], config["num_pairs"]
    learned = (config["inner_lr_img"], config["inner_lr_txt"])
    work = Path(args.work_dir) / f"{method}_{pairs}_seed{args.seed}"
    python = [sys.executable]
    start = work / "start"
    jobs = {}
    if not (start / "results.json").exists():
        jobs["start"] = starting_set_command(method, args.seed, start, [
            "--num_pairs", str(pairs), "--num_experts", args.num_experts, "--expert_train_epochs",
            args.expert_train_epochs, "--embed_dim", str(config["embed_dim"]), "--trajectory_dir", args.experts_dir,
            "--eval_strategy", "no"], eval_seeds=1)

    def evaluation(set_dir: Path, out: Path) -> list[str]:
        return python + ["-m", "repblend_hf.commands.evaluate", "--method", "distilled", "--distilled_set",
                         str(set_dir), "--protocol", "own", "--seeds", "1", "--cpu_threads", "1", "--output_dir",
                         str(out)]

    distilled_init = work / "distilled_init_eta"
    if not (distilled_init / "results.json").exists():
        copy = with_eta(run / "synthetic_set", work / "sets" / "distilled_init_eta", args.init_eta, args.init_eta)
        jobs["distilled_init_eta"] = evaluation(copy, distilled_init)
    work.mkdir(parents=True, exist_ok=True)
    logs = {name: open(work / f"{name}.log", "a") for name in jobs}
    running = {name: subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT) for name, cmd in jobs.items()}
    for name, process in running.items():  # the starting set and the first re-scoring side by side
        failed = process.wait()
        logs[name].close()
        if failed:
            raise SystemExit(f"{name} failed; see {work / f'{name}.log'}")
    start_learned = work / "start_learned_eta"
    if not (start_learned / "results.json").exists():
        copy = with_eta(start / "synthetic_set", work / "sets" / "start_learned_eta", *learned)
        with open(work / "start_learned_eta.log", "a") as log:
            if subprocess.run(evaluation(copy, start_learned), stdout=log, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"start_learned_eta failed; see {work / 'start_learned_eta.log'}")

    cells = {
        ("random real pairs it started from", "init"): scores(start / "results.json"),
        ("random real pairs it started from", "learned"): scores(start_learned / "results.json"),
        ("distilled set", "init"): scores(distilled_init / "results.json"),
        ("distilled set", "learned"): scores(run / "results.json"),
    }
    out = Path(args.output or HERE / "results" / f"eta_probe_{method}_{pairs}_seed{args.seed}")
    write_json(out, {"run": str(run), "method": method, "pairs": pairs, "seed": args.seed,
                     "init_eta": args.init_eta, "learned_eta": {"image": learned[0], "text": learned[1]},
                     "iterations": config.get("iterations"),
                     "cells": [{"set": s, "eta": e, **v} for (s, e), v in cells.items()]})
    rows = [[s, f"{e}: encoder {v['encoder_lr']:.4g}, text head {v['text_head_lr']:.4g}", f"{v['validation']:.2f}",
             f"{v['test']:.2f}"] for (s, e), v in cells.items()]
    lines = [f"# {method} at {pairs} pairs, distillation seed {args.seed}: the set or its η? (issue #11)", "",
             f"Command: `{command('eta_probe.py')}`", "",
             f"The own protocol (the image encoder fine-tuned on the set's pixels with a fresh text head at η; "
             f"one evaluation seed) on the set `{run}` distilled in {config.get('iterations')} iterations and on "
             f"the random real pairs it started from, each at η's init ({args.init_eta}) and at the run's learned η "
             f"(image {learned[0]:.4g}, text {learned[1]:.4g}).", "",
             *markdown_table(["set", "η", "validation r_mean", "test r_mean"], rows), ""]
    write_markdown(out, lines)


if __name__ == "__main__":
    main()
