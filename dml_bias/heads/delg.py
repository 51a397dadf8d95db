r"""DELG :cite:`cao2020delg`: one ResNet giving a global descriptor (retrieval) and local features (re-ranking).

* :class:`~dml_bias.heads.DELGGlobalHead`: GeM pooling of conv5, a whitening :class:`torch.nn.Linear` and L2
  normalisation; trained with ArcFace (:class:`dml_bias.losses.AdditiveAngularMarginLoss`).
* :class:`~dml_bias.heads.DELGLocalHead`: on the stop-gradient conv4 map, a linear 1×1 autoencoder whose code
  is the local descriptor and an attention module on the reconstruction that scores every location; trained
  with a reconstruction loss and an attention-pooled classification loss.
* :class:`~dml_bias.heads.DELG`: a torchvision ResNet with DELG's stride arrangement (both maps at stride 32),
  the two heads, the training loss :math:`L_g + \lambda L_r + \beta L_a`, and the multi-scale extraction
  (:meth:`~dml_bias.heads.DELG.extract_global`, :meth:`~dml_bias.heads.DELG.extract_local`).

See :doc:`/guides/delg` for the architecture, the losses, the training recipe and re-ranking.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dml_bias._checks import (
    check_choice,
    check_dtype,
    check_factory_kwargs,
    check_labels,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
    describe,
)
from dml_bias.heads._inputs import check_batch_statistics, check_head_input
from dml_bias.heads.pooling import GeM
from dml_bias.losses import AdditiveAngularMarginLoss
from dml_bias.similarity import normalize

__all__ = [
    "DELG",
    "DELGGlobalHead",
    "DELGLocalHead",
    "DELGOutput",
    "LocalFeatures",
    "LocalHeadLosses",
    "LocalHeadOutput",
    "ReceptiveField",
]

#: DELG's image pyramid (``delg/*_config.pbtxt``); the global descriptor uses the middle three scales.
_PYRAMID = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
_GLOBAL_SCALES = (1.0 / math.sqrt(2.0), 1.0, math.sqrt(2.0))


def _check_feature_map(x: Any, name: str, channels: int, source: str) -> None:
    """A 4-D floating ``(N, C, H, W)`` map with the given ``C``."""
    check_tensor(x, name)
    check_dtype(x, name, "floating")
    check_shape(x, name, ("N", "C", "H", "W"), {"C": channels}, sources={"C": source})


# --------------------------------------------------------------------------------------------------- global head


class DELGGlobalHead(nn.Module):
    r"""DELG's global head :cite:`cao2020delg`: GeM pooling, a whitening layer and L2 normalisation.

    .. math::

        g = \frac{W\,\operatorname{GeM}_p(S) + b}{\lVert W\,\operatorname{GeM}_p(S) + b \rVert_2}

    with :math:`S` the conv5 map, :math:`p = 3` fixed (:class:`~dml_bias.heads.GeM`) and :math:`(W, b)` a
    :class:`torch.nn.Linear` with bias (DELG's "embedding layer"). DELG trains it with ArcFace,
    ``dml_bias.losses.AdditiveAngularMarginLoss(num_classes, dim, margin=0.1, scale=math.sqrt(dim))``
    (:class:`DELG` does this).

    Args:
        in_channels: channels of the input map (2048 for conv5 of ResNet-50/101).
        dim: descriptor size :math:`C_g` (2048 in DELG).
        p: the GeM power, a fixed float.
        device: device of the whitening layer.
        dtype: dtype of the whitening layer.

    Attributes:
        pool: the :class:`~dml_bias.heads.GeM` pooling.
        whiten: the :class:`torch.nn.Linear` ``in_channels -> dim`` (PyTorch's default initialisation).

    Shape:
        input ``(N, in_channels, H, W)`` floating and finite; output ``(N, dim)``, every row of unit L2 norm.

    Precision: the map is cast to the dtype of the whitening layer (float16/bfloat16/float64 maps on a float32
    head run in float32, and the descriptors are float32); under :class:`torch.autocast` autocast picks the
    dtype instead. NaN or infinite values raise :class:`ValueError`.

    Example:
        >>> import torch
        >>> from dml_bias.heads import DELGGlobalHead
        >>> head = DELGGlobalHead(in_channels=16, dim=8)
        >>> g = head(torch.rand(2, 16, 5, 5))
        >>> g.shape, torch.allclose(g.norm(dim=1), torch.ones(2))
        (torch.Size([2, 8]), True)
    """

    def __init__(
        self,
        in_channels: int = 2048,
        dim: int = 2048,
        *,
        p: float = 3.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_number(in_channels, "in_channels", low=1, integer=True)
        check_number(dim, "dim", low=1, integer=True)
        device = check_factory_kwargs(device, dtype)
        self.in_channels = int(in_channels)
        self.dim = int(dim)
        self.pool = GeM(p)
        self.whiten = nn.Linear(in_channels, dim, bias=True, device=device, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised global descriptors ``(N, dim)`` of a conv5 map ``(N, in_channels, H, W)``."""
        _check_feature_map(features, "features", self.in_channels, "in_channels")
        features = check_head_input(features, "features", self.whiten.weight)
        return normalize(self.whiten(self.pool(features)))

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"in_channels={self.in_channels}, dim={self.dim}"


# --------------------------------------------------------------------------------------------------- local head


class LocalHeadOutput(NamedTuple):
    """What :class:`DELGLocalHead` returns.

    Attributes:
        attention: ``(N, H, W)`` non-negative attention scores (softplus), computed from ``reconstruction``.
        descriptors: ``(N, dim, H, W)`` local descriptors, the encoder output, **not** normalised.
        reconstruction: ``(N, in_channels, H, W)`` the decoder's reconstruction of the (detached) input map.

    Example:
        >>> import torch
        >>> from dml_bias.heads import DELGLocalHead
        >>> out = DELGLocalHead(in_channels=16, dim=4, hidden_channels=8)(torch.rand(2, 16, 3, 3))
        >>> out.attention.shape, out.descriptors.shape, out.reconstruction.shape
        (torch.Size([2, 3, 3]), torch.Size([2, 4, 3, 3]), torch.Size([2, 16, 3, 3]))
    """

    attention: torch.Tensor
    descriptors: torch.Tensor
    reconstruction: torch.Tensor


class LocalHeadLosses(NamedTuple):
    """The two training losses of :class:`DELGLocalHead` (:meth:`DELGLocalHead.losses`).

    Attributes:
        reconstruction: scalar :math:`L_r`, the mean squared reconstruction error.
        attention: scalar :math:`L_a`, the cross-entropy of the attention-pooled classifier.

    Example:
        >>> import torch
        >>> from dml_bias.heads import DELGLocalHead
        >>> head = DELGLocalHead(in_channels=16, dim=4, hidden_channels=8, num_classes=3)
        >>> losses = head.losses(torch.rand(2, 16, 3, 3), torch.tensor([0, 2]))
        >>> losses.reconstruction.shape, losses.attention.shape
        (torch.Size([]), torch.Size([]))
    """

    reconstruction: torch.Tensor
    attention: torch.Tensor


class DELGLocalHead(nn.Module):
    r"""DELG's local head :cite:`cao2020delg`: a 1×1 autoencoder and an attention module on a stop-gradient map.

    With :math:`S` the conv4 map, detached inside :meth:`forward` (so the local losses never reach the
    backbone), the head computes

    .. math::

        D = \operatorname{enc}(S), \qquad S' = \operatorname{ReLU}(\operatorname{dec}(D)), \qquad
        A = \operatorname{softplus}\big(\operatorname{conv}_2(\operatorname{ReLU}(\operatorname{BN}(
        \operatorname{conv}_1(S'))))\big)

    where enc (``in_channels -> dim``) and dec (``dim -> in_channels``) are 1×1 convolutions, enc is linear (no
    activation), :math:`D` holds the local descriptors (L2-normalised only at extraction) and the attention
    convolutions are 1×1, ``in_channels -> hidden_channels -> 1``. The attention sees the **reconstructed**
    features, as in the official code. The losses (:meth:`losses`) are

    .. math::

        L_r = \frac{1}{N H W C} \sum (S' - S)^2, \qquad
        L_a = \operatorname{CE}\Big(\operatorname{att\_fc}\Big(\frac{1}{HW} \sum_{h, w} A_{hw}\,
        \frac{S_{hw}}{\lVert S_{hw} \rVert_2}\Big), y\Big),

    the attention-weighted mean of the *original* (detached) features, L2-normalised over channels per location,
    fed to a linear classifier ``att_fc`` with bias.

    Args:
        in_channels: channels of the input map (1024 for conv4 of ResNet-50/101).
        dim: local descriptor size (128 in DELG).
        hidden_channels: width of the attention module's hidden layer (512 in DELG).
        num_classes: number of training classes; creates ``att_fc``. ``None``: no classifier (inference only;
            :meth:`losses` then raises).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Attributes:
        encoder: :class:`torch.nn.Conv2d` ``in_channels -> dim``, 1×1.
        decoder: ``torch.nn.Sequential`` of a 1×1 :class:`torch.nn.Conv2d` ``dim -> in_channels`` and a ReLU.
        attention: ``torch.nn.Sequential`` conv 1×1, ``torch.nn.BatchNorm2d``, ReLU, conv 1×1, softplus.
        att_fc: :class:`torch.nn.Linear` ``in_channels -> num_classes`` with bias, or ``None``.

    Shape:
        input ``(N, in_channels, H, W)`` floating and finite; output a :class:`LocalHeadOutput` with attention
        ``(N, H, W)``, descriptors ``(N, dim, H, W)`` and reconstruction ``(N, in_channels, H, W)``.

    Precision: the map is cast to the parameters' dtype (as :class:`DELGGlobalHead`; under
    :class:`torch.autocast` autocast picks it). In training mode the attention's BatchNorm needs
    ``N * H * W >= 2``; a single location raises :class:`ValueError` (call ``.eval()`` for one 1×1 map).

    Example:
        >>> import torch
        >>> from dml_bias.heads import DELGLocalHead
        >>> head = DELGLocalHead(in_channels=16, dim=4, hidden_channels=8)
        >>> out = head(torch.rand(2, 16, 3, 3))
        >>> out.descriptors.shape, bool((out.attention > 0).all())
        (torch.Size([2, 4, 3, 3]), True)
    """

    att_fc: nn.Linear | None

    def __init__(
        self,
        in_channels: int = 1024,
        dim: int = 128,
        hidden_channels: int = 512,
        *,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_number(in_channels, "in_channels", low=1, integer=True)
        check_number(dim, "dim", low=1, integer=True)
        check_number(hidden_channels, "hidden_channels", low=1, integer=True)
        if num_classes is not None:
            check_number(num_classes, "num_classes", low=1, integer=True)
        device = check_factory_kwargs(device, dtype)
        self.in_channels = int(in_channels)
        self.dim = int(dim)
        self.hidden_channels = int(hidden_channels)
        self.num_classes = None if num_classes is None else int(num_classes)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.encoder = nn.Conv2d(in_channels, dim, kernel_size=1, **factory)
        self.decoder = nn.Sequential(nn.Conv2d(dim, in_channels, kernel_size=1, **factory), nn.ReLU())
        self.attention = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1, **factory),
            nn.BatchNorm2d(hidden_channels, **factory),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, 1, kernel_size=1, **factory),
            nn.Softplus(),
        )
        self.att_fc = None if num_classes is None else nn.Linear(in_channels, num_classes, bias=True, **factory)

    def forward(self, features: torch.Tensor) -> LocalHeadOutput:
        """Attention, descriptors and reconstruction of a conv4 map ``(N, in_channels, H, W)`` (detached first)."""
        _check_feature_map(features, "features", self.in_channels, "in_channels")
        source = check_head_input(features, "features", self.encoder.weight).detach()
        check_batch_statistics((source.shape[0], source.shape[2], source.shape[3]), "features", self.attention)
        descriptors = self.encoder(source)
        reconstruction = self.decoder(descriptors)
        attention = self.attention(reconstruction).squeeze(1)
        return LocalHeadOutput(attention, descriptors, reconstruction)

    def attention_logits(self, features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        r"""Logits ``(N, num_classes)`` of ``att_fc`` on the attention-pooled, per-location L2-normalised features.

        Args:
            features: ``(N, in_channels, H, W)`` the conv4 map (detached here).
            attention: ``(N, H, W)`` attention scores, e.g. :attr:`LocalHeadOutput.attention`.

        Returns:
            ``(N, num_classes)`` logits :math:`\operatorname{att\_fc}(\operatorname{mean}_{h,w} A \odot
            S / \lVert S \rVert_2)`.

        Raises:
            ValueError: if the head has no classifier (``num_classes=None``) or the shapes disagree.

        Example:
            >>> import torch
            >>> from dml_bias.heads import DELGLocalHead
            >>> head = DELGLocalHead(in_channels=16, dim=4, hidden_channels=8, num_classes=3)
            >>> head.attention_logits(torch.rand(2, 16, 3, 3), torch.rand(2, 3, 3)).shape
            torch.Size([2, 3])
        """
        if self.att_fc is None:
            raise ValueError("attention_logits needs the attention classifier: build the head with num_classes=")
        _check_feature_map(features, "features", self.in_channels, "in_channels")
        check_tensor(attention, "attention")
        check_shape(
            attention,
            "attention",
            ("N", "H", "W"),
            {"N": features.shape[0], "H": features.shape[2], "W": features.shape[3]},
            sources={"N": "features.shape[0]", "H": "features.shape[2]", "W": "features.shape[3]"},
        )
        check_dtype(attention, "attention", "floating")
        features = check_head_input(features, "features", self.att_fc.weight)
        attention = check_head_input(attention, "attention", self.att_fc.weight)
        unit = F.normalize(features.detach(), p=2.0, dim=1)
        pooled = (attention.unsqueeze(1) * unit).mean(dim=(2, 3))
        return self.att_fc(pooled)

    def losses(
        self, features: torch.Tensor, labels: torch.Tensor, output: LocalHeadOutput | None = None
    ) -> LocalHeadLosses:
        """The reconstruction loss :math:`L_r` and attention loss :math:`L_a` (class docstring) of a batch.

        Both are computed in float32 (float64 for float64 inputs), also under :class:`torch.autocast`.

        Args:
            features: ``(N, in_channels, H, W)`` the conv4 map (detached here).
            labels: ``(N,)`` integer class labels in ``[0, num_classes)``.
            output: this head's output for ``features``, to avoid a second forward pass; ``None`` runs it.

        Returns:
            :class:`LocalHeadLosses` of two scalar tensors.

        Raises:
            ValueError: if the head has no classifier, or the shapes or labels are wrong.
            TypeError: if ``labels`` is not an integer tensor.

        Example:
            >>> import torch
            >>> from dml_bias.heads import DELGLocalHead
            >>> head = DELGLocalHead(in_channels=16, dim=4, hidden_channels=8, num_classes=3)
            >>> x = torch.rand(2, 16, 3, 3)
            >>> rec, att = head.losses(x, torch.tensor([0, 2]), head(x))
            >>> bool(rec > 0), bool(att > 0)
            (True, True)
        """
        if self.att_fc is None or self.num_classes is None:
            raise ValueError("losses needs the attention classifier: build the head with num_classes=")
        _check_feature_map(features, "features", self.in_channels, "in_channels")
        check_labels(
            labels, "labels", length=features.shape[0], length_source="features.shape[0]", num_classes=self.num_classes
        )
        check_same_device(features=features, labels=labels)
        if output is None:
            output = self(features)
        target = check_head_input(features, "features", self.encoder.weight).detach()
        compute = torch.promote_types(torch.float32, target.dtype)
        reconstruction_loss = (output.reconstruction.to(compute) - target.to(compute)).square().mean()
        logits = self.attention_logits(features, output.attention)
        attention_loss = F.cross_entropy(logits.to(compute), labels)
        return LocalHeadLosses(reconstruction_loss, attention_loss)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return (
            f"in_channels={self.in_channels}, dim={self.dim}, hidden_channels={self.hidden_channels}, "
            f"num_classes={self.num_classes}"
        )


# --------------------------------------------------------------------------------------------------- backbone


class ReceptiveField(NamedTuple):
    """Geometry of the local feature map of :class:`DELG` in input pixels (:attr:`DELG.receptive_field`).

    Location ``(i, j)`` of the map (row, column) is centred on pixel ``(x, y) = (stride * j + offset,
    stride * i + offset)`` of the input, pixel ``k`` covering ``[k - 0.5, k + 0.5]``; its receptive field spans
    ``size`` pixels around that centre (before clipping at the image border).

    Attributes:
        size: receptive-field size in pixels (267 for torchvision's ResNet-50/101 conv4; DELG's TensorFlow
            ResNet, which strides in the first 1×1 convolution of a block, has 291).
        stride: 32 with DELG's arrangement.
        offset: centre of location ``(0, 0)``, 0.0 for torchvision ResNets.

    Example:
        >>> import torchvision
        >>> from dml_bias.heads import DELG
        >>> DELG(torchvision.models.resnet18(weights=None)).receptive_field
        ReceptiveField(size=211, stride=32, offset=0.0)
    """

    size: int
    stride: int
    offset: float


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _window(module: nn.Module, where: str) -> tuple[int, int, int, int]:
    """``(kernel, stride, padding, dilation)`` of a square, explicitly padded conv/pool layer."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        if isinstance(module.padding, str):
            raise ValueError(f"backbone: {where} uses padding={module.padding!r}; only explicit padding is supported")
        dilation = getattr(module, "dilation", 1)
        geometry = [_pair(v) for v in (module.kernel_size, module.stride, module.padding, dilation)]
        if any(a != b for a, b in geometry):
            raise ValueError(f"backbone: {where} must have the same geometry along height and width, got {module}")
        kernel, stride, padding, dil = (a for a, _ in geometry)
        return kernel, stride, padding, dil
    raise ValueError(f"backbone: {where} must be a Conv2d, MaxPool2d or AvgPool2d, got {type(module).__name__}")


class _Geometry:
    """Composes layers: output index ``i`` is centred on input coordinate ``jump * i + offset``."""

    def __init__(self) -> None:
        self.jump, self.offset, self.size = 1, 0.0, 1

    def copy(self) -> _Geometry:
        other = _Geometry()
        other.jump, other.offset, other.size = self.jump, self.offset, self.size
        return other

    def apply(self, module: nn.Module, where: str) -> None:
        kernel, stride, padding, dilation = _window(module, where)
        extent = dilation * (kernel - 1)  # span of the kernel minus one, in its input's pixels
        self.offset += self.jump * (extent / 2 - padding)
        self.size += extent * self.jump
        self.jump *= stride


def _block_convs(block: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The main-path convolutions of a residual block, in order (everything but ``downsample``)."""
    return [(n, m) for n, m in block.named_children() if isinstance(m, nn.Conv2d)]


def _shortcut_convs(block: nn.Module) -> list[nn.Conv2d]:
    shortcut = getattr(block, "downsample", None)
    return [] if shortcut is None else [m for m in shortcut.modules() if isinstance(m, nn.Conv2d)]


def _local_geometry(net: torchvision.models.ResNet) -> ReceptiveField:
    """Walk the stem, layer1-3 and the stride-2 subsampling of a (modified) torchvision ResNet."""
    geometry = _Geometry()
    geometry.apply(net.conv1, "conv1")
    if not isinstance(net.maxpool, nn.Identity):
        geometry.apply(net.maxpool, "maxpool")
    for layer_name in ("layer1", "layer2", "layer3"):
        for index, block in enumerate(getattr(net, layer_name)):
            where = f"{layer_name}[{index}]"
            convs = _block_convs(block)
            if not convs:
                raise ValueError(f"backbone: {where} has no convolution; expected a torchvision residual block")
            shortcut = geometry.copy()
            for name, conv in convs:
                geometry.apply(conv, f"{where}.{name}")
            for conv in _shortcut_convs(block):
                shortcut.apply(conv, f"{where}.downsample")
            if (shortcut.jump, shortcut.offset) != (geometry.jump, geometry.offset):
                raise ValueError(f"backbone: the shortcut of {where} is not aligned with its main path")
    geometry.apply(nn.MaxPool2d(kernel_size=1, stride=2), "subsample")
    return ReceptiveField(size=geometry.size, stride=geometry.jump, offset=float(geometry.offset))


def _local_map_size(net: torchvision.models.ResNet, height: int, width: int) -> tuple[int, int]:
    """``(h, w)`` of the subsampled conv4 map (the smallest map of the backbone) for ``height x width`` images."""

    def shrink(size: int, module: nn.Module) -> int:
        kernel, stride, padding, dilation = _window(module, "")
        return max(0, (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1)

    modules: list[nn.Module] = [net.conv1]
    if not isinstance(net.maxpool, nn.Identity):
        modules.append(net.maxpool)
    for layer_name in ("layer1", "layer2", "layer3"):
        for block in getattr(net, layer_name):
            modules.extend(conv for _, conv in _block_convs(block))
    modules.append(nn.MaxPool2d(kernel_size=1, stride=2))
    for module in modules:
        height, width = shrink(height, module), shrink(width, module)
    return height, width


def _set_layer4_stride_one(net: torchvision.models.ResNet) -> None:
    """DELG's arrangement: conv5's first block at stride 1 (the stride moves to a 1×1 max-pool after conv4)."""
    first = net.layer4[0]
    strided = [conv for _, conv in _block_convs(first) if _pair(conv.stride) != (1, 1)]
    shortcut = [conv for conv in _shortcut_convs(first) if _pair(conv.stride) != (1, 1)]
    if len(strided) != 1 or _pair(strided[0].stride) != (2, 2) or len(shortcut) != 1:
        raise ValueError(
            "backbone: layer4 must downsample by 2 in its first block (a standard torchvision ResNet, without "
            "replace_stride_with_dilation)"
        )
    for layer in net.layer4.modules():
        if isinstance(layer, nn.Conv2d) and _pair(layer.dilation) != (1, 1):
            raise ValueError("backbone: layer4 must not be dilated (replace_stride_with_dilation unset)")
    strided[0].stride = (1, 1)
    shortcut[0].stride = (1, 1)


def _out_channels(layer: nn.Module) -> int:
    convs = _block_convs(layer[-1])  # type: ignore[index]
    return int(convs[-1][1].out_channels)


def _load_weights(net: nn.Module, weights: str | os.PathLike[str]) -> None:
    """Load a state dict file into the backbone (``fc.*`` entries of a classification checkpoint are ignored)."""
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a path (str or os.PathLike) to a state dict file, got {describe(weights)}")
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: no such file {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"weights: {path!r} could not be read as a state dict ({error})") from error
    if not isinstance(state, Mapping):
        raise TypeError(f"weights: {path!r} must hold a state dict (a mapping), got {type(state).__name__}")
    state = {key: value for key, value in state.items() if not str(key).startswith("fc.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"weights: {path!r} does not match the backbone: {error}") from error


# --------------------------------------------------------------------------------------------------- DELG


class DELGOutput(NamedTuple):
    r"""What :meth:`DELG.forward` returns; the four losses are ``None`` without labels.

    Attributes:
        global_descriptor: ``(N, global_dim)`` L2-normalised global descriptors.
        local_descriptors: ``(N, local_dim, H, W)`` local descriptors (encoder output, not normalised).
        attention: ``(N, H, W)`` attention scores of the local features.
        locations: ``(H * W, 2)`` float32 ``(x, y)`` input-pixel centres of the receptive fields of the map
            locations, row-major (the order of ``attention.flatten(1)``).
        loss: scalar total :math:`L_g + \lambda L_r + \beta L_a`.
        global_loss: scalar ArcFace loss :math:`L_g`.
        reconstruction_loss: scalar :math:`L_r`.
        attention_loss: scalar :math:`L_a`.

    Example:
        >>> import torch, torchvision
        >>> from dml_bias.heads import DELG
        >>> model = DELG(torchvision.models.resnet18(weights=None), num_classes=3, global_dim=8, local_dim=4)
        >>> out = model(torch.rand(2, 3, 64, 64), torch.tensor([0, 2]))
        >>> out.global_descriptor.shape, out.attention.shape, out.locations.tolist()
        (torch.Size([2, 8]), torch.Size([2, 2, 2]), [[0.0, 0.0], [32.0, 0.0], [0.0, 32.0], [32.0, 32.0]])
    """

    global_descriptor: torch.Tensor
    local_descriptors: torch.Tensor
    attention: torch.Tensor
    locations: torch.Tensor
    loss: torch.Tensor | None = None
    global_loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    attention_loss: torch.Tensor | None = None


class LocalFeatures(NamedTuple):
    """Local features of a batch from :meth:`DELG.extract_local`, padded to the longest list.

    Image ``n`` has ``lengths[n]`` features, sorted by descending score, in rows ``[:lengths[n]]``; the rows
    after them are zeros. ``F = max(lengths)`` (at most ``max_features``).

    Attributes:
        locations: ``(N, F, 2)`` float ``(x, y)`` in the input image's pixels.
        descriptors: ``(N, F, local_dim)`` L2-normalised descriptors.
        scores: ``(N, F)`` attention scores.
        scales: ``(N, F)`` the pyramid scale each feature was extracted at (DELG's files store its inverse).
        lengths: ``(N,)`` int64 number of features per image.

    Example:
        >>> import torch, torchvision
        >>> from dml_bias.heads import DELG
        >>> model = DELG(torchvision.models.resnet18(weights=None), global_dim=8, local_dim=4)
        >>> feats = model.extract_local(torch.rand(2, 3, 64, 64), scales=(1.0,), max_features=3)
        >>> feats.descriptors.shape, feats.lengths.tolist()
        (torch.Size([2, 3, 4]), [3, 3])
    """

    locations: torch.Tensor
    descriptors: torch.Tensor
    scores: torch.Tensor
    scales: torch.Tensor
    lengths: torch.Tensor


class DELG(nn.Module):
    r"""DELG :cite:`cao2020delg`: global and local features from one ResNet, trained jointly.

    The backbone is a torchvision ResNet without its classifier. DELG's stride arrangement is applied to it:
    the conv4 (``layer3``) output goes through a 1×1 max-pool with stride 2 (:attr:`subsample`, i.e. every
    second row and column) and conv5's first block (``layer4[0]``) runs at stride 1, so conv4 and conv5 both have
    stride 32; only strides change, so torchvision checkpoints still load. Subsampled conv4 feeds the
    :class:`DELGLocalHead` (through a stop-gradient), conv5 the :class:`DELGGlobalHead`.

    **Input**: :meth:`forward` and the extractors take float images ``(N, 3, H, W)`` already normalised the way
    the backbone was pre-trained: ImageNet mean/std for torchvision weights, e.g.
    ``torchvision.transforms.v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])`` on images in
    ``[0, 1]`` (DELG's own TensorFlow backbone uses ``(pixel - 128) / 128`` instead). A batch shares one size; pad
    smaller images (the padding then enters GeM and may yield local features). Images must be finite (NaN or
    infinite values raise :class:`ValueError`) and are cast to the parameters' dtype: float16, bfloat16 or
    float64 images on a float32 model run in float32 (under :class:`torch.autocast` autocast picks the dtype).
    In training mode BatchNorm needs more than one location per batch in the smallest (stride-32) map: one
    image smaller than about 33×33 pixels raises :class:`ValueError` (call ``.eval()`` first).

    **Training** (labels given): :math:`L = L_g + \lambda L_r + \beta L_a` with :math:`L_g` the ArcFace loss of
    the global descriptor (:attr:`arcface`, a :class:`dml_bias.losses.AdditiveAngularMarginLoss` with margin 0.1
    and scale :math:`\sqrt{C_g}`, kept fixed as in DELG) and :math:`L_r`, :math:`L_a` the local head's losses. The local
    losses train only the local head; the backbone learns from :math:`L_g` alone.

    Args:
        backbone: ``"resnet50"`` or ``"resnet101"`` (built with ``weights=None``: nothing is downloaded), or a
            torchvision :class:`~torchvision.models.ResNet` instance (e.g. a small ``resnet18``), which is
            **copied** (the argument is left unchanged); channel counts are read from it.
        num_classes: number of training classes; creates :attr:`arcface` and the local head's ``att_fc``.
            ``None``: an inference-only model (passing labels raises).
        global_dim: global descriptor size :math:`C_g` (2048 in DELG).
        local_dim: local descriptor size (128 in DELG).
        weights: optional path to a state dict for the backbone (e.g. a saved torchvision ResNet
            ``state_dict()``; its ``fc.*`` entries are ignored), loaded with ``torch.load(..., weights_only=True)``.
        arcface_margin: ArcFace angular margin in radians (0.1 in DELG).
        arcface_scale: ArcFace logit scale; ``None`` gives :math:`\sqrt{C_g}` (45.25 for 2048).
        reconstruction_weight: :math:`\lambda \ge 0` (10 in DELG).
        attention_weight: :math:`\beta \ge 0` (1 in DELG).

    Attributes:
        backbone: the modified :class:`~torchvision.models.ResNet` (``fc`` replaced by an identity).
        subsample: the 1×1 stride-2 ``torch.nn.MaxPool2d`` after ``layer3``.
        global_head: :class:`DELGGlobalHead`.
        local_head: :class:`DELGLocalHead`.
        arcface: :class:`dml_bias.losses.AdditiveAngularMarginLoss` (holds the class weights) or ``None``.
        receptive_field: :class:`ReceptiveField` of the local map, derived from the backbone's layers.

    Raises:
        ValueError: for an unknown backbone name, a ResNet without the standard stride-2 ``layer4``, a weights
            file that does not fit the backbone, or out-of-range numbers.
        TypeError: if ``backbone`` is neither a name nor a ResNet, or an argument has the wrong type.
        FileNotFoundError: if ``weights`` names no file.

    Example:
        >>> import torch, torchvision
        >>> from dml_bias.heads import DELG
        >>> model = DELG(torchvision.models.resnet18(weights=None), num_classes=5, global_dim=16, local_dim=8)
        >>> out = model(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
        >>> out.loss.backward()
        >>> model.extract_global(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 16])
    """

    arcface: AdditiveAngularMarginLoss | None

    def __init__(
        self,
        backbone: str | torchvision.models.ResNet = "resnet50",
        num_classes: int | None = None,
        *,
        global_dim: int = 2048,
        local_dim: int = 128,
        weights: str | os.PathLike[str] | None = None,
        arcface_margin: float = 0.1,
        arcface_scale: float | None = None,
        reconstruction_weight: float = 10.0,
        attention_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes is not None:
            check_number(num_classes, "num_classes", low=1, integer=True)
        check_number(global_dim, "global_dim", low=1, integer=True)
        check_number(local_dim, "local_dim", low=1, integer=True)
        check_number(arcface_margin, "arcface_margin", low=0.0, high=math.pi, high_inclusive=False)
        if arcface_scale is not None:
            check_number(arcface_scale, "arcface_scale", low=0.0, low_inclusive=False)
        check_number(reconstruction_weight, "reconstruction_weight", low=0.0)
        check_number(attention_weight, "attention_weight", low=0.0)
        if isinstance(backbone, str):
            check_choice(backbone, "backbone", ("resnet50", "resnet101"))
            net = (
                torchvision.models.resnet50(weights=None)
                if backbone == "resnet50"
                else torchvision.models.resnet101(weights=None)
            )
            self.backbone_name = backbone
        elif isinstance(backbone, torchvision.models.ResNet):
            net = copy.deepcopy(backbone)
            self.backbone_name = type(backbone).__name__
        else:
            raise TypeError(
                f"backbone must be 'resnet50', 'resnet101' or a torchvision.models.ResNet, got {describe(backbone)}"
            )
        net.fc = nn.Identity()
        if weights is not None:
            _load_weights(net, weights)
        _set_layer4_stride_one(net)
        self.backbone = net
        self.subsample = nn.MaxPool2d(kernel_size=1, stride=2)
        self.receptive_field = _local_geometry(net)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.global_dim = int(global_dim)
        self.local_dim = int(local_dim)
        self.reconstruction_weight = float(reconstruction_weight)
        self.attention_weight = float(attention_weight)
        reference = net.conv1.weight
        factory: dict[str, Any] = {"device": reference.device, "dtype": reference.dtype}
        self.global_head = DELGGlobalHead(_out_channels(net.layer4), global_dim, **factory)
        self.local_head = DELGLocalHead(_out_channels(net.layer3), local_dim, num_classes=num_classes, **factory)
        if num_classes is None:
            self.arcface = None
        else:
            scale = math.sqrt(global_dim) if arcface_scale is None else float(arcface_scale)
            self.arcface = AdditiveAngularMarginLoss(
                num_classes, global_dim, margin=arcface_margin, scale=scale, **factory
            )

    # ----------------------------------------------------------------------------------------------- helpers

    @property
    def in_channels(self) -> int:
        """Number of image channels the backbone takes (3 for a torchvision ResNet)."""
        return int(self.backbone.conv1.in_channels)

    def _check_images(self, images: Any) -> torch.Tensor:
        """Validate ``images`` (finite, on the model's device) and return them in the parameters' dtype."""
        check_tensor(images, "images")
        check_dtype(images, "images", "floating")
        check_shape(images, "images", ("N", "C", "H", "W"), {"C": self.in_channels}, sources={"C": "3 channels"})
        if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            raise ValueError(f"images must hold at least one image of at least 1×1 pixels, got {describe(images)}")
        return check_head_input(images, "images", self.backbone.conv1.weight)

    def _local_map(self, images: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        return self.subsample(net.layer3(net.layer2(net.layer1(x))))

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """No gradients and every module in eval mode; each module's own mode is restored afterwards."""
        modes = [(module, module.training) for module in self.modules()]
        try:
            self.eval()
            with torch.no_grad():
                yield
        finally:
            for module, mode in modes:
                module.training = mode

    @staticmethod
    def _check_scales(scales: Any, name: str) -> tuple[float, ...]:
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
            raise TypeError(f"{name} must be a non-empty sequence of positive numbers, got {describe(scales)}")
        if len(scales) == 0:
            raise ValueError(f"{name} must be a non-empty sequence of positive numbers, got an empty sequence")
        for index, scale in enumerate(scales):
            check_number(scale, f"{name}[{index}]", low=0.0, low_inclusive=False)
        return tuple(float(s) for s in scales)

    @staticmethod
    def _resize(images: torch.Tensor, scale: float, antialias: bool) -> torch.Tensor:
        height, width = images.shape[2:]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if size == (height, width):
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=antialias)

    # ----------------------------------------------------------------------------------------------- API

    def feature_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's two maps: subsampled conv4 (local head input) and conv5 (global head input).

        Args:
            images: ``(N, 3, H, W)`` normalised float images.

        Returns:
            ``(conv4, conv5)``, both at stride 32: ``(N, C4, h, w)`` and ``(N, C5, h, w)`` (``C4 = 1024``,
            ``C5 = 2048`` for ResNet-50/101).

        Example:
            >>> import torch, torchvision
            >>> from dml_bias.heads import DELG
            >>> conv4, conv5 = DELG(torchvision.models.resnet18(weights=None)).feature_maps(torch.rand(1, 3, 96, 64))
            >>> conv4.shape, conv5.shape
            (torch.Size([1, 256, 3, 2]), torch.Size([1, 512, 3, 2]))
        """
        images = self._check_images(images)
        local_map = self._local_map(images)
        return local_map, self.backbone.layer4(local_map)

    def feature_locations(self, height: int, width: int, *, device: torch.device | str | None = None) -> torch.Tensor:
        """``(height * width, 2)`` float32 ``(x, y)`` input-pixel centres of a local map of that size, row-major.

        Location ``(i, j)`` is at ``(stride * j + offset, stride * i + offset)`` (:attr:`receptive_field`).

        Example:
            >>> import torchvision
            >>> from dml_bias.heads import DELG
            >>> DELG(torchvision.models.resnet18(weights=None)).feature_locations(2, 3).tolist()
            [[0.0, 0.0], [32.0, 0.0], [64.0, 0.0], [0.0, 32.0], [32.0, 32.0], [64.0, 32.0]]
        """
        check_number(height, "height", low=0, integer=True)
        check_number(width, "width", low=0, integer=True)
        stride, offset = self.receptive_field.stride, self.receptive_field.offset
        ys = torch.arange(height, device=device, dtype=torch.float32) * stride + offset
        xs = torch.arange(width, device=device, dtype=torch.float32) * stride + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> DELGOutput:
        """Descriptors, attention and keypoint locations of a batch, and the training losses when labels are given.

        Args:
            images: ``(N, 3, H, W)`` normalised float images (see the class docstring).
            labels: ``(N,)`` integer class labels in ``[0, num_classes)``, or ``None``.

        Returns:
            :class:`DELGOutput`.

        Raises:
            ValueError: if labels are given to a model without ``num_classes``, or the shapes are wrong.
            TypeError: if ``images`` is not a floating tensor or ``labels`` not an integer one.
        """
        images = self._check_images(images)
        if self.training:
            # Checked before the backbone runs: BatchNorm would raise mid-forward, naming no argument.
            height, width = _local_map_size(self.backbone, images.shape[2], images.shape[3])
            check_batch_statistics(
                (images.shape[0], height, width), "images", self, what=f"{describe(images)} (a {height}×{width} map)"
            )
        arcface = self.arcface
        if labels is not None:
            if arcface is None or self.num_classes is None:
                raise ValueError("labels were given but the model has no classifiers: build it with num_classes=")
            check_labels(
                labels,
                "labels",
                length=images.shape[0],
                length_source="images.shape[0]",
                num_classes=self.num_classes,
            )
            check_same_device(images=images, labels=labels)
        local_map = self._local_map(images)
        global_descriptor = self.global_head(self.backbone.layer4(local_map))
        local = self.local_head(local_map)
        locations = self.feature_locations(local_map.shape[2], local_map.shape[3], device=images.device)
        if labels is None or arcface is None:
            return DELGOutput(global_descriptor, local.descriptors, local.attention, locations)
        global_loss = arcface(global_descriptor, labels)
        local_losses = self.local_head.losses(local_map, labels, local)
        loss = (
            global_loss
            + self.reconstruction_weight * local_losses.reconstruction
            + self.attention_weight * local_losses.attention
        )
        return DELGOutput(
            global_descriptor,
            local.descriptors,
            local.attention,
            locations,
            loss,
            global_loss,
            local_losses.reconstruction,
            local_losses.attention,
        )

    def extract_global(
        self, images: torch.Tensor, scales: Sequence[float] = _GLOBAL_SCALES, *, antialias: bool = False
    ) -> torch.Tensor:
        r"""Multi-scale global descriptors: per-scale L2-normalised descriptors summed and L2-normalised again.

        Each scale :math:`s` resizes the batch to ``(round(H s), round(W s))`` with bilinear interpolation
        (``align_corners=False``, as TensorFlow's ``tf.image.resize`` that DELG uses; no antialiasing by default,
        as DELG). Runs under :class:`torch.no_grad` with the model in eval mode; every module's mode is restored.

        Args:
            images: ``(N, 3, H, W)`` normalised float images.
            scales: positive scales, DELG's :math:`\{1/\sqrt{2}, 1, \sqrt{2}\}` by default.
            antialias: antialias when downscaling (``torch.nn.functional.interpolate``).

        Returns:
            ``(N, global_dim)`` L2-normalised descriptors.

        Example:
            >>> import torch, torchvision
            >>> from dml_bias.heads import DELG
            >>> model = DELG(torchvision.models.resnet18(weights=None), global_dim=8)
            >>> model.extract_global(torch.rand(2, 3, 64, 64), scales=(0.5, 1.0)).norm(dim=1)
            tensor([1.0000, 1.0000])
        """
        images = self._check_images(images)
        scales = self._check_scales(scales, "scales")
        with self._inference():
            # _check_scales returned a non-empty tuple: the sum starts from the first scale's descriptor.
            descriptors = (
                self.global_head(self.backbone.layer4(self._local_map(self._resize(images, scale, antialias))))
                for scale in scales
            )
            total = next(descriptors)
            for descriptor in descriptors:
                total = total + descriptor
            return normalize(total)

    def extract_local(
        self,
        images: torch.Tensor,
        scales: Sequence[float] = _PYRAMID,
        *,
        score_threshold: float = 0.0,
        max_features: int = 1000,
        antialias: bool = False,
    ) -> LocalFeatures:
        r"""Multi-scale local features: attention-selected, L2-normalised descriptors with their locations.

        For every scale :math:`s` (resized as in :meth:`extract_global`) the local head gives attention scores and
        descriptors on the stride-32 map; locations with score ``>= score_threshold`` are kept, pooled over the
        scales, and the ``max_features`` with the highest scores are returned (ties in scale order, then row-major).
        DELG's final NMS at IoU 1.0 is not run: it removes only identical receptive boxes, and two locations never
        share one (one scale: different centres; two scales: different box sizes), so it keeps everything.

        Locations are the receptive-field centres mapped back to the input image: for a map of the resized image
        of width :math:`W_s`, :math:`x = (x_s + 0.5)\,W / W_s - 0.5` (likewise :math:`y`), the exact inverse of
        the resize's sampling grid; DELG divides by :math:`s` (:math:`x_s / s`), which differs by at most
        :math:`|1/s - 1| / 2` pixels.

        Runs under :class:`torch.no_grad` with the model in eval mode; every module's mode is restored.

        Args:
            images: ``(N, 3, H, W)`` normalised float images.
            scales: positive pyramid scales, DELG's seven :math:`\{0.25, 0.3536, 0.5, 0.7071, 1, 1.4142, 2\}` by
                default.
            score_threshold: minimum attention score. The default 0.0 keeps every location (softplus scores are
                positive), which suits an untrained head; DELG's trained models use 166 to 455 (see
                :doc:`/guides/delg`).
            max_features: maximum number of features per image, ``>= 1`` (DELG: 1000).
            antialias: antialias when downscaling.

        Returns:
            :class:`LocalFeatures`, padded with zeros to ``F = max(lengths)``.

        Example:
            >>> import torch, torchvision
            >>> from dml_bias.heads import DELG
            >>> model = DELG(torchvision.models.resnet18(weights=None), local_dim=4)
            >>> feats = model.extract_local(torch.rand(1, 3, 64, 64), scales=(0.5, 1.0))
            >>> feats.lengths.tolist(), sorted(feats.scales[0].tolist())  # 1×1 locations at 0.5, 2×2 at 1.0
            ([5], [0.5, 1.0, 1.0, 1.0, 1.0])
        """
        images = self._check_images(images)
        scales = self._check_scales(scales, "scales")
        check_number(score_threshold, "score_threshold")
        check_number(max_features, "max_features", low=1, integer=True)
        batch, _, height, width = images.shape
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with self._inference():
            for scale in scales:
                resized = self._resize(images, scale, antialias)
                local = self.local_head(self._local_map(resized))
                map_h, map_w = local.attention.shape[1:]
                grid = self.feature_locations(map_h, map_w, device=images.device)
                ratio = torch.tensor(
                    [width / resized.shape[3], height / resized.shape[2]], device=images.device, dtype=torch.float32
                )
                locations = ((grid + 0.5) * ratio - 0.5).expand(batch, -1, -1)
                descriptors = F.normalize(local.descriptors, p=2.0, dim=1).flatten(2).transpose(1, 2)
                scores = local.attention.flatten(1)
                parts.append((locations, descriptors, scores, torch.full_like(scores, scale)))
        locations, descriptors, scores, feature_scales = (
            torch.cat(column, dim=1) for column in zip(*parts, strict=True)
        )
        keep = scores >= score_threshold
        ranked = torch.where(keep, scores, torch.full_like(scores, -math.inf))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        lengths = keep.sum(dim=1).clamp(max=max_features)
        count = int(lengths.max())
        order = order[:, :count]
        valid = torch.arange(count, device=images.device) < lengths.unsqueeze(1)

        def take(values: torch.Tensor) -> torch.Tensor:
            index = order.reshape(*order.shape, *([1] * (values.ndim - 2))).expand(-1, -1, *values.shape[2:])
            picked = values.gather(1, index)
            return picked * valid.reshape(*valid.shape, *([1] * (values.ndim - 2))).to(picked.dtype)

        return LocalFeatures(
            locations=take(locations),
            descriptors=take(descriptors),
            scores=take(scores),
            scales=take(feature_scales),
            lengths=lengths.to(torch.int64),
        )

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return (
            f"backbone={self.backbone_name!r}, num_classes={self.num_classes}, global_dim={self.global_dim}, "
            f"local_dim={self.local_dim}, reconstruction_weight={self.reconstruction_weight}, "
            f"attention_weight={self.attention_weight}"
        )
