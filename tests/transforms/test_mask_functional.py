"""dml_bias.transforms.functional.mask_background / foreground_mask: values, formats, batching, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.transforms.functional import foreground_mask, mask_background


def reference_mask(image, mask, mode, sigma=0.5, threshold=0.5, soft_alpha=False):
    """Slow per-pixel reference in float64 for (C, H, W) images and (1, H, W) grey-level/float masks."""
    c, h, w = image.shape
    level = mask.double()
    if not mask.is_floating_point() and mask.dtype != torch.bool and mask.max() > 1:
        level = level / 255
    out = torch.zeros(c + (mode == "channel"), h, w, dtype=torch.float64)
    scale = 255 if image.dtype == torch.uint8 else 1
    for y in range(h):
        for x in range(w):
            a = float(level[0, y, x])
            f = 1.0 if a > threshold else 0.0
            if mask.dtype == torch.bool:
                f = a
            weight = a if soft_alpha else f
            for ch in range(c):
                v = float(image[ch, y, x])
                if mode == "hard":
                    out[ch, y, x] = weight * v
                elif mode == "soft":
                    out[ch, y, x] = v * (weight + (1 - weight) * sigma)
                else:
                    out[ch, y, x] = v
            if mode == "channel":
                out[c, y, x] = scale * weight
    return out


def python_round(t):
    """Round half to even with Python's own round(), element by element."""
    return torch.tensor([round(float(v)) for v in t.flatten()], dtype=torch.float64).reshape(t.shape)


# ------------------------------------------------------------------------------------------- hand-computed
def test_hand_computed_uint8() -> None:
    image = torch.tensor([[[10, 21], [33, 40]]], dtype=torch.uint8)
    mask = torch.tensor([[[255, 0], [0, 255]]], dtype=torch.uint8)
    assert mask_background(image, mask, "hard").tolist() == [[[10, 0], [0, 40]]]
    # 21 * 0.5 = 10.5 -> 10 (tie to even); 33 * 0.5 = 16.5 -> 16 (tie to even)
    assert mask_background(image, mask, "soft", sigma=0.5).tolist() == [[[10, 10], [16, 40]]]
    assert mask_background(image, mask, "channel").tolist() == [[[10, 21], [33, 40]], [[255, 0], [0, 255]]]


def test_hand_computed_float() -> None:
    image = torch.tensor([[[0.2, 0.4], [0.6, 0.8]]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, True]])
    assert mask_background(image, mask, "hard").tolist() == [[[0.2, 0.0], [0.0, 0.8]]]
    assert mask_background(image, mask, "soft", sigma=0.25).tolist() == [[[0.2, 0.4 * 0.25], [0.6 * 0.25, 0.8]]]
    out = mask_background(image, mask, "channel")
    assert out.dtype == torch.float64
    assert out.tolist() == [[[0.2, 0.4], [0.6, 0.8]], [[1.0, 0.0], [0.0, 1.0]]]


def test_uint8_rounding_is_half_to_even_for_every_value() -> None:
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    background = torch.zeros(1, 16, 16, dtype=torch.uint8)
    for sigma in (0.5, 0.25, 0.75, 0.3):
        out = mask_background(values, background, "soft", sigma=sigma)
        # documented: the product is formed in float32, then rounded half to even
        expected = python_round((values.float() * sigma).double())
        assert torch.equal(out.double(), expected), sigma
    assert mask_background(torch.tensor([[[5]]], dtype=torch.uint8), background[:, :1, :1], "soft").item() == 2


@pytest.mark.parametrize("mode", ["hard", "soft", "channel"])
@pytest.mark.parametrize("soft_alpha", [False, True])
def test_against_reference_float64(mode: str, soft_alpha: bool) -> None:
    image = torch.rand(3, 7, 5, dtype=torch.float64)
    mask = torch.randint(0, 256, (1, 7, 5), dtype=torch.uint8)
    out = mask_background(image, mask, mode, sigma=0.3, threshold=0.4, soft_alpha=soft_alpha)
    expected = reference_mask(image, mask, mode, sigma=0.3, threshold=0.4, soft_alpha=soft_alpha)
    assert_close(out, expected)


@pytest.mark.parametrize("mode", ["hard", "soft", "channel"])
@pytest.mark.parametrize("soft_alpha", [False, True])
def test_against_reference_uint8(mode: str, soft_alpha: bool) -> None:
    image = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)
    mask = torch.rand(1, 6, 6)
    out = mask_background(image, mask, mode, sigma=0.5, threshold=0.6, soft_alpha=soft_alpha)
    expected = reference_mask(image, mask.double(), mode, sigma=0.5, threshold=0.6, soft_alpha=soft_alpha)
    assert out.dtype == torch.uint8
    # float32 weights against float64 reference: at most one grey level apart, and exact where weight is 0/1
    assert (out.double() - python_round(expected)).abs().max() <= 1
    if not soft_alpha:  # binary weights and sigma = 0.5 are exact in float32 too
        assert torch.equal(out.double(), python_round(expected))


def test_float_dtypes_are_exact(dtype: torch.dtype, device: torch.device) -> None:
    image = torch.randn(2, 3, 8, 8, device=device).to(dtype)
    mask = torch.rand(2, 1, 8, 8, device=device) > 0.5
    hard = mask_background(image, mask, "hard")
    soft = mask_background(image, mask, "soft", sigma=0.3)
    chan = mask_background(image, mask, "channel")
    assert hard.dtype == soft.dtype == chan.dtype == dtype
    fg = mask.expand_as(image)
    assert torch.equal(hard[fg], image[fg])
    assert bool((hard[~fg] == 0).all())
    assert torch.equal(soft[fg], image[fg])
    assert torch.equal(soft[~fg], (image * 0.3)[~fg])
    assert torch.equal(chan[:, :3], image)
    assert torch.equal(chan[:, 3:], mask.to(dtype))


# ------------------------------------------------------------------------------------------- mask formats
def test_all_mask_formats_agree() -> None:
    binary = torch.rand(1, 9, 9) > 0.5
    formats = {
        "bool": binary,
        "uint8 {0,1}": binary.to(torch.uint8),
        "uint8 {0,255}": binary.to(torch.uint8) * 255,
        "int64 {0,1}": binary.long(),
        "float {0,1}": binary.float(),
        "(H, W) bool": binary[0],
    }
    expected = binary
    for name, mask in formats.items():
        assert torch.equal(foreground_mask(mask).reshape(1, 9, 9), expected), name
    ids = torch.where(binary, 5, torch.where(torch.rand(1, 9, 9) > 0.5, 0, 7))
    assert torch.equal(foreground_mask(ids, background_ids=[0, 7]), binary)
    image = torch.rand(3, 9, 9)
    outs = [mask_background(image, m, "hard") for m in formats.values()]
    outs.append(mask_background(image, ids, "hard", background_ids=(0, 7)))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_grey_levels_and_threshold_are_strict() -> None:
    grey = torch.tensor([[0, 1, 2, 127, 128, 254, 255]], dtype=torch.uint8)
    # maximum > 1, so 0..255 grey levels: level = v / 255, foreground iff level > threshold
    assert foreground_mask(grey).tolist() == [[False, False, False, False, True, True, True]]
    assert foreground_mask(grey, threshold=0.0).tolist() == [[False, True, True, True, True, True, True]]
    assert foreground_mask(grey, threshold=1.0).tolist() == [[False] * 7]
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    for k in range(256):  # thresholds that hit a grey level exactly: strictly above it is object
        assert torch.equal(foreground_mask(levels, threshold=k / 255), levels > k), k
    for t in torch.rand(50, dtype=torch.float64).tolist():
        assert torch.equal(foreground_mask(levels, threshold=t), levels.double() / 255 > t), t
    soft = torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0]])
    assert foreground_mask(soft, threshold=0.5).tolist() == [[False, False, False, True, True]]
    assert foreground_mask(soft, threshold=0.25).tolist() == [[False, False, True, True, True]]


def test_scale_detected_per_sample_in_a_batch() -> None:
    ones = torch.ones(1, 1, 2, 2, dtype=torch.uint8)
    batch = torch.cat([ones, ones * 255, ones * 100])  # {0,1}-style, {0,255}-style, grey below threshold
    assert foreground_mask(batch).flatten().tolist() == [True] * 8 + [False] * 4


def test_soft_alpha_formula() -> None:
    image = torch.rand(3, 4, 4, dtype=torch.float64)
    mask = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8)
    a = mask.float() / 255
    out = mask_background(image, mask, "soft", sigma=0.2, soft_alpha=True)
    assert_close(out, image * (a + (1 - a) * 0.2).double(), rtol=1e-6, atol=1e-7)
    out = mask_background(image, mask, "hard", soft_alpha=True)
    assert_close(out, image * a.double(), rtol=1e-6, atol=1e-7)
    out = mask_background((image * 255).round().to(torch.uint8), mask, "channel", soft_alpha=True)
    assert torch.equal(out[3:], mask)  # round(255 * m / 255) == m


# ------------------------------------------------------------------------------------------- batching, device
def test_batched_equals_per_sample() -> None:
    images = torch.randint(0, 256, (5, 3, 6, 7), dtype=torch.uint8)
    masks = torch.randint(0, 256, (5, 1, 6, 7), dtype=torch.uint8)
    for mode in ("hard", "soft", "channel"):
        batched = mask_background(images, masks, mode, sigma=0.4)
        single = torch.stack([mask_background(i, m, mode, sigma=0.4) for i, m in zip(images, masks, strict=True)])
        assert torch.equal(batched, single), mode
    shared = mask_background(images, masks[0], "hard")  # (1, H, W) mask broadcast over the batch
    assert torch.equal(shared, torch.stack([mask_background(i, masks[0], "hard") for i in images]))
    video = torch.rand(2, 4, 3, 6, 7)  # (B, T, C, H, W)
    assert mask_background(video, masks[:2, None], "channel").shape == (2, 4, 4, 6, 7)


def test_inputs_not_modified() -> None:
    image = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8)
    mask = torch.randint(0, 256, (1, 5, 5), dtype=torch.uint8)
    image0, mask0 = image.clone(), mask.clone()
    for mode in ("hard", "soft", "channel"):
        out = mask_background(image, mask, mode)
        assert out.data_ptr() != image.data_ptr()
    assert torch.equal(image, image0)
    assert torch.equal(mask, mask0)


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    masks = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    for mode in ("hard", "soft", "channel"):
        cpu = mask_background(images, masks, mode)
        gpu = mask_background(images.cuda(), masks.cuda(), mode)
        assert gpu.is_cuda
        assert torch.equal(gpu.cpu(), cpu)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    c=st.integers(1, 4),
    sigma=st.floats(0.01, 0.99),
    threshold=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_hard_soft_channel(h: int, w: int, c: int, sigma: float, threshold: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=g)
    mask = torch.randint(0, 256, (1, h, w), dtype=torch.uint8, generator=g)
    fg = foreground_mask(mask, threshold).expand(c, h, w)
    hard = mask_background(image, mask, "hard", threshold=threshold)
    soft = mask_background(image, mask, "soft", sigma=sigma, threshold=threshold)
    chan = mask_background(image, mask, "channel", threshold=threshold)
    assert torch.equal(hard, torch.where(fg, image, 0))
    assert torch.equal(soft[fg], image[fg])
    assert bool((soft <= image).all())
    assert bool((soft >= hard).all())
    assert torch.equal(chan[:c], image)
    assert torch.equal(chan[c:], fg[:1].to(torch.uint8) * 255)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "blur"}, ValueError, r"mode must be one of 'hard', 'soft', 'channel', got 'blur'"),
        ({"sigma": 0.0}, ValueError, r"sigma must be a number in \(0.0, 1.0\), got 0.0"),
        ({"sigma": 1.0}, ValueError, r"sigma must be a number in \(0.0, 1.0\), got 1.0"),
        ({"sigma": -0.5}, ValueError, r"sigma .* got -0.5"),
        ({"threshold": 1.5}, ValueError, r"threshold must be a number in \[0.0, 1.0\], got 1.5"),
        ({"threshold": -0.1}, ValueError, r"threshold .* got -0.1"),
        ({"background_ids": "0"}, TypeError, r"background_ids must be a sequence of ints"),
        ({"soft_alpha": 1}, TypeError, r"soft_alpha must be a bool"),
    ],
)
def test_bad_options(kwargs: dict, error: type, match: str) -> None:
    image, mask = torch.rand(3, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(error, match=match):
        mask_background(image, mask, **kwargs)


def test_bad_shapes_and_values_name_both() -> None:
    image = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match=r"mask shape \(1, 4, 4\).*image shape \(3, 8, 8\)"):
        mask_background(image, torch.ones(1, 4, 4), "hard")
    with pytest.raises(ValueError, match=r"single channel .* shape \(3, 8, 8\).* with 3 channels"):
        mask_background(image, torch.ones(3, 8, 8), "hard")
    with pytest.raises(ValueError, match=r"batch dimensions \(2,\) do not broadcast .* \(3,\)"):
        mask_background(torch.rand(3, 3, 8, 8), torch.ones(2, 1, 8, 8), "hard")
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got values in \[0.0, 2.0\]"):
        mask_background(image, torch.tensor([0.0, 2.0]).repeat(32).reshape(1, 8, 8), "hard")
    with pytest.raises(ValueError, match=r"values in \[0, 255\].*got values in \[0, 300\].*background_ids"):
        mask_background(image, torch.tensor([0, 300]).repeat(32).reshape(1, 8, 8), "hard")
    with pytest.raises(TypeError, match=r"image must be a tensor of dtype torch.uint8 .*torch.int32"):
        mask_background(torch.zeros(3, 8, 8, dtype=torch.int32), torch.ones(1, 8, 8), "hard")
    with pytest.raises(ValueError, match=r"image must have shape \(C, H, W\)"):
        mask_background(torch.rand(8, 8), torch.ones(8, 8), "hard")
    with pytest.raises(TypeError, match=r"background_ids, mask must be an integer class-id map"):
        mask_background(image, torch.ones(1, 8, 8), "hard", background_ids=[0])
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor, got list"):
        mask_background(image, [[1]], "hard")
