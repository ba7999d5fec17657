"""The protocol over seeds (:func:`evaluate_pairs`) and modality collapse measured on a set itself.

Its results are the shapes of :mod:`.results`, shared with the fine-tune protocol (:mod:`.finetune`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..features import FeatureSplit
from ..metrics import modality_diagnostics
from ..modeling import RetrievalHeads
from .heads import TrainedHeads, _split_metrics, train_heads
from .pairs import PairSet
from .recipe import EvaluationProtocol, resolve_protocol
from .results import FROZEN_ENCODER, EvaluationResult, seed_result


def evaluate_pairs(
    train: PairSet | FeatureSplit,
    validation: FeatureSplit,
    test: FeatureSplit,
    protocol: EvaluationProtocol | None = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    embed_dim: int,
    device: str | torch.device | None = None,
    progress: bool = False,
    on_trained: Callable[[int, TrainedHeads], None] | None = None,
    **overrides: Any,
) -> EvaluationResult:
    """Run the evaluation protocol over seeds: train heads, select the epoch on validation, report test.

    METHOD.md, "Evaluation protocol", with the honest selection: for each seed, :func:`train_heads`
    (same arguments, see there) evaluates validation and test at every ``eval_epochs`` entry; the
    reported test metrics and the :func:`modality_diagnostics` of the test embeddings are those of
    the epoch with the best validation r_mean. The test-selected numbers (best test r_mean, as the
    released code reports) are kept in ``test_selected_on_test`` for comparison only.

    The recipe is ``protocol`` (default :class:`EvaluationProtocol`) changed by ``overrides`` given as its
    field names. Common calls: a distilled set ``PairSet(feats, text, S, lr_img=η_img, lr_txt=η_txt)`` with
    ``loss="wbce"``; a coreset ``PairSet(*selection.pairs(split))`` with ``loss="infonce", lr=0.1``
    or ``loss="wbce"`` and a smaller lr; full data ``train=train_split, loss="infonce", lr=0.1`` and
    fewer ``epochs``. ``on_trained(seed, trained)`` sees each seed's :class:`TrainedHeads` (e.g. to keep
    its ``final_state``).
    """
    protocol = resolve_protocol(protocol, overrides)
    settings = {
        "embed_dim": embed_dim, **protocol.settings(),
        "use_augmented_views": protocol.use_augmented_views, "seeds": list(seeds),
        "num_train_pairs": len(train) if isinstance(train, PairSet) else train.num_images,
        "train_kind": "pairs" if isinstance(train, PairSet) else "full_split",
        "protocol": FROZEN_ENCODER,
    }
    if isinstance(train, PairSet) and train.stages:  # a set distilled in stages, trained stage by stage
        settings["stages"] = [asdict(stage) for stage in train.stages]
    if not seeds:
        raise ValueError("seeds must name at least one seed")

    def test_callback(epoch: int, heads: RetrievalHeads) -> dict[str, Any]:
        metrics, image_embeds, text_embeds = _split_metrics(heads, test, protocol.temperature)
        return {"test": metrics, "diagnostics": modality_diagnostics(image_embeds, text_embeds)}

    results = []
    for seed in tqdm(seeds, desc="seeds", leave=False, disable=not progress):
        trained = train_heads(train, protocol, embed_dim=embed_dim, validation=validation, callback=test_callback,
                              seed=seed, device=device, progress=progress)
        results.append(seed_result(seed, trained))
        if on_trained is not None:
            on_trained(seed, trained)
    return EvaluationResult(seeds=results, settings=settings)


@dataclass
class ReferenceDiagnostics:
    """Sim / Gap of a set of pairs' own embeddings under one fixed reference model (RepBlend Figs. 1-2).

    METHOD.md, "Diagnostics of modality collapse": the paper measures the intra-modal similarity and
    the modality gap of the *distilled pairs*, not of real data seen through heads trained on them. Here
    the pairs' image-encoder features and text embeddings go through ``heads``, heads trained once on the
    full training data (so every set is seen through the same function), and
    :func:`modality_diagnostics` is taken over the N resulting embeddings. ``real_subset`` holds the
    same numbers for a random real subset of the same size: what an undistilled set looks like.
    """

    heads: RetrievalHeads
    real_subset: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, pairs: PairSet) -> dict[str, float]:
        """``{"sim_image", "sim_text", "gap"}`` of ``pairs`` under the reference heads."""
        was_training = self.heads.training
        self.heads.eval()
        device = next(self.heads.parameters()).device
        try:
            image, text = self.heads(pairs.image_features.to(device), pairs.text_features.to(device))
        finally:
            self.heads.train(was_training)
        return modality_diagnostics(image, text)
