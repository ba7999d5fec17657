"""Faithfulness by equivalence: one outer iteration of this library against the authors' released code.

    # the authors' code, outside this repository (fetch gives a bare git mirror; only its Python files are needed):
    for r in zhangxin-xd/RepBlend silicx/LoRS_Distill princetonvisualai/multimodal_dataset_distillation; do
        d=/tmp/authors/${r#*/}; mkdir -p $d; git --git-dir=MIRROR_OF_$r archive HEAD -- '*.py' | tar -x -C $d
        git --git-dir=MIRROR_OF_$r rev-parse HEAD > $d/COMMIT; done
    .venv/bin/python benchmarks/equivalence.py --repblend /tmp/authors/RepBlend --lors /tmp/authors/LoRS_Distill \
        --mtt_vl /tmp/authors/multimodal_dataset_distillation

For RepBlend, LoRS and MTT-VL the same case goes to both sides: a tiny random-weight image encoder (timm
``test_nfnet``, the authors' NFNet family: no BatchNorm, so their train-mode student is the same function as this
library's eval-mode one), the same synthetic images, text embeddings and low-rank similarity parameters, the same
expert snapshots. The authors' script runs one outer iteration, unchanged, in a process of its own
(``_authors_harness.py``, which lists the adaptations that let it run on a CPU), and records its random draws (the
start epoch, the mini-batches, the blends); this library's :func:`repblend_hf.distillation.outer_iteration` then
runs with those draws and the method's own settings (the preset of ``DistillationArguments``), and the matching loss
and the gradient of every learnable tensor are compared: the images, the text embeddings, the similarity factors
(a, L, R) and the inner learning rates η (the library steps log η; its gradient is divided by η to compare).
Float32 throughout, one CPU thread. A difference counts when its largest absolute entry is above 1e-4 of the
authors' tensor's largest absolute entry.

The same comparison with one setting changed, for what the cases above switch off (seed of the first case):

- dropout (RepBlend, LoRS): the released student runs its heads in train mode (p = 0.1) and draws fresh masks when
  TESLA recomputes a step; this library reuses each step's masks. The authors' masks (drawn by the harness from a
  generator of its own, recorded) are handed to this library: with their fresh masks for the recomputation
  (emulated) the gradients must agree; with each step's masks reused (this library) the difference is the effect,
  set beside the spread of this library's gradient over its own mask draws;
- a BatchNorm encoder (timm ``test_efficientnet``; RepBlend, LoRS): train-mode (theirs) against eval-mode (ours);
- COCO's joint normalisation (RepBlend ``--merge_loss_branches``);
- a learned similarity outside [0, 1] (RepBlend, LoRS): both codes on an S in about [-5.5, 6.1], with the inner
  losses of each step; then, this library alone, the inner loop over ``--inner_steps`` steps with S inside and
  outside [0, 1], and (``--runs``) the learned S and logged inner losses of finished distillations.

Writes ``benchmarks/results/equivalence.{json,md}``. A method whose checkout is not given, or not found, is skipped
and named as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _authors_harness import ADAPTATIONS, SCRIPTS  # noqa: E402
from _common import command, markdown_table, write_json, write_markdown  # noqa: E402

TOLERANCE = 1e-4  # float32 noise: relative to the authors' tensor's largest entry
REPOS = {"repblend": "zhangxin-xd/RepBlend", "lors": "silicx/LoRS_Distill",
         "mtt_vl": "princetonvisualai/multimodal_dataset_distillation"}
# What each method is in this library: its preset (DistillationArguments.METHOD_PRESETS) with the released sizes.
CASE = dict(image_encoder="test_nfnet", image_size=32, num_pairs=12, text_dim=768, mini_batch_size=4, syn_steps=3,
            expert_epochs=1, max_start_epoch=2, num_epochs=2, sim_rank=3, sim_alpha=3.0, lr_init=0.1, dropout=0.0)


def commit_of(checkout: Path) -> str:
    """The checkout's commit: ``git rev-parse HEAD`` in a work tree, else a ``COMMIT`` file beside its code."""
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    marker = checkout / "COMMIT"
    return marker.read_text().strip() if marker.exists() else "unknown (no git work tree, no COMMIT file)"


# ----- the case ------------------------------------------------------------------------------------------------------


def make_case(method: str, seed: int, *, image_encoder: str = "test_nfnet", dropout: float = 0.0,
              similarity: str = "inside", merge_loss_branches: bool = False, syn_steps: int | None = None,
              num_pairs: int | None = None) -> tuple[dict, dict]:
    """The settings and tensors both sides read: encoder weights, the set, the similarity, the expert snapshots.

    ``similarity="inside"`` draws S with every entry inside [0, 1] (a ≈ 0.85, L ≥ 0, a small R ≥ 0); ``"outside"``
    draws a ≈ 2 and a large R, so that S has entries above 1 (on the diagonal and off it) and below 0.
    """
    import timm

    from repblend_hf.modeling import flatten_parameters
    from repblend_hf.training_args import METHOD_PRESETS

    preset = METHOD_PRESETS[method]
    case = {**CASE, "method": method, "image_encoder": image_encoder, "dropout": dropout, "authors_seed": seed,
            "blend_beta": preset["blend_beta"], "matching": preset["matching"], "similarity": similarity,
            "merge_loss_branches": merge_loss_branches}
    if syn_steps is not None:
        case["syn_steps"] = syn_steps
    if num_pairs is not None:
        case["num_pairs"] = num_pairs
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the case is a function of the seed alone
        torch.manual_seed(seed)
        encoder = timm.create_model(case["image_encoder"], pretrained=False, num_classes=0)
        case["image_dim"] = int(encoder.num_features)
        heads = _student_heads(case)
    n, t = case["num_pairs"], case["num_epochs"]
    tensors = {f"encoder.{k}": v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
    tensors["images"] = torch.randn(n, 3, case["image_size"], case["image_size"], generator=g)
    tensors["texts"] = 0.5 * torch.randn(n, case["text_dim"], generator=g)
    if similarity == "inside":  # a ≈ 0.85, L and R ≥ 0 and R small: every entry of S in [0, 1]
        tensors["similarity.diag"] = 0.85 + 0.02 * torch.randn(n, generator=g)
        tensors["similarity.left"] = torch.randn(n, case["sim_rank"], generator=g).abs()
        tensors["similarity.right"] = 0.03 * torch.randn(n, case["sim_rank"], generator=g).abs()
    else:  # a ≈ 2 and a large R: entries above 1 (on the diagonal and off it) and below 0
        tensors["similarity.diag"] = 2.0 + 0.1 * torch.randn(n, generator=g)
        tensors["similarity.left"] = torch.randn(n, case["sim_rank"], generator=g)
        tensors["similarity.right"] = torch.randn(n, case["sim_rank"], generator=g)
    # Branches as matched: symmetric, the two heads; asymmetric (as released), the encoder and the text head.
    image_modules = [heads.image_head] if case["matching"] == "symmetric" else [encoder]
    shapes = {"image": [list(p.shape) for m in image_modules for p in m.parameters()],
              "text": [list(p.shape) for p in heads.text_head.parameters()]}
    start = {"image": torch.cat([flatten_parameters(m) for m in image_modules]),
             "text": flatten_parameters(heads.text_head)}
    for branch, theta in start.items():  # an expert: each epoch a random step of ~10% of the parameters' scale
        steps = [theta]
        for _ in range(t):
            steps.append(steps[-1] + 0.1 * theta.abs().mean() * torch.randn(theta.shape, generator=g))
        tensors[f"expert.{branch}"] = torch.stack(steps)
    case["branch_shapes"] = shapes
    return case, tensors


def similarity_range(tensors: dict, case: dict) -> dict[str, float]:
    """min / max of S = diag(a) + (α/r) L Rᵀ and the share of its entries outside [0, 1]."""
    s = (torch.diag(tensors["similarity.diag"])
         + case["sim_alpha"] / case["sim_rank"] * tensors["similarity.left"] @ tensors["similarity.right"].t())
    return {"min": float(s.min()), "max": float(s.max()), "outside_share": float(((s < 0) | (s > 1)).float().mean())}


def _student_heads(case: dict):
    from repblend_hf.modeling import RetrievalHeads

    width = case["image_dim"]
    return RetrievalHeads(width, case["text_dim"], width, image_head=case["matching"] == "symmetric")


def run_authors(method: str, checkout: Path, case: dict, tensors: dict, work: Path) -> dict:
    """The authors' script on the case in a process of its own: its draws, loss and gradients."""
    from safetensors.torch import load_file, save_file

    case_dir = work / "case"
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / "case.json").write_text(json.dumps(case))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(case_dir / "case.safetensors"))
    out = work / "authors"
    proc = subprocess.run([sys.executable, str(HERE / "_authors_harness.py"), "--method", method, "--checkout",
                           str(checkout), "--case", str(case_dir), "--out", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the authors' {SCRIPTS[method]} failed on the case:\n{proc.stderr[-4000:]}")
    record = json.loads((out / "authors.json").read_text())
    record["tensors"] = load_file(str(out / "authors.safetensors"))
    return record


def authors_draws(method: str, case: dict, record: dict):
    """The authors' start epoch, mini-batches (global indices) and blends (λ, π), rebuilt from their draws in order.

    RepBlend / LoRS walk a permutation of the N pairs and start a fresh one when fewer than a mini-batch are left;
    RepBlend then permutes each mini-batch for its blend (``mix_embedding_up``). MTT-VL takes the first
    ``mini_batch_size`` of a fresh permutation at every step.
    """
    from repblend_hf.blending import BlendParams

    n, mbs, steps = case["num_pairs"], case["mini_batch_size"], case["syn_steps"]
    perms = [record["tensors"][f"randperm.{i}"] for i in range(len(record["randperm_sizes"]))]
    sizes = record["randperm_sizes"]
    if n == mbs:
        raise ValueError("the case needs num_pairs != mini_batch_size to tell the two kinds of permutation apart")
    full = iter([p for p, s in zip(perms, sizes) if s == n])
    batch_perms = [p for p, s in zip(perms, sizes) if s == mbs]
    batches = []
    if method == "mtt_vl":
        batches = [next(full)[:mbs] for _ in range(steps)]
    else:
        order, index = next(full), 0
        for _ in range(steps):
            if index + mbs > n:
                order, index = next(full), 0
            batches.append(order[index:index + mbs])
            index += mbs
    if method == "repblend":
        if len(record["beta"]) != steps or len(batch_perms) < steps:
            raise RuntimeError(f"expected {steps} blends, recorded {len(record['beta'])} λ and {len(batch_perms)} π")
        blends = [BlendParams(lam, perm) for lam, perm in zip(record["beta"], batch_perms)]
    else:
        blends = [BlendParams(1.0, torch.arange(mbs)) for _ in range(steps)]
    start_epoch = record["start_epoch"][-1]  # the script's only randint is the start epoch
    return start_epoch, batches, blends


def run_library(method: str, case: dict, tensors: dict, start_epoch: int, batches: list, blends: list, *,
                inner_dropout: float = 0.0, dropout_seeds: list[int] | None = None,
                masks: tuple[list, list] | None = None) -> dict:
    """This library's outer iteration on the case with the given draws: loss, gradients, inner losses.

    :func:`~repblend_hf.distillation.outer_iteration` itself, with its two draws (the segment, the inner-loop plan)
    replaced by the given ones; everything else is the method's preset with the case's sizes. ``masks`` (the dropout
    check): ``(forward, recomputed)``, each step's ``(image mask or None, text mask)`` as the authors' run drew them;
    the inner loop's step k then takes ``forward[k]`` and, when TESLA recomputes it (forced on), ``recomputed[k]``.
    """
    from unittest import mock

    import timm

    from repblend_hf import distillation
    from repblend_hf.configuration import RepBlendConfig
    from repblend_hf.distillation import InnerLoopPlan, encoder_pass_for, inner_temperature, outer_iteration
    from repblend_hf.encoders import FrozenImageEncoder
    from repblend_hf.synthetic import SyntheticSet
    from repblend_hf.training_args import METHOD_PRESETS, DistillationArguments
    from repblend_hf.trajectories import ExpertTrajectories, TrajectorySegment

    preset = METHOD_PRESETS[method]
    model = timm.create_model(case["image_encoder"], pretrained=False, num_classes=0)
    model.load_state_dict({k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")})
    encoder = FrozenImageEncoder(model, case["image_encoder"], case["image_size"])
    config = RepBlendConfig(image_encoder=case["image_encoder"], image_size=case["image_size"],
                            image_dim=case["image_dim"], text_dim=case["text_dim"], embed_dim=case["image_dim"],
                            num_pairs=case["num_pairs"], similarity=preset["similarity"], sim_rank=case["sim_rank"],
                            sim_alpha=case["sim_alpha"], method=method, matching=preset["matching"],
                            inner_lr_img=case["lr_init"], inner_lr_txt=case["lr_init"])
    synthetic = SyntheticSet(config, tensors["images"], tensors["texts"])
    if preset["similarity"] == "lowrank":
        synthetic.similarity.load_state_dict({k: tensors[f"similarity.{k}"] for k in ("diag", "left", "right")})
    trajectories = ExpertTrajectories({"branch_sizes": {b: tensors[f"expert.{b}"].shape[1] for b in ("image", "text")},
                                       "num_epochs": case["num_epochs"]})
    trajectories.add_expert({b: tensors[f"expert.{b}"] for b in ("image", "text")})
    # The run's arguments: the method's preset (the released switches) with the case's sizes; η unclipped and
    # unclamped so that its gradient is the plain one, one segment per iteration as released.
    args = DistillationArguments(
        output_dir=tempfile.mkdtemp(prefix="equivalence-"), method=method, use_cpu=True, report_to="none",
        segments_per_iteration=1, expert_epochs=case["expert_epochs"], max_start_epoch=case["max_start_epoch"],
        syn_steps=len(batches), mini_batch_size=case["mini_batch_size"], lr_min=1e-6, lr_max=10.0,
        lr_grad_clip=0.0, inner_dropout=inner_dropout, encoder_chunk_size=0, encoder_recompute=False,
        branch_normalization="joint" if case.get("merge_loss_branches") else "separate")
    target = start_epoch + case["expert_epochs"]
    segment = TrajectorySegment(0, start_epoch, {b: tensors[f"expert.{b}"][start_epoch] for b in ("image", "text")},
                                {b: tensors[f"expert.{b}"][target] for b in ("image", "text")}, target)
    touched = torch.unique(torch.cat(batches))
    plan = InnerLoopPlan(touched, [torch.searchsorted(touched, b) for b in batches], blends,
                         dropout_seeds or list(range(len(batches))))
    heads = distillation.student_heads(config)
    encoder_pass = encoder_pass_for(encoder, config, args)
    patches = [mock.patch.object(distillation, "plan_inner_loop", lambda *a, **k: plan),
               mock.patch.object(trajectories, "sample_segment", lambda *a, **k: segment)]
    if masks is not None:
        patches += _given_masks(*masks)
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        result = outer_iteration(synthetic, heads, trajectories, encoder_pass, args, torch.Generator().manual_seed(0),
                                 temperature=inner_temperature(config, args))
    grads = {id(p): g for p, g in result.gradients}
    eta = {b: float(v.detach()) for b, v in result.inner_lrs.items()}
    out = {"loss": float(result.loss), "images": grads[id(synthetic.images)],
           "texts": grads[id(synthetic.text_embeddings)],
           # dL/dη = dL/dlog η / η (the library's η = exp(log η), not clamped here)
           "eta_img": grads[id(synthetic.log_lr_img)] / eta["image"],
           "eta_txt": grads[id(synthetic.log_lr_txt)] / eta["text"], "stats": result.stats[0]}
    if preset["similarity"] == "lowrank":
        for name, p in synthetic.similarity.named_parameters():
            out[f"similarity.{name}"] = grads[id(p)]
    return out


def _given_masks(forward: list, recomputed: list) -> list:
    """Patches that hand the inner loop's steps the given dropout masks (first call of step k: ``forward[k]``, later
    calls, TESLA's recomputation, forced on: ``recomputed[k]``)."""
    import functools
    from unittest import mock

    from repblend_hf import distillation, inner_loop

    student = getattr(inner_loop, "_Student", None)
    if student is None or not hasattr(student, "masks"):
        raise RuntimeError("repblend_hf.inner_loop._Student.masks is gone: update the dropout check to the inner "
                           "loop's way of drawing its masks")
    calls: dict[int, int] = {}

    def masks(self, seed: int, rows: int, device):
        n = calls.get(seed, 0)
        calls[seed] = n + 1
        return (forward if n == 0 else recomputed)[seed]

    recompute = functools.partial(inner_loop.matching_gradients, tesla_recompute=True)
    return [mock.patch.object(student, "masks", masks),
            mock.patch.object(distillation, "matching_gradients", recompute)]


def authors_masks(method: str, case: dict, record: dict) -> tuple[list, list]:
    """The authors' dropout masks by step: ``(forward, recomputed)``, each ``[(image mask or None, text mask)]``.

    Their order of calls: every inner step (RepBlend: the image head, then the text head; LoRS / MTT-VL: the text
    head, the only head), then every recomputed step in the same order.
    """
    masks = [record["tensors"][f"mask.{i}"] for i in range(record["masks"])]
    per_step = 2 if method == "repblend" else 1
    steps = case["syn_steps"]
    if len(masks) != 2 * steps * per_step:
        raise RuntimeError(f"expected {2 * steps * per_step} dropout masks, the authors' run drew {len(masks)}")
    pairs = [tuple(masks[i:i + per_step]) if per_step == 2 else (None, masks[i]) for i in range(0, len(masks),
                                                                                                   per_step)]
    return pairs[:steps], pairs[steps:]


def authors_gradients(method: str, record: dict) -> dict:
    """The gradients the authors' optimiser steps received, by tensor name, and their matching loss."""
    t = record["tensors"]
    if method == "mtt_vl":  # three optimisers, stepped in this order: the lrs, the images, the texts
        names = {(0, 0, 0): "eta_img", (0, 0, 1): "eta_txt", (1, 0, 0): "images", (2, 0, 0): "texts"}
        loss = record["logs"]["Grand_Loss"]
    else:  # one optimiser: images, texts, [η_img, η_txt], the similarity's [a, L, R]
        names = {(0, 0, 0): "images", (0, 1, 0): "texts", (0, 2, 0): "eta_img", (0, 2, 1): "eta_txt",
                 (0, 3, 0): "similarity.diag", (0, 3, 1): "similarity.left", (0, 3, 2): "similarity.right"}
        loss = record["logs"]["Loss/grand"]
    out = {"loss": loss}
    for (s, gi, pi), name in names.items():
        key = f"grad.{s}.{gi}.{pi}"
        if key not in t:
            raise RuntimeError(f"the authors' optimiser step {s} recorded no gradient for {name} ({key})")
        out[name] = t[key]
    return out


def relative(ours: torch.Tensor | float, theirs: torch.Tensor | float) -> dict[str, float]:
    """``max |ours − theirs| / max |theirs|`` and ``‖ours − theirs‖ / ‖theirs‖``."""
    a, b = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    scale = float(b.abs().max())
    return {"max_abs_rel": float((a - b).abs().max()) / scale if scale else float((a - b).abs().max()),
            "norm_rel": float((a - b).norm() / b.norm()) if float(b.norm()) else float((a - b).norm()),
            "scale": scale}


def differences(ours: dict, theirs: dict) -> dict[str, dict[str, float]]:
    return {name: relative(ours[name], theirs[name]) for name in theirs}


def worst(rows: dict[str, dict[str, float]], skip: tuple[str, ...] = ()) -> float:
    return max(r["max_abs_rel"] for k, r in rows.items() if k not in skip)


def compare(method: str, checkout: Path, seed: int, work: Path, **case_options) -> dict:
    """One case of ``method``: the authors' iteration, ours with their draws, the differences.

    Also a control that must disagree: ours with the inner steps' mini-batches in another order (rotated by one
    step), so that a comparison that agrees is known to be able to fail.
    """
    case, tensors = make_case(method, seed, **case_options)
    began = time.time()
    record = run_authors(method, checkout, case, tensors, work)
    theirs = authors_gradients(method, record)
    start_epoch, batches, blends = authors_draws(method, case, record)
    ours = run_library(method, case, tensors, start_epoch, batches, blends, inner_dropout=case["dropout"])
    rows = differences(ours, theirs)
    control = run_library(method, case, tensors, start_epoch, batches[1:] + batches[:1], blends[1:] + blends[:1])
    steps = case["syn_steps"]
    return {"seed": seed, "options": case_options, "start_epoch": start_epoch,
            "batches": [b.tolist() for b in batches], "blend_lambdas": [b.lam for b in blends],
            "similarity_range": similarity_range(tensors, case),
            "authors_loss": theirs["loss"], "library_loss": ours["loss"], "differences": rows,
            "control_largest": worst(differences(control, theirs)),
            "authors_inner_losses": record["inner_losses"][:steps], "library_inner_losses": ours["stats"],
            "seconds": round(time.time() - began, 1), "agrees": worst(rows) <= TOLERANCE,
            "_ours": ours, "_theirs": theirs, "_draws": (start_epoch, batches, blends), "_record": record,
            "_case": (case, tensors)}


def dropout_check(method: str, checkout: Path, seed: int, work: Path, masks: int = 4) -> dict:
    """The released dropout (p = 0.1 in the heads; fresh masks when TESLA recomputes a step) against this library's
    (each step's masks drawn once, reused when recomputed), with the authors' own masks handed to this library.

    - ``emulated``: ours with the authors' forward masks and, recomputing each step, their fresh masks: the dropout
      path itself must agree;
    - ``reused``: ours as it runs (each step's forward masks reused when recomputed): the effect of the difference;
    - the scale it is measured against: ours under other mask draws, and ours without dropout.
    """
    import itertools
    import statistics

    run = compare(method, checkout, seed, work, dropout=0.1)
    case, tensors = run["_case"]
    start_epoch, batches, blends = run["_draws"]
    forward, recomputed = authors_masks(method, case, run["_record"])
    theirs = run["_theirs"]
    emulated = run_library(method, case, tensors, start_epoch, batches, blends, inner_dropout=0.1,
                           masks=(forward, recomputed))
    reused = run_library(method, case, tensors, start_epoch, batches, blends, inner_dropout=0.1,
                         masks=(forward, forward))
    own = [run_library(method, case, tensors, start_epoch, batches, blends, inner_dropout=0.1,
                       dropout_seeds=[1000 * (m + 1) + k for k in range(len(batches))]) for m in range(masks)]
    without = run_library(method, case, tensors, start_epoch, batches, blends)

    def summary(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "n": len(values)}

    names = [k for k in theirs if k != "loss"]
    return {
        "emulated": differences(emulated, theirs),
        "reused": differences(reused, theirs),
        "own_masks_vs_each_other": {k: summary([relative(a[k], b[k])["norm_rel"]
                                                for a, b in itertools.combinations(own, 2)]) for k in names},
        "own_masks_vs_no_dropout": {k: summary([relative(o[k], without[k])["norm_rel"] for o in own]) for k in names},
    }


def inner_loop_outside(seed: int, steps: int = 30) -> dict:
    """What a learned S with entries outside [0, 1] does to the inner loop (this library; the equivalence cases
    show the authors' code computes the same losses): the inner loss after k steps and the matching loss of θᵏ
    for k = 1 .. ``steps``, with S inside [0, 1] and with S outside it, on the RepBlend case (heads only)."""
    from repblend_hf.blending import sample_blend
    from repblend_hf.inner_loop import plan_inner_loop

    out = {}
    for similarity in ("inside", "outside"):
        case, tensors = make_case("repblend", seed, similarity=similarity, syn_steps=steps)
        plan = plan_inner_loop(case["num_pairs"], steps, case["mini_batch_size"], 1.0,
                               torch.Generator().manual_seed(seed))
        batches = plan.batch_indices
        blends = [sample_blend(case["mini_batch_size"], 1.0, torch.Generator().manual_seed(seed + k))
                  for k in range(steps)]
        curve = []
        for k in range(1, steps + 1):
            r = run_library("repblend", case, tensors, 0, batches[:k], blends[:k])
            curve.append({"steps": k, "inner_loss": r["stats"]["inner_loss_last"], "matching_loss": r["loss"]})
        out[similarity] = {"similarity_range": similarity_range(tensors, case), "curve": curve}
    return out


def wbce_floor(temperature: float = 0.07, eps: float = 1e-6) -> dict[str, float]:
    """How low one weighted-BCE entry with S_ij = 1 + δ can go: at cosine 1, p = σ(1/τ), and the entry is
    ``−(1 + δ) log(p + eps) + δ log(1 − p + eps)``; its slope in δ is ``log(1 − p + eps) − log(p + eps)``."""
    p = 1.0 / (1.0 + math.exp(-1.0 / temperature))
    return {"p_at_cosine_1": p, "slope_per_unit_above_1": math.log(1 - p + eps) - math.log(p + eps)}


def run_statistics(run: Path) -> dict:
    """A finished distillation's learned S (range, share outside [0, 1]) and its logged inner losses."""
    from repblend_hf.synthetic import SyntheticSet

    synthetic = SyntheticSet.from_pretrained(str(run / "synthetic_set"))
    with torch.no_grad():
        sim = synthetic.similarity().float()
    off = sim[~torch.eye(len(sim), dtype=torch.bool)]
    state = json.loads((run / "trainer_state.json").read_text())["log_history"]
    logged = [(h["step"], h["inner_loss_first"], h["inner_loss_last"]) for h in state if "inner_loss_last" in h]
    return {"run": str(run), "diag_min": float(sim.diag().min()), "diag_max": float(sim.diag().max()),
            "offdiag_min": float(off.min()), "offdiag_max": float(off.max()),
            "share_above_1": float((sim > 1).float().mean()), "share_below_0": float((sim < 0).float().mean()),
            "offdiag_positive_share": float((off > 0.5).float().mean()),
            "inner_loss_min": min((x[2] for x in logged), default=None),
            "inner_loss_logged": [{"step": a, "first": b, "last": c} for a, b, c in logged]}


def public(result: dict) -> dict:
    """A result without its tensors (the keys starting with '_')."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for method in REPOS:
        parser.add_argument(f"--{method}", default=None, metavar="CHECKOUT",
                            help=f"The authors' code of {REPOS[method]} (its {SCRIPTS[method]}); absent: skipped.")
    parser.add_argument("--seeds", default="0,1,2", help="Cases (random set, similarity, experts, draws) per method.")
    parser.add_argument("--inner_steps", type=int, default=30,
                        help="Inner steps of the S-outside-[0, 1] measurement (this library alone).")
    parser.add_argument("--runs", default="", help="Comma-separated finished distillation folders whose learned S "
                        "and logged inner losses are reported (the weighted BCE outside [0, 1]).")
    parser.add_argument("--output", default=str(HERE / "results" / "equivalence"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {"tolerance": TOLERANCE, "case": CASE, "adaptations": ADAPTATIONS, "methods": {}, "skipped": {},
                     "checks": {}}
    checkouts = {}
    for method in REPOS:
        checkout = getattr(args, method)
        if checkout is None or not (Path(checkout) / SCRIPTS[method]).is_file():
            why = "no checkout given" if checkout is None else f"{Path(checkout) / SCRIPTS[method]} not found"
            results["skipped"][method] = why
            print(f"skipping {method}: {why} (--{method} CHECKOUT of {REPOS[method]})", flush=True)
        else:
            checkouts[method] = Path(checkout)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for method, checkout in checkouts.items():
            cases = [public(compare(method, checkout, seed, work / method / f"seed{seed}")) for seed in seeds]
            results["methods"][method] = {"repo": REPOS[method], "commit": commit_of(checkout),
                                          "script": SCRIPTS[method], "cases": cases}
            print(f"{method}: largest relative difference {max(worst(c['differences']) for c in cases):.1e}, "
                  f"control {min(c['control_largest'] for c in cases):.1e}", flush=True)
        checks = results["checks"]
        for method in ("repblend", "lors"):
            if method not in checkouts:
                continue
            checkout = checkouts[method]
            checks[f"{method}: S outside [0, 1]"] = public(compare(method, checkout, seeds[0], work / method / "out",
                                                                   similarity="outside"))
            checks[f"{method}: BatchNorm encoder (test_efficientnet)"] = public(compare(
                method, checkout, seeds[0], work / method / "bn", image_encoder="test_efficientnet"))
            checks[f"{method}: dropout 0.1"] = dropout_check(method, checkout, seeds[0], work / method / "dropout")
            print(f"{method}: checks done", flush=True)
        if "repblend" in checkouts:
            checks["repblend: joint normalisation (--merge_loss_branches)"] = public(compare(
                "repblend", checkouts["repblend"], seeds[0], work / "repblend" / "joint", merge_loss_branches=True))
    results["inner_loop_outside"] = inner_loop_outside(seeds[0], args.inner_steps)
    results["wbce_floor"] = wbce_floor()
    results["runs"] = [run_statistics(Path(r)) for r in filter(None, args.runs.split(","))]
    write_json(args.output, results)
    write_markdown(args.output, report(results))


def differences_section(results: dict) -> list[str]:
    """Every difference above float noise that the checks found, with its measured size, as rows for the README's
    "Where this differs from the authors' code, and why" (numbers from this run's results)."""
    checks = results.get("checks", {})
    rows = []
    dropout = {k.split(":")[0]: v for k, v in checks.items() if "emulated" in v}
    if dropout:
        cells = []
        for method, v in dropout.items():
            emulated = max(r["max_abs_rel"] for r in v["emulated"].values())
            reused = v["reused"]
            cells.append(f"{method}: with the authors' own masks handed over and their fresh masks used when "
                         f"recomputing, every gradient agrees ({_fmt(emulated)}); reusing each step's masks moves "
                         f"the image / text gradients by {reused['images']['norm_rel']:.2f} / "
                         f"{reused['texts']['norm_rel']:.2f} (norm-relative), the similarity's by ≤ "
                         f"{max(reused[k]['norm_rel'] for k in reused if k.startswith('similarity')):.2f}, η's and "
                         f"the loss not at all; two of this library's mask draws differ by "
                         f"{v['own_masks_vs_each_other']['images']['mean']:.2f} / "
                         f"{v['own_masks_vs_each_other']['texts']['mean']:.2f}")
        rows.append(["dropout in TESLA's recomputation (p = 0.1)", "fresh masks when a step is recomputed",
                     "the step's own masks", "the recomputed gradient is then that of the step that was taken; "
                     "measured: " + "; ".join(cells)])
    bn = {k.split(":")[0]: v for k, v in checks.items() if "BatchNorm" in k}
    if bn:
        cells = [f"{m}: images {v['differences']['images']['max_abs_rel']:.1f}, loss "
                 f"{v['differences']['loss']['max_abs_rel']:.2f} (max-relative)" for m, v in bn.items()]
        rows.append(["BatchNorm in the student's image encoder", "the student runs in train mode: a BatchNorm "
                     "encoder normalises each inner mini-batch by its own statistics (the released NFNet has no "
                     "BatchNorm, so for it train and eval mode are one function: the cases above agree)",
                     "eval mode: the pretrained statistics (EfficientNet-Lite0, the embedded default, has BatchNorm)",
                     "the experts (cached eval-mode features; the asymmetric experts' encoder in eval mode) and the "
                     "evaluation see the encoder in eval mode; measured on timm test_efficientnet: "
                     + "; ".join(cells)])
    joint = next((v for k, v in checks.items() if "joint" in k), None)
    if joint:
        d = joint["differences"]
        rows.append(["η's gradient with joint normalisation (COCO settings, `--merge_loss_branches`)",
                     "the data's gradient is that of the joint ratio, η's that of the separate ratios (the script "
                     "computes `img_grand_loss` and `txt_grand_loss` per branch for η and for the logged loss)",
                     "the joint ratio's gradient for every tensor",
                     f"one loss, one gradient; measured: images / texts / similarity agree "
                     f"(≤ {max(d[k]['max_abs_rel'] for k in d if k not in ('eta_img', 'eta_txt', 'loss')):.0e}), "
                     f"η_img / η_txt differ by {d['eta_img']['max_abs_rel']:.2f} / {d['eta_txt']['max_abs_rel']:.2f}; "
                     "the Flickr settings and the embedded default use separate ratios, where both agree"])
    if "mtt_vl" in results.get("methods", {}):
        rows.append(["MTT-VL's inner mini-batch (a setting, not the code: the equivalence cases hand both codes the "
                     "same batches)", "the released command leaves `--mini_batch_size` at its default 100 = "
                     "`--num_queries`: every inner step trains on all pairs (a fresh permutation each step)",
                     "the `mtt_vl` preset keeps the library's 20 (Table 1's MTT-VL rows ran with it)",
                     "`--mini_batch_size 99` (≥ the number of pairs) reproduces the released scheme exactly: "
                     "`plan_inner_loop` then starts a fresh permutation of all pairs at every step; not measured "
                     "here (an asymmetric inner step costs about its batch size in encoder passes)"])
    if not rows:
        return []
    return ["", "## Differences found, for the README's \"Where this differs from the authors' code, and why\"", "",
            *markdown_table(["what", "authors' code", "here", "why, and the measured effect"], rows)]


def _fmt(x: float) -> str:
    return f"{x:.1e}"


def report(results: dict) -> list[str]:
    tol = results["tolerance"]
    lines = ["# Equivalence with the authors' code: one outer iteration", "",
             f"Command: `{command('equivalence.py')}`", "",
             f"Case: {json.dumps(results['case'])}; float32, one CPU thread; the authors' draws (start epoch, "
             "mini-batches, blends) fed to this library's `outer_iteration`. Each cell: max |ours − theirs| / max "
             f"|theirs| for one tensor's gradient (η: this library's log-η gradient / η); agreement: ≤ {tol:g}. "
             "'control': the largest difference of this library with the inner steps' mini-batches rotated by one "
             "step (it must disagree, or the comparison could not fail).", ""]
    for method, m in results["methods"].items():
        lines += [f"## {method}: {m['repo']} `{m['script']}` at `{m['commit']}`", ""]
        names = list(m["cases"][0]["differences"])
        header = ["seed", "start epoch", "loss (authors)", "loss (here)", *names, "agrees", "control"]
        rows = [[c["seed"], c["start_epoch"], f"{c['authors_loss']:.6g}", f"{c['library_loss']:.6g}",
                 *(_fmt(c["differences"][k]["max_abs_rel"]) for k in names), "yes" if c["agrees"] else "**no**",
                 _fmt(c["control_largest"])] for c in m["cases"]]
        lines += markdown_table(header, rows) + [""]
    for method, why in results["skipped"].items():
        lines.append(f"- {method} skipped: {why}")
    checks = results.get("checks", {})
    if checks:
        lines += ["", "## What the cases above switch off", "",
                  "The same comparison with one setting changed (seed "
                  f"{next(iter(results['methods'].values()))['cases'][0]['seed']}).", ""]
        compared = {k: v for k, v in checks.items() if "differences" in v}
        names = sorted({n for v in compared.values() for n in v["differences"]})
        header = ["case", "S range", "loss (authors)", "loss (here)", *names]
        rows = [[k, f"{v['similarity_range']['min']:.2f} .. {v['similarity_range']['max']:.2f}",
                 f"{v['authors_loss']:.6g}", f"{v['library_loss']:.6g}",
                 *(_fmt(v["differences"][n]["max_abs_rel"]) if n in v["differences"] else "—" for n in names)]
                for k, v in compared.items()]
        lines += markdown_table(header, rows) + [""]
        for k, v in compared.items():
            if "outside" in k:
                authors = [round(x, 4) for x in v["authors_inner_losses"]]
                here = v["library_inner_losses"]
                lines.append(f"- {k}: inner losses per step, authors {authors}, here first "
                             f"{here['inner_loss_first']:.4f} / last "
                             f"{here['inner_loss_last']:.4f}.")
        for k, v in checks.items():
            if "emulated" in v:
                names = list(v["emulated"])
                lines += ["", f"{k}: the authors' masks handed to this library (max-relative / norm-relative "
                          "difference from the authors' gradient), beside the spread of this library's own gradient "
                          "(norm-relative, mean ± std over 4 mask draws).", ""]
                header = ["", *names]
                rows = [["ours, the authors' fresh masks when recomputing (emulated)",
                         *(f"{_fmt(v['emulated'][n]['max_abs_rel'])} / {_fmt(v['emulated'][n]['norm_rel'])}"
                           for n in names)],
                        ["ours, each step's masks reused when recomputing (this library)",
                         *(f"{_fmt(v['reused'][n]['max_abs_rel'])} / {_fmt(v['reused'][n]['norm_rel'])}"
                           for n in names)],
                        ["ours: other masks, from each other", *(_ms(v["own_masks_vs_each_other"].get(n))
                                                               for n in names)],
                        ["ours: with dropout, from without", *(_ms(v["own_masks_vs_no_dropout"].get(n))
                                                             for n in names)]]
                lines += markdown_table(header, rows) + [""]
    inner = results.get("inner_loop_outside")
    if inner:
        lines += ["", "## The inner loop with S outside [0, 1] (this library, RepBlend case, λ and batches drawn)", "",
                  "Inner loss of step k and matching loss ‖θᵏ − θ*‖² / ‖θ⁰ − θ*‖² (summed over the two heads) after "
                  "k inner steps at the released η = 0.1.", ""]
        last = max(c["steps"] for r in inner.values() for c in r["curve"])
        ks = sorted({k for k in (1, 2, 4, 8, 16, last) if k <= last})
        header = ["S", "S range", *(f"k={k}: inner / matching" for k in ks)]
        rows = []
        for name, r in inner.items():
            by_k = {c["steps"]: c for c in r["curve"]}
            rows.append([name, f"{r['similarity_range']['min']:.2f} .. {r['similarity_range']['max']:.2f}",
                         *(f"{by_k[k]['inner_loss']:.3f} / {by_k[k]['matching_loss']:.2f}" for k in ks if k in by_k)])
        lines += markdown_table(header, rows) + [""]
        floor = results["wbce_floor"]
        lines.append(f"At cosine 1 (the largest logit 1/τ), p = {floor['p_at_cosine_1']:.7f}: an entry with S_ij = "
                     f"1 + δ is at least {floor['slope_per_unit_above_1']:.1f}·δ, so the loss is bounded only by "
                     "the logit range and eps; the gradient on the logit, p − S, never vanishes for S outside [0, 1].")
    for r in results.get("runs", []):
        lines += ["", f"## Learned S of `{r['run']}`", "",
                  f"diag {r['diag_min']:.3f} .. {r['diag_max']:.3f}; off-diagonal {r['offdiag_min']:.3f} .. "
                  f"{r['offdiag_max']:.3f} ({100 * r['offdiag_positive_share']:.2f} % above 0.5); entries above 1: "
                  f"{100 * r['share_above_1']:.2f} %, below 0: {100 * r['share_below_0']:.2f} %; the lowest logged "
                  f"inner_loss_last: {r['inner_loss_min']}."]
    lines += differences_section(results)
    lines += ["", "## Adaptations made to run the authors' code on a CPU", "",
              *(f"- {a}" for a in results["adaptations"])]
    return lines


def _ms(d: dict[str, float] | None) -> str:
    return "—" if d is None else f"{d['mean']:.2f} ± {d['std']:.2f}"


if __name__ == "__main__":
    main()
