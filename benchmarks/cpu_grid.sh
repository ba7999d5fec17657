#!/usr/bin/env bash
# Issue #14's CPU speed grid in one go, on an otherwise idle machine (nothing else running): the 64-px grid
# over N, 128 / 224 px at N = 99 and 499, BatchNorm folding at 224 px, the paper's encoder size (nfnet_l0,
# random weights, 2304-d heads) and the embedded default's 1280-d heads, then feature encoding. Every result
# is named with TAG (e.g. `bash benchmarks/cpu_grid.sh epyc`); a finished configuration is not measured
# again, so an interrupted grid resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:?usage: bash benchmarks/cpu_grid.sh TAG   (a name for this machine, e.g. epyc)}
speed() { .venv/bin/python benchmarks/speed.py --threads 2 --skip_experts "$@"; }
speed --variants floor,repblend_auto,repblend_per_step --num_pairs 99,199,499,999 --image_sizes 64 --timed 5 \
  --tag "v5_64px_$TAG"
speed --variants floor,repblend_auto,repblend_per_step --num_pairs 99,499 --image_sizes 128,224 --timed 3 \
  --tag "v5_128_224px_$TAG"
speed --variants repblend,repblend_unfolded --num_pairs 99 --image_sizes 224 --encoder_chunk_size 20 --timed 3 \
  --tag "v5_fold_224px_$TAG"
speed --image_encoder nfnet_l0 --pretrained false --text_dim 768 --embed_dim 2304 \
  --variants floor,repblend_auto,repblend_per_step --num_pairs 99 --image_sizes 64 --timed 5 --tag "nfnet_l0_v5_$TAG"
speed --variants floor,repblend_auto --num_pairs 99 --image_sizes 64 --embed_dim 1280 --timed 5 --tag "d1280_$TAG"
.venv/bin/python benchmarks/encoding.py --cpu_threads 2 --text_samples 1000 --image_samples 256 --repeats 2 \
  --output "benchmarks/results/encoding_$TAG"
