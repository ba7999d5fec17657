"""Issue #2's measurements: build + encode times of the dataset, and the coreset / full-data baselines.

    .venv/bin/python benchmarks/baselines.py                      # fashion-scenes, 3 seeds, 100/200/500 pairs

Times the dataset build and feature encoding twice in fresh subprocesses (the first run after clearing
this benchmark's own datasets cache, the second a cache hit), then evaluates random / herding /
k-center coresets at each size and the full-data heads with the protocols of
``repblend_hf.pipeline.BASELINE_PROTOCOLS``. Writes ``benchmarks/results/baselines.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import command, markdown_table, seconds_since, write_json, write_markdown

HERE = Path(__file__).resolve().parent
TIMING_CHILD = r"""
import json, os, sys, time
t0 = time.time()
from repblend_hf.data import load_image_text_dataset
from repblend_hf.encoders import load_image_encoder, load_text_encoder
from repblend_hf.features import encode_dataset
ds = load_image_text_dataset(sys.argv[1])
t1 = time.time()
encoded = encode_dataset(ds, load_image_encoder(), load_text_encoder(), num_views=int(sys.argv[2]), batch_size=128)
t2 = time.time()
print(json.dumps({"build_s": round(t1 - t0, 1), "encode_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1),
                  "rows": {k: len(v) for k, v in encoded.items()}}))
"""


def time_pipeline(dataset: str, num_views: int, cache_dir: Path) -> list[dict]:
    """Run build + encode in two fresh processes against an empty, then warm, datasets cache."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    runs = []
    for label in ("first", "cached"):
        out = subprocess.run([sys.executable, "-c", TIMING_CHILD, dataset, str(num_views)], env=env,
                             capture_output=True, text=True, check=True)
        runs.append({"run": label, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(runs[-1], flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-scenes")
    parser.add_argument("--pairs", default="100,200,500")
    parser.add_argument("--methods", default="random,herding,kcenter")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num_views", type=int, default=2)
    parser.add_argument("--embed_dim", type=int, default=512)
    parser.add_argument("--skip_timing", action="store_true", help="Do not time the build + encode from scratch.")
    parser.add_argument("--skip_full", action="store_true", help="Do not train the full-data heads.")
    parser.add_argument("--cpu_threads", type=int, default=None, help="torch CPU threads (default: every core).")
    parser.add_argument("--output", default=str(HERE / "results" / "baselines"))
    args = parser.parse_args()

    timing = None if args.skip_timing else time_pipeline(args.dataset, args.num_views, HERE / ".cache" / "datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from repblend_hf.pipeline import DataArguments, evaluate_baseline, format_table, prepare_features, results_record

    prepared = prepare_features(DataArguments(dataset=args.dataset, num_views=args.num_views,
                                              cpu_threads=args.cpu_threads))
    seeds = list(range(args.seeds))
    records = []
    for method in args.methods.split(","):
        for pairs in map(int, args.pairs.split(",")):
            t0 = time.time()
            result = evaluate_baseline(method, prepared.features, pairs, embed_dim=args.embed_dim, seeds=seeds)
            records.append({**results_record(result, dataset=args.dataset, method=method, pairs=pairs),
                            "seconds": seconds_since(t0)})
            print(method, pairs, records[-1]["test"]["r_mean"], flush=True)
    if not args.skip_full:
        t0 = time.time()
        full = evaluate_baseline("full", prepared.features, 0, embed_dim=args.embed_dim, seeds=seeds)
        n_train = prepared.features["train"].num_images
        records.append({**results_record(full, dataset=args.dataset, method="full", pairs=n_train),
                        "seconds": seconds_since(t0)})
        print("full", records[-1]["test"]["r_mean"], flush=True)

    write_json(args.output, {"timing": timing, "results": records})
    lines = [f"# Baselines on {args.dataset} (test split, validation-selected epoch, {args.seeds} seeds)", "",
             f"Command: `{command('baselines.py')}`", "", format_table(records), ""]
    if timing:
        lines += markdown_table(["run", "build (s)", "encode (s)", "total (s)"],
                                [(t["run"], t["build_s"], t["encode_s"], t["total_s"]) for t in timing])
    write_markdown(args.output, lines)


if __name__ == "__main__":
    main()
