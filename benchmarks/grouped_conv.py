"""What routing the encoder's grouped convolutions through ``repblend_hf.grouped_conv`` saves in the LoRS inner loop.

    .venv/bin/python benchmarks/grouped_conv.py --cpu_threads 1
    python3 benchmarks/grouped_conv.py --device cuda --pretrained false --results_dir $OUT   # on a lent GPU

``repblend_hf.distillation.matching_gradients`` for the asymmetric student of LoRS / MTT-VL as released (the image
encoder + a text head of the encoder's width, no image head): ``--syn_steps`` steps of ``--mini_batch_size`` pixel
pairs from a set of ``--num_pairs``, wBCE against a low-rank similarity, TESLA (each step recomputed, the library's
default for a student that trains the encoder), the meta-gradient to the pixels, texts, η and the similarity. The
meta-gradient differentiates the encoder's parameter gradients, i.e. a double backward through every convolution:

- ``routed``: the library's path: grouped convolutions (EfficientNet's depthwise layers) go through
  ``grouped_conv2d``, whose double backward is three grouped calls;
- ``aten``: ATen's own ``_convolution_double_backward``, which computes one term with one convolution per group.

The two alternate call by call in one process (so drift of the machine's speed hits both alike), ``--timed`` calls
each after a warm-up; the median is reported with the gradients' largest relative difference and, from one
profiled call of each, how many ``aten::_convolution`` calls it made. Writes
``RESULTS_DIR/grouped_conv_TAG.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent

from _common import command, markdown_table, write_json, write_markdown  # noqa: E402
from speed import aten_grouped_double_backward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--pretrained", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--text_dim", type=int, default=384)
    parser.add_argument("--num_pairs", type=int, default=99)
    parser.add_argument("--syn_steps", type=int, default=8)
    parser.add_argument("--mini_batch_size", type=int, default=20)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu_threads", type=int, default=None)
    parser.add_argument("--tag", default=None, help="Output name suffix (default: the device and image size).")
    parser.add_argument("--results_dir", default=str(HERE / "results"))
    args = parser.parse_args()

    import torch

    import repblend_hf.distillation as distillation
    from repblend_hf.encoders import load_image_encoder
    from repblend_hf.modeling import RetrievalHeads, flatten_parameters
    from repblend_hf.pipeline import configure_cpu_threads
    from repblend_hf.similarity import LowRankSimilarity

    threads = configure_cpu_threads(args.cpu_threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoder = load_image_encoder(args.image_encoder, image_size=args.image_size, pretrained=args.pretrained).model
    encoder = encoder.to(device).eval()
    width = encoder.num_features
    heads = RetrievalHeads(width, args.text_dim, width, image_head=False).to(device)
    start = {"image": flatten_parameters(encoder), "text": flatten_parameters(heads.text_head)}
    target = {b: v + 1e-3 * torch.randn_like(v) for b, v in start.items()}
    sim = LowRankSimilarity(args.num_pairs, rank=10, alpha=1.0).to(device)
    plan = distillation.plan_inner_loop(args.num_pairs, args.syn_steps, args.mini_batch_size, 0.0,
                                        torch.Generator().manual_seed(0)).to(device)
    n = len(plan.touched)
    pixels = torch.randn(n, 3, args.image_size, args.image_size, device=device, requires_grad=True)
    texts = torch.randn(n, args.text_dim, device=device, requires_grad=True)
    lrs = {b: torch.tensor(0.1, device=device, requires_grad=True) for b in ("image", "text")}
    wrt = [pixels, texts, lrs["image"], lrs["text"], *sim.parameters()]
    call = partial(distillation.matching_gradients, heads, pixels, texts,
                   partial(lambda pos, sim, plan: sim(plan.touched[pos]), sim=sim, plan=plan), plan, start, target,
                   lrs, wrt, temperature=0.07, image_encoder=encoder)

    def run(variant: str):
        with contextlib.nullcontext() if variant == "routed" else aten_grouped_double_backward():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t, out

    variants = ("routed", "aten")
    grads = {v: run(v)[1][1] for v in variants}  # warm-up, and the gradients compared below
    seconds = {v: [] for v in variants}
    for _ in range(args.timed):
        for v in variants:
            seconds[v].append(run(v)[0])
    calls = {}
    for v in variants:
        with torch.profiler.profile() as prof:
            run(v)
        calls[v] = sum(e.count for e in prof.key_averages() if e.key == "aten::_convolution")
    diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
               for a, b in zip(grads["routed"], grads["aten"]) if a is not None)
    rows = [{"variant": v, "s_per_call": statistics.median(seconds[v]), "seconds": seconds[v],
             "convolution_calls": calls[v]} for v in variants]
    speedup = rows[1]["s_per_call"] / rows[0]["s_per_call"]
    for r in rows:
        print(f"{r['variant']}: {r['s_per_call']:.3f} s per call, {r['convolution_calls']} aten::_convolution calls",
              flush=True)
    print(f"speed-up {speedup:.2f}x, largest relative gradient difference {diff:.1e}")

    tag = args.tag or f"{device.type}_{args.image_encoder}_{args.image_size}px"
    out = Path(args.results_dir) / f"grouped_conv_{tag}"
    write_json(out, {"threads": threads, **vars(args), "rows": rows, "speedup": speedup, "max_rel_diff": diff})
    where = f"{device.type}" + (f", {threads} torch thread(s)" if device.type == "cpu" else
                                f" ({torch.cuda.get_device_name(device)})")
    write_markdown(out, [
        "# LoRS inner loop: grouped convolutions routed, or through ATen's double backward\n",
        f"`{command('grouped_conv.py')}`\n",
        f"`matching_gradients` of the asymmetric student ({args.image_encoder} at {args.image_size} px + a "
        f"{width}-d text head, no image head): {args.syn_steps} steps of {args.mini_batch_size} pairs from "
        f"{args.num_pairs} ({n} touched), wBCE, TESLA with recomputed steps; {where}; the two variants alternate, "
        f"median of {args.timed} calls each.\n",
        *markdown_table(["variant", "s per call", "aten::_convolution calls per call"],
                        [[r["variant"], f"{r['s_per_call']:.3f}", str(r["convolution_calls"])] for r in rows]),
        f"\nSpeed-up of the routing: **{speedup:.2f}×**; largest gradient difference (relative to the largest "
        f"entry): {diff:.1e}."])


if __name__ == "__main__":
    main()
