"""One outer iteration of trajectory-matching distillation, as pure functions of tensors.

METHOD.md, "Distillation loop": starting from an expert's parameters θ⁰, the student takes
``syn_steps`` SGD steps on mini-batches of the synthetic set (with representation blending before
the heads), and the normalised distance of θᴺ to the expert's later parameters θ* is the loss
whose gradient updates the synthetic set. The student here is the pair of projection heads
("symmetric", RepBlend) or the image encoder + image head and the text head ("asymmetric", LoRS /
MTT-VL), held as one flat parameter vector per branch.

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
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from .blending import BlendParams, blend_representations, sample_blend
from .losses import info_nce, trajectory_matching_loss, weighted_bce
from .modeling import RetrievalHeads, head_forward, similarity_logits, unflatten_parameters

__all__ = ["InnerLoopPlan", "plan_inner_loop", "matching_gradients"]


@dataclass
class InnerLoopPlan:
    """Which synthetic pairs each inner step uses, and its blend.

    ``touched`` holds the sorted global indices of every pair the iteration uses (the images that go
    through the encoder); ``batches[k]`` are step k's positions *into* ``touched``; ``blends[k]`` is
    step k's (λ, π), reused verbatim when TESLA recomputes the step.
    """

    touched: torch.Tensor
    batches: list[torch.Tensor]
    blends: list[BlendParams]

    @property
    def batch_indices(self) -> list[torch.Tensor]:
        """Step k's global pair indices."""
        return [self.touched[b] for b in self.batches]

    def to(self, device: torch.device | str) -> InnerLoopPlan:
        """The same plan with its index tensors on ``device``."""
        return InnerLoopPlan(self.touched.to(device), [b.to(device) for b in self.batches],
                             [type(b)(b.lam, b.perm.to(device)) for b in self.blends])

    def within(self, touched: torch.Tensor) -> InnerLoopPlan:
        """The same steps with positions into ``touched``, a sorted superset of this plan's ``touched``."""
        return InnerLoopPlan(touched, [torch.searchsorted(touched, self.touched[b]) for b in self.batches],
                             self.blends)


def plan_inner_loop(num_pairs: int, syn_steps: int, mini_batch_size: int, blend_beta: float,
                    generator: torch.Generator) -> InnerLoopPlan:
    """Draw the mini-batches (walking random permutations of the pairs) and blends of one iteration.

    METHOD.md, step 2: mini-batches of ``mini_batch_size`` walk a random permutation, a new one
    starting when it runs out; each step gets one λ ~ Beta(β, β) and one permutation π.
    """
    batch = min(mini_batch_size, num_pairs)
    order = torch.cat([torch.randperm(num_pairs, generator=generator)
                       for _ in range(-(-syn_steps * batch // num_pairs))])
    global_batches = [order[k * batch:(k + 1) * batch] for k in range(syn_steps)]
    touched = torch.unique(torch.cat(global_batches))
    batches = [torch.searchsorted(touched, b) for b in global_batches]
    blends = [sample_blend(batch, blend_beta, generator) for _ in range(syn_steps)]
    return InnerLoopPlan(touched, batches, blends)


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
) -> tuple[torch.Tensor, list[torch.Tensor | None], dict[str, float]]:
    """Run the student from θ⁰ = ``start`` through the plan and return (loss, d loss / d ``wrt``, stats).

    ``image_inputs`` are the touched pairs' image-encoder features (symmetric matching) or their
    pixels (asymmetric: then ``image_encoder`` is the module whose parameters lead the ``"image"``
    branch vector, followed by the image head's). ``text_inputs`` are their text embeddings;
    ``targets(positions)`` gives the soft-label block S_I (unused for InfoNCE); ``lrs`` maps each
    branch to its inner learning rate η. ``wrt`` lists the leaves to differentiate; entries that
    do not influence the loss get ``None``. The heads run without dropout so that a recomputed step
    is the same function as the original one.
    """
    if meta_gradient not in ("tesla", "unrolled"):
        raise ValueError(f"meta_gradient must be 'tesla' or 'unrolled', got {meta_gradient!r}")
    if distill_loss not in ("wbce", "infonce"):
        raise ValueError(f"distill_loss must be 'wbce' or 'infonce', got {distill_loss!r}")
    if distill_loss == "wbce" and targets is None:
        raise ValueError("distill_loss='wbce' needs a targets function (the similarity block S_I)")
    heads.eval()
    branches = list(target)
    n_enc = sum(p.numel() for p in image_encoder.parameters()) if image_encoder is not None else 0

    def step_loss(theta: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        pos = plan.batches[k]
        if image_encoder is None:
            u, theta_img_head = image_inputs[pos], theta["image"]
        else:
            encoder_params = unflatten_parameters(image_encoder, theta["image"][:n_enc])
            u = functional_call(image_encoder, encoder_params, (image_inputs[pos],), strict=False)
            theta_img_head = theta["image"][n_enc:]
        u, v = blend_representations(u, text_inputs[pos], plan.blends[k])
        logits = similarity_logits(head_forward(heads.image_head, theta_img_head, u),
                                   head_forward(heads.text_head, theta["text"], v), temperature)
        if distill_loss == "infonce":
            return info_nce(logits)
        return weighted_bce(logits, targets(pos))

    wrt = list(wrt)
    inner_losses = []
    if meta_gradient == "unrolled":
        theta = {b: start[b].detach().clone().requires_grad_(True) for b in branches}
        for k in range(len(plan.batches)):
            loss_k = step_loss(theta, k)
            inner_losses.append(loss_k.detach())
            grads = torch.autograd.grad(loss_k, [theta[b] for b in branches], create_graph=True)
            theta = {b: theta[b] - lrs[b] * g for b, g in zip(branches, grads)}
        loss = trajectory_matching_loss(theta, start, target, branch_normalization)
        out = torch.autograd.grad(loss, wrt, allow_unused=True)
        return loss.detach(), list(out), _stats(inner_losses)

    # TESLA: forward with detached inner gradients, keeping each θᵏ (one flat vector per branch).
    snapshots, step_grads = [], []
    theta = {b: start[b].detach() for b in branches}
    for k in range(len(plan.batches)):
        leaf = {b: theta[b].clone().requires_grad_(True) for b in branches}
        with torch.enable_grad():
            loss_k = step_loss({b: leaf[b] for b in branches}, k)
            grads = torch.autograd.grad(loss_k, [leaf[b] for b in branches])
        inner_losses.append(loss_k.detach())
        snapshots.append(theta)
        step_grads.append(dict(zip(branches, grads)))
        theta = {b: theta[b] - lrs[b].detach() * g for b, g in zip(branches, grads)}
    final = {b: theta[b].clone().requires_grad_(True) for b in branches}
    loss = trajectory_matching_loss(final, start, target, branch_normalization)
    g_final = dict(zip(branches, torch.autograd.grad(loss, [final[b] for b in branches])))

    lr_leaves = {id(lrs[b]): b for b in branches}
    out: list[torch.Tensor | None] = [None] * len(wrt)
    data_slots = [i for i, t in enumerate(wrt) if id(t) not in lr_leaves]
    for i, t in enumerate(wrt):  # dL/dη_b = Σ_k −g_k,b · G_b
        if id(t) in lr_leaves:
            b = lr_leaves[id(t)]
            out[i] = -sum((g[b] * g_final[b]).sum() for g in step_grads).reshape(t.shape)
    for k in range(len(plan.batches)):
        leaf = {b: snapshots[k][b].clone().requires_grad_(True) for b in branches}
        loss_k = step_loss(leaf, k)
        grads = torch.autograd.grad(loss_k, [leaf[b] for b in branches], create_graph=True)
        surrogate = -sum((lrs[b].detach() * g * g_final[b]).sum() for b, g in zip(branches, grads))
        contrib = torch.autograd.grad(surrogate, [wrt[i] for i in data_slots], allow_unused=True)
        for i, c in zip(data_slots, contrib):
            if c is not None:
                out[i] = c if out[i] is None else out[i] + c
    return loss.detach(), out, _stats(inner_losses)


def _stats(inner_losses: list[torch.Tensor]) -> dict[str, float]:
    return {"inner_loss_first": float(inner_losses[0]), "inner_loss_last": float(inner_losses[-1])}
