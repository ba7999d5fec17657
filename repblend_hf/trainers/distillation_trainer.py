"""DistillationTrainer: RepBlend (and LoRS / MTT-VL) distillation as a ``transformers.Trainer``.

METHOD.md, "Distillation loop". The model is the :class:`~repblend_hf.SyntheticSet`; one training
step is one outer iteration. ``compute_loss`` samples an expert segment, runs the student's inner
loop (:func:`~repblend_hf.distillation.matching_gradients`) and returns a scalar whose value is the
matching loss and whose gradient is the meta-gradient, so the Trainer's own backward, optimiser
step, logging, checkpointing and resume do the rest.

DESIGN.md, "Where the speed comes from": for symmetric matching the frozen encoder runs once per
iteration on the distinct synthetic images the iteration touches; the inner loop works on those
features, the gradients of all inner steps are summed on the features, and one backward pass
(optionally chunked) carries them to the pixels. This is exact because the encoder is frozen and in
eval mode. The encoder stays outside the wrapped module, like timm's distillation teacher.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from accelerate.utils import gather_object
from torch import nn
from torch.profiler import record_function
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from ..distillation import matching_gradients, plan_inner_loop
from ..evaluation import (
    PairSet,
    PixelPairSet,
    ReferenceDiagnostics,
    embed_split,
    modality_diagnostics,
    train_heads,
)
from ..features import FeatureSplit
from ..modeling import RetrievalHeads, branch_sizes
from ..synthetic import SyntheticSet
from ..training_args import DistillationArguments
from ..trajectories import ExpertTrajectories

__all__ = ["DistillationTrainer", "FeatureRangeProjection", "NonFiniteError", "SGDWithAdamGroups"]

logger = logging.getLogger(__name__)
_GROUPS = ("images", "texts", "similarity", "lrs")  # the optimiser's parameter groups
_ITERATION_LOSSES = ("matching_loss", "inner_loss_first", "inner_loss_last")  # not logged for skipped iterations


class NonFiniteError(RuntimeError):
    """Distillation kept producing non-finite values after the learning rates were lowered."""


class _Iterations(Dataset):
    """One item per outer iteration; the iteration's randomness comes from (seed, step, rank)."""

    def __init__(self, num_iterations: int):
        self.num_iterations = num_iterations

    def __len__(self) -> int:
        return self.num_iterations

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"iteration": i}


class _PerStepEncoder(nn.Module):
    """The frozen encoder called inside each inner step (the authors' design), counting its passes.

    It registers no parameters of its own, so the student's image branch stays the head alone.
    """

    def __init__(self, encoder: nn.Module, encode, passes: dict[str, int]):
        super().__init__()
        self.__dict__["encoder"] = encoder  # not a submodule: its frozen weights are not student parameters
        self.__dict__["encode"] = encode
        self.__dict__["passes"] = passes

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        rows = len(pixels)
        self.passes["forward"] += rows
        out = self.encode(pixels)
        if out.requires_grad:
            out.register_hook(lambda grad: self._count_backward(rows))
        return out

    def _count_backward(self, rows: int) -> None:
        self.passes["backward"] += rows


class SGDWithAdamGroups(torch.optim.Optimizer):
    """SGD with momentum (as ``torch.optim.SGD``, no dampening) for most groups, Adam for groups with ``adam=True``.

    For ``image_optimizer="adam"``: the synthetic images' gradient comes through the frozen encoder and its
    scale varies strongly between pixels and over training, which a per-coordinate step size absorbs; the
    other groups keep the released code's SGD.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, adam=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["adam"]:
                    beta1, beta2 = group["betas"]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                    denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)
                else:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = p.grad.detach().clone()
                    else:
                        buf.mul_(group["momentum"]).add_(p.grad)
                    p.add_(buf, alpha=-group["lr"])
        return loss


class FeatureRangeProjection(TrainerCallback):
    """Keeps a feature-space set's image features inside a box ``[low, high]`` after every optimiser step.

    A free feature-space set can use values no image produces (EfficientNet-Lite0's pooled ReLU6 features
    are never negative; ``benchmarks/results/pixel_gap.md``). Projecting onto the per-dimension range of the
    real training features after each SGD step gives a set the pixel path could at least approach.
    """

    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        self.low, self.high = low, high

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        synthetic = model.module if hasattr(model, "module") else model
        with torch.no_grad():
            features = synthetic.image_features
            low, high = self.low.to(features.device), self.high.to(features.device)
            features.copy_(torch.maximum(torch.minimum(features, high), low))


class DistillationTrainer(Trainer):
    """Optimise a SyntheticSet so that heads trained on it follow the expert trajectories.

    Args:
        model: the :class:`SyntheticSet` being distilled.
        args: :class:`DistillationArguments`.
        trajectories: the experts (:class:`ExpertTrajectories`); their branch sizes must match the heads.
        image_encoder: the frozen :class:`~repblend_hf.encoders.FrozenImageEncoder` (kept unwrapped).
        validation: cached features of the real validation split; evaluation trains fresh heads on the
            current set and logs validation r_mean and the modality diagnostics of the validation split's
            embeddings under those heads (``eval_val_sim_image`` / ``eval_val_sim_text`` / ``eval_val_gap``).
        reference: optional :class:`~repblend_hf.evaluation.ReferenceDiagnostics`; evaluation then also logs
            the modality diagnostics of the synthetic pairs themselves under one fixed model trained on full data
            (``eval_set_*``, RepBlend Figs. 1-2) beside those of a random real subset of the same size
            (``eval_real_subset_*``).
        feature_bounds: ``(low, high)`` for a feature-space set: its image features are projected into that
            box after every optimiser step (:class:`FeatureRangeProjection`).
    """

    def __init__(self, model: SyntheticSet, args: DistillationArguments, trajectories: ExpertTrajectories,
                 image_encoder: nn.Module, validation: FeatureSplit | None = None,
                 reference: ReferenceDiagnostics | None = None,
                 feature_bounds: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
        self.image_encoder = image_encoder
        self.trajectories = trajectories
        self.validation = validation
        self.reference = reference
        config = model.config
        for name in ("similarity", "matching", "asymmetric_image_head"):
            if getattr(args, name) != getattr(config, name):
                raise ValueError(f"args.{name}={getattr(args, name)!r} but the SyntheticSet was built with "
                                 f"config.{name}={getattr(config, name)!r}; build the config from the arguments")
        # The student: both heads (symmetric), or the image encoder and the text head (asymmetric, as released;
        # an image head only for the asymmetric_image_head ablation). Experts must have trained the same branches.
        image_head = args.matching == "symmetric" or args.asymmetric_image_head
        self.heads = RetrievalHeads(config.image_dim, config.text_dim, config.embed_dim, image_head=image_head)
        trajectories.check_compatible(
            branch_sizes(self.heads, image_encoder.model if args.matching == "asymmetric" else None))
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # Images through the frozen encoder (forward) and images whose encoder output got a gradient (backward):
        # counted where the symmetric path calls the encoder, and by a hook for the encoder that LoRS unrolls.
        self.encoder_passes = {"forward": 0, "backward": 0}
        self._nonfinite_streak = self._nonfinite_lowerings = 0  # consecutive skipped iterations, lr lowerings
        # Training steps and skipped ones since the last log, and since the trainer was built (for train_loss).
        self._loss_window, self._loss_total = [0, 0], [0, 0]
        self._step_guarded = False  # set when create_optimizer installs the finiteness check after each step
        kwargs.setdefault("train_dataset", _Iterations(args.max_steps * args.per_device_train_batch_size))
        if validation is not None:
            # Trainer insists on an eval dataset for eval_strategy != "no"; evaluation reads `validation`.
            kwargs.setdefault("eval_dataset", _Iterations(1))
        super().__init__(model=model, args=args, **kwargs)
        if feature_bounds is not None:
            if config.synthetic_space != "features":
                raise ValueError("feature_bounds project a feature-space set's features; this set is in pixels")
            self.add_callback(FeatureRangeProjection(*feature_bounds))
        if args.fold_batchnorm and args.matching == "symmetric" and hasattr(image_encoder, "fold_batchnorm_"):
            folded = image_encoder.fold_batchnorm_()
            logger.info("the synthetic-pixel passes use the encoder with %d BatchNorms folded into its convolutions",
                        folded)
        self.image_encoder.to(self.args.device)
        self.heads.to(self.args.device)

    # ----- optimiser --------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """SGD with momentum ``syn_momentum`` and one lr per group: images, texts, similarity, lrs.

        With ``image_optimizer="adam"`` the images' group takes Adam steps instead (:class:`SGDWithAdamGroups`).
        """
        if self.optimizer is None:
            args = self.args
            lr = {"images": args.lr_img, "texts": args.lr_txt, "similarity": args.lr_sim, "lrs": args.lr_lr}
            # configured_lr (saved with the optimiser state) tells a resumed run which lrs the command line changed.
            groups = [{"params": params, "lr": lr[name], "name": name, "configured_lr": lr[name],
                       "adam": name == "images" and args.image_optimizer == "adam"}
                      for name, params in self._synthetic.parameter_groups().items() if params]
            if args.image_optimizer == "adam":
                self.optimizer = SGDWithAdamGroups(groups, lr=args.lr_img, momentum=args.syn_momentum)
            else:
                self.optimizer = torch.optim.SGD(groups, lr=args.lr_img, momentum=args.syn_momentum)
            self._guard_optimizer_step(self.optimizer)
        return self.optimizer

    @property
    def _synthetic(self) -> SyntheticSet:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    # ----- one outer iteration ----------------------------------------------------------------------------

    @property
    def _inner_temperature(self) -> float:
        """The inner loop's temperature: 1 / ``inner_logit_scale`` when set (MTT-VL's ln(1/0.07)), else τ."""
        scale = self.args.inner_logit_scale
        return self._synthetic.config.temperature if scale is None else 1.0 / scale

    def _generator(self) -> torch.Generator:
        seed = (self.args.seed * 1_000_003 + self.state.global_step) * 1009 + self.args.process_index
        return torch.Generator().manual_seed(seed)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            return self.image_encoder(pixels).float()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        syn = self._synthetic
        device = syn.images.device
        g = self._generator()
        segments, plans = [], []
        for _ in range(args.segments_per_iteration):  # each segment with its own inner-loop plan
            segments.append(self.trajectories.sample_segment(args.expert_epochs, args.max_start_epoch, g,
                                                             device=device))
            plans.append(plan_inner_loop(syn.num_pairs, args.syn_steps, args.mini_batch_size, args.blend_beta, g,
                                         straddle=args.straddle_batches))
        # The plans share one encoder pass over the union of the pairs they touch.
        if len(plans) > 1:
            union = torch.unique(torch.cat([p.touched for p in plans]))
            plans = [p.within(union) for p in plans]
        plans = [p.to(device) for p in plans]
        touched = plans[0].touched

        features_space = syn.config.synthetic_space == "features"
        pixels = syn.images.detach()[touched]
        symmetric = args.matching == "symmetric" and not args.encoder_per_step and not features_space
        student_encoder = None
        if args.matching == "asymmetric":
            student_encoder = self.image_encoder.model
        elif args.encoder_per_step and not features_space:
            student_encoder = _PerStepEncoder(self.image_encoder, self._encode, self.encoder_passes)
        if symmetric:
            with record_function("repblend:encoder_forward"):
                if args.encoder_chunk_size and args.encoder_recompute:
                    with torch.no_grad():
                        feats = torch.cat([self._encode(c) for c in pixels.split(args.encoder_chunk_size)])
                    pixel_leaf = None
                else:  # one graph over the touched images, built chunk by chunk when asked
                    pixel_leaf = pixels.requires_grad_(True)
                    chunks = pixel_leaf.split(args.encoder_chunk_size) if args.encoder_chunk_size else [pixel_leaf]
                    feats = torch.cat([self._encode(c) for c in chunks])
            self.encoder_passes["forward"] += len(touched)
            image_inputs = feats.detach().requires_grad_(True)
        else:
            image_inputs = pixels.requires_grad_(True)
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
                counting = (self.image_encoder.model.register_forward_hook(self._count_unrolled_pass)
                            if args.matching == "asymmetric" else None)
                try:
                    loss_s, grads_s, stats_s = matching_gradients(
                        self.heads, image_inputs, text_inputs, targets, plan, segment.start_params,
                        segment.target_params, eta, wrt, temperature=self._inner_temperature,
                        distill_loss=args.distill_loss, meta_gradient=args.meta_gradient,
                        branch_normalization=args.branch_normalization, image_encoder=student_encoder,
                        inner_dropout=args.inner_dropout)
                finally:
                    if counting is not None:
                        counting.remove()
            loss = loss + loss_s / len(plans)
            grads = [acc if g_ is None else acc + g_ / len(plans) for acc, g_ in zip(grads, grads_s)]
            stats.append(stats_s)
        g_inputs, g_text, g_eta_img, g_eta_txt, *g_sim = grads

        # Feature gradients → pixels: one backward through the frozen encoder (chunked on request).
        if symmetric:
            with record_function("repblend:pixel_backward"):
                g_touched = self._pixel_gradient(pixels, pixel_leaf, feats, g_inputs)
        else:
            g_touched = g_inputs
        g_pixels = torch.zeros_like(syn.images).index_add_(0, touched, g_touched)
        g_texts = torch.zeros_like(syn.text_embeddings).index_add_(0, touched, g_text)
        g_log = torch.autograd.grad([lrs["image"], lrs["text"]], [syn.log_lr_img, syn.log_lr_txt],
                                    [g_eta_img, g_eta_txt], allow_unused=True)
        g_log = [torch.zeros_like(p) if gl is None else gl for p, gl in zip((syn.log_lr_img, syn.log_lr_txt), g_log)]
        if args.lr_grad_clip:
            g_log = [gl.clamp(-args.lr_grad_clip, args.lr_grad_clip) for gl in g_log]

        pairs = list(zip([syn.images, syn.text_embeddings, syn.log_lr_img, syn.log_lr_txt, *sim_params],
                         [g_pixels, g_texts, *g_log, *g_sim]))
        group_of = {id(p): group for group, params in syn.parameter_groups().items() for p in params}
        bad = {group_of[id(p)] for p, gr in pairs if not bool(torch.isfinite(gr).all())}
        if not bool(torch.isfinite(loss)):
            bad |= set(group_of.values())
        finite = not bad
        self._skip_step, self._bad_groups = not finite, bad
        self._metrics["nonfinite_skipped"].append(float(not finite))
        if not finite:
            # Never let a non-finite value reach the synthetic set: zero surrogate now, and training_step
            # drops the gradients so that SGD's momentum does not move the set either.
            pairs = [(p, torch.zeros_like(p)) for p, _ in pairs]
            loss = torch.zeros((), device=device)
        self._log_iteration(loss, stats, lrs, plans, segments, len(touched))
        return model(surrogate_grads=pairs, loss=loss)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; after a skipped (non-finite) iteration the gradients are set to None.

        A skipped iteration returns a loss of 0 to the Trainer's running sum and is left out of the logged
        ``loss`` and ``matching_loss`` (see :meth:`log`), so the curve never shows a perfect 0 exactly when
        things go wrong; ``nonfinite_skipped`` counts it.
        """
        self._skip_step, self._bad_groups = False, set()
        recorded = {k: len(self._metrics.get(k, ())) for k in _ITERATION_LOSSES}  # to drop this iteration's losses
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor([float(g in self._bad_groups) for g in _GROUPS], device=self.args.device)
        if self.args.world_size > 1:  # skip on every process or none, so that the replicas stay identical
            bad = self.accelerator.gather(bad[None]).amax(0)
        skipped = bool(bad.any())
        for counts in (self._loss_window, self._loss_total):
            counts[0] += 1
            counts[1] += skipped
        if skipped:
            self._forget_iteration_losses(recorded)
            self.optimizer.zero_grad(set_to_none=True)
            self._on_nonfinite({g for g, b in zip(_GROUPS, bad.tolist()) if b})
            return torch.zeros_like(loss)
        if not self._step_guarded:  # else the step guard resets the streak once the update is known to be finite
            self._nonfinite_streak = 0
        return loss

    def _forget_iteration_losses(self, recorded: dict[str, int]) -> None:
        """Mark this iteration skipped in the metrics and drop the losses it recorded (they are not its result)."""
        m = self._metrics
        if m.get("nonfinite_skipped"):
            m["nonfinite_skipped"][-1] = 1.0  # also when only another process saw the non-finite value
        for key, length in recorded.items():
            if key in m:
                del m[key][length:]

    def _guard_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Roll back an optimiser step that leaves NaN / inf in the set, as a bad gradient is: nothing is applied.

        Finite gradients can still give a non-finite set (a huge lr, an overflow in the update); the loss and
        gradient checks cannot see that, so the parameters are checked after every step. The parameters and the
        optimiser state (momentum) of the step are restored and the iteration counts as a non-finite one
        (:meth:`_on_nonfinite`: the offending groups' lrs are lowered after ``nonfinite_patience`` of them).
        The replicas hold identical parameters, so every process takes the same decision.
        """
        saved: dict[torch.Tensor, tuple[torch.Tensor, dict]] = {}

        def before(opt, args, kwargs):
            saved.clear()
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
                        saved[p] = (p.detach().clone(), state)

        def after(opt, args, kwargs):
            if not saved:  # a skipped iteration: no gradient, nothing stepped
                return
            if bool(torch.stack([torch.isfinite(p).all() for p in saved]).all()):
                self._nonfinite_streak = 0
                return
            bad = {g["name"] for g in opt.param_groups for p in g["params"]
                   if p in saved and not bool(torch.isfinite(p).all())}
            with torch.no_grad():
                for p, (value, state) in saved.items():
                    p.copy_(value)
                    if state:
                        opt.state[p] = state
                    else:
                        opt.state.pop(p, None)
            logger.warning("step %d: the update made %s non-finite; it was rolled back (nothing applied)",
                           self.state.global_step + 1, sorted(bad))
            if self._metrics.get("nonfinite_skipped"):
                self._metrics["nonfinite_skipped"][-1] = 1.0
            self._on_nonfinite(bad)

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)
        self._step_guarded = True

    def _on_nonfinite(self, groups: set[str]) -> None:
        """Count consecutive skipped iterations; lower the offending lrs every ``nonfinite_patience``, then stop."""
        args = self.args
        self._nonfinite_streak += 1
        if self._nonfinite_streak % args.nonfinite_patience:
            return
        if self._nonfinite_lowerings >= args.nonfinite_max_lowerings:
            from ..pipeline import last_complete_checkpoint

            lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
            raise NonFiniteError(
                f"{self._nonfinite_streak} consecutive iterations (up to step {self.state.global_step + 1}) gave a "
                f"non-finite matching loss, gradient or update in {sorted(groups)}, after lowering their learning "
                f"rates {self._nonfinite_lowerings} times (now {lrs}). Nothing non-finite was applied; the last "
                f"checkpoint is {last_complete_checkpoint(args.output_dir) or 'none (no checkpoint was saved yet)'}. "
                "Check the expert trajectories for NaN/inf, then lower the learning rates of these groups (--lr_img, "
                "--lr_txt, --lr_sim, --lr_lr) and run again with --resume_from_checkpoint latest: learning rates "
                "changed on the command line replace the checkpoint's.")
        self._nonfinite_lowerings += 1
        scheduler = self.lr_scheduler
        for i, group in enumerate(self.optimizer.param_groups):
            if group["name"] in groups:
                group["lr"] *= args.nonfinite_lr_factor
                if hasattr(scheduler, "base_lrs"):  # the constant schedule would restore the old lr next step
                    scheduler.base_lrs[i] *= args.nonfinite_lr_factor
        logger.warning("%d consecutive non-finite iterations in %s: their learning rates are now x%g (%s)",
                       self._nonfinite_streak, sorted(groups), args.nonfinite_lr_factor,
                       {g["name"]: g["lr"] for g in self.optimizer.param_groups})

    # ----- checkpoints and resume --------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save, refusing a set with NaN / inf (the step guard keeps it finite; this is the last line).

        The arguments saved beside it (``training_args.bin``) carry no token: see ``DistillationArguments``.
        """
        self._synthetic.check_finite("save a checkpoint of")
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume the set from a checkpoint, naming a damaged file or a set made with other settings.

        Without this a truncated ``model.safetensors`` gave a bare ``SafetensorError``, and a checkpoint of another
        similarity kind an unrelated ``AttributeError``; the newest intact checkpoint is offered instead.
        """
        from ..checks import checkpoint_problem, checkpoint_shapes, state_shapes_mismatch
        from ..pipeline import last_complete_checkpoint

        problem = checkpoint_problem(resume_from_checkpoint)
        if problem is not None:
            intact = last_complete_checkpoint(self.args.output_dir)
            raise ValueError(f"cannot resume from {resume_from_checkpoint}: {problem}; "
                             + (f"the newest intact checkpoint is {intact} (--resume_from_checkpoint latest picks it)"
                                if intact else "no intact checkpoint is left: start again without resuming"))
        expected = {k: tuple(v.shape) for k, v in self._synthetic.state_dict().items()}
        mismatch = state_shapes_mismatch(checkpoint_shapes(resume_from_checkpoint), expected)
        if mismatch:
            raise ValueError(f"{resume_from_checkpoint} holds a set made with other settings ({'; '.join(mismatch)}); "
                             "resume with the settings of that run (num_pairs, image_size, similarity, sim_rank, the "
                             "text encoder), or start a new run in another output_dir")
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._synthetic.check_finite(f"resume from {resume_from_checkpoint} with")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the optimiser and schedule, then let learning rates changed on the command line win.

        Each parameter group saves the lr it was configured with (``configured_lr``). An lr in the arguments that
        differs from it was changed for this run (e.g. lowered after a :class:`NonFiniteError`, as its message
        advises) and replaces the checkpoint's; an unchanged one keeps the checkpoint's value, including automatic
        lowerings. A checkpoint without ``configured_lr`` takes the arguments' lrs wherever they differ.
        """
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        args = self.args
        wanted = {"images": args.lr_img, "texts": args.lr_txt, "similarity": args.lr_sim, "lrs": args.lr_lr}
        scheduler = self.lr_scheduler
        base_lrs = getattr(scheduler, "base_lrs", None)
        for i, group in enumerate(self.optimizer.param_groups):
            new = wanted.get(group.get("name"))
            configured = group.get("configured_lr")
            base = base_lrs[i] if base_lrs is not None else group["lr"]
            if new is None or new == (configured if configured is not None else base):
                if new is not None:
                    group["configured_lr"] = configured if configured is not None else new
                continue
            factor = group["lr"] / base if base else 1.0  # where the schedule stands (1 for the constant one)
            logger.info("resume: %s lr %g from the command line replaces the checkpoint's %g", group["name"], new,
                        base)
            group["lr"], group["configured_lr"], group["initial_lr"] = new * factor, new, new
            if base_lrs is not None:
                base_lrs[i] = new
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def replica_checksums(self) -> list[str]:
        """SHA-256 of the synthetic set's tensors on every process (all equal when data-parallel works)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self._synthetic.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return gather_object([digest.hexdigest()])

    def _count_unrolled_pass(self, module, inputs, output) -> None:
        """Forward hook on the encoder that asymmetric matching unrolls, held while the inner loop runs."""
        rows = len(output)
        self.encoder_passes["forward"] += rows
        if output.requires_grad:
            output.register_hook(lambda grad: self.encoder_passes.__setitem__(
                "backward", self.encoder_passes["backward"] + rows))

    def _pixel_gradient(self, pixels, pixel_leaf, feats, g_feats) -> torch.Tensor:
        """``(∂ features / ∂ pixels)ᵀ g_feats`` for the touched images: one backward through the encoder."""
        self.encoder_passes["backward"] += len(pixels)
        if pixel_leaf is not None:
            return torch.autograd.grad(feats, pixel_leaf, g_feats)[0]
        out = []
        for chunk, g_chunk in zip(pixels.split(self.args.encoder_chunk_size),
                                  g_feats.split(self.args.encoder_chunk_size)):
            leaf = chunk.detach().requires_grad_(True)
            self.encoder_passes["forward"] += len(chunk)
            out.append(torch.autograd.grad(self._encode(leaf), leaf, g_chunk)[0])
        return torch.cat(out)

    def _log_iteration(self, loss, stats, lrs, plans, segments, touched: int) -> None:
        m = self._metrics
        m["matching_loss"].append(float(loss))
        for key in ("inner_loss_first", "inner_loss_last"):
            m[key].append(sum(s[key] for s in stats) / len(stats))
        m["lr_img"].append(float(lrs["image"].detach()))
        m["lr_txt"].append(float(lrs["text"].detach()))
        blends = [b.lam for plan in plans for b in plan.blends]
        m["blend_lambda"].append(sum(blends) / len(blends))
        m["start_epoch"].append(sum(float(s.start_epoch) for s in segments) / len(segments))
        m["touched_images"].append(float(touched))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the iteration metrics averaged since the last log (TRL's ``_metrics`` pattern).

        Iterations skipped for a non-finite matching loss or gradient count in ``nonfinite_skipped`` only:
        ``loss`` and ``matching_loss`` average the other iterations, and are absent from the entry when every
        iteration since the last log was skipped (they used to read 0.0 then).
        """
        for key, counts in (("loss", self._loss_window), ("train_loss", self._loss_total)):
            steps, skipped = counts
            if key in logs and skipped:
                logs = dict(logs)
                if steps > skipped:
                    logs[key] *= steps / (steps - skipped)  # the skipped steps added 0 to the Trainer's sum
                else:
                    del logs[key]
        if "loss" in logs or "learning_rate" in logs:  # a training log (also when its loss was left out)
            self._loss_window = [0, 0]
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items() if v}}
            self._metrics.clear()
        super().log(logs, start_time)

    # ----- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def synthetic_pairs(self) -> PairSet:
        """The current set as features: encoder features of the synthetic images, texts, S and η."""
        syn = self._synthetic
        if syn.config.synthetic_space == "features":
            feats = syn.images.detach()
        else:
            feats = torch.cat([self._encode(c) for c in syn.images.detach().split(256)])
            self.encoder_passes["forward"] += syn.num_pairs
        lrs = syn.inner_lrs(self.args.lr_min, self.args.lr_max)
        similarity = syn.similarity().detach() if self.args.distill_loss == "wbce" else None
        return PairSet(feats.cpu(), syn.text_embeddings.detach().cpu(),
                       None if similarity is None else similarity.cpu(),
                       lr_img=float(lrs["image"]), lr_txt=float(lrs["text"]))

    @torch.no_grad()
    def synthetic_pixel_pairs(self) -> PixelPairSet:
        """The current set as pixels, texts, S and η: the input of the asymmetric methods' own protocol.

        :func:`~repblend_hf.evaluation.evaluate_finetuned` fine-tunes the image encoder on these pixels (LoRS /
        MTT-VL's ``epoch.py``); η is clamped to ``[lr_min, lr_max]`` as in :meth:`synthetic_pairs`.
        """
        syn = self._synthetic
        if syn.config.synthetic_space != "pixels":
            raise ValueError("a feature-space set has no pixels to fine-tune the image encoder on; evaluate it with "
                             "synthetic_pairs() (fresh heads on the frozen encoder)")
        lrs = syn.inner_lrs(self.args.lr_min, self.args.lr_max)
        similarity = syn.similarity().detach() if self.args.distill_loss == "wbce" else None
        return PixelPairSet(syn.images.detach().cpu(), syn.text_embeddings.detach().cpu(),
                            None if similarity is None else similarity.cpu(),
                            lr_img=float(lrs["image"]), lr_txt=float(lrs["text"]))

    def evaluate(self, eval_dataset=None, ignore_keys: Sequence[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Train fresh heads on the current set and score them on the validation split (no test data)."""
        if self.validation is None:
            return {}
        start = time.time()
        pairs = self.synthetic_pairs()
        rows = []
        for seed in range(self.args.num_eval_seeds):
            trained = train_heads(pairs, embed_dim=self._synthetic.config.embed_dim, loss=self.args.distill_loss,
                                  epochs=self.args.eval_head_epochs, validation=self.validation,
                                  temperature=self._synthetic.config.temperature, seed=seed)
            best = next(h for h in trained.history if h["epoch"] == trained.best_epoch)
            val_diagnostics = modality_diagnostics(*embed_split(trained.heads, self.validation))
            rows.append({**best["validation"], **{f"val_{k}": v for k, v in val_diagnostics.items()}})
        metrics = {f"{metric_key_prefix}_{k}": sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        if self.reference is not None:  # modality collapse on the set itself, under one fixed model
            for prefix, values in (("set", self.reference(pairs)), ("real_subset", self.reference.real_subset)):
                metrics.update({f"{metric_key_prefix}_{prefix}_{k}": v for k, v in values.items()})
        metrics[f"{metric_key_prefix}_runtime"] = time.time() - start
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


