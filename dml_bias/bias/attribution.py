r"""What an embedding model looks at, measured without retraining.

* :func:`~dml_bias.bias.similarity_decomposition`: the cosine similarity of a query to a reference decomposed
  exactly over the positions of a layer (or the input pixels): each position's contribution is the element-wise
  product of the layer's output and the similarity's gradient, with the embedding's norm held constant
  (Stylianou et al. :cite:`stylianou2019visualizing`, Black et al. :cite:`black2022visualizing`); integrated
  gradients :cite:`sundararajan2017axiomatic` and Grad-CAM :cite:`selvaraju2017gradcam` as options;
* :func:`~dml_bias.bias.similarity_attribution`: the same maps at the image's resolution, for display and for
  the foreground energy;
* :func:`~dml_bias.bias.pairwise_decomposition`: which query region matches which reference region (Black et
  al.'s position-by-position contribution matrix);
* :func:`~dml_bias.bias.foreground_energy`: the share of a map's positive attribution that falls on the object
  (the energy-based pointing game of Score-CAM :cite:`wang2020scorecam`), with the object's area share as the
  chance level;
* :func:`~dml_bias.bias.background_sensitivity`: how far an embedding moves when only the background is
  replaced, against when only the object is replaced (both with
  :func:`~dml_bias.transforms.functional.swap_background`).

All work on any :class:`torch.nn.Module` that maps a batch of images to a batch of embeddings; the study
(:func:`~dml_bias.bias.run_study`) reports them for every trained model. The guide
:doc:`/guides/attribution` checks the methods on models whose reliance is known by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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
from dml_bias.bias._modes import eval_mode

__all__ = [
    "ATTRIBUTION_METHODS",
    "BackgroundSensitivity",
    "ForegroundEnergy",
    "PairwiseDecomposition",
    "SimilarityDecomposition",
    "background_sensitivity",
    "foreground_energy",
    "pairwise_decomposition",
    "similarity_attribution",
    "similarity_decomposition",
]

#: The attribution methods of :func:`similarity_attribution` and :func:`similarity_decomposition`: the faithful
#: ``"decomposition"`` (the default) and ``"integrated_gradients"``, and ``"gradcam"`` (not faithful for models that
#: select positions after the explained layer).
ATTRIBUTION_METHODS: tuple[str, ...] = ("decomposition", "integrated_gradients", "gradcam")


# ---------------------------------------------------------------------------------------------------- helpers


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping images to embeddings, got {describe(model)}")
    return model


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


@contextmanager
def _norm_held_constant() -> Iterator[None]:
    """While active, :func:`torch.nn.functional.normalize` divides by a *detached* norm (same forward values).

    A model that L2-normalises its own output is invariant to the scale of its features, so without this every
    first-order decomposition of its similarity would sum to zero (Euler's identity for a function of degree 0).
    """
    original = F.normalize

    def normalize(
        input: torch.Tensor,
        p: float = 2.0,
        dim: int = 1,
        eps: float = 1e-12,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is not None:
            return original(input, p, dim, eps, out)
        denominator = input.norm(p, dim, keepdim=True).clamp_min(eps).expand_as(input)
        return input / denominator.detach()

    F.normalize = normalize  # type: ignore[assignment]
    try:
        yield
    finally:
        F.normalize = original  # type: ignore[assignment]


def _channel_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over channels: ``(N, K, h, w)`` → ``(N, h, w)``, tokens ``(N, T, D)`` → ``(N, T)``."""
    return x.sum(dim=1) if x.ndim == 4 else x.sum(dim=-1)


class _Explained(NamedTuple):
    """One pass of the model: the explained point's value, its gradient, the similarity and the norm used."""

    value: torch.Tensor  # the layer's output (or the input) at the real image
    grad: torch.Tensor  # ∂s̃/∂(point) at the point on the path
    score: torch.Tensor  # (N,) s̃ on the path (= the cosine similarity at alpha = 1)
    norm: torch.Tensor  # (N,) ‖f(q)‖ at the real image (held constant)


class _Point:
    """The point that is explained: ``model``'s input (``layer=None``) or the output of one of its layers."""

    def __init__(self, model: nn.Module, layer: nn.Module | str | None, *, methods_4d: bool) -> None:
        self.model = model
        self.methods_4d = methods_4d
        if layer is None:
            self.module: nn.Module | None = None
            self.name = "input"
            return
        self.module, self.name = _find_layer(model, layer)
        if isinstance(self.module, torch.jit.ScriptModule):
            raise ValueError(
                f"layer {self.name!r} is part of a TorchScript model and cannot be hooked; pass layer=None to "
                "explain the similarity at the input pixels"
            )

    def check_output(self, output: Any) -> torch.Tensor:
        if self.methods_4d:
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                raise ValueError(
                    f"layer must output an (N, K, h, w) feature map for this method, got {describe(output)} "
                    f"from {self.name!r}"
                )
        elif not isinstance(output, torch.Tensor) or output.ndim not in (3, 4):
            raise ValueError(
                f"layer must output an (N, K, h, w) feature map or (N, T, D) tokens, got {describe(output)} "
                f"from {self.name!r}"
            )
        if not output.is_floating_point():
            raise ValueError(f"layer must output a floating-point tensor, got {describe(output)} from {self.name!r}")
        return output

    def forward(
        self, query: torch.Tensor, *, alpha: float = 1.0, baseline: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward ``query`` with the point moved to ``baseline + alpha (point − baseline)`` as a leaf.

        Returns the ``(N, D)`` embeddings (attached to the graph), the point's value at the real image and the
        leaf. Autograd records only the graph after the point (the part before it runs without gradients).
        """
        values: list[torch.Tensor] = []
        leaves: list[torch.Tensor] = []
        n = query.shape[0]

        def move(raw: torch.Tensor) -> torch.Tensor:
            raw = raw.detach()
            if alpha == 1.0:
                leaf = raw.clone()
            else:
                base = torch.zeros_like(raw) if baseline is None else baseline.to(raw.dtype)
                leaf = base + alpha * (raw - base)
            values.append(raw)
            leaves.append(leaf.requires_grad_(True))
            return leaf

        def hook(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
            leaf = move(self.check_output(output))
            torch.set_grad_enabled(True)
            # A copy goes on, so in-place operations after the layer cannot touch the leaf.
            return leaf.clone()

        handle = self.module.register_forward_hook(hook) if self.module is not None else None
        try:
            if self.module is None:
                torch.set_grad_enabled(True)
                embeddings = self.model(move(query))
            else:
                torch.set_grad_enabled(False)
                embeddings = self.model(query.detach().clone())
        finally:
            if handle is not None:
                handle.remove()
        torch.set_grad_enabled(True)
        if not leaves:
            raise ValueError(f"layer {self.name!r} did not run in model's forward pass; choose a layer it uses")
        if len(leaves) > 1:
            raise ValueError(
                f"layer {self.name!r} ran {len(leaves)} times in one forward pass; choose a layer that runs once"
            )
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or embeddings.shape[0] != n:
            raise ValueError(f"model must map query to ({n}, D) embeddings, got {describe(embeddings)}")
        return embeddings, values[0], leaves[0]

    def run(
        self,
        query: torch.Tensor,
        r_hat: torch.Tensor,
        *,
        alpha: float = 1.0,
        baseline: torch.Tensor | None = None,
        norm: torch.Tensor | None = None,
        hold_norm: bool = True,
    ) -> _Explained:
        """:meth:`forward`, then the gradient of the score with respect to the point.

        The score is ``⟨f, r̂⟩ / ‖f(q)‖`` with the norm detached (``hold_norm``), or the plain cosine similarity.
        """
        embeddings, value, leaf = self.forward(query, alpha=alpha, baseline=baseline)
        if embeddings.shape[1] != r_hat.shape[1]:
            raise ValueError(
                f"reference must have the embedding size D={embeddings.shape[1]} of model's output, "
                f"got D={r_hat.shape[1]}"
            )
        work = embeddings.to(r_hat.dtype)
        if norm is None:
            norm = work.detach().norm(dim=1)
            _check_embedding_norms(norm, "query")
        if hold_norm:
            score = (work * r_hat).sum(dim=1) / norm
        else:
            score = F.cosine_similarity(work, r_hat, dim=1)
        if not bool(torch.isfinite(score).all()):
            raise ValueError("model gave non-finite embeddings for query; check the images and the model")
        (grad,) = torch.autograd.grad(score.sum(), leaf)
        return _Explained(value, grad, score.detach(), norm)


def _check_embedding_norms(norms: torch.Tensor, name: str) -> None:
    zero = ~(norms > 0)
    if bool(zero.any()):
        i = int(torch.nonzero(zero)[0])
        raise ValueError(
            f"model maps {name}[{i}] to a zero (or non-finite) embedding, whose cosine similarity is undefined"
        )


def _reference_directions(model: nn.Module, reference: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """Unit reference embeddings ``(N, D)`` in ``work`` dtype (images embedded without gradients)."""
    with torch.no_grad():
        ref = model(reference.detach().clone()) if reference.ndim == 4 else reference.detach()
    if not isinstance(ref, torch.Tensor) or ref.ndim != 2:
        raise ValueError(f"model must map images to (N, D) embeddings, got {describe(ref)}")
    ref = ref.to(work)
    norms = ref.norm(dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("reference embeddings must be finite, got NaN or infinite values")
    _check_embedding_norms(norms, "reference")
    return ref / norms[:, None]


def _check_query_reference(query: Any, reference: Any) -> dict[str, int]:
    sizes = _check_images(query, "query")
    check_dtype(query, "query", "floating")
    check_finite(query, "query")
    check_tensor(reference, "reference")
    if reference.ndim == 4:
        _check_images(reference, "reference", {"N": sizes["N"]})
        check_dtype(reference, "reference", "floating")
        check_finite(reference, "reference")
    elif reference.ndim == 2:
        check_embeddings(reference, "reference")
        check_shape(reference, "reference", ("N", None), {"N": sizes["N"]}, sources={"N": "query.shape[0]"})
    else:
        raise ValueError(f"reference must be (N, C, H, W) images or (N, D) embeddings, got {describe(reference)}")
    check_same_device(query=query, reference=reference)
    return sizes


def _check_baseline(baseline: Any, query: torch.Tensor, layer: Any) -> torch.Tensor | None:
    if baseline is None:
        return None
    if layer is not None:
        raise ValueError("baseline applies to layer=None (attribution at the input) only; at a layer it is 0")
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise ValueError(f"baseline must be a finite number or a tensor, got {baseline!r}")
        return torch.full_like(query, float(baseline))
    check_tensor(baseline, "baseline")
    check_dtype(baseline, "baseline", "floating")
    check_finite(baseline, "baseline")
    try:
        return torch.broadcast_to(baseline.to(query.device, query.dtype), query.shape)
    except RuntimeError:
        raise ValueError(
            f"baseline must broadcast to query's shape {tuple(query.shape)}, got {describe(baseline)}"
        ) from None


@contextmanager
def _attribution_mode(model: nn.Module, *, hold_norm: bool) -> Iterator[None]:
    """Eval mode, autograd on whatever the caller's mode, F.normalize with its norm held; all restored after."""
    grad_mode = torch.is_grad_enabled()
    with torch.inference_mode(False), eval_mode(model), _norm_held_constant() if hold_norm else nullcontext():
        try:
            yield
        finally:
            torch.set_grad_enabled(grad_mode)


def _validate(
    model: Any, query: Any, reference: Any, layer: Any, method: Any, steps: Any, baseline: Any
) -> tuple[nn.Module, dict[str, int], _Point, torch.Tensor | None]:
    model = _check_model(model)
    check_choice(method, "method", ATTRIBUTION_METHODS)
    check_number(steps, "steps", low=1, integer=True)
    if method == "gradcam" and layer is None:
        raise ValueError("method='gradcam' needs a layer (Grad-CAM weighs a layer's channels); got layer=None")
    point = _Point(model, layer, methods_4d=method == "gradcam")
    sizes = _check_query_reference(query, reference)
    return model, sizes, point, _check_baseline(baseline, query, layer)


def _decompose(
    model: nn.Module,
    query: torch.Tensor,
    reference: torch.Tensor,
    point: _Point,
    method: str,
    steps: int,
    baseline: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position maps (channels summed; Grad-CAM's ReLU map) and the cosine similarity, in the work dtype."""
    work = torch.promote_types(query.dtype, torch.float32)
    with _attribution_mode(model, hold_norm=method != "gradcam"):
        r_hat = _reference_directions(model, reference, work)
        if method == "gradcam":
            out = point.run(query, r_hat, hold_norm=False)
            weights = out.grad.mean(dim=(2, 3), keepdim=True)
            maps = torch.relu((weights * out.value).sum(dim=1))
        elif method == "decomposition":
            out = point.run(query, r_hat)
            maps = _channel_sum(out.value.to(work) * out.grad.to(work))
        else:  # integrated gradients along the straight path, midpoint rule
            out = point.run(query, r_hat)
            total = torch.zeros_like(out.value, dtype=work)
            for j in range(steps):
                step = point.run(query, r_hat, alpha=(j + 0.5) / steps, baseline=baseline, norm=out.norm)
                total += step.grad.to(work)
            start = torch.zeros_like(out.value) if (baseline is None or point.module is not None) else baseline
            maps = _channel_sum((out.value - start).to(work) * total / steps)
    return maps.detach(), out.score


class SimilarityDecomposition(NamedTuple):
    """What :func:`similarity_decomposition` returns.

    Example:
        >>> import torch
        >>> d = SimilarityDecomposition(torch.tensor([[0.5, 0.25]]), torch.tensor([0.8]), torch.tensor([0.05]))
        >>> float(d.maps.sum() + d.residual)
        0.8
    """

    #: ``(N, h, w)`` (feature maps), ``(N, T)`` (tokens) or ``(N, H, W)`` (``layer=None``): each position's signed
    #: contribution to the similarity.
    maps: torch.Tensor
    #: ``(N,)`` cosine similarity of each query to its reference.
    similarity: torch.Tensor
    #: ``(N,)`` what no position accounts for: ``similarity − maps.sum()`` (a bias term of the head, the part of a
    #: non-linear head the first-order decomposition misses, or the path error of integrated gradients).
    residual: torch.Tensor


def similarity_decomposition(
    model: nn.Module,
    query: torch.Tensor,
    reference: torch.Tensor,
    *,
    layer: nn.Module | str | None = None,
    method: str = "decomposition",
    steps: int = 32,
    baseline: float | torch.Tensor | None = None,
) -> SimilarityDecomposition:
    r"""The cosine similarity of each query to its reference, decomposed over the positions of a layer or input.

    With :math:`A \in \mathbb{R}^{K \times h \times w}` the output of ``layer`` for query :math:`q` (or the image
    itself for ``layer=None``), :math:`f` the model, :math:`\hat r` the unit reference embedding and the query's
    norm held constant, :math:`\tilde s(A) = \langle f(A), \hat r\rangle / \lVert f(q) \rVert` (equal to the
    cosine similarity :math:`s` at the real image). ``method="decomposition"`` (Stylianou et al.
    :cite:`stylianou2019visualizing`, Black et al. :cite:`black2022visualizing`) gives each position

    .. math::

        M_{uv} = \sum_k A_{kuv} \, \frac{\partial \tilde s}{\partial A_{kuv}},

    the element-wise product of the layer's output and the gradient, summed over channels, *without* spatial
    averaging. When everything after the layer is linear (or positively homogeneous, e.g. average plus max
    pooling) and bias-free up to the normalisation — the usual DML head — the maps sum exactly to :math:`s`
    (Euler's identity); a bias :math:`b` of the head contributes :math:`\langle b, \hat r\rangle / \lVert f(q)
    \rVert`, which belongs to no position and is returned in ``residual``. At ``layer=None`` the same formula is
    gradient × input, for models that cannot be hooked (TorchScript, ``torch.export``).

    ``method="integrated_gradients"`` (Sundararajan et al. :cite:`sundararajan2017axiomatic`) averages the gradient
    along the straight path from ``baseline`` (0 at a layer) to the point in ``steps`` midpoint steps; its maps
    sum to :math:`\tilde s(A) - \tilde s(\text{baseline})` up to the path discretisation. ``method="gradcam"``
    gives Grad-CAM's non-negative map (see :func:`similarity_attribution`; it has no completeness).

    Calls of :func:`torch.nn.functional.normalize` inside ``model`` (an L2-normalised embedding head) run with
    their norm detached during the call, so a model that normalises its own output is decomposed as if the
    normalisation were applied afterwards; without that, its maps would sum to zero. A model that normalises
    otherwise (a compiled TorchScript head, a hand-written division) gives maps of the part it does not
    normalise: give it without its final normalisation. The model runs in eval mode; training flags, hooks,
    parameters and their ``.grad`` are left as they were. Memory grows with ``N``: pass large sets in chunks.

    Args:
        model: A module mapping ``(N, C, H, W)`` images to ``(N, D)`` embeddings.
        query: ``(N, C, H, W)`` finite floating-point query images, as ``model`` takes them.
        reference: ``(N, C', H', W')`` reference images (embedded by ``model``) or ``(N, D)`` reference
            embeddings, on ``query``'s device.
        layer: The sub-module (or its dotted name) whose output is explained: an ``(N, K, h, w)`` feature map or
            ``(N, T, D)`` tokens, produced once per forward pass. ``None``: the input pixels.
        method: ``"decomposition"`` (default), ``"integrated_gradients"`` or ``"gradcam"`` (a layer with a 4-D
            output only).
        steps: Path steps of integrated gradients (``>= 1``).
        baseline: Integrated gradients' starting point at the input (``layer=None``): a number or a tensor that
            broadcasts to ``query``; ``None`` is 0 (black after the model's own normalisation is undone: pass
            e.g. the normalised black value to start from black).

    Returns:
        A :class:`SimilarityDecomposition` of ``maps`` (``(N, h, w)``, ``(N, T)`` or, for ``layer=None``,
        ``(N, H, W)`` channels summed), ``similarity`` and ``residual`` (``(N,)``), in ``query``'s dtype promoted
        to at least float32, without gradient.

    Raises:
        TypeError: ``model`` is not a module, ``layer`` is neither a module, a name nor ``None``, a tensor has the
            wrong dtype.
        ValueError: ``layer`` is not part of ``model``, does not run, runs more than once or outputs something
            else than a 3-D/4-D tensor; shapes that do not match; non-finite inputs; ``steps < 1``; a zero
            embedding.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                       nn.Linear(4, 3, bias=False)).double()
        >>> query, reference = torch.rand(2, 3, 5, 5).double(), torch.rand(2, 3, 5, 5).double()
        >>> d = similarity_decomposition(model, query, reference, layer="1")
        >>> d.maps.shape, bool(torch.allclose(d.maps.sum(dim=(1, 2)), d.similarity)), d.residual.abs().max() < 1e-12
        (torch.Size([2, 5, 5]), True, tensor(True))
    """
    model, _, point, base = _validate(model, query, reference, layer, method, steps, baseline)
    maps, similarity = _decompose(model, query, reference, point, method, int(steps), base)
    return SimilarityDecomposition(maps, similarity, similarity - maps.flatten(1).sum(dim=1))


def _as_grid(maps: torch.Tensor) -> torch.Tensor:
    """Token maps ``(N, T)`` → ``(N, g, g)`` (``T = g²``, or ``g² + 1`` with a leading class token left out)."""
    t = maps.shape[1]
    for skip in (0, 1):
        g = math.isqrt(t - skip)
        if g > 0 and g * g == t - skip:
            return maps[:, skip:].reshape(maps.shape[0], g, g)
    raise ValueError(
        f"layer outputs {t} tokens, which form no square grid (T = g² or g² + 1 with a class token); use "
        "similarity_decomposition for token maps"
    )


def similarity_attribution(
    model: nn.Module,
    query: torch.Tensor,
    reference: torch.Tensor,
    *,
    layer: nn.Module | str | None = None,
    method: str = "decomposition",
    steps: int = 32,
    baseline: float | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-pixel maps explaining the cosine similarity of each query image to its reference.

    The maps of :func:`similarity_decomposition` (see there for the methods), brought to the query's ``H × W``:
    a layer's ``h × w`` map (or a square grid of tokens) is enlarged by nearest-neighbour repetition and divided
    by the number of pixels each position covers, so the map still sums to the similarity (exactly when
    ``H/h`` and ``W/w`` are integers) and a position's contribution stays on the pixels it covers; at
    ``layer=None`` the maps already have the query's size. Positive values mark what makes the query *more*
    similar to the reference, negative values what makes it less similar. :func:`foreground_energy` counts the
    positive part.

    ``method="gradcam"`` keeps the Grad-CAM map :cite:`selvaraju2017gradcam` of the cosine similarity
    (:math:`\alpha_k = \frac{1}{hw}\sum_{uv} \partial s/\partial A_{kuv}`, :math:`M = \operatorname{ReLU}(\sum_k
    \alpha_k A_k)`, resized bilinearly). It is **not faithful** for models that select positions after the
    layer (masked or attention pooling, transformers): the spatial *mean* of the gradient forgets where the
    gradient is. On a model that pools only the object's window, Grad-CAM puts most of its map on the
    background (see :doc:`/guides/attribution`).

    Args:
        model: A module mapping ``(N, C, H, W)`` images to ``(N, D)`` embeddings.
        query: ``(N, C, H, W)`` finite floating-point query images, as ``model`` takes them.
        reference: ``(N, C', H', W')`` reference images or ``(N, D)`` reference embeddings.
        layer: The explained sub-module or its dotted name (``"features"`` of :class:`~dml_bias.bias.SmallCNN`,
            ``"trunk.layer4"`` of :func:`~dml_bias.bias.build_resnet50`); ``None``: the input pixels (works for
            TorchScript and exported models).
        method: ``"decomposition"`` (default), ``"integrated_gradients"`` or ``"gradcam"``
            (:data:`ATTRIBUTION_METHODS`).
        steps: Path steps of integrated gradients (``>= 1``).
        baseline: Integrated gradients' starting point at the input (see :func:`similarity_decomposition`).

    Returns:
        ``(N, H, W)`` maps in ``query``'s dtype and device, without gradient: signed for ``"decomposition"`` and
        ``"integrated_gradients"``, non-negative for ``"gradcam"``.

    Raises:
        TypeError: ``model`` is not a module, ``layer`` is neither a module, a name nor ``None``, or a tensor has
            the wrong dtype.
        ValueError: as :func:`similarity_decomposition`; token maps that form no square grid.

    Example:
        >>> import torch
        >>> from dml_bias.bias import SmallCNN
        >>> model = SmallCNN(embedding_size=8, width=4)
        >>> query, reference = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
        >>> maps = similarity_attribution(model, query, reference, layer="features")
        >>> maps.shape, model.training
        (torch.Size([2, 16, 16]), True)
        >>> similarity_attribution(model, query, reference).shape  # at the input pixels
        torch.Size([2, 16, 16])
    """
    model, sizes, point, base = _validate(model, query, reference, layer, method, steps, baseline)
    maps, _ = _decompose(model, query, reference, point, method, int(steps), base)
    height, width = sizes["H"], sizes["W"]
    if maps.ndim == 2:
        maps = _as_grid(maps)
    if method == "gradcam":
        maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        maps = maps.clamp_min(0)
    elif tuple(maps.shape[1:]) != (height, width):
        cells = maps.shape[1] * maps.shape[2]
        maps = F.interpolate(maps[:, None], size=(height, width), mode="nearest")[:, 0] * (cells / (height * width))
    return maps.to(query.dtype)


class PairwiseDecomposition(NamedTuple):
    """What :func:`pairwise_decomposition` returns.

    Example:
        >>> import torch
        >>> p = PairwiseDecomposition(torch.ones(1, 2, 3) / 6, torch.full((1, 2), 0.5), torch.full((1, 3), 1 / 3),
        ...                           torch.tensor([1.0]), torch.tensor([0.0]))
        >>> p.matrix.shape
        torch.Size([1, 2, 3])
    """

    #: ``(N, P, P')`` contribution of query position ``u`` matched with reference position ``v``.
    matrix: torch.Tensor
    #: ``(N, P)`` the query's map: row sums of ``matrix``.
    query_maps: torch.Tensor
    #: ``(N, P')`` the reference's map: column sums of ``matrix``.
    reference_maps: torch.Tensor
    #: ``(N,)`` cosine similarity of each pair.
    similarity: torch.Tensor
    #: ``(N,)`` ``similarity − matrix.sum()``: what no pair of positions accounts for (bias terms of the head).
    residual: torch.Tensor


def _position_embeddings(point: _Point, images: torch.Tensor, dims_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's share of the embedding, ``φ_u = Σ_k A_ku ∂f/∂A_ku`` ``(N, P, D)``, and ``f`` ``(N, D)``.

    Taken ``dims_chunk`` embedding dimensions per batched backward pass over one recorded graph (memory
    ``dims_chunk · N · K · P``).
    """
    if point.module is None:  # pairwise_decomposition always names a layer
        raise ValueError("layer must name the layer whose positions are matched; got None")
    work = torch.promote_types(images.dtype, torch.float32)
    out, raw, leaf = point.forward(images)
    out = out.to(work)
    n, dims = out.shape
    value = raw.to(work)
    parts: list[torch.Tensor] = []
    for start in range(0, dims, dims_chunk):
        stop = min(start + dims_chunk, dims)
        eye = torch.eye(dims, dtype=work, device=out.device)[start:stop]
        (grads,) = torch.autograd.grad(
            out,
            leaf,
            grad_outputs=eye[:, None, :].expand(stop - start, n, dims),
            is_grads_batched=True,
            retain_graph=stop < dims,
        )
        share = value[None] * grads.to(work)  # (c, N, K, h, w) or (c, N, T, D)
        share = share.sum(dim=2) if value.ndim == 4 else share.sum(dim=-1)
        parts.append(share.flatten(2).permute(1, 2, 0))  # (N, P, c)
    return torch.cat(parts, dim=2), out.detach()


def pairwise_decomposition(
    model: nn.Module,
    query: torch.Tensor,
    reference: torch.Tensor,
    *,
    layer: nn.Module | str,
    dims_chunk: int = 64,
) -> PairwiseDecomposition:
    r"""The similarity of each query/reference pair decomposed over pairs of positions (Black et al.).

    Each position :math:`u` of the query's layer output :math:`A` gets its share of the embedding,
    :math:`\varphi_u = \sum_k A_{ku}\, \partial f / \partial A_{ku} \in \mathbb{R}^D` (the normalisation held
    constant, as in :func:`similarity_decomposition`); for average pooling followed by a bias-free linear head
    this is :math:`W A_u / P`, and :math:`\sum_u \varphi_u = f(q)`. The same for the reference. Then

    .. math::

        P_{uv} = \frac{\langle \varphi^q_u, \varphi^r_v \rangle}{\lVert f(q) \rVert \, \lVert f(r) \rVert},
        \qquad \sum_{u,v} P_{uv} = \cos(f(q), f(r)),

    which shows which region of the query matches which region of the reference :cite:`black2022visualizing`.
    Its row sums are the query's map of :func:`similarity_decomposition` and its column sums the reference's.
    The sum is exact for bias-free heads that are linear (or positively homogeneous) after the layer; otherwise
    ``residual`` holds the rest. Memory: ``dims_chunk · N · K · P`` for the Jacobian blocks plus ``N · P · P'`` for
    the matrices; pass large sets in chunks.

    Args:
        model: A module mapping ``(N, C, H, W)`` images to ``(N, D)`` embeddings.
        query: ``(N, C, H, W)`` finite floating-point query images.
        reference: ``(N, C', H', W')`` finite floating-point reference images.
        layer: The explained sub-module or its dotted name (output ``(N, K, h, w)`` or ``(N, T, D)``).
        dims_chunk: Embedding dimensions differentiated per backward pass (``>= 1``).

    Returns:
        A :class:`PairwiseDecomposition` (``P = h·w`` or ``T`` positions, row-major), in ``query``'s dtype
        promoted to at least float32.

    Raises:
        TypeError: as :func:`similarity_decomposition`.
        ValueError: as :func:`similarity_decomposition`; ``reference`` is not a batch of images.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                       nn.Linear(4, 3, bias=False)).double()
        >>> q, r = torch.rand(1, 3, 2, 2, dtype=torch.float64), torch.rand(1, 3, 3, 3, dtype=torch.float64)
        >>> p = pairwise_decomposition(model, q, r, layer="1")
        >>> p.matrix.shape, bool(torch.isclose(p.matrix.sum(), p.similarity[0]))
        (torch.Size([1, 4, 9]), True)
    """
    model = _check_model(model)
    if layer is None:
        raise ValueError("layer must name the layer whose positions are matched; got None")
    point = _Point(model, layer, methods_4d=False)
    sizes = _check_images(query, "query")
    check_dtype(query, "query", "floating")
    check_finite(query, "query")
    check_tensor(reference, "reference")
    if reference.ndim != 4:
        raise ValueError(f"reference must be (N, C, H, W) images, got {describe(reference)}")
    _check_images(reference, "reference", {"N": sizes["N"]})
    check_dtype(reference, "reference", "floating")
    check_finite(reference, "reference")
    check_same_device(query=query, reference=reference)
    check_number(dims_chunk, "dims_chunk", low=1, integer=True)
    with _attribution_mode(model, hold_norm=True):
        phi_q, e_q = _position_embeddings(point, query, int(dims_chunk))
        phi_r, e_r = _position_embeddings(point, reference.to(query.dtype), int(dims_chunk))
    if e_q.shape[1] != e_r.shape[1]:
        raise ValueError("model must give query and reference embeddings of one size")
    n_q, n_r = e_q.norm(dim=1), e_r.norm(dim=1)
    _check_embedding_norms(n_q, "query")
    _check_embedding_norms(n_r, "reference")
    matrix = torch.bmm(phi_q, phi_r.transpose(1, 2)) / (n_q * n_r)[:, None, None]
    similarity = (e_q * e_r).sum(dim=1) / (n_q * n_r)
    residual = similarity - matrix.flatten(1).sum(dim=1)
    return PairwiseDecomposition(matrix, matrix.sum(dim=2), matrix.sum(dim=1), similarity, residual)


class ForegroundEnergy(NamedTuple):
    """What :func:`foreground_energy` returns: per image, the energy on the object and its chance level.

    A map without positive attribution (all zero, or all negative) has no energy to share: its ``energy`` is NaN
    and :attr:`valid` is ``False``. :meth:`summary` gives the mean over the valid maps and counts the others,
    so summaries never turn NaN.

    Example:
        >>> import torch
        >>> fe = ForegroundEnergy(torch.tensor([0.8, float("nan")]), torch.tensor([0.25, 0.25]))
        >>> fe.valid
        tensor([ True, False])
        >>> fe.summary()
        {'mean': 0.8, 'chance': 0.25, 'count': 1, 'empty': 1}
    """

    #: ``(N,)`` share of the map's positive attribution inside the object mask; NaN for a map with none.
    energy: torch.Tensor
    #: ``(N,)`` share of the image's pixels inside the object mask: the energy of a uniform map.
    chance: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """``(N,)`` bool: the maps that have positive attribution (whose ``energy`` is a number)."""
        return ~torch.isnan(self.energy)

    def summary(self) -> dict[str, float | int]:
        """Mean energy over the valid maps, mean chance over the same maps, and the counts.

        Returns:
            ``{"mean", "chance", "count", "empty"}``: ``mean`` and ``chance`` are NaN-free floats (0.0 and the
            chance of all maps when no map is valid), ``count`` the valid maps, ``empty`` the others.
        """
        valid = self.valid
        count = int(valid.sum())
        chance = self.chance[valid] if count else self.chance
        return {
            "mean": round(float(self.energy[valid].double().mean()), 12) if count else 0.0,
            "chance": round(float(chance.double().mean()), 12) if chance.numel() else 0.0,
            "count": count,
            "empty": int(valid.numel()) - count,
        }


def foreground_energy(maps: torch.Tensor, masks: torch.Tensor) -> ForegroundEnergy:
    r"""The share of each map's positive attribution that lies on the object, and the chance level beside it.

    The energy-based pointing game of Score-CAM :cite:`wang2020scorecam`: with :math:`M^+ = \max(M, 0)` and the
    object mask :math:`B`,

    .. math::

        E = \frac{\sum_{u,v} M^+_{uv} B_{uv}}{\sum_{u,v} M^+_{uv}} \in [0, 1], \qquad
        \text{chance} = \frac{1}{HW} \sum_{u,v} B_{uv},

    the chance level being the energy of a uniform map. A model that looks at the object scores well above
    chance; one that looks at the background, below it.

    **Signed maps** (:func:`similarity_attribution`'s default): only the positive part counts — the regions that
    make the query *more* similar to its reference. Negative contributions (regions that make it less similar)
    are left out of both sums, so a map that is negative on the object and positive on the background scores
    low. A map with no positive value has no energy: its ``energy`` is NaN, :attr:`ForegroundEnergy.valid` is
    ``False`` and :meth:`ForegroundEnergy.summary` counts it apart. The sums are taken in float64 after scaling
    each map by its largest value, so neither huge nor subnormal maps lose their share.

    Args:
        maps: ``(N, H, W)`` floating-point attribution maps (e.g. from :func:`similarity_attribution`), finite.
        masks: ``(N, H, W)`` or ``(N, 1, H, W)`` binary object masks of the same size: bool, 0/1, or ``uint8``
            0/255 (255 = object).

    Returns:
        A :class:`ForegroundEnergy` ``(energy, chance)`` of two ``(N,)`` float32 tensors on ``maps``' device.

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
    positive = maps.double().clamp_min(0)
    peak = positive.amax(dim=(1, 2), keepdim=True)
    scaled = positive / torch.where(peak > 0, peak, torch.ones_like(peak))
    total = scaled.sum(dim=(1, 2))
    inside = (scaled * objects).sum(dim=(1, 2))
    energy = torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), math.nan)
    chance = objects.double().mean(dim=(1, 2))
    return ForegroundEnergy(energy.float(), chance.float())


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
    embeddings: torch.Tensor | None = None,
    background_embeddings: torch.Tensor | None = None,
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
        embeddings: ``(N, D)`` embeddings of ``images`` (through ``input_fn``) that the caller already has, to
            save one forward pass; ``None``: computed here. Pass embeddings computed in the same batches, or an
            unmoved embedding may differ from its swap by round-off.
        background_embeddings: ``(N, D)`` embeddings of the background-swapped images (the ImageNet-9
            ``mixed_*`` variant made with these donors, ``fill`` and ``dilation``: the same images) that the
            caller already has; ``None``: made and embedded here.

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
    if images.is_floating_point():
        check_finite(images, "images")
        check_finite(donor_images, "donors[0]")
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"input_fn must be a callable (images, masks) -> model input or None, got {describe(input_fn)}")
    check_number(batch_size, "batch_size", low=1, integer=True)
    for given, given_name in ((embeddings, "embeddings"), (background_embeddings, "background_embeddings")):
        if given is not None:
            check_embeddings(given, given_name)
            check_shape(given, given_name, ("N", None), {"N": n}, sources={"N": "images.shape[0]"})
    background_swapped = torch.empty_like(images) if background_embeddings is None else None
    object_swapped = torch.empty_like(images)
    for i in range(n):
        if background_swapped is not None:
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
            if not bool(torch.isfinite(e).all()):
                raise ValueError("model gave NaN or infinite embeddings; check the images and the model")
            out.append(e.detach().cpu())
        return torch.cat(out)

    # The three sets are embedded in identical batches, so equal inputs give bit-identical embeddings.
    with torch.no_grad(), eval_mode(model):
        original = embed(images, masks) if embeddings is None else embeddings.detach().cpu()
        if background_embeddings is None:
            moved = embed(background_swapped, masks)  # type: ignore[arg-type]  # made above when not given
        else:
            moved = background_embeddings.detach().cpu()
        moved_background = _embedding_shift(original, moved)
        moved_object = _embedding_shift(original, embed(object_swapped, donor_masks))
    total = moved_background + moved_object
    score = torch.where(total > 0, moved_background / total.clamp_min(torch.finfo(torch.float64).tiny), math.nan)
    return BackgroundSensitivity(moved_background, moved_object, score)
