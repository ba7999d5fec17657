"""Callbacks of the :class:`~repblend_hf.trainers.DistillationTrainer`: what happens around an optimiser step.

:class:`NonFiniteGuard` keeps NaN / inf out of the synthetic set: it rolls back an update that made the set
non-finite, counts consecutive skipped iterations, lowers the offending groups' learning rates and finally stops
the run (:class:`NonFiniteError`). :class:`FeatureRangeProjection` keeps a feature-space set inside the range
real features reach. :class:`TimeBudget` stops a run after a given time of outer iterations (equal-time method
comparisons). :class:`RecordIterations` keeps the set's config counting the outer iterations done;
:class:`CardCallback` collects the run's hyperparameters and validation curve for the set's card. They act
on Trainer events (``on_pre_optimizer_step`` / ``on_optimizer_step`` / ``on_step_end``), the extension points the
Trainer offers, rather than on the optimiser's internals.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..checkpoints import last_complete_checkpoint

__all__ = ["NonFiniteError", "NonFiniteGuard", "FeatureRangeProjection", "TimeBudget", "RecordIterations",
           "CardCallback"]

logger = logging.getLogger(__name__)
_clock = time.perf_counter  # TimeBudget's clock (a test replaces it)


class NonFiniteError(RuntimeError):
    """Distillation kept producing non-finite values after the learning rates were lowered."""


def _synthetic(model):
    return model.module if hasattr(model, "module") else model


def _sgd_step_stays_finite(p: torch.Tensor, group: dict, state: dict) -> bool:
    """Whether a plain SGD-with-momentum step (no dampening, weight decay or Nesterov) provably leaves ``p`` finite.

    The step is ``buf <- m * buf + g`` and ``p <- p - lr * buf``, so every entry of the new ``p`` is at most
    ``max|p| + lr * (m * max|buf| + max|g|)`` in size: below the dtype's largest value (halved for rounding), nothing
    can overflow and the guard need not copy the parameter and its momentum to roll them back. Three min/max reductions
    instead of two copies and a finiteness check of the whole set: at 999 images of 64 px the copies and checks were
    ~0.15 s of a 1.0 s iteration (``speed_profile_n999_64px.md``). Any other optimiser (Adam groups), or a bound that
    is not finite, answers False and the guard keeps its copies.
    """
    if group.get("adam") or group.get("weight_decay") or group.get("nesterov") or group.get("dampening"):
        return False
    if not (p.is_floating_point() and p.grad.is_floating_point()):
        return False

    def amax(t: torch.Tensor) -> float:  # max |t|, NaN if t holds one; aminmax is ~10x faster than an inf-norm on CPU
        lo, hi = torch.aminmax(t.detach())
        return max(abs(float(lo)), abs(float(hi))) if not (lo.isnan() or hi.isnan()) else float("nan")

    buf = state.get("momentum_buffer")
    update = amax(p.grad) + (abs(group.get("momentum", 0.0)) * amax(buf) if buf is not None else 0.0)
    bound = amax(p) + abs(group["lr"]) * update
    return bound < torch.finfo(p.dtype).max / 2  # False for inf / NaN too


class NonFiniteGuard(TrainerCallback):
    """Nothing non-finite reaches the set: skipped iterations are counted, lrs lowered, and the run stopped.

    The trainer skips an iteration whose matching loss or gradient is not finite (its gradients are dropped) and
    reports it with :meth:`skipped`. Finite gradients can still give a non-finite set (a huge lr, an overflow in
    the update), which the loss and gradient checks cannot see: so the parameters are checked after every
    optimiser step, and a step that left NaN / inf is rolled back, parameters and optimiser state (momentum)
    alike, and counts as a skipped iteration. After ``nonfinite_patience`` consecutive skipped iterations the
    offending groups' lrs are multiplied by ``nonfinite_lr_factor``; when that has been done
    ``nonfinite_max_lowerings`` times and the iterations still fail, :class:`NonFiniteError` stops the run. The
    replicas of a data-parallel run hold identical parameters, so every process takes the same decision.
    It acts on ``trainer``'s optimiser and schedule (as SetFit's card callback holds its trainer); a rolled-back
    step marks its iteration in the trainer's ``nonfinite_skipped`` metric.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.streak = self.lowerings = 0  # consecutive skipped iterations, lr lowerings so far
        self._saved: dict[torch.Tensor, tuple[torch.Tensor, dict]] = {}
        self._proven = False  # the coming step was proven finite (nothing saved, nothing to check)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        optimizer = self.trainer.optimizer
        self._saved.clear()
        stepped = [(p, group) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._proven = bool(stepped) and all(_sgd_step_stays_finite(p, group, optimizer.state.get(p, {}))
                                             for p, group in stepped)
        if self._proven:  # no entry can become non-finite: nothing to roll back, nothing to copy
            return
        for p, _ in stepped:  # a rolled-back step is rolled back whole
            saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()}
            self._saved[p] = (p.detach().clone(), saved)

    def on_optimizer_step(self, args, state, control, **kwargs):
        optimizer, saved = self.trainer.optimizer, self._saved
        if self._proven:  # a step proven finite before it ran: a good iteration
            self.streak = 0
            return
        if not saved:  # a skipped iteration: no gradient, nothing stepped
            return
        if bool(torch.stack([torch.isfinite(p).all() for p in saved]).all()):
            self.streak = 0
            return
        bad = {g["name"] for g in optimizer.param_groups for p in g["params"]
               if p in saved and not bool(torch.isfinite(p).all())}
        with torch.no_grad():
            for p, (value, opt_state) in saved.items():
                p.copy_(value)
                if opt_state:
                    optimizer.state[p] = opt_state
                else:
                    optimizer.state.pop(p, None)
        logger.warning("step %d: the update made %s non-finite; it was rolled back (nothing applied)",
                       state.global_step + 1, sorted(bad))
        metrics = self.trainer._metrics
        if metrics.get("nonfinite_skipped"):
            metrics["nonfinite_skipped"][-1] = 1.0
        self.skipped(bad)

    def skipped(self, groups: set[str]) -> None:
        """Count a skipped iteration; lower the offending lrs every ``nonfinite_patience`` of them, then stop."""
        args, state = self.trainer.args, self.trainer.state
        optimizer, lr_scheduler = self.trainer.optimizer, self.trainer.lr_scheduler
        self.streak += 1
        if self.streak % args.nonfinite_patience:
            return
        if self.lowerings >= args.nonfinite_max_lowerings:
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            raise NonFiniteError(
                f"{self.streak} consecutive iterations (up to step {state.global_step + 1}) gave a "
                f"non-finite matching loss, gradient or update in {sorted(groups)}, after lowering their learning "
                f"rates {self.lowerings} times (now {lrs}). Nothing non-finite was applied; the last "
                f"checkpoint is {last_complete_checkpoint(args.output_dir) or 'none (no checkpoint was saved yet)'}. "
                "Check the expert trajectories for NaN/inf, then lower the learning rates of these groups (--lr_img, "
                "--lr_txt, --lr_sim, --lr_lr) and run again with --resume_from_checkpoint latest: learning rates "
                "changed on the command line replace the checkpoint's.")
        self.lowerings += 1
        for i, group in enumerate(optimizer.param_groups):
            if group["name"] in groups:
                group["lr"] *= args.nonfinite_lr_factor
                if hasattr(lr_scheduler, "base_lrs"):  # the constant schedule would restore the old lr next step
                    lr_scheduler.base_lrs[i] *= args.nonfinite_lr_factor
        logger.warning("%d consecutive non-finite iterations in %s: their learning rates are now x%g (%s)",
                       self.streak, sorted(groups), args.nonfinite_lr_factor,
                       {g["name"]: g["lr"] for g in optimizer.param_groups})


class FeatureRangeProjection(TrainerCallback):
    """Keeps a feature-space set's image features inside a box ``[low, high]`` after every optimiser step.

    A free feature-space set can use values no image produces (EfficientNet-Lite0's pooled ReLU6 features
    are never negative; ``benchmarks/results/pixel_gap.md``). Projecting onto the per-dimension range of the
    real training features after each SGD step gives a set the pixel path could at least approach.
    """

    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        self.low, self.high = low, high

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            features = _synthetic(model).image_features
            low, high = self.low.to(features.device), self.high.to(features.device)
            features.copy_(torch.maximum(torch.minimum(features, high), low))


class TimeBudget(TrainerCallback, ExportableState):
    """Stops training once the outer iterations have taken ``max_seconds`` of wall-clock time.

    Only the steps count (``on_step_begin`` to ``on_step_end``): evaluations and checkpoints do not use up the
    budget, so methods compared at equal time get equal distillation time whatever their evaluation costs. The
    time spent is saved in every checkpoint (``trainer_state.json``) and read back on resume, so a resumed run
    continues its budget instead of starting a new one. When the budget ends the run evaluates and saves (where
    its strategies evaluate and save at all) and ends as a finished run does. In a multi-process run the main
    process decides, so every process stops at the same step.
    """

    def __init__(self, max_seconds: float):
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        self.max_seconds = float(max_seconds)
        self.spent = 0.0
        self._began: float | None = None

    def state(self) -> dict:
        return {"args": {"max_seconds": self.max_seconds}, "attributes": {"spent": self.spent}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) and saved else saved
        if isinstance(saved, dict):  # a resumed run: the time its earlier steps took still counts
            self.spent = float(saved.get("attributes", {}).get("spent", 0.0))

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = _clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self._began is not None:
            self.spent += _clock() - self._began
            self._began = None
        done = self.spent >= self.max_seconds
        if PartialState().num_processes > 1:
            done = broadcast_object_list([done], from_process=0)[0]
        if done and not control.should_training_stop:
            logger.info("time budget of %.0fs used up after %d iterations: stopping", self.max_seconds,
                        state.global_step)
            control.should_training_stop = True
            control.should_evaluate = args.eval_strategy != "no"
            control.should_save = args.save_strategy != "no"
        return control


class RecordIterations(TrainerCallback):
    """Writes the outer iterations done into the set's config (``iterations``) after every step.

    So the ``config.json`` saved or pushed at the end of a run, or of one stopped early, says how long the set was
    distilled (the rest of how it was made is recorded by :meth:`RepBlendConfig.record_distillation`).
    """

    def __init__(self, config):
        self.config = config

    def on_step_end(self, args, state, control, **kwargs):
        self.config.iterations = state.global_step


class CardCallback(TrainerCallback):
    """Fills a set's :class:`~repblend_hf.hub.TrainingRecord` for its card, as SetFit's ``ModelCardCallback`` does.

    At the start of training it records the run's hyperparameters (the arguments ``DistillationArguments`` adds to
    ``TrainingArguments``, with ``max_steps`` and ``seed``) and the evaluations already in the log history (a resumed
    run's); every evaluation then adds its validation metrics at its step, the training curve the card shows.
    """

    #: TrainingArguments fields that say how the run went besides the ones the subclass adds.
    TRAINER_FIELDS = ("max_steps", "seed")

    def __init__(self, record):
        self.record = record

    def on_train_begin(self, args, state, control, **kwargs):
        own = [f.name for f in dataclasses.fields(args)
               if f.name not in TrainingArguments.__dataclass_fields__ or f.name in self.TRAINER_FIELDS]
        values = args.to_dict()
        self.record.hyperparameters = {name: values[name] for name in own if name in values}
        for entry in state.log_history:
            if "step" in entry:
                self.record.add_evaluation(entry["step"], entry)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.record.add_evaluation(state.global_step, metrics or {})
