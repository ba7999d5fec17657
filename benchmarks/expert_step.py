"""What one optimiser step of E symmetric experts costs: one expert after another, all of them at once, in bf16.

    .venv/bin/python benchmarks/expert_step.py --cpu_threads 2
    .venv/bin/python benchmarks/expert_step.py --experts 8 --batch 128 --embed_dim 512 --cpu_threads 1

Experts train projection heads on cached features (``ExpertModel``: InfoNCE, batch 128), so each step is a
few small matrix products per expert. This times the forward and backward of one step of ``--experts``
experts in three ways, each the median of ``--timed`` steps after a warm-up:

- ``loop``: one ``RetrievalHeads`` after another, as ``train_experts`` runs them (one Trainer per expert);
- ``vmap``: all experts at once, their parameters stacked (``torch.func.stack_module_state``) and the step
  vectorised with ``torch.func.vmap`` (independent dropout per expert), i.e. batched matrix products;
- ``loop, bf16 autocast``: the loop under bfloat16 autocast (what ``--bf16`` gives the experts).

Writes ``benchmarks/results/expert_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent

from _common import command, markdown_table, time_calls, write_json, write_markdown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image_dim", type=int, default=1280)
    parser.add_argument("--text_dim", type=int, default=384)
    parser.add_argument("--embed_dim", type=int, default=512)
    parser.add_argument("--timed", type=int, default=20)
    parser.add_argument("--cpu_threads", type=int, default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "expert_step"))
    args = parser.parse_args()

    import torch
    from torch.func import functional_call, stack_module_state, vmap

    from repblend_hf.losses import info_nce
    from repblend_hf.modeling import RetrievalHeads, similarity_logits
    from repblend_hf.pipeline import configure_cpu_threads

    threads = configure_cpu_threads(args.cpu_threads)
    torch.manual_seed(0)
    E, B = args.experts, args.batch
    heads = [RetrievalHeads(args.image_dim, args.text_dim, args.embed_dim) for _ in range(E)]
    images, texts = torch.randn(E, B, args.image_dim), torch.randn(E, B, args.text_dim)

    def loop():
        for e, h in enumerate(heads):
            h.zero_grad(set_to_none=True)
            i, t = h(images[e], texts[e])
            info_nce(similarity_logits(i, t, 0.07)).backward()

    params, buffers = stack_module_state(heads)
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    skeleton = copy.deepcopy(heads[0]).to("meta")

    def one(p, b, u, t):
        i, x = functional_call(skeleton, (p, b), (u, t))
        return info_nce(similarity_logits(i, x, 0.07))

    batched_loss = vmap(one, randomness="different")

    def batched():
        for v in params.values():
            v.grad = None
        batched_loss(params, buffers, images, texts).sum().backward()

    def bf16_loop():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loop()

    rows = []
    for name, fn in (("loop", loop), ("vmap", batched), ("loop, bf16 autocast", bf16_loop)):
        fn()  # warm-up
        rows.append({"variant": name, "ms_per_step": 1e3 * statistics.median(time_calls(fn, args.timed))})
    base = rows[0]["ms_per_step"]
    out = Path(args.output)
    write_json(out, {"threads": threads, **vars(args), "rows": rows})
    write_markdown(out, [
        "# One optimiser step of E symmetric experts\n", f"`{command('expert_step.py')}`\n",
        f"{E} experts, batch {B}, heads {args.image_dim}/{args.text_dim} → {args.embed_dim}, forward and backward "
        f"(no optimiser update), {threads} torch thread(s), median of {args.timed} steps.\n",
        *markdown_table(["variant", "ms per step (all experts)", "vs. loop"],
                        [[r["variant"], f"{r['ms_per_step']:.1f}", f"{base / r['ms_per_step']:.2f}x"] for r in rows])])


if __name__ == "__main__":
    main()
