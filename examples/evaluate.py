"""Evaluate a baseline (coreset or full data) or a saved distilled set with the retrieval protocol.

    python examples/evaluate.py --dataset fashion-scenes --method random --pairs 100 --seeds 3 --output_dir out
    python examples/evaluate.py --method distilled --distilled_set outputs/fashion-scenes-repblend-99/synthetic_set
    python examples/evaluate.py --method distilled --distilled_set someone/fashion-scenes-repblend-99   # a Hub repo
    python examples/evaluate.py --method distilled --distilled_set outputs/lors-99/synthetic_set --protocol frozen
    python examples/evaluate.py --method distilled --distilled_set outputs/fashion-scenes-repblend-99/synthetic_set \
        --image_encoder tf_efficientnet_lite1                   # cross-architecture: under another image encoder

The same command as the installed ``repblend-evaluate`` (``repblend_hf/commands/evaluate.py``, which describes
the protocols; ``--help`` lists every argument). Writes ``OUTPUT_DIR/results.json`` and prints a Markdown table.
"""

from repblend_hf.commands.evaluate import EvaluateArguments, evaluate_distilled, main

__all__ = ["EvaluateArguments", "evaluate_distilled", "main"]  # what earlier code imported from this script

if __name__ == "__main__":
    main()
