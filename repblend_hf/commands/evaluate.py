"""``repblend-evaluate``: evaluate a baseline (coreset or full data) or a saved distilled set with the retrieval
protocol.

    repblend-evaluate --dataset fashion-scenes --method random --pairs 100 --seeds 3 --output_dir out
    repblend-evaluate --method distilled --distilled_set outputs/fashion-scenes-repblend-99/synthetic_set
    repblend-evaluate --method distilled --distilled_set someone/fashion-scenes-repblend-99   # a Hub dataset repo
    repblend-evaluate --method distilled --distilled_set outputs/lors-99/synthetic_set --protocol frozen

(``python examples/evaluate.py ...`` and ``python -m repblend_hf.commands.evaluate ...`` run the same.)
Trains fresh projection heads on the pairs (encoders frozen), selects the evaluation epoch on the
validation split, and reports test retrieval as mean ± std over seeds (METHOD.md, "Evaluation
protocol"). A distilled set of an asymmetric method (LoRS, MTT-VL) is evaluated under its own protocol by
default, as their authors do: the image encoder fine-tuned with a fresh text head on the set's pixels at the
learned η (``--protocol frozen``: the shared protocol above). Writes ``OUTPUT_DIR/results.json`` and prints a
Markdown table.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from ..checks import check_evaluate_data, check_evaluate_run
from ..evaluation import EvaluationProtocol, PairSet, PixelPairSet, evaluate_pairs
from ..pipeline import (
    DataArguments,
    evaluate_baseline,
    evaluate_finetuned_set,
    format_table,
    prepare_features,
    results_record,
    write_results,
)
from ..synthetic import SyntheticSet

__all__ = ["EvaluateArguments", "cli", "evaluate_distilled", "main"]

METHODS = ("random", "herding", "kcenter", "full", "distilled")


@dataclass
class EvaluateArguments:
    method: str = field(default="random", metadata={"help": f"One of {METHODS}."})
    pairs: int = field(default=100, metadata={"help": "Number of pairs for a coreset."})
    seeds: int = field(default=3, metadata={"help": "Evaluation seeds (seed s also selects coreset s)."})
    output_dir: str = field(default="outputs/evaluate", metadata={"help": "Where results.json goes."})
    embed_dim: int = field(default=512, metadata={"help": "Projection head dimension."})
    distilled_set: str | None = field(default=None, metadata={
        "help": "A saved distilled set: a local folder, or a Hub dataset repo id (SyntheticSet.from_hub)."})
    loss: str | None = field(default=None, metadata={"help": "Override the protocol's loss ('infonce' or 'wbce')."})
    lr: float | None = field(default=None, metadata={"help": "Override the protocol's learning rate."})
    epochs: int | None = field(default=None, metadata={"help": "Override the protocol's number of epochs."})
    protocol: str = field(default="own", metadata={
        "help": "For --method distilled: 'own' evaluates the set under its own protocol (RepBlend: fresh heads on the "
                "frozen encoder; LoRS / MTT-VL sets: the image encoder fine-tuned with a fresh text head on the set's "
                "pixels at the learned η); 'frozen' under the protocol shared by every set (fresh heads on "
                "frozen-encoder features)."})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.method == "distilled" and not self.distilled_set:
            raise ValueError("--method distilled needs --distilled_set FOLDER or REPO_ID (a saved SyntheticSet)")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if self.protocol not in ("own", "frozen"):
            raise ValueError(f"--protocol must be 'own' or 'frozen', got {self.protocol!r}")


def evaluate_distilled(path: str, prepared, seeds: list[int], overrides: dict, protocol: str = "frozen"):
    """Encode a saved set's images with this run's image encoder (any architecture) and evaluate it.

    ``path`` is a local folder (``save_pretrained``) or, when no such folder exists, a Hub repo id. A
    feature-space set is used as it is, and only with the encoder (and image size) it was made for. With
    ``protocol="own"`` a set distilled with asymmetric matching (``config.matching``) fine-tunes a copy of this
    run's image encoder on its pixels instead (:func:`~repblend_hf.pipeline.evaluate_finetuned_set`).
    """
    synthetic = SyntheticSet.from_pretrained(path) if Path(path).is_dir() else SyntheticSet.from_hub(path)
    config, encoder = synthetic.config, prepared.image_encoder
    if protocol == "own" and config.matching == "asymmetric":
        if config.synthetic_space != "pixels":
            raise ValueError(f"{path} is a feature-space set: it has no pixels to fine-tune the image encoder on; "
                             "use --protocol frozen")
        has_s = config.similarity != "none" and overrides.get("loss") != "infonce"
        pairs = PixelPairSet(synthetic.images.detach(), synthetic.text_embeddings.detach(),
                             synthetic.similarity().detach() if has_s else None, lr_img=config.inner_lr_img,
                             lr_txt=config.inner_lr_txt)
        result = evaluate_finetuned_set(pairs, prepared, config, seeds=seeds,
                                        **{"loss": "wbce" if has_s else "infonce", **overrides})
        return result, synthetic.num_pairs
    if config.synthetic_space == "features":
        if (config.image_encoder, config.image_size) != (encoder.name, encoder.image_size):
            raise ValueError(f"{path} holds image features of {config.image_encoder} at {config.image_size} px, "
                             f"which only heads on that encoder can use; run with --image_encoder "
                             f"{config.image_encoder} --image_size {config.image_size}")
        feats = synthetic.images.detach()
    else:
        with torch.no_grad():
            feats = torch.cat([encoder(c) for c in synthetic.images.detach().split(256)])
    # With a learned S the set's own protocol is wBCE against it; --loss infonce trains with identity targets.
    has_s = synthetic.config.similarity != "none" and overrides.get("loss") != "infonce"
    pairs = PairSet(feats, synthetic.text_embeddings.detach(), synthetic.similarity().detach() if has_s else None,
                    lr_img=synthetic.config.inner_lr_img, lr_txt=synthetic.config.inner_lr_txt)
    protocol = EvaluationProtocol(**{"loss": "wbce" if has_s else "infonce", **overrides},
                                  temperature=synthetic.config.temperature)
    result = evaluate_pairs(pairs, prepared.features["validation"], prepared.features["test"], protocol, seeds=seeds,
                            embed_dim=synthetic.config.embed_dim)
    return result, synthetic.num_pairs


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default ``sys.argv[1:]``), evaluate, write ``results.json``; returns the record."""
    data_args, args = HfArgumentParser((DataArguments, EvaluateArguments)).parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_evaluate_run(args)  # a missing, damaged or non-finite set stops before the encoding
    prepared = prepare_features(data_args, validate=lambda ds: check_evaluate_data(ds, args))
    seeds = list(range(args.seeds))
    overrides = {k: v for k, v in {"loss": args.loss, "lr": args.lr, "epochs": args.epochs}.items() if v is not None}
    if args.method == "distilled":
        result, pairs = evaluate_distilled(args.distilled_set, prepared, seeds, overrides, args.protocol)
    else:
        pairs = prepared.features["train"].num_images if args.method == "full" else args.pairs
        result = evaluate_baseline(args.method, prepared.features, pairs, embed_dim=args.embed_dim, seeds=seeds,
                                   **overrides)
    record = results_record(result, dataset=data_args.dataset, method=args.method, pairs=pairs)
    record["settings"]["text_encode_dtype"] = str(prepared.text_encoder.compute_dtype).removeprefix("torch.")
    path = write_results(f"{args.output_dir}/results.json", record)
    print(format_table([record]))
    print(f"wrote {path}")
    return record


def cli() -> None:
    """The ``repblend-evaluate`` console script: :func:`main` on ``sys.argv``, exit status 0 when it returns."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
