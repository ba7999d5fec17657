"""How a later stage of a set distilled in stages should be trained in evaluation: the recipe or its student's steps.

    .venv/bin/python benchmarks/stage_protocol.py \
        --set outputs/stages_199_features/seed0_stage_targetsconditioned/synthetic_set --seeds 2 \
        --output benchmarks/results/stage_protocol_199

A set distilled in stages (``repblend_hf.stages``) is trained on its stages in order. The first stage is trained
with the evaluation recipe (100 epochs, momentum 0.9, weight decay 5e-4, ×0.1 halfway) from fresh heads. For the
last stage this script compares, from the same state after the earlier stages (their own phases, as the library
trains them), the validation r_mean along three ways of training it: the recipe at the stage's η (PDD's
evaluation), the recipe at 0.1 η (momentum 0.9 makes the recipe's step ~10× the plain one), and plain SGD at η with
no momentum or weight decay (how the stage's student moved; the library's default, for the student's
``syn_steps``). Validation only: the curves say which way keeps what the stage learned. One evaluation seed per
row unless ``--seeds``; writes OUTPUT.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

from _common import markdown_table, write_json, write_markdown

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True, help="A saved set distilled in stages (synthetic_set folder).")
    parser.add_argument("--epochs", type=int, default=30, help="Epochs of the last stage along each curve.")
    parser.add_argument("--every", type=int, default=2, help="Evaluate every this many epochs.")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cpu_threads", type=int, default=1)
    parser.add_argument("--output", default=str(HERE / "results" / "stage_protocol"))
    args = parser.parse_args()

    import torch

    from repblend_hf import SyntheticSet
    from repblend_hf.evaluation import EvaluationProtocol, PairSet, train_heads
    from repblend_hf.evaluation.heads import _batch_loss, _PairSampler, _split_metrics
    from repblend_hf.modeling import RetrievalHeads, similarity_logits
    from repblend_hf.pipeline import DataArguments, prepare_features

    synthetic = SyntheticSet.from_pretrained(args.set)
    config = synthetic.config
    if not config.stages or len(config.stages) < 2:
        raise SystemExit(f"{args.set} is not a set distilled in stages (config.stages lists {config.stages})")
    prepared = prepare_features(DataArguments(image_encoder=config.image_encoder, image_size=config.image_size,
                                              text_encoder=config.text_encoder, cpu_threads=args.cpu_threads))
    validation = prepared.features["validation"]
    pairs = synthetic.pair_set(prepared.image_encoder)
    *earlier, last = pairs.stages
    part, _ = pairs.stage_sets()[-1]
    recipe = EvaluationProtocol(temperature=config.temperature)
    ways = {"recipe at η (PDD)": (1.0, recipe.momentum, recipe.weight_decay),
            "recipe at 0.1 η": (0.1, recipe.momentum, recipe.weight_decay),
            "plain SGD at η (the student's; the library's)": (1.0, 0.0, 0.0)}
    curves: dict[str, list[list[float]]] = {name: [] for name in ways}
    starts = []
    for seed in range(args.seeds):
        # The state after the earlier stages, trained as the library trains them (the set without its last stage).
        n = earlier[-1].end
        before = PairSet(pairs.image_features[:n], pairs.text_features[:n],
                         None if pairs.similarity is None else pairs.similarity[:n, :n], stages=earlier)
        state = train_heads(before, recipe, embed_dim=config.embed_dim, seed=seed).final_state
        heads = RetrievalHeads(config.image_dim, config.text_dim, config.embed_dim, dropout=recipe.dropout)
        heads.load_state_dict(state)
        starts.append(_split_metrics(heads.eval(), validation, config.temperature)[0]["r_mean"])
        for name, (scale, momentum, decay) in ways.items():
            heads.load_state_dict(copy.deepcopy(state))
            optimizer = torch.optim.SGD([{"params": heads.image_head.parameters(), "lr": scale * last.lr_img},
                                         {"params": heads.text_head.parameters(), "lr": scale * last.lr_txt}],
                                        lr=scale * last.lr_img, momentum=momentum, weight_decay=decay)
            sampler, generator, curve = _PairSampler(part, torch.device("cpu"), True), torch.Generator(), []
            generator.manual_seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for epoch in range(1, args.epochs + 1):
                    heads.train()
                    for image, text, targets in sampler.epoch(recipe.batch_size, generator):
                        loss = _batch_loss("wbce", similarity_logits(*heads(image, text), config.temperature), targets)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                    if epoch % args.every == 0:
                        curve.append(_split_metrics(heads.eval(), validation, config.temperature)[0]["r_mean"])
            curves[name].append(curve)
            print(name, seed, [round(v, 1) for v in curve], flush=True)

    epochs = list(range(args.every, args.epochs + 1, args.every))
    steps_per_epoch = -(-len(part) // recipe.batch_size)
    mean = {name: [statistics.fmean(c[i] for c in runs) for i in range(len(epochs))] for name, runs in curves.items()}
    record = {"set": args.set, "stages": [st for st in config.stages], "seeds": args.seeds, "epochs": epochs,
              "steps_per_epoch": steps_per_epoch, "student_steps": last.steps, "start_r_mean": starts,
              "validation_r_mean": curves}
    write_json(args.output, record)
    command = f"benchmarks/stage_protocol.py --set {args.set} --epochs {args.epochs} --every {args.every} " \
              f"--seeds {args.seeds} --output {args.output}"
    rows = [(name, f"{max(m):.1f} (epoch {epochs[m.index(max(m))]})", f"{m[-1]:.1f}",
             " ".join(f"{v:.1f}" for v in m)) for name, m in mean.items()]
    lines = ["# Training the last stage of a set in stages: the recipe or its student's steps\n",
             f"`.venv/bin/python {command}`\n",
             f"The set: {args.set}, stages of {[st['num_pairs'] for st in config.stages]} pairs; its last stage's "
             f"η {last.lr_img:.3f} / {last.lr_txt:.3f}, its student's {last.steps} steps = "
             f"{-(-last.steps // steps_per_epoch) if last.steps else '–'} epochs of {steps_per_epoch} batches of "
             f"{recipe.batch_size}. Validation r_mean after the earlier stages: "
             f"{statistics.fmean(starts):.1f} (mean over {args.seeds} seed(s)); then along each way of training the "
             f"last stage, every {args.every} epochs:\n",
             *markdown_table(["last stage trained by", "best (epoch)", f"at epoch {args.epochs}", "curve"], rows)]
    write_markdown(args.output, lines, echo=True)


if __name__ == "__main__":
    main()
