"""``repblend-evaluate``: evaluate a baseline (coreset or full data) or a saved distilled set with the retrieval
protocol.

    repblend-evaluate --dataset fashion-scenes --method random --pairs 100 --seeds 3 --output_dir out
    repblend-evaluate --method distilled --distilled_set outputs/fashion-scenes-repblend-99/synthetic_set
    repblend-evaluate --method distilled --distilled_set someone/fashion-scenes-repblend-99   # a Hub dataset repo
    repblend-evaluate --method distilled --distilled_set outputs/lors-99/synthetic_set --protocol frozen
    repblend-evaluate --method distilled --distilled_set outputs/fashion-scenes-repblend-99/synthetic_set \
        --image_encoder tf_efficientnet_lite1                  # cross-architecture: the set under another encoder
    repblend-evaluate --method herding --pairs 99 --embed_dim 1280 --image_encoder tf_efficientnet_lite1

(``python examples/evaluate.py ...`` and ``python -m repblend_hf.commands.evaluate ...`` run the same.)
Trains fresh projection heads on the pairs (encoders frozen), selects the evaluation epoch on the
validation split, and reports test retrieval as mean ± std over seeds (METHOD.md, "Evaluation
protocol"). A distilled set of an asymmetric method (LoRS, MTT-VL) is evaluated under its own protocol by
default, as their authors do: the image encoder fine-tuned with a fresh text head on the set's pixels at the
learned η (``--protocol frozen``: the shared protocol above). Writes ``OUTPUT_DIR/results.json`` and prints a
Markdown table.

``--image_encoder`` names the frozen image encoder of the evaluation (default: the embedded default's
EfficientNet-Lite0). For a distilled set of pixels it may differ from the encoder the set was distilled with: the
cross-architecture evaluation (:mod:`repblend_hf.cross_architecture`, RepBlend's Table 4) passes the set's images,
re-normalised, through that encoder and trains fresh heads on them under the same protocol and seeds; coresets and
full data are selected and trained on that encoder's features. A feature-space set, or an encoder that cannot take
the set's image size, is refused before anything is encoded. ``results.json`` names the evaluation's encoder
(``settings.image_encoder``) and, for a distilled set, the one it was distilled with (``settings.distilled_with``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ..checks import check_evaluate_data, check_evaluate_run
from ..cross_architecture import check_transfer, encode_set_images, normalization_of, transfer_pixels
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


def evaluate_distilled(path: str, prepared, seeds: list[int], overrides: dict, protocol: str = "frozen",
                       synthetic: SyntheticSet | None = None):
    """Encode a saved set's images with this run's image encoder (any architecture) and evaluate it.

    ``path`` is a local folder (``save_pretrained``) or, when no such folder exists, a Hub repo id (``synthetic``:
    the set already loaded from it). A pixel set's images are re-normalised from the encoder it was distilled with
    to this run's (:func:`~repblend_hf.cross_architecture.encode_set_images`); a feature-space set is used as it
    is, and only with the encoder (and image size) it was made for (:func:`~repblend_hf.cross_architecture.
    check_transfer` says why otherwise). With ``protocol="own"`` a set distilled with asymmetric matching
    (``config.matching``) fine-tunes a copy of this run's image encoder on its pixels instead
    (:func:`~repblend_hf.pipeline.evaluate_finetuned_set`).
    """
    synthetic = synthetic if synthetic is not None else SyntheticSet.load(path)
    config, encoder = synthetic.config, prepared.image_encoder
    check_transfer(config, encoder.name, encoder.image_size, where=path)
    if protocol == "own" and config.matching == "asymmetric":
        if config.synthetic_space != "pixels":
            raise ValueError(f"{path} is a feature-space set: it has no pixels to fine-tune the image encoder on; "
                             "use --protocol frozen")
        has_s = config.similarity != "none" and overrides.get("loss") != "infonce"
        pixels = transfer_pixels(synthetic.images.detach(), normalization_of(config.image_encoder),
                                 (encoder.mean, encoder.std))
        pairs = PixelPairSet(pixels, synthetic.text_embeddings.detach(),
                             synthetic.similarity().detach() if has_s else None, lr_img=config.inner_lr_img,
                             lr_txt=config.inner_lr_txt)
        result = evaluate_finetuned_set(pairs, prepared, config, seeds=seeds,
                                        **{"loss": "wbce" if has_s else "infonce", **overrides})
        return result, synthetic.num_pairs
    if config.synthetic_space == "features":
        feats = synthetic.images.detach()
    else:
        feats = encode_set_images(synthetic.images, config.image_encoder, encoder)
    # With a learned S the set's own protocol is wBCE against it; --loss infonce trains with identity targets.
    has_s = synthetic.config.similarity != "none" and overrides.get("loss") != "infonce"
    # A set distilled in stages trains on them in order, each with its η (config.stages).
    pairs = PairSet(feats, synthetic.text_embeddings.detach(), synthetic.similarity().detach() if has_s else None,
                    lr_img=synthetic.config.inner_lr_img, lr_txt=synthetic.config.inner_lr_txt,
                    stages=synthetic.stage_schedule())
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
    synthetic = None
    if args.method == "distilled":  # a set this encoder cannot take stops before the encoding too
        synthetic = SyntheticSet.load(args.distilled_set)
        check_transfer(synthetic.config, data_args.image_encoder, data_args.image_size,
                       where=f"--distilled_set {args.distilled_set}")
    prepared = prepare_features(data_args, validate=lambda ds: check_evaluate_data(ds, args))
    seeds = list(range(args.seeds))
    overrides = {k: v for k, v in {"loss": args.loss, "lr": args.lr, "epochs": args.epochs}.items() if v is not None}
    if args.method == "distilled":
        result, pairs = evaluate_distilled(args.distilled_set, prepared, seeds, overrides, args.protocol, synthetic)
    else:
        pairs = prepared.features["train"].num_images if args.method == "full" else args.pairs
        result = evaluate_baseline(args.method, prepared.features, pairs, embed_dim=args.embed_dim, seeds=seeds,
                                   **overrides)
    record = results_record(result, dataset=data_args.dataset, method=args.method, pairs=pairs)
    record["settings"]["text_encode_dtype"] = str(prepared.text_encoder.compute_dtype).removeprefix("torch.")
    record["settings"]["image_encoder"] = data_args.image_encoder
    if synthetic is not None:
        record["settings"]["distilled_with"] = synthetic.config.image_encoder
    path = write_results(f"{args.output_dir}/results.json", record)
    print(format_table([record]))
    print(f"wrote {path}")
    return record


def cli() -> None:
    """The ``repblend-evaluate`` console script: :func:`main` on ``sys.argv``, exit status 0 when it returns."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
