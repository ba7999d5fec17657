"""ExpertTrainer: train projection heads on the real data and record their trajectory.

METHOD.md, "Expert trajectories": the two heads (encoders frozen) are trained with symmetric InfoNCE,
SGD lr 0.1, batch 128, and every head parameter is recorded at epoch 0 and after each epoch. An epoch
is one pass over the (image, caption) pairs of the training split, as in the authors' loaders (BLIP's
``flickr30k_train.json`` has one item per caption), each pair with one random cached augmented view of
its image. With ``matching="asymmetric"`` (the LoRS /
MTT-VL buffers) a trainable copy of the image encoder is trained from pixels instead of the image head,
as the released ``buffer.py`` does (it records ``teacher_net.image_encoder`` and
``teacher_net.text_projection``): the ``"image"`` branch vector is the encoder's parameters and its pooled
feature is the image embedding. ``asymmetric_image_head=True`` (an ablation) keeps an image head after it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from ..data.images import to_rgb
from ..evaluation import EvaluationProtocol, PairSet, train_heads
from ..features import FeatureSplit
from ..losses import info_nce
from ..modeling import RetrievalHeads, branch_sizes, flatten_parameters, similarity_logits
from ..training_args import ExpertTrainingArguments
from ..trajectories import ExpertTrajectories
from ..trajectory_writer import TrajectoryWriter

__all__ = ["ExpertModel", "ExpertTrainer", "train_experts", "train_conditioned_experts", "EPOCH_DEFINITION"]

logger = logging.getLogger(__name__)


class ExpertModel(nn.Module):
    """The retrieval heads (and, for asymmetric experts, a trainable image encoder) with an InfoNCE loss.

    For the released asymmetric layout ``heads`` has no image head (``RetrievalHeads(..., image_head=False)``):
    the image embedding is the encoder's feature, and the model's parameters are exactly the two matched
    branches (encoder, text head).
    """

    def __init__(self, heads: RetrievalHeads, temperature: float, image_encoder: nn.Module | None = None):
        super().__init__()
        self.heads = heads
        self.temperature = temperature
        self.image_encoder = image_encoder

    def train(self, mode: bool = True) -> ExpertModel:
        super().train(mode)
        if self.image_encoder is not None:
            # Batch-norm statistics stay those of the pretrained encoder: the distillation student runs
            # the encoder in eval mode too, so experts and student are the same function of θ.
            self.image_encoder.eval()
        return self

    def forward(self, text_features: torch.Tensor, image_features: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        u = self.image_encoder(pixel_values) if self.image_encoder is not None else image_features
        image_embeds, text_embeds = self.heads(u, text_features)
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"loss": info_nce(similarity_logits(image_embeds, text_embeds, self.temperature))}
        # Data-parallel expert (open_clip's "local loss, gather with grad"): this process's rows against every
        # process's columns, in both directions. DDP averages the gradients over processes, which gives exactly
        # the gradient of the InfoNCE over the global batch: P processes with B/P rows each = one process with B.
        rank, rows = dist.get_rank(), len(image_embeds)
        all_images, all_texts = _gather_with_grad(image_embeds), _gather_with_grad(text_embeds)
        target = torch.arange(rows, device=image_embeds.device) + rank * rows
        image_to_text = similarity_logits(image_embeds, all_texts, self.temperature)
        text_to_image = similarity_logits(text_embeds, all_images, self.temperature)
        return {"loss": 0.5 * (F.cross_entropy(image_to_text, target) + F.cross_entropy(text_to_image, target))}

    def branch_vectors(self) -> dict[str, torch.Tensor]:
        """The flat parameter vector of each matched branch (``image`` leads with the encoder if trained)."""
        image = flatten_parameters(self.heads.image_head)
        if self.image_encoder is not None:
            encoder = flatten_parameters(self.image_encoder)
            image = torch.cat([encoder, image.to(encoder)]) if image.numel() else encoder
        return {"image": image, "text": flatten_parameters(self.heads.text_head)}


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sums the gradients of every process (works on gloo and NCCL)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows, ctx.rank = len(tensor), dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    return _GatherWithGrad.apply(tensor)


#: What one expert epoch is, recorded in the trajectories' metadata (``epoch_definition``) so that experts
#: trained under another definition are never reused silently: one pass over the (image, caption) pairs.
EPOCH_DEFINITION = "caption_pairs"


class _FeaturePairs(Dataset):
    """Caption c → (one random cached augmented view of its image, or the eval feature; c's embedding).

    One item per (image, caption) pair, so an epoch sees every caption once and each image once per
    caption (METHOD.md, "Expert trajectories").
    """

    def __init__(self, split: FeatureSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, c: int) -> dict[str, torch.Tensor]:
        i = int(self.split.caption_to_image[c])
        views = self.split.augmented_image_features
        if views is None:
            image = self.split.image_features[i]
        else:
            image = views[i, int(torch.randint(views.shape[1], (1,)))]
        return {"image_features": image, "text_features": self.split.caption_features[c]}


class _PixelPairs(_FeaturePairs):
    """Caption c → (its image's train-transformed pixels, c's embedding), for asymmetric experts."""

    def __init__(self, split: FeatureSplit, images, transform):
        super().__init__(split)
        self.images, self.transform = images, transform

    def __getitem__(self, c: int) -> dict[str, torch.Tensor]:
        i = int(self.split.caption_to_image[c])
        return {"pixel_values": self.transform(to_rgb(self.images[i])),
                "text_features": self.split.caption_features[c]}


class _TrajectoryRecorder(TrainerCallback):
    """Records the branch vectors at the start (epoch 0) and after every epoch (main process only)."""

    def __init__(self, writer: TrajectoryWriter, expert_index: int):
        self.writer, self.expert_index, self.epoch = writer, expert_index, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.epoch = 0
        if state.is_world_process_zero:
            self.writer.discard(self.expert_index)
            self.writer.record(self.expert_index, 0, _unwrap(model).branch_vectors())

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epoch += 1
        if state.is_world_process_zero:  # DDP keeps the replicas identical: one process writes
            self.writer.record(self.expert_index, self.epoch, _unwrap(model).branch_vectors())


def _unwrap(model: nn.Module) -> ExpertModel:
    return model.module if hasattr(model, "module") else model


class ExpertTrainer(Trainer):
    """A ``Trainer`` for one expert; the recording of its trajectory is a callback.

    Compared with a plain ``Trainer`` it only adds the trajectory callback: the loss comes from
    :class:`ExpertModel`, the optimiser is ``optim="sgd"`` from :class:`ExpertTrainingArguments`.
    """

    def __init__(self, model: ExpertModel, args: ExpertTrainingArguments, train_dataset: Dataset,
                 writer: TrajectoryWriter, expert_index: int, **kwargs):
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self.add_callback(_TrajectoryRecorder(writer, expert_index))


def train_experts(train: FeatureSplit, args: ExpertTrainingArguments, trajectory_dir: str, *,
                  image_encoder=None, images=None, metadata: dict | None = None,
                  initial_state: Callable[[int], Mapping[str, torch.Tensor]] | None = None) -> ExpertTrajectories:
    """Train ``args.num_experts`` experts into ``trajectory_dir``, skipping those already complete.

    METHOD.md, "Expert trajectories". Expert ``e`` uses seed ``args.seed + e``. Symmetric experts
    train on the cached features of ``train``; asymmetric ones (``args.matching="asymmetric"``) fine-tune a
    copy of ``image_encoder`` (a FrozenImageEncoder) on ``images`` (the train split's PIL images) through its
    train-time transform, with the text head and no image head (``embed_dim`` must then be the encoder's
    feature width) unless ``args.asymmetric_image_head``. Each finished expert is written atomically, so a
    killed run resumes where it stopped.

    Under ``accelerate launch`` with P processes every expert is trained data-parallel: each process
    takes B / P pairs of each batch of B = ``args.per_device_train_batch_size`` and the InfoNCE is
    computed over the gathered batch of B, so an expert is the same function of its data as in one
    process. The main process writes the trajectories; every process returns them.

    ``initial_state(e)`` (symmetric experts) gives expert ``e``'s heads their state at epoch 0 (a ``RetrievalHeads``
    state dict) instead of a fresh initialisation: the conditioned experts of a set distilled in stages
    (:func:`train_conditioned_experts`). It is called only for the experts still to train.
    """
    state = PartialState()
    if args.per_device_train_batch_size % state.num_processes:
        raise ValueError(f"the expert batch ({args.per_device_train_batch_size}) must divide evenly over the "
                         f"{state.num_processes} processes; set per_device_train_batch_size to a multiple of "
                         f"{state.num_processes}")
    if args.matching == "asymmetric" and (image_encoder is None or images is None):
        raise ValueError("matching='asymmetric' trains the image encoder: pass image_encoder= and images=")
    dims = (train.image_features.shape[1], train.caption_features.shape[1], args.embed_dim)
    trained_encoder = image_encoder.model if args.matching == "asymmetric" else None
    image_head = args.matching == "symmetric" or args.asymmetric_image_head
    heads = RetrievalHeads(*dims, image_head=image_head)  # an inconsistent embed_dim fails here, before any work
    info = {
        "num_epochs": int(args.num_train_epochs),
        "branch_sizes": branch_sizes(heads, trained_encoder),
        "num_experts": args.num_experts,
        "matching": args.matching,
        "image_dim": int(train.image_features.shape[1]),
        "text_dim": int(train.caption_features.shape[1]),
        "embed_dim": args.embed_dim,
        "temperature": args.temperature,
        "learning_rate": args.learning_rate,
        "batch_size": args.per_device_train_batch_size,
        "seed": args.seed,
        "epoch_definition": EPOCH_DEFINITION,
        "features_fingerprint": train.fingerprint,
        **(metadata or {}),
    }
    if args.matching == "asymmetric":  # what the image branch holds (symmetric experts: always the image head)
        info["image_branch"] = "encoder+image_head" if image_head else "encoder"
    with state.main_process_first():  # the main process creates the directory and its metadata
        writer = TrajectoryWriter(trajectory_dir, info)
    todo = [e for e in range(args.num_experts) if e not in writer.completed]
    if len(todo) < args.num_experts:
        logger.info("experts %s already complete in %s; training %s", writer.completed, trajectory_dir, todo)
    for e in _claimed(Path(trajectory_dir), todo, state):
        expert_args = dataclasses.replace(args, seed=args.seed + e, per_device_train_batch_size=(
            args.per_device_train_batch_size // state.num_processes))
        torch.manual_seed(expert_args.seed)
        model = ExpertModel(RetrievalHeads(*dims, image_head=image_head), args.temperature,
                            _trainable_copy(trained_encoder))
        if initial_state is not None:
            model.heads.load_state_dict(initial_state(e))
        if args.matching == "asymmetric":
            dataset = _PixelPairs(train, images, image_encoder.train_transform)
        else:
            dataset = _FeaturePairs(train)
        ExpertTrainer(model, expert_args, dataset, writer, e).train()
    state.wait_for_everyone()  # every expert is on disk before any process reads them
    return ExpertTrajectories.load(trajectory_dir)


def train_conditioned_experts(train: FeatureSplit, pairs: PairSet, protocol: EvaluationProtocol,
                              args: ExpertTrainingArguments, trajectory_dir: str, *,
                              metadata: dict | None = None) -> ExpertTrajectories:
    """The conditioned experts of a later stage (PDD): each starts from heads trained on the earlier stages.

    PDD (``VITA-Group/ProgressiveDD``, ``distill_mtt.py``): at the end of a stage, for every expert a network is
    trained on the synthetic set so far by the evaluation protocol and then trained on the real data, its snapshots
    saved per epoch; the next stage matches those trajectories, so the student's start is what evaluation reaches
    after the earlier stages. Here expert ``e``'s epoch 0 is the final state of :func:`~repblend_hf.evaluation.
    train_heads` on ``pairs`` (the earlier stages, trained in order with their η) under ``protocol`` and seed
    ``args.seed + e``; epochs 1.. are :func:`train_experts` on ``train`` (symmetric experts only). ``metadata``
    should name the set (e.g. a fingerprint of ``pairs``) so that experts of another set are never reused.
    """
    if args.matching != "symmetric":
        raise ValueError("conditioned experts train heads on cached features (matching='symmetric'); asymmetric "
                         "experts fine-tune the image encoder from pixels and cannot start from a head state")

    def initial_state(e: int) -> dict[str, torch.Tensor]:
        trained = train_heads(pairs, protocol, embed_dim=args.embed_dim, seed=args.seed + e)
        return trained.final_state

    return train_experts(train, args, trajectory_dir, metadata={**(metadata or {}), "conditioned": True},
                         initial_state=initial_state)


def _claimed(directory: Path, todo: list[int], state: PartialState) -> Iterator[int]:
    """The experts of ``todo`` this run trains, each yielded while its lock file is held.

    Runs that share a trajectory directory (e.g. ``benchmarks/methods.py --workers 2``) train different experts
    side by side and never the same one twice: an expert whose lock another run holds is skipped at first and
    waited for once the free ones are done; one another run finished meanwhile is not trained again. The main
    process holds the locks; in a multi-process run its decision is broadcast, so every process trains the same
    experts together.
    """
    remaining = list(todo)
    for blocking in (False, True):
        for e in list(remaining):
            with _expert_lock(directory, e, state, blocking) as (held, train):
                if not held:
                    continue  # another run is training it: come back once the free ones are done
                remaining.remove(e)
                if train:
                    yield e
                else:
                    logger.info("expert %d was trained by another run meanwhile", e)


@contextlib.contextmanager
def _expert_lock(directory: Path, e: int, state: PartialState, blocking: bool) -> Iterator[tuple[bool, bool]]:
    """Hold expert ``e``'s lock (main process); yields (lock held, expert still to train), alike on every process."""
    lock = FileLock(directory / f".expert_{e:03d}.lock") if state.is_main_process else None
    held = True
    if lock is not None:
        try:
            lock.acquire(blocking=blocking)
        except Timeout:
            held = False
    decision = [held, held and e not in ExpertTrajectories.completed_experts(directory)]
    if state.num_processes > 1:
        decision = broadcast_object_list(decision, from_process=0)
    try:
        yield decision[0], decision[1]
    finally:
        if lock is not None and held:
            lock.release()


def _trainable_copy(encoder: nn.Module | None) -> nn.Module | None:
    """A trainable copy of the frozen encoder's network (asymmetric experts), or None."""
    if encoder is None:
        return None
    model = copy.deepcopy(encoder)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
