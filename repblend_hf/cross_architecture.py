"""Cross-architecture evaluation: a distilled set of pixels under another frozen image encoder.

RepBlend's Table 4 (the authors' ``--transfer``; LoRS's ``evaluate_only.py``): a set distilled with one image
encoder is evaluated with another. The set's images go through the new encoder, fresh heads are trained on them
with the same protocol and seeds, and retrieval is scored on the same test split encoded by that encoder
(``repblend-evaluate --method distilled --image_encoder NAME``). This is where a pixel set earns its keep: a
feature-space set is a set of vectors of its own encoder's feature space and cannot leave it.

Two things must hold for a transfer, checked before anything is encoded (:func:`check_transfer`): the set holds
pixels, and the new encoder takes images of the set's size. The pixels are stored normalised with the source
encoder's mean and std; :func:`transfer_pixels` re-normalises them for the new encoder (a no-op between encoders
that share a normalisation, such as the EfficientNet-Lite family's 0.5 / 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = ["check_transfer", "encoder_input_error", "normalization_of", "transfer_pixels", "encode_set_images"]


def normalization_of(encoder_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a timm image encoder's pixels are normalised with, from its pretrained config (no
    weights are loaded); ImageNet's when the config names none."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = timm.get_pretrained_cfg(encoder_name) if timm.is_model(encoder_name) else None
    mean = getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def encoder_input_error(encoder_name: str, image_size: int) -> str | None:
    """Why the timm model ``encoder_name`` cannot encode ``image_size`` px images into pooled features, or None.

    A randomly initialised copy (no download) encodes one black image: a model with a fixed input size (a ViT's
    patch grid) or a network whose downsampling runs out of pixels fails there, with timm's own message.
    """
    import timm

    if not timm.is_model(encoder_name):
        return f"{encoder_name!r} is not a timm model name"
    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(encoder_name, pretrained=False, num_classes=0).eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size))
    except Exception as err:  # noqa: BLE001 - any failure of the forward is the answer
        return f"{type(err).__name__}: {err}"
    if out.ndim != 2:
        return f"its output for one image has shape {tuple(out.shape)}, not pooled features [1, d]"
    return None


def check_transfer(config: Any, encoder_name: str, image_size: int, where: str = "the set") -> None:
    """Raise ``ValueError`` when a set with RepBlendConfig ``config`` cannot be evaluated under ``encoder_name`` at
    ``image_size`` (the size the real splits are encoded at), saying why and what to set.

    Same encoder and size: nothing to check. A feature-space set only with its own encoder and size. A pixel set:
    the real splits must be encoded at the set's size, and the encoder must take that size.
    """
    same = (encoder_name, image_size) == (config.image_encoder, config.image_size)
    if config.synthetic_space == "features":
        if not same:
            raise ValueError(
                f"{where} is a feature-space set: its images are vectors of {config.image_encoder}'s feature space "
                f"at {config.image_size} px, not pixels, so no other encoder can take them (asked: {encoder_name} at "
                f"{image_size} px). Evaluate it with --image_encoder {config.image_encoder} --image_size "
                f"{config.image_size}, or distil a pixel set (--synthetic_space pixels) to evaluate across encoders")
        return
    if image_size != config.image_size:
        raise ValueError(
            f"{where} holds {config.image_size} px images but the real splits would be encoded at {image_size} px "
            f"(--image_size): the set and the test split must be seen at the same size. Run with --image_size "
            f"{config.image_size}")
    if same:
        return
    why = encoder_input_error(encoder_name, image_size)
    if why is not None:
        raise ValueError(
            f"{where} holds {image_size} px images, which the image encoder {encoder_name} cannot take ({why}). "
            f"Choose an encoder that takes {image_size} px inputs (a convolutional one such as tf_efficientnet_lite1 "
            f"takes any size above its total stride), or distil a set at the size this encoder needs")


def transfer_pixels(pixels: torch.Tensor, source: tuple[Sequence[float], Sequence[float]],
                    target: tuple[Sequence[float], Sequence[float]]) -> torch.Tensor:
    """Pixels normalised with ``source = (mean, std)`` re-normalised with ``target``: ``((x·σ_s + μ_s) − μ_t) / σ_t``
    per channel (the same tensor when both normalisations are equal)."""
    if tuple(source[0]) == tuple(target[0]) and tuple(source[1]) == tuple(target[1]):
        return pixels
    shape = (1, -1, 1, 1)
    mean_s, std_s, mean_t, std_t = (torch.tensor(v, dtype=pixels.dtype, device=pixels.device).view(shape)
                                    for v in (*source, *target))
    return (pixels * std_s + mean_s - mean_t) / std_t


def encode_set_images(pixels: torch.Tensor, source_encoder: str, encoder: nn.Module,
                      batch_size: int = 256) -> torch.Tensor:
    """Features of a set's pixels (normalised for ``source_encoder``) under the frozen ``encoder`` (a
    :class:`~repblend_hf.encoders.FrozenImageEncoder`, whose ``mean`` / ``std`` the pixels are re-normalised to)."""
    target = (encoder.mean, encoder.std) if hasattr(encoder, "mean") else normalization_of(encoder.name)
    pixels = transfer_pixels(pixels.detach(), normalization_of(source_encoder), target)
    with torch.no_grad():
        return torch.cat([encoder(chunk.to(encoder.device)).float().cpu() for chunk in pixels.split(batch_size)])
