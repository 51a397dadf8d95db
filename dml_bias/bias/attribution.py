r"""What an embedding model looks at, measured without retraining.

* :func:`~dml_bias.bias.similarity_attribution`: per-pixel maps that explain the cosine similarity of a query
  image to a reference (Grad-CAM :cite:`selvaraju2017gradcam` applied to the similarity score, as Stylianou et
  al. visualise similarity networks :cite:`stylianou2019visualizing`);
* :func:`~dml_bias.bias.foreground_energy`: the share of a map's positive attribution that falls on the object
  (the energy-based pointing game of Score-CAM :cite:`wang2020scorecam`), with the object's area share as the
  chance level;
* :func:`~dml_bias.bias.background_sensitivity`: how far an embedding moves when only the background is
  replaced, against when only the object is replaced (both with
  :func:`~dml_bias.transforms.functional.swap_background`).

All three work on any :class:`torch.nn.Module` that maps a batch of images to a batch of embeddings; the study
(:func:`~dml_bias.bias.run_study`) reports them for every trained model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dml_bias._checks import (
    check_choice,
    check_dtype,
    check_embeddings,
    check_finite,
    check_labels,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
    describe,
)

__all__ = [
    "ATTRIBUTION_METHODS",
    "BackgroundSensitivity",
    "ForegroundEnergy",
    "background_sensitivity",
    "foreground_energy",
    "similarity_attribution",
]

#: The attribution methods of :func:`similarity_attribution`.
ATTRIBUTION_METHODS: tuple[str, ...] = ("gradcam",)


# ---------------------------------------------------------------------------------------------------- helpers


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping images to embeddings, got {describe(model)}")
    return model


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode and give every sub-module its own training flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _find_layer(model: nn.Module, layer: Any) -> tuple[nn.Module, str]:
    """The sub-module ``layer`` (a module of ``model`` or a dotted name of one) and its name."""
    named = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in named:
            names = [n for n in named if n][:8]
            raise ValueError(
                f"layer must name a sub-module of model, got {layer!r}; model has e.g. {', '.join(map(repr, names))}"
            )
        return named[layer], layer
    if isinstance(layer, nn.Module):
        for name, module in named.items():
            if module is layer:
                return module, name or "model"
        raise ValueError(f"layer must be a sub-module of model, got a {type(layer).__name__} that model does not hold")
    raise TypeError(f"layer must be a sub-module of model or its dotted name, got {describe(layer)}")


def _check_images(x: Any, name: str, sizes: dict[str, int] | None = None) -> dict[str, int]:
    check_tensor(x, name)
    if x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D tensor of shape (N, C, H, W), got {describe(x)}")
    sizes = check_shape(x, name, ("N", "C", "H", "W"), sizes)
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image (N >= 1), got {describe(x)}")
    return sizes


def _check_masks(masks: Any, name: str, n: int, h: int, w: int, source: str, *, binary: bool) -> torch.Tensor:
    """``masks`` of shape ``(N, H, W)`` or ``(N, 1, H, W)`` → a bool ``(N, H, W)`` object mask (if ``binary``)."""
    check_tensor(masks, name)
    if masks.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating-point tensor, got {describe(masks)}")
    if masks.ndim == 4 and masks.shape[1] == 1:
        flat = masks[:, 0]
    elif masks.ndim == 3:
        flat = masks
    else:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {describe(masks)}")
    if tuple(flat.shape) != (n, h, w):
        raise ValueError(
            f"{name} must have shape ({n}, {h}, {w}) or ({n}, 1, {h}, {w}) to match {source}, got {describe(masks)}"
        )
    if not binary:
        return flat
    if flat.dtype == torch.bool:
        return flat
    values = torch.unique(flat)
    found = {float(v) for v in values.tolist()}
    if not (found <= {0.0, 1.0} or (not flat.is_floating_point() and found <= {0.0, 255.0})):
        shown = ", ".join(f"{v:g}" for v in sorted(found)[:6]) + (", …" if len(found) > 6 else "")
        raise ValueError(
            f"{name} must be a binary mask (bool, 0/1, or integer 0/255 with 255 = object), got values {shown}"
        )
    return flat != 0


def _similarity_gradient(
    embeddings: Any, ref: torch.Tensor, captured: list[torch.Tensor], layer_name: str, n: int
) -> torch.Tensor:
    """The gradient of the per-row cosine similarity with respect to the captured layer output."""
    if not captured:
        raise ValueError(f"layer {layer_name!r} did not run in model's forward pass; choose a layer it uses")
    if len(captured) > 1:
        raise ValueError(
            f"layer {layer_name!r} ran {len(captured)} times in one forward pass; choose a layer that runs once"
        )
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise ValueError(f"model must map query to ({n}, D) embeddings, got {describe(embeddings)}")
    if embeddings.shape[1] != ref.shape[1]:
        raise ValueError(
            f"reference must have the embedding size D={embeddings.shape[1]} of model's output, got {describe(ref)}"
        )
    # at least float32, so half-precision models get a usable gradient; float64 stays float64
    work = torch.promote_types(embeddings.dtype, torch.float32)
    score = F.cosine_similarity(embeddings.to(work), ref.detach().to(work), dim=1)
    (grads,) = torch.autograd.grad(score.sum(), captured[0])
    return grads


# ------------------------------------------------------------------------------------------------ attribution


def similarity_attribution(
    model: nn.Module,
    query: torch.Tensor,
    reference: torch.Tensor,
    *,
    layer: nn.Module | str,
    method: str = "gradcam",
) -> torch.Tensor:
    r"""Per-pixel maps explaining the cosine similarity of each query image to its reference.

    For each ``i`` the score is :math:`s_i = \cos(f(q_i), r_i)`, where :math:`f` is ``model`` and :math:`r_i`
    the embedding of ``reference[i]`` (an image, embedded by ``model``, or an embedding given directly). With
    :math:`A_i \in \mathbb{R}^{K \times h \times w}` the output of ``layer`` for :math:`q_i`, Grad-CAM
    :cite:`selvaraju2017gradcam` applied to the similarity score (as in :cite:`stylianou2019visualizing`) is

    .. math::

        \alpha_{ik} = \frac{1}{hw} \sum_{u,v} \frac{\partial s_i}{\partial A_{ikuv}}, \qquad
        M_i = \operatorname{ReLU}\Big(\sum_k \alpha_{ik} A_{ik}\Big),

    bilinearly resized (``align_corners=False``) from ``h × w`` to the input's ``H × W``. Large values mark the
    query's regions that make it *more* similar to the reference. The maps are not normalised, so maps of one
    call can be compared; divide by each map's maximum to display them.

    The model runs in eval mode (so batch statistics do not mix the queries); afterwards every sub-module's
    training flag is as before, the temporary hook on ``layer`` is removed, and the parameters and their
    ``.grad`` are untouched (the gradient is taken with ``torch.autograd.grad`` with respect to the layer's
    output only, and autograd records only the part of the forward pass after ``layer``). The call works inside
    ``torch.no_grad()`` and ``torch.inference_mode()``, on any device. Memory grows with ``N``: pass large sets in
    chunks.

    Args:
        model: A module mapping ``(N, C, H, W)`` images to ``(N, D)`` embeddings.
        query: ``(N, C, H, W)`` floating-point query images, as ``model`` takes them (normalised etc.).
        reference: ``(N, C', H', W')`` reference images (embedded by ``model`` without gradients) or ``(N, D)``
            reference embeddings, on the device of ``query``.
        layer: The sub-module whose output is explained, or its dotted name in ``model.named_modules()`` (for
            example ``"features"`` of :class:`~dml_bias.bias.SmallCNN` or ``"trunk.layer4"`` of
            :func:`~dml_bias.bias.build_resnet50`). Its output must be an ``(N, K, h, w)`` tensor and it must
            run exactly once per forward pass.
        method: ``"gradcam"`` (see :data:`ATTRIBUTION_METHODS`).

    Returns:
        ``(N, H, W)`` non-negative maps in ``query``'s dtype and device (no gradient attached).

    Raises:
        TypeError: ``model`` is not a module, ``layer`` is neither a module nor a name, or a tensor has the wrong
            dtype.
        ValueError: ``layer`` is not part of ``model``, does not run, runs more than once, or the shapes do not
            match (the message names the argument).

    Example:
        >>> import torch
        >>> from dml_bias.bias import SmallCNN
        >>> model = SmallCNN(embedding_size=8, width=4)
        >>> query, reference = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
        >>> maps = similarity_attribution(model, query, reference, layer="features")
        >>> maps.shape, bool((maps >= 0).all()), model.training
        (torch.Size([2, 16, 16]), True, True)
    """
    model = _check_model(model)
    check_choice(method, "method", ATTRIBUTION_METHODS)
    target, layer_name = _find_layer(model, layer)
    sizes = _check_images(query, "query")
    check_dtype(query, "query", "floating")
    check_tensor(reference, "reference")
    if reference.ndim == 4:
        _check_images(reference, "reference", {"N": sizes["N"]})
        check_dtype(reference, "reference", "floating")
    elif reference.ndim == 2:
        check_embeddings(reference, "reference")
        check_shape(reference, "reference", ("N", None), {"N": sizes["N"]}, sources={"N": "query.shape[0]"})
    else:
        raise ValueError(f"reference must be (N, C, H, W) images or (N, D) embeddings, got {describe(reference)}")
    check_same_device(query=query, reference=reference)
    captured: list[torch.Tensor] = []

    def keep_output(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"layer must output an (N, K, h, w) tensor, got {describe(output)} from {layer_name!r}")
        # A fresh leaf, so the gradient stops here; the clone keeps it safe from in-place ops further on.
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        # The forward pass runs without autograd up to this layer and with it from here on: only the part that
        # the gradient needs is recorded (a fraction of the memory of a full training graph).
        torch.set_grad_enabled(True)
        return leaf.clone()

    grad_mode = torch.is_grad_enabled()
    with torch.inference_mode(False), _eval_mode(model):
        try:
            torch.set_grad_enabled(False)
            ref = model(reference.clone()) if reference.ndim == 4 else reference.clone()
            if not isinstance(ref, torch.Tensor) or ref.ndim != 2:
                raise ValueError(f"model must map images to (N, D) embeddings, got {describe(ref)}")
            handle = target.register_forward_hook(keep_output)
            try:
                embeddings = model(query.detach().clone())
            finally:
                handle.remove()
            torch.set_grad_enabled(True)
            grads = _similarity_gradient(embeddings, ref, captured, layer_name, sizes["N"])
        finally:
            torch.set_grad_enabled(grad_mode)
    activations = captured[0]
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations.detach()).sum(dim=1, keepdim=True))
    maps = F.interpolate(
        cam.to(torch.promote_types(cam.dtype, torch.float32)),
        size=(sizes["H"], sizes["W"]),
        mode="bilinear",
        align_corners=False,
    )
    return maps[:, 0].clamp_min(0).to(query.dtype)


class ForegroundEnergy(NamedTuple):
    """What :func:`foreground_energy` returns: per image, the energy on the object and its chance level.

    Example:
        >>> import torch
        >>> ForegroundEnergy(torch.tensor([0.8]), torch.tensor([0.25])).energy
        tensor([0.8000])
    """

    #: ``(N,)`` share of the map's positive attribution inside the object mask (NaN for an all-zero map).
    energy: torch.Tensor
    #: ``(N,)`` share of the image's pixels inside the object mask: the energy of a uniform map.
    chance: torch.Tensor


def foreground_energy(maps: torch.Tensor, masks: torch.Tensor) -> ForegroundEnergy:
    r"""The share of each map's positive attribution that lies on the object, and the chance level beside it.

    The energy-based pointing game of Score-CAM :cite:`wang2020scorecam`: with :math:`M^+ = \max(M, 0)` and the
    object mask :math:`B`,

    .. math::

        E = \frac{\sum_{u,v} M^+_{uv} B_{uv}}{\sum_{u,v} M^+_{uv}} \in [0, 1], \qquad
        \text{chance} = \frac{1}{HW} \sum_{u,v} B_{uv},

    the chance level being the energy of a uniform map. A model that looks at the object scores well above
    chance; one that looks at the background, below it. An all-zero map has no energy to share: its ``energy`` is
    NaN.

    Args:
        maps: ``(N, H, W)`` floating-point attribution maps (e.g. from :func:`similarity_attribution`), finite.
        masks: ``(N, H, W)`` or ``(N, 1, H, W)`` binary object masks of the same size: bool, 0/1, or ``uint8``
            0/255 (255 = object).

    Returns:
        A :class:`ForegroundEnergy` ``(energy, chance)`` of two ``(N,)`` float tensors on ``maps``' device.

    Raises:
        TypeError: ``maps`` is not a floating-point tensor.
        ValueError: ``maps`` is not 3-D or not finite, ``masks`` has another size or is not binary.

    Example:
        >>> import torch
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, :2, :2] = 1.0  # all attribution in the top-left quarter
        >>> masks = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> masks[0, :2, :] = True  # the object: the top half
        >>> foreground_energy(maps, masks)
        ForegroundEnergy(energy=tensor([1.]), chance=tensor([0.5000]))
    """
    check_tensor(maps, "maps")
    if maps.ndim != 3:
        raise ValueError(f"maps must be a 3-D tensor of shape (N, H, W), got {describe(maps)}")
    check_dtype(maps, "maps", "floating")
    check_finite(maps, "maps")
    n, h, w = maps.shape
    objects = _check_masks(masks, "masks", n, h, w, f"maps of shape {tuple(maps.shape)}", binary=True)
    check_same_device(maps=maps, masks=masks)
    positive = maps.float().clamp_min(0)
    total = positive.sum(dim=(1, 2))
    inside = (positive * objects).sum(dim=(1, 2))
    energy = torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float32).tiny), float("nan"))
    chance = objects.float().mean(dim=(1, 2))
    return ForegroundEnergy(energy, chance)


# ------------------------------------------------------------------------------------------ background swaps


@dataclass
class BackgroundSensitivity:
    r"""What :func:`background_sensitivity` returns: per image, how far the embedding moves under each swap.

    Attributes:
        background: ``(N,)`` float64 shift :math:`1 - \cos(f(x), f(x_{\text{bg}}))` when only the background is
            replaced (in ``[0, 2]``).
        object: ``(N,)`` float64 shift :math:`1 - \cos(f(x), f(x_{\text{obj}}))` when only the object is
            replaced.
        score: ``(N,)`` float64 background-reliance score ``background / (background + object)`` in ``[0, 1]``:
            0 when only the object moves the embedding, 1 when only the background does, 0.5 when both move it
            alike; NaN when neither does.

    Example:
        >>> import torch
        >>> s = BackgroundSensitivity(torch.tensor([0.3]), torch.tensor([0.1]), torch.tensor([0.75]))
        >>> s.per_class(torch.tensor([4]))
        {4: {'background': 0.3, 'object': 0.1, 'score': 0.75, 'count': 1}}
    """

    background: torch.Tensor
    object: torch.Tensor
    score: torch.Tensor

    def per_class(self, labels: torch.Tensor) -> dict[int, dict[str, float]]:
        """Means per class of ``background``, ``object`` and ``score`` (NaN scores left out), and the count.

        Args:
            labels: ``(N,)`` integer labels of the images.

        Returns:
            ``{label: {"background", "object", "score", "count"}}``, labels in increasing order; a class whose
            every score is NaN gets ``score`` NaN.
        """
        check_labels(labels, length=int(self.score.numel()), length_source="the number of images")
        labels = labels.cpu()
        out: dict[int, dict[str, float]] = {}
        for c in torch.unique(labels).tolist():
            sel = labels == c
            scores = self.score.cpu()[sel]
            finite = scores[~torch.isnan(scores)]
            out[int(c)] = {
                "background": float(self.background.cpu()[sel].mean()),
                "object": float(self.object.cpu()[sel].mean()),
                "score": float(finite.mean()) if finite.numel() else math.nan,
                "count": int(sel.sum()),
            }
        return out


def _embedding_shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − cos(a, b)`` per row as ``½‖â − b̂‖²`` in float64: exactly 0 for identical embeddings."""
    a_hat = F.normalize(a.double(), dim=1)
    b_hat = F.normalize(b.double(), dim=1)
    return 0.5 * (a_hat - b_hat).pow(2).sum(dim=1)


def background_sensitivity(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    donors: tuple[torch.Tensor, torch.Tensor],
    input_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    fill: Literal["tile", "black", "inpaint"] = "tile",
    dilation: int = 4,
    batch_size: int = 256,
) -> BackgroundSensitivity:
    r"""How far each embedding moves when only its background is replaced, against when only its object is.

    For image :math:`x_i` with donor :math:`d_i` (best an image of another class), two edits are made with
    :func:`~dml_bias.transforms.functional.swap_background`: :math:`x_{\text{bg}}` keeps :math:`x_i`'s object on
    :math:`d_i`'s background, and :math:`x_{\text{obj}}` puts :math:`d_i`'s object on :math:`x_i`'s background (the
    original object's box tiled over with its own background). Then

    .. math::

        b_i = 1 - \cos(f(x_i), f(x_{\text{bg}})), \qquad o_i = 1 - \cos(f(x_i), f(x_{\text{obj}})), \qquad
        \text{score}_i = \frac{b_i}{b_i + o_i},

    a retraining-free background-reliance score (the ratio :math:`b_i / o_i` mapped to ``[0, 1]``). Shifts are
    computed as :math:`\tfrac12\lVert \hat e - \hat e' \rVert^2` in float64, so an embedding that does not move
    has a shift of exactly 0 (for example a model fed hard-masked inputs under a background swap with binary
    masks). The model runs in eval mode without gradients; its training flags are restored afterwards.

    Args:
        model: A module mapping a batch of inputs to ``(N, D)`` embeddings.
        images: ``(N, C, H, W)`` images (``uint8`` or floating point).
        masks: ``(N, 1, H, W)`` or ``(N, H, W)`` object masks of ``images`` (formats of
            :func:`~dml_bias.transforms.functional.foreground_mask`).
        donors: ``(donor_images, donor_masks)`` with the shapes, dtypes and device of ``images`` and ``masks``:
            ``donors[0][i]`` gives its background (and its object) to image ``i``.
        input_fn: Turns ``(images, masks)`` of a batch into the model's input (normalisation, masking, an extra
            mask channel, moving to the model's device); ``None``: ``images`` as they are. The object-swapped
            images are passed with the donors' masks.
        fill: How the removed object's box is filled (``"tile"``, ``"black"``, ``"inpaint"``; see
            :func:`~dml_bias.transforms.functional.swap_background`).
        dilation: Pixels added around an object's box before it is filled (``>= 0``).
        batch_size: Images embedded per forward pass (``>= 1``).

    Returns:
        A :class:`BackgroundSensitivity` with the per-image ``background`` and ``object`` shifts and ``score``
        (float64, CPU); :meth:`BackgroundSensitivity.per_class` averages them per class.

    Raises:
        TypeError: ``model`` is not a module, ``donors`` is not a pair of tensors.
        ValueError: shapes that do not match (the message names the argument) or bad options.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> images = torch.zeros(2, 3, 8, 8)
        >>> images[0, 0], images[1, 1] = 1.0, 1.0  # red and green backgrounds
        >>> masks = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
        >>> masks[:, :, 2:6, 2:6] = 255  # a square object in the middle
        >>> images[:, 2, 2:6, 2:6] = torch.tensor([0.2, 0.9]).view(2, 1, 1)  # two shades of blue objects
        >>> colour = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # mean colour: mostly background
        >>> s = background_sensitivity(colour, images, masks, donors=(images.flip(0), masks.flip(0)), dilation=0)
        >>> s.score.round(decimals=2)
        tensor([0.9000, 0.9100], dtype=torch.float64)
    """
    from dml_bias.transforms.functional import swap_background

    model = _check_model(model)
    sizes = _check_images(images, "images")
    n, h, w = sizes["N"], sizes["H"], sizes["W"]
    _check_masks(masks, "masks", n, h, w, f"images of shape {tuple(images.shape)}", binary=False)
    if not (isinstance(donors, (tuple, list)) and len(donors) == 2):
        raise TypeError(f"donors must be a pair (donor_images, donor_masks) of tensors, got {describe(donors)}")
    donor_images, donor_masks = donors
    check_tensor(donor_images, "donors[0]")
    check_tensor(donor_masks, "donors[1]")
    if donor_images.shape != images.shape or donor_images.dtype != images.dtype:
        raise ValueError(
            f"donors[0] must have the shape and dtype of images ({describe(images)}), got {describe(donor_images)}"
        )
    if donor_masks.shape != masks.shape:
        raise ValueError(f"donors[1] must have the shape of masks ({describe(masks)}), got {describe(donor_masks)}")
    check_same_device(images=images, masks=masks, **{"donors[0]": donor_images, "donors[1]": donor_masks})
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"input_fn must be a callable (images, masks) -> model input or None, got {describe(input_fn)}")
    check_number(batch_size, "batch_size", low=1, integer=True)
    background_swapped = torch.empty_like(images)
    object_swapped = torch.empty_like(images)
    for i in range(n):
        background_swapped[i] = swap_background(
            images[i],
            masks[i],
            donor_images[i],
            donor_masks[i],
            fill=fill,
            dilation=dilation,
        )[0]
        object_swapped[i] = swap_background(
            donor_images[i],
            donor_masks[i],
            images[i],
            masks[i],
            fill=fill,
            dilation=dilation,
        )[0]

    def embed(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, n, batch_size):
            xb, mb = x[start : start + batch_size], m[start : start + batch_size]
            e = model(input_fn(xb, mb) if input_fn is not None else xb)
            if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[0] != xb.shape[0]:
                raise ValueError(
                    f"model must map a batch of {xb.shape[0]} inputs to (N, D) embeddings, got {describe(e)}"
                )
            out.append(e.detach().cpu())
        return torch.cat(out)

    # The three sets are embedded in identical batches, so equal inputs give bit-identical embeddings.
    with torch.no_grad(), _eval_mode(model):
        original = embed(images, masks)
        moved_background = _embedding_shift(original, embed(background_swapped, masks))
        moved_object = _embedding_shift(original, embed(object_swapped, donor_masks))
    total = moved_background + moved_object
    score = torch.where(total > 0, moved_background / total.clamp_min(torch.finfo(torch.float64).tiny), math.nan)
    return BackgroundSensitivity(moved_background, moved_object, score)
