"""One outer iteration of trajectory-matching distillation, as a pure function of tensors.

METHOD.md, "Distillation loop". :func:`outer_iteration` is the whole iteration: it samples the expert
segments and their inner-loop plans, passes the touched synthetic images through the frozen encoder once
(:class:`~repblend_hf.encoders.EncoderPass`), runs the student from each segment's start
(:func:`~repblend_hf.inner_loop.matching_gradients`, the inner loop and its meta-gradient), averages the matching
losses, and returns the meta-gradient of every learnable tensor of the set, the learned inner learning rates'
through the chain rule of their log parametrisation. It changes nothing: the
:class:`~repblend_hf.trainers.DistillationTrainer` hands the gradients to its optimiser, and
``benchmarks/speed.py`` times the same function. For a set distilled in stages it draws the stage's window of
start epochs and freezes the earlier stages' pairs (:mod:`repblend_hf.stages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.profiler import record_function

from .configuration import RepBlendConfig
from .encoders import EncoderPass
from .inner_loop import InnerLoopPlan, matching_gradients, plan_inner_loop
from .modeling import RetrievalHeads
from .stages import Stage, freeze_earlier_pairs, start_epoch_bound
from .synthetic import SyntheticSet
from .trajectories import ExpertTrajectories, TrajectorySegment

# The inner loop's names are re-exported: benchmarks and earlier code import them from here.
__all__ = ["InnerLoopPlan", "plan_inner_loop", "matching_gradients", "student_heads", "encoder_pass_for",
           "inner_temperature", "iteration_generator", "OuterIteration", "outer_iteration"]


def student_heads(config: RepBlendConfig) -> RetrievalHeads:
    """The heads of the student a set is distilled for (their layout; the values come from the trajectories).

    Symmetric matching: both heads on the frozen encoder. Asymmetric (LoRS / MTT-VL, as released): the text head,
    and an image head only for the ``asymmetric_image_head`` ablation (else the encoder's feature is the image
    embedding, ``embed_dim == image_dim``).
    """
    image_head = config.matching == "symmetric" or config.asymmetric_image_head
    return RetrievalHeads(config.image_dim, config.text_dim, config.embed_dim, image_head=image_head)


def encoder_pass_for(image_encoder: nn.Module, config: RepBlendConfig, args: Any) -> EncoderPass:
    """The :class:`~repblend_hf.encoders.EncoderPass` of a run: the set's space and student, the run's encoder options.

    ``args`` (a :class:`~repblend_hf.DistillationArguments`) gives ``encoder_chunk_size``, ``encoder_recompute``,
    ``encoder_per_step``, ``fold_batchnorm`` and ``bf16``.
    """
    return EncoderPass(image_encoder, synthetic_space=config.synthetic_space, matching=config.matching,
                       chunk_size=args.encoder_chunk_size, recompute=args.encoder_recompute,
                       per_step=args.encoder_per_step, fold_batchnorm=args.fold_batchnorm, bf16=args.bf16)


def inner_temperature(config: RepBlendConfig, args: Any) -> float:
    """The inner loop's temperature: 1 / ``args.inner_logit_scale`` when set (MTT-VL's ln(1/0.07)), else τ."""
    return config.temperature if args.inner_logit_scale is None else 1.0 / args.inner_logit_scale


def iteration_generator(seed: int, step: int, process_index: int = 0, stage: int = 0) -> torch.Generator:
    """The generator of one outer iteration: its randomness is a function of (seed, step, process, stage) alone.

    So a resumed run draws the same segments, batches and blends as an uninterrupted one, each process of a
    data-parallel run matches its own segments, and each stage of a set distilled in stages draws its own.
    """
    value = (seed * 1_000_003 + step) * 1009 + process_index
    return torch.Generator().manual_seed(value * 31 + stage if stage else value)


@dataclass
class OuterIteration:
    """What :func:`outer_iteration` returns.

    ``loss`` is the matching loss averaged over the segments (detached); ``gradients`` pairs every parameter of
    the set with its meta-gradient; ``nonfinite_groups`` names the optimiser groups (``SyntheticSet.
    parameter_groups``) whose gradient is not finite, all of them when the loss is not. ``inner_lrs`` are the η
    the inner loop used, ``stats`` the inner losses per segment.
    """

    loss: torch.Tensor
    gradients: list[tuple[nn.Parameter, torch.Tensor]]
    nonfinite_groups: set[str]
    inner_lrs: dict[str, torch.Tensor]
    segments: list[TrajectorySegment]
    plans: list[InnerLoopPlan]
    stats: list[dict[str, float]]

    def metrics(self, loss: torch.Tensor | None = None) -> dict[str, float]:
        """The iteration's logged values (``loss`` replaces the matching loss, e.g. by 0 for a skipped iteration)."""
        blends = [b.lam for plan in self.plans for b in plan.blends]
        inner = ("inner_loss_first", "inner_loss_last")
        return {"matching_loss": float(self.loss if loss is None else loss),
                **{k: sum(s[k] for s in self.stats) / len(self.stats) for k in inner},
                "lr_img": float(self.inner_lrs["image"].detach()), "lr_txt": float(self.inner_lrs["text"].detach()),
                "blend_lambda": sum(blends) / len(blends),
                "start_epoch": sum(float(s.start_epoch) for s in self.segments) / len(self.segments),
                "touched_images": float(len(self.plans[0].touched))}


def outer_iteration(synthetic: SyntheticSet, heads: RetrievalHeads, trajectories: ExpertTrajectories,
                    encoder_pass: EncoderPass, args: Any, generator: torch.Generator, *,
                    temperature: float, stage: Stage | None = None, step: int = 0) -> OuterIteration:
    """One outer iteration (METHOD.md, "Distillation loop", steps 1-4 but the optimiser step) as a pure function.

    ``args`` holds the run's settings (a :class:`~repblend_hf.DistillationArguments`): ``segments_per_iteration``
    segments (``expert_epochs``, ``max_start_epoch``), each with its own inner-loop plan (``syn_steps`` steps of
    ``mini_batch_size`` pairs, ``blend_beta``, ``straddle_batches``); the plans share one pass of the pairs they
    touch through ``encoder_pass``. Each segment runs :func:`matching_gradients` (``distill_loss``,
    ``meta_gradient``, ``branch_normalization``, ``inner_dropout``; ``temperature`` divides the inner loop's
    cosine logits) with η = the set's inner lrs clamped to ``[lr_min, lr_max]``; the losses and gradients are
    averaged over the segments. The log η gradients are clipped to ``[-lr_grad_clip, lr_grad_clip]``. Every random
    draw comes from ``generator`` (:func:`iteration_generator`). ``synthetic`` is read, never changed.

    A ``stage`` of a set distilled in stages (:mod:`repblend_hf.stages`) draws its start epochs from its window
    ``stage.min_start_epoch .. stage.max_start_epoch - 1`` (else ``0 .. args.max_start_epoch - 1``), whose upper
    bound grows over the first ``args.start_epoch_warmup`` share of the iterations (``step`` of ``stage.max_steps``
    or ``args.max_steps``; DATM); its inner loop trains on every pair so far or, with ``args.stage_inner_pairs ==
    "stage"``, on its own; the gradients of the earlier stages' pairs are zero.
    """
    syn = synthetic
    device = syn.images.device
    low, high = (stage.min_start_epoch, stage.max_start_epoch) if stage is not None else (0, args.max_start_epoch)
    high = start_epoch_bound(step, stage.max_steps if stage is not None else args.max_steps, low, high,
                             args.start_epoch_warmup)
    offset = stage.offset if stage is not None else 0
    first_pair = offset if args.stage_inner_pairs == "stage" else 0
    segments, plans = [], []
    for _ in range(args.segments_per_iteration):  # each segment with its own inner-loop plan
        segments.append(trajectories.sample_segment(args.expert_epochs, high, generator, device=device,
                                                    min_start_epoch=low))
        plans.append(plan_inner_loop(syn.num_pairs, args.syn_steps, args.mini_batch_size, args.blend_beta, generator,
                                     straddle=args.straddle_batches, first_pair=first_pair))
    # The plans share one encoder pass over the union of the pairs they touch.
    if len(plans) > 1:
        union = torch.unique(torch.cat([p.touched for p in plans]))
        plans = [p.within(union) for p in plans]
    plans = [p.to(device) for p in plans]
    touched = plans[0].touched

    image_inputs, pass_state = encoder_pass.forward(syn.images.detach()[touched])
    text_inputs = syn.text_embeddings.detach()[touched].requires_grad_(True)
    lrs = syn.inner_lrs(args.lr_min, args.lr_max)
    eta = {b: v.detach().requires_grad_(True) for b, v in lrs.items()}
    sim_params = list(syn.similarity.parameters())
    targets = (lambda pos: syn.similarity(touched[pos])) if args.distill_loss == "wbce" else None
    wrt = [image_inputs, text_inputs, eta["image"], eta["text"], *sim_params]
    # The matching losses of the segments are averaged: so are their gradients on the shared leaves.
    loss, grads, stats = 0.0, [torch.zeros_like(t) for t in wrt], []
    for segment, plan in zip(segments, plans):
        with record_function("repblend:inner_loop"):  # the student's steps and the meta-gradient
            loss_s, grads_s, stats_s = matching_gradients(
                heads, image_inputs, text_inputs, targets, plan, segment.start_params, segment.target_params, eta,
                wrt, temperature=temperature, distill_loss=args.distill_loss, meta_gradient=args.meta_gradient,
                branch_normalization=args.branch_normalization, image_encoder=encoder_pass.student_encoder,
                inner_dropout=args.inner_dropout)
        loss = loss + loss_s / len(plans)
        grads = [acc if g_ is None else acc + g_ / len(plans) for acc, g_ in zip(grads, grads_s)]
        stats.append(stats_s)
    g_inputs, g_text, g_eta_img, g_eta_txt, *g_sim = grads

    # Leaf gradients → the set's tensors: the images' through the encoder, then scattered to the touched rows.
    g_touched = encoder_pass.backward(pass_state, g_inputs)
    g_images = torch.zeros_like(syn.images).index_add_(0, touched, g_touched)
    g_texts = torch.zeros_like(syn.text_embeddings).index_add_(0, touched, g_text)
    g_log = torch.autograd.grad([lrs["image"], lrs["text"]], [syn.log_lr_img, syn.log_lr_txt],
                                [g_eta_img, g_eta_txt], allow_unused=True)  # η = clamp(exp(log η)): the chain rule
    g_log = [torch.zeros_like(p) if gl is None else gl for p, gl in zip((syn.log_lr_img, syn.log_lr_txt), g_log)]
    if args.lr_grad_clip:
        g_log = [gl.clamp(-args.lr_grad_clip, args.lr_grad_clip) for gl in g_log]

    gradients = list(zip([syn.images, syn.text_embeddings, syn.log_lr_img, syn.log_lr_txt, *sim_params],
                         [g_images, g_texts, *g_log, *g_sim]))
    gradients = freeze_earlier_pairs(gradients, syn, offset)
    group_of = {id(p): group for group, params in syn.parameter_groups().items() for p in params}
    bad = {group_of[id(p)] for p, g in gradients if not bool(torch.isfinite(g).all())}
    if not bool(torch.isfinite(loss)):
        bad |= set(group_of.values())
    return OuterIteration(loss, gradients, bad, lrs, segments, plans, stats)
