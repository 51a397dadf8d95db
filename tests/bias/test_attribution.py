"""Similarity attribution, foreground energy and background sensitivity on hand-made models with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dml_bias.bias import (
    SmallCNN,
    background_sensitivity,
    foreground_energy,
    similarity_attribution,
)
from dml_bias.transforms.functional import mask_background

SIZE = 16
OBJECT = (slice(4, 12), slice(5, 11))  # rows, columns of every image's rectangular object


class TinyNet(nn.Module):
    """conv (stride 2) → ReLU → mean pool → linear: Grad-CAM at the ReLU has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.linear = nn.Linear(3, 4)
        self.unused = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.relu(self.conv(x)).mean(dim=(2, 3)))


class RegionNet(nn.Module):
    """An embedding computed only from one region (``"background"`` or ``"object"``) of the image.

    A 1×1 convolution, then a gate that zeroes every position outside the region (the layer that is explained),
    mean pooling and a linear layer: pixels outside the region cannot change the embedding.
    """

    def __init__(self, region: str) -> None:
        super().__init__()
        inside = torch.zeros(1, 1, SIZE, SIZE)
        inside[(..., *OBJECT)] = 1.0
        self.register_buffer("keep", inside if region == "object" else 1.0 - inside)
        self.conv = nn.Conv2d(3, 8, 1)
        self.gate = Gate()
        self.linear = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.gate(torch.relu(self.conv(x)), self.keep).mean(dim=(2, 3)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return x * keep


def _scenes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Textured images with the object in the same rectangle, and their uint8 masks (255 = object)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
    masks[(..., *OBJECT)] = 255
    return images, masks


def _gradcam_by_hand(model: TinyNet, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The closed form: e = W mean(A) + b, ∂cos(e, r)/∂e = (r̂ − cos·ê)/‖e‖, ∂s/∂A_kuv = (Wᵀ ∂s/∂e)_k / (hw)."""
    with torch.no_grad():
        a = torch.relu(model.conv(query))  # (N, K, h, w)
        h, w = a.shape[-2:]
        e = model.linear(a.mean(dim=(2, 3)))
        r = model.linear(torch.relu(model.conv(reference)).mean(dim=(2, 3)))
        e_hat, r_hat = e / e.norm(dim=1, keepdim=True), r / r.norm(dim=1, keepdim=True)
        cos = (e_hat * r_hat).sum(dim=1, keepdim=True)
        d_e = (r_hat - cos * e_hat) / e.norm(dim=1, keepdim=True)
        alpha = d_e @ model.linear.weight / (h * w)  # (N, K): the gradient is the same at every position
        cam = torch.relu((alpha[:, :, None, None] * a).sum(dim=1, keepdim=True))
        return F.interpolate(cam, size=query.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


# ---------------------------------------------------------------------------------------------- Grad-CAM


def test_gradcam_equals_the_hand_computation(device: torch.device) -> None:
    model = TinyNet().double().to(device)
    query = torch.randn(5, 2, 8, 8, dtype=torch.float64, device=device)
    reference = torch.randn(5, 2, 8, 8, dtype=torch.float64, device=device)
    maps = similarity_attribution(model, query, reference, layer="relu", method="gradcam")
    expected = _gradcam_by_hand(model, query, reference)
    assert maps.shape == (5, 8, 8)
    assert maps.dtype == torch.float64
    assert maps.device == query.device
    assert expected.max() > 0  # the comparison is not between two zero maps
    torch.testing.assert_close(maps, expected, rtol=1e-6, atol=1e-9)
    # the same maps with the reference given as embeddings, and with the layer given as a module
    with torch.no_grad():
        ref_emb = model(reference)
    torch.testing.assert_close(
        similarity_attribution(model, query, ref_emb, layer=model.relu, method="gradcam"), expected
    )


def test_model_is_left_as_it_was() -> None:
    model = TinyNet()
    model.train()
    model.linear.eval()  # a mixed state must come back as it was
    marker = model.conv.register_forward_hook(lambda *args: None)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.linear.bias.grad = None
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    query = torch.randn(3, 2, 8, 8)
    with torch.no_grad():  # works inside no_grad, as evaluation code calls it
        maps = similarity_attribution(model, query, torch.randn(3, 4), layer="relu")
    assert maps.requires_grad is False
    assert model.training is True
    assert model.conv.training is True
    assert model.linear.training is False
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    marker.remove()


def test_inference_mode_and_batchnorm_statistics() -> None:
    model = SmallCNN(embedding_size=8, width=4)
    stats = model.features[1].running_mean.clone()
    with torch.inference_mode():
        query = torch.randn(2, 3, 16, 16)
        maps = similarity_attribution(model, query, torch.randn(2, 3, 16, 16), layer="features")
    assert maps.shape == (2, 16, 16)
    assert torch.equal(model.features[1].running_mean, stats)  # eval mode: no statistics updated


def test_attribution_bad_input() -> None:
    model = TinyNet()
    query, reference = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match="layer must name a sub-module of model, got 'conv9'"):
        similarity_attribution(model, query, reference, layer="conv9")
    with pytest.raises(ValueError, match="layer must be a sub-module of model"):
        similarity_attribution(model, query, reference, layer=nn.Conv2d(2, 3, 1))
    with pytest.raises(ValueError, match="layer 'unused' did not run"):
        similarity_attribution(model, query, reference, layer="unused")
    with pytest.raises(ValueError, match=r"layer must output an \(N, K, h, w\) feature map or \(N, T, D\) tokens"):
        similarity_attribution(model, query, reference, layer="linear")
    with pytest.raises(TypeError, match="layer must be a sub-module of model or its dotted name"):
        similarity_attribution(model, query, reference, layer=3)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        similarity_attribution(lambda x: x, query, reference, layer="relu")
    with pytest.raises(ValueError, match="method must be one of 'decomposition', 'integrated_gradients', 'gradcam'"):
        similarity_attribution(model, query, reference, layer="relu", method="lrp")
    with pytest.raises(ValueError, match=r"query must be a 4-D tensor"):
        similarity_attribution(model, query[0], reference, layer="relu")
    with pytest.raises(TypeError, match="query must be a floating-point tensor"):
        similarity_attribution(model, query.to(torch.uint8), reference, layer="relu")
    with pytest.raises(ValueError, match="reference must have size N=2"):
        similarity_attribution(model, query, reference[:1], layer="relu")
    with pytest.raises(ValueError, match="reference must have size N=2"):
        similarity_attribution(model, query, torch.randn(3, 4), layer="relu")
    with pytest.raises(ValueError, match="reference must have the embedding size D=4"):
        similarity_attribution(model, query, torch.randn(2, 5), layer="relu")
    # a layer that runs twice: the same module used in two places
    twice = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Flatten())
    twice.insert(1, twice[0])
    with pytest.raises(ValueError, match="ran 2 times in one forward pass"):
        similarity_attribution(twice, query, torch.randn(2, 128), layer="0")


# -------------------------------------------------------------------------------------------- energy, sensitivity


@pytest.mark.parametrize(("region", "energy"), [("background", 0.0), ("object", 1.0)])
def test_foreground_energy_of_region_models(region: str, energy: float) -> None:
    torch.manual_seed(0)
    model = RegionNet(region)
    images, masks = _scenes(8)
    references, _ = _scenes(8, seed=1)
    maps = similarity_attribution(model, images, references, layer="gate")
    result = foreground_energy(maps, masks)
    assert not torch.isnan(result.energy).any()  # every map has some positive attribution
    torch.testing.assert_close(result.energy, torch.full((8,), energy))
    torch.testing.assert_close(result.chance, torch.full((8,), 8 * 6 / SIZE**2))


@pytest.mark.parametrize(("region", "score"), [("background", 1.0), ("object", 0.0)])
def test_background_sensitivity_of_region_models(region: str, score: float) -> None:
    torch.manual_seed(0)
    model = RegionNet(region)
    images, masks = _scenes(6)
    donors = _scenes(6, seed=2)
    # dilation 0: the filled box is the rectangular object itself, so each swap touches only its own region
    result = background_sensitivity(model, images, masks, donors=donors, dilation=0)
    assert result.score.dtype == torch.float64
    assert torch.equal(result.score, torch.full((6,), score, dtype=torch.float64))
    moved, still = (result.background, result.object) if region == "background" else (result.object, result.background)
    assert (moved > 0).all()
    assert torch.equal(still, torch.zeros(6, dtype=torch.float64))
    per_class = result.per_class(torch.tensor([0, 0, 0, 1, 1, 1]))
    assert sorted(per_class) == [0, 1]
    assert per_class[1]["score"] == score
    assert per_class[1]["count"] == 3
    assert per_class[0]["background"] == pytest.approx(float(result.background[:3].mean()))


def test_hard_mask_input_makes_background_swaps_invisible() -> None:
    """A model fed hard-masked images (the study's hard mode) cannot see a background swap: shift exactly 0."""
    torch.manual_seed(0)
    model = SmallCNN(embedding_size=8, width=4)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    _, masks = _scenes(6)
    masks[0, :, 4:12, 5:8] = 0  # not all rectangles
    donors = (images.roll(1, dims=0), masks.roll(1, dims=0))

    def hard(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(mask_background(x.float() / 255, m, "hard")).as_subclass(torch.Tensor)

    result = background_sensitivity(model, images, masks, donors=donors, input_fn=hard)
    assert torch.equal(result.background, torch.zeros(6, dtype=torch.float64))
    assert (result.object > 0).all()
    assert torch.equal(result.score, torch.zeros(6, dtype=torch.float64))
    # the same model on the raw images does see it
    raw = background_sensitivity(model, images, masks, donors=donors, input_fn=lambda x, m: x.float() / 255)
    assert (raw.background > 0).all()


def test_foreground_energy_by_hand() -> None:
    maps = torch.tensor([[[1.0, 3.0], [-2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])
    masks = torch.tensor([[[1, 0], [1, 1]], [[1, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=torch.uint8)
    result = foreground_energy(maps, masks)
    # positive part only: image 0 has 1 of 4 on the object; image 1 has no energy; image 2 is uniform
    torch.testing.assert_close(result.energy[[0, 2]], torch.tensor([0.25, 0.25]))
    assert torch.isnan(result.energy[1])
    torch.testing.assert_close(result.chance, torch.tensor([0.75, 0.25, 0.25]))
    # every binary format gives the same numbers
    for same in (masks.bool(), masks * 255, masks.float(), masks[:, None]):
        torch.testing.assert_close(foreground_energy(maps, same).energy, result.energy, equal_nan=True)


def test_energy_and_sensitivity_bad_input() -> None:
    maps = torch.rand(2, 4, 4)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"masks must have shape \(2, 4, 4\) or \(2, 1, 4, 4\) to match maps"):
        foreground_energy(maps, torch.zeros(2, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"masks must be a binary mask .* got values 0, 128"):
        foreground_energy(maps, torch.tensor([0, 128], dtype=torch.uint8).repeat(16).view(2, 4, 4))
    with pytest.raises(ValueError, match=r"masks must be a binary mask .* got values 0, 0\.5"):
        foreground_energy(maps, torch.full((2, 4, 4), 0.5).tril())
    with pytest.raises(ValueError, match=r"maps must be a 3-D tensor of shape \(N, H, W\)"):
        foreground_energy(maps[0], masks)
    with pytest.raises(TypeError, match="maps must be a floating-point tensor"):
        foreground_energy(maps.to(torch.int64), masks)
    with pytest.raises(ValueError, match="maps must be finite"):
        foreground_energy(maps.masked_fill(masks.logical_not(), float("nan")), masks)
    model = RegionNet("object")
    images, scene_masks = _scenes(3)
    donors = _scenes(3, seed=1)
    with pytest.raises(TypeError, match=r"donors must be a pair \(donor_images, donor_masks\)"):
        background_sensitivity(model, images, scene_masks, donors=donors[0])
    with pytest.raises(ValueError, match="donors\\[0\\] must have the shape and dtype of images"):
        background_sensitivity(model, images, scene_masks, donors=(donors[0][:2], donors[1]))
    with pytest.raises(ValueError, match="donors\\[1\\] must have the shape of masks"):
        background_sensitivity(model, images, scene_masks, donors=(donors[0], donors[1][:, 0]))
    with pytest.raises(ValueError, match=r"masks must have shape \(3, 16, 16\) or \(3, 1, 16, 16\) to match images"):
        background_sensitivity(model, images, scene_masks[:2], donors=donors)
    with pytest.raises(ValueError, match="batch_size must be an integer in"):
        background_sensitivity(model, images, scene_masks, donors=donors, batch_size=0)


def test_background_sensitivity_reuses_given_embeddings() -> None:
    torch.manual_seed(0)
    model = RegionNet("background")
    images, masks = _scenes(6)
    donors = _scenes(6, seed=2)
    fresh = background_sensitivity(model, images, masks, donors=donors, dilation=0)
    with torch.no_grad():
        given = model(images)
    calls = []
    handle = model.conv.register_forward_hook(lambda *args: calls.append(1))
    reused = background_sensitivity(model, images, masks, donors=donors, dilation=0, embeddings=given)
    handle.remove()
    assert len(calls) == 2  # the two swaps only: the originals' pass is saved
    for name in ("background", "object", "score"):
        assert torch.equal(getattr(reused, name), getattr(fresh, name)), name
    # the background swap is the ImageNet-9 mixed_rand variant with the same donors: its embeddings can be given too
    from dml_bias.transforms.functional import make_variant

    mixed = torch.stack(
        [make_variant("mixed_rand", images[i], masks[i], (donors[0][i], donors[1][i]), dilation=0)[0] for i in range(6)]
    )
    with torch.no_grad():
        mixed_emb = model(mixed)
    calls.clear()
    handle = model.conv.register_forward_hook(lambda *args: calls.append(1))
    both = background_sensitivity(
        model, images, masks, donors=donors, dilation=0, embeddings=given, background_embeddings=mixed_emb
    )
    handle.remove()
    assert len(calls) == 1  # the object swap only
    for name in ("background", "object", "score"):
        assert torch.equal(getattr(both, name), getattr(fresh, name)), name
    with pytest.raises(ValueError, match="embeddings must have size N=6"):
        background_sensitivity(model, images, masks, donors=donors, embeddings=given[:5])
