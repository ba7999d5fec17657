"""How a run is done: arguments of the expert and distillation trainers.

TRL-style (STYLE.md): each is a ``TrainingArguments`` dataclass that adds only the method's own
fields, each with help text, and checks them in ``__post_init__`` after the parent's. What a distilled
set *is* lives in :class:`repblend_hf.RepBlendConfig` instead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["ExpertTrainingArguments", "DistillationArguments", "METHOD_PRESETS"]

# The methods of the paper's comparison as presets of the switches they differ in (METHOD.md,
# "Baselines") and of the outer learning rates their authors released for Flickr-100. A field left at
# None takes the preset's value; a value set explicitly wins, which is how the ablations (RepBlend
# without blending, without symmetric matching) are expressed.
# - repblend: RepBlend's scripts/distill_flickr_repblend.sh (lr_img 100, lr_txt 100, lr_sim 10, lr_lr 1e-2).
# - lors: LoRS_Distill sh/distill_flickr_lors_100.sh (lr_img 100, lr_txt 100, lr_sim 10, lr_lr 1e-2).
# - mtt_vl: multimodal_dataset_distillation README's Flickr command (lr_img 1000, lr_txt 1000, lr_lr 1e-2; no
#   similarity, so lr_sim is unused), and its inner loop's logit scale ln(1/0.07) ≈ 2.66 (distill.py: the
#   logits are multiplied by ``logit_scale`` = ln(1/0.07) without ``.exp()``; its experts and evaluation
#   use 1/0.07).
# The released lr_lr 1e-2 steps the raw η; here lr_lr steps log η (DistillationArguments.lr_lr), where the same
# step at the initial η = 0.1 is 1e-2 / 0.1² = 1 (METHOD.md, step 4): the presets carry that 1. (They carried the
# raw 1e-2 before, a ~100x smaller step that left η at its start, issue #10.) None for inner_logit_scale means
# 1/temperature.
METHOD_PRESETS: dict[str, dict[str, object]] = {
    "repblend": dict(blend_beta=1.0, matching="symmetric", distill_loss="wbce", similarity="lowrank",
                     meta_gradient="tesla", lr_img=100.0, lr_txt=100.0, lr_sim=10.0, lr_lr=1.0,
                     inner_logit_scale=None),
    "lors": dict(blend_beta=0.0, matching="asymmetric", distill_loss="wbce", similarity="lowrank",
                 meta_gradient="tesla", lr_img=100.0, lr_txt=100.0, lr_sim=10.0, lr_lr=1.0, inner_logit_scale=None),
    "mtt_vl": dict(blend_beta=0.0, matching="asymmetric", distill_loss="infonce", similarity="none",
                   meta_gradient="unrolled", lr_img=1000.0, lr_txt=1000.0, lr_sim=10.0, lr_lr=1.0,
                   inner_logit_scale=math.log(1 / 0.07)),
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_finite(args) -> None:
    """Every float argument must be finite: ``--lr_img inf`` parses as a float and used to turn the set into NaN."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}; set --{f.name} to a finite value")


def _check_mixed_precision(args) -> None:
    """fp16 needs a GPU (loss scaling, fp16 kernels); on a CPU-only machine it used to fail only after the experts."""
    import torch

    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    _check(not (args.fp16 and (args.use_cpu or not accelerator)),
           "fp16 needs a GPU, but this run is on the CPU (no GPU found, or use_cpu=True); drop --fp16, or use "
           "--bf16 true --use_cpu true for bf16 autocast on the CPU")


def _pickle_without_tokens(self) -> dict:
    """Pickled arguments (``training_args.bin`` in every checkpoint) never hold a token: ``*_token`` fields are None.

    The token stays on the live object for the pushes that need it; a resumed run takes it from the command line
    or the environment (``HF_TOKEN``) again.
    """
    return {k: None if k.endswith("_token") else v for k, v in self.__dict__.items()}


@dataclass
class ExpertTrainingArguments(TrainingArguments):
    """Arguments of :class:`~repblend_hf.trainers.ExpertTrainer` (METHOD.md, "Expert trajectories").

    Defaults that differ from ``TrainingArguments``: ``optim="sgd"``, ``learning_rate=0.1`` (no momentum, no
    weight decay), ``num_train_epochs=10``, ``per_device_train_batch_size=128``, ``lr_scheduler_type="constant"``,
    ``max_grad_norm=0`` (no clipping), ``save_strategy="no"`` (an expert is saved whole when it is done),
    ``logging_steps=50``, ``remove_unused_columns=False``.
    """

    num_experts: int = field(default=8, metadata={"help": "How many expert trajectories to train (paper: 20)."})
    matching: str = field(default="symmetric", metadata={
        "help": "'symmetric' trains only the two projection heads on cached features (RepBlend); 'asymmetric' also "
                "fine-tunes the image encoder from pixels (LoRS / MTT-VL buffers)."})
    asymmetric_image_head: bool = field(default=False, metadata={
        "help": "Asymmetric experts only, an ablation: train an image head on top of the encoder. Off (the released "
                "LoRS / MTT-VL buffers): the image branch is the encoder alone and its pooled feature is the image "
                "embedding, so embed_dim must equal the encoder's feature width."})
    embed_dim: int = field(default=512, metadata={"help": "Output dimension of both projection heads (paper: 2304)."})
    temperature: float = field(default=0.07, metadata={"help": "InfoNCE temperature τ (not learned)."})
    learning_rate: float = field(default=0.1, metadata={"help": "SGD learning rate of the experts (paper: 0.1)."})
    optim: str = field(default="sgd", metadata={"help": "Experts use plain SGD (no momentum, no weight decay)."})
    num_train_epochs: float = field(default=10, metadata={"help": "Epochs per expert (paper: 10)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Expert batch size (paper: 128)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Experts use a constant learning rate."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Experts are not clipped (0 disables clipping)."})
    save_strategy: str = field(default="no", metadata={"help": "Each expert is stored whole once it finishes."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all dataset columns."})

    def __post_init__(self):
        _check_finite(self)
        super().__post_init__()
        _check_mixed_precision(self)
        _check(self.num_experts > 0, f"num_experts must be > 0, got {self.num_experts}")
        _check(self.matching in ("symmetric", "asymmetric"),
               f"matching must be 'symmetric' or 'asymmetric', got {self.matching!r}")
        _check(self.embed_dim > 0, f"embed_dim must be > 0, got {self.embed_dim}")
        _check(not self.asymmetric_image_head or self.matching == "asymmetric",
               "asymmetric_image_head=True adds an image head to the asymmetric experts' encoder; symmetric experts "
               "always train both heads: drop asymmetric_image_head or set matching='asymmetric'")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.max_steps <= 0, f"experts are snapshotted once per epoch: set num_train_epochs, not max_steps "
                                    f"(got max_steps={self.max_steps})")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(self.num_train_epochs >= 1 and float(self.num_train_epochs).is_integer(),
               f"num_train_epochs must be a whole number >= 1 (snapshots are per epoch), got {self.num_train_epochs}")


@dataclass
class DistillationArguments(TrainingArguments):
    """Arguments of :class:`~repblend_hf.trainers.DistillationTrainer` (METHOD.md, "Distillation loop").

    One training step is one outer iteration. Defaults are the released Flickr-100 setting except where
    noted; ``method`` fills ``blend_beta``, ``matching``, ``distill_loss``, ``similarity``,
    ``meta_gradient``, the outer learning rates ``lr_img``, ``lr_txt``, ``lr_sim``, ``lr_lr`` and
    ``inner_logit_scale`` from :data:`METHOD_PRESETS` unless they are set explicitly. The learning rates that
    result when none is given:

    ========== ====== ====== ====== ====== ==================
    method     lr_img lr_txt lr_sim lr_lr  inner_logit_scale
    ========== ====== ====== ====== ====== ==================
    repblend   100    100    10     1      1/temperature
    lors       100    100    10     1      1/temperature
    mtt_vl     1000   1000   (10)   1      ln(1/0.07) ≈ 2.66
    ========== ====== ====== ====== ====== ==================

    (MTT-VL learns no similarity: its lr_sim is unused.) ``syn_momentum`` is 0.5 for every method, as released.
    Defaults that differ from ``TrainingArguments``: ``max_steps=3000``, ``lr_scheduler_type="constant"``,
    ``max_grad_norm=0`` (the groups have very different gradient scales; η is clipped separately),
    ``logging_steps=10``, ``save_steps=100``, ``save_total_limit=2``, ``per_device_train_batch_size=1``,
    ``remove_unused_columns=False``.
    """

    method: str = field(default="repblend", metadata={"help": f"Preset: one of {sorted(METHOD_PRESETS)}."})
    syn_steps: int = field(default=8, metadata={"help": "Inner steps of the student per outer iteration."})
    expert_epochs: int = field(default=1, metadata={"help": "Epochs between θ⁰ and the target θ* on the expert."})
    max_start_epoch: int = field(default=2, metadata={"help": "The start epoch is drawn from 0..max_start_epoch-1."})
    mini_batch_size: int = field(default=20, metadata={"help": "Synthetic pairs per inner step."})
    straddle_batches: bool = field(default=False, metadata={
        "help": "Let an inner mini-batch take the rest of a permutation and continue into the next one. Off: a fresh "
                "permutation starts when fewer than mini_batch_size pairs are left, as in the released code."})
    inner_dropout: float = field(default=0.1, metadata={
        "help": "Dropout of the heads in the inner loop (the released code runs the student in train mode, p = 0.1); "
                "each step's masks are drawn once and reused when TESLA recomputes the step. 0 disables."})
    lr_img: float | None = field(default=None, metadata={
        "help": "Outer SGD learning rate of the synthetic images (preset: 100 for repblend / lors, 1000 for mtt_vl)."})
    lr_txt: float | None = field(default=None, metadata={
        "help": "Outer SGD learning rate of the synthetic texts (preset: 100 for repblend / lors, 1000 for mtt_vl)."})
    lr_sim: float | None = field(default=None, metadata={
        "help": "Outer SGD learning rate of the similarity parameters (preset: 10)."})
    lr_lr: float | None = field(default=None, metadata={
        "help": "Outer SGD learning rate of log η, the inner lrs (preset: 1, the released 1e-2 on the raw η "
                "as a step on log η at η = 0.1)."})
    lr_init: float = field(default=0.1, metadata={"help": "Initial inner learning rate η of both heads."})
    lr_min: float = field(default=1e-3, metadata={
        "help": "Lower bound of η. η = exp(log η) clamped to [lr_min, lr_max]: a plain η went negative or to 0 and "
                "the set collapsed in a probe (METHOD.md)."})
    lr_max: float = field(default=10.0, metadata={"help": "Upper bound of η."})
    lr_grad_clip: float = field(default=1.0, metadata={
        "help": "Each log η gradient is clipped to [-c, c] before the step, so η moves at most a few percent per "
                "iteration (0 disables)."})
    syn_momentum: float = field(default=0.5, metadata={"help": "SGD momentum of the outer optimiser (paper: 0.5)."})
    image_optimizer: str = field(default="sgd", metadata={
        "help": "Optimiser of the synthetic images: 'sgd' (the released code: SGD with syn_momentum at lr_img) or "
                "'adam' (Adam at lr_img, e.g. 0.01 for normalised pixels; the other groups keep SGD)."})
    blend_beta: float | None = field(default=None, metadata={
        "help": "Representation blending: λ ~ Beta(β, β) per inner step; 0 disables blending (preset: 1 for "
                "repblend, 0 for lors / mtt_vl)."})
    matching: str | None = field(default=None, metadata={
        "help": "'symmetric' matches both projection heads (RepBlend); 'asymmetric' matches the image encoder + "
                "text head (LoRS / MTT-VL: the student's image branch is the encoder alone, as released)."})
    asymmetric_image_head: bool = field(default=False, metadata={
        "help": "Asymmetric matching only, an ablation: put an image head on top of the trained image encoder (this "
                "library's layout before issue #11). Off (the released LoRS / MTT-VL student): the image embedding "
                "is the encoder's pooled feature, so the text head outputs its width (embed_dim = image_dim)."})
    branch_normalization: str = field(default="separate", metadata={
        "help": "'separate' sums per-branch normalised distances (Flickr settings); 'joint' uses one ratio (COCO)."})
    meta_gradient: str | None = field(default=None, metadata={
        "help": "'tesla' (the released code: detached inner gradients, per-step recomputation, constant memory) or "
                "'unrolled' (exact; cheap when only heads are unrolled)."})
    distill_loss: str | None = field(default=None, metadata={
        "help": "Inner loss: 'wbce' against the learned similarity (LoRS / RepBlend) or 'infonce' (MTT-VL)."})
    similarity: str | None = field(default=None, metadata={
        "help": "Learned similarity kind: 'lowrank', 'full' or 'none' (preset). Rank and scale are in the config."})
    inner_logit_scale: float | None = field(default=None, metadata={
        "help": "Factor of the cosine logits in the inner loop only (experts and evaluation keep 1/temperature). "
                "None: 1/temperature (repblend, lors); preset for mtt_vl: ln(1/0.07) ≈ 2.66, what its released "
                "inner loop uses."})
    encoder_chunk_size: int = field(default=-1, metadata={
        "help": "Synthetic images per encoder call in the symmetric path. -1 (auto): chosen per iteration from the "
                "touched images, the device and the memory available (one graph up to 160 images of 64 px on a CPU, "
                "else chunks of 20; recomputed when the graphs would not fit in half the free memory); "
                "encoder_recompute is then ignored. 0: all touched images in one call. > 0: chunks of that size; with "
                "encoder_recompute each chunk's forward graph is freed and recomputed in the pixel backward, so "
                "memory stays at one chunk's graph (one more forward per image)."})
    encoder_recompute: bool = field(default=True, metadata={
        "help": "With encoder_chunk_size > 0: recompute each chunk's forward in the pixel backward (memory of one "
                "chunk) instead of keeping every chunk's graph (one forward and one backward per image, the memory "
                "of all touched images; small chunks can still be faster per image, e.g. on CPU)."})
    encoder_per_step: bool = field(default=False, metadata={
        "help": "Run the image encoder inside every inner step, as the authors' code does (20 forwards per step, "
                "again when TESLA recomputes). Same gradient, more encoder work; for benchmarks and checks."})
    fold_batchnorm: bool = field(default=True, metadata={
        "help": "Symmetric matching: run the frozen encoder's synthetic-pixel passes through a copy with its "
                "eval-mode BatchNorms folded into the convolutions (same function up to float rounding, no BatchNorm "
                "forward or backward). Asymmetric matching trains the encoder and never folds."})
    segments_per_iteration: int = field(default=2, metadata={
        "help": "Expert segments matched per outer iteration (each with its own inner-loop plan) against one encoder "
                "pass over the pairs they touch; their matching losses are averaged. More signal per encoder pass: "
                "2 reached a higher validation r_mean than 1 or 4 in the same training time in each of 3 seeds "
                "(benchmarks/results/segments.md)."})
    stage_steps: list[int] | None = field(default=None, metadata={
        "help": "A set distilled in stages (--stage_pairs): outer iterations of each stage, one value per stage or "
                "one for all (default: max_steps each). Each stage is a run of its own in OUTPUT_DIR/stage_K, "
                "resumable."})
    stage_min_start_epoch: list[int] | None = field(default=None, metadata={
        "help": "Stages: the first start epoch each stage's segments may draw (default 0). PTM-ST's Flickr-500 "
                "matches starts {0, 1} in its first stage and {1, 2} in its second: --stage_min_start_epoch 0 1 "
                "--stage_max_start_epoch 2 3."})
    stage_max_start_epoch: list[int] | None = field(default=None, metadata={
        "help": "Stages: one past the last start epoch of each stage's segments (default max_start_epoch)."})
    stage_targets: str = field(default="experts", metadata={
        "help": "Stages: what a later stage matches. 'experts': the experts trained from scratch, in its window "
                "(PTM-ST). 'conditioned': experts that start from heads trained on the earlier stages by the "
                "evaluation protocol and then train on real data (PDD), trained for the stage in OUTPUT_DIR/stage_K/"
                "experts.", "choices": ["experts", "conditioned"]})
    stage_inner_pairs: str = field(default="union", metadata={
        "help": "Stages: the pairs a stage's inner loop trains on. 'union': every pair so far, the earlier stages' "
                "frozen (PDD); 'stage': the stage's own new pairs (PTM-ST).", "choices": ["union", "stage"]})
    shortcut_epoch: list[int] | None = field(default=None, metadata={
        "help": "Shortcut targets (PTM-ST convexify.py): replace each expert's trajectory by the straight line from "
                "epoch 0 to this epoch, each parameter tensor placed by its cumulative step length; one value per "
                "stage or one for all (PTM-ST's Flickr-500: 6 then 8). Default: the trajectories as trained."})
    start_epoch_warmup: float = field(default=0.0, metadata={
        "help": "A growing start-epoch window (DATM's sequential generation): the upper bound of the start epoch "
                "rises linearly from min + 1 to max_start_epoch over this share of the (stage's) iterations. 0: "
                "fixed."})
    similarity_init: str = field(default="identity", metadata={
        "help": "The learned similarity's start: 'identity' (S = I, LoRS) or 'expert': what the experts at "
                "similarity_init_epoch see between the initial pairs (repblend_hf.stages.relative_similarity; DATM "
                "starts its soft labels from a late expert). Applies to the first stage's pairs.",
        "choices": ["identity", "expert"]})
    similarity_init_epoch: int | None = field(default=None, metadata={
        "help": "similarity_init='expert': the experts' epoch to read (default: their last)."})
    nonfinite_patience: int = field(default=3, metadata={
        "help": "After this many consecutive iterations with a non-finite matching loss or gradient (each one "
                "skipped, nothing applied) the lrs of the offending groups are multiplied by nonfinite_lr_factor."})
    nonfinite_lr_factor: float = field(default=0.5, metadata={"help": "Factor applied to the offending lrs."})
    nonfinite_max_lowerings: int = field(default=3, metadata={
        "help": "When non-finite iterations continue after this many lowerings the run stops with an error; the "
                "checkpoints on disk hold only finite values."})
    max_time_minutes: float | None = field(default=None, metadata={
        "help": "Stop after this many minutes of outer iterations (evaluations and checkpoints not counted; a resumed "
                "run continues the budget), or at max_steps if that comes first. For comparisons at equal time. A run "
                "in stages splits it over the stages it distills, in proportion to their iterations."})
    num_eval_seeds: int = field(default=1, metadata={"help": "Seeds of the fresh-head evaluation during training."})
    eval_head_epochs: int = field(default=100, metadata={"help": "Epochs of fresh-head training in evaluation."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start from scratch although output_dir holds checkpoints of an earlier run: they are deleted first. "
                "Without it (and without --resume_from_checkpoint) the run stops before any work."})
    max_steps: int = field(default=3000, metadata={"help": "Outer iterations (paper: 3000)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Constant outer learning rates."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "No global clipping (see lr_grad_clip)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N iterations."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every N iterations."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the last N checkpoints."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "One outer iteration per step."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all dataset columns."})

    def __post_init__(self):
        _check_finite(self)
        super().__post_init__()
        _check_mixed_precision(self)
        _check(self.method in METHOD_PRESETS, f"method must be one of {sorted(METHOD_PRESETS)}, got {self.method!r}")
        for name, value in METHOD_PRESETS[self.method].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check(self.syn_steps > 0, f"syn_steps must be > 0, got {self.syn_steps}")
        _check(self.expert_epochs > 0, f"expert_epochs must be > 0, got {self.expert_epochs}")
        _check(self.max_start_epoch > 0, f"max_start_epoch must be > 0, got {self.max_start_epoch}")
        _check(self.mini_batch_size > 1, f"mini_batch_size must be > 1, got {self.mini_batch_size}")
        _check(0 <= self.inner_dropout < 1, f"inner_dropout must be in [0, 1), got {self.inner_dropout}")
        for name in ("lr_img", "lr_txt", "lr_sim", "lr_lr", "lr_init"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.inner_logit_scale is None or self.inner_logit_scale > 0,
               f"inner_logit_scale must be > 0, got {self.inner_logit_scale}; leave it unset for 1/temperature")
        _check(0 < self.lr_min <= self.lr_init <= self.lr_max,
               f"need 0 < lr_min <= lr_init <= lr_max, got {self.lr_min}, {self.lr_init}, {self.lr_max}")
        _check(self.lr_grad_clip >= 0, f"lr_grad_clip must be >= 0 (0 disables), got {self.lr_grad_clip}")
        _check(0 <= self.syn_momentum < 1, f"syn_momentum must be in [0, 1), got {self.syn_momentum}")
        _check(self.image_optimizer in ("sgd", "adam"),
               f"image_optimizer must be 'sgd' or 'adam', got {self.image_optimizer!r}")
        _check(self.blend_beta >= 0, f"blend_beta must be >= 0, got {self.blend_beta}; use 0 to disable blending")
        _check(self.matching in ("symmetric", "asymmetric"),
               f"matching must be 'symmetric' or 'asymmetric', got {self.matching!r}")
        _check(not self.asymmetric_image_head or self.matching == "asymmetric",
               "asymmetric_image_head=True adds an image head to the asymmetric student's encoder; symmetric matching "
               "always trains both heads: drop asymmetric_image_head or set matching='asymmetric'")
        _check(self.branch_normalization in ("separate", "joint"),
               f"branch_normalization must be 'separate' or 'joint', got {self.branch_normalization!r}")
        _check(self.meta_gradient in ("tesla", "unrolled"),
               f"meta_gradient must be 'tesla' or 'unrolled', got {self.meta_gradient!r}")
        _check(self.distill_loss in ("wbce", "infonce"),
               f"distill_loss must be 'wbce' or 'infonce', got {self.distill_loss!r}")
        _check(self.similarity in ("lowrank", "full", "none"),
               f"similarity must be 'lowrank', 'full' or 'none', got {self.similarity!r}")
        _check(self.distill_loss != "infonce" or self.similarity == "none",
               "distill_loss='infonce' uses identity targets; set similarity='none' (or distill_loss='wbce')")
        _check(self.encoder_chunk_size >= -1,
               f"encoder_chunk_size must be -1 (auto), 0 (one call) or > 0, got {self.encoder_chunk_size}")
        _check(self.segments_per_iteration > 0,
               f"segments_per_iteration must be > 0, got {self.segments_per_iteration}")
        _check(0 <= self.start_epoch_warmup <= 1,
               f"start_epoch_warmup must be a share of the iterations in [0, 1], got {self.start_epoch_warmup}")
        _check(self.stage_targets in ("experts", "conditioned"),
               f"stage_targets must be 'experts' or 'conditioned', got {self.stage_targets!r}")
        _check(self.stage_inner_pairs in ("union", "stage"),
               f"stage_inner_pairs must be 'union' or 'stage', got {self.stage_inner_pairs!r}")
        _check(self.stage_targets != "conditioned" or self.matching == "symmetric",
               "stage_targets='conditioned' trains the experts' heads on cached features; asymmetric (LoRS / MTT-VL) "
               "experts fine-tune the encoder: use stage_targets='experts' with matching='asymmetric'")
        _check(self.similarity_init in ("identity", "expert"),
               f"similarity_init must be 'identity' or 'expert', got {self.similarity_init!r}")
        _check(self.similarity_init == "identity" or (self.similarity != "none" and self.matching == "symmetric"),
               "similarity_init='expert' starts a learned similarity from symmetric experts' heads: it needs "
               "similarity 'lowrank' or 'full' and matching 'symmetric'")
        _check(self.nonfinite_patience > 0, f"nonfinite_patience must be > 0, got {self.nonfinite_patience}")
        _check(0 < self.nonfinite_lr_factor < 1,
               f"nonfinite_lr_factor must be in (0, 1), got {self.nonfinite_lr_factor}")
        _check(self.nonfinite_max_lowerings >= 0,
               f"nonfinite_max_lowerings must be >= 0, got {self.nonfinite_max_lowerings}")
        _check(self.max_time_minutes is None or self.max_time_minutes > 0,
               f"max_time_minutes must be > 0, got {self.max_time_minutes}; leave it unset for no time limit")
        _check(self.num_eval_seeds > 0, f"num_eval_seeds must be > 0, got {self.num_eval_seeds}")
        _check(self.eval_head_epochs > 0, f"eval_head_epochs must be > 0, got {self.eval_head_epochs}")


ExpertTrainingArguments.__getstate__ = _pickle_without_tokens
DistillationArguments.__getstate__ = _pickle_without_tokens
