"""One table row per group of finished runs: every retrieval metric as mean ± std over the runs.

    .venv/bin/python benchmarks/runs_table.py --group "pixels=outputs/pixels_default/seed*" \
        --group "features=outputs/blend_features/blend_beta1_seed*" --full 51.7 --output benchmarks/results/default_99

A run is an ``examples/distill.py`` output directory; its ``results.json`` holds the test metrics of the final
set as a mean over evaluation seeds. A row averages those means over the runs of its group (distillation seeds)
and gives their population std; the number of runs and of evaluation seeds per run is printed beside it. Test
numbers are validation-selected (the evaluation epoch); nothing here chooses among runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path

from _common import write_json, write_markdown

from repblend_hf.metrics import METRIC_NAMES as METRICS


def group_row(run_dirs: list[Path], split: str = "test") -> dict[str, tuple[float, float]]:
    """Mean and population std over the runs of each metric's per-run mean."""
    records = [json.loads((d / "results.json").read_text()) for d in run_dirs]
    return {m: (statistics.fmean(r[split][m]["mean"] for r in records),
                statistics.pstdev([r[split][m]["mean"] for r in records])) for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", action="append", required=True,
                        help="LABEL=GLOB of run directories (each with results.json); repeat for more rows.")
    parser.add_argument("--full", type=float, default=None, help="Full-data test r_mean, for a %% of full column.")
    parser.add_argument("--output", default=None, help="Write OUTPUT.md and OUTPUT.json as well as printing.")
    args = parser.parse_args()
    header = "| run | runs × evaluation seeds | " + " | ".join(METRICS) + (" | % of full |" if args.full else " |")
    rows, lines = [], [header, "|" + "---|" * (len(METRICS) + 2 + bool(args.full))]
    for group in args.group:
        label, pattern = group.split("=", 1)
        dirs = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "results.json").exists())
        if not dirs:
            raise SystemExit(f"--group {group!r}: no run directory with a results.json matches {pattern!r}")
        row = group_row(dirs)
        seeds = {json.loads((d / "results.json").read_text())["seeds"] for d in dirs}
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in row.values()]
        pct = f" | {100 * row['r_mean'][0] / args.full:.0f} %" if args.full else ""
        runs = f"{len(dirs)} × {'/'.join(map(str, sorted(seeds)))}"
        lines.append(f"| {label} | {runs} | " + " | ".join(cells) + pct + " |")
        rows.append({"label": label, "runs": [str(d) for d in dirs], "test": row,
                     "test_r_mean_per_run": [json.loads((d / "results.json").read_text())["test"]["r_mean"]["mean"]
                                             for d in dirs]})
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        command = "benchmarks/runs_table.py " + " ".join(f'--group "{g}"' for g in args.group)
        command += f" --full {args.full}" if args.full else ""
        write_markdown(args.output, ["# Test retrieval of finished runs (mean ± std over runs)", "",
                                     f"`.venv/bin/python {command} --output {args.output}`", "", *lines], echo=False)
        write_json(args.output, rows)


if __name__ == "__main__":
    main()
