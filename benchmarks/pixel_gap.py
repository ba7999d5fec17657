"""Where the pixel path loses against feature-space distillation: can pixels hold a feature-space set?

    .venv/bin/python benchmarks/pixel_gap.py --feature_set outputs/SWEEP/RUN/synthetic_set --steps 400

A feature-space set (``--synthetic_space features``) is a set of vectors in the frozen image encoder's
feature space. A pixel set can only hold vectors the encoder can produce from some image. This measures,
on the validation split (test is never used), the set's own protocol (wBCE against its learned S, its
learned η), 3 evaluation seeds:

1. the feature set as it is (the upper bound of the pixel path with these texts, S and η);
2. the same set with each feature clamped to the range real training images reach in that dimension
   (the encoder's range is a subset of that box: a set that needs values outside it cannot be pixels);
3. *inverted* pixels: images x optimised with Adam from the real images the set was initialised from (the
   train transform view of ``--seed``'s initial pairs) to minimise ``‖E(x) − f*‖² / ‖f*‖²`` per image, then
   encoded again, reporting the relative feature error and the cosine to ``f*`` after ``--steps`` steps;
4. the initial real images (what the pixel set starts from).

Writes ``benchmarks/results/pixel_gap.{json,md}`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import markdown_table, seconds_since, write_json, write_markdown

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature_set", required=True, help="A saved feature-space SyntheticSet folder.")
    parser.add_argument("--steps", type=int, default=400, help="Adam steps of the pixel inversion.")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam lr of the pixel inversion (normalised pixels).")
    parser.add_argument("--seed", type=int, default=42, help="The distillation seed whose initial images start x.")
    parser.add_argument("--eval_seeds", type=int, default=3)
    parser.add_argument("--cpu_threads", type=int, default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "pixel_gap"))
    args = parser.parse_args()

    import torch

    from repblend_hf import SyntheticSet
    from repblend_hf.evaluation import PairSet, train_heads
    from repblend_hf.pipeline import DataArguments, prepare_features

    feature_set = SyntheticSet.from_pretrained(args.feature_set)
    config = feature_set.config
    if config.synthetic_space != "features":
        raise ValueError(f"{args.feature_set} is a {config.synthetic_space} set; pass a feature-space set")
    prepared = prepare_features(DataArguments(image_encoder=config.image_encoder, text_encoder=config.text_encoder,
                                              image_size=config.image_size, cpu_threads=args.cpu_threads))
    train, validation = prepared.features["train"], prepared.features["validation"]
    encoder = prepared.image_encoder
    target = feature_set.images.detach()
    texts = feature_set.text_embeddings.detach()
    similarity = feature_set.similarity().detach() if config.similarity != "none" else None

    def score(feats: torch.Tensor) -> dict:
        values = []
        for seed in range(args.eval_seeds):
            pairs = PairSet(feats, texts, similarity, lr_img=config.inner_lr_img, lr_txt=config.inner_lr_txt)
            trained = train_heads(pairs, embed_dim=config.embed_dim, loss="wbce" if similarity is not None else
                                  "infonce", validation=validation, temperature=config.temperature, seed=seed)
            values.append(max(h["validation"]["r_mean"] for h in trained.history))
        return {"validation_r_mean": statistics.mean(values), "std": statistics.pstdev(values)}

    def distance(feats: torch.Tensor) -> dict:
        rel = ((feats - target).pow(2).sum(1) / target.pow(2).sum(1)).mean()
        cos = torch.nn.functional.cosine_similarity(feats, target, dim=1).mean()
        return {"relative_sq_error": float(rel), "cosine": float(cos)}

    low, high = train.image_features.min(0).values, train.image_features.max(0).values
    outside = ((target < low) | (target > high)).float().mean()
    rows = {"feature set": {**score(target), **distance(target)}}
    clamped = torch.maximum(torch.minimum(target, high), low)
    rows["feature set, clamped to the real range"] = {**score(clamped), **distance(clamped)}

    # The pixel set's starting point: the same real pairs and views distill.py would start from.
    init = SyntheticSet.from_real(config.__class__(**{**config.to_dict(), "synthetic_space": "pixels"}),
                                  prepared.dataset["train"]["image"], train.caption_features, train.caption_offsets(),
                                  encoder, seed=args.seed, init_transform="train")
    encoder.fold_batchnorm_()
    x = init.pixel_values.detach().clone().requires_grad_(True)
    with torch.no_grad():
        start_feats = torch.cat([encoder(c) for c in x.split(50)])
    rows["initial real images"] = {**score(start_feats), **distance(start_feats)}
    optimizer = torch.optim.Adam([x], lr=args.lr)
    started, trace = time.time(), []
    for step in range(1, args.steps + 1):
        feats = encoder(x)
        loss = ((feats - target).pow(2).sum(1) / target.pow(2).sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 8) == 0 or step == args.steps:
            trace.append((step, round(float(loss), 4)))
            print(f"inversion step {step}: relative squared error {float(loss):.4f}", flush=True)
    with torch.no_grad():
        inverted = torch.cat([encoder(c) for c in x.detach().split(50)])
    rows[f"inverted pixels ({args.steps} Adam steps)"] = {**score(inverted), **distance(inverted)}

    record = {"feature_set": args.feature_set, "steps": args.steps, "lr": args.lr, "seed": args.seed,
              "fraction_outside_real_range": float(outside), "inversion_trace": trace,
              "inversion_seconds": seconds_since(started), "rows": rows}
    write_json(args.output, record)
    lines = ["# Can pixels hold a feature-space set?\n",
             f"`.venv/bin/python benchmarks/pixel_gap.py --feature_set {args.feature_set} --steps {args.steps} "
             f"--lr {args.lr} --seed {args.seed} --output {args.output}`\n",
             f"Validation r_mean (best of the protocol's evaluations, {args.eval_seeds} seeds) of the set's texts, S "
             f"and η with these image features. {100 * float(outside):.1f} % of the feature set's entries lie outside "
             "the range real training images reach in their dimension. Inversion: relative squared error trace "
             + ", ".join(f"{s}: {v}" for s, v in trace) + f" ({record['inversion_seconds']} s).\n",
             *markdown_table(["image features", "validation r_mean", "relative squared error to f*", "cosine to f*"],
                             [(name, f"{r['validation_r_mean']:.1f} ± {r['std']:.1f}", f"{r['relative_sq_error']:.3f}",
                               f"{r['cosine']:.3f}") for name, r in rows.items()])]
    write_markdown(args.output, lines)


if __name__ == "__main__":
    main()
