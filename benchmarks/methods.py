"""The paper's Table 1 on fashion-scenes: coresets, MTT-VL, LoRS and RepBlend at 99 / 199 / 499 pairs, and full data.

    .venv/bin/python benchmarks/methods.py --max_steps 50 --asymmetric_experts 4 --asymmetric_expert_epochs 2
    .venv/bin/python benchmarks/methods.py --pairs 199,499 --variants repblend --max_steps 400
    .venv/bin/python benchmarks/methods.py --pairs 99 --max_time_minutes 20 --max_steps 100000   # equal time
    .venv/bin/python benchmarks/methods.py --pairs 99 --max_steps 30 --workers 2 --cpu_threads 1  # 2 runs at a time
    .venv/bin/python benchmarks/methods.py --pairs 199,499 --variants repblend_staged --max_time_minutes 10 \
        --max_steps 100000                                             # RepBlend in stages, as the per-size configs

Every distilled method is ``examples/distill.py`` with the embedded default config, the variant's
overrides (``compare_methods.VARIANTS``), ``--num_pairs P`` and the same budget: iterations (``--max_steps``)
or minutes of distillation (``--max_time_minutes``, the faster method then runs more iterations; the table
gives each method's iterations), with 3 distillation seeds; ``repblend_staged`` distils in the stages of the
size's config (``examples/configs/fashion_scenes_P.yaml``), the same budget split over its stages; symmetric
and asymmetric variants each share one set of experts across sizes and budgets. Coresets (random, herding,
k-center) are selected and trained with the same seeds under their strongest protocol (InfoNCE, lr
0.1), full data once per seed. Reported: validation-selected test metrics as mean ± std over seeds,
and the test-selected r_mean the authors report. Finished runs are reused, so the command resumes; with
``--workers N`` N runs go at a time, each in a process of its own with its log in ``<run>/run.log``, seed 0 of
every variant and size first (an interrupted table then has one seed of every row soonest). Several
invocations of one command share its runs (each run is locked while it runs, and each expert while it trains),
so a second terminal can join. ``--reuse TABLE.json`` takes the seeds a previous table holds (e.g. a
``--finished_only`` one, whose run folders are gone) from it instead of running them again.
Writes ``benchmarks/results/methods.{json,md}`` and ``methods_r_mean_vs_pairs.png``.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

from _common import command, write_json, write_markdown  # noqa: E402
from compare_methods import (  # noqa: E402
    METRICS,
    PROTOCOL_NOTE,
    VARIANTS,
    add_run_arguments,
    common_curve,
    passthrough_value,
    run_in_workers,
    run_variant,
    seconds_per_iteration,
    shared_rows,
    strongest,
    summarize,
    table_row,
    worker_threads,
)

CORESETS = ("random", "herding", "kcenter")


def reusable_rows(paths: list[str]) -> tuple[dict[tuple[str, str], dict], dict[tuple[str, str], dict]]:
    """The rows of previous tables (their ``.json``), keyed by (pairs, row name): the distilled ones, each with its
    seeds, per-seed test scores, the summary of its test-selected scores (the tables keep no per-seed list of
    those), protocol, the s / iteration and iterations of its runs that had timings (in seed order when all did)
    and its own protocol's learned η by seed (where the table lists it); and the coresets' and full data's
    (per-seed test scores and that summary, over the table's seeds)."""
    rows: dict[tuple[str, str], dict] = {}
    baselines: dict[tuple[str, str], dict] = {}
    for path in paths:
        table = json.loads(Path(path).read_text())
        for pairs, by_row in table["per_seed"].items():
            for name in set(by_row) - set(table["protocol"].get(pairs, {})):  # no protocol: a coreset or full data
                baselines[(pairs, name)] = {"test": by_row[name], "seeds": table["seeds"],
                                            "on_test": table["test_selected_on_test"][pairs][name]}
        for pairs, by_row in table["protocol"].items():
            for name, protocol in by_row.items():
                seeds = table.get("seeds_per_row", {}).get(pairs, {}).get(name, table["seeds"])
                if (pairs, name) in rows:
                    raise SystemExit(f"--reuse: {name} at {pairs} pairs is in two of the tables {paths}; "
                                     "give each row from one table")
                timed = {k: table[key].get(pairs, {}).get(name, [])
                         for k, key in (("seconds", "seconds_per_iteration"), ("iterations", "iterations"))}
                rows[(pairs, name)] = {
                    "seeds": list(seeds), "test": table["per_seed"][pairs][name], "protocol": protocol,
                    "on_test": table["test_selected_on_test"][pairs][name], "source": str(path),
                    **timed, "timed_per_seed": all(len(v) == len(seeds) for v in timed.values()),
                    "learned_eta": table.get("learned_eta", {}).get(pairs, {}).get(name, {})}
    return rows, baselines


def pooled(summary: dict, n: int, rows: list[dict]) -> dict:
    """The mean and population std of every metric over ``n`` seeds known only by their ``summary`` and ``rows``."""
    out = {}
    for k, stat in summary.items():
        values = [r[k] for r in rows]
        total = n + len(values)
        mean = (n * stat["mean"] + sum(values)) / total
        square = (n * (stat["std"] ** 2 + stat["mean"] ** 2) + sum(v * v for v in values)) / total
        out[k] = {"mean": float(mean), "std": float(max(square - mean * mean, 0.0) ** 0.5)}
    return out


def plot(table: dict, path: Path, title: str = "fashion-scenes") -> None:
    """r_mean (mean ± std over seeds) against the number of pairs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for per_size in table.values() for m in per_size if m != "full"})
    sizes = sorted(int(p) for p in table)
    full = next((per_size["full"]["r_mean"] for per_size in table.values() if "full" in per_size), None)
    if len(sizes) == 1:  # one size: a bar per method (a line needs two sizes), best at the top
        stats = sorted(((m, table[str(sizes[0])][m]["r_mean"]) for m in methods), key=lambda x: x[1]["mean"])
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(stats) + 1.6))
        colors = ["tab:gray" if m in CORESETS else "tab:cyan" if m.endswith("shared protocol") else "tab:blue"
                  for m, _ in stats]  # real pairs grey; a distilled set under the shared protocol lighter
        ax.barh([m for m, _ in stats], [s["mean"] for _, s in stats], xerr=[s["std"] for _, s in stats], capsize=3,
                color=colors)
        if full is not None:
            ax.axvline(full["mean"], color="black", linestyle="--", linewidth=1, label="full data")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(f"test r_mean at {sizes[0]} pairs (validation-selected; mean ± std over seeds)")
        ax.set_title(textwrap.fill(title, 80), fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    palette = plt.get_cmap("tab20").colors  # one colour per method (the default cycle repeats after ten)
    for k, method in enumerate(methods):
        points = [(p, table[str(p)][method]["r_mean"]) for p in sizes if method in table[str(p)]]
        if points:
            xs, stats = zip(*points)
            real = method in CORESETS  # real pairs: squares on dotted lines
            ax.errorbar(xs, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="s" if real else "o",
                        linestyle=":" if real else "-", capsize=3, color=palette[k % len(palette)], label=method)
    if full is not None:
        ax.axhline(full["mean"], color="black", linestyle="--", linewidth=1, label="full data")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(p) for p in sizes])
    ax.set_xlabel("synthetic / selected pairs")
    ax.set_ylabel("test r_mean (validation-selected)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: it hides no point
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="99,199,499")
    parser.add_argument("--variants", default="mtt_vl,lors,repblend")
    parser.add_argument("--coresets", default=",".join(CORESETS))
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work_dir", default="outputs/methods")
    parser.add_argument("--output", default=str(HERE / "results" / "methods"))
    parser.add_argument("--finished_only", action="store_true",
                        help="Assemble the table from the runs that have finished (their results.json), starting and "
                             "waiting for none: each row over the seeds it has (column 'seeds'), a row without one "
                             "left out. For a table whose runs are still going (or were stopped).")
    parser.add_argument("--reuse", default="",
                        help="Comma-separated previous tables (their .json, e.g. a --finished_only one) whose "
                             "distilled seeds are taken from them instead of being run here: each (size, variant, "
                             "seed) a table holds is not run again, and its row here pools them with this run's "
                             "seeds (column 'seeds'). For runs whose folders are gone (another machine, a fresh "
                             "one); the protocols must agree. Its coresets and full data are reused too when it "
                             "ran them over the same --seeds.")
    add_run_arguments(parser)
    args, passthrough = parser.parse_known_args()
    for name in filter(None, args.variants.split(",")):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")

    from repblend_hf.pipeline import DataArguments, evaluate_baseline, prepare_features

    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(p) for p in args.pairs.split(",")]
    per_seed: dict[str, dict[str, list[dict]]] = {}
    on_test: dict[str, dict[str, list[dict]]] = {}
    seconds: dict[str, dict[str, list[float]]] = {}
    iterations: dict[str, dict[str, list[int]]] = {}
    protocol: dict[str, dict[str, str]] = {}
    curves: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    variants = list(filter(None, args.variants.split(",")))
    threads = worker_threads(args, passthrough)

    reused, reused_baselines = reusable_rows(list(filter(None, args.reuse.split(","))))
    summaries_on_test: dict[str, dict[str, dict]] = {}  # rows pooled with reused seeds (known by their summary)
    machines: dict[str, int] = {}  # CPU model -> distillation runs of this work_dir on it
    etas: dict[str, dict[str, dict[int, dict]]] = {}  # the own protocol's learned η per run of this work_dir

    def cell(name: str, pairs: int, seed: int) -> tuple[str, int, Path, list[str]]:
        return (name, seed, Path(args.work_dir) / f"{name}_{pairs}" / f"seed{seed}",
                ["--num_pairs", str(pairs), *passthrough, *threads])

    def to_run(name: str, pairs: int) -> list[int]:
        return [s for s in seeds if s not in reused.get((str(pairs), name), {}).get("seeds", [])]

    if not args.finished_only:
        run_in_workers([cell(n, p, s) for s in seeds for p in sizes for n in variants if s in to_run(n, p)],
                       args)
    finished: dict[str, dict[str, list[int]]] = {}
    for pairs in sizes:
        for name in variants:
            cells = [cell(name, pairs, s) for s in to_run(name, pairs)]
            if args.finished_only:
                cells = [c for c in cells if (c[2] / "results.json").exists()]
            names = [r for r in (name, f"{name}, shared protocol") if (str(pairs), r) in reused]
            if not cells and not names:
                continue
            runs = [run_variant(n, seed, out, args, extra) for n, seed, out, extra in cells]
            for (_, seed, _, _), r in zip(cells, runs):
                if r.get("eta"):
                    etas.setdefault(str(pairs), {}).setdefault(name, {})[seed] = {
                        **r["eta"], "test_r_mean": r["own"]["test"]["r_mean"]}
            for r in runs:  # which CPUs the s / iteration column comes from (timings.json, older runs: unrecorded)
                machine = (r["timings"] or {}).get("machine") or {}
                cpu = (f"{machine['cpu']}, {machine.get('cpu_capability') or 'instruction set unrecorded'}"
                       if machine.get("cpu") else "unrecorded")
                machines[cpu] = machines.get(cpu, 0) + 1
            here = [seed for _, seed, _, _ in cells]
            rows: dict[str, dict] = {}
            if runs:
                chosen, scores = strongest(runs)
                curves.setdefault(str(pairs), {})[name] = common_curve(runs)  # this work_dir's runs only
                rows[name] = {"protocol": chosen, "test": [s["test"] for s in scores],
                              "on_test": [s["test_selected_on_test"] for s in scores]}
                shared = shared_rows(name, runs)  # LoRS / MTT-VL: the same sets under the shared frozen protocol
                if shared:
                    rows[shared["name"]] = {"protocol": "shared", "test": shared["test"],
                                            "on_test": shared["test_selected_on_test"]}
                for row in rows.values():
                    row["seconds"] = [seconds_per_iteration(r["timings"]) for r in runs if r["timings"]]
                    row["iterations"] = [r["timings"]["iterations"] for r in runs if r["timings"]]
            for key in names:  # pooled with the reused seeds, in seed order
                old = reused[(str(pairs), key)]
                row = rows.setdefault(key, {"protocol": old["protocol"], "test": [], "on_test": [],
                                            "seconds": [], "iterations": []})
                if row["protocol"] != old["protocol"]:
                    raise SystemExit(f"--reuse: {key} at {pairs} pairs is reported under the {old['protocol']} "
                                     f"protocol in {old['source']} but under {row['protocol']} here; a row pools "
                                     "seeds of one protocol")
                order = sorted(range(len(old["seeds"]) + len(here)), key=lambda i: (old["seeds"] + here)[i])
                row["test"] = [(old["test"] + row["test"])[i] for i in order]
                for k in ("seconds", "iterations"):  # (of the runs with timings, as above)
                    aligned = old["timed_per_seed"] and len(row[k]) == len(here)
                    row[k] = [(old[k] + row[k])[i] for i in order] if aligned else old[k] + row[k]
                for seed, eta in old["learned_eta"].items():
                    etas.setdefault(str(pairs), {}).setdefault(key, {})[int(seed)] = eta
                summaries_on_test.setdefault(str(pairs), {})[key] = pooled(old["on_test"], len(old["seeds"]),
                                                                         row["on_test"])
            for key, row in rows.items():
                protocol.setdefault(str(pairs), {})[key] = row["protocol"]
                per_seed.setdefault(str(pairs), {})[key] = row["test"]
                on_test.setdefault(str(pairs), {})[key] = row["on_test"]
                seconds.setdefault(str(pairs), {})[key] = row["seconds"]
                iterations.setdefault(str(pairs), {})[key] = row["iterations"]
                finished.setdefault(str(pairs), {})[key] = sorted(reused.get((str(pairs), key), {}).get(
                    "seeds", []) + here)

    baselines = [(c, p) for p in sizes for c in filter(None, args.coresets.split(","))]
    baselines += [("full", sizes[0])] if args.full else []  # (full data is listed under the first size)
    todo = []
    for name, pairs in baselines:
        old = reused_baselines.get((str(pairs), name))
        if old is None or sorted(old["seeds"]) != sorted(seeds):  # reused only with the same selection seeds
            todo.append((name, pairs))
            continue
        per_seed.setdefault(str(pairs), {})[name], on_test.setdefault(str(pairs), {})[name] = old["test"], []
        summaries_on_test.setdefault(str(pairs), {})[name] = old["on_test"]
    prepared = prepare_features(DataArguments()) if todo else None
    for name, pairs in todo:
        size = prepared.features["train"].num_images if name == "full" else pairs
        result = evaluate_baseline(name, prepared.features, size, embed_dim=512, seeds=seeds)
        key = str(pairs)
        per_seed.setdefault(key, {})[name] = [s.test for s in result.seeds]
        on_test.setdefault(key, {})[name] = [s.test_selected_on_test for s in result.seeds]
        print(f"{name} @ {size}: r_mean {summarize(per_seed[key][name])['r_mean']}", flush=True)

    table = {p: {m: summarize(rows) for m, rows in by_method.items()} for p, by_method in per_seed.items()}
    table_on_test = {p: {m: summaries_on_test.get(p, {}).get(m) or summarize(rows) for m, rows in by_method.items()}
                     for p, by_method in on_test.items()}
    out = Path(args.output)
    write_json(out, {"seeds": seeds, "pairs": sizes, "passthrough": passthrough, "test": table,
                     "test_selected_on_test": table_on_test, "per_seed": per_seed, "seconds_per_iteration": seconds,
                     "iterations": iterations,
                     "protocol": protocol, "validation_curves": curves, "finished_only": args.finished_only,
                     "seeds_per_row": finished, "reused_from": list(filter(None, args.reuse.split(","))),
                     "machines": machines, "learned_eta": etas})
    steps = passthrough_value(passthrough, "--max_steps")
    minutes = passthrough_value(passthrough, "--max_time_minutes")
    budget = (f", {minutes} min of distillation per method" if minutes
              else f", {steps} distillation iterations per method" if steps else "")
    plot(table, out.parent / f"{out.name}_r_mean_vs_pairs.png", "fashion-scenes" + budget)
    lines = [f"# fashion-scenes: test retrieval (validation-selected epoch), mean ± std over seeds {seeds}", "",
             f"Command: `{command('methods.py')}`", ""]
    if args.finished_only:
        lines += ["Partial: the distilled rows are over the seeds that had finished (column 'seeds'; the others were "
                  "still to run), coresets and full data over all of them.", ""]
    if machines:
        lines += ["Machines (this work_dir's distillation runs, from their timings.json): " + "; ".join(
            f"{cpu} ({n} run{'s' * (n != 1)})" for cpu, n in sorted(machines.items())) + ".", ""]
    if args.reuse:
        lines += [f"Reused: the seeds of each distilled row that {args.reuse} holds are taken from it (those runs' "
                  "folders are not in this work_dir), pooled with the seeds run here (column 'seeds'); the "
                  "in-training validation curves below are over this work_dir's runs only.", ""]
    sizes = [p for p in sizes if str(p) in table]  # (--finished_only: a size with no finished run has no rows)
    for pairs in sizes:
        partial = " seeds |" if args.finished_only or args.reuse else ""
        lines += [f"## {pairs} pairs", "", "| method | protocol | " + " | ".join(METRICS) +
                  " | r_mean (test-selected) | s / iteration | iterations |" + partial,
                  "|---|---|" + "---|" * (len(METRICS) + 3 + bool(partial))]
        for method, summary in table[str(pairs)].items():
            cells = [f"{summary[k]['mean']:.1f} ± {summary[k]['std']:.1f}" for k in METRICS]
            times = seconds.get(str(pairs), {}).get(method)
            per_iteration = f"{sum(times) / len(times):.2f}" if times else "—"
            selected_on_test = table_on_test[str(pairs)][method]["r_mean"]["mean"]
            done = iterations.get(str(pairs), {}).get(method)
            row = table_row(method, protocol.get(str(pairs), {}).get(method, "infonce"), cells, selected_on_test,
                            per_iteration)
            row += f" {sum(done) / len(done):.0f} |" if done else " — |"
            if partial:
                row += f" {','.join(map(str, finished.get(str(pairs), {}).get(method, seeds)))} |"
            lines.append(row)
        lines.append("")
    lines += ["Full data is listed under the first size. " + PROTOCOL_NOTE, ""]
    for pairs in sizes:
        by_method = {m: c for m, c in curves.get(str(pairs), {}).items() if c}
        if not by_method:
            continue
        evaluated = sorted({k for c in by_method.values() for k in c})
        lines += [f"## {pairs} pairs: in-training validation r_mean by iteration", "",
                  "The trainer's evaluation (fresh heads on frozen-encoder features, one evaluation seed) at the "
                  "iterations every seed of a method evaluated, mean ± std over seeds: the same methods at equal "
                  "iterations.", "", "| method | " + " | ".join(f"it {k}" for k in evaluated) + " |",
                  "|---|" + "---|" * len(evaluated)]
        for method, curve in by_method.items():
            lines.append(f"| {method} | " + " | ".join(
                f"{curve[k]['mean']:.1f} ± {curve[k]['std']:.1f}" if k in curve else "" for k in evaluated) + " |")
        lines.append("")
    if etas:
        lines += ["## The own protocol's learned η", "",
                  "The encoder and text-head learning rates each set is fine-tuned with under its own protocol "
                  "(`results.json`, settings; distilled with the set from η's init), per seed (a reused seed's from "
                  "its table).", "",
                  "| pairs | method | seed | encoder η | text-head η | test r_mean (own) |",
                  "|---|---|---|---|---|---|"]
        for pairs, by_method in etas.items():
            for method, by_seed in by_method.items():
                for seed, eta in sorted(by_seed.items()):
                    lines.append(f"| {pairs} | {method} | {seed} | {eta.get('encoder_lr', float('nan')):.3f} | "
                                 f"{eta.get('text_head_lr', float('nan')):.3f} | {eta['test_r_mean']:.1f} |")
        lines.append("")
    write_markdown(out, lines)


if __name__ == "__main__":
    main()
