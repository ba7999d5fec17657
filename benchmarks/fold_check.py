"""Is the BatchNorm-folded encoder faster than the unfolded one, alone, at each image size?

    .venv/bin/python benchmarks/fold_check.py --image_sizes 64,224 --cpu_threads 1

``speed.py`` once measured a 224-px iteration slower with the folded encoder (10.7 against 9.1 s, chunks
recomputed). This times the encoder by itself on a batch of ``--batch`` random images: a no-grad forward, and a
forward plus the input-gradient backward (what an iteration does with the synthetic pixels), unfolded and folded
(``repblend_hf.encoders.fold_batchnorm``) alternately, ``--repeats`` times each, best kept. Writes
``benchmarks/results/fold_check.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent

from _common import command, markdown_table, time_calls, write_json, write_markdown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--pretrained", default="true", choices=["true", "false"])
    parser.add_argument("--image_sizes", default="64,224")
    parser.add_argument("--batch", type=int, default=20, help="Images per call (the chunk size of the paper configs).")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--cpu_threads", type=int, default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "fold_check"))
    args = parser.parse_args()

    import torch

    from repblend_hf.encoders import fold_batchnorm, load_image_encoder
    from repblend_hf.pipeline import configure_cpu_threads

    threads = configure_cpu_threads(args.cpu_threads)
    rows = []
    for size in (int(s) for s in args.image_sizes.split(",")):
        encoder = load_image_encoder(args.image_encoder, image_size=size, pretrained=args.pretrained == "true")
        folded, count = fold_batchnorm(encoder.model)
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))

        def forward(model, x=x):
            with torch.no_grad():
                model(x)

        def forward_backward(model, x=x):
            leaf = x.clone().requires_grad_(True)
            out = model(leaf)
            torch.autograd.grad(out, leaf, torch.ones_like(out))

        for name, fn in (("forward", forward), ("forward + input backward", forward_backward)):
            best = {"unfolded": float("inf"), "folded": float("inf")}
            for _ in range(args.repeats):
                for label, model in (("unfolded", encoder.model), ("folded", folded)):  # alternating
                    best[label] = min(best[label], time_calls(lambda m=model, f=fn: f(m), 1)[0])
            rows.append({"image_size": size, "pass": name, "folded_batchnorms": count, **best,
                         "speedup": best["unfolded"] / best["folded"]})
            print(rows[-1], flush=True)
    out = Path(args.output)
    write_json(out, {"threads": threads, **vars(args), "rows": rows})
    write_markdown(out, [
        "# BatchNorm folding, the encoder alone\n", f"`{command('fold_check.py')}`\n",
        f"`{args.image_encoder}`, {args.batch} random images per call, {threads} torch thread(s), best of "
        f"{args.repeats} alternating timings.\n",
        *markdown_table(["px", "pass", "BatchNorms folded", "unfolded (s)", "folded (s)", "folded speed-up"],
                        [[r["image_size"], r["pass"], r["folded_batchnorms"], f"{r['unfolded']:.3f}",
                          f"{r['folded']:.3f}", f"{r['speedup']:.2f}x"] for r in rows])])


if __name__ == "__main__":
    main()
