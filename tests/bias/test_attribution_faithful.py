"""Faithful similarity attribution: exactness, ground truth by construction, sanity checks, a peer.

* completeness: the decomposition's maps sum to the cosine similarity (float64, 1e-10) for a GAP + linear CNN, the
  study's SmallCNN (average + max pooling, L2-normalised inside the model) and a ViT-style token model; a bias of
  the head is reported in ``residual`` and not smeared over the positions;
* a hand-computed 2 × 2 case, and each map value against a finite difference of the similarity;
* windowed models (``_windowed.py``) whose reliance on the object is known: foreground energy ≥ 0.95 for
  object-only, ≤ 0.05 for background-only, monotone in the mixture weight, for every method claimed faithful, at
  the layer and at the input, for a plain module and its TorchScript form; Grad-CAM's documented failure;
* Adebayo et al.'s cascading randomisation: maps of a trained model and of the same model with its layers
  re-initialised from the top differ (Spearman ρ < 0.5) once the explained layer is randomised;
* captum's ``LayerGradientXActivation`` on the same norm-held similarity (skips without captum);
* the pairwise view, foreground energy's NaN-free summaries and extreme maps, bad input.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _windowed import HI, LO, WindowNet, scenes, trained_small_cnn

from dml_bias.bias import (
    SmallCNN,
    foreground_energy,
    pairwise_decomposition,
    similarity_attribution,
    similarity_decomposition,
)

FAITHFUL = ("decomposition", "integrated_gradients")


class GapNet(nn.Module):
    """conv → ReLU → conv → ReLU (explained) → global average pooling → linear."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(5, 4, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class TokenNet(nn.Module):
    """A ViT-style model: 4 × 4 patches with a class token, one encoder layer (explained), token mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.block(tokens).mean(dim=1))


def _pair(n: int = 3, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randn(
        n, 3, size, size, generator=g, dtype=torch.float64
    )


def _cos(model: nn.Module, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.cosine_similarity(model(q), model(r), dim=1)


# --------------------------------------------------------------------------------------------- completeness


@pytest.mark.parametrize("method", FAITHFUL)
def test_maps_sum_to_the_cosine_similarity_of_a_gap_cnn(method: str) -> None:
    torch.manual_seed(0)
    model = GapNet().double()
    q, r = _pair()
    d = similarity_decomposition(model, q, r, layer="body", method=method, steps=4)
    assert d.maps.shape == (3, 5, 5)
    assert d.maps.dtype == torch.float64
    torch.testing.assert_close(d.similarity, _cos(model, q, r), rtol=0, atol=1e-12)
    # the decomposition is exact; integrated gradients are exact too here (the head is linear after the layer)
    torch.testing.assert_close(d.maps.sum(dim=(1, 2)), d.similarity, rtol=0, atol=1e-10)
    torch.testing.assert_close(d.residual, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-10)
    assert (d.maps < 0).any()  # signed maps
    assert (d.maps > 0).any()


def test_the_heads_bias_is_reported_apart() -> None:
    torch.manual_seed(0)
    model = GapNet(bias=True).double()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    q, r = _pair()
    d = similarity_decomposition(model, q, r, layer="body")
    with torch.no_grad():
        e, f = model(q), model(r)
    bias_term = (model.head.bias * f / f.norm(dim=1, keepdim=True)).sum(dim=1) / e.norm(dim=1)
    torch.testing.assert_close(d.residual, bias_term, rtol=0, atol=1e-10)
    # the positions carry the rest, each exactly the bias-free model's contribution scaled by the norms
    free = copy.deepcopy(model)
    free.head.bias = None
    maps_free = similarity_decomposition(free, q, f, layer="body").maps
    with torch.no_grad():
        scale = free(q).norm(dim=1) / e.norm(dim=1)
    torch.testing.assert_close(d.maps, maps_free * scale[:, None, None], rtol=0, atol=1e-10)


def test_maps_sum_to_the_similarity_of_the_study_cnn() -> None:
    """SmallCNN pools average + max (positively homogeneous) and L2-normalises inside: the norm is held."""
    torch.manual_seed(0)
    model = SmallCNN(embedding_size=8, width=4).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    q, r = _pair(size=16)
    d = similarity_decomposition(model, q, r, layer="features")
    assert model.training  # the call ran it in eval mode and gave the flag back
    torch.testing.assert_close(d.similarity, _cos(model.eval(), q, r), rtol=0, atol=1e-12)
    torch.testing.assert_close(d.maps.sum(dim=(1, 2)), d.similarity, rtol=0, atol=1e-10)
    # F.normalize is restored after the call
    assert torch.nn.functional.normalize.__module__ == "torch.nn.functional"


def test_maps_sum_to_the_similarity_of_a_token_model() -> None:
    torch.manual_seed(0)
    model = TokenNet().double()
    q, r = _pair(size=16)
    d = similarity_decomposition(model, q, r, layer="block")
    assert d.maps.shape == (3, 17)  # the class token and a 4 × 4 grid
    torch.testing.assert_close(d.maps.sum(dim=1), _cos(model, q, r), rtol=0, atol=1e-10)
    # the image maps leave the class token out and spread each patch's share over its 16 pixels
    maps = similarity_attribution(model, q, r, layer="block")
    assert maps.shape == (3, 16, 16)
    torch.testing.assert_close(maps[:, :4, :4].sum(dim=(1, 2)), d.maps[:, 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), d.maps[:, 1:].sum(dim=1), rtol=0, atol=1e-10)


def test_hand_computed_two_by_two() -> None:
    """Identity 'layer', average pooling and the identity head: M_uv = A_uv · r̂ / ‖mean A‖ / 4."""

    class Mean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x).mean(dim=(2, 3))

    q = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[0.0, 0.0], [4.0, 0.0]]]], dtype=torch.float64)  # (1, 2, 2, 2)
    r = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # r̂ = (0.6, 0.8)
    # e = mean over positions = (1.0, 1.0), ‖e‖ = √2
    d = similarity_decomposition(Mean(), q, r, layer="layer")
    s2 = 2**0.5
    expected = torch.tensor([[[0.6 * 1, 0.6 * 2], [0.8 * 4, 0.6 * 1]]], dtype=torch.float64) / 4 / s2
    torch.testing.assert_close(d.maps, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(d.similarity, torch.tensor([1.4 / s2], dtype=torch.float64), rtol=0, atol=1e-15)
    # at the input the same numbers (the layer is the identity)
    torch.testing.assert_close(similarity_decomposition(Mean(), q, r).maps, expected, rtol=0, atol=1e-15)


def test_each_value_is_a_directional_derivative() -> None:
    """M_u = d/dt s̃(A with position u scaled by 1 + t) at t = 0, by central differences (float64)."""
    torch.manual_seed(1)
    model = GapNet().double()
    q, r = _pair(n=1)
    d = similarity_decomposition(model, q, r, layer="body")
    with torch.no_grad():
        a = model.body(q)
        e = model.head(a.mean(dim=(2, 3)))
        f = model(r)
        r_hat, norm = f / f.norm(), e.norm()

        def s_tilde(x: torch.Tensor) -> torch.Tensor:
            return (model.head(x.mean(dim=(2, 3))) * r_hat).sum() / norm

        eps = 1e-6
        for u, v in [(0, 0), (2, 3), (4, 4)]:
            up, down = a.clone(), a.clone()
            up[..., u, v] *= 1 + eps
            down[..., u, v] *= 1 - eps
            fd = (s_tilde(up) - s_tilde(down)) / (2 * eps)
            assert float(d.maps[0, u, v]) == pytest.approx(float(fd), abs=1e-9)


# ------------------------------------------------------------------------------------ ground truth by construction


@pytest.fixture(scope="module")
def windowed() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, m, _ = scenes(8, seed=0)
    r, _, _ = scenes(8, seed=1)  # the same classes, other noise
    return q, m, r


def _energy(model: nn.Module, q: torch.Tensor, r: torch.Tensor, m: torch.Tensor, **kwargs: object) -> float:
    summary = foreground_energy(similarity_attribution(model, q, r, **kwargs), m).summary()  # type: ignore[arg-type]
    assert summary["empty"] == 0
    return float(summary["mean"])


@pytest.mark.parametrize("layer", ["stem", None])
@pytest.mark.parametrize("method", FAITHFUL)
def test_windowed_models_energy(windowed: tuple, method: str, layer: str | None) -> None:
    q, m, r = windowed
    energies = [_energy(WindowNet(alpha), q, r, m, layer=layer, method=method, steps=8) for alpha in (0, 0.5, 1)]
    assert energies[2] >= 0.95  # object only
    assert energies[0] <= 0.05  # background only
    assert energies[0] < energies[1] < energies[2]
    chance = float(foreground_energy(torch.ones(1, 64, 64), m[:1]).chance)
    assert chance == pytest.approx((HI - LO) ** 2 / 64**2)


@pytest.mark.parametrize("method", FAITHFUL)
def test_windowed_models_energy_is_monotone_in_alpha(windowed: tuple, method: str) -> None:
    q, m, r = windowed
    alphas = (0, 0.25, 0.5, 0.75, 1)
    energies = [_energy(WindowNet(alpha), q, r, m, layer="stem", method=method, steps=4) for alpha in alphas]
    assert energies == sorted(energies)
    assert energies[0] == 0.0
    assert energies[-1] == 1.0


def test_torchscript_models_are_explained_at_the_input(windowed: tuple) -> None:
    q, m, r = windowed
    for alpha, bound in ((1.0, 0.95), (0.0, 0.05)):
        model = WindowNet(alpha)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
            scripted = torch.jit.script(model)
        plain = similarity_attribution(model, q, r)
        maps = similarity_attribution(scripted, q, r)
        torch.testing.assert_close(maps, plain, rtol=1e-5, atol=1e-7)
        energy = float(foreground_energy(maps, m).summary()["mean"])
        assert energy >= bound if alpha == 1.0 else energy <= bound
        with pytest.raises(ValueError, match="TorchScript model and cannot be hooked; pass layer=None"):
            similarity_attribution(scripted, q, r, layer="stem")


def test_gradcam_is_not_faithful_on_windowed_models(windowed: tuple) -> None:
    """Documented failure: Grad-CAM's spatially averaged weights spill the object-only model's map onto the
    background and the background-only model's onto the object."""
    q, m, r = windowed
    object_only = _energy(WindowNet(1.0), q, r, m, layer="stem", method="gradcam")
    background_only = _energy(WindowNet(0.0), q, r, m, layer="stem", method="gradcam")
    assert object_only < 0.6
    assert background_only > 0.15


# ---------------------------------------------------------------------------------------------- sanity checks


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return trained_small_cnn()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return sum(float(spearmanr(a[i].flatten(), b[i].flatten())[0]) for i in range(a.shape[0])) / a.shape[0]


@pytest.mark.parametrize(("layer", "method"), [("features", "decomposition"), (None, "decomposition")])
def test_cascading_randomisation_changes_the_maps(trained: tuple, layer: str | None, method: str) -> None:
    model, q, r = trained
    before = similarity_attribution(model, q, r, layer=layer, method=method)
    randomised = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    correlations = {}
    for name in ("head.linear", "features.8", "features.4", "features.0"):  # from the top down
        weight = dict(randomised.named_modules())[name].weight
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=g) * weight.std())
        correlations[name] = _spearman(before, similarity_attribution(randomised, q, r, layer=layer, method=method))
    # once the explained layer's (last) convolution is random, and for every layer below it, the maps differ
    assert max(correlations["features.8"], correlations["features.4"], correlations["features.0"]) < 0.5
    # the comparison is not vacuous: the same model gives the same maps
    assert _spearman(before, similarity_attribution(model, q, r, layer=layer, method=method)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------- peers


def test_against_captum_layer_gradient_x_activation() -> None:
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = GapNet(bias=True).double().eval()
    q, r = _pair()
    with torch.no_grad():
        r_hat = torch.nn.functional.normalize(model(r), dim=1)
        norms = model(q).norm(dim=1)

    def score(x: torch.Tensor) -> torch.Tensor:  # the norm-held similarity as captum's target
        e = model(x)
        return (e * r_hat[: x.shape[0]]).sum(dim=1) / norms[: x.shape[0]]

    theirs = captum_attr.LayerGradientXActivation(score, model.body).attribute(q).sum(dim=1)
    ours = similarity_decomposition(model, q, r, layer="body").maps
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------- pairwise


def test_pairwise_matrix_by_hand_and_its_margins() -> None:
    torch.manual_seed(2)
    model = GapNet().double()
    q, r = _pair(n=2)
    p = pairwise_decomposition(model, q, r, layer="body", dims_chunk=3)
    with torch.no_grad():
        aq, ar = model.body(q).flatten(2), model.body(r).flatten(2)  # (N, K, P)
        phi_q = model.head(aq.transpose(1, 2)) / aq.shape[2]  # W A_u / P
        phi_r = model.head(ar.transpose(1, 2)) / ar.shape[2]
        nq, nr = model(q).norm(dim=1), model(r).norm(dim=1)
    expected = torch.bmm(phi_q, phi_r.transpose(1, 2)) / (nq * nr)[:, None, None]
    torch.testing.assert_close(p.matrix, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.matrix.sum(dim=(1, 2)), _cos(model, q, r), rtol=0, atol=1e-10)
    torch.testing.assert_close(p.query_maps, similarity_decomposition(model, q, r, layer="body").maps.flatten(1))
    torch.testing.assert_close(p.reference_maps, similarity_decomposition(model, r, q, layer="body").maps.flatten(1))
    torch.testing.assert_close(p.residual, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------- foreground energy


def test_energy_summaries_are_nan_free() -> None:
    maps = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]], [[-1.0, -2.0], [-3.0, -4.0]]])
    masks = torch.tensor([[[1, 0], [0, 0]]] * 3, dtype=torch.bool)
    fe = foreground_energy(maps, masks)
    assert fe.valid.tolist() == [True, False, False]
    assert fe.summary() == {"mean": 0.25, "chance": 0.25, "count": 1, "empty": 2}
    none = foreground_energy(maps[1:], masks[1:]).summary()
    assert none == {"mean": 0.0, "chance": 0.25, "count": 0, "empty": 2}


def test_energy_of_huge_and_subnormal_maps() -> None:
    masks = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    huge = torch.tensor([[[3e38, 3e38], [1e38, 1e38]]])
    tiny = torch.tensor([[[3e-45, 3e-45], [1e-45, 1e-45]]])  # float32 subnormals
    assert float(foreground_energy(huge, masks).energy) == pytest.approx(0.75)
    assert float(foreground_energy(tiny, masks).energy) == pytest.approx(float(tiny[0, 0].sum() / tiny.sum()), rel=1e-6)


# ------------------------------------------------------------------------------------------------- bad input


def test_decomposition_bad_input() -> None:
    model = GapNet()
    q, r = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="steps must be"):
        similarity_decomposition(model, q, r, method="integrated_gradients", steps=0)
    with pytest.raises(ValueError, match="method='gradcam' needs a layer"):
        similarity_attribution(model, q, r, method="gradcam")
    with pytest.raises(ValueError, match="baseline applies to layer=None"):
        similarity_attribution(model, q, r, layer="body", method="integrated_gradients", baseline=0.5)
    with pytest.raises(ValueError, match="baseline must broadcast to query's shape"):
        similarity_attribution(model, q, r, method="integrated_gradients", baseline=torch.zeros(5, 3, 8, 8))
    with pytest.raises(ValueError, match=r"layer must output an \(N, K, h, w\) feature map or \(N, T, D\) tokens"):
        similarity_decomposition(model, q, r, layer="head")
    with pytest.raises(ValueError, match=r"layer must output an \(N, K, h, w\) feature map for this method"):
        similarity_attribution(TokenNet(), torch.rand(2, 3, 16, 16), torch.rand(2, 6), layer="block", method="gradcam")
    with pytest.raises(ValueError, match="query must be finite, got 50 NaN"):
        similarity_attribution(model, q.masked_fill(q > 0.9, float("nan")), r)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(192, 4, bias=False))
    with pytest.raises(ValueError, match=r"model maps query\[0\] to a zero"):
        similarity_attribution(linear, torch.zeros(2, 3, 8, 8), torch.rand(2, 4))
    twice = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Flatten())
    twice.insert(1, twice[0])
    with pytest.raises(ValueError, match="ran 2 times in one forward pass"):
        pairwise_decomposition(twice, q, r, layer="0")
    with pytest.raises(ValueError, match=r"reference must be \(N, C, H, W\) images"):
        pairwise_decomposition(model, q, torch.rand(2, 4), layer="body")
    with pytest.raises(ValueError, match="layer must name the layer"):
        pairwise_decomposition(model, q, r, layer=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dims_chunk must be"):
        pairwise_decomposition(model, q, r, layer="body", dims_chunk=0)
    with pytest.raises(ValueError, match="form no square grid"):
        similarity_attribution(TokenNet(), torch.rand(2, 3, 16, 12), torch.rand(2, 6), layer="block")
