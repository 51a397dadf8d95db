"""dml_bias.transforms.adapt_input_conv: exact RGB weights, unchanged function at init, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch import nn

from dml_bias.transforms import adapt_input_conv


def tiny_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1)).double()


def test_keeps_rgb_weights_and_function() -> None:
    model = tiny_model()
    first, second = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    bias = model[0].bias.detach().clone()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    before = model(x)
    out = adapt_input_conv(model, 4)
    assert out is model
    conv = model[0]
    assert conv.in_channels == 4
    assert conv.weight.shape == (6, 4, 3, 3)
    assert torch.equal(conv.weight[:, :3], first)
    assert bool((conv.weight[:, 3] == 0).all())
    assert torch.equal(conv.bias, bias)
    assert torch.equal(model[2].weight, second)  # only the first conv changes
    extra = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert_close(model(torch.cat([x, extra], dim=1)), before)  # zero weights: the extra channel is ignored
    assert_close(model(torch.cat([x, torch.zeros_like(extra)], dim=1)), before)


def test_mean_init_and_parameter_properties() -> None:
    conv = nn.Conv2d(3, 5, 3, bias=False)
    conv.weight.requires_grad_(False)
    rgb = conv.weight.detach().clone()
    adapt_input_conv(conv, 5, init="mean")
    assert isinstance(conv.weight, nn.Parameter)
    assert not conv.weight.requires_grad
    assert conv.weight.dtype == torch.float32
    assert torch.equal(conv.weight[:, :3], rgb)
    for c in (3, 4):
        assert_close(conv.weight[:, c], rgb.mean(dim=1))
    # a grey input through the mean-initialised channels equals (up to rounding) that grey through RGB
    x = torch.rand(1, 1, 6, 6)
    assert_close(
        nn.functional.conv2d(x.expand(1, 5, 6, 6), conv.weight),
        nn.functional.conv2d(x.expand(1, 3, 6, 6), rgb) * 5 / 3,
        rtol=1e-5,
        atol=1e-5,
    )
    adapt_input_conv(conv, 5)  # same width: a no-op
    assert conv.weight.shape[1] == 5


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"in_channels must be at least .* current 3 input channels, got 2"):
        adapt_input_conv(nn.Conv2d(3, 4, 1), 2)
    with pytest.raises(ValueError, match=r"groups=1 only, got a Conv2d with groups=3"):
        adapt_input_conv(nn.Conv2d(3, 3, 1, groups=3), 4)
    with pytest.raises(ValueError, match=r"holds no torch.nn.Conv2d \(Linear\)"):
        adapt_input_conv(nn.Linear(3, 4), 4)
    with pytest.raises(TypeError, match=r"conv_or_model must be a torch.nn.Module, got str"):
        adapt_input_conv("resnet", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"init must be one of 'zeros', 'mean', got 'random'"):
        adapt_input_conv(nn.Conv2d(3, 4, 1), 4, init="random")  # type: ignore[arg-type]
