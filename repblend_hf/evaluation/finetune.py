"""The asymmetric methods' own protocol (LoRS, MTT-VL): the image encoder fine-tuned on the set's pixels.

Their ``epoch.py``: a fresh text head (and, as an ablation, an image head) trained with the image encoder on the
set as a :class:`PixelPairSet`; the real splits are :class:`ImageSplit` (images plus the encoder's eval
transform, and the cached caption features). ``settings["protocol"] = "finetune_encoder"``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..metrics import METRIC_NAMES, modality_diagnostics, retrieval_metrics
from ..modeling import RetrievalHeads, similarity_logits
from .heads import _LOSSES, _batch_loss, _resolve_lrs, _resolve_schedule
from .pairs import ImageSplit, PixelPairSet
from .recipe import EvaluationProtocol, resolve_protocol
from .results import FINETUNE_ENCODER, EvaluationResult, seed_result


@dataclass
class FinetunedModel:
    """What :func:`finetune_image_encoder` returns (the fields of :class:`TrainedHeads`, plus the encoder).

    ``image_encoder`` and ``heads`` hold the best-by-validation state (else the final one), in eval mode;
    ``heads.image_head`` is an ``nn.Identity`` unless an image head was trained.
    """

    image_encoder: torch.nn.Module
    heads: RetrievalHeads
    best_epoch: int
    history: list[dict[str, Any]]
    train_loss: list[float]
    diverged_epoch: int | None = None


def _encoder_network(image_encoder: torch.nn.Module) -> torch.nn.Module:
    """The network to copy: a FrozenImageEncoder's unfolded ``model`` (what the experts and the student train)."""
    return getattr(image_encoder, "model", image_encoder)


@torch.no_grad()
def embed_image_split(image_encoder: torch.nn.Module, heads: RetrievalHeads, split: ImageSplit, *,
                      batch_size: int = 256, chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of a split for a model whose image encoder is trained: ``(image [M, d], text [C, d])``.

    Images go through ``image_encoder`` (in batches of ``batch_size``, without gradients) and then
    ``heads.image_head`` (the identity for the released asymmetric student); captions are the cached caption
    features through ``heads.text_head``. Both modules are run in eval mode and their modes restored.
    """
    modes = image_encoder.training, heads.training
    image_encoder.eval()
    heads.eval()
    device = next(heads.text_head.parameters()).device
    try:
        pixels = split.pixels()
        feats = torch.cat([image_encoder(pixels[i:i + batch_size].to(device)).float()
                           for i in range(0, len(pixels), batch_size)])
        images = heads.image_head(feats)
        captions = split.features.caption_features
        texts = torch.cat([heads.text_head(captions[i:i + chunk_size].to(device).float())
                           for i in range(0, len(captions), chunk_size)])
        return images, texts
    finally:
        image_encoder.train(modes[0])
        heads.train(modes[1])


def _image_split_metrics(image_encoder, heads, split: ImageSplit, temperature: float, batch_size: int):
    image_embeds, text_embeds = embed_image_split(image_encoder, heads, split, batch_size=batch_size)
    if not (bool(torch.isfinite(image_embeds).all()) and bool(torch.isfinite(text_embeds).all())):
        return dict.fromkeys(METRIC_NAMES, 0.0), image_embeds, text_embeds
    scores = similarity_logits(image_embeds, text_embeds, temperature)
    return retrieval_metrics(scores, split.features.caption_to_image), image_embeds, text_embeds


def finetune_image_encoder(
    train: PixelPairSet,
    image_encoder: torch.nn.Module,
    protocol: EvaluationProtocol | None = None,
    *,
    embed_dim: int | None = None,
    image_head: bool = False,
    validation: ImageSplit | None = None,
    callback: Callable[[int, torch.nn.Module, RetrievalHeads], dict[str, Any] | None] | None = None,
    encode_batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    **overrides: Any,
) -> FinetunedModel:
    """Fine-tune a copy of the image encoder and a fresh text head on a set of pixel pairs (LoRS / MTT-VL).

    The asymmetric methods' own evaluation protocol, as their released ``epoch.py`` runs it
    (``evaluate_synset_with_similarity``, LoRS Algorithm 2): a *trainable copy* of ``image_encoder`` (a
    FrozenImageEncoder, whose unfolded ``model`` is copied, or any module mapping pixels to features; the
    original is not changed) and a fresh text head (and a fresh image head only with ``image_head=True``, the
    ablation's layout) are trained on ``train``'s pixels and text embeddings with ``protocol`` (default
    :class:`EvaluationProtocol`, changed by ``overrides`` given as its field names): SGD, momentum 0.9, weight
    decay 5e-4, the encoder (and image head) at ``lr_img`` and the text head at ``lr_txt`` (default: the set's
    learned η; ``lr`` sets both), ×0.1 from ``decay_epoch`` (default ``epochs // 2 + 1``), batch 128, wBCE
    against ``S[I][:, I]`` (identity when S is None) or InfoNCE, logits = cosine / ``temperature``. Without an
    image head the image embedding is the encoder's pooled feature, so ``embed_dim`` (default) is its width.

    BatchNorm: the encoder copy runs in **eval mode** throughout, i.e. with the pretrained running statistics
    (not updated) while its convolutions and BatchNorm affine weights are trained, and without its dropout /
    drop-path. That is the function the experts trained (``ExpertModel.train``) and the distillation student
    unrolled, so the pixels are judged by the model they were optimised for; training-mode BatchNorm would
    replace the pretrained statistics with those of ≤ 128 synthetic images. The released code calls
    ``net.train()``, which for its NFNet encoder (no BatchNorm, no drop-path by default) is the same function.
    The heads' dropout is active while training, as there.

    Evaluation epochs, the ``callback(epoch, image_encoder, heads)`` and the best-by-validation selection work as
    in :func:`train_heads`; ``validation`` is an :class:`ImageSplit` whose images are encoded by the encoder
    being trained (``encode_batch_size`` at a time, without gradients). Randomness comes from ``seed`` only; the
    global RNG state is restored afterwards.
    """
    protocol = resolve_protocol(protocol, overrides)
    loss, epochs, batch_size, temperature = protocol.loss, protocol.epochs, protocol.batch_size, protocol.temperature
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {list(_LOSSES)}, got {loss!r}")
    if not isinstance(train, PixelPairSet):
        raise TypeError(f"train must be a PixelPairSet (the set's pixels), got {type(train).__name__}")
    if train.similarity is not None and loss == "infonce":
        raise ValueError("the PixelPairSet has a soft similarity S but loss='infonce' ignores it; use loss='wbce' "
                         "or drop the similarity")
    if epochs < 0 or batch_size < 1 or encode_batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch sizes >= 1, got {epochs}, {batch_size}, {encode_batch_size}")
    lr_img, lr_txt, decay_epoch, eval_epochs = _resolve_schedule(train, protocol)
    device = torch.device(train.pixel_values.device if device is None else device)
    pixels, texts = train.pixel_values.to(device), train.text_features.to(device)
    similarity = None if train.similarity is None else train.similarity.to(device)
    generator = torch.Generator().manual_seed(seed)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        encoder = copy.deepcopy(_encoder_network(image_encoder)).to(device).eval()
        for p in encoder.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            feature_dim = encoder(pixels[:1]).shape[-1]
        embed_dim = feature_dim if embed_dim is None else embed_dim
        heads = RetrievalHeads(feature_dim, texts.shape[-1], embed_dim, dropout=protocol.dropout,
                               image_head=image_head).to(device)
        optimizer = torch.optim.SGD(
            [{"params": [*encoder.parameters(), *heads.image_head.parameters()], "lr": lr_img},
             {"params": heads.text_head.parameters(), "lr": lr_txt}],
            lr=lr_img, momentum=protocol.momentum, weight_decay=protocol.weight_decay,
        )
        base_lrs = [lr_img, lr_txt]

        history: list[dict[str, Any]] = []
        train_loss: list[float] = []
        best_score, best_epoch, best_state = float("-inf"), epochs, None
        diverged_epoch = None

        def evaluate(epoch: int) -> None:
            nonlocal best_score, best_epoch, best_state
            entry: dict[str, Any] = {"epoch": epoch, "validation": None}
            if validation is not None:
                entry["validation"] = _image_split_metrics(encoder, heads, validation, temperature,
                                                           encode_batch_size)[0]
                if entry["validation"]["r_mean"] > best_score:
                    best_score, best_epoch = entry["validation"]["r_mean"], epoch
                    best_state = (copy.deepcopy(encoder.state_dict()), copy.deepcopy(heads.state_dict()))
            if callback is not None:
                entry.update(callback(epoch, encoder, heads) or {})
            history.append(entry)

        if 0 in eval_epochs:
            evaluate(0)
        for epoch in tqdm(range(1, epochs + 1), desc="fine-tune encoder", leave=False, disable=not progress):
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * (0.1 if epoch >= decay_epoch else 1.0)
            if diverged_epoch is None:
                heads.train()
                encoder.eval()  # BatchNorm statistics stay the pretrained ones (see the docstring)
                total, count = 0.0, 0
                order = torch.randperm(len(train), generator=generator).to(device)
                for start in range(0, len(train), batch_size):
                    idx = order[start:start + batch_size]
                    logits = similarity_logits(*heads(encoder(pixels[idx]), texts[idx]), temperature)
                    targets = None if similarity is None else similarity[idx][:, idx]
                    batch_loss = _batch_loss(loss, logits, targets)
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss.backward()
                    optimizer.step()
                    total += float(batch_loss.detach()) * len(idx)
                    count += len(idx)
                train_loss.append(total / max(count, 1))
                if not np.isfinite(train_loss[-1]):
                    diverged_epoch = epoch
                    warnings.warn(f"encoder fine-tuning diverged at epoch {epoch} (loss {train_loss[-1]}); lr_img="
                                  f"{lr_img}, lr_txt={lr_txt} are too large. Training stops; later evaluations "
                                  "score 0.", RuntimeWarning, stacklevel=2)
            if epoch in eval_epochs:
                evaluate(epoch)

    if best_state is not None:
        encoder.load_state_dict(best_state[0])
        heads.load_state_dict(best_state[1])
    encoder.eval()
    heads.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return FinetunedModel(image_encoder=encoder, heads=heads,
                          best_epoch=best_epoch if validation is not None else epochs, history=history,
                          train_loss=train_loss, diverged_epoch=diverged_epoch)


def evaluate_finetuned(
    train: PixelPairSet,
    image_encoder: torch.nn.Module,
    validation: ImageSplit,
    test: ImageSplit,
    protocol: EvaluationProtocol | None = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    embed_dim: int | None = None,
    image_head: bool = False,
    encode_batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
    **overrides: Any,
) -> EvaluationResult:
    """The asymmetric methods' own protocol over seeds: fine-tune encoder + text head, select on validation.

    :func:`finetune_image_encoder` per seed (same arguments, see there), scored on ``validation`` and ``test``
    (:class:`ImageSplit`: image embeddings are the fine-tuned encoder's features of the split's images, text
    embeddings the text head on the cached caption features) at every ``eval_epochs`` entry; the reported
    numbers are those of the best validation epoch, in the same :class:`EvaluationResult` shape as
    :func:`evaluate_pairs`, with ``settings["protocol"] = "finetune_encoder"``. Call it with a distilled set's
    ``PixelPairSet(syn.images, syn.text_embeddings, S, lr_img=η_img, lr_txt=η_txt)`` and the frozen encoder it
    was distilled with.
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    protocol = resolve_protocol(protocol, overrides)
    settings = {
        "protocol": FINETUNE_ENCODER, "image_head": image_head, "encoder_batchnorm": "eval (pretrained statistics)",
        "embed_dim": embed_dim, **protocol.settings(), "seeds": list(seeds),
        "num_train_pairs": len(train), "train_kind": "pixels",
    }
    # The learning rates actually used (the set's learned η unless lr / lr_img / lr_txt were given).
    settings["encoder_lr"], settings["text_head_lr"] = _resolve_lrs(train, protocol.lr, protocol.lr_img,
                                                                    protocol.lr_txt)

    def test_callback(epoch: int, encoder: torch.nn.Module, heads: RetrievalHeads) -> dict[str, Any]:
        metrics, image_embeds, text_embeds = _image_split_metrics(encoder, heads, test, protocol.temperature,
                                                                  encode_batch_size)
        return {"test": metrics, "diagnostics": modality_diagnostics(image_embeds, text_embeds)}

    results = []
    for seed in tqdm(seeds, desc="seeds", leave=False, disable=not progress):
        trained = finetune_image_encoder(
            train, image_encoder, protocol, embed_dim=embed_dim, image_head=image_head, validation=validation,
            callback=test_callback, encode_batch_size=encode_batch_size, seed=seed, device=device, progress=progress,
        )
        settings["embed_dim"] = trained.heads.text_head.fc.out_features  # resolved (the encoder's width by default)
        results.append(seed_result(seed, trained))
    return EvaluationResult(seeds=results, settings=settings)
