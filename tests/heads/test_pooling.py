"""GeM pooling: closed forms (p = 1, large p), a hand-computed case, gradients, precision, module == functional."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, gradcheck
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.heads import GeM, gem


def slow_gem(x: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """Reference: a float64 loop over samples and channels, straight from the formula."""
    x = x.detach().double()
    out = torch.empty(x.shape[:2], dtype=torch.float64)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            values = [max(float(v), eps) ** p for v in x[n, c].flatten()]
            out[n, c] = (sum(values) / len(values)) ** (1.0 / p)
    return out


# --------------------------------------------------------------------------------------------------- values


def test_p_one_is_average_pooling() -> None:
    x = torch.rand(3, 5, 4, 6) + 0.01
    assert_close(gem(x, p=1.0), torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def test_large_p_approaches_max_pooling_within_the_power_mean_bound() -> None:
    # For p > 0: max * (1 / HW)^(1/p) <= GeM_p <= max (the max term alone, or every term equal to the max).
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 10 + 0.1
    p = 100.0
    pooled = gem(x, p=p)
    peak = x.amax(dim=(2, 3))
    lower = peak * (1.0 / 16) ** (1.0 / p)  # 0.9727 * max
    assert bool((pooled <= peak * (1 + 1e-12)).all())
    assert bool((pooled >= lower).all())
    assert_close(pooled, slow_gem(x, p, 1e-6))
    # and it moves towards the max as p grows
    assert bool((gem(x, p=1000.0) >= pooled).all())
    assert_close(gem(x, p=1000.0), peak, rtol=3e-3, atol=0.0)


def test_hand_computed_case_with_clamping() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [2.0, 0.0]]]], dtype=torch.float64)
    expected = torch.tensor([[(100.0 / 4) ** (1 / 3), ((3 * 1e-6**3 + 8.0) / 4) ** (1 / 3)]], dtype=torch.float64)
    assert_close(gem(x, p=3.0), expected)
    # a larger eps is visible: max(x, 0.5) for the second channel is [0.5, 0.5, 2, 0.5]
    assert_close(gem(x, p=2.0, eps=0.5)[0, 1], torch.tensor(math.sqrt((3 * 0.25 + 4.0) / 4), dtype=torch.float64))


def test_matches_the_slow_reference_for_random_maps() -> None:
    x = torch.randn(2, 4, 3, 5)
    for p in (0.5, 2.0, 3.0, 7.5):
        assert_close(gem(x, p=p, eps=1e-3), slow_gem(x, p, 1e-3).float(), rtol=1e-5, atol=1e-6)


def test_values_far_above_one_with_large_p_do_not_overflow_float32() -> None:
    x = torch.rand(2, 3, 5, 5) * 1e3 + 1.0  # x^60 overflows float32 (max 3.4e38) for x > 4.4
    pooled = gem(x, p=60.0)
    assert bool(torch.isfinite(pooled).all())
    assert_close(pooled, slow_gem(x, 60.0, 1e-6).float())


def test_tensor_p_matches_float_p() -> None:
    x = torch.rand(2, 3, 4, 4)
    assert_close(gem(x, torch.tensor(2.5)), gem(x, 2.5))
    assert_close(gem(x, torch.tensor([2.5], dtype=torch.float64)), gem(x.double(), 2.5))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(min_value=-5.0, max_value=50.0, allow_nan=False), min_size=6, max_size=6),
    st.floats(min_value=0.2, max_value=20.0),
    st.floats(min_value=0.2, max_value=20.0),
)
def test_power_mean_is_monotone_in_p_and_bounded_by_the_max(values: list[float], p1: float, p2: float) -> None:
    x = torch.tensor(values, dtype=torch.float64).reshape(1, 1, 2, 3)
    low, high = sorted((p1, p2))
    a, b = float(gem(x, low)), float(gem(x, high))
    peak = max(max(values), 1e-6)
    assert a <= b * (1 + 1e-9)
    assert b <= peak * (1 + 1e-9)
    if low >= 1.0:  # the power mean of order >= 1 is at least the arithmetic mean of the clamped values
        assert a >= sum(max(v, 1e-6) for v in values) / 6 * (1 - 1e-9)


# --------------------------------------------------------------------------------------------------- gradients


def test_gradcheck_wrt_x_and_p() -> None:
    x = torch.rand(2, 3, 3, 4) + 0.2  # away from the eps clamp, no ties at the max
    p = torch.tensor([2.7])
    assert gradcheck(lambda a, b: gem(a, b), [x, p])


def test_gradcheck_through_the_learnable_module() -> None:
    pool = GeM(p=3.0, learnable=True, dtype=torch.float64)
    x = (torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.2).requires_grad_(True)
    assert torch.autograd.gradcheck(pool, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    pool(x).sum().backward()
    assert pool.p.grad is not None
    # d/dp of a power mean is positive unless all values are equal
    assert float(pool.p.grad) > 0


def test_gradient_of_x_matches_the_closed_form() -> None:
    # d f / d x_k = (1/HW) x_k^(p-1) f^(1-p) for x_k > eps.
    x = (torch.rand(1, 1, 3, 3, dtype=torch.float64) + 0.5).requires_grad_(True)
    f = gem(x, p=3.0)
    (grad,) = torch.autograd.grad(f.sum(), x)
    assert_close(grad, x.detach() ** 2 * f.detach().reshape(1, 1, 1, 1) ** -2 / 9)


# --------------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_whose_cube_overflows_fp16_stays_finite(dtype: torch.dtype) -> None:
    x = (torch.rand(2, 4, 5, 5) * 60 + 40).to(dtype)  # 40..100: x^3 up to 1e6 > 65504
    assert not bool(torch.isfinite(x.float().pow(3).to(torch.float16)).all())  # a naive fp16 cube overflows
    pooled = gem(x, p=3.0)
    assert pooled.dtype == dtype
    assert bool(torch.isfinite(pooled).all())
    exact = slow_gem(x.float(), 3.0, 1e-6)  # the same (rounded) inputs in float64
    assert_close(pooled.double(), exact, rtol=torch.finfo(dtype).eps, atol=0.0)  # only the final rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_under_autocast_the_math_runs_in_float32(dtype: torch.dtype) -> None:
    x32 = torch.rand(2, 4, 5, 5) * 60 + 40
    with torch.autocast("cpu", dtype=dtype):
        from_float32 = gem(x32, p=3.0)
        from_half = gem(x32.to(dtype), p=3.0)
        pool = GeM(learnable=True)
        from_module = pool(x32.to(dtype))
    assert from_float32.dtype == torch.float32  # the input's dtype, not autocast's
    assert_close(from_float32, gem(x32, p=3.0))
    assert from_half.dtype == dtype
    assert bool(torch.isfinite(from_half).all())
    assert_close(from_half.double(), slow_gem(x32.to(dtype).float(), 3.0, 1e-6), rtol=torch.finfo(dtype).eps, atol=0)
    assert_close(from_module, from_half)


def test_float64_stays_float64() -> None:
    x = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    assert gem(x).dtype == torch.float64
    assert GeM(learnable=True)(x).dtype == torch.float64  # a float32 p does not lower the precision


@pytest.mark.cuda
def test_cuda_fp16_under_autocast() -> None:
    x = torch.rand(2, 8, 7, 7, device="cuda") * 60 + 40
    with torch.autocast("cuda", dtype=torch.float16):
        y = torch.nn.functional.conv2d(x, torch.eye(8, device="cuda").reshape(8, 8, 1, 1))  # fp16 under autocast
        pooled = gem(y, p=3.0)
    assert y.dtype == torch.float16
    assert pooled.dtype == torch.float16
    assert_close(pooled.double().cpu(), slow_gem(y.float().cpu(), 3.0, 1e-6), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------------------------------- module


def test_module_equals_functional() -> None:
    x = torch.randn(3, 4, 5, 2)
    assert_close(GeM(p=2.5, eps=1e-3)(x), gem(x, p=2.5, eps=1e-3))
    learnable = GeM(p=2.5, eps=1e-3, learnable=True)
    assert_close(learnable(x), gem(x, p=2.5, eps=1e-3))
    assert isinstance(learnable.p, torch.nn.Parameter)
    assert learnable.p.shape == (1,)
    assert [name for name, _ in learnable.named_parameters()] == ["p"]
    fixed = GeM(p=2.5)
    assert fixed.p == 2.5
    assert not list(fixed.parameters())


def test_learnable_p_factory_kwargs() -> None:
    pool = GeM(p=2.0, learnable=True, dtype=torch.float64, device="cpu")
    assert pool.p.dtype == torch.float64
    assert pool.p.device.type == "cpu"


def test_extra_repr() -> None:
    assert repr(GeM()) == "GeM(p=3.0, eps=1e-06)"
    pool = GeM(p=2.0, eps=1e-4, learnable=True)
    assert repr(pool) == "GeM(p=2.0 (learnable), eps=0.0001)"
    with torch.no_grad():
        pool.p.fill_(4.25)
    assert repr(pool) == "GeM(p=4.25 (learnable), eps=0.0001)"  # shows the current value


def test_input_is_not_modified() -> None:
    x = torch.randn(2, 3, 4, 4)
    before = x.clone()
    gem(x)
    assert torch.equal(x, before)


# --------------------------------------------------------------------------------------------------- bad input


def test_bad_input() -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        gem([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        gem(torch.ones(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor of shape \(N, C, H, W\)"):
        gem(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="at least one spatial position"):
        gem(torch.ones(2, 3, 0, 4))
    with pytest.raises(ValueError, match="p must be a number in"):
        gem(torch.ones(1, 1, 2, 2), p=0.0)
    with pytest.raises(ValueError, match="p must be a number in"):
        gem(torch.ones(1, 1, 2, 2), p=-1.0)
    with pytest.raises(ValueError, match="p must be a number in"):
        gem(torch.ones(1, 1, 2, 2), p=math.inf)
    with pytest.raises(ValueError, match="p must be a positive finite number"):
        gem(torch.ones(1, 1, 2, 2), p=torch.tensor([-2.0]))
    with pytest.raises(ValueError, match="one-element tensor"):
        gem(torch.ones(1, 1, 2, 2), p=torch.tensor([2.0, 3.0]))
    with pytest.raises(TypeError, match="p must be a floating-point tensor"):
        gem(torch.ones(1, 1, 2, 2), p=torch.tensor([2]))
    with pytest.raises(TypeError, match="p must be a number"):
        gem(torch.ones(1, 1, 2, 2), p="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps must be a number in"):
        gem(torch.ones(1, 1, 2, 2), eps=0.0)
    with pytest.raises(ValueError, match="p must be a number in"):
        GeM(p=0.0)
    with pytest.raises(ValueError, match="eps must be a number in"):
        GeM(eps=-1.0)
    with pytest.raises(TypeError, match="learnable must be a bool"):
        GeM(learnable="yes")  # type: ignore[arg-type]
