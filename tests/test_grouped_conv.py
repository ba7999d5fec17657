"""grouped_conv2d: torch.conv2d with a double backward made of grouped calls (no per-group loop)."""

import pytest
import torch
import torch.nn.functional as F

from repblend_hf.grouped_conv import grouped_conv2d, grouped_conv_double_backward

CONFIGS = [  # groups, in channels, out channels, stride, padding, dilation, bias
    (4, 4, 4, 2, 1, 1, False),  # depthwise, strided
    (2, 4, 6, 1, 2, 2, True),  # grouped, dilated, with a bias
    (1, 3, 5, 2, 0, 1, True),  # ungrouped
    (3, 3, 3, (2, 1), (0, 1), 1, False),  # anisotropic stride and padding, odd input size below
]


@pytest.mark.parametrize(("groups", "cin", "cout", "stride", "padding", "dilation", "bias"), CONFIGS)
def test_first_and_second_derivatives_are_exact(groups, cin, cout, stride, padding, dilation, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, 7, 6, dtype=torch.double, generator=g, requires_grad=True)
    w = torch.randn(cout, cin // groups, 3, 3, dtype=torch.double, generator=g, requires_grad=True)
    b = torch.randn(cout, dtype=torch.double, generator=g, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def conv(x, w, b=None):
        return grouped_conv2d(x, w, b, stride, padding, dilation, groups)

    torch.testing.assert_close(conv(*inputs), F.conv2d(x, w, b, stride, padding, dilation, groups))
    assert torch.autograd.gradcheck(conv, inputs)
    assert torch.autograd.gradgradcheck(conv, inputs)


def test_the_meta_gradient_pattern_equals_aten_and_has_no_per_group_loop():
    """d/dx of <d loss / d w, c> through two depthwise layers (the inner loop's double backward), against ATen's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 9, 9, generator=g, requires_grad=True)
    w = torch.randn(16, 1, 3, 3, generator=g, requires_grad=True)
    c = torch.randn(16, 1, 3, 3, generator=g)
    out, calls = {}, {}
    for name, conv in (("aten", F.conv2d), ("grouped", grouped_conv2d)):
        with torch.profiler.profile() as prof:
            h = conv(torch.relu(conv(x, w, None, 1, 1, 1, 16)), w, None, 2, 1, 1, 16)
            (gw,) = torch.autograd.grad(h.pow(2).sum(), w, create_graph=True)
            (out[name],) = torch.autograd.grad(gw, x, grad_outputs=c)
        calls[name] = sum(e.count for e in prof.key_averages() if e.key == "aten::_convolution")
    torch.testing.assert_close(out["grouped"], out["aten"])
    assert calls["aten"] > 16 > calls["grouped"]  # ATen loops over the 16 groups in its double backward


def test_the_context_routes_grouped_convolutions_only():
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    depthwise, dense = torch.randn(4, 1, 3, 3), torch.randn(2, 4, 3, 3)
    with grouped_conv_double_backward():
        routed = F.conv2d(x, depthwise, groups=4, padding=1)
        by_keyword = torch.conv2d(input=x, weight=depthwise, groups=4)
        ungrouped = F.conv2d(x, dense)
        named_padding = F.conv2d(x, depthwise, groups=4, padding="same")
    outside = F.conv2d(x, depthwise, groups=4)
    with grouped_conv_double_backward(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = F.conv2d(x, depthwise, groups=4)  # mixed precision keeps ATen's path (grouped_conv2d's docstring)
    assert type(mixed.grad_fn).__name__ != "_Conv2dBackward" and mixed.dtype == torch.bfloat16
    assert type(routed.grad_fn).__name__ == type(by_keyword.grad_fn).__name__ == "_Conv2dBackward"
    assert type(ungrouped.grad_fn).__name__ == "ConvolutionBackward0"
    assert type(named_padding.grad_fn).__name__ == "ConvolutionBackward0"  # string padding keeps ATen's path
    assert type(outside.grad_fn).__name__ == "ConvolutionBackward0"
    torch.testing.assert_close(by_keyword, F.conv2d(x, depthwise, groups=4))
