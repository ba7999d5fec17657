"""One outer iteration of trajectory-matching distillation, as pure functions of tensors.

METHOD.md, "Distillation loop". :func:`outer_iteration` is the whole iteration: it samples the expert
segments and their inner-loop plans, passes the touched synthetic images through the frozen encoder once
(:class:`~repblend_hf.encoders.EncoderPass`), runs the student from each segment's start
(:func:`matching_gradients`), averages the matching losses, and returns the meta-gradient of every learnable
tensor of the set, the learned inner learning rates' through the chain rule of their log parametrisation. It
changes nothing: the :class:`~repblend_hf.trainers.DistillationTrainer` hands the gradients to its optimiser, and
``benchmarks/speed.py`` times the same function.

The inner loop: starting from an expert's parameters θ⁰, the student takes
``syn_steps`` SGD steps on mini-batches of the synthetic set (with representation blending before
the heads), and the normalised distance of θᴺ to the expert's later parameters θ* is the loss
whose gradient updates the synthetic set. The student here is the pair of projection heads
("symmetric", RepBlend) or, for "asymmetric" matching (LoRS / MTT-VL), the image encoder and the text
head: as in the released code the image embedding is the encoder's pooled feature (no image head; the
``RetrievalHeads`` then have an ``nn.Identity`` image head), or encoder + image head for the ablation
that keeps one. Trajectory snapshots are one flat vector per branch; the student splits them into one leaf
per parameter tensor (:func:`~repblend_hf.modeling.split_parameters`) so that no step slices a flat
leaf.

Every differentiable input is a *leaf* the caller owns (features or pixels of the touched images,
their text embeddings, the inner learning rates η, the similarity module's parameters);
:func:`matching_gradients` returns the loss and the gradients of those leaves, for either

- ``"unrolled"``: the exact gradient through all inner steps (``create_graph``); memory grows with
  ``syn_steps``, which is cheap when only the heads are unrolled;
- ``"tesla"``: the released code's gradient (TESLA, Cui et al. 2023): the inner updates use detached
  gradients, then each step's contribution ``−η (∂g_k/∂data)ᵀ ∂L/∂θᴺ`` is recomputed and added, so
  memory is one step's; the dependence of θᵏ on earlier batches is dropped.

Both agree exactly for one inner step (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.profiler import record_function

from .blending import BlendParams, blend_representations, sample_blend
from .configuration import RepBlendConfig
from .encoders import EncoderPass
from .grouped_conv import grouped_conv_double_backward
from .losses import info_nce, weighted_bce
from .modeling import ProjectionHead, RetrievalHeads, head_apply, similarity_logits, split_parameters
from .synthetic import SyntheticSet
from .trajectories import ExpertTrajectories, TrajectorySegment

__all__ = ["InnerLoopPlan", "plan_inner_loop", "matching_gradients", "student_heads", "encoder_pass_for",
           "inner_temperature", "iteration_generator", "OuterIteration", "outer_iteration"]


@dataclass
class InnerLoopPlan:
    """Which synthetic pairs each inner step uses, its blend and its dropout seed.

    ``touched`` holds the sorted global indices of every pair the iteration uses (the images that go
    through the encoder); ``batches[k]`` are step k's positions *into* ``touched``; ``blends[k]`` is
    step k's (λ, π) and ``dropout_seeds[k]`` the seed of its dropout masks, both reused verbatim when
    TESLA recomputes the step.
    """

    touched: torch.Tensor
    batches: list[torch.Tensor]
    blends: list[BlendParams]
    dropout_seeds: list[int] = field(default_factory=list)

    @property
    def batch_indices(self) -> list[torch.Tensor]:
        """Step k's global pair indices."""
        return [self.touched[b] for b in self.batches]

    def to(self, device: torch.device | str) -> InnerLoopPlan:
        """The same plan with its index tensors on ``device``."""
        return InnerLoopPlan(self.touched.to(device), [b.to(device) for b in self.batches],
                             [type(b)(b.lam, b.perm.to(device)) for b in self.blends], self.dropout_seeds)

    def within(self, touched: torch.Tensor) -> InnerLoopPlan:
        """The same steps with positions into ``touched``, a sorted superset of this plan's ``touched``."""
        return InnerLoopPlan(touched, [torch.searchsorted(touched, self.touched[b]) for b in self.batches],
                             self.blends, self.dropout_seeds)


def plan_inner_loop(num_pairs: int, syn_steps: int, mini_batch_size: int, blend_beta: float,
                    generator: torch.Generator, *, straddle: bool = False) -> InnerLoopPlan:
    """Draw the mini-batches (walking random permutations of the pairs), blends and dropout seeds of one iteration.

    METHOD.md, step 2: mini-batches of ``mini_batch_size`` walk a random permutation; each step gets
    one λ ~ Beta(β, β) and one permutation π. As in the released code (``distill_repblend.py``), a
    fresh permutation starts when fewer than ``mini_batch_size`` pairs are left in the current one (the
    rest of it is skipped); ``straddle=True`` instead lets a batch take the rest and continue into the
    next permutation (this library's behaviour before 0.2).
    """
    batch = min(mini_batch_size, num_pairs)
    if straddle:
        order = torch.cat([torch.randperm(num_pairs, generator=generator)
                           for _ in range(-(-syn_steps * batch // num_pairs))])
        global_batches = [order[k * batch:(k + 1) * batch] for k in range(syn_steps)]
    else:
        global_batches, order, index = [], torch.randperm(num_pairs, generator=generator), 0
        for _ in range(syn_steps):
            if index + batch > num_pairs:
                order, index = torch.randperm(num_pairs, generator=generator), 0
            global_batches.append(order[index:index + batch])
            index += batch
    touched = torch.unique(torch.cat(global_batches))
    batches = [torch.searchsorted(touched, b) for b in global_batches]
    blends = [sample_blend(batch, blend_beta, generator) for _ in range(syn_steps)]
    seeds = torch.randint(0, 2**62, (syn_steps,), generator=generator).tolist()
    return InnerLoopPlan(touched, batches, blends, seeds)


class _Student:
    """How the matched branches' flat vectors split into per-tensor leaves, and the student's forward.

    Branch ``"image"`` is the image head, led by the image encoder's parameters when it is trained
    (asymmetric matching); without an image head (``heads.image_head`` an ``nn.Identity``, the released
    LoRS / MTT-VL student) it is the encoder's parameters alone. Branch ``"text"`` is the text head.
    """

    def __init__(self, heads: RetrievalHeads, image_encoder: nn.Module | None, dropout: float):
        self.heads, self.image_encoder, self.dropout = heads, image_encoder, dropout
        self.encoder_names = [n for n, _ in image_encoder.named_parameters()] if image_encoder is not None else []
        self.encoder_size = sum(p.numel() for p in image_encoder.parameters()) if image_encoder is not None else 0

    def split(self, flat: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        image = flat["image"]
        tensors = []
        if self.image_encoder is not None:
            encoder = image[:self.encoder_size]
            shapes = [p.shape for p in self.image_encoder.parameters()]
            tensors = [t.view(s) for t, s in zip(encoder.split([s.numel() for s in shapes]), shapes)]
        tensors += split_parameters(self.heads.image_head, image[self.encoder_size:])
        return {"image": tensors, "text": split_parameters(self.heads.text_head, flat["text"])}

    def masks(self, seed: int, rows: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Step k's dropout masks (scaled by 1 / (1 - p)), drawn from its seed: the same when recomputed."""
        if not self.dropout:
            return None, None
        g = torch.Generator().manual_seed(seed)
        keep = 1.0 - self.dropout
        out = []
        for head in (self.heads.image_head, self.heads.text_head):
            if not isinstance(head, ProjectionHead):  # no image head: the encoder's feature has no dropout
                out.append(None)
                continue
            width = head.fc.out_features
            out.append((torch.rand(rows, width, generator=g) < keep).to(device, torch.float32) / keep)
        return out[0], out[1]

    def logits(self, theta: dict[str, list[torch.Tensor]], u: torch.Tensor, v: torch.Tensor, blend: BlendParams,
               seed: int, temperature: float) -> torch.Tensor:
        head_params = theta["image"]
        if self.image_encoder is not None:
            n = len(self.encoder_names)
            # The meta-gradient differentiates this forward twice: its grouped (depthwise) convolutions go through
            # grouped_conv2d, whose double backward has no per-group loop (repblend_hf/grouped_conv.py).
            with grouped_conv_double_backward():
                u = functional_call(self.image_encoder, dict(zip(self.encoder_names, head_params[:n])), (u,),
                                    strict=False)
            head_params = head_params[n:]
        u, v = blend_representations(u, v, blend)
        m_img, m_txt = self.masks(seed, len(u), u.device)
        return similarity_logits(head_apply(self.heads.image_head, head_params, u, m_img),
                                 head_apply(self.heads.text_head, theta["text"], v, m_txt), temperature)


def _distances(student: dict[str, list[torch.Tensor]], target: dict[str, list[torch.Tensor]],
               denominators: dict[str, torch.Tensor], normalization: str) -> torch.Tensor:
    """The normalised matching loss of per-tensor parameters (see ``losses.trajectory_matching_loss``)."""
    num = {b: sum((s - t).pow(2).sum() for s, t in zip(student[b], target[b])) for b in target}
    if normalization == "joint":
        return sum(num.values()) / sum(denominators.values()).clamp_min(1e-12)
    return sum(num[b] / denominators[b].clamp_min(1e-12) for b in target)


def matching_gradients(
    heads: RetrievalHeads,
    image_inputs: torch.Tensor,
    text_inputs: torch.Tensor,
    targets: Callable[[torch.Tensor], torch.Tensor] | None,
    plan: InnerLoopPlan,
    start: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    lrs: dict[str, torch.Tensor],
    wrt: Sequence[torch.Tensor],
    *,
    temperature: float,
    distill_loss: str = "wbce",
    meta_gradient: str = "tesla",
    branch_normalization: str = "separate",
    image_encoder: nn.Module | None = None,
    inner_dropout: float = 0.0,
    tesla_recompute: bool | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None], dict[str, float]]:
    """Run the student from θ⁰ = ``start`` through the plan and return (loss, d loss / d ``wrt``, stats).

    ``image_inputs`` are the touched pairs' image-encoder features (symmetric matching) or their
    pixels (asymmetric: then ``image_encoder`` is the module whose parameters lead the ``"image"``
    branch vector, followed by the image head's if ``heads`` has one). ``text_inputs`` are their text embeddings;
    ``targets(positions)`` gives the soft-label block S_I (unused for InfoNCE); ``lrs`` maps each
    branch to its inner learning rate η. ``start`` / ``target`` are the segment's flat branch vectors.
    ``wrt`` lists the leaves to differentiate; entries that do not influence the loss get ``None``.
    ``temperature`` divides the inner loop's cosine logits, i.e. it is 1 / the inner logit scale (MTT-VL's
    released inner loop multiplies by ln(1/0.07) where its experts use 1/0.07: the trainer passes 1 / that).
    ``inner_dropout`` is the heads' dropout in the inner loop (the released code runs the student in
    train mode, p = 0.1); each step's masks come from ``plan.dropout_seeds`` so that a recomputed step
    is the same function as the original one.

    ``tesla_recompute`` (TESLA only): recompute each step's gradient for the meta-gradient after the forward pass,
    as the released code does, so that memory stays at one step's graph whatever ``syn_steps``; or keep each step's
    gradient with its graph from the forward pass and backpropagate through all of them once at the end (the same
    numbers, without running every step twice). Default: recompute only when the student trains the image encoder
    (asymmetric matching), where a step's graph holds the encoder's activations; the heads-only student's graphs
    are small (its mini-batch activations and its parameter-sized gradients).
    """
    if meta_gradient not in ("tesla", "unrolled"):
        raise ValueError(f"meta_gradient must be 'tesla' or 'unrolled', got {meta_gradient!r}")
    if distill_loss not in ("wbce", "infonce"):
        raise ValueError(f"distill_loss must be 'wbce' or 'infonce', got {distill_loss!r}")
    if distill_loss == "wbce" and targets is None:
        raise ValueError("distill_loss='wbce' needs a targets function (the similarity block S_I)")
    if inner_dropout and len(plan.dropout_seeds) != len(plan.batches):
        raise ValueError("inner_dropout needs a plan with one dropout seed per step (plan_inner_loop draws them)")
    heads.eval()
    student = _Student(heads, image_encoder, inner_dropout)
    branches = list(target)
    target_t = student.split({b: target[b].detach() for b in branches})
    start_t = student.split({b: start[b].detach() for b in branches})
    denominators = {b: (start[b] - target[b]).pow(2).sum() for b in branches}
    seeds = plan.dropout_seeds or [0] * len(plan.batches)

    def step_loss(theta: dict[str, list[torch.Tensor]], k: int, detach_data: bool = False) -> torch.Tensor:
        pos = plan.batches[k]
        u, v = image_inputs[pos], text_inputs[pos]
        if detach_data:
            u, v = u.detach(), v.detach()
        logits = student.logits(theta, u, v, plan.blends[k], seeds[k], temperature)
        if distill_loss == "infonce":
            return info_nce(logits)
        s_block = targets(pos)
        return weighted_bce(logits, s_block.detach() if detach_data else s_block)

    def leaves(theta: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        return {b: [t.detach().requires_grad_(True) for t in theta[b]] for b in branches}

    def flat(theta: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        return [t for b in branches for t in theta[b]]

    def by_branch(tensors: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out, offset = {}, 0
        for b in branches:
            out[b] = list(tensors[offset:offset + len(start_t[b])])
            offset += len(start_t[b])
        return out

    wrt = list(wrt)
    inner_losses = []
    if meta_gradient == "unrolled":
        theta = leaves(start_t)
        for k in range(len(plan.batches)):
            loss_k = step_loss(theta, k)
            inner_losses.append(loss_k.detach())
            grads = by_branch(torch.autograd.grad(loss_k, flat(theta), create_graph=True))
            theta = {b: [p - lrs[b] * g for p, g in zip(theta[b], grads[b])] for b in branches}
        loss = _distances(theta, target_t, denominators, branch_normalization)
        out = torch.autograd.grad(loss, wrt, allow_unused=True)
        return loss.detach(), list(out), _stats(inner_losses)

    # TESLA: forward with detached inner updates, keeping the running sum of the gradients and either each θᵏ (to
    # recompute step k's gradient later) or each step's gradient with its graph to the data.
    eta = {b: float(lrs[b].detach()) for b in branches}
    snapshots = []
    keep_graphs = not (image_encoder is not None if tesla_recompute is None else tesla_recompute)
    kept = []  # keep_graphs: each step's gradient with its graph to the data, for one backward at the end
    theta = {b: [t.detach() for t in start_t[b]] for b in branches}
    grad_sum = {b: [torch.zeros_like(t) for t in theta[b]] for b in branches}
    for k in range(len(plan.batches)):
        leaf = leaves(theta)
        with torch.enable_grad():
            loss_k = step_loss(leaf, k, detach_data=not keep_graphs)
            grads = by_branch(torch.autograd.grad(loss_k, flat(leaf), create_graph=keep_graphs))
        if keep_graphs:
            kept.append(grads)
            grads = {b: [g.detach() for g in grads[b]] for b in branches}
        inner_losses.append(loss_k.detach())
        if not keep_graphs:
            snapshots.append(theta)
        for b in branches:
            torch._foreach_add_(grad_sum[b], grads[b])
        theta = {b: torch._foreach_add(theta[b], grads[b], alpha=-eta[b]) for b in branches}
    final = leaves(theta)
    loss = _distances(final, target_t, denominators, branch_normalization)
    g_final = by_branch(torch.autograd.grad(loss, flat(final)))

    lr_leaves = {id(lrs[b]): b for b in branches}
    out: list[torch.Tensor | None] = [None] * len(wrt)
    data_slots = [i for i, t in enumerate(wrt) if id(t) not in lr_leaves]
    for i, t in enumerate(wrt):  # dL/dη_b = −(Σ_k g_k,b) · G_b
        if id(t) in lr_leaves:
            b = lr_leaves[id(t)]
            out[i] = -sum((s * g).sum() for s, g in zip(grad_sum[b], g_final[b])).reshape(t.shape)
    data = [wrt[i] for i in data_slots]
    # The data's meta-gradient is that of the surrogate −Σ_k Σ_b η_b ⟨g_k,b, G_b⟩: a vector-Jacobian product of the
    # steps' gradients g_k with the cotangent −η_b G_b, the same for every step (passed as grad_outputs, so no
    # parameter-sized product or sum is formed per step).
    cotangent = {b: [-lrs[b].detach() * G for G in g_final[b]] for b in branches}

    def accumulate(steps: list[dict[str, list[torch.Tensor]]]) -> None:
        pairs = [(g, c) for grads in steps for b in branches for g, c in zip(grads[b], cotangent[b])
                 if g.requires_grad]
        if not pairs:
            return
        contrib = torch.autograd.grad([g for g, _ in pairs], data, grad_outputs=[c for _, c in pairs],
                                      allow_unused=True)
        for i, c in zip(data_slots, contrib):
            if c is not None:
                out[i] = c if out[i] is None else out[i] + c

    if keep_graphs:  # one backward through every step's kept graph
        accumulate(kept)
    else:  # each step recomputed from its snapshot θᵏ, its graph freed before the next
        for k in range(len(plan.batches)):
            leaf = leaves(snapshots[k])
            accumulate([by_branch(torch.autograd.grad(step_loss(leaf, k), flat(leaf), create_graph=True))])
    return loss.detach(), out, _stats(inner_losses)


def _stats(inner_losses: list[torch.Tensor]) -> dict[str, float]:
    return {"inner_loss_first": float(inner_losses[0]), "inner_loss_last": float(inner_losses[-1])}


# ----- the outer iteration -------------------------------------------------------------------------------------------


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


def iteration_generator(seed: int, step: int, process_index: int = 0) -> torch.Generator:
    """The generator of one outer iteration: its randomness is a function of (seed, step, process) alone.

    So a resumed run draws the same segments, batches and blends as an uninterrupted one, and each process of a
    data-parallel run matches its own segments.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + process_index)


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
                    temperature: float) -> OuterIteration:
    """One outer iteration (METHOD.md, "Distillation loop", steps 1-4 but the optimiser step) as a pure function.

    ``args`` holds the run's settings (a :class:`~repblend_hf.DistillationArguments`): ``segments_per_iteration``
    segments (``expert_epochs``, ``max_start_epoch``), each with its own inner-loop plan (``syn_steps`` steps of
    ``mini_batch_size`` pairs, ``blend_beta``, ``straddle_batches``); the plans share one pass of the pairs they
    touch through ``encoder_pass``. Each segment runs :func:`matching_gradients` (``distill_loss``,
    ``meta_gradient``, ``branch_normalization``, ``inner_dropout``; ``temperature`` divides the inner loop's
    cosine logits) with η = the set's inner lrs clamped to ``[lr_min, lr_max]``; the losses and gradients are
    averaged over the segments. The log η gradients are clipped to ``[-lr_grad_clip, lr_grad_clip]``. Every random
    draw comes from ``generator`` (:func:`iteration_generator`). ``synthetic`` is read, never changed.
    """
    syn = synthetic
    device = syn.images.device
    segments, plans = [], []
    for _ in range(args.segments_per_iteration):  # each segment with its own inner-loop plan
        segments.append(trajectories.sample_segment(args.expert_epochs, args.max_start_epoch, generator,
                                                    device=device))
        plans.append(plan_inner_loop(syn.num_pairs, args.syn_steps, args.mini_batch_size, args.blend_beta, generator,
                                     straddle=args.straddle_batches))
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
    group_of = {id(p): group for group, params in syn.parameter_groups().items() for p in params}
    bad = {group_of[id(p)] for p, g in gradients if not bool(torch.isfinite(g).all())}
    if not bool(torch.isfinite(loss)):
        bad |= set(group_of.values())
    return OuterIteration(loss, gradients, bad, lrs, segments, plans, stats)
