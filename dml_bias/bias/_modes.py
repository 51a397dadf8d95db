"""The one helper that runs a model in eval mode and gives every sub-module its own training flag back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode; afterwards every sub-module's ``training`` flag is as it was (mixed states too).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> model[0].eval()  # a mixed state
        Linear(in_features=2, out_features=2, bias=True)
        >>> with eval_mode(model):
        ...     model.training
        False
        >>> model.training, model[0].training, model[1].training
        (True, False, True)
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
