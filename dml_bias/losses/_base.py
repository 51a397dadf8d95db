"""The shared ``nn.Module`` shell of the embedding losses that take pairs or triplets of the batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from dml_bias.losses.functional import Indices


class PairLossModule(nn.Module):
    """Base of the modules whose ``forward`` is the functional twin called with the stored hyper-parameters.

    A subclass sets ``_functional`` (the functional twin, wrapped in :func:`staticmethod`) and ``_hyper`` (the
    names of the attributes passed to it as keyword arguments, in the order ``repr`` shows them); its
    ``__init__`` validates and stores those attributes.
    """

    _functional: ClassVar[Callable[..., torch.Tensor]]
    _hyper: ClassVar[tuple[str, ...]]

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Indices = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss; the arguments are described in the class docstring."""
        hyper: dict[str, Any] = {name: getattr(self, name) for name in self._hyper}
        return self._functional(embeddings, labels, indices_tuple, ref_emb, ref_labels, **hyper)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``, e.g. ``temperature=0.07, distance='cosine'``."""
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._hyper)
