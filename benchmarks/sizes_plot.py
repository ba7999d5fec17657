"""Test r_mean against the number of pairs: the sizes table of docs/results.md as one picture.

    .venv/bin/python benchmarks/sizes_plot.py

Each ``--series`` is ``LABEL=POINT;POINT;...`` with a point ``PAIRS:SWEEP[:key=value...]``: the rows of
``benchmarks/results/SWEEP.json`` (a ``benchmarks/sweep.py`` table) whose grid values match every ``key=value``,
their test r_mean as mean ± std over those rows (the distillation seeds; population std, as the sweeps report);
``SWEEP`` may also be a ``benchmarks/runs_table.py`` table, whose groups (matched on ``label=``, else all) give
their runs' test r_mean. The
coresets and full data come from a ``benchmarks/baselines.py`` table (``--baselines``), and the paper's RepBlend as
its fraction of full data (METHOD.md: 63 / 69 / 81 % at 100 / 200 / 500 pairs on Flickr30K) times our full data,
so the two are compared as the share of full data they keep. A point whose sweep has no matching row yet is left
out and named in the report. Writes ``benchmarks/results/sizes_features.{json,md,png}`` (``--output``); the pixel
sets' picture is ``--space pixels --output benchmarks/results/sizes_pixels`` with their series.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import command, markdown_table, save_figure, write_json, write_markdown

HERE = Path(__file__).resolve().parent
SERIES = (
    "in stages against conditioned experts (issue #31)="
    "99:features_99_seeds;199:stages_199_features:stage_targets=conditioned;"
    "499:stages_499_4_features:stage_targets=conditioned",
    "one stage (before issue #31)="
    "99:targets_99_seeds_features;199:targets_199_seeds_features;499:targets_499_seeds_features",
)
PAPER = "100=63,200=69,500=81"


def parse_series(text: str) -> tuple[str, list[tuple[int, str, dict[str, str]]]]:
    """``LABEL=PAIRS:SWEEP[:k=v...];...`` → the label and its points (pairs, sweep name, the row filter)."""
    label, sep, points = text.partition("=")
    if not sep or not points:
        raise ValueError(f"a series is LABEL=PAIRS:SWEEP[:key=value...];..., got {text!r}")
    parsed = []
    for point in points.split(";"):
        pairs, _, rest = point.partition(":")
        sweep, *filters = rest.split(":")
        if not pairs.isdigit() or not sweep or any("=" not in f for f in filters):
            raise ValueError(f"a series is LABEL=PAIRS:SWEEP[:key=value...];..., got the point {point!r} in {text!r}")
        parsed.append((int(pairs), sweep, dict(f.split("=", 1) for f in filters)))
    return label, parsed


def point_scores(results: Path, sweep: str, match: dict[str, str]) -> list[float]:
    """The test r_mean of every finished row of ``results/sweep.json`` whose values match ``match``."""
    path = results / f"{sweep}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run its sweep (benchmarks/sweep.py --name {sweep}) first")
    table = json.loads(path.read_text())
    if isinstance(table, list):  # a runs_table.py table: one group of finished runs per entry
        if any("test_r_mean_per_run" not in group for group in table):
            raise ValueError(f"{path} has no per-run scores; make it again with benchmarks/runs_table.py")
        return [score for group in table if all(str(group.get(k)) == v for k, v in match.items())
                for score in group["test_r_mean_per_run"]]
    return [row["test_r_mean"] for row in table["rows"]
            if "test_r_mean" in row and all(str(row.get(k)) == v for k, v in match.items())]


def baselines(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """``{method: {pairs: {"mean", "std"}}}`` of the baselines table's test r_mean."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for record in json.loads(path.read_text())["results"]:
        out.setdefault(record["method"], {})[int(record["pairs"])] = record["test"]["r_mean"]
    return out


def _near(points: dict, size: int):
    """The value at ``size`` or one pair from it (a coreset of 100 pairs goes in the column of the 99-pair sets)."""
    return next((points[p] for p in sorted(points) if abs(p - size) <= 1), None)


def _set_cell(scores: list[float] | None, full: float | None) -> str:
    if scores is None:
        return "—"
    mean = statistics.mean(scores)
    share = f", {100 * mean / full:.0f} %" if full else ""
    return f"{mean:.1f} ± {statistics.pstdev(scores):.1f} ({len(scores)} seed{'s' if len(scores) > 1 else ''}{share})"


def plot(series: dict[str, dict[int, list[float]]], coresets: dict, full: float | None, paper: dict[int, float],
         path: Path, space: str = "feature space") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs = sorted(points)
        ax.errorbar(xs, [statistics.mean(points[x]) for x in xs], yerr=[statistics.pstdev(points[x]) for x in xs],
                    marker="o", capsize=3, label=label)
    for method, points in coresets.items():
        xs = sorted(points)
        ax.errorbar(xs, [points[x]["mean"] for x in xs], yerr=[points[x]["std"] for x in xs], marker="s",
                    linestyle=":", capsize=3, label=f"{method} (real pairs)")
    if full is not None:
        ax.axhline(full, color="black", linewidth=1, label=f"full data ({full:.1f})")
        if paper:
            xs = sorted(paper)
            ax.plot(xs, [full * paper[x] / 100 for x in xs], color="gray", linestyle="--", marker="x",
                    label="the paper's RepBlend, as its % of full data × ours")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([100, 200, 500])
    ax.set_xticklabels(["99 / 100", "199 / 200", "499 / 500"])
    ax.set_xlabel("pairs")
    ax.set_ylabel("test r_mean")
    save_figure(fig, ax, f"fashion-scenes, {space}: test r_mean against the number of pairs", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", action="append", default=None,
                        help="LABEL=PAIRS:SWEEP[:key=value...];... (repeat for several; default: staged and "
                             "one-stage feature-space sets).")
    parser.add_argument("--baselines", default="baselines_sizes",
                        help="A benchmarks/baselines.py table in the results folder: its coresets and full data.")
    parser.add_argument("--paper", default=PAPER,
                        help="The paper's RepBlend as PAIRS=PERCENT of full data, comma-separated ('' for none).")
    parser.add_argument("--results", default=str(HERE / "results"), help="Where the sweeps' tables are.")
    parser.add_argument("--output", default=str(HERE / "results" / "sizes_features"))
    parser.add_argument("--space", default="feature space", help="What the sets are, for the titles (e.g. pixels).")
    args = parser.parse_args()

    results = Path(args.results)
    series: dict[str, dict[int, list[float]]] = {}
    sources, missing = {}, []
    for text in args.series or SERIES:
        try:
            label, points = parse_series(text)
        except ValueError as error:
            parser.error(str(error))
        series[label], sources[label] = {}, {}
        for pairs, sweep, match in points:
            try:
                scores = point_scores(results, sweep, match)
            except ValueError as error:
                parser.error(str(error))
            sources[label][pairs] = {"sweep": sweep, "match": match, "test_r_mean": scores}
            if scores:
                series[label][pairs] = scores
            else:
                missing.append(f"{label}, {pairs} pairs ({sweep} {match or ''})")
    table = baselines(results / f"{args.baselines}.json")
    full = table.get("full", {})
    full_mean = next(iter(full.values()))["mean"] if full else None
    coresets = {m: p for m, p in table.items() if m != "full"}
    try:
        paper = {int(k): float(v) for k, v in (x.split("=") for x in args.paper.split(",") if x)}
    except ValueError:
        parser.error(f"--paper is PAIRS=PERCENT,... (e.g. {PAPER}), got {args.paper!r}")

    write_json(args.output, {"command": command("sizes_plot.py"), "series": sources, "baselines": table,
                             "paper_percent_of_full": paper, "missing": missing})
    report = [f"# Test r_mean against the number of pairs (fashion-scenes, {args.space})", "",
              f"Command: `{command('sizes_plot.py')}`", "",
              "Mean ± std over distillation seeds (each the mean of its evaluation seeds); the coresets over 3 "
              f"seeds (`{args.baselines}.md`); % of full data in brackets.", ""]
    # Columns: the sets' sizes (99 / 199 / 499).
    sizes = (sorted({p for points in series.values() for p in points})
             or sorted({p for m in coresets.values() for p in m}))
    rows = [[label, *(_set_cell(_near(points, size), full_mean) for size in sizes)]
            for label, points in series.items()]
    for method, points in coresets.items():
        rows.append([f"{method} (real pairs)",
                     *("—" if (v := _near(points, size)) is None else f"{v['mean']:.1f} ± {v['std']:.1f}"
                       for size in sizes)])
    report += markdown_table(["set", *map(str, sizes)], rows)
    if full_mean is not None:
        report += ["", f"Full data: {full_mean:.1f}. The paper's RepBlend on Flickr30K keeps "
                   + ", ".join(f"{v:g} % at {k}" for k, v in sorted(paper.items())) + " of full data."]
    if missing:
        report += ["", "Not finished yet (left out): " + "; ".join(missing) + "."]
    write_markdown(args.output, report)
    plot(series, coresets, full_mean, paper, Path(args.output).with_suffix(".png"), args.space)


if __name__ == "__main__":
    main()
