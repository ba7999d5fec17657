"""DistillationTrainer: RepBlend (and LoRS / MTT-VL) distillation as a ``transformers.Trainer``.

METHOD.md, "Distillation loop". The model is the :class:`~repblend_hf.SyntheticSet`; one training
step is one outer iteration. ``compute_loss`` calls :func:`~repblend_hf.distillation.outer_iteration`
and returns a scalar whose value is the matching loss and whose gradient is the meta-gradient, so the
Trainer's own backward, optimiser step, logging, checkpointing and resume do the rest. How the synthetic
images pass through the frozen encoder (once, chunked, per inner step, BatchNorms folded) is the
:class:`~repblend_hf.encoders.EncoderPass`; the encoder stays outside the wrapped module, like timm's
distillation teacher. Non-finite values are kept out of the set by :class:`~.callbacks.NonFiniteGuard`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer

from ..checkpoints import checkpoint_problem, checkpoint_shapes, last_complete_checkpoint, state_shapes_mismatch
from ..distillation import encoder_pass_for, inner_temperature, iteration_generator, outer_iteration, student_heads
from ..evaluation import (
    EvaluationProtocol,
    PairSet,
    PixelPairSet,
    ReferenceDiagnostics,
    embed_split,
    modality_diagnostics,
    train_heads,
)
from ..features import FeatureSplit
from ..modeling import branch_sizes
from ..stages import Stage
from ..synthetic import SyntheticSet
from ..training_args import DistillationArguments
from ..trajectories import ExpertTrajectories
from .callbacks import (
    CardCallback,
    FeatureRangeProjection,
    NonFiniteError,
    NonFiniteGuard,
    RecordIterations,
    TimeBudget,
)

__all__ = ["DistillationTrainer", "FeatureRangeProjection", "NonFiniteError", "SGDWithAdamGroups"]

logger = logging.getLogger(__name__)
_GROUPS = ("images", "texts", "similarity", "lrs")  # the optimiser's parameter groups
_ITERATION_LOSSES = ("matching_loss", "inner_loss_first", "inner_loss_last")  # not logged for skipped iterations


class _Iterations(Dataset):
    """One item per outer iteration; the iteration's randomness comes from (seed, step, rank)."""

    def __init__(self, num_iterations: int):
        self.num_iterations = num_iterations

    def __len__(self) -> int:
        return self.num_iterations

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"iteration": i}


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
        stage: for a set distilled in stages (:mod:`repblend_hf.stages`), the stage this trainer distils: its
            window of start epochs, its new pairs (the earlier ones frozen) and its own randomness; ``args.max_steps``
            is the stage's iterations and ``trajectories`` the ones made for the stage. Evaluation trains on every
            stage so far (``config.stages``).
    """

    def __init__(self, model: SyntheticSet, args: DistillationArguments, trajectories: ExpertTrajectories,
                 image_encoder: nn.Module, validation: FeatureSplit | None = None,
                 reference: ReferenceDiagnostics | None = None,
                 feature_bounds: tuple[torch.Tensor, torch.Tensor] | None = None, stage: Stage | None = None,
                 **kwargs):
        self.image_encoder = image_encoder
        self.stage = stage
        self.trajectories = trajectories
        self.validation = validation
        self.reference = reference
        config = model.config
        # The config is what the set is and the trainer reads it alone; the arguments carry these three only as the
        # flags (and method presets) the config is built from, so a set built from other ones is refused here.
        for name in ("similarity", "matching", "asymmetric_image_head"):
            if getattr(args, name) != getattr(config, name):
                raise ValueError(f"args.{name}={getattr(args, name)!r} but the SyntheticSet was built with "
                                 f"config.{name}={getattr(config, name)!r}; build the config from the arguments")
        config.record_distillation(args)  # the set's config.json and card say how it was made (method, β, ...)
        # The student: both heads (symmetric), or the image encoder and the text head (asymmetric, as released;
        # an image head only for the asymmetric_image_head ablation). Experts must have trained the same branches.
        self.heads = student_heads(config)
        trajectories.check_compatible(
            branch_sizes(self.heads, image_encoder.model if config.matching == "asymmetric" else None))
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._bad_groups: set[str] = set()  # the optimiser groups whose gradient this iteration was not finite
        # Training steps and skipped ones since the last log, and since the trainer was built (for train_loss).
        self._loss_window, self._loss_total = [0, 0], [0, 0]
        kwargs.setdefault("train_dataset", _Iterations(args.max_steps * args.per_device_train_batch_size))
        if validation is not None:
            # Trainer insists on an eval dataset for eval_strategy != "no"; evaluation reads `validation`.
            kwargs.setdefault("eval_dataset", _Iterations(1))
        super().__init__(model=model, args=args, **kwargs)
        self.nonfinite_guard = NonFiniteGuard(self)
        self.add_callback(self.nonfinite_guard)
        self.add_callback(RecordIterations(config))
        self.add_callback(CardCallback(model.training_record))
        if args.max_time_minutes is not None:
            self.add_callback(TimeBudget(args.max_time_minutes * 60))
        if feature_bounds is not None:
            if config.synthetic_space != "features":
                raise ValueError("feature_bounds project a feature-space set's features; this set is in pixels")
            self.add_callback(FeatureRangeProjection(*feature_bounds))
        self.encoder_pass = encoder_pass_for(image_encoder, config, args)
        self.image_encoder.to(self.args.device)
        self.heads.to(self.args.device)
        # On a GPU with room, the snapshots live there: no host-to-device copy of a segment every iteration.
        self.trajectories = trajectories.on_device_if_fits(self.args.device)

    @property
    def encoder_passes(self) -> dict[str, int]:
        """Images through the frozen encoder (forward) and images whose encoder output got a gradient (backward)."""
        return self.encoder_pass.passes

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
        return self.optimizer

    @property
    def _synthetic(self) -> SyntheticSet:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    # ----- one outer iteration ----------------------------------------------------------------------------

    @property
    def _inner_temperature(self) -> float:
        """The inner loop's temperature: 1 / ``inner_logit_scale`` when set (MTT-VL's ln(1/0.07)), else τ."""
        return inner_temperature(self._synthetic.config, self.args)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One outer iteration (:func:`~repblend_hf.distillation.outer_iteration`): a scalar whose value is the
        matching loss and whose gradient is the meta-gradient of every tensor of the set."""
        args = self.args
        stage_index = self.stage.index if self.stage is not None else 0
        generator = iteration_generator(args.seed, self.state.global_step, args.process_index, stage_index)
        result = outer_iteration(self._synthetic, self.heads, self.trajectories, self.encoder_pass, args, generator,
                                 temperature=self._inner_temperature, stage=self.stage, step=self.state.global_step)
        gradients, loss, self._bad_groups = result.gradients, result.loss, result.nonfinite_groups
        self._metrics["nonfinite_skipped"].append(float(bool(self._bad_groups)))
        if self._bad_groups:
            # Never let a non-finite value reach the synthetic set: zero surrogate now, and training_step drops the
            # gradients so that SGD's momentum does not move the set either.
            gradients = [(p, torch.zeros_like(p)) for p, _ in gradients]
            loss = torch.zeros((), device=loss.device)
        for key, value in result.metrics(loss).items():
            self._metrics[key].append(value)
        return model(surrogate_grads=gradients, loss=loss)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; after a skipped (non-finite) iteration the gradients are set to None.

        A skipped iteration returns a loss of 0 to the Trainer's running sum and is left out of the logged
        ``loss`` and ``matching_loss`` (see :meth:`log`), so the curve never shows a perfect 0 exactly when
        things go wrong; ``nonfinite_skipped`` counts it.
        """
        self._bad_groups = set()
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
            self.nonfinite_guard.skipped({g for g, b in zip(_GROUPS, bad.tolist()) if b})
            return torch.zeros_like(loss)
        return loss

    def _forget_iteration_losses(self, recorded: dict[str, int]) -> None:
        """Mark this iteration skipped in the metrics and drop the losses it recorded (they are not its result)."""
        m = self._metrics
        if m.get("nonfinite_skipped"):
            m["nonfinite_skipped"][-1] = 1.0  # also when only another process saw the non-finite value
        for key, length in recorded.items():
            if key in m:
                del m[key][length:]

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
        return gather_object([self._synthetic.fingerprint()])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the iteration metrics averaged since the last log and over the processes (TRL's ``_metrics`` pattern).

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
            logs = {**logs, **self._averaged_metrics()}
            self._metrics.clear()
        super().log(logs, start_time)

    def _averaged_metrics(self) -> dict[str, float]:
        """The iteration metrics since the last log, averaged over the iterations and then over the processes.

        Every process records the same keys (each matches its own segments), so under DDP the logged values are
        those of all processes, not rank 0's alone.
        """
        means = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
        if self.args.world_size > 1 and means:
            local = torch.tensor(list(means.values()), dtype=torch.float64, device=self.args.device)
            means = dict(zip(means, self.accelerator.gather(local[None]).mean(0).tolist()))
        return means

    # ----- evaluation -------------------------------------------------------------------------------------

    def synthetic_pairs(self) -> PairSet:
        """The current set as features: encoder features of the synthetic images, texts, S and η (and its stages)."""
        return self._synthetic.pair_set(self.encoder_pass.encode, self.args.lr_min, self.args.lr_max,
                                        with_similarity=self.args.distill_loss == "wbce")

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
        protocol = EvaluationProtocol(loss=self.args.distill_loss, epochs=self.args.eval_head_epochs,
                                      temperature=self._synthetic.config.temperature)
        rows = []
        for seed in range(self.args.num_eval_seeds):
            trained = train_heads(pairs, protocol, embed_dim=self._synthetic.config.embed_dim,
                                  validation=self.validation, seed=seed)
            best = next(h for h in trained.history if h["epoch"] == trained.best_epoch)
            val_diagnostics = modality_diagnostics(*embed_split(trained.heads, self.validation))
            rows.append({**best["validation"], **{f"val_{k}": v for k, v in val_diagnostics.items()}})
            if pairs.stages is not None:  # the stage being distilled alone (the best above may be an earlier one's)
                last = [h["validation"]["r_mean"] for h in trained.history if h["stage"] == len(pairs.stages) - 1]
                rows[-1]["stage_r_mean"] = max(last)
        metrics = {f"{metric_key_prefix}_{k}": sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        if self.reference is not None:  # modality collapse on the set itself, under one fixed model
            for prefix, values in (("set", self.reference(pairs)), ("real_subset", self.reference.real_subset)):
                metrics.update({f"{metric_key_prefix}_{prefix}_{k}": v for k, v in values.items()})
        metrics[f"{metric_key_prefix}_runtime"] = time.time() - start
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


