"""Embedding networks for the background-bias study: a small CNN and a ResNet-50 builder.

Both end in the same embedding head as the Proxy-Anchor reference code :cite:`kim2020proxy`: global average and
global max pooling, summed, then a linear layer (Kaiming-normal ``fan_out`` init, zero bias) and L2
normalisation, so every embedding has unit length.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dml_bias._checks import check_dtype, check_number, check_shape, check_tensor

__all__ = ["EmbeddingHead", "SmallCNN", "build_resnet50"]


class EmbeddingHead(nn.Module):
    r"""Average + max pooling, a linear layer and L2 normalisation.

    .. math::

        e = \frac{W (\operatorname{avg}(F) + \max(F)) + b}{\lVert W (\operatorname{avg}(F) + \max(F)) + b \rVert_2}

    Args:
        in_features: Channels ``C`` of the feature map.
        embedding_size: Length ``D`` of the embedding.

    Shape:
        - Input: ``(N, C, H, W)`` floating-point feature map.
        - Output: ``(N, D)``, rows of unit L2 norm.

    Example:
        >>> head = EmbeddingHead(8, 4)
        >>> e = head(torch.randn(2, 8, 3, 3))
        >>> e.shape, torch.allclose(e.norm(dim=1), torch.ones(2))
        (torch.Size([2, 4]), True)
    """

    def __init__(self, in_features: int, embedding_size: int) -> None:
        super().__init__()
        check_number(in_features, "in_features", low=1, integer=True)
        check_number(embedding_size, "embedding_size", low=1, integer=True)
        self.linear = nn.Linear(in_features, embedding_size)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool ``features`` ``(N, C, H, W)`` and embed them into ``(N, D)`` unit vectors."""
        pooled = features.mean(dim=(2, 3)) + features.amax(dim=(2, 3))
        return nn.functional.normalize(self.linear(pooled), dim=1)


class SmallCNN(nn.Module):
    """A three-block CNN for small images (the study's default model on the synthetic data set).

    Each block is a 3×3 convolution, batch normalisation, ReLU and (in the first two blocks) 2×2 max pooling;
    widths ``width``, ``2·width``, ``4·width``. The :class:`EmbeddingHead` turns the last feature map into an
    L2-normalised embedding. Trained from scratch it learns in seconds on 32–40 px images on a CPU.

    Args:
        in_channels: Input channels: 3 for RGB, 4 for the ``"channel"`` mask mode (RGB + mask).
        embedding_size: Length ``D`` of the embedding.
        width: Channels of the first block.

    Shape:
        - Input: ``(N, in_channels, H, W)`` floating point, ``H, W >= 4``.
        - Output: ``(N, embedding_size)``, rows of unit L2 norm.

    Example:
        >>> model = SmallCNN(in_channels=3, embedding_size=16, width=8)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 16])
    """

    def __init__(self, in_channels: int = 3, embedding_size: int = 64, width: int = 32) -> None:
        super().__init__()
        check_number(in_channels, "in_channels", low=1, integer=True)
        check_number(embedding_size, "embedding_size", low=1, integer=True)
        check_number(width, "width", low=1, integer=True)
        self.in_channels = int(in_channels)

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return layers

        self.features = nn.Sequential(
            *block(in_channels, width, True), *block(width, 2 * width, True), *block(2 * width, 4 * width, False)
        )
        self.head = EmbeddingHead(4 * width, embedding_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``images`` ``(N, C, H, W)`` into ``(N, D)`` unit vectors."""
        check_tensor(images, "images")
        check_dtype(images, "images", "floating")
        check_shape(images, "images", ("N", "C", "H", "W"), {"C": self.in_channels}, sources={"C": "in_channels"})
        return self.head(self.features(images))


class _ResNetEmbedder(nn.Module):
    """A torchvision ResNet trunk (everything up to ``layer4``) followed by an :class:`EmbeddingHead`."""

    def __init__(self, trunk: nn.Module, embedding_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = EmbeddingHead(2048, embedding_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        t: Any = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(images))))
        x = t.layer4(t.layer3(t.layer2(t.layer1(x))))
        return self.head(x)


def build_resnet50(
    embedding_size: int = 512, *, in_channels: int = 3, weights: str | Path | None = None, warn: bool = True
) -> nn.Module:
    """A torchvision ResNet-50 with the study's embedding head; never downloads anything.

    The ImageNet classifier (``fc``) is replaced by an :class:`EmbeddingHead` (average + max pooling, linear,
    L2 normalisation) as in the Proxy-Anchor recipe. With ``in_channels=4`` the first convolution is widened by
    :func:`dml_bias.transforms.adapt_input_conv` (for the ``"channel"`` mask mode) *after* the weights are
    loaded, so a standard 3-channel checkpoint can be used.

    Args:
        embedding_size: Length ``D`` of the embedding (512 in the CUB recipes).
        in_channels: 3 (RGB) or 4 (RGB + mask channel).
        weights: Path to a local file holding a torchvision ResNet-50 ``state_dict`` (for example
            ``resnet50-11ad3fa6.pth``), or a dict with a ``"state_dict"`` entry. Keys of the ``fc`` layer are
            ignored. ``None`` keeps the random initialisation (with a warning if ``warn``).
        warn: Warn when ``weights`` is ``None``.

    Returns:
        A module mapping ``(N, in_channels, H, W)`` images to ``(N, embedding_size)`` unit vectors; the trunk
        is ``model.trunk`` and the head ``model.head``.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: The file does not hold ResNet-50 weights.

    Example:
        >>> model = build_resnet50(32, warn=False)
        >>> model.eval()(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 32])
    """
    from torchvision.models import resnet50

    check_number(embedding_size, "embedding_size", low=1, integer=True)
    if in_channels not in (3, 4):
        raise ValueError(f"in_channels must be 3 or 4, got {in_channels!r}")
    trunk = resnet50(weights=None)
    if weights is None:
        if warn:
            warnings.warn(
                "build_resnet50: no weights given, the ResNet-50 starts from a random initialisation "
                "(pass weights=PATH to a local ImageNet checkpoint to follow the published recipe)",
                UserWarning,
                stacklevel=2,
            )
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights must be an existing file with ResNet-50 weights, got {str(path)!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"weights must hold a ResNet-50 state_dict, got a {type(state).__name__} in {str(path)!r}")
        state = {
            k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")
        }
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"weights must hold a torchvision ResNet-50 state_dict; {str(path)!r} lacks {len(missing)} keys "
                f"(e.g. {missing[:3]}) and has {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
    trunk.fc = nn.Identity()
    if in_channels == 4:
        from dml_bias.transforms import adapt_input_conv

        adapt_input_conv(trunk, in_channels=4)
    return _ResNetEmbedder(trunk, embedding_size)
