"""What the heads' inner loop and its TESLA meta-gradient cost: recomputing every step, or keeping its graph.

    .venv/bin/python benchmarks/inner_loop.py --cpu_threads 1
    .venv/bin/python benchmarks/inner_loop.py --widths 1280:384:512,2304:768:2304 --timed 5 --cpu_threads 2

``repblend_hf.distillation.matching_gradients`` on features (the heads-only student of a symmetric set: what
every RepBlend iteration runs after its encoder pass), ``--syn_steps`` steps of ``--mini_batch_size`` pairs
from a set of ``--num_pairs``, wBCE against a low-rank similarity, blending on, TESLA meta-gradient to the
features, texts, η and the similarity. Two ways, each the median of ``--timed`` calls after a warm-up:

- ``recompute``: every step recomputed from its snapshot after the forward pass, as the released code does
  (``tesla_recompute=True``; what the library keeps for students that train the encoder);
- ``keep graphs``: each step's gradient kept with its graph, one backward at the end (``tesla_recompute=False``,
  the library's default for the heads-only student).

Both give the same gradients (the largest absolute difference is reported). ``--widths`` lists
``d_img:d_txt:d`` triples: the default's 512-d heads, the authors' width on EfficientNet-Lite0 (1280) and the
paper's NFNet-l0 + BERT (2304 / 768 / 2304). Writes ``benchmarks/results/inner_loop.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent

from _common import command, markdown_table, time_calls, write_json, write_markdown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="1280:384:512,1280:384:1280,2304:768:2304")
    parser.add_argument("--num_pairs", type=int, default=99)
    parser.add_argument("--syn_steps", type=int, default=8)
    parser.add_argument("--mini_batch_size", type=int, default=20)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--cpu_threads", type=int, default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "inner_loop"))
    args = parser.parse_args()

    import torch

    from repblend_hf.distillation import matching_gradients, plan_inner_loop
    from repblend_hf.modeling import RetrievalHeads, flatten_parameters
    from repblend_hf.pipeline import configure_cpu_threads
    from repblend_hf.similarity import LowRankSimilarity

    threads = configure_cpu_threads(args.cpu_threads)
    rows = []
    for spec in args.widths.split(","):
        d_img, d_txt, d = (int(x) for x in spec.split(":"))
        torch.manual_seed(0)
        heads = RetrievalHeads(d_img, d_txt, d)
        start = {b: flatten_parameters(h) for b, h in heads.branches().items()}
        target = {b: v + 0.05 * torch.randn_like(v) for b, v in start.items()}
        sim = LowRankSimilarity(args.num_pairs, rank=10, alpha=1.0)
        plan = plan_inner_loop(args.num_pairs, args.syn_steps, args.mini_batch_size, 1.0,
                               torch.Generator().manual_seed(0))
        u = torch.randn(len(plan.touched), d_img, requires_grad=True)
        v = torch.randn(len(plan.touched), d_txt, requires_grad=True)
        lrs = {"image": torch.tensor(0.1, requires_grad=True), "text": torch.tensor(0.1, requires_grad=True)}
        wrt = [u, v, lrs["image"], lrs["text"], *sim.parameters()]
        targets = partial(lambda pos, sim, plan: sim(plan.touched[pos]), sim=sim, plan=plan)
        results = {}
        for name, recompute in (("recompute", True), ("keep graphs", False)):
            call = partial(matching_gradients, heads, u, v, targets, plan, start, target, lrs, wrt, temperature=0.07,
                           tesla_recompute=recompute)
            results[name] = call()  # warm-up, and the gradients compared below
            seconds = statistics.median(time_calls(call, args.timed))
            rows.append({"widths": spec, "variant": name, "s_per_call": seconds})
        diff = max(float((a - b).abs().max()) for a, b in zip(results["recompute"][1], results["keep graphs"][1])
                   if a is not None)
        rows[-1]["max_abs_diff"] = rows[-2]["max_abs_diff"] = diff
        print(f"{spec}: recompute {rows[-2]['s_per_call']:.3f} s, keep graphs {rows[-1]['s_per_call']:.3f} s, "
              f"max |diff| {diff:.1e}", flush=True)

    out = Path(args.output)
    write_json(out, {"threads": threads, **vars(args), "rows": rows})
    table = []
    for spec in args.widths.split(","):
        r, k = (next(x for x in rows if x["widths"] == spec and x["variant"] == v)
                for v in ("recompute", "keep graphs"))
        table.append([spec.replace(":", " / "), f"{r['s_per_call']:.3f}", f"{k['s_per_call']:.3f}",
                      f"{r['s_per_call'] / k['s_per_call']:.2f}x", f"{k['max_abs_diff']:.1e}"])
    write_markdown(out, [
        "# The heads' inner loop and its TESLA meta-gradient\n", f"`{command('inner_loop.py')}`\n",
        f"`matching_gradients` on features: {args.syn_steps} steps of {args.mini_batch_size} pairs from "
        f"{args.num_pairs}, wBCE, blending, TESLA; {threads} torch thread(s), median of {args.timed} calls.\n",
        *markdown_table(["heads d_img / d_txt / d", "recompute (s)", "keep graphs (s)", "speed-up",
                         "largest gradient difference"], table)])


if __name__ == "__main__":
    main()
