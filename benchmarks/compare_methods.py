"""Issue #3's comparison: RepBlend, its ablations, LoRS and MTT-VL, distilled with 3 seeds each.

    .venv/bin/python benchmarks/compare_methods.py                         # all variants, 3 seeds
    .venv/bin/python benchmarks/compare_methods.py --variants repblend,repblend_no_blend --seeds 0,1,2
    .venv/bin/python benchmarks/compare_methods.py --max_steps 300         # any distill.py argument passes through

Every run is ``examples/distill.py`` with the embedded default config (``examples/configs/
fashion_scenes_99.yaml``) plus the variant's overrides, the same iteration budget for all, one
distillation seed per run; symmetric and asymmetric variants each share one set of expert
trajectories. The random coreset and full data are evaluated with the same seeds under their
strongest protocol (InfoNCE, lr 0.1). Writes ``benchmarks/results/methods_99.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from _common import command, write_json, write_markdown

HERE = Path(__file__).resolve().parent

VARIANTS: dict[str, list[str]] = {
    "repblend": [],
    "repblend_no_blend": ["--blend_beta", "0"],
    "repblend_no_symmetric": ["--matching", "asymmetric"],
    "lors": ["--method", "lors"],
    "mtt_vl": ["--method", "mtt_vl"],
}
#: RepBlend in stages (issue #31): at each size the split and the later stages' targets of that size's pixel config
#: (``examples/configs/fashion_scenes_{P}.yaml``; one stage where there is none, e.g. 99), everything else as
#: ``repblend``. The budget is the whole run's: the iterations (``--max_steps``) are split evenly over the stages and
#: the library splits ``--max_time_minutes`` by the stages' iterations, so it is compared at equal time and equal
#: iterations with the other rows.
VARIANTS["repblend_staged"] = []
STAGED_VARIANTS = ("repblend_staged",)
CONFIGS = HERE.parent / "examples" / "configs"
METRICS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")


def stage_overrides(name: str, extra: list[str]) -> list[str]:
    """The arguments a staged variant adds for the size and iterations in the pass-through ``extra``: the size's
    ``--stage_pairs`` and ``--stage_targets`` from its config and ``--stage_steps`` (``--max_steps``, else the
    embedded default's, split evenly; the first stages get the remainder). Nothing for the other variants or for a
    size without a config of its own."""
    import yaml

    pairs = passthrough_value(extra, "--num_pairs")
    if name not in STAGED_VARIANTS or pairs is None or not (CONFIGS / f"fashion_scenes_{pairs}.yaml").is_file():
        return []
    config = yaml.safe_load((CONFIGS / f"fashion_scenes_{pairs}.yaml").read_text())
    sizes = [int(n) for n in config.get("stage_pairs") or []]
    if len(sizes) < 2:
        return []
    steps = passthrough_value(extra, "--max_steps")
    if steps is None:
        default = HERE.parent / "repblend_hf" / "configs" / "fashion_scenes_99.yaml"
        steps = yaml.safe_load(default.read_text())["max_steps"]
    total = int(steps)
    if total < len(sizes):
        raise SystemExit(f"{name}: --max_steps {total} cannot give each of the {len(sizes)} stages at {pairs} pairs "
                         f"an iteration; give at least {len(sizes)}")
    split = [total // len(sizes) + (k < total % len(sizes)) for k in range(len(sizes))]
    return ["--stage_pairs", *map(str, sizes), "--stage_targets", config.get("stage_targets", "experts"),
            "--stage_steps", *map(str, split)]


def summarize(rows: list[dict]) -> dict:
    """Mean and (population) std over seeds of every metric."""
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in rows[0]}


def matching_of(name: str) -> str:
    overrides = VARIANTS[name]
    return "asymmetric" if ("asymmetric" in overrides or "lors" in overrides or "mtt_vl" in overrides) else "symmetric"


def encoder_width(extra: list[str]) -> int:
    """The image encoder's pooled feature width: the released LoRS / MTT-VL student has no image head, so its text
    head outputs that width (``--embed_dim``). The encoder is the pass-through ``--image_encoder`` or the config's."""
    import timm
    import torch

    name = extra[extra.index("--image_encoder") + 1] if "--image_encoder" in extra else "tf_efficientnet_lite0"
    with torch.device("meta"):
        return int(timm.create_model(name, pretrained=False, num_classes=0).num_features)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments :func:`run_variant` reads (besides ``work_dir``)."""
    parser.add_argument("--infonce_protocol", action="store_true",
                        help="Also evaluate each distilled set under the coresets' protocol (InfoNCE, lr 0.1) and "
                             "report each method under its stronger protocol, chosen on validation.")
    parser.add_argument("--experts_dir", default=None,
                        help="Where the shared experts live (default: WORK_DIR); reuse them across budgets.")
    parser.add_argument("--asymmetric_experts", type=int, default=None,
                        help="Experts for the asymmetric variants (default: as the config). Each trains the image "
                             "encoder from pixels, ~90 s per epoch on 2 cores at 64 px.")
    parser.add_argument("--asymmetric_expert_epochs", type=int, default=None,
                        help="Epochs of the asymmetric experts (default: as the config). Segments start before "
                             "max_start_epoch and span expert_epochs, so max_start_epoch - 1 + expert_epochs "
                             "epochs give the same segments as more.")
    parser.add_argument("--workers", type=int, default=1,
                        help="Distillation runs at a time, each in a process of its own (seed-major order: every "
                             "variant and size gets seed 0 first); give each --cpu_threads CORES / WORKERS (the "
                             "default when --cpu_threads is not given). Several invocations of the same command, "
                             "e.g. in two terminals, share the runs: each run is locked while it runs.")
    parser.add_argument("--continue_from", default=None, metavar="WORK_DIR",
                        help="Start each run that has no checkpoint yet from the newest checkpoint of the same run "
                             "(variant, size, seed) in this earlier work directory, when that checkpoint is at or "
                             "below --max_steps: e.g. the equal-iteration table continues the equal-time runs that "
                             "stopped short of it. The outer loop draws its randomness per iteration and the outer "
                             "learning rates are constant, so a continued run is the run from scratch; its seconds "
                             "per iteration count only the iterations it ran itself.")


def run_variant(name: str, seed: int, out: Path, args: argparse.Namespace, extra: list[str],
                wait: bool = True) -> dict | None:
    """One ``examples/distill.py`` run of a variant (skipped when ``out/results.json`` exists); its records.

    The run holds ``out/.run.lock`` while it runs, so invocations sharing a work directory never run it twice:
    another one waits for it (``wait``) or, with ``wait=False``, gets None and moves on.
    """
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / ".run.lock")
    try:
        lock.acquire(blocking=wait)
    except Timeout:
        return None
    try:
        return _run_variant(name, seed, out, args, extra)
    finally:
        lock.release()


def _run_variant(name: str, seed: int, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    from repblend_hf.commands import distill

    matching = matching_of(name)
    experts = []
    if matching == "asymmetric" and args.asymmetric_experts:
        experts += ["--num_experts", str(args.asymmetric_experts)]
    if matching == "asymmetric" and args.asymmetric_expert_epochs:
        experts += ["--expert_train_epochs", str(args.asymmetric_expert_epochs)]
    # The released asymmetric student has no image head, so its width is the encoder's: it goes last, over a
    # pass-through --embed_dim meant for the symmetric variants (e.g. --embed_dim 512 against the config's 1280).
    width = (["--embed_dim", str(encoder_width(extra))]
             if matching == "asymmetric" and "--asymmetric_image_head" not in extra else [])
    done = out / "results.json"
    if not done.exists() and args.continue_from:
        continue_run(out, Path(args.continue_from) / out.parent.name / out.name, extra)
    if not done.exists():  # finished runs are kept; an interrupted run continues from its last checkpoint
        distill.main(["--seed", str(seed), "--output_dir", str(out), "--baselines", "", "--eval_seeds", "1",
                      "--trajectory_dir", str(Path(args.experts_dir or args.work_dir) / f"experts_{matching}"),
                      "--save_strategy", "steps", "--save_total_limit", "1", "--resume_from_checkpoint", "latest",
                      *experts, *VARIANTS[name], *extra, *stage_overrides(name, extra), *width])
    timing = out / "timings.json"
    record = json.loads(done.read_text())
    run = {"own": _scores(record), "timings": json.loads(timing.read_text()) if timing.exists() else None,
           "curve": validation_curve(out)}
    settings = record.get("settings") or {}  # the own protocol's learned η (encoder, text head), where it has one
    run["eta"] = {k: settings[k] for k in ("encoder_lr", "text_head_lr") if settings.get(k) is not None}
    if record.get("shared_protocol"):  # LoRS / MTT-VL: the same set under the frozen-encoder protocol too
        run["shared"] = _scores(record["shared_protocol"])
    if args.infonce_protocol:
        # The coresets' protocol (InfoNCE, lr 0.1, S = I) on the same distilled set: a method is reported under
        # whichever of its own protocol and this one scores higher on the *validation* split.
        from repblend_hf.commands import evaluate as evaluate_command

        other = out / "infonce" / "results.json"
        if not other.exists():
            evaluate_command.main(["--method", "distilled", "--distilled_set", str(out / "synthetic_set"), "--loss",
                                   "infonce", "--lr", "0.1", "--seeds", "1", "--protocol", "frozen", "--output_dir",
                                   str(other.parent), *extra_data_args(extra)])
        run["infonce"] = _scores(json.loads(other.read_text()))
    return run


def passthrough_value(extra: list[str], flag: str) -> str | None:
    """The value a pass-through ``flag`` is given (the last one, as argparse reads it), or None."""
    values = [extra[i + 1] for i, a in enumerate(extra[:-1]) if a == flag]
    return values[-1] if values else None


def continue_run(out: Path, source: Path, extra: list[str]) -> Path | None:
    """Copy ``source``'s newest complete checkpoint into ``out`` (which has none) when its iteration is at or below
    the pass-through ``--max_steps``, so the run resumes from it; the copy, or None (then it starts from scratch)."""
    import shutil

    from repblend_hf.checkpoints import last_complete_checkpoint

    if last_complete_checkpoint(out) is not None:
        return None  # its own checkpoint goes first
    checkpoint = last_complete_checkpoint(source)
    max_steps = passthrough_value(extra, "--max_steps")
    if checkpoint is None or max_steps is None:
        print(f"--continue_from: no checkpoint in {source}{'' if max_steps else ' or no --max_steps'}; "
              f"{out} starts from scratch", flush=True)
        return None
    step = int(Path(checkpoint).name.split("-")[-1])
    if step > int(max_steps):
        print(f"--continue_from: {checkpoint} is past --max_steps {max_steps}; {out} starts from scratch", flush=True)
        return None
    target = out / Path(checkpoint).name
    shutil.copytree(checkpoint, target.with_name(target.name + ".partial"), dirs_exist_ok=True)
    target.with_name(target.name + ".partial").rename(target)  # never a half-copied checkpoint-N to resume from
    print(f"--continue_from: {out} continues {checkpoint} (iteration {step} of {max_steps})", flush=True)
    return target


def seconds_per_iteration(timings: dict) -> float:
    """Distillation wall time over the iterations this process ran (a resumed or continued run's earlier ones are
    not in its ``distillation_s``)."""
    ran = timings["iterations"] - timings.get("resumed_from_iteration", 0)
    return timings["distillation_s"] / max(ran, 1)


def run_in_workers(cells: list[tuple[str, int, Path, list[str]]], args: argparse.Namespace) -> None:
    """Run the unfinished ``(variant, seed, out, extra)`` cells, ``args.workers`` at a time, one process each.

    With one worker the runs go one after another in this process, their output on the console; with more, each
    run's output goes to ``out/run.log``. A run another invocation holds is left to it. Returns when every cell
    has finished here or is running elsewhere (the caller's :func:`run_variant` then waits for those); a failed
    run in a worker stops nothing else and is named, with its log, once the others are done.
    """
    todo = [c for c in cells if not (c[2] / "results.json").exists()]
    if args.workers == 1:
        for name, seed, out, extra in todo:
            run_variant(name, seed, out, args, extra, wait=False)
    if args.workers <= 1 or not todo:
        return
    print(f"{len(todo)} runs to do, {args.workers} at a time (logs: <run>/run.log)", flush=True)
    failed = []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per run: no state shared between runs
    with ProcessPoolExecutor(args.workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_logged_run, name, seed, out, args, extra): (name, seed, out)
                   for name, seed, out, extra in todo}
        for done, future in enumerate(as_completed(futures), 1):
            name, seed, out = futures[future]
            try:
                minutes = future.result()
                what = "run elsewhere" if minutes is None else f"finished in {minutes:.1f} min"
            except Exception as error:  # noqa: BLE001 (reported below; the other runs go on)
                failed.append((out, error))
                what = f"FAILED ({type(error).__name__}: {error})"
            print(f"[{done}/{len(todo)}] {name} seed {seed} ({out}): {what}", flush=True)
    if failed:
        raise SystemExit("runs failed; see their logs, fix the cause and rerun the same command (finished runs "
                         "are kept): " + "; ".join(f"{out / 'run.log'}: {error}" for out, error in failed))


def _logged_run(name: str, seed: int, out: Path, args: argparse.Namespace, extra: list[str]) -> float | None:
    """:func:`run_variant` in a worker process with its output in ``out/run.log``; its minutes, None if skipped."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run.log", "a") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    began = time.perf_counter()
    if run_variant(name, seed, out, args, extra, wait=False) is None:
        return None
    return (time.perf_counter() - began) / 60


def worker_threads(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """``--cpu_threads`` for each of ``args.workers`` runs when the pass-through arguments do not set it."""
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    if args.workers == 1 or "--cpu_threads" in extra:
        return []
    return ["--cpu_threads", str(max(1, (os.cpu_count() or 1) // args.workers))]


def validation_curve(out: Path) -> dict[int, float]:
    """The run's in-training validation r_mean by iteration (``eval_r_mean`` in ``trainer_state.json``: fresh heads
    on frozen-encoder features, the DistillationTrainer's evaluation); empty when the run kept no state."""
    state = out / "trainer_state.json"
    if not state.exists():
        return {}
    history = json.loads(state.read_text())["log_history"]
    return {int(h["step"]): float(h["eval_r_mean"]) for h in history if "eval_r_mean" in h}


def common_curve(runs: list[dict]) -> dict[int, dict[str, float]]:
    """Mean and std over runs of the validation curve at the iterations every run evaluated: the comparison at equal
    iterations that an equal-time budget (different iterations per run) still contains."""
    curves = [r.get("curve") or {} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return {k: {"mean": float(np.mean([c[k] for c in curves])), "std": float(np.std([c[k] for c in curves]))}
            for k in steps}


def _scores(record: dict) -> dict:
    return {"test": {k: record["test"][k]["mean"] for k in METRICS},
            "test_selected_on_test": {k: record["test_selected_on_test"][k]["mean"] for k in METRICS},
            "validation_r_mean": record["validation"]["r_mean"]["mean"]}


def extra_data_args(extra: list[str]) -> list[str]:
    """The DataArguments among pass-through arguments (evaluate.py takes those, not distill's others)."""
    from repblend_hf.pipeline import DataArguments

    names = {f"--{f}" for f in DataArguments.__dataclass_fields__}
    return [x for i, x in enumerate(extra) if x in names or (i > 0 and extra[i - 1] in names)]


PROTOCOL_NOTE = ("Coresets and full data: InfoNCE, lr 0.1 (their strongest protocol). Distilled sets: their own "
                 "protocol (wBCE against the learned similarity with the learned η; InfoNCE with the learned η for "
                 "MTT-VL; for the asymmetric variants the image encoder is fine-tuned on the set's pixels with a "
                 "fresh text head, as their authors evaluate them), or with --infonce_protocol whichever of that "
                 "and InfoNCE at lr 0.1 scores higher on the validation split (column 'protocol'). s / iteration: "
                 "distillation wall time (Trainer.train) / iterations, on this machine.")


def table_row(method: str, protocol: str, cells: list[str], test_selected_r_mean: float, per_iteration: str) -> str:
    """One Markdown row: method, the protocol it is reported under, the metrics, test-selected r_mean, s/it."""
    own = "own (InfoNCE, learned η)" if method == "mtt_vl" else "own (wBCE, learned S and η)"
    if method in VARIANTS and matching_of(method) == "asymmetric":
        own = own[:-1] + ", encoder fine-tuned)"
    how = {"own": own, "infonce": "InfoNCE, lr 0.1",
           "shared": "shared: fresh heads on frozen-encoder features (wBCE / InfoNCE, learned S and η)"}[protocol]
    return f"| {method} | {how} | " + " | ".join(cells) + f" | {test_selected_r_mean:.1f} | {per_iteration} |"


def shared_rows(name: str, runs: list[dict]) -> dict | None:
    """The frozen-encoder protocol's scores of a variant reported under another protocol (LoRS / MTT-VL), as a
    row of its own (``"<name>, shared protocol"``) so the table compares every set on one footing too."""
    if not runs or not all("shared" in r for r in runs):
        return None
    return {"name": f"{name}, shared protocol", "test": [r["shared"]["test"] for r in runs],
            "test_selected_on_test": [r["shared"]["test_selected_on_test"] for r in runs]}


def strongest(runs: list[dict]) -> tuple[str, list[dict]]:
    """The protocol with the highest mean validation r_mean over seeds, and each seed's scores under it."""
    protocols = [p for p in ("own", "infonce") if all(p in r for r in runs)]
    best = max(protocols, key=lambda p: float(np.mean([r[p]["validation_r_mean"] for r in runs])))
    return best, [r[best] for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--baselines", default="random,full")
    parser.add_argument("--work_dir", default="outputs/compare_methods")
    parser.add_argument("--output", default=str(HERE / "results" / "methods_99"))
    add_run_arguments(parser)
    args, passthrough = parser.parse_known_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work_dir)
    rows: dict[str, list[dict]] = {}
    selected_on_test: dict[str, list[dict]] = {}
    timings: dict[str, list[dict]] = {}
    protocol: dict[str, str] = {}
    extra = passthrough + worker_threads(args, passthrough)
    run_in_workers([(name, seed, work / name / f"seed{seed}", extra) for seed in seeds
                    for name in args.variants.split(",")], args)
    for name in args.variants.split(","):
        runs = [run_variant(name, seed, work / name / f"seed{seed}", args, extra) for seed in seeds]
        protocol[name], scores = strongest(runs)
        rows[name] = [s["test"] for s in scores]
        selected_on_test[name] = [s["test_selected_on_test"] for s in scores]
        timings[name] = [r["timings"] for r in runs if r["timings"]]
        shared = shared_rows(name, runs)
        if shared:
            rows[shared["name"]], selected_on_test[shared["name"]] = shared["test"], shared["test_selected_on_test"]
            protocol[shared["name"]], timings[shared["name"]] = "shared", timings[name]

    from repblend_hf.pipeline import DataArguments, evaluate_baseline, prepare_features

    prepared = prepare_features(DataArguments())
    for name in filter(None, args.baselines.split(",")):
        n = prepared.features["train"].num_images if name == "full" else 99
        result = evaluate_baseline(name, prepared.features, n, embed_dim=512, seeds=seeds)
        rows[name] = [s.test for s in result.seeds]
        selected_on_test[name] = [s.test_selected_on_test for s in result.seeds]

    table = {name: summarize(r) for name, r in rows.items()}
    on_test = {name: summarize(r) for name, r in selected_on_test.items()}
    write_json(args.output, {"seeds": seeds, "passthrough": passthrough, "test": table,
                             "test_selected_on_test": on_test, "per_seed": rows, "protocol": protocol,
                             "timings": timings})
    lines = [f"# fashion-scenes, 99 pairs: test retrieval, validation-selected epoch, seeds {seeds}", "",
             f"Command: `{command('compare_methods.py')}`", "",
             "| method | protocol | " + " | ".join(METRICS) + " | r_mean (test-selected) | s / iteration |",
             "|---|---|" + "---|" * (len(METRICS) + 2)]
    for name, summary in table.items():
        cells = [f"{summary[k]['mean']:.1f} ± {summary[k]['std']:.1f}" for k in METRICS]
        runs = timings.get(name, [])
        per_iteration = f"{np.mean([seconds_per_iteration(t) for t in runs]):.2f}" if runs else "—"
        lines.append(table_row(name, protocol.get(name, "infonce"), cells, on_test[name]["r_mean"]["mean"],
                               per_iteration))
    lines += ["", PROTOCOL_NOTE]
    write_markdown(args.output, lines)


if __name__ == "__main__":
    main()
