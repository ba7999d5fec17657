#!/usr/bin/env bash
# Issue #14's GPU check, as one command for a lent GPU machine (the `device` tool: 15 minutes in all).
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR] [extra speed.py arguments]
#
# Seconds and peak memory (torch.cuda.max_memory_allocated) per distillation iteration at 224 px with the
# paper's image encoder (nfnet_l0, random init), 768-d text and 2304-d heads, fp32 and bf16, N = 99 and 499:
# the floor, RepBlend as the library runs it by default (a), the authors' per-step design (b) and LoRS (c).
# Each configuration runs in its own subprocess (an OOM or a crash costs one row, not the run); the JSON is
# written after every configuration and the report is rendered even when the time limit cuts the grid.
#
# On the device machine its own python3 (with torch) runs the code; the packages it lacks or has in other
# versions travel as wheels in .whl/ (ignored by git, named in the device call's `carry`), installed under
# /tmp/site first. They were fetched here for its Python 3.12 with
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 huggingface_hub==2.4.0 datasets==5.2.0 \
#         dill==0.4.1 multiprocess==0.70.19 timm==1.0.31 tokenizers==0.23.3 hf-xet==1.8.0 fsspec==2026.9.0 \
#         httpx2==2.16.2 httpcore2==2.16.2 truststore click==8.5.1
# (the second session: transformers==5.25.0, truststore==0.10.5, accelerate==1.16.0, typer==0.29.2, the
# versions of the .venv; match them to requirements/constraints.txt and the .venv when you fetch them again)
# and the call was  GRID_SECONDS=440 bash benchmarks/gpu_check.sh $OUT  (414 s on an H200, results in
# benchmarks/results/speed_cuda_nfnet_l0.*; the N = 499 fp32 repeat: the same with
# --num_pairs 499 --dtypes fp32 --variants floor,repblend_auto,repblend_unchunked,repblend_chunks_kept,repblend
# --timed 10 --tag cuda_nfnet_l0_n499_repeat).
set -uo pipefail
RESULTS=${1:-outputs/gpu_check}
shift || true
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
$PY -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"
ARGS=(--image_encoder nfnet_l0 --pretrained false --text_dim 768 --embed_dim 2304 --image_sizes 224
      --num_pairs 99,499 --dtypes fp32,bf16 --variants floor,repblend_auto,repblend_per_step,lors
      --skip_experts --warmup 2 --timed 5 --tag cuda_nfnet_l0 --results_dir "$RESULTS"
      --work_dir /tmp/repblend-speed --config_timeout 150)
# GRID_SECONDS bounds the measured grid so that the report below is still written inside the caller's limit.
timeout "${GRID_SECONDS:-420}" $PY benchmarks/speed.py --device "${DEVICE:-cuda}" "${ARGS[@]}" "$@"
echo "grid exit code $?"
$PY benchmarks/speed.py --device "${DEVICE:-cuda}" "${ARGS[@]}" "$@" --report_only
