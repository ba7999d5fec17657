"""The student's inner loop and its meta-gradient: :func:`matching_gradients`, as a pure function of tensors.

METHOD.md, "Distillation loop", steps 2-3; :func:`~repblend_hf.distillation.outer_iteration` runs it once per
segment of an outer iteration.

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

import torch
import torch.nn as nn
from torch.func import functional_call

from .blending import BlendParams, blend_representations, sample_blend
from .grouped_conv import grouped_conv_double_backward
from .losses import info_nce, weighted_bce
from .modeling import ProjectionHead, RetrievalHeads, head_apply, similarity_logits, split_parameters

__all__ = ["InnerLoopPlan", "plan_inner_loop", "matching_gradients"]


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
                    generator: torch.Generator, *, straddle: bool = False, first_pair: int = 0) -> InnerLoopPlan:
    """Draw the mini-batches (walking random permutations of the pairs), blends and dropout seeds of one iteration.

    METHOD.md, step 2: mini-batches of ``mini_batch_size`` walk a random permutation; each step gets
    one λ ~ Beta(β, β) and one permutation π. As in the released code (``distill_repblend.py``), a
    fresh permutation starts when fewer than ``mini_batch_size`` pairs are left in the current one (the
    rest of it is skipped); ``straddle=True`` instead lets a batch take the rest and continue into the
    next permutation (this library's behaviour before 0.2). ``first_pair`` > 0 draws from the pairs
    ``first_pair .. num_pairs - 1`` only (a stage that trains its own pairs alone, PTM-ST; :mod:`repblend_hf.stages`).
    """
    if not 0 <= first_pair < num_pairs:
        raise ValueError(f"first_pair must be in 0..num_pairs - 1 = {num_pairs - 1}, got {first_pair}")
    num_pairs -= first_pair
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
    global_batches = [b + first_pair for b in global_batches] if first_pair else global_batches
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
