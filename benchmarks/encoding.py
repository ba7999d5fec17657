"""Feature-encoding throughput: captions / s and images / s of the frozen encoders, per way of batching them.

    .venv/bin/python benchmarks/encoding.py --cpu_threads 2
    .venv/bin/python benchmarks/encoding.py --cpu_threads 1 --text_samples 1000 --image_samples 256 --repeats 2

A first run spends most of its time before distillation encoding every split once (fashion-scenes: 60,000
captions through MiniLM, 12,000 images and two augmented views of the 10,000 training images through
EfficientNet-Lite0). This measures, on a sample of the training split, each stage of that work in every
variant the encoders offer, side by side in one process (each timed ``--repeats`` times, best kept):

- captions: the tokenizer alone; the encoder in float32 by forward batch size, with the captions sorted by
  length over the whole sample (dynamic padding) or only within chunks of one ``Dataset.map`` batch (the
  path before this benchmark); under bfloat16 autocast and with int8 dynamically quantised linear layers (not
  offered by the library), with how far their embeddings are from float32's;
- images: the eval and train transforms alone; the encoder by forward batch size, with and without the
  BatchNorms folded into the convolutions, and its agreement with the unfolded model;
- a ``torch.profiler`` table of one float32 caption batch (where the text encoder's time goes).

Writes ``benchmarks/results/encoding.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent

from _common import command, markdown_table, time_calls, write_json, write_markdown  # noqa: E402


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` wall-clock timings of ``fn()`` (seconds)."""
    return min(time_calls(fn, repeats))


def agreement(a, b) -> dict:
    """How close two embedding matrices are: the smallest row cosine and the largest relative row error."""
    import torch

    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    rel = (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
    return {"min_cosine": float(cos.min()), "max_relative_error": float(rel.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-scenes")
    parser.add_argument("--image_encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--text_encoder", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--text_samples", type=int, default=2000, help="Captions timed (from the first rows).")
    parser.add_argument("--image_samples", type=int, default=512, help="Images timed (the first rows).")
    parser.add_argument("--map_batch_rows", type=int, default=128,
                        help="Rows per Dataset.map batch of the path before (its captions were sorted within one).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu_threads", type=int, default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "encoding"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from repblend_hf.data.images import to_rgb
    from repblend_hf.data.loading import load_image_text_dataset
    from repblend_hf.encoders import load_image_encoder, load_text_encoder
    from repblend_hf.pipeline import configure_cpu_threads

    threads = configure_cpu_threads(args.cpu_threads)
    train = load_image_text_dataset(args.dataset)["train"]
    rows = train.select(range(min(len(train), max(args.image_samples, args.text_samples))))
    captions_per_row = [len(c) for c in rows["captions"]]
    captions = [c for caps in rows["captions"] for c in caps][: args.text_samples]
    images = [to_rgb(img) for img in rows.select(range(min(len(rows), args.image_samples)))["image"]]
    text_encoder = load_text_encoder(args.text_encoder)
    image_encoder = load_image_encoder(args.image_encoder, image_size=args.image_size)
    reps = args.repeats
    record: dict = {"threads": threads, "dataset": args.dataset, "captions": len(captions), "images": len(images),
                    "text": [], "image": []}

    # --- captions ---
    tokenizer = text_encoder.tokenizer
    seconds = best_of(lambda: tokenizer(captions, truncation=True, max_length=text_encoder.max_length), reps)
    record["text"].append({"variant": "tokenizer only (batched, fast)", "per_s": len(captions) / seconds})
    lengths = [len(ids) for ids in tokenizer(captions, truncation=True, max_length=64)["input_ids"]]
    record["tokens"] = {"mean": sum(lengths) / len(lengths), "min": min(lengths), "max": max(lengths)}
    chunk = max(1, round(args.map_batch_rows * sum(captions_per_row) / len(rows)))  # one map batch's captions
    reference = text_encoder.encode_texts(captions, batch_size=64)

    def per_chunk(batch_size: int):
        return torch.cat([text_encoder.encode_texts(captions[i : i + chunk], batch_size=batch_size)
                          for i in range(0, len(captions), chunk)])

    seconds = best_of(lambda: per_chunk(256), reps)
    record["text"].append({"variant": f"float32, sorted within map batches of {args.map_batch_rows} rows "
                                      f"({chunk} captions), forward batch 256 (before)",
                           "per_s": len(captions) / seconds})
    for batch_size in (32, 64, 128, 256):
        seconds = best_of(lambda bs=batch_size: text_encoder.encode_texts(captions, batch_size=bs), reps)
        record["text"].append({"variant": f"float32, sorted over the sample, forward batch {batch_size}",
                               "per_s": len(captions) / seconds})
    text_encoder.compute_dtype = torch.bfloat16  # what --encode_dtype bfloat16 (or auto on such a CPU) sets
    for batch_size in (32, 64, 256):
        seconds = best_of(lambda bs=batch_size: text_encoder.encode_texts(captions, batch_size=bs), reps)
        low = text_encoder.encode_texts(captions, batch_size=batch_size)
        record["text"].append({"variant": f"bfloat16 autocast, sorted over the sample, forward batch {batch_size}",
                               "per_s": len(captions) / seconds, **agreement(reference, low)})
    text_encoder.compute_dtype = torch.float32
    # int8 dynamic quantisation of every nn.Linear (torch.ao): measured, not offered by the library, because of the
    # agreement it gives (a candidate for CPUs without native bf16, where float32 is the only fast path).
    float_model = text_encoder.model
    text_encoder.model = torch.ao.quantization.quantize_dynamic(float_model, {torch.nn.Linear}, dtype=torch.qint8)
    seconds = best_of(lambda: text_encoder.encode_texts(captions, batch_size=64), reps)
    record["text"].append({"variant": "int8 dynamic quantisation of the linear layers (not offered), forward batch 64",
                           "per_s": len(captions) / seconds,
                           **agreement(reference, text_encoder.encode_texts(captions, batch_size=64))})
    text_encoder.model = float_model

    # --- images ---
    for name, transform in (("eval", image_encoder.eval_transform), ("train", image_encoder.train_transform)):
        seconds = best_of(lambda t=transform: torch.stack([t(img) for img in images]), reps)
        record["image"].append({"variant": f"{name} transform only", "per_s": len(images) / seconds})
    pixels = torch.stack([image_encoder.eval_transform(img) for img in images])
    with torch.no_grad():
        unfolded = image_encoder(pixels)
        for folded in (False, True):
            if folded:
                image_encoder.fold_batchnorm_()
            for batch_size in (16, 32, 64, 128, 256):
                seconds = best_of(lambda bs=batch_size: [image_encoder(pixels[i : i + bs])
                                                         for i in range(0, len(pixels), bs)], reps)
                row = {"variant": f"encoder{', BatchNorms folded' if folded else ''}, forward batch {batch_size}",
                       "per_s": len(images) / seconds}
                if folded:
                    row.update(agreement(unfolded, image_encoder(pixels)))
                record["image"].append(row)

    # --- where a caption batch's time goes ---
    from torch.profiler import ProfilerActivity, profile

    batch = tokenizer(sorted(captions, key=len)[:64], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            text_encoder.model(**batch)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    record["text_profile"] = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / 3,
                               "share": e.self_cpu_time_total / total, "calls": e.count // 3} for e in events]

    out = Path(args.output)
    write_json(out, record)

    def rate_rows(rows_):
        return [[r["variant"], f"{r['per_s']:.0f}",
                 f"{r['min_cosine']:.6f}" if "min_cosine" in r else "", f"{r['max_relative_error']:.1e}"
                 if "max_relative_error" in r else ""] for r in rows_]

    lines = ["# Feature-encoding throughput\n", f"`{command('encoding.py')}`\n",
             f"{args.dataset} training sample: {len(captions)} captions ({record['tokens']['mean']:.1f} tokens on "
             f"average, {record['tokens']['min']}–{record['tokens']['max']}), {len(images)} images at "
             f"{args.image_size} px; {threads} torch thread(s); best of {reps} timings each. Agreement: the "
             "smallest cosine and the largest relative error of a row against the float32 / unfolded embedding.\n",
             "## Captions\n",
             *markdown_table(["variant", "captions / s", "min cosine", "max rel. error"], rate_rows(record["text"])),
             "", "## Images\n",
             *markdown_table(["variant", "images / s", "min cosine", "max rel. error"], rate_rows(record["image"])),
             "", "## Profile of one float32 batch of 64 captions (self time per forward)\n",
             *markdown_table(["op", "ms", "share", "calls"],
                             [[p["op"], f"{p['self_ms']:.1f}", f"{p['share']:.0%}", p["calls"]]
                              for p in record["text_profile"]])]
    write_markdown(out, lines)


if __name__ == "__main__":
    main()
