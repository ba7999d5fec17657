"""Sets that grow with the budget: stages, moving targets and a growing start-epoch window, as pure functions.

METHOD.md, "Growing with the budget". A trajectory-matched set stops near the expert snapshot its segments end at,
so more pairs imitating the same snapshot add little (``docs``: the sizes results). The published ways past that
are options of ``repblend-distill``; each is a function here, used by the trainer and tested alone:

- **Stages** (PDD, ``VITA-Group/ProgressiveDD``; PTM-ST, ``Previsior/PTM-ST``): the set is distilled in stages of
  new pairs (:func:`plan_stages`), each with its own learned η (a fresh one, init ``lr_init``) and its own window of
  start epochs. The pairs of earlier stages stay in the student's inner loop with their gradients zeroed
  (:func:`freeze_earlier_pairs`, PDD's ``image_syn.grad[:masked_num] = 0``), or leave it (PTM-ST, whose stage
  trains only its own pairs). A stage's set grows from the previous one (:func:`grow_synthetic_set`). Evaluation
  trains on the stages in order, each on the union so far with its own η, carrying the optimiser's momentum
  (PDD's ``evaluate_mtt.py``; :func:`~repblend_hf.evaluation.train_heads` with a staged ``PairSet``).
- **Conditioned experts** (PDD): a later stage matches experts that start from heads trained on the earlier stages
  by the evaluation protocol and then train on real data, so the student's start and the expert's snapshot agree
  (:func:`repblend_hf.trainers.train_conditioned_experts`; it needs the expert trainer).
- **Shortcut targets** (PTM-ST ``convexify.py``): each parameter tensor's trajectory replaced by the straight line
  from epoch 0 to epoch K, placed by its cumulative step length (:func:`shortcut_trajectory`).
- **A growing start-epoch window** (DATM, ``NUS-HPC-AI-Lab/DATM``, "sequential generation"): the upper bound of the
  start epoch rises linearly over the first part of the iterations (:func:`start_epoch_bound`).
- **S from a late expert** (DATM initialises its soft labels from a late expert's outputs): the learned similarity
  starts from what the experts at a late epoch see between the initial pairs (:func:`similarity_from_expert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .configuration import RepBlendConfig
from .modeling import RetrievalHeads, unflatten_parameters
from .synthetic import SyntheticSet
from .trajectories import ExpertTrajectories

__all__ = ["Stage", "plan_stages", "stage_time_budgets", "stage_epochs", "stage_config", "as_first_stages",
           "freeze_earlier_pairs", "grow_synthetic_set",
           "shortcut_trajectory", "shortcut_trajectories", "start_epoch_bound", "relative_similarity",
           "similarity_from_expert", "STAGE_TARGETS", "STAGE_INNER_PAIRS"]

#: What a later stage's segments come from: the experts trained from scratch ("experts", PTM-ST) or experts that
#: start from heads trained on the earlier stages ("conditioned", PDD).
STAGE_TARGETS = ("experts", "conditioned")
#: Which pairs a stage's inner loop trains on: the union of every stage so far, earlier ones frozen ("union", PDD),
#: or the stage's own new pairs ("stage", PTM-ST).
STAGE_INNER_PAIRS = ("union", "stage")


@dataclass(frozen=True)
class Stage:
    """One stage of a set distilled in stages: its new pairs and how its segments are drawn.

    The set's pairs ``[offset, offset + num_pairs)`` are this stage's (learnable); the ``offset`` pairs before them
    belong to earlier stages (frozen). Segments start at an epoch drawn from ``min_start_epoch .. max_start_epoch -
    1`` of the trajectories (those made for the stage: conditioned experts start at the earlier stages' heads); with
    ``shortcut_epoch`` K the trajectories are first replaced by their straight lines from epoch 0 to K.
    """

    index: int
    num_pairs: int
    offset: int
    max_steps: int
    min_start_epoch: int
    max_start_epoch: int
    shortcut_epoch: int | None = None

    @property
    def end(self) -> int:
        """One past the stage's last pair: the size of the set once this stage is done."""
        return self.offset + self.num_pairs

    def to_dict(self) -> dict:
        return asdict(self)


def _per_stage(name: str, values: Sequence | None, default, count: int) -> list:
    """``values`` as one entry per stage: None → ``default`` for all, one value → that value for all."""
    if values is None or len(values) == 0:
        return [default] * count
    values = list(values)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values but the set has {count} stages (stage_pairs); give one "
                         f"value per stage or a single value for all")
    return values


def plan_stages(num_pairs: int, stage_pairs: Sequence[int] | None, *, max_steps: int, max_start_epoch: int,
                stage_steps: Sequence[int] | None = None, stage_min_start_epoch: Sequence[int] | None = None,
                stage_max_start_epoch: Sequence[int] | None = None,
                shortcut_epoch: Sequence[int] | None = None) -> list[Stage]:
    """The stages of a run: one :class:`Stage` per entry of ``stage_pairs`` (one stage of all pairs when None).

    ``stage_pairs`` must add up to ``num_pairs`` (PTM-ST's Flickr-500: 200 + 299; 200: 99 + 100). Each per-stage list
    takes one value per stage or one value for all: ``stage_steps`` (default ``max_steps``), the start-epoch window
    ``stage_min_start_epoch`` (default 0) .. ``stage_max_start_epoch`` (default ``max_start_epoch``; exclusive, as
    ``max_start_epoch`` is) and ``shortcut_epoch`` (default None: the trajectories as trained).
    """
    sizes = [num_pairs] if not stage_pairs else [int(n) for n in stage_pairs]
    if any(n < 1 for n in sizes) or sum(sizes) != num_pairs:
        raise ValueError(f"stage_pairs {sizes} must be positive and add up to num_pairs={num_pairs}; e.g. "
                         f"--stage_pairs {num_pairs // 2} {num_pairs - num_pairs // 2}")
    count = len(sizes)
    steps = _per_stage("stage_steps", stage_steps, max_steps, count)
    lows = _per_stage("stage_min_start_epoch", stage_min_start_epoch, 0, count)
    highs = _per_stage("stage_max_start_epoch", stage_max_start_epoch, max_start_epoch, count)
    shortcuts = _per_stage("shortcut_epoch", shortcut_epoch, None, count)
    stages, offset = [], 0
    for k, (n, s, lo, hi, cut) in enumerate(zip(sizes, steps, lows, highs, shortcuts)):
        if s < 1:
            raise ValueError(f"stage {k + 1} has stage_steps={s}; every stage needs at least one iteration")
        if not 0 <= lo < hi:
            raise ValueError(f"stage {k + 1}: the start epoch is drawn from stage_min_start_epoch={lo} .. "
                             f"stage_max_start_epoch={hi} - 1, which is empty; set 0 <= min < max")
        if cut is not None and cut < 1:
            raise ValueError(f"stage {k + 1}: shortcut_epoch must be >= 1 (the line's last epoch), got {cut}")
        stages.append(Stage(k, n, offset, int(s), int(lo), int(hi), None if cut is None else int(cut)))
        offset += n
    return stages


def stage_time_budgets(stages: Sequence[Stage], minutes: float | None, done_pairs: int = 0) -> list[float | None]:
    """Each stage's share of a run's time budget: ``minutes`` of outer iterations for the whole run, split over the
    stages it distills in proportion to their iterations (``max_steps``), so that a set in stages gets the same
    distillation time as a set of one stage (equal-time comparisons, ``--max_time_minutes``). The stages whose pairs
    a run starts with (``done_pairs``, from ``--initial_stages``) were distilled elsewhere: they get None and no
    share. ``minutes`` None (no budget) gives None for every stage."""
    todo = [stage for stage in stages if stage.end > done_pairs]
    if minutes is None or not todo:
        return [None] * len(stages)
    total = sum(stage.max_steps for stage in todo)
    return [minutes * stage.max_steps / total if stage.end > done_pairs else None for stage in stages]


def stage_epochs(stage: Stage, expert_epochs: int) -> int:
    """The epochs a stage's trajectories must hold: its latest segment's end, or its shortcut's last epoch."""
    return max(stage.max_start_epoch - 1 + expert_epochs, stage.shortcut_epoch or 0)


def stage_config(config: RepBlendConfig, stage: Stage, args, previous: SyntheticSet | None) -> RepBlendConfig:
    """The config of the set at ``stage``: ``config`` (the whole set's) with the pairs so far and the stages so far.

    ``config.stages`` gets the ``previous`` set's stages and this one's record: its new pairs, η at ``args.lr_init``
    (the set's learned η takes over; :meth:`SyntheticSet.sync_config`), its window, targets, shortcut, inner pairs,
    ``iterations`` (filled in when the stage ends) and ``steps``, how evaluation trains on it (:class:`~repblend_hf.
    evaluation.StagePhase`). ``args`` is the run's ``DistillationArguments``.
    """
    if (previous.num_pairs if previous is not None else 0) != stage.offset:
        raise ValueError(f"stage {stage.index + 1} starts after {stage.offset} pairs but the previous stage's set has "
                         f"{previous.num_pairs if previous is not None else 0}")
    later = stage.index > 0
    record = {"num_pairs": stage.num_pairs, "inner_lr_img": args.lr_init, "inner_lr_txt": args.lr_init,
              "min_start_epoch": stage.min_start_epoch, "max_start_epoch": stage.max_start_epoch,
              "targets": args.stage_targets if later else "experts",
              "inner_pairs": args.stage_inner_pairs if later else "union",
              "shortcut_epoch": stage.shortcut_epoch, "iterations": 0,
              # How evaluation trains on the stage (StagePhase.steps): the first with the recipe, a later one as its
              # student moved (syn_steps of plain SGD at its η).
              "steps": args.syn_steps if later else None}
    earlier = [dict(st) for st in previous.config.stages] if previous is not None else []
    return RepBlendConfig.from_dict({**config.to_dict(), "num_pairs": stage.end, "stages": earlier + [record]})


# What a set that later stages grow from must share with the run (the rest of its config may differ).
_SHARED = ("synthetic_space", "image_encoder", "text_encoder", "image_size", "image_dim", "text_dim", "embed_dim",
           "temperature", "similarity", "sim_rank", "sim_alpha", "matching")


def as_first_stages(synthetic: SyntheticSet, config: RepBlendConfig, stages: Sequence[Stage],
                    source: str = "") -> SyntheticSet:
    """``synthetic`` (a saved set, ``--initial_stages``) as the finished first stages of a run in ``stages``.

    A set of one stage gets its ``config.stages`` record (its pairs, its learned η, how it was distilled). Its
    pairs must be exactly the first stages of the run (a stage ends at its size), and it must be a set of the same
    kind as the run's ``config`` (encoders, space, heads, similarity): otherwise a ``ValueError`` names the
    difference.
    """
    cfg = synthetic.config
    different = [f"{k} ({getattr(cfg, k)!r} against this run's {getattr(config, k)!r})" for k in _SHARED
                 if getattr(cfg, k) != getattr(config, k)]
    if different:
        raise ValueError(f"the set {source} cannot be grown by this run: it differs in {', '.join(different)}; run "
                         "with its settings, or distil the first stages in this run")
    ends = [st.end for st in stages]
    if synthetic.num_pairs not in ends[:-1]:
        raise ValueError(f"the set {source} has {synthetic.num_pairs} pairs, but no stage before the last ends there "
                         f"(the stages end at {ends}); start --stage_pairs with its size, e.g. --stage_pairs "
                         f"{synthetic.num_pairs} {config.num_pairs - synthetic.num_pairs}")
    if not cfg.stages:
        cfg.stages = [{"num_pairs": synthetic.num_pairs, "inner_lr_img": cfg.inner_lr_img,
                       "inner_lr_txt": cfg.inner_lr_txt, "min_start_epoch": 0, "max_start_epoch": cfg.max_start_epoch,
                       "targets": "experts", "inner_pairs": "union", "shortcut_epoch": None,
                       "iterations": cfg.iterations or 0, "source": source}]
    elif [sum(st["num_pairs"] for st in cfg.stages[:k + 1]) for k in range(len(cfg.stages))] != ends[:len(cfg.stages)]:
        raise ValueError(f"the set {source} was distilled in stages of {[st['num_pairs'] for st in cfg.stages]} "
                         f"pairs; start --stage_pairs with the same sizes")
    return synthetic


def freeze_earlier_pairs(gradients: Sequence[tuple[nn.Parameter, torch.Tensor]], synthetic: SyntheticSet,
                         offset: int) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """The set's gradients with every entry that belongs to its first ``offset`` pairs alone set to zero.

    PDD (``distill_mtt.py``: ``image_syn.grad.data[:masked_num] = 0``): the pairs of earlier stages stay in the inner
    loop, and the outer step leaves them as they were. Images and texts: their first ``offset`` rows. The learned
    similarity: the entries that are functions of those pairs alone (:meth:`~repblend_hf.similarity.SoftSimilarity.
    earlier_pairs`: the low-rank ``a``, ``L``, ``R`` rows, the full matrix's top-left block), so S between an earlier
    and a new pair still learns. The learned η is the stage's own and is not frozen.
    """
    if offset <= 0:
        return list(gradients)
    blocks = {id(p): synthetic.similarity.earlier_pairs(name, offset)
              for name, p in synthetic.similarity.named_parameters()}
    blocks[id(synthetic.images)] = blocks[id(synthetic.text_embeddings)] = (slice(0, offset),)
    out = []
    for param, grad in gradients:
        block = blocks.get(id(param))
        if block is not None:
            grad = grad.clone()
            grad[block] = 0
        out.append((param, grad))
    return out


@torch.no_grad()
def grow_synthetic_set(previous: SyntheticSet, fresh: SyntheticSet) -> SyntheticSet:
    """``fresh`` (a larger set, its new pairs initialised) with the first pairs replaced by ``previous``'s.

    The start of a later stage: ``previous`` holds the earlier stages' pairs (images, texts and the similarity's
    entries of those pairs, :meth:`~repblend_hf.similarity.SoftSimilarity.earlier_pairs`); ``fresh`` the new pairs,
    e.g. :meth:`SyntheticSet.from_real` of the whole size with the same seed, whose first pairs are then the real
    pairs ``previous`` was initialised from (the draw is a prefix) and are overwritten here. η stays ``fresh``'s: each
    stage learns its own. Returns ``fresh``.
    """
    n = previous.num_pairs
    if fresh.num_pairs <= n:
        raise ValueError(f"a later stage adds pairs: the new set has {fresh.num_pairs} pairs, the previous {n}")
    for name in ("synthetic_space", "similarity", "image_size", "image_dim", "text_dim"):
        if getattr(previous.config, name) != getattr(fresh.config, name):
            raise ValueError(f"the stages of one set share {name}: the previous stage has "
                             f"{getattr(previous.config, name)!r}, the new one {getattr(fresh.config, name)!r}")
    fresh.images[:n] = previous.images
    fresh.text_embeddings[:n] = previous.text_embeddings
    old = dict(previous.similarity.named_parameters())
    for name, param in fresh.similarity.named_parameters():
        param[fresh.similarity.earlier_pairs(name, n)] = old[name]
    return fresh


def shortcut_trajectory(snapshots: torch.Tensor, tensor_sizes: Sequence[int], end: int) -> torch.Tensor:
    """The straight-line ("convexified") trajectory of one branch from epoch 0 to epoch ``end``: ``[end + 1, P]``.

    PTM-ST ``convexify.py``: per parameter tensor l (the flat branch vector split by ``tensor_sizes``),
    ``θ_l(t) = (1 − β_l(t)) θ_l(0) + β_l(t) θ_l(end)`` with ``β_l(t) = Σ_{p<t} ‖θ_l(p+1) − θ_l(p)‖ / Σ_{p<end} ‖·‖``,
    the share of the tensor's path length walked by epoch t (0 when it never moves). The end points are the
    trajectory's own; the snapshots after ``end`` are dropped.
    """
    if snapshots.ndim != 2 or sum(tensor_sizes) != snapshots.shape[1]:
        raise ValueError(f"snapshots must be [T + 1, P] with P = sum(tensor_sizes) = {sum(tensor_sizes)}, got "
                         f"{tuple(snapshots.shape)}")
    if not 1 <= end < snapshots.shape[0]:
        raise ValueError(f"shortcut_epoch must be in 1..{snapshots.shape[0] - 1} (the stored epochs), got {end}")
    path = snapshots[: end + 1].double()
    out = torch.empty_like(path)
    for piece, chunk in zip(path.split(list(tensor_sizes), dim=1), out.split(list(tensor_sizes), dim=1)):
        steps = (piece[1:] - piece[:-1]).norm(dim=1)  # [end]
        total = steps.sum()
        beta = torch.cat([steps.new_zeros(1), steps.cumsum(0)]) / total if total > 0 else torch.zeros(end + 1)
        beta[-1] = 1.0
        chunk.copy_((1 - beta[:, None]) * piece[0] + beta[:, None] * piece[-1])
    return out.to(snapshots.dtype)


def shortcut_trajectories(trajectories: ExpertTrajectories, end: int,
                          tensor_sizes: dict[str, Sequence[int]]) -> ExpertTrajectories:
    """Every expert's trajectory replaced by its :func:`shortcut_trajectory` to epoch ``end``, held in memory.

    ``tensor_sizes`` gives each branch's parameter tensor sizes in flat order (:func:`~repblend_hf.modeling.
    branch_tensor_sizes`). The result has ``end`` epochs; its metadata records ``shortcut_epoch``.
    """
    meta = {**trajectories.metadata, "num_epochs": end, "shortcut_epoch": end}
    out = ExpertTrajectories(meta)
    for index in trajectories.expert_indices:
        snapshots = trajectories.expert_snapshots(index)
        out.add_expert({b: shortcut_trajectory(snapshots[b], tensor_sizes[b], end) for b in trajectories.branches},
                       expert_index=index)
    return out


def start_epoch_bound(step: int, max_steps: int, min_start_epoch: int, max_start_epoch: int,
                      warmup: float) -> int:
    """The (exclusive) upper bound of the start epoch at iteration ``step``: DATM's sequential generation.

    DATM (``NUS-HPC-AI-Lab/DATM``) raises the upper bound of the sampled start epoch linearly over the first
    iterations, so a set first matches early segments and then later ones. Here the bound goes from
    ``min_start_epoch + 1`` at step 0 to ``max_start_epoch`` at ``warmup · max_steps`` and stays there; ``warmup``
    0 gives ``max_start_epoch`` throughout.
    """
    if warmup <= 0 or max_start_epoch - min_start_epoch <= 1:
        return max_start_epoch
    ramp = max(1.0, warmup * max_steps)
    grown = min_start_epoch + 1 + (max_start_epoch - min_start_epoch - 1) * min(1.0, step / ramp)
    return min(max_start_epoch, int(grown))


def relative_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor, temperature: float) -> torch.Tensor:
    """How well caption j describes image i compared with i's own caption, and the same from the text's side.

    ``S_ij = min(1, ½ (exp(ℓ_ij − ℓ_ii) + exp(ℓ_ij − ℓ_jj)))`` with ``ℓ`` the cosine logits at ``temperature`` and
    ``S_ii = 1``: a pair the model cannot tell from the true one gets a target near 1, an unrelated one near 0. DATM
    takes a late expert's softmax outputs as soft labels for its cross-entropy; the weighted BCE here scores each
    entry through a sigmoid, so the expert's belief enters as a likelihood relative to the true pair instead.
    """
    a = torch.nn.functional.normalize(image_embeds, dim=-1)
    b = torch.nn.functional.normalize(text_embeds, dim=-1)
    logits = a @ b.t() / temperature
    own = torch.diagonal(logits)
    relative = 0.5 * ((logits - own[:, None]).exp() + (logits - own[None, :]).exp())
    return relative.clamp(max=1.0).fill_diagonal_(1.0)


@torch.no_grad()
def similarity_from_expert(pairs, trajectories: ExpertTrajectories, epoch: int,
                           config: RepBlendConfig) -> torch.Tensor:
    """The starting S of a set's pairs: :func:`relative_similarity` under the experts at ``epoch``, averaged.

    DATM (``NUS-HPC-AI-Lab/DATM``) initialises the learnable soft labels from a late expert; here the analogue of
    soft labels is the learned similarity. ``pairs`` is the set as a :class:`~repblend_hf.evaluation.PairSet`
    (image-encoder features and text embeddings); the experts are symmetric (two heads, ``config``'s layout).
    """
    if config.matching != "symmetric":
        raise ValueError("similarity_init='expert' reads the two heads of symmetric experts; asymmetric experts "
                         "train the image encoder: use similarity_init='identity'")
    heads = RetrievalHeads(config.image_dim, config.text_dim, config.embed_dim).eval()
    total = 0.0
    for index in trajectories.expert_indices:
        snapshot = trajectories.snapshot(index, epoch)
        for branch, head in heads.branches().items():
            head.load_state_dict(unflatten_parameters(head, snapshot[branch]))
        total = total + relative_similarity(*heads(pairs.image_features, pairs.text_features), config.temperature)
    return total / len(trajectories.expert_indices)
