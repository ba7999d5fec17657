"""Grouped 2-D convolutions whose second derivative is grouped convolutions too.

LoRS and MTT-VL train the image encoder inside the inner loop, so the meta-gradient differentiates the encoder's
parameter gradients: a double backward through every convolution. ATen's ``_convolution_double_backward`` computes
one of its terms with a loop over the groups, one convolution per group; a depthwise layer of EfficientNet-Lite0
(up to 1,152 groups) becomes hundreds of tiny convolutions. ``speed.py``'s profile of one LoRS iteration (99 pairs,
64 px, 8 inner steps; ``benchmarks/results/speed_lors_profile_epyc.md``) counted 73,888 ``aten::_convolution``
calls for 392 double backwards, and on a GPU each of them is a kernel launch.

:func:`grouped_conv2d` is ``torch.conv2d`` with a hand-written backward whose pieces are single grouped calls
(the input gradient a transposed convolution, the weight gradient an autograd function of its own whose backward
is a transposed and a forward convolution), so its double backward never loops over groups.
:func:`grouped_conv_double_backward` routes every grouped ``conv2d`` made inside it (e.g. a ``functional_call``
of the encoder) through it; ungrouped convolutions keep ATen's path, which has no such loop, and so does
everything under autocast (see :func:`grouped_conv2d`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

__all__ = ["grouped_conv2d", "grouped_conv_double_backward"]


def _input_grad(grad_out: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size, stride, padding, dilation,
                groups: int) -> torch.Tensor:
    """The input gradient of a convolution: the transposed convolution of ``grad_out`` (one grouped call)."""
    output_padding = [input_shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                            + dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in range(2)]
    return F.conv_transpose2d(grad_out, weight, None, stride, padding, output_padding, groups, dilation)


class _WeightGrad(torch.autograd.Function):
    """The weight gradient of a convolution of ``x`` against ``grad_out``, differentiable by grouped calls."""

    @staticmethod
    def forward(ctx, x, grad_out, weight_shape, stride, padding, dilation, groups):
        ctx.save_for_backward(x, grad_out)
        ctx.conf = (stride, padding, dilation, groups)
        return torch.nn.grad.conv2d_weight(x, weight_shape, grad_out, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gg):
        x, grad_out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = ggo = None
        if ctx.needs_input_grad[0]:  # <gg, W(x, go)> is linear in x: the input gradient of go through weight gg
            gx = _input_grad(grad_out, gg, x.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:  # ... and linear in go: the convolution of x with weight gg
            ggo = torch.conv2d(x, gg, None, stride, padding, dilation, groups)
        return gx, ggo, None, None, None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return torch.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _input_grad(grad_out, weight, x.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = _WeightGrad.apply(x, grad_out, weight.shape, stride, padding, dilation, groups)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                   dilation=1, groups: int = 1) -> torch.Tensor:
    """``torch.conv2d`` (batched 4-D input, numeric padding) whose double backward has no per-group loop.

    Under autocast it is ``torch.conv2d`` itself: the hand-written backward is checked in float32 and float64
    only (a bfloat16 trial on the CPU was less accurate than ATen's path), so mixed precision keeps ATen's double
    backward until it is measured on a GPU.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _Conv2d.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)


def _routed(args, kwargs) -> tuple | None:
    """The arguments of a ``conv2d`` call that :func:`grouped_conv2d` takes, or None for ATen's own path."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args), **kwargs)
    if set(bound) - set(names) or "input" not in bound or "weight" not in bound:
        return None
    x, groups, padding = bound["input"], bound.get("groups", 1), bound.get("padding", 0)
    if groups == 1 or x.dim() != 4 or isinstance(padding, str):  # ungrouped: ATen's double backward is fine
        return None
    return (x, bound["weight"], bound.get("bias"), bound.get("stride", 1), padding, bound.get("dilation", 1), groups)


class grouped_conv_double_backward(TorchFunctionMode):  # noqa: N801 (used as a context manager, like no_grad)
    """Inside this context every grouped ``torch.conv2d`` / ``F.conv2d`` call goes through :func:`grouped_conv2d`.

    The graph keeps the substitution after the context exits: backward and double backward of the recorded
    convolutions use its grouped calls.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.conv2d:
            routed = _routed(args, kwargs or {})
            if routed is not None:
                return grouped_conv2d(*routed)
        return func(*args, **(kwargs or {}))
