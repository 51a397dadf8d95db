"""The test contract (``tests/contract.py``) for the bias package: the attribution functions, the models, the
audit and the study."""

from __future__ import annotations

from typing import Any

import contract as C
import pytest
import torch
from contract import Call, Entry, call, instance, tensor
from torch import nn

from dml_bias import bias as B
from dml_bias.datasets import SyntheticBackgrounds

F64 = torch.float64


def rand(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def tiny_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False)]
    return nn.Sequential(*layers).double().to(dtype)


def pair_inputs(dtype: torch.dtype) -> Call:
    return call(tiny_model(dtype), rand(2, 3, 5, 5, dtype=dtype, seed=1), rand(2, 3, 5, 5, dtype=dtype, seed=2))


def cosine_of_embeddings(model: nn.Module, q: torch.Tensor, r: torch.Tensor, **_: Any) -> torch.Tensor:
    with torch.no_grad():
        a, b = model(q).double(), model(r).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def decomposition_out(d: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Completeness: the maps sum to the similarity; and the similarity itself."""
    return d.maps.sum(dim=(1, 2)) + d.residual, d.similarity


def energy_ref(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    energy = [float((m * k).sum() / m.sum()) for m, k in zip(maps.double(), masks.double(), strict=True)]
    chance = [float(k.mean()) for k in masks.double()]
    return torch.tensor(energy, dtype=F64), torch.tensor(chance, dtype=F64)


def colour_inputs(dtype: torch.dtype) -> Call:
    images = torch.zeros(2, 3, 8, 8, dtype=dtype)
    images[0, 0], images[1, 1] = 1.0, 1.0
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    masks[:, :, 2:6, 2:6] = 255
    images[:, 2, 2:6, 2:6] = torch.tensor([0.2, 0.9], dtype=dtype).view(2, 1, 1)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return call(model, images, masks, donors=(images.flip(0), masks.flip(0)), fill="black", dilation=0)


def sensitivity_ref(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, donors: Any, **kw: Any):
    """The documented formula, image by image: b = 1 - cos(f(x), f(x_bg)), o = 1 - cos(f(x), f(x_obj)),
    score = b / (b + o); x_bg and x_obj made with swap_background (its own contract entry)."""
    from dml_bias.transforms.functional import swap_background

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x[None].double())[0]

    def shift(a: torch.Tensor, b: torch.Tensor) -> float:
        return 1 - float(a @ b) / float(a.norm() * b.norm())

    scores = []
    for x, m, d, dm in zip(images, masks, *donors, strict=True):
        x_bg = swap_background(x, m, d, dm, fill=kw["fill"], dilation=kw["dilation"])[0]
        x_obj = swap_background(d, dm, x, m, fill=kw["fill"], dilation=kw["dilation"])[0]
        b, o = shift(embed(x), embed(x_bg)), shift(embed(x), embed(x_obj))
        scores.append(b / (b + o))
    return torch.tensor(scores, dtype=F64)


def study_config() -> Any:
    return B.StudyConfig.quick(
        losses=("multi_similarity",),
        modes=("hard",),
        num_classes=3,
        images_per_class=4,
        image_size=16,
        batch_size=6,
        m_per_class=2,
        epochs=1,
        variants=("original",),
        progress=False,
    )


HEAVY = "trains or evaluates a whole pipeline: smoke and bad input here, its values in tests/bias"
PIPELINE_SKIP = {
    "reference": HEAVY,
    "gradcheck": C.NOT_DIFFERENTIABLE,
    "dtype": "the pipeline sets its own dtype (float32 training)",
    "device": "runs on the device its config names; the CUDA path is in tests/bias",
    "twin": "a pipeline function",
}
MAPS_NOT_DIFF = "attribution maps are gradients themselves: a gradcheck of them is a second-order check"

ENTRIES: list[Entry] = [
    Entry(
        "dml_bias.bias:similarity_decomposition",
        lambda dtype: call(*pair_inputs(dtype).args, layer="1"),
        instance(B.SimilarityDecomposition, maps=tensor((2, 5, 5)), similarity=tensor((2,))),
        out=decomposition_out,
        reference=lambda model, q, r, **kw: (cosine_of_embeddings(model, q, r),) * 2,
        skip={"gradcheck": MAPS_NOT_DIFF},
    ),
    Entry(
        "dml_bias.bias:similarity_attribution",
        lambda dtype: call(*pair_inputs(dtype).args, layer="1"),
        tensor((2, 5, 5)),
        twin=lambda f: lambda *a, **k: B.similarity_decomposition(*a, **k).maps,
        out=lambda maps: maps.sum(dim=(1, 2)),
        reference=lambda model, q, r, **kw: (
            B.similarity_decomposition(model, q, r, **kw).similarity
            - B.similarity_decomposition(model, q, r, **kw).residual
        ),
        skip={"gradcheck": MAPS_NOT_DIFF},
    ),
    Entry(
        "dml_bias.bias:pairwise_decomposition",
        lambda dtype: call(
            tiny_model(dtype), rand(1, 3, 2, 2, dtype=dtype, seed=1), rand(1, 3, 3, 3, dtype=dtype, seed=2), layer="1"
        ),
        instance(B.PairwiseDecomposition, matrix=tensor((1, 4, 9))),
        out=lambda p: (p.matrix.sum(dim=(1, 2)) + p.residual, p.similarity),
        reference=lambda model, q, r, **kw: (cosine_of_embeddings(model, q, r),) * 2,
        skip={"gradcheck": MAPS_NOT_DIFF},
    ),
    Entry(
        "dml_bias.bias:foreground_energy",
        lambda dtype: call(rand(2, 4, 4, dtype=dtype), torch.arange(16).reshape(1, 4, 4).repeat(2, 1, 1) < 6),
        instance(B.ForegroundEnergy, energy=tensor((2,), None), chance=tensor((2,), None)),
        out=lambda f: (f.energy, f.chance),
        reference=energy_ref,
        skip={"gradcheck": "a diagnostic of maps, not a training signal", "dtype": "reported in float32"},
    ),
    Entry(
        "dml_bias.bias:background_sensitivity",
        colour_inputs,
        instance(B.BackgroundSensitivity, score=tensor((2,), None)),
        out=lambda s: s.score,
        reference=sensitivity_ref,
        skip={
            "gradcheck": C.NOT_DIFFERENTIABLE,
            "twin": C.FUNCTION,
        },
    ),
    Entry(
        "dml_bias.bias:EmbeddingHead",
        lambda dtype: call(rand(2, 8, 3, 3, dtype=dtype)),
        tensor((2, 4)),
        make=lambda dtype: (torch.manual_seed(0), B.EmbeddingHead(8, 4).double().to(dtype))[1],
        reference=lambda x: head_ref(x),
        grad=(0,),
        skip={"twin": C.NO_TWIN},
    ),
    Entry(
        "dml_bias.bias:SmallCNN",
        lambda dtype: call(rand(2, 3, 16, 16, dtype=dtype)),
        tensor((2, 8)),
        make=lambda dtype: (torch.manual_seed(0), B.SmallCNN(embedding_size=8, width=4).double().to(dtype).eval())[1],
        out=lambda e: e.norm(dim=1),
        reference=lambda x: torch.ones(2, dtype=F64),  # unit embeddings
        skip={"twin": C.NO_TWIN, "gradcheck": "a network: its layers are torch's; the unit norm is its contract"},
    ),
    Entry(
        "dml_bias.bias:build_resnet50",
        lambda dtype: call(rand(1, 3, 32, 32, dtype=dtype)),
        tensor((1, 16)),
        make=lambda dtype: (torch.manual_seed(0), B.build_resnet50(16, warn=False).eval())[1],
        out=lambda e: e.norm(dim=1),
        reference=lambda x: torch.ones(1, dtype=F64),
        dtypes=(torch.float32,),
        skip={
            "twin": C.NO_TWIN,
            "gradcheck": "25M parameters: too large for a float64 gradcheck",
            "dtype": "a factory of a float32 torchvision model",
            "pickle": "torchvision's ResNet-50 (100 MB): pickling it tests torchvision, and takes seconds",
            "unchanged": "a backward pass through ResNet-50 takes seconds; SmallCNN's entry checks the same contract",
        },
    ),
    Entry(
        "dml_bias.bias:audit",
        lambda dtype: call(
            (torch.manual_seed(0), B.SmallCNN(embedding_size=8, width=4))[1],
            SyntheticBackgrounds("test", num_classes=3, images_per_class=4, image_size=16),
            bootstrap=20,
            attribution_images=1,
            progress=False,
        ),
        lambda out, _: instance(B.AuditResult)(out, _),
        out=lambda r: (r.num_images, sorted(r.variants)),
        reference=lambda *_, **__: (12, sorted(B.VARIANTS)),
        dtypes=(),
        skip=PIPELINE_SKIP,
    ),
    Entry(
        "dml_bias.bias:run_study",
        lambda dtype: call(study_config()),
        lambda out, _: instance(B.StudyResult)(out, _),
        out=lambda r: [(run["loss"], run["mode"]) for run in r.runs],
        reference=lambda cfg: [("multi_similarity", "hard")],
        dtypes=(),
        skip={**PIPELINE_SKIP, "unchanged": "its input is a frozen config (no tensors)"},
    ),
]


def head_ref(x: torch.Tensor) -> torch.Tensor:
    """Mean + max pooling, the linear layer, unit length (from the head's documented formula)."""
    torch.manual_seed(0)
    layer = B.EmbeddingHead(8, 4).double().linear
    pooled = x.double().mean(dim=(2, 3)) + x.double().amax(dim=(2, 3))
    out = pooled @ layer.weight.detach().double().T + (layer.bias.detach().double() if layer.bias is not None else 0)
    return out / out.norm(dim=1, keepdim=True)


@pytest.mark.parametrize(("entry", "check"), C.params(ENTRIES))
def test_contract(entry: Entry, check: str) -> None:
    C.run(entry, check)
