"""Hand-made pair heads shared by the tests of the pair heads (tests/heads) and of PAN's protocols (tests/metrics).

Importable as ``pair_heads`` (``tests/`` is on ``sys.path``, see ``conftest.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dml_bias.heads import ConditionalSimilarity


class Out(NamedTuple):
    score: torch.Tensor


class LookupHead(nn.Module):
    """Asymmetric pair head on 1-D "features" holding a sample id: score(i, j) = table[i, j]."""

    in_features = 1

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.calls = 0
        self.matrix_calls = 0

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> Out:
        self.calls += 1
        return Out(self.table[h1[:, 0].long(), h2[:, 0].long()])

    def score_matrix(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        self.matrix_calls += 1
        return self.table[query[:, 0].long()][:, gallery[:, 0].long()]


class L1Head(nn.Module):
    """score = exp(-||h1 - h2||_1), in (0, 1]."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> Out:
        return Out(torch.exp(-(h1 - h2).abs().sum(dim=1)))

    def score_matrix(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(query[:, None, :] - gallery[None, :, :]).abs().sum(dim=2))


def id_features(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def real_head(d: int, k: int, seed: int = 0, joint: str = "absdiff") -> ConditionalSimilarity:
    torch.manual_seed(seed)
    return ConditionalSimilarity(d, k, joint=joint, dtype=torch.float64).eval()


def pair_score(head: ConditionalSimilarity, features: torch.Tensor, i: int, j: int) -> float:
    with torch.no_grad():
        return float(head(features[i : i + 1], features[j : j + 1]).score[0])
