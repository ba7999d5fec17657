"""The shared front of every script: dataset → frozen encoders → cached features, and result tables.

DESIGN.md, "Data flow": ``repblend-distill``, ``repblend-evaluate`` (:mod:`repblend_hf.commands`) and the
benchmarks all start by loading an image-text dataset, building the frozen encoders and encoding every split once
(cached by ``datasets``); :func:`prepare_features` is that step, :class:`DataArguments` its
command-line arguments (parsed with ``HfArgumentParser``). The baselines' evaluation protocols and
the ``results.json`` schema live here too, so every script reports the same way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import last_complete_checkpoint
from .coresets import select_coreset
from .data import load_image_text_dataset
from .encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER, load_image_encoder, load_text_encoder
from .evaluation import (
    FINETUNE_ENCODER,
    FROZEN_ENCODER,
    METRIC_NAMES,
    EvaluationProtocol,
    EvaluationResult,
    ImageSplit,
    PairSet,
    PixelPairSet,
    ReferenceDiagnostics,
    evaluate_finetuned,
    evaluate_pairs,
    train_heads,
)
from .features import FeatureSplit, encode_dataset
from .modeling import RetrievalHeads

__all__ = ["DataArguments", "Prepared", "configure_cpu_threads", "prepare_features", "evaluate_baseline",
           "BASELINE_PROTOCOLS", "results_record", "write_results", "format_table", "parse_with_config",
           "last_complete_checkpoint", "reference_diagnostics", "image_splits", "evaluate_finetuned_set",
           "own_protocol_record", "shared_reference_cache"]

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """Which data and frozen encoders a run uses (shared by the example scripts)."""

    dataset: str = field(default="fashion-scenes", metadata={
        "help": "Anything load_image_text_dataset takes: 'fashion-scenes' (embedded default), 'flickr30k', 'coco', "
                "a local folder with Karpathy-style JSON, or a datasets Hub id / folder."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the JSON image paths are relative to."})
    dataset_kwargs: str | None = field(default=None, metadata={
        "help": "JSON object of extra load_image_text_dataset keywords, e.g. '{\"num_train\": 500}' for a small "
                "fashion-scenes build."})
    image_encoder: str = field(default=DEFAULT_IMAGE_ENCODER, metadata={"help": "timm model name."})
    pretrained_image_encoder: bool = field(default=True, metadata={"help": "Load pretrained image weights."})
    text_encoder: str = field(default=DEFAULT_TEXT_ENCODER, metadata={"help": "transformers model id or folder."})
    text_pooling: str | None = field(default=None, metadata={
        "help": "'cls' or 'mean' (default: mean for sentence-transformers models, else cls)."})
    image_size: int = field(default=64, metadata={"help": "Image side in pixels (the synthetic images' size)."})
    num_views: int = field(default=2, metadata={"help": "Augmented views per train image cached for the experts."})
    encode_batch_size: int = field(default=64, metadata={
        "help": "Images or captions per encoder forward pass when caching features (64: the fastest on a 2-core CPU, "
                "benchmarks/results/encoding.md)."})
    encode_dtype: str = field(default="auto", metadata={
        "help": "Precision of the caption encoding: 'float32', 'bfloat16' (autocast; ~2x faster on a CPU with "
                "AMX, row cosine to float32 >= 0.99997) or 'auto' (bfloat16 where the device runs it natively: "
                "AVX512-BF16 / AMX CPUs, bf16 GPUs). Part of the feature cache's key.",
        "choices": ["auto", "float32", "bfloat16"]})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads per process when no GPU is used (default: the usable cores divided by the local "
                "processes; `accelerate launch` alone sets OMP_NUM_THREADS=1, which halves the speed on 2 cores)."})


def configure_cpu_threads(requested: int | None = None) -> int:
    """Set torch's CPU thread count for this process and return it (a no-op when CUDA is in use)."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.get_num_threads()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = requested or max(1, len(os.sched_getaffinity(0)) // local_processes)
    if threads != torch.get_num_threads():
        logger.info("using %d CPU threads per process (was %d)", threads, torch.get_num_threads())
        torch.set_num_threads(threads)
    return threads


@dataclass
class Prepared:
    """The loaded dataset, the frozen encoders and the cached features of every split."""

    dataset: Any
    image_encoder: Any
    text_encoder: Any
    features: dict[str, FeatureSplit]
    seconds: dict[str, float] = field(default_factory=dict)  # dataset_s (load / build), encoding_s (a cache hit: ~0)


def prepare_features(args: DataArguments, with_captions: bool = False,
                     validate: Callable[[Any], None] | None = None, **dataset_kwargs) -> Prepared:
    """Load ``args.dataset``, build the frozen encoders and encode every split (a cache hit after the first run).

    ``validate(dataset)`` (e.g. :func:`repblend_hf.checks.check_distill_data`) runs on the loaded ``DatasetDict``
    before anything is encoded.
    """
    configure_cpu_threads(args.cpu_threads)
    started = time.time()
    extra = json.loads(args.dataset_kwargs) if args.dataset_kwargs else {}
    if not isinstance(extra, dict):
        raise ValueError(f"--dataset_kwargs must be a JSON object, got {args.dataset_kwargs!r}")
    dataset = load_image_text_dataset(args.dataset, image_root=args.image_root, **{**extra, **dataset_kwargs})
    if validate is not None:
        validate(dataset)
    loaded = time.time()
    image_encoder = load_image_encoder(args.image_encoder, image_size=args.image_size,
                                       pretrained=args.pretrained_image_encoder)
    text_encoder = load_text_encoder(args.text_encoder, pooling=args.text_pooling, encode_dtype=args.encode_dtype)
    encoded = encode_dataset(dataset, image_encoder, text_encoder, num_views=args.num_views,
                             batch_size=args.encode_batch_size)
    features = {split: FeatureSplit.from_dataset(ds, with_captions=with_captions) for split, ds in encoded.items()}
    seconds = {"dataset_s": round(loaded - started, 1), "encoding_s": round(time.time() - loaded, 1)}
    return Prepared(dataset, image_encoder, text_encoder, features, seconds)


# How each baseline is trained (METHOD.md: "Report each baseline under the protocol where it is
# strongest, and say which"). Coresets: InfoNCE, lr 0.1, the evaluation protocol's 100 epochs. Full data:
# the same loss and lr, 30 epochs (each epoch is 10,000+ pairs, not 100). Each is a change of the
# default EvaluationProtocol (its field names).
BASELINE_PROTOCOLS: dict[str, dict[str, Any]] = {
    "coreset": {"loss": "infonce", "lr": 0.1, "epochs": 100},
    "full": {"loss": "infonce", "lr": 0.1, "epochs": 30},
}


def evaluate_baseline(method: str, features: dict[str, FeatureSplit], num_pairs: int, *, embed_dim: int,
                      seeds: list[int], temperature: float = 0.07, on_trained=None, **overrides) -> EvaluationResult:
    """Evaluate a coreset (``random``, ``herding``, ``kcenter``; seed s selects with seed s) or ``full`` data.

    ``on_trained(seed, trained_heads)`` (full data only) sees each seed's heads: ``repblend-distill`` keeps seed 0's
    final state as the reference model of :func:`reference_diagnostics` instead of training it a second time.
    """
    kind = "full" if method == "full" else "coreset"
    protocol = EvaluationProtocol(temperature=temperature, **{**BASELINE_PROTOCOLS[kind], **overrides})
    if method == "full":
        return evaluate_pairs(features["train"], features["validation"], features["test"], protocol, seeds=seeds,
                              embed_dim=embed_dim, on_trained=on_trained)
    per_seed = []
    for seed in seeds:
        selection = select_coreset(method, features["train"], num_pairs, seed=seed)
        pairs = PairSet(*selection.pairs(features["train"]))
        per_seed.append(evaluate_pairs(pairs, features["validation"], features["test"], protocol, seeds=[seed],
                                       embed_dim=embed_dim))
    merged = EvaluationResult([s for r in per_seed for s in r.seeds], {**per_seed[0].settings, "seeds": seeds,
                                                                      "coreset": method})
    return merged


def reference_diagnostics(features: dict[str, FeatureSplit], num_pairs: int, *, embed_dim: int,
                          temperature: float = 0.07, cache_dir: str | Path | None = None,
                          seed: int = 0, trained_state: dict[str, Any] | None = None,
                          shared_cache_dir: str | Path | None = None) -> ReferenceDiagnostics:
    """The fixed model under which modality collapse is measured on sets of pairs (RepBlend Figs. 1-2).

    Heads trained once on the full training split with the full-data protocol (:data:`BASELINE_PROTOCOLS`,
    seed ``seed``), kept in ``cache_dir/reference_heads.safetensors`` with the features' fingerprint (a
    cache made from other features or settings is retrained), and the diagnostics of a random real subset
    of ``num_pairs`` pairs (random coreset, seed ``seed``) as the undistilled reference. ``trained_state``: the
    final state of heads already trained that way (the full-data baseline's seed ``seed``, whose training is the
    same function of the same seed), used instead of training them again when the cache does not hold them.
    ``shared_cache_dir``: a folder that runs with other output folders share (``repblend-distill`` uses
    :func:`shared_reference_cache`), one file per features fingerprint, width and seed, so a run that skips
    the full-data baseline does not train the same heads again (~3 min on 2 CPU cores).
    """
    from safetensors.torch import load_file, save_file

    train = features["train"]
    protocol = BASELINE_PROTOCOLS["full"]
    meta = {"features_fingerprint": str(train.fingerprint), "embed_dim": str(embed_dim),
            "temperature": str(temperature), "seed": str(seed), "protocol": json.dumps(protocol, sort_keys=True)}
    paths = [Path(cache_dir) / "reference_heads.safetensors"] if cache_dir is not None else []
    if shared_cache_dir is not None:
        paths.append(Path(shared_cache_dir) / f"reference_heads-{train.fingerprint}-d{embed_dim}-s{seed}.safetensors")
    heads = None
    for path in paths:
        if not path.is_file():
            continue
        if _safetensors_metadata(path) == meta:
            heads = RetrievalHeads(train.image_features.shape[1], train.caption_features.shape[1], embed_dim)
            heads.load_state_dict(load_file(str(path)))
            break
        logger.info("reference heads in %s were made with other features or settings; not using them", path)
    if heads is None:
        if trained_state is not None:
            heads = RetrievalHeads(train.image_features.shape[1], train.caption_features.shape[1], embed_dim)
            heads.load_state_dict(trained_state)
        else:
            heads = train_heads(train, EvaluationProtocol(temperature=temperature, eval_epochs=(), **protocol),
                                embed_dim=embed_dim, seed=seed).heads
    state = {k: v.contiguous() for k, v in heads.state_dict().items()}
    for path in paths:  # written where missing or stale; a temporary file, then a rename: runs may share the folder
        if path.is_file() and _safetensors_metadata(path) == meta:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(state, str(partial), metadata=meta)
        os.replace(partial, path)
    heads.eval()
    reference = ReferenceDiagnostics(heads)
    subset = PairSet(*select_coreset("random", train, num_pairs, seed=seed).pairs(train))
    reference.real_subset = reference(subset)
    return reference


def shared_reference_cache() -> Path:
    """Where runs share their reference heads (:func:`reference_diagnostics`): beside the datasets cache."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "repblend_hf" / "reference_heads"


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def image_splits(prepared: Prepared, splits: tuple[str, ...] = ("validation", "test")) -> dict[str, ImageSplit]:
    """The real splits as images (with the image encoder's eval transform) for the fine-tuned-encoder protocol."""
    transform = prepared.image_encoder.eval_transform
    return {s: ImageSplit(prepared.dataset[s]["image"], transform, prepared.features[s]) for s in splits}


def evaluate_finetuned_set(pairs: PixelPairSet, prepared: Prepared, config, *, seeds: list[int], loss: str,
                           device=None, **overrides) -> EvaluationResult:
    """An asymmetric (LoRS / MTT-VL) set under its own protocol: ``prepared``'s image encoder fine-tuned on it.

    :func:`~repblend_hf.evaluation.evaluate_finetuned` with the set's layout (``config.asymmetric_image_head``)
    and τ, scored on ``prepared``'s validation and test images. Without an image head the text head outputs the
    encoder's feature width. ``overrides`` go to ``evaluate_finetuned`` (``lr``, ``epochs``, ...).
    """
    splits = image_splits(prepared)
    embed_dim = config.embed_dim if config.asymmetric_image_head else None
    protocol = EvaluationProtocol(loss=loss, temperature=config.temperature, **overrides)
    return evaluate_finetuned(pairs, prepared.image_encoder, splits["validation"], splits["test"], protocol,
                              seeds=seeds, embed_dim=embed_dim, image_head=config.asymmetric_image_head,
                              device=device)


# What a results record's settings say about the run (not the protocol): an own-protocol record copies them.
RUN_SETTINGS = ("synthetic_space", "feature_range", "matching", "asymmetric_image_head", "inner_logit_scale")


def own_protocol_record(shared: dict[str, Any], own: EvaluationResult) -> dict[str, Any]:
    """An asymmetric set's ``results.json`` record under its own protocol, the shared one under ``shared_protocol``.

    ``shared`` is the set's :func:`results_record` under the shared frozen-encoder protocol (with the run's
    settings and ``set_diagnostics``), so every method stays comparable on the same protocol (issue #11).
    """
    record = results_record(own, dataset=shared["dataset"], method=shared["method"], pairs=shared["pairs"])
    record["settings"].update({k: shared["settings"][k] for k in RUN_SETTINGS if k in shared["settings"]})
    if "set_diagnostics" in shared:
        record["set_diagnostics"] = shared["set_diagnostics"]
    record["shared_protocol"] = shared
    return record


def results_record(result: EvaluationResult, *, dataset: str, method: str, pairs: int) -> dict[str, Any]:
    """The ``results.json`` schema: dataset, method, pairs, seeds and validation / test mean ± std per metric.

    ``protocol`` names how the set was evaluated (``settings["protocol"]``): ``"frozen_encoder"`` (fresh heads on
    frozen-encoder features, the protocol shared by every set) or ``"finetune_encoder"`` (the asymmetric methods'
    own: the image encoder fine-tuned with a fresh text head on the set's pixels). An asymmetric set's record
    is under its own protocol and carries the shared one's record under ``"shared_protocol"``.
    """
    summary = result.summary()
    return {
        "dataset": dataset,
        "method": method,
        "pairs": pairs,
        "protocol": result.settings.get("protocol", FROZEN_ENCODER),
        "seeds": len(result.seeds),
        "validation": {k: summary["validation"][k] for k in METRIC_NAMES},
        "test": {k: summary["test"][k] for k in METRIC_NAMES},
        "test_selected_on_test": {k: summary["test_selected_on_test"][k] for k in METRIC_NAMES},
        "diagnostics": summary["diagnostics"],
        "settings": result.settings,
    }


def write_results(path: str | Path, record: dict[str, Any]) -> Path:
    """Write a :func:`results_record` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


_PROTOCOL_LABELS = {FROZEN_ENCODER: "shared protocol: frozen encoder",
                    FINETUNE_ENCODER: "own protocol: fine-tuned encoder"}


def format_table(records: list[dict[str, Any]], split: str = "test") -> str:
    """A Markdown table of ``split`` metrics (mean ± std) with one row per record.

    A record with a ``shared_protocol`` record (an asymmetric set) gives two rows, each labelled with its protocol.
    A record of one seed shows its means alone (a standard deviation over one seed would read as 0.0).
    """
    header = "| method | pairs | " + " | ".join(METRIC_NAMES) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_NAMES) + 2)]
    rows = []
    for r in records:
        if "shared_protocol" in r:
            rows += [(f"{x['method']} ({_PROTOCOL_LABELS.get(x.get('protocol'), x.get('protocol'))})", x)
                     for x in (r, r["shared_protocol"])]
        else:
            rows.append((r["method"], r))
    for label, r in rows:
        cells = [f"{r[split][k]['mean']:.1f}" + (f" ± {r[split][k]['std']:.1f}" if r.get("seeds") != 1 else "")
                 for k in METRIC_NAMES]
        lines.append(f"| {label} | {r['pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_with_config(parser, argv: list[str] | None = None, default_config: str | Path | None = None):
    """``HfArgumentParser.parse_args_into_dataclasses`` with ``--config file.yaml`` underneath the command line.

    The YAML's keys are the arguments' names; values given on the command line win over the file's.
    ``default_config`` is read when no ``--config`` is given (``--config none`` reads nothing).
    """
    import argparse
    import sys

    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    config = known.config if known.config is not None else default_config
    from_file: list[str] = []
    if config is not None and str(config).lower() != "none":
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"--config {config}: expected a mapping of argument names to values")
        for key, value in values.items():
            if isinstance(value, bool):
                value = str(value).lower()
            if isinstance(value, (list, tuple)):
                from_file += [f"--{key}", *map(str, value)]
            elif value is not None:
                from_file += [f"--{key}", str(value)]
    return parser.parse_args_into_dataclasses(from_file + rest)
