"""adapt_input_conv: widen a pretrained first convolution for the extra mask channel."""

from __future__ import annotations

from typing import Literal, TypeVar

import torch
from torch import nn

from dml_bias._checks import check_choice, check_number, describe

__all__ = ["adapt_input_conv"]

#: The type of the module passed to (and returned by) :func:`adapt_input_conv`.
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def adapt_input_conv(
    conv_or_model: ModuleT, in_channels: int = 4, *, init: Literal["zeros", "mean"] = "zeros"
) -> ModuleT:
    r"""Widen the first :class:`~torch.nn.Conv2d` of a model (or a given one) to ``in_channels`` inputs.

    The existing input channels keep their weights exactly; the new ones are initialised by ``init``:

    * ``"zeros"`` (default): the new weights are 0, so at initialisation the network computes exactly what the
      pretrained one did, whatever the extra (mask) channel holds; training then learns to use it.
    * ``"mean"``: each new channel gets the mean of the existing channels' weights,
      :math:`W_{:, c'} = \frac{1}{C}\sum_{c} W_{:, c}`, so it responds like a grey-level input from the start.

    The module is changed **in place** (its ``weight`` is replaced by a new :class:`~torch.nn.Parameter` on the
    same device and dtype with the same ``requires_grad``, and ``in_channels`` is updated); the function returns
    ``conv_or_model`` itself, for chaining. Create the optimiser afterwards: one built before still holds the old
    weight. The first convolution is the first :class:`~torch.nn.Conv2d` in ``model.modules()`` order (``conv1``
    for torchvision ResNets).

    Args:
        conv_or_model (torch.nn.Module): A :class:`~torch.nn.Conv2d`, or a module containing one.
        in_channels: The new number of input channels, at least the current one.
        init: How the new channels' weights start: ``"zeros"`` or ``"mean"``.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(3, 8, 3)
        >>> rgb = conv.weight.detach().clone()
        >>> conv = adapt_input_conv(conv, 4)
        >>> conv.weight.shape, torch.equal(conv.weight[:, :3], rgb), conv.weight[:, 3].abs().sum().item()
        (torch.Size([8, 4, 3, 3]), True, 0.0)
    """
    if not isinstance(conv_or_model, nn.Module):
        raise TypeError(f"conv_or_model must be a torch.nn.Module, got {describe(conv_or_model)}")
    check_number(in_channels, "in_channels", low=1, integer=True)
    check_choice(init, "init", ("zeros", "mean"))
    found = next((m for m in conv_or_model.modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise ValueError(f"conv_or_model holds no torch.nn.Conv2d ({type(conv_or_model).__name__})")
    conv: nn.Conv2d = found  # modules() yields the module itself first
    if conv.groups != 1:
        raise ValueError(f"adapt_input_conv supports groups=1 only, got a Conv2d with groups={conv.groups}")
    old: torch.Tensor = conv.weight
    if in_channels < old.shape[1]:
        raise ValueError(
            f"in_channels must be at least the convolution's current {old.shape[1]} input channels, got {in_channels}"
        )
    with torch.no_grad():
        new = old.new_zeros(old.shape[0], in_channels, *old.shape[2:])
        new[:, : old.shape[1]] = old
        if init == "mean" and in_channels > old.shape[1]:
            new[:, old.shape[1] :] = old.mean(dim=1, keepdim=True)
    conv.weight = nn.Parameter(new, requires_grad=bool(old.requires_grad))
    conv.in_channels = in_channels
    return conv_or_model
