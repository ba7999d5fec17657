"""The expert ladder: validation r_mean of every expert snapshot (heads at epoch 0 ... E).

    .venv/bin/python benchmarks/expert_ladder.py --experts_dir outputs/experts_v3 --num_experts 8 --epochs 10

Trains the embedded default's symmetric experts into ``--experts_dir`` (skipped when they are already
complete there: the experts every later benchmark reuses), then loads each snapshot of each expert into
fresh heads and scores them on the validation split. A distillation segment ``[start, start +
expert_epochs]`` can at best transfer what the expert knows at its end, so this is the ceiling of each
choice of ``max_start_epoch`` / ``expert_epochs``, and the evidence for choosing them on this benchmark.
An epoch is one pass over the (image, caption) pairs (``EPOCH_DEFINITION``). Writes
``benchmarks/results/expert_ladder.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import markdown_table, write_json, write_markdown

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts_dir", default="outputs/experts_v3")
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--embed_dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu_threads", type=int, default=None)
    parser.add_argument("--score_only", action="store_true",
                        help="Score the experts already in --experts_dir (e.g. a staged run's conditioned experts, "
                             "OUTPUT_DIR/stage_2/experts) without training any.")
    parser.add_argument("--output", default=str(HERE / "results" / "expert_ladder"))
    args = parser.parse_args()

    from repblend_hf.evaluation.heads import _split_metrics
    from repblend_hf.modeling import RetrievalHeads, unflatten_parameters
    from repblend_hf.pipeline import DataArguments, prepare_features
    from repblend_hf.trainers import train_experts
    from repblend_hf.training_args import ExpertTrainingArguments
    from repblend_hf.trajectories import ExpertTrajectories

    data_args = DataArguments(cpu_threads=args.cpu_threads)
    prepared = prepare_features(data_args)
    train, validation = prepared.features["train"], prepared.features["validation"]
    expert_args = ExpertTrainingArguments(
        output_dir=str(Path(args.experts_dir) / "runs"), num_experts=args.num_experts, num_train_epochs=args.epochs,
        embed_dim=args.embed_dim, seed=args.seed, report_to="none", disable_tqdm=True, logging_steps=500)
    started = time.time()
    if args.score_only:
        trajectories = ExpertTrajectories.load(args.experts_dir)
        args.embed_dim = trajectories.metadata["embed_dim"]
    else:
        trajectories = train_experts(train, expert_args, args.experts_dir, metadata={
            "dataset": data_args.dataset, "image_encoder": data_args.image_encoder,
            "text_encoder": data_args.text_encoder, "image_size": data_args.image_size})
    experts_seconds = time.time() - started

    heads = RetrievalHeads(train.image_features.shape[1], train.caption_features.shape[1], args.embed_dim).eval()
    ladder: dict[int, list[float]] = {}
    for expert in trajectories.expert_indices:
        snapshots = trajectories.expert_snapshots(expert)
        for epoch in range(trajectories.num_epochs + 1):
            state = {}
            for branch, head in heads.branches().items():
                state.update({f"{branch}_head.{k}": v for k, v in
                              unflatten_parameters(head, snapshots[branch][epoch]).items()})
            heads.load_state_dict(state)
            metrics = _split_metrics(heads, validation, 0.07)[0]
            ladder.setdefault(epoch, []).append(metrics["r_mean"])
            print(f"expert {expert} epoch {epoch}: validation r_mean {metrics['r_mean']:.1f}", flush=True)

    steps_per_epoch = -(-train.num_captions // expert_args.per_device_train_batch_size)
    rows = {e: {"mean": statistics.mean(v), "std": statistics.pstdev(v), "min": min(v), "max": max(v)}
            for e, v in ladder.items()}
    flags = [f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items()
             if k != "output" and v is not None and v is not False]
    record = {"command": "benchmarks/expert_ladder.py " + " ".join(flags),
              "conditioned": bool(trajectories.metadata.get("conditioned")),
              "experts_dir": args.experts_dir, "num_experts": len(trajectories), "epochs": trajectories.num_epochs,
              "epoch_definition": trajectories.metadata.get("epoch_definition"),
              "steps_per_epoch": steps_per_epoch, "pairs_per_epoch": train.num_captions,
              "expert_seconds_this_run": round(experts_seconds, 1),
              "validation_r_mean": {str(e): v for e, v in ladder.items()},
              "summary": {str(e): r for e, r in rows.items()}}
    out = Path(args.output)
    write_json(out, record)
    lines = ["# Expert ladder: validation r_mean of each expert snapshot\n",
             f"`.venv/bin/python {record['command']}`\n",
             f"{len(trajectories)} symmetric experts (heads of dim {args.embed_dim} on cached features, InfoNCE, SGD "
             f"lr {expert_args.learning_rate}, batch {expert_args.per_device_train_batch_size}); an epoch is one pass "
             f"over the {train.num_captions:,} (image, caption) pairs ({steps_per_epoch} steps). Heads at each "
             "snapshot scored on the validation split (1,000 images, 5,000 captions). A segment "
             "`[start, start + expert_epochs]` ends at the target epoch: its row is the most the segment can teach.\n",
             *(["Conditioned experts (a later stage's targets, PDD): epoch 0 is the heads trained on the earlier "
                f"stages by the evaluation protocol (the set {trajectories.metadata.get('conditioned_on', '')[:12]}…"
                "), then epochs of real data.\n"] if record["conditioned"] else []),
             *markdown_table(["epoch", "mean", "std", "min", "max"],
                             [(e, f"{r['mean']:.1f}", f"{r['std']:.1f}", f"{r['min']:.1f}", f"{r['max']:.1f}")
                              for e, r in rows.items()])]
    write_markdown(out, lines, echo=False)

    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    epochs = sorted(ladder)
    for i in range(len(trajectories)):
        ax.plot(epochs, [ladder[e][i] for e in epochs], color="C0", alpha=0.25, linewidth=0.8)
    ax.plot(epochs, [rows[e]["mean"] for e in epochs], color="C0", marker="o", label="mean over experts")
    ax.set_xlabel(f"expert epoch (one pass over the {train.num_captions:,} image-caption pairs)")
    ax.set_ylabel("validation r_mean (%)")
    ax.set_title("Expert ladder: what a segment ending at epoch e can transfer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=130)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
