"""Sweep the outer learning rates of the embedded default on the validation split (METHOD.md asks for it).

    .venv/bin/python benchmarks/sweep_lrs.py --max_steps 300 --grid "lr_img=10,100,1000 lr_txt=10,100 lr_sim=1"

Each grid point is one ``examples/distill.py`` run (embedded default config, shared experts, no
baselines, one evaluation seed); the score is the *validation* r_mean of fresh heads trained on the
distilled set (test is never looked at for the choice). Writes ``benchmarks/results/sweep_lrs.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from _common import command, write_json, write_markdown

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="append",
                        help="Space-separated name=v1,v2 lists; every combination is run. Repeat --grid to run the "
                             "union of several grids (default: 'lr_img=10,100,1000 lr_txt=10,100 lr_sim=1').")
    parser.add_argument("--work_dir", default="outputs/sweep_lrs")
    parser.add_argument("--output", default=str(HERE / "results" / "sweep_lrs"))
    args, passthrough = parser.parse_known_args()

    from repblend_hf.commands import distill

    grids = args.grid or ["lr_img=10,100,1000 lr_txt=10,100 lr_sim=1"]
    points, keys = [], []
    for grid in grids:
        axes = [(kv.split("=")[0], kv.split("=")[1].split(",")) for kv in grid.split()]
        keys += [k for k, _ in axes if k not in keys]
        for values in itertools.product(*[v for _, v in axes]):
            point = dict(zip([k for k, _ in axes], values))
            if point not in points:
                points.append(point)
    rows = []
    for point in points:
        name = "_".join(f"{k}{v}" for k, v in point.items())
        out = Path(args.work_dir) / name
        if not (out / "results.json").exists():
            flags = [x for k, v in point.items() for x in (f"--{k}", v)]
            distill.main(["--output_dir", str(out), "--baselines", "", "--eval_seeds", "1", "--save_strategy", "no",
                          "--trajectory_dir", str(Path(args.work_dir) / "experts"), *flags, *passthrough])
        record = json.loads((out / "results.json").read_text())
        rows.append({**point, "validation_r_mean": record["validation"]["r_mean"]["mean"],
                     "test_r_mean": record["test"]["r_mean"]["mean"]})
        print(rows[-1], flush=True)
    rows.sort(key=lambda r: -r["validation_r_mean"])
    write_json(args.output, {"grids": grids, "passthrough": passthrough, "rows": rows})
    lines = [f"Command: `{command('sweep_lrs.py')}`", "",
             "| " + " | ".join(keys) + " | validation r_mean | test r_mean |", "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys)
                     + f" | {r['validation_r_mean']:.1f} | {r['test_r_mean']:.1f} |")
    write_markdown(args.output, lines)


if __name__ == "__main__":
    main()
