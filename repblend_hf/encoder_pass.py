"""The synthetic images' pass through the frozen image encoder in one distillation iteration.

DESIGN.md, "Where the speed comes from": :class:`EncoderPass` turns the touched synthetic images into the leaf the
inner loop differentiates (their features, computed once; or the pixels themselves when the student trains the
encoder) and carries that leaf's gradient back to the images; :class:`EncoderPassCounter` counts the images
through the encoder. Both are also importable from :mod:`repblend_hf.encoders`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn
from torch.profiler import record_function

__all__ = ["EncoderPass", "EncoderPassCounter", "available_memory", "AUTO_CHUNK", "CPU_UNCHUNKED_MAX_PIXELS"]

logger = logging.getLogger(__name__)


class EncoderPassCounter:
    """Counts images through a module's forward, and images whose output receives a gradient (its backward).

    A forward hook on ``module`` (the :class:`~repblend_hf.encoders.FrozenImageEncoder` a pixel set runs through, or
    the ``model`` that asymmetric matching unrolls); a backward is an output that receives a gradient, so a double
    backward through the same output (TESLA's recomputation) counts as one. :meth:`remove` detaches it.
    """

    def __init__(self, module: nn.Module):
        self.counts = {"forward": 0, "backward": 0}
        self.handle = module.register_forward_hook(self._forward)
        self.counting = True

    @contextlib.contextmanager
    def paused(self):
        """Passes inside this block are not counted (e.g. the automatic mode's one-off memory probe)."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def _forward(self, module, inputs, output) -> None:
        if not self.counting:
            return
        rows = len(output)
        self.counts["forward"] += rows
        if output.requires_grad:
            output.register_hook(lambda grad: self._backward(rows))

    def _backward(self, rows: int) -> None:
        self.counts["backward"] += rows

    def remove(self) -> None:
        self.handle.remove()


# The automatic encoder pass (EncoderPass.plan): one graph up to this many touched pixels (images x height x width) on
# a CPU, else chunks. 160 images of 64 px: one graph and chunks of 20 measured level at 64 px (N 99-999), chunks of 20
# 1.28x faster at 128 px and 2.0x at 224 px with 97 images (benchmarks/results/speed_v4_64px.md, speed_v4_128_224px.md,
# the floor's per-batch times; 2 threads, idle machine).
CPU_UNCHUNKED_MAX_PIXELS = 160 * 64 * 64
AUTO_CHUNK = 20


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


class _PerStepEncoder(nn.Module):
    """The frozen encoder called inside each inner step (the authors' design) as the student's image encoder.

    It registers no parameters of its own, so the student's image branch stays the head alone.
    """

    def __init__(self, encode):
        super().__init__()
        self.__dict__["encode"] = encode  # not a submodule: the encoder's frozen weights are not student parameters

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode(pixels)


class EncoderPass:
    """How one distillation iteration's synthetic images reach the student, and their gradient back.

    DESIGN.md, "Where the speed comes from". :meth:`forward` turns the touched images into the leaf the inner loop
    differentiates, and :meth:`backward` carries that leaf's gradient back to the images. The mode follows from
    the set and the run:

    - ``"features"``: a feature-space set; its images are encoder features already, nothing runs;
    - ``"once"``: symmetric matching: the frozen encoder (in eval mode, so a fixed function of the pixels) runs
      once on the touched images, the inner loop works on their features, and one backward carries the summed
      feature gradient to the pixels, in one graph (``chunk_size`` 0), chunk by chunk keeping every chunk's graph
      (``recompute=False``), or chunk by chunk recomputing each chunk's forward in the backward (memory of one
      chunk, one more forward per image);
    - ``"per_step"``: the encoder runs inside every inner step, as the authors' code does
      (:attr:`student_encoder`): the same gradient with more encoder work;
    - ``"unrolled"``: asymmetric matching (LoRS / MTT-VL): the student trains the encoder itself, so its
      ``model`` is the student's image encoder and the pixels are the leaf.

    ``chunk_size=-1`` (the default of the scripts) chooses for every call from the number of touched images, the
    device and the memory available (:meth:`plan`): one graph; on a CPU above :data:`CPU_UNCHUNKED_MAX_PIXELS`
    touched pixels, chunks of :data:`AUTO_CHUNK` with their graphs kept (faster per image there); chunks recomputed
    when keeping the graphs would take more than half of the memory available.

    With ``fold_batchnorm`` the symmetric modes run the encoder's eval-mode BatchNorms folded into its convolutions
    (:meth:`~repblend_hf.encoders.FrozenImageEncoder.fold_batchnorm_`, ``encoder`` being a
    :class:`~repblend_hf.encoders.FrozenImageEncoder`); asymmetric matching trains the encoder and never folds.
    ``bf16`` runs the frozen encoder under bf16 autocast (features come back as float32). :attr:`passes` counts the
    images through the encoder (:class:`EncoderPassCounter`).
    """

    def __init__(self, encoder: nn.Module, *, synthetic_space: str = "pixels", matching: str = "symmetric",
                 chunk_size: int = 0, recompute: bool = True, per_step: bool = False, fold_batchnorm: bool = True,
                 bf16: bool = False):
        if chunk_size < -1:
            raise ValueError(f"chunk_size must be -1 (auto), 0 (one graph) or > 0, got {chunk_size}")
        self.encoder, self.chunk_size, self.recompute, self.bf16 = encoder, chunk_size, recompute, bf16
        self.auto = chunk_size == -1
        self._bytes_per_image: int | None = None  # the graph one image keeps (auto mode, measured once)
        self._logged_plan: tuple | None = None
        if matching == "asymmetric":
            self.mode = "unrolled"
        elif synthetic_space == "features":
            self.mode = "features"
        else:
            self.mode = "per_step" if per_step else "once"
        # A feature-space set never goes through the encoder: nothing to fold (and no log line saying otherwise).
        if fold_batchnorm and self.mode in ("once", "per_step") and hasattr(encoder, "fold_batchnorm_"):
            folded = encoder.fold_batchnorm_()
            logger.info("the synthetic-pixel passes use the encoder with %d BatchNorms folded into its convolutions",
                        folded)
        counted = encoder.model if self.mode == "unrolled" else encoder
        self._counter = EncoderPassCounter(counted)
        self.student_encoder: nn.Module | None = {"unrolled": getattr(encoder, "model", None),
                                                  "per_step": _PerStepEncoder(self.encode)}.get(self.mode)

    @property
    def passes(self) -> dict[str, int]:
        """Images through the encoder's forward and images whose encoder output got a gradient, so far."""
        return self._counter.counts

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's features of ``pixels`` (float32; under bf16 autocast when asked)."""
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.encoder(pixels).float()

    def graph_bytes_per_image(self, images: torch.Tensor) -> int:
        """Bytes the encoder's autograd graph saves per image (measured once with saved-tensor hooks, then cached).

        The difference between the graphs of two images and of one: what the graph saves once whatever the batch
        (the frozen weights a convolution keeps for the input gradient) cancels out.
        """
        if self._bytes_per_image is None:

            def saved_bytes(batch: torch.Tensor) -> int:
                saved = []

                def pack(t):
                    saved.append(t.numel() * t.element_size())
                    return t

                leaf = batch.detach().requires_grad_(True)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    self.encode(leaf)
                return sum(saved)

            one = images[:1]
            two = images[:2] if len(images) > 1 else torch.cat([one, one])
            with self._counter.paused():  # a probe, not a pass of the iteration
                self._bytes_per_image = max(0, int(saved_bytes(two) - saved_bytes(one)))
        return self._bytes_per_image

    def plan(self, images: torch.Tensor) -> tuple[int, bool]:
        """``(chunk_size, recompute)`` for this call: the run's own settings, or the automatic choice.

        The automatic choice follows ``benchmarks/results/speed_v4_*.md`` (EfficientNet-Lite0, 2-core CPU): one graph
        up to :data:`CPU_UNCHUNKED_MAX_PIXELS` touched pixels (160 images of 64 px), where it and chunks of 20 are
        level; above, chunks of 20 with graphs kept (1.28x faster at 128 px, 2.0x at 224 px); on a GPU one graph.
        Recomputing chunks holds memory at one chunk's graph for 1.25–1.8x the time, so it is chosen only when the
        kept graphs would not fit in half of the memory available now.
        """
        if not self.auto:
            return self.chunk_size, self.recompute
        n = len(images)
        kept = self.graph_bytes_per_image(images) * n
        available = available_memory(images.device)
        if kept > available / 2:
            chunk, recompute = min(AUTO_CHUNK, n), True
        elif images.device.type == "cpu" and n * images.shape[-2] * images.shape[-1] > CPU_UNCHUNKED_MAX_PIXELS:
            chunk, recompute = AUTO_CHUNK, False
        else:
            chunk, recompute = 0, False
        if self._logged_plan != (chunk, recompute):
            self._logged_plan = (chunk, recompute)
            logger.info("encoder pass (auto): %d touched images, graphs %.0f MB of %.0f MB available: %s", n,
                        kept / 2**20, available / 2**20, "one graph" if not chunk else
                        f"chunks of {chunk}, {'recomputed' if recompute else 'graphs kept'}")
        return chunk, recompute

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """The inner loop's image leaf for the touched ``images`` (detached), and what :meth:`backward` needs."""
        if self.mode != "once":
            return images.requires_grad_(True), None
        chunk_size, recompute = self.plan(images)
        with record_function("repblend:encoder_forward"):
            if chunk_size and recompute:
                with torch.no_grad():
                    feats = torch.cat([self.encode(c) for c in images.split(chunk_size)])
                pixel_leaf = None
            else:  # one graph over the touched images, built chunk by chunk when asked
                pixel_leaf = images.requires_grad_(True)
                chunks = pixel_leaf.split(chunk_size) if chunk_size else [pixel_leaf]
                feats = torch.cat([self.encode(c) for c in chunks])
        return feats.detach().requires_grad_(True), (images, pixel_leaf, feats, chunk_size)

    def backward(self, state: tuple | None, grad: torch.Tensor) -> torch.Tensor:
        """The images' gradient from the leaf's: ``(∂ features / ∂ pixels)ᵀ grad``, one backward through the encoder.
        """
        if state is None:
            return grad
        images, pixel_leaf, feats, chunk_size = state
        with record_function("repblend:pixel_backward"):
            if pixel_leaf is not None:
                return torch.autograd.grad(feats, pixel_leaf, grad)[0]
            out = []
            for chunk, g_chunk in zip(images.split(chunk_size), grad.split(chunk_size)):
                leaf = chunk.detach().requires_grad_(True)
                out.append(torch.autograd.grad(self.encode(leaf), leaf, g_chunk)[0])
            return torch.cat(out)
